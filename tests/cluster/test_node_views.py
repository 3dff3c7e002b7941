"""What goes with a node's incarnation (its published view, its
non-durable queues) and the orphan sweep, against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

from roost.cluster.node_views import NodeViews, forget_incarnation
from roost.cluster.nodes import NodeRegistry
from tests.cluster import fixtures


def _queue(conn: psycopg.Connection[Any], name: str, durable: bool, home: int | None) -> None:
    conn.execute(
        "INSERT INTO roost_queues (vhost, name, durable, auto_delete, home_epoch)"
        " VALUES ('/', %s, %s, false, %s)",
        (name, durable, home),
    )


def _queues(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {str(r[0]) for r in conn.execute("SELECT name FROM roost_queues").fetchall()}


async def test_a_dead_incarnation_takes_its_view_and_non_durable_queues(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    b = NodeRegistry(pg_url, "b", 3)
    a.on_node_dead.append(forget_incarnation)
    await a.start()
    await b.start()
    try:
        with psycopg.connect(pg_url) as conn:
            conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/') ON CONFLICT DO NOTHING")
            _queue(conn, "b-transient", False, b.epoch)
            _queue(conn, "b-durable", True, None)
            _queue(conn, "a-transient", False, a.epoch)
            conn.execute(
                "INSERT INTO roost_node_views (epoch) VALUES (%s), (%s)", (a.epoch, b.epoch)
            )
            conn.commit()
        fixtures.mark_dead(pg_url, b.epoch)
        assert await a.clean_dead() == [b.epoch]
        assert _queues(pg_url) == {"b-durable", "a-transient"}
        assert fixtures.scalar(pg_url, "SELECT array_agg(epoch) FROM roost_node_views") == [a.epoch]
    finally:
        await a.leave()


async def test_orphaned_non_durable_queues_are_swept(pg_url: str) -> None:
    a = NodeRegistry(pg_url, "a", 3)
    await a.start()
    try:
        gone = fixtures.new_node(pg_url, "gone")
        uncleaned = fixtures.new_node(pg_url, "uncleaned")
        with psycopg.connect(pg_url) as conn:
            conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/') ON CONFLICT DO NOTHING")
            # Written by "gone" after its cleanup, before it noticed it was dead.
            conn.execute(
                "UPDATE roost_nodes SET dead = true, cleaned_at = now() WHERE epoch = %s", (gone,)
            )
            conn.execute("UPDATE roost_nodes SET dead = true WHERE epoch = %s", (uncleaned,))
            _queue(conn, "orphan", False, gone)
            _queue(conn, "pruned-home", False, 999_999)
            _queue(conn, "awaiting-cleanup", False, uncleaned)  # its cleanup will do it
            _queue(conn, "live-home", False, a.epoch)
            _queue(conn, "durable", True, None)
            conn.commit()
        views = NodeViews(a, collect=dict, close_local=lambda name, reason: None)
        assert await views.drop_orphans() == 2
        assert _queues(pg_url) == {"awaiting-cleanup", "live-home", "durable"}
    finally:
        await a.leave()
