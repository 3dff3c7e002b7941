"""Claims: delivery order, disjointness under competition, fencing."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest

from roost.cluster.claims import CLAIM_SQL, Claimer, NodeNotDead
from roost.cluster.message_writer import MessageRow, MessageWriter
from tests.cluster import fixtures


async def fill(url: str, rows: list[MessageRow]) -> None:
    writer = MessageWriter(url)
    await writer.start()
    try:
        await writer.submit(rows)
    finally:
        await writer.close()


def msg(q: int, i: int, priority: int = 0, transient: bool = False) -> MessageRow:
    return MessageRow(q, "", str(i), b"", b"%d" % i, priority, None, transient)


async def test_claims_come_in_priority_then_publish_order_across_both_tables(
    pg_url: str,
) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    await fill(
        pg_url,
        [msg(q, i, priority=i % 3, transient=i % 2 == 1) for i in range(12)],
    )
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        got = await claimer.claim(q, 100, epoch)
    finally:
        await claimer.close()
    keys = [(c.priority, int(c.routing_key)) for c in got]
    assert keys == sorted(keys, key=lambda k: (-k[0], k[1]))
    assert len(got) == 12
    assert {c.transient for c in got} == {True, False}
    assert all(c.delivery_count == 1 and not c.redelivered for c in got)


async def test_competing_claimers_never_share_a_row(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    other = fixtures.new_node(pg_url, "b")
    total = 3000
    await fill(pg_url, [msg(q, i, transient=i % 5 == 0) for i in range(total)])
    claimers = [Claimer(pg_url, max_connections=2) for _ in range(6)]
    for c in claimers:
        await c.open()
    seen: list[int] = []

    async def drain(claimer: Claimer, seed: int) -> None:
        rnd = random.Random(seed)
        node = epoch if seed % 2 else other
        while True:
            got = await claimer.claim(q, rnd.randint(1, 40), node)
            if not got:
                return
            seen.extend(c.id for c in got)

    try:
        await asyncio.gather(*(drain(c, i) for i, c in enumerate(claimers * 2)))
    finally:
        for c in claimers:
            await c.close()
    assert len(seen) == total
    assert len(set(seen)) == total


async def test_a_dead_epoch_claims_nothing(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    await fill(pg_url, [msg(q, 1)])
    fixtures.mark_dead(pg_url, epoch)
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        assert await claimer.claim(q, 10, epoch) == []
        assert await claimer.count_ready([q]) == {q: 1}
        with pytest.raises(NodeNotDead):
            await claimer.release_dead(fixtures.new_node(pg_url, "b"))
    finally:
        await claimer.close()


async def test_release_dead_waits_for_a_claim_in_flight_and_releases_it(pg_url: str) -> None:
    """A node paused in the middle of a claim: its node row is key-share
    locked; declaring it dead and releasing waits for that claim, then
    releases what it took. No row stays with the dead epoch."""
    epoch, (q,) = fixtures.prepare(pg_url)
    await fill(pg_url, [msg(q, i) for i in range(5)])
    paused = await psycopg.AsyncConnection.connect(pg_url)
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        await paused.execute("BEGIN")
        cur = await paused.execute(CLAIM_SQL, {"q": q, "n": 3, "epoch": epoch})
        assert len(await cur.fetchall()) == 3
        fixtures.mark_dead(pg_url, epoch)  # the registry's verdict commits
        release = asyncio.create_task(claimer.release_dead(epoch))
        await asyncio.sleep(0.5)
        assert not release.done()  # waits for the claim in flight
        await paused.commit()
        assert await asyncio.wait_for(release, 10) == 3
        assert await claimer.count_ready([q]) == {q: 5}
        assert fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages WHERE redelivered") == 3
        # And once dead, the same connection claims nothing.
        cur = await paused.execute(CLAIM_SQL, {"q": q, "n": 3, "epoch": epoch})
        assert await cur.fetchall() == []
    finally:
        await paused.close()
        await claimer.close()


async def test_release_dead_without_epoch_sweeps_every_dead_node(pg_url: str) -> None:
    a, (q,) = fixtures.prepare(pg_url)
    b = fixtures.new_node(pg_url, "b")
    await fill(pg_url, [msg(q, i, transient=i == 0) for i in range(4)])
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        # n per table: a takes the one transient row and a durable one.
        held = len(await claimer.claim(q, 1, a)) + len(await claimer.claim(q, 1, b))
        assert held == 3
        fixtures.mark_dead(pg_url, a)
        fixtures.mark_dead(pg_url, b)
        assert await claimer.release_dead() == 3
        assert await claimer.release_dead() == 0
    finally:
        await claimer.close()


async def test_a_claim_walks_the_ready_index_and_stops_at_its_limit(pg_url: str) -> None:
    """Never analyzed, the table looks tiny to the planner; a claim must
    still not read (and sort) the whole ready set."""
    epoch, (q,) = fixtures.prepare(pg_url)
    await fill(pg_url, [msg(q, i) for i in range(5000)])
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        async with claimer.pool.connection() as conn:
            await conn.execute("BEGIN")
            cur = await conn.execute(
                b"EXPLAIN (ANALYZE, FORMAT TEXT) " + CLAIM_SQL.encode(),
                {"q": q, "n": 10, "epoch": epoch},
            )
            plan = "\n".join(r[0] for r in await cur.fetchall())
            await conn.execute("ROLLBACK")
    finally:
        await claimer.close()
    assert "Index Scan using roost_messages_ready" in plan, plan
    assert "Sort" not in plan and "Bitmap" not in plan, plan


async def test_claim_expired_takes_only_expired_rows_of_the_given_queues(pg_url: str) -> None:
    epoch, (q, r, other) = fixtures.prepare(pg_url, queues=3)
    rows = [
        MessageRow(q, "", "old", b"", b"", 0, 1000),
        MessageRow(q, "", "fresh", b"", b"", 0, 9000),
        MessageRow(q, "", "forever", b"", b""),
        MessageRow(r, "", "old-transient", b"", b"", 0, 2000, True),
        MessageRow(other, "", "not-asked", b"", b"", 0, 1000),
    ]
    await fill(pg_url, rows)
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        got = await claimer.claim_expired([q, r], 10, epoch, now_ms=5000)
    finally:
        await claimer.close()
    assert sorted((c.routing_key, c.queue_id) for c in got) == [("old", q), ("old-transient", r)]
