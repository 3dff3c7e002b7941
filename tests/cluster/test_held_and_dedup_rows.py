"""Held (delayed) messages and shared dedup keys, through the writer,
against a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from roost.broker.dedup import SharedKey
from roost.cluster import held
from roost.cluster.claims import Claimer
from roost.cluster.message_writer import HeldRow, MessageRow, MessageWriter
from tests.cluster import fixtures


def row(queue_id: int, i: int = 0, **kw: object) -> MessageRow:
    return MessageRow(queue_id, "ex", f"rk{i}", b"\x00\x00", b"body%d" % i, **kw)  # type: ignore[arg-type]


def add_exchange(url: str, name: str = "dx") -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO roost_exchanges (vhost, name, type, durable, auto_delete, internal)"
            " VALUES ('/', %s, 'x-delayed-message', true, false, false)",
            (name,),
        )


def held_row(i: int, delay: int = 0, transient: bool = False, **kw: object) -> HeldRow:
    return HeldRow("/", "dx", f"rk{i}", b"\x00\x00", b"held%d" % i, ["cc1"], delay, transient, **kw)  # type: ignore[arg-type]


def bodies(url: str) -> list[bytes]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT body FROM roost_messages UNION ALL"
            " SELECT body FROM roost_transient_messages ORDER BY 1"
        ).fetchall()
    return [bytes(r[0]) for r in rows]


async def test_a_key_lets_one_row_in_across_batches_and_writers(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    key = SharedKey(f"q{q}", "'m1'", None, 128, q)
    a, b = MessageWriter(pg_url), MessageWriter(pg_url)
    await a.start()
    await b.start()
    try:
        await a.submit([row(q, 1, dedup=(key,))])
        await b.submit([row(q, 2, dedup=(key,))])  # another node, later
        await a.submit([row(q, 3)])  # no key: always written
    finally:
        await a.close()
        await b.close()
    assert bodies(pg_url) == [b"body1", b"body3"]


async def test_in_one_batch_the_first_publish_takes_the_key(pg_url: str) -> None:
    _, (q1, q2) = fixtures.prepare(pg_url, queues=2)
    key = SharedKey("xexchange", "'m1'", None, 128)
    first, second = object(), object()
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        # One publish routed to two queues carries its exchange's key to
        # both; another publish with the same key in the same batch is out.
        writer.enqueue(row(q1, 1, dedup=(key,)), first)
        writer.enqueue(row(q2, 2, dedup=(key,)), first)
        writer.enqueue(row(q1, 3, dedup=(key,)), second)
        await writer.submit([])
    finally:
        await writer.close()
    assert bodies(pg_url) == [b"body1", b"body2"]


async def test_a_key_past_its_ttl_and_an_evicted_key_let_a_row_in(pg_url: str) -> None:
    _, (q,) = fixtures.prepare(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()

    def k(name: str, ttl: int | None = None) -> SharedKey:
        return SharedKey(f"q{q}", name, ttl, 2, q)

    try:
        await writer.submit([row(q, 1, dedup=(k("a", ttl=1),))])
        with psycopg.connect(pg_url) as conn:  # PostgreSQL's clock decides
            conn.execute("SELECT pg_sleep(0.05)")
        await writer.submit([row(q, 2, dedup=(k("a"),))])  # expired: new again
        await writer.submit([row(q, 3, dedup=(k("b"),))])
        await writer.submit([row(q, 4, dedup=(k("c"),))])  # size 2: "a" goes
        await writer.submit([row(q, 5, dedup=(k("a"),))])
        await writer.submit([row(q, 6, dedup=(k("c"),))])  # still there
    finally:
        await writer.close()
    assert bodies(pg_url) == [b"body1", b"body2", b"body3", b"body4", b"body5"]
    keys = fixtures.scalar(pg_url, "SELECT count(*) FROM roost_dedup_keys")
    assert keys == 2


async def test_held_rows_are_claimed_once_and_released_exactly_once(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    add_exchange(pg_url)
    other = fixtures.new_node(pg_url, "b")
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        writer.hold(held_row(1, delay=0))
        writer.hold(held_row(2, delay=0, transient=True))
        writer.hold(held_row(3, delay=3_600_000))
        await writer.submit([])
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            due = await held.claim_due(conn, epoch, 10)
            assert [d.body for d in due] == [b"held1", b"held2"]
            assert due[0].cc == ["cc1"]
            assert await held.claim_due(conn, other, 10) == []  # claimed already
            wait = await held.next_due_in(conn)
            assert wait is not None and 3_500_000 < wait <= 3_600_000
            # The first is routed: its row requires the held row's delete.
            writer.enqueue(row(q, 1, held=due[0].id))
            writer.release_held_nowait([due[0].id], epoch, False)
            await writer.submit([])
            # The node dies with the second claimed: released, claimed
            # elsewhere; the dead node's late release writes nothing.
            fixtures.mark_dead(pg_url, epoch)
            async with conn.transaction():
                assert await held.release_held(conn, [epoch]) == 1
            again = await held.claim_due(conn, other, 10)
            assert [d.body for d in again] == [b"held2"]
            writer.enqueue(row(q, 2, held=due[1].id))
            writer.release_held_nowait([due[1].id], epoch, True)
            await writer.submit([])
            writer.enqueue(row(q, 3, held=again[0].id))
            writer.release_held_nowait([again[0].id], other, True)
            await writer.submit([])
    finally:
        await writer.close()
    assert bodies(pg_url) == [b"body1", b"body3"]
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_transient_delayed") == 0
    assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_delayed") == 1


@pytest.mark.parametrize("transient", [False, True])
async def test_held_rows_go_with_their_exchange(pg_url: str, transient: bool) -> None:
    fixtures.prepare(pg_url)
    add_exchange(pg_url)
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit([]) if writer.hold(held_row(1, 1000, transient)) else None
    finally:
        await writer.close()
    table = held.HELD_TABLES[transient]
    assert fixtures.scalar(pg_url, f"SELECT count(*) FROM {table}") == 1
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM roost_exchanges WHERE name = 'dx'")
    assert fixtures.scalar(pg_url, f"SELECT count(*) FROM {table}") == 0


async def test_a_retry_waits_as_a_held_row_and_comes_back_as_itself(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    claimer = Claimer(pg_url)
    await claimer.open()
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        await writer.submit([row(q, 1), row(q, 2, transient=True), row(q, 3)])
        first, second, third = await claimer.claim(q, 3, epoch)
        writer.retry_nowait(first.id, epoch, False, 0)
        writer.retry_nowait(second.id, epoch, True, 0)
        writer.retry_nowait(third.id, epoch, False, 3_600_000)
        await writer.submit([])
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 0
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            assert await held.claim_due(conn, epoch, 10) == []  # not an exchange's
            assert await held.retries_back(conn, 10) == 2
            assert await held.retries_back(conn, 10) == 0  # once
        back = await claimer.claim(q, 10, epoch)
        assert [(r.id, r.redelivered, r.delivery_count) for r in back] == [
            (first.id, True, 2),
            (second.id, True, 2),
        ]
        # A dead epoch's retry moves nothing: the row stays with whoever
        # holds it now.
        fixtures.mark_dead(pg_url, epoch)
        writer.retry_nowait(back[0].id, epoch, False, 0)
        await writer.submit([])
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages") == 1
    finally:
        await writer.close()
        await claimer.close()


async def test_hand_off_rows_and_conditional_rows_share_a_batch(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    key = SharedKey(f"q{q}", "'k'", None, 128, q)
    writer = MessageWriter(pg_url)
    await writer.start()
    try:
        writer.reserve_id()
        await writer.submit([])
        reserved = writer.reserve_id()
        assert reserved is not None
        batch = writer.enqueue(row(q, 1, id=reserved, owner=epoch))
        writer.enqueue(row(q, 2, dedup=(key,)), "first publish")
        writer.enqueue(row(q, 3, dedup=(key,)), "second publish")
        await writer.submit([])
        assert writer.handed(batch) is True
    finally:
        await writer.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id, body, owner FROM roost_messages ORDER BY id").fetchall()
    assert rows[0] == (reserved, b"body1", epoch)
    assert [(bytes(b), o) for _, b, o in rows[1:]] == [(b"body2", None)]
