"""The group-commit writer against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import psycopg
import pytest

from roost.cluster.claims import Claimer
from roost.cluster.devdb import ThrowawayPostgres
from roost.cluster.message_writer import (
    CommitOutcomeUnknown,
    MessageRow,
    MessageWriter,
    WriteFailed,
)
from tests.cluster import fixtures


def row(queue_id: int, i: int = 0, **kw: object) -> MessageRow:
    return MessageRow(queue_id, "ex", f"rk{i}", b"\x00\x00", b"body%d" % i, **kw)  # type: ignore[arg-type]


def xid(url: str) -> int:
    """The next transaction id: how many write transactions ran meanwhile."""
    value = fixtures.scalar(url, "SELECT pg_current_xact_id()::text::bigint")
    assert isinstance(value, int)
    return value


async def test_rows_are_written_to_their_table(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit(
            [
                row(q, 1, priority=3, expires_ms=1234),
                row(q, 2, transient=True),
            ]
        )
    finally:
        await writer.close()
    with psycopg.connect(pg_url) as conn:
        durable = conn.execute(
            "SELECT queue_id, priority, exchange, routing_key, properties, body, expires_ms,"
            " owner, redelivered FROM roost_messages"
        ).fetchall()
        transient = conn.execute("SELECT routing_key FROM roost_transient_messages").fetchall()
    assert durable == [(q, 3, "ex", "rk1", b"\x00\x00", b"body1", 1234, None, False)]
    assert transient == [("rk2",)]


async def test_many_concurrent_submitters_share_few_transactions(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()
    submitters, each = 50, 20

    async def submitter(s: int) -> None:
        for i in range(each):
            await writer.submit([row(q, s * each + i)])

    try:
        await writer.submit([row(q, -1)])  # connected, so the first batch is not special
        before_xid, before = xid(pg_url), writer.transactions
        await asyncio.gather(*(submitter(s) for s in range(submitters)))
        transactions = writer.transactions - before
        xids = xid(pg_url) - before_xid
    finally:
        await writer.close()
    total = submitters * each
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == total + 1
    # Every submitter waits for its commit before the next submit, so a
    # batch holds about one row per submitter: ~each transactions, never
    # one per row. PostgreSQL agrees (one xid per write transaction, plus
    # the xid() probe itself).
    assert transactions <= 3 * each, transactions
    assert xids <= transactions + 1, (xids, transactions)


async def test_barrier_and_wait_durable_gate_like_the_journal(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        batch = writer.barrier()
        writer.enqueue(row(q))
        assert writer.durable_batch < batch
        done = asyncio.Event()
        writer.wait_durable(batch, done.set)
        await asyncio.wait_for(done.wait(), 10)
        assert writer.durable_batch >= batch
        assert writer.failure(batch) is None
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 1
        # A barrier with nothing written behind it resolves without a transaction.
        before = writer.transactions
        empty = asyncio.Event()
        writer.wait_durable(writer.barrier(), empty.set)
        await asyncio.wait_for(empty.wait(), 10)
        assert writer.transactions == before
    finally:
        await writer.close()


async def test_a_refused_batch_fails_and_the_next_one_commits(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.routing_key = 'bad' THEN RAISE EXCEPTION 'refused'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON roost_messages"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        batch = writer.barrier()
        bad = writer.submit([row(q), MessageRow(q, "", "bad", b"", b"")])
        with pytest.raises(WriteFailed, match="refused") as info:
            await bad
        assert not isinstance(info.value, CommitOutcomeUnknown)
        assert writer.durable_batch >= batch
        assert isinstance(writer.failure(batch), WriteFailed)
        await writer.submit([row(q, 2)])
    finally:
        await writer.close()
    assert fixtures.scalar(pg_url, "SELECT array_agg(routing_key) FROM roost_messages") == ["rk2"]


async def test_rows_of_a_queue_deleted_meanwhile_are_dropped_not_the_batch(pg_url: str) -> None:
    _, (q, gone) = fixtures.prepare(pg_url, queues=2)
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM roost_queues WHERE id = %s", (gone,))
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit([row(q, 1), row(gone, 2), row(q, 3, transient=True)])
    finally:
        await writer.close()
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 1
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_transient_messages") == 1


async def test_server_killed_during_commit_never_confirms(
    pg_url: str, postgres_server: ThrowawayPostgres
) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    # A deferred constraint trigger runs inside COMMIT: it holds the COMMIT
    # open long enough to kill the server in the middle of it.
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.routing_key = 'slow' THEN PERFORM pg_sleep(30); END IF;"
            " RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON roost_messages"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit([row(q, 1)])
        claimed = fixtures.scalar(
            pg_url, "UPDATE roost_messages SET owner = %s RETURNING id", epoch
        )
        assert isinstance(claimed, int)
        # An ack in the doomed batch: it must not be lost with it.
        writer.settle_nowait([claimed], epoch)
        fut = writer.submit([MessageRow(q, "", "slow", b"", b"")])
        deadline = time.monotonic() + 10
        while not fixtures.scalar(
            postgres_server.url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
        ):
            assert time.monotonic() < deadline, "COMMIT never reached the trigger"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(postgres_server.stop_immediate)
        with pytest.raises(CommitOutcomeUnknown):
            await asyncio.wait_for(fut, 10)
        await asyncio.to_thread(postgres_server.start)
        with psycopg.connect(pg_url) as conn:
            conn.execute("DROP TRIGGER slow_commit ON roost_messages")
        # The writer reconnects and goes on.
        await writer.submit([row(q, 3)])
    finally:
        await writer.close()
    keys = fixtures.scalar(pg_url, "SELECT array_agg(routing_key ORDER BY id) FROM roost_messages")
    assert keys == ["rk3"]  # no "slow"; the ack of "rk1" was carried over


async def test_settle_and_release_are_fenced_by_the_epoch(pg_url: str) -> None:
    a, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    claimer = Claimer(pg_url)
    await writer.start()
    await claimer.open()
    try:
        await writer.submit([row(q, i) for i in range(6)])
        claimed = [c.id for c in await claimer.claim(q, 6, a)]
        assert len(claimed) == 6
        await writer.settle(claimed[:1], a)
        await writer.release(claimed[1:2], a)
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 5
        assert fixtures.scalar(
            pg_url,
            "SELECT redelivered AND owner IS NULL FROM roost_messages WHERE id = %s",
            claimed[1],
        )
        # Node a is declared dead (say, paused past its timeout).
        fixtures.mark_dead(pg_url, a)
        await writer.settle(claimed[2:3], a)  # fenced: does nothing
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 5
        released = await claimer.release_dead(a)
        assert released == 4
        b = fixtures.new_node(pg_url, "b")
        again = await claimer.claim(q, 10, b)
        assert sorted(c.id for c in again) == sorted(claimed[1:])
        assert all(c.redelivered and c.delivery_count == 2 for c in again)
        # a wakes up and acks what b now holds: nothing happens.
        await writer.settle(claimed[1:], a)
        await writer.release(claimed[1:], a)
        assert (
            fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages WHERE owner = %s", b) == 5
        )
        await writer.settle(claimed[1:], b)
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 0
    finally:
        await claimer.close()
        await writer.close()


async def test_unclaim_restores_the_row_as_it_was(pg_url: str) -> None:
    a, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    claimer = Claimer(pg_url)
    await writer.start()
    await claimer.open()
    try:
        await writer.submit([row(q, 0, transient=True)])
        (c,) = await claimer.claim(q, 1, a)
        assert c.transient and c.delivery_count == 1
        await writer.unclaim([c.id], a, transient=True)
        (again,) = await claimer.claim(q, 1, a)
        assert again.id == c.id and again.delivery_count == 1 and not again.redelivered
    finally:
        await claimer.close()
        await writer.close()


async def test_purge_deletes_ready_rows_only(pg_url: str) -> None:
    a, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    claimer = Claimer(pg_url)
    await writer.start()
    await claimer.open()
    try:
        await writer.submit([row(q, i, transient=i % 2 == 0) for i in range(10)])
        claimed = await claimer.claim(q, 1, a)
        assert await writer.purge(q) == 10 - len(claimed)
        assert await claimer.count_ready([q]) == {q: 0}
    finally:
        await claimer.close()
        await writer.close()


async def test_commit_notifies_the_queues(pg_url: str) -> None:
    _, (q, r) = fixtures.prepare(pg_url, queues=2)
    listener = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    await listener.execute("LISTEN roost_ready")
    committed: list[set[int]] = []
    writer = MessageWriter(pg_url, on_committed=committed.append)
    await writer.start()
    try:
        await writer.submit([row(q), row(r), row(q)])
        note = await asyncio.wait_for(anext(listener.notifies()), 10)
        assert {int(s) for s in note.payload.split(",")} == {q, r}
        assert committed == [{q, r}]
    finally:
        await writer.close()
        await listener.close()


async def test_several_writer_connections_resolve_in_a_durable_prefix(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url, connections=3, max_batch_rows=7)
    await writer.start()
    resolved: list[tuple[int, int]] = []  # (batch, durable_batch when called back)

    def record(batch: int) -> None:
        resolved.append((batch, writer.durable_batch))

    try:
        for i in range(300):
            batch = writer.enqueue(row(q, i))
            if i % 10 == 9:
                writer.wait_durable(batch, functools.partial(record, batch))
                await asyncio.sleep(0)
        await writer.submit([])
        await wait_until(lambda: len(resolved) == 30)
    finally:
        await writer.close()
    assert all(durable >= batch for batch, durable in resolved)
    assert writer.transactions > 1
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 300


async def wait_until(cond: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_an_idle_connection_lost_to_a_restart_fails_nothing(
    pg_url: str, postgres_server: ThrowawayPostgres
) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit([row(q, 1)])
        await asyncio.to_thread(postgres_server.stop_immediate)
        await asyncio.to_thread(postgres_server.start)
        await writer.submit([row(q, 2)])  # on a new connection, not "unknown"
    finally:
        await writer.close()
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 2


@pytest.mark.parametrize("sql", ["_SETTLE", "_RELEASE", "_UNCLAIM"])
def test_acks_and_requeues_find_their_rows_by_primary_key(pg_url: str, sql: str) -> None:
    # The owner index also holds every row the epoch settled since the
    # last vacuum: a plan through it walks them all, on every ack.
    from roost.cluster import message_writer
    from roost.cluster.claims import FENCE, READY_CHANNEL

    epoch, (q,) = fixtures.prepare(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO roost_messages (queue_id, exchange, routing_key, properties, body, owner)"
            " SELECT %s, '', 'k', '', 'b', CASE WHEN i <= 1400 THEN %s END"
            " FROM generate_series(1, 20000) i",
            (q, epoch),
        )
        conn.execute("ANALYZE roost_messages")
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM roost_messages WHERE owner = %s LIMIT 200", (epoch,)
            )
        ]
        query = getattr(message_writer, sql).format(
            table="roost_messages", fence=FENCE, counts="roost_queue_counts"
        )
        args = {"ids": ids, "epoch": epoch, "channel": READY_CHANNEL}
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}", args))
    assert "roost_messages_pkey" in plan
    assert "roost_messages_owned" not in plan
