"""Definitions rows the message tests need, inserted directly (the node
registry and definitions live elsewhere)."""

from __future__ import annotations

from typing import Any

import psycopg

from roost.cluster import schema


def prepare(url: str, queues: int = 1) -> tuple[int, list[int]]:
    """Migrate, add one live node and ``queues`` queues; returns (epoch, queue ids)."""
    with psycopg.connect(url) as conn:
        schema.migrate(conn)
        epoch = add_node(conn, "a")
        conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/')")
        ids = [add_queue(conn, f"q{i}") for i in range(queues)]
        conn.commit()
    return epoch, ids


def add_node(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(
        "INSERT INTO roost_nodes (name) VALUES (%s) RETURNING epoch", (name,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_queue(conn: psycopg.Connection[Any], name: str, durable: bool = True) -> int:
    row = conn.execute(
        "INSERT INTO roost_queues (vhost, name, durable, auto_delete)"
        " VALUES ('/', %s, %s, false) RETURNING id",
        (name, durable),
    ).fetchone()
    assert row is not None
    return int(row[0])


def mark_dead(url: str, epoch: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE roost_nodes SET dead = true WHERE epoch = %s", (epoch,))


def new_node(url: str, name: str) -> int:
    with psycopg.connect(url) as conn:
        return add_node(conn, name)


def scalar(url: str, sql: str, *args: object) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql.encode(), args).fetchone()
        return row[0] if row else None
