"""The node registry against a real PostgreSQL: registration, heartbeats
with fencing, dead-node sweeps and their cleanup."""

from __future__ import annotations

import time

import psycopg

from roost.cluster.nodes import AsyncConn, NodeRegistry


def _age(pg_url: str, epoch: int, seconds: int) -> None:
    """Make a node look silent for ``seconds`` (as if it were paused)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE roost_nodes SET heartbeat_at = now() - make_interval(secs => %s)"
            " WHERE epoch = %s",
            (seconds, epoch),
        )


async def test_nodes_register_with_their_own_epochs(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3, amqp_address="h:1")
    b = NodeRegistry(pg_url, "b", 3)
    await a.start()
    await b.start()
    try:
        assert a.epoch and b.epoch and a.epoch != b.epoch
        assert a.is_current() and b.is_current()
        assert [(n.name, n.epoch, n.amqp_address) for n in await b.live_nodes()] == [
            ("a", a.epoch, "h:1"),
            ("b", b.epoch, ""),
        ]
    finally:
        await a.leave()
        await b.leave()


async def test_heartbeats_report_when_they_were_sent(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    sent: list[float] = []
    a.on_beat.append(sent.append)
    before = time.monotonic()
    await a.start()
    try:
        assert await a.beat()
        assert len(sent) == 2 and before <= sent[0] <= sent[1] <= time.monotonic()
    finally:
        await a.leave()


async def test_a_silent_node_is_declared_dead_and_cleaned_up_once(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    b = NodeRegistry(pg_url, "b", 3)
    cleaned: list[tuple[str, int, object]] = []

    async def release(who: str, epoch: int, conn: AsyncConn) -> None:
        # Runs inside the cleanup transaction, before the exclusive queues go.
        cur = await conn.execute(
            "SELECT count(*) FROM roost_queues WHERE owner_epoch = %s", (epoch,)
        )
        row = await cur.fetchone()
        cleaned.append((who, epoch, row[0] if row else None))

    a.on_node_dead.append(lambda e, c: release("a", e, c))
    await a.start()
    await b.start()
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/')")
            conn.execute(
                "INSERT INTO roost_queues (vhost, name, durable, auto_delete, owner_epoch,"
                " owner_connection) VALUES ('/', 'mine', false, false, %s, 'c1')",
                (b.epoch,),
            )
        assert await a.sweep() == []  # b is fresh
        _age(pg_url, b.epoch, 10)
        assert await a.sweep() == [b.epoch]
        assert cleaned == [("a", b.epoch, 1)]
        assert await a.sweep() == []
        assert cleaned == [("a", b.epoch, 1)]  # once only
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM roost_queues").fetchone() == (0,)
            row = conn.execute(
                "SELECT dead, cleaned_at IS NOT NULL FROM roost_nodes WHERE epoch = %s", (b.epoch,)
            ).fetchone()
            assert row == (True, True)
        assert [n.name for n in await a.live_nodes()] == ["a"]
    finally:
        await a.leave()
        await b.leave()


async def test_a_node_declared_dead_is_fenced_and_registers_again(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    b = NodeRegistry(pg_url, "b", 3)
    events: list[str] = []

    async def fenced() -> None:
        # Before the new registration: the old epoch is no longer current.
        events.append(f"fenced current={b.is_current()}")

    async def registered(epoch: int) -> None:
        events.append(f"registered {epoch}")

    b.on_fenced.append(fenced)
    b.on_registered.append(registered)
    await a.start()
    await b.start()
    try:
        old = b.epoch
        assert await b.beat()
        _age(pg_url, old, 10)
        await a.sweep()
        assert not await b.beat()
        assert b.epoch > old and b.is_current()
        assert events == ["fenced current=False", f"registered {b.epoch}"]
        # A statement fenced on the old epoch changes nothing any more.
        with psycopg.connect(pg_url) as conn:
            sql = "SELECT " + NodeRegistry.fence_sql()
            assert conn.execute(sql, (old,)).fetchone() == (False,)
            assert conn.execute(sql, (b.epoch,)).fetchone() == (True,)
        assert await b.beat()
    finally:
        await a.leave()
        await b.leave()


async def test_leaving_declares_the_node_dead_at_once(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    await a.start()
    epoch = a.epoch
    await a.leave()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT dead, cleaned_at IS NOT NULL FROM roost_nodes WHERE epoch = %s", (epoch,)
        ).fetchone()
    assert row == (True, True)


async def test_a_restarted_node_takes_over_from_its_earlier_incarnation(pg_url: str) -> None:
    crashed = NodeRegistry(pg_url, "a", 3)
    await crashed.start()
    # It dies without leaving (no heartbeats from now on).
    assert crashed._task is not None
    crashed._task.cancel()
    restarted = NodeRegistry(pg_url, "a", 3)
    await restarted.start()
    try:
        assert [(n.name, n.epoch) for n in await restarted.live_nodes()] == [("a", restarted.epoch)]
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT dead, cleaned_at IS NOT NULL FROM roost_nodes WHERE epoch = %s",
                (crashed.epoch,),
            ).fetchone()
        assert row == (True, True)
    finally:
        await restarted.leave()
        await crashed.leave()


async def test_after_losing_the_database_a_node_gives_others_time_to_beat(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    await a.start()
    try:
        assert a.judging
        # As if PostgreSQL had been out of reach for 10 s: the other nodes'
        # heartbeats are as stale as this one's.
        a._last_beat -= 10
        assert await a.beat()
        assert not a.judging
    finally:
        await a.leave()


async def test_old_dead_incarnations_are_pruned(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    gone = NodeRegistry(pg_url, "gone", 3)
    await a.start()
    await gone.start()
    await gone.leave()
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE roost_nodes SET cleaned_at = now() - interval '2 hours' WHERE epoch = %s",
                (gone.epoch,),
            )
        await a.sweep()
        with psycopg.connect(pg_url) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM roost_nodes")]
        assert names == ["a"]
    finally:
        await a.leave()
