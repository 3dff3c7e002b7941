"""PgBackingQueue under the broker's real Queue: publish through the vhost,
confirm through the Journal gate, consume, ack, requeue, and two nodes
sharing one queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from pamqp import commands

from roost.broker.consumer import Consumer
from roost.broker.message import Message, QueueEntry
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.cluster.devdb import ThrowawayPostgres
from roost.cluster.node_messages import NodeMessages
from roost.cluster.pg_backing import PgBackingQueue, attach
from roost.properties import encode_properties
from tests.cluster import fixtures

PERSISTENT = b"\x10\x00\x02"  # flags: delivery-mode; delivery-mode 2


class Sink:
    """A consumer's owner that records deliveries (a channel without wire)."""

    def __init__(self, credit: int = 1 << 30) -> None:
        self._credit = credit
        self.got: list[tuple[Consumer, QueueEntry]] = []
        self.arrived = asyncio.Event()

    def credit(self) -> int:
        return self._credit

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        # (Dispatch may hand over nothing when the buffer ran dry.)
        if entries:
            self.got.extend((consumer, e) for e in entries)
            self.arrived.set()

    def dispatch_soon(self, queue: Queue) -> None:
        asyncio.get_running_loop().call_soon(queue.dispatch)

    def cancelled_by_server(self, consumer: Consumer) -> None:
        pass


@dataclass
class Node:
    messages: NodeMessages
    vhost: VirtualHost
    queue: Queue
    sinks: list[Sink] = field(default_factory=list)

    def consume(self, prefetch: int = 0, credit: int = 1 << 30) -> tuple[Consumer, Sink]:
        sink = Sink(credit)
        consumer = Consumer(f"c{len(self.sinks)}", self.queue, sink, prefetch=prefetch)
        self.sinks.append(sink)
        self.queue.add_consumer(consumer)
        return consumer, sink

    def publish(self, body: bytes, persistent: bool = True, priority: int = 0) -> int:
        props = PERSISTENT if persistent else b"\x00\x00"
        if priority:
            props = encode_properties(commands.Basic.Properties(delivery_mode=2, priority=priority))
        message = Message("", "q", props, body, persistent, priority or None)
        routed, refused, batch = self.vhost.publish(self.vhost.default_exchange, message)
        assert routed and not refused
        return batch

    async def confirmed(self, batch: int) -> None:
        done = asyncio.Event()
        self.messages.journal.wait_durable(batch, done.set)
        await asyncio.wait_for(done.wait(), 10)
        assert self.messages.journal.failure(batch) is None

    def ack(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        consumer.unacked -= len(entries)
        self.queue.settle(entries)
        self.queue.dispatch()  # credit came back, as a channel's ack does


async def make_node(
    url: str,
    epoch: int,
    queue_id: int,
    durable: bool = True,
    arguments: dict[str, object] | None = None,
) -> Node:
    messages = NodeMessages(url, epoch, count_interval=0.2)
    await messages.start()
    vhost = VirtualHost("/", journal=messages.journal)
    loop = asyncio.get_running_loop()
    vhost.scheduler = loop.call_later
    queue = vhost.declare_queue("q", owner=None, durable=durable, arguments=arguments)
    attach(queue, messages.backing_queue(queue_id, durable))
    return Node(messages, vhost, queue)


async def wait_for(cond: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


@pytest.fixture
async def two_nodes(pg_url: str) -> AsyncIterator[tuple[Node, Node, str]]:
    a, (q,) = fixtures.prepare(pg_url)
    b = fixtures.new_node(pg_url, "b")
    node_a = await make_node(pg_url, a, q)
    node_b = await make_node(pg_url, b, q)
    yield node_a, node_b, pg_url
    await node_a.messages.close()
    await node_b.messages.close()


def bodies(sink: Sink) -> list[bytes]:
    return [e.message.body for _, e in sink.got]


async def test_publish_confirm_consume_ack(two_nodes: tuple[Node, Node, str]) -> None:
    node, _, url = two_nodes
    batches = [node.publish(b"%d" % i) for i in range(200)]
    await node.confirmed(max(batches))
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 200
    consumer, sink = node.consume(prefetch=50)
    acked = 0
    while acked < 200:
        await wait_for(lambda seen=acked: len(sink.got) > seen)  # type: ignore[misc]
        entries = [e for _, e in sink.got[acked:]]
        acked += len(entries)
        node.ack(consumer, entries)
    assert bodies(sink) == [b"%d" % i for i in range(200)]  # FIFO
    assert all(not e.redelivered and e.message.persistent for _, e in sink.got)
    await node.confirmed(node.messages.writer.barrier())
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 0


async def test_a_waiting_consumer_is_woken_by_a_commit(two_nodes: tuple[Node, Node, str]) -> None:
    node, other, _ = two_nodes
    _, here = node.consume(prefetch=10)
    _, there = other.consume(prefetch=10)
    await asyncio.sleep(0.1)
    node.publish(b"x", persistent=False)  # transient: the unlogged table
    await wait_for(lambda: len(here.got) + len(there.got) == 1)
    (_, entry), *_ = here.got or there.got
    assert entry.ref < 0 and not entry.message.persistent


async def test_competing_consumers_on_two_nodes_get_each_message_once(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, _ = two_nodes
    consumers = [(a, *a.consume(prefetch=5)), (b, *b.consume(prefetch=5))]
    total = 400

    async def ack_slowly(node: Node, consumer: Consumer, sink: Sink) -> None:
        done = 0
        while True:
            await sink.arrived.wait()
            sink.arrived.clear()
            await asyncio.sleep(0.005)  # some work per batch
            entries = [e for _, e in sink.got[done:]]
            done += len(entries)
            node.ack(consumer, entries)

    workers = [asyncio.create_task(ack_slowly(*c)) for c in consumers]
    try:
        for i in range(total):
            a.publish(b"%d" % i)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await wait_for(lambda: sum(len(s.got) for _, _, s in consumers) >= total, 30)
    finally:
        for w in workers:
            w.cancel()
    got = [body for _, _, s in consumers for body in bodies(s)]
    assert sorted(got) == sorted(b"%d" % i for i in range(total))  # each exactly once
    assert all(len(s.got) for _, _, s in consumers), "both nodes consumed"


async def test_requeue_puts_it_back_first_and_redelivered(
    two_nodes: tuple[Node, Node, str],
) -> None:
    node, _, _ = two_nodes
    await node.confirmed(max(node.publish(b"%d" % i) for i in range(3)))
    consumer, sink = node.consume(prefetch=1)
    await wait_for(lambda: len(sink.got) == 1)
    first = sink.got[0][1]
    consumer.unacked -= 1
    node.queue.requeue([first])  # basic.nack requeue=true
    await wait_for(lambda: len(sink.got) == 2)
    again = sink.got[1][1]
    assert again.message.body == b"0" and again.redelivered


async def test_a_paused_node_declared_dead_cannot_ack_what_another_redelivers(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, url = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(10)))
    ca, sink_a = a.consume(prefetch=10)
    await wait_for(lambda: len(sink_a.got) == 10)
    # a stops (SIGSTOP) past its timeout; the registry declares it dead.
    fixtures.mark_dead(url, a.messages.epoch)
    assert await b.messages.on_node_dead(a.messages.epoch) == 10
    cb, sink_b = b.consume(prefetch=10)
    await wait_for(lambda: len(sink_b.got) == 10)
    assert all(e.redelivered for _, e in sink_b.got)
    assert all(e.deliveries == 2 for _, e in sink_b.got)  # a's, then this one
    # a wakes up and acks: fenced, nothing happens.
    a.ack(ca, [e for _, e in sink_a.got])
    await a.confirmed(a.messages.writer.barrier())
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 10
    b.ack(cb, [e for _, e in sink_b.got])
    await b.confirmed(b.messages.writer.barrier())
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 0


async def test_buffered_messages_go_back_when_no_consumer_wants_them(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, _ = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(20)))
    consumer, sink = a.consume(prefetch=20)
    await wait_for(lambda: len(sink.got) == 20)
    # Requeued after delivery, and the consumer goes: nobody here wants them.
    consumer.unacked -= 20
    a.queue.remove_consumer(consumer)
    a.queue.requeue([e for _, e in sink.got])
    assert a.queue.backing.in_memory() == 20
    await wait_for(lambda: a.queue.backing.in_memory() == 0, 5)
    _, there = b.consume(prefetch=100)
    await wait_for(lambda: len(there.got) == 20)
    assert bodies(there) == [b"%d" % i for i in range(20)]
    assert all(e.redelivered for _, e in there.got)


async def test_len_counts_the_cluster(two_nodes: tuple[Node, Node, str]) -> None:
    a, b, _ = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(7)))
    assert a.queue.message_count == 7  # its own publishes, at once
    await wait_for(lambda: b.queue.message_count == 7, 5)  # counted
    assert b.queue.purge() == 7
    await b.confirmed(b.messages.writer.barrier())
    await wait_for(lambda: a.queue.message_count == 0, 5)


async def test_a_node_carries_on_after_postgresql_restarts(
    two_nodes: tuple[Node, Node, str], postgres_server: ThrowawayPostgres
) -> None:
    a, b, _ = two_nodes
    _, sink = b.consume(prefetch=10)
    await a.confirmed(a.publish(b"before"))
    await wait_for(lambda: len(sink.got) == 1)
    await asyncio.to_thread(postgres_server.stop_immediate)
    await asyncio.to_thread(postgres_server.start)
    # The writer's old connection is dead: the first batch after the
    # restart may fail (its outcome unknown), never confirm falsely.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        batch = a.publish(b"after")
        done = asyncio.Event()
        a.messages.journal.wait_durable(batch, done.set)
        await asyncio.wait_for(done.wait(), 20)
        if a.messages.journal.failure(batch) is None:
            break
        assert asyncio.get_running_loop().time() < deadline
    # b's listener and claim pool reconnect; the message reaches b.
    await wait_for(lambda: b"after" in bodies(sink), 20)


async def test_ttl_queue_without_consumers_dead_letters_through_the_cluster(
    pg_url: str,
) -> None:
    """The retry pattern: a wait queue with a TTL and no consumers whose
    expired messages dead-letter into a work queue consumed elsewhere."""
    a, (wait_id, work_id) = fixtures.prepare(pg_url, queues=2)
    b = fixtures.new_node(pg_url, "b")
    nodes = []
    for epoch in (a, b):
        messages = NodeMessages(pg_url, epoch, count_interval=0.2)
        await messages.start()
        vhost = VirtualHost("/", journal=messages.journal)
        vhost.scheduler = asyncio.get_running_loop().call_later
        wait = vhost.declare_queue(
            "wait",
            owner=None,
            durable=True,
            arguments={
                "x-message-ttl": 200,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "work",
            },
        )
        attach(wait, messages.backing_queue(wait_id, True))
        work = vhost.declare_queue("work", owner=None, durable=True)
        attach(work, messages.backing_queue(work_id, True))
        nodes.append((messages, vhost, work))
    try:
        messages, vhost, _ = nodes[0]
        message = Message("", "wait", PERSISTENT, b"retry me", True)
        _, _, batch = vhost.publish(vhost.default_exchange, message)
        done = asyncio.Event()
        messages.journal.wait_durable(batch, done.set)
        await asyncio.wait_for(done.wait(), 10)
        _, _, work_b = nodes[1]
        sink = Sink()
        work_b.add_consumer(Consumer("c", work_b, sink, prefetch=10))
        await wait_for(lambda: len(sink.got) == 1, 10)
        entry = sink.got[0][1]
        assert entry.message.body == b"retry me"
        assert entry.message.headers["x-death"][0]["queue"] == "wait"
        await wait_for(
            lambda: (
                fixtures.scalar(
                    pg_url, "SELECT count(*) FROM roost_messages WHERE queue_id = %s", wait_id
                )
                == 0
            ),
            5,
        )
    finally:
        for messages, _, _ in nodes:
            await messages.close()


async def test_a_node_shutting_down_gives_back_what_it_holds(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, url = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(100)))
    _, sink = a.consume(prefetch=5)
    await wait_for(lambda: len(sink.got) == 5)
    await a.messages.close()  # 5 delivered unacked, more claimed ahead
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages WHERE owner IS NOT NULL") == 0
    delivered = {e.message.body for _, e in sink.got}
    _, there = b.consume(prefetch=200)
    await wait_for(lambda: len(there.got) == 100)
    assert {e.message.body for _, e in there.got if e.redelivered} == delivered
    # (The fixture closes a again: closing twice is harmless.)


async def test_basic_get_on_a_node_without_consumers(two_nodes: tuple[Node, Node, str]) -> None:
    a, b, url = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(3)))
    backing = b.queue.backing
    assert isinstance(backing, PgBackingQueue)
    # What a channel's basic.get does: fill, then the synchronous get.
    assert backing.in_memory() == 0
    assert await backing.fill(1) == 1
    entry = b.queue.get(no_ack=False)
    assert entry is not None and entry.message.body == b"0"
    b.queue.settle([entry])
    # Without fill, a get misses but starts a claim; a later get has it.
    assert b.queue.get(no_ack=True) is None
    await wait_for(lambda: backing.in_memory() == 1)
    entry = b.queue.get(no_ack=True)
    assert entry is not None and entry.message.body == b"1"
    await b.confirmed(b.messages.writer.barrier())
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 1


async def test_nothing_leaves_the_buffer_once_the_lease_lapsed(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, _, _ = two_nodes
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(20)))
    consumer, sink = a.consume(prefetch=2)
    await wait_for(lambda: len(sink.got) == 2)
    assert a.queue.backing.in_memory() > 0  # claimed ahead
    a.messages.lease.revoke()  # heartbeats stopped: maybe dead already
    a.ack(consumer, [e for _, e in sink.got])
    await asyncio.sleep(0.2)
    assert len(sink.got) == 2
    a.messages.lease.renew(time.monotonic() + 60)  # it was only slow
    a.queue.dispatch()
    await wait_for(lambda: len(sink.got) == 4)
    # Declared dead after all: the buffer is no longer its own.
    a.messages.lost()
    assert a.queue.backing.in_memory() == 0


async def test_priority_queue_across_nodes(pg_url: str) -> None:
    a_epoch, (q,) = fixtures.prepare(pg_url)
    b_epoch = fixtures.new_node(pg_url, "b")
    args: dict[str, object] = {"x-max-priority": 5}
    a = await make_node(pg_url, a_epoch, q, arguments=args)
    b = await make_node(pg_url, b_epoch, q, arguments=args)
    try:
        batches = [a.publish(b"p%d-%d" % (p, i), priority=p) for i in range(3) for p in (1, 9, 3)]
        await a.confirmed(max(batches))
        _, sink = b.consume(prefetch=100)
        await wait_for(lambda: len(sink.got) == 9)
        # Highest first (9 is capped at 5), publish order within a priority.
        assert bodies(sink) == [
            b"p9-0",
            b"p9-1",
            b"p9-2",
            b"p3-0",
            b"p3-1",
            b"p3-2",
            b"p1-0",
            b"p1-1",
            b"p1-2",
        ]
    finally:
        await a.messages.close()
        await b.messages.close()


async def test_delivery_limit_counts_deliveries_on_every_node(pg_url: str) -> None:
    a_epoch, (q,) = fixtures.prepare(pg_url)
    b_epoch = fixtures.new_node(pg_url, "b")
    args: dict[str, object] = {"x-delivery-limit": 1}
    a = await make_node(pg_url, a_epoch, q, arguments=args)
    b = await make_node(pg_url, b_epoch, q, arguments=args)
    try:
        await a.confirmed(a.publish(b"poison"))
        ca, sink_a = a.consume(prefetch=1)
        await wait_for(lambda: len(sink_a.got) == 1)
        # Rejected with requeue on a, then a shuts down (gives it back).
        ca.unacked -= 1
        a.queue.remove_consumer(ca)
        a.queue.requeue([sink_a.got[0][1]])
        await a.messages.close()
        cb, sink_b = b.consume(prefetch=1)
        await wait_for(lambda: len(sink_b.got) == 1)
        entry = sink_b.got[0][1]
        assert entry.redelivered and entry.message.headers["x-delivery-count"] == 1
        cb.unacked -= 1
        b.queue.requeue([entry])  # past the limit: dropped, not redelivered
        await b.confirmed(b.messages.writer.barrier())
        await asyncio.sleep(0.2)
        assert len(sink_b.got) == 1
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 0
    finally:
        await a.messages.close()
        await b.messages.close()


async def test_a_local_consumer_with_room_gets_a_hand_off_without_a_claim(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, _, url = two_nodes
    consumer, sink = a.consume(prefetch=10)
    await asyncio.sleep(0.1)  # its first claim found nothing
    a.publish(b"warm-up")  # reserves ids for hand-offs; claimed or handed
    await wait_for(lambda: len(sink.got) == 1)
    a.ack(consumer, [sink.got[0][1]])
    batch = max(a.publish(b"%d" % i) for i in range(5))
    await a.confirmed(batch)
    assert a.messages.writer.handed(batch) is True  # inserted claimed: no claim, no UPDATE
    await wait_for(lambda: len(sink.got) == 6)
    assert (
        fixtures.scalar(
            url,
            "SELECT count(*) FROM roost_messages WHERE owner = %s AND delivery_count = 1",
            a.messages.epoch,
        )
        == 5
    )
    assert bodies(sink)[1:] == [b"%d" % i for i in range(5)]
    a.ack(consumer, [e for _, e in sink.got[1:]])
    await a.confirmed(a.messages.writer.barrier())
    assert fixtures.scalar(url, "SELECT count(*) FROM roost_messages") == 0


async def test_publish_order_holds_through_hand_offs_and_claims(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, _, _ = two_nodes
    consumer, sink = a.consume(prefetch=7)
    acked = 0

    async def ack_all() -> None:
        nonlocal acked
        while True:
            await sink.arrived.wait()
            sink.arrived.clear()
            entries = [e for _, e in sink.got[acked:]]
            acked += len(entries)
            a.ack(consumer, entries)

    acker = asyncio.create_task(ack_all())
    try:
        for i in range(300):
            a.publish(b"%d" % i)
            if i % 13 == 0:
                await asyncio.sleep(0.002)
        await wait_for(lambda: len(sink.got) == 300, 20)
    finally:
        acker.cancel()
    assert bodies(sink) == [b"%d" % i for i in range(300)]


async def test_a_hand_off_by_a_node_already_declared_dead_stays_ready(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, url = two_nodes
    _, here = a.consume(prefetch=10)
    a.publish(b"warm-up")  # reserves hand-off ids
    await wait_for(lambda: len(here.got) == 1)
    # Declared dead; a has not heard yet (its lease still runs).
    fixtures.mark_dead(url, a.messages.epoch)
    batch = a.publish(b"late")
    await a.confirmed(batch)
    assert a.messages.writer.handed(batch) is False  # tried, fenced: inserted ready
    _, there = b.consume(prefetch=10)
    await wait_for(lambda: b"late" in bodies(there))
    assert bodies(here) == [b"warm-up"]


async def test_a_busy_consumer_gets_a_read_ahead_that_goes_back_when_it_stops(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, _, url = two_nodes
    total = 3000
    await a.confirmed(max(a.publish(b"%d" % i) for i in range(total)))
    backing = a.queue.backing
    assert isinstance(backing, PgBackingQueue)
    consumer, sink = a.consume(prefetch=200)
    # Without a read-ahead a claim asks for the consumer's credit, so the
    # buffer is empty whenever that credit is used up: each ack would wait
    # a claim round trip.
    ahead_of_credit = 0
    acked = 0
    async with asyncio.timeout(60):
        while acked < total // 2:
            await asyncio.sleep(0)
            if not backing.demand or backing.demand() == 0:
                ahead_of_credit = max(ahead_of_credit, backing.in_memory())
            if len(sink.got) - acked >= 100:  # acks 100 at a time, as clients do
                a.ack(consumer, [e for _, e in sink.got[acked : acked + 100]])
                acked += 100
    assert ahead_of_credit > 0
    # The consumer stops acking: what the node read ahead goes back, and it
    # holds only what the consumer has not acked.

    def held() -> int:
        found = fixtures.scalar(
            url, "SELECT count(*) FROM roost_messages WHERE owner = %s", a.messages.epoch
        )
        assert isinstance(found, int)
        return found

    # (Deliveries go on up to the prefetch: count what it holds then.)
    await wait_for(lambda: backing.in_memory() == 0 and held() == len(sink.got) - acked, 15)
    assert bodies(sink) == [b"%d" % i for i in range(len(sink.got))]


async def test_a_stream_of_hand_offs_runs_no_claims_here_or_elsewhere(
    two_nodes: tuple[Node, Node, str],
) -> None:
    a, b, _ = two_nodes
    consumer, sink = a.consume(prefetch=50)
    _, there = b.consume(prefetch=50)
    a.publish(b"warm-up")  # reserves ids for hand-offs; claimed or handed
    await wait_for(lambda: len(sink.got) + len(there.got) == 1)
    backing_a, backing_b = a.queue.backing, b.queue.backing
    assert isinstance(backing_a, PgBackingQueue) and isinstance(backing_b, PgBackingQueue)
    await asyncio.sleep(0.5)  # claims started by the warm-up are over
    claims = backing_a.claims, backing_b.claims
    for i in range(30):
        batch = a.publish(b"%d" % i)
        await a.confirmed(batch)
        assert a.messages.writer.handed(batch) is True
        await wait_for(lambda n=i: len(sink.got) >= n + 1 + (not there.got))  # type: ignore[misc]
        a.ack(consumer, [e for _, e in sink.got[-1:]])
    await asyncio.sleep(0.5)  # any wake-up has arrived by now
    # The rows were claimed by their insert: nothing for a claim to find,
    # here or on the other node, which hears nothing of them.
    assert (backing_a.claims, backing_b.claims) == claims
    assert bodies(sink)[-30:] == [b"%d" % i for i in range(30)]
    assert not there.got or len(there.got) == 1
