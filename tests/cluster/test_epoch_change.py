"""A claim in flight when the node changes incarnation (fenced, then
registered again) must not put its rows in the new incarnation's buffer:
they were claimed for the dead epoch, which the cluster released (or will
release) to others, so delivering them would deliver them twice."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from roost.broker.broker import Broker
from roost.cluster.claims import Claimer, ClaimInDoubt
from roost.cluster.nodes import NodeRegistry
from roost.cluster.runtime import ClusterNode
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


async def _nothing() -> None:
    pass


async def test_no_lease_before_the_message_layer_moved_to_the_new_epoch(pg_url: str) -> None:
    broker = Broker()
    broker.set_scheduler(asyncio.get_running_loop().call_later)
    node = ClusterNode(pg_url, "a", 3)
    await node.register(_nothing)
    await node.start_messages(broker)
    await node.load(broker)
    try:
        registry, messages = node.registry, node.messages
        assert messages is not None
        premature: list[tuple[int, int]] = []

        def check(_sent: float) -> None:
            # After every heartbeat hook, the registration's included.
            if messages.lease.valid() and messages.epoch != registry.epoch:
                premature.append((messages.epoch, registry.epoch))

        registry.on_beat.append(check)
        old = registry.epoch
        fixtures.mark_dead(pg_url, old)
        assert not await registry.beat()  # fenced, then registered anew
        assert registry.epoch != old and messages.epoch == registry.epoch
        assert messages.lease.valid()
        assert not premature, premature
    finally:
        await node.stop()


async def test_a_fencing_outlasting_the_heartbeat_timeout_is_not_cut_short(pg_url: str) -> None:
    registry = NodeRegistry(pg_url, "a", 3)
    registered: list[int] = []

    async def slow_hook() -> None:
        await asyncio.sleep(registry.interval * 2)  # closing many connections

    async def on_registered(epoch: int) -> None:
        registered.append(epoch)

    registry.on_fenced.append(slow_hook)
    registry.on_registered.append(on_registered)
    await registry.start()
    try:
        old = registry.epoch
        fixtures.mark_dead(pg_url, old)
        # As the heartbeat loop calls it.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(registry.beat(), registry.interval)
        await wait_for(lambda: bool(registered), 10)
        assert registered == [registry.epoch] and registry.epoch != old
        assert registry.is_current()
        assert await registry.beat()
    finally:
        await registry.leave()


async def test_a_claim_whose_commit_is_cut_off_is_in_doubt(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO roost_messages (queue_id, exchange, routing_key, properties, body)"
            " SELECT %s, '', 'q', '', 'x' FROM generate_series(1, 3)",
            (q,),
        )
        # The COMMIT takes a while: time enough to cut its connection.
        conn.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER slow AFTER UPDATE ON roost_messages"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )
    claimer = Claimer(pg_url, max_connections=1)
    await claimer.open()
    try:
        claim = asyncio.create_task(claimer.claim(q, 3, epoch))
        await asyncio.sleep(0.5)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'roost-claims'"
            )
        with pytest.raises(ClaimInDoubt) as doubt:
            await asyncio.wait_for(claim, 10)
        assert len(doubt.value.rows) == 3
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER slow ON roost_messages")
        await claimer.unclaim(doubt.value.rows, epoch)  # (rolled back: nothing to do)
        got = await claimer.claim(q, 3, epoch)
        assert [r.delivery_count for r in got] == [1, 1, 1]
    finally:
        await claimer.close()
