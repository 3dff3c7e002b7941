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

from roost.cluster.claims import FENCE

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
        f"  WHERE owner IS NULL AND due_ms <= {NOW_MS} ORDER BY due_ms, id"
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
