"""The delayed exchanges' held messages in PostgreSQL: claiming the due
ones, and giving back those of a dead node.

A held message is a row of :data:`HELD_TABLES` (written by the node's
:class:`~roost.cluster.message_writer.MessageWriter`, see
:mod:`roost.cluster.delay_store`) until it is due by PostgreSQL's clock.
Any node may route it then: it *claims* the row (``owner`` = its epoch,
fenced as a message claim is, ``FOR UPDATE SKIP LOCKED`` so claimers never
wait for each other), routes the message, and the writer deletes the held
row in the transaction that inserts the routed rows, which are written
only if that fenced delete happened. So a message is routed exactly once:
a node declared dead meanwhile deletes nothing and inserts nothing, and
:func:`release_held` made the row claimable again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import psycopg

from roost.cluster.claims import FENCE, READY_CHANNEL
from roost.cluster.queue_limits import COUNTS, count_update

HELD_TABLES = ("roost_delayed", "roost_transient_delayed")

# Milliseconds since the epoch by PostgreSQL's clock: the clock every due
# time is written and compared in, whatever the nodes' clocks say.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


class Due(NamedTuple):
    """A claimed held message, due: to be routed through its exchange."""

    id: int
    transient: bool
    vhost: str
    exchange: str
    routing_key: str
    properties: bytes
    body: bytes
    cc: list[str]
    due_ms: int


def _claim_from(table: str, transient: bool) -> str:
    return (
        f"UPDATE {table} h SET owner = %(epoch)s"
        f" WHERE h.id = ANY(ARRAY(SELECT id FROM {table}"
        f"  WHERE owner IS NULL AND due_ms <= {NOW_MS} AND queue_id IS NULL"
        " ORDER BY due_ms, id"
        "  LIMIT %(n)s FOR UPDATE SKIP LOCKED))"
        f" AND {FENCE}"
        f" RETURNING h.id, {'true' if transient else 'false'}, h.vhost, h.exchange,"
        " h.routing_key, h.properties, h.body, h.cc, h.due_ms"
    )


CLAIM_DUE_SQL = (
    f"WITH d AS ({_claim_from(HELD_TABLES[0], False)}),"
    f" t AS ({_claim_from(HELD_TABLES[1], True)})"
    " SELECT * FROM d UNION ALL SELECT * FROM t"
)

# Milliseconds until the next unclaimed held message is due (None: none).
NEXT_DUE_SQL = (
    "SELECT min(due_ms) - "
    + NOW_MS
    + " FROM (SELECT min(due_ms) AS due_ms FROM roost_delayed WHERE owner IS NULL"
    " UNION ALL SELECT min(due_ms) FROM roost_transient_delayed WHERE owner IS NULL) n"
)


def _retries_back(held_table: str, table: str) -> tuple[str, str]:
    return (
        f"DELETE FROM {held_table} WHERE id = ANY(ARRAY(SELECT id FROM {held_table}"
        f"  WHERE owner IS NULL AND due_ms <= {NOW_MS} AND queue_id IS NOT NULL"
        "  ORDER BY due_ms, id LIMIT %(n)s FOR UPDATE SKIP LOCKED))"
        " RETURNING queue_id, message_id, priority, exchange, routing_key, properties, body,"
        " published_at, expires_ms, delivery_count"
    ), (
        f"INSERT INTO {table} (queue_id, id, priority, exchange, routing_key, properties, body,"
        " published_at, expires_ms, delivery_count, redelivered)"
    )


def _retries_back_sql() -> str:
    parts = []
    for i, (held_table, table) in enumerate(
        zip(HELD_TABLES, ("roost_messages", "roost_transient_messages"), strict=True)
    ):
        delete, insert = _retries_back(held_table, table)
        # Ready again: a length-limited queue counts them (queue_limits).
        parts.append(
            f"d{i} AS ({delete}), i{i} AS ({insert} SELECT queue_id, message_id, priority,"
            " exchange, routing_key, properties, body, published_at, expires_ms,"
            f" delivery_count, true FROM d{i} RETURNING queue_id, octet_length(body) AS size),"
            f" k{i} AS ({count_update(COUNTS[table], f'i{i}', '+', 'size')})"
        )
    return (
        "WITH "
        + ", ".join(parts)
        + ", q AS (SELECT queue_id FROM i0 UNION ALL SELECT queue_id FROM i1)"
        " SELECT count(*), CASE WHEN count(DISTINCT queue_id) > 500 THEN ''"
        " ELSE coalesce(string_agg(DISTINCT queue_id::text, ','), '') END FROM q"
    )


# Messages whose retry delay is over go back to their queue as the row
# they were (its id: its place in the queue), redelivered, in one
# statement: exactly once, whoever runs it.
RETRIES_BACK_SQL = _retries_back_sql()


async def retries_back(conn: psycopg.AsyncConnection[Any], n: int) -> int:
    """Put up to ``n`` messages per table whose retry delay is over back in
    their queues, and wake those queues' consumers on every node."""
    async with conn.transaction():
        cur = await conn.execute(RETRIES_BACK_SQL, {"n": n})
        row = await cur.fetchone()
        moved, queues = (int(row[0]), row[1]) if row is not None else (0, "")
        if moved:
            await conn.execute("SELECT pg_notify(%s, %s)", (READY_CHANNEL, queues))
    return moved


async def claim_due(conn: psycopg.AsyncConnection[Any], epoch: int, n: int) -> list[Due]:
    """Claim up to ``n`` due held messages per table for ``epoch``, in due
    order (then publish order): nothing when the epoch is dead."""
    cur = await conn.execute(CLAIM_DUE_SQL, {"epoch": epoch, "n": n})
    rows = [Due(*r) for r in await cur.fetchall()]
    rows.sort(key=lambda d: (d.due_ms, d.id))
    return rows


async def next_due_in(conn: psycopg.AsyncConnection[Any]) -> int | None:
    cur = await conn.execute(NEXT_DUE_SQL)
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def unclaim(
    conn: psycopg.AsyncConnection[Any], ids: dict[bool, list[int]], epoch: int
) -> None:
    """Give back held rows this epoch claimed but could not route (the
    batch failed): claimable again, fenced."""
    for transient, table in ((False, HELD_TABLES[0]), (True, HELD_TABLES[1])):
        if ids.get(transient):
            await conn.execute(
                f"UPDATE {table} SET owner = NULL WHERE id = ANY(%(ids)s)"
                f" AND owner = %(epoch)s AND {FENCE}",
                {"ids": ids[transient], "epoch": epoch},
            )


async def release_held(conn: psycopg.AsyncConnection[Any], epochs: list[int] | None) -> int:
    """Held rows claimed by the dead ``epochs`` (None: by any dead epoch)
    are claimable again. Run it on the cleanup transaction's connection
    (``on_node_dead``), after the node row is locked FOR UPDATE, so no
    fenced statement of the epoch lands after it. Idempotent."""
    released = 0
    for table in HELD_TABLES:
        if epochs is None:
            cur = await conn.execute(
                f"UPDATE {table} SET owner = NULL WHERE owner IN"
                " (SELECT epoch FROM roost_nodes WHERE dead)"
            )
        else:
            cur = await conn.execute(
                f"UPDATE {table} SET owner = NULL WHERE owner = ANY(%s)", (epochs,)
            )
        released += cur.rowcount
    return released
