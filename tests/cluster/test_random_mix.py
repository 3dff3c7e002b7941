"""Random mixes of publishes, acks, requeues, consumers coming and going
and a node declared dead, over two nodes sharing a queue: nothing
confirmed is lost, nothing is delivered twice unless it came back
(requeued, or its node died) and then it says redelivered, and nothing a
dead node acks is settled."""

from __future__ import annotations

import asyncio
import random

import pytest

from roost.broker.message import QueueEntry
from tests.cluster import fixtures
from tests.cluster.test_pg_backing import Node, make_node, wait_for


class Client:
    """One consumer on one node, tracking what it holds unacked."""

    def __init__(self, node: Node, prefetch: int) -> None:
        self.node = node
        self.consumer, self.sink = node.consume(prefetch=prefetch)
        self.seen = 0

    def new(self) -> list[QueueEntry]:
        entries = [e for _, e in self.sink.got[self.seen :]]
        self.seen = len(self.sink.got)
        return entries


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_mix_over_two_nodes(pg_url: str, seed: int) -> None:
    rnd = random.Random(seed)
    epoch_a, (q,) = fixtures.prepare(pg_url)
    epoch_b = fixtures.new_node(pg_url, "b")
    a = await make_node(pg_url, epoch_a, q)
    b = await make_node(pg_url, epoch_b, q)
    nodes = [a, b]
    published: list[bytes] = []
    deliveries: dict[bytes, list[bool]] = {}  # body -> redelivered flags, in order
    acked: set[bytes] = set()
    held: dict[int, list[QueueEntry]] = {id(a): [], id(b): []}
    clients = {id(n): Client(n, rnd.randint(1, 20)) for n in nodes}
    dead = False
    n = 0
    try:
        for step in range(250):
            alive = [b] if dead else nodes
            # Publish a few and wait for the confirm.
            node = rnd.choice(alive)
            batch = 0
            for _ in range(rnd.randint(0, 8)):
                n += 1
                batch = node.publish(b"%d" % n)
                published.append(b"%d" % n)
            if batch:
                await node.confirmed(batch)
            await asyncio.sleep(rnd.choice([0, 0, 0.005]))
            for node in nodes:
                client = clients[id(node)]
                for e in client.new():
                    deliveries.setdefault(e.message.body, []).append(e.redelivered)
                    held[id(node)].append(e)
                mine = held[id(node)]
                if not mine:
                    continue
                rnd.shuffle(mine)
                k = rnd.randint(0, len(mine))
                chosen, held[id(node)] = mine[:k], mine[k:]
                client.consumer.unacked -= len(chosen)
                if rnd.random() < 0.2:
                    node.queue.requeue(chosen)  # nack, requeue=true
                else:
                    node.queue.settle(chosen)
                    node.queue.dispatch()
                    if node is b or not dead:
                        acked.update(e.message.body for e in chosen)
            if step == 120:
                # a is paused past its timeout: its lease lapses, then it is
                # declared dead. It keeps acking what it held (above):
                # fenced; and delivers nothing more from its buffer.
                a.messages.lease.revoke()
                fixtures.mark_dead(pg_url, epoch_a)
                await b.messages.on_node_dead(epoch_a)
                dead = True
        # Drain: b acks everything from now on.
        client = clients[id(b)]

        def drained() -> bool:
            for e in client.new():
                deliveries.setdefault(e.message.body, []).append(e.redelivered)
                held[id(b)].append(e)
            if held[id(b)]:
                client.consumer.unacked -= len(held[id(b)])
                b.queue.settle(held[id(b)])
                acked.update(e.message.body for e in held[id(b)])
                held[id(b)] = []
                b.queue.dispatch()
            return set(published) <= acked

        await wait_for(drained, 30)
        await b.confirmed(b.messages.writer.barrier())
        await a.confirmed(a.messages.writer.barrier())
    finally:
        await a.messages.close()
        await b.messages.close()
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 0
    for body in published:
        flags = deliveries[body]
        # A second delivery only after it came back, and then flagged.
        assert all(flags[1:]), (body, flags)
