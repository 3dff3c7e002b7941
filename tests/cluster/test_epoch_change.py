"""A claim in flight when the node changes incarnation (fenced, then
registered again) must not put its rows in the new incarnation's buffer:
they were claimed for the dead epoch, which the cluster released (or will
release) to others, so delivering them would deliver them twice."""

from __future__ import annotations

import asyncio

import psycopg

from tests.cluster import fixtures
from tests.cluster.test_pg_backing import make_node, wait_for


async def test_rows_claimed_for_the_previous_epoch_stay_out_of_the_buffer(pg_url: str) -> None:
    old, (q,) = fixtures.prepare(pg_url)
    node = await make_node(pg_url, old, q)
    try:
        for i in range(5):
            node.publish(b"%d" % i)
        await node.confirmed(node.messages.writer.barrier())
        backing = node.messages.queues[q]
        # Hold the node's row: the claim's fence (FOR KEY SHARE) waits for it.
        with psycopg.connect(pg_url) as lock:
            lock.execute("SELECT 1 FROM roost_nodes WHERE epoch = %s FOR UPDATE", (old,))
            claim = asyncio.create_task(backing.fill(5))
            await asyncio.sleep(0.5)
            assert not claim.done()
            # The node registers again meanwhile (as after being fenced).
            node.messages.set_epoch(fixtures.new_node(pg_url, "a"))
        # The lock is gone: the claim commits, for the old epoch.
        await asyncio.wait_for(claim, 10)
        owned = fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages WHERE owner = %s", old)
        assert owned == 5
        assert backing.in_memory() == 0
        # What the old epoch holds comes back when it is declared dead.
        fixtures.mark_dead(pg_url, old)
        await node.messages.claimer.release_dead(old)
        _, sink = node.consume(prefetch=10)
        await wait_for(lambda: len(sink.got) == 5)
        assert all(e.redelivered for _, e in sink.got)
    finally:
        await node.messages.close()
