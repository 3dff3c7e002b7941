"""Claiming ready messages for delivery, fenced by the node's epoch.

A node delivers a row only after it *claimed* it: one statement sets
``owner`` to the node's epoch on up to ``n`` ready rows at the head of a
queue (highest priority, then lowest id) and returns them. The rows are
picked with ``FOR UPDATE SKIP LOCKED``, and a row that another claimer
took meanwhile fails the re-check of ``owner IS NULL``, so claimers on
different connections and nodes never get the same row, and never wait
for each other.

Fencing. Every claim, settle and release names the epoch (incarnation) of
the node that makes it and carries :data:`FENCE`: the epoch must be alive,
read with ``FOR KEY SHARE`` on its ``roost_nodes`` row. :func:`release_dead`
locks that row ``FOR UPDATE``, which conflicts with the key-share lock, so:

- a fenced statement that got its lock first finishes (and commits) before
  the dead node's rows are released, and the release (a later statement,
  with a later snapshot) sees and releases what it claimed;
- one that comes after the node was declared dead re-reads the node row
  (READ COMMITTED re-checks a locked row's newest version) and finds it
  dead: it claims, settles and releases nothing.

So a paused node that wakes after it was declared dead can neither claim
nor settle: its acks do nothing and the rows stay with whoever claimed
them next. (Setting ``dead`` alone, as a heartbeat ``UPDATE`` does, takes
a weaker lock that does *not* wait: only :func:`release_dead` closes the
race, and it must run after, or in the same transaction as, the update
that marks the node dead.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import psycopg
from psycopg_pool import AsyncConnectionPool

from roost.cluster.queue_limits import COUNTS, count_update

TABLES = ("roost_messages", "roost_transient_messages")

# LISTEN channel of "queues with new ready rows"; the payload is their ids,
# comma-separated ("" means: look at every queue).
READY_CHANNEL = "roost_ready"


def table_of(transient: bool) -> str:
    return TABLES[1] if transient else TABLES[0]


# Alive, and stays so until this transaction ends (see the module docstring).
FENCE = "EXISTS (SELECT 1 FROM roost_nodes WHERE epoch = %(epoch)s AND NOT dead FOR KEY SHARE)"


class Claimed(NamedTuple):
    """A claimed row: held by the claiming epoch until settled or released."""

    id: int
    transient: bool
    priority: int
    exchange: str
    routing_key: str
    properties: bytes
    body: bytes
    expires_ms: int | None
    redelivered: bool
    delivery_count: int  # including this delivery
    published_ms: int
    queue_id: int


# The head of one queue, in delivery order.
_HEAD = "queue_id = %(q)s AND owner IS NULL ORDER BY priority DESC, id"
# Rows past their expiry in any of the queues, oldest expiry first.
_EXPIRED = (
    "queue_id = ANY(%(qs)s) AND owner IS NULL AND expires_ms IS NOT NULL"
    " AND expires_ms <= %(now)s ORDER BY expires_ms"
)


def _claim_from(table: str, transient: bool, pick: str) -> str:
    # ARRAY(subquery): the pick runs once, as an InitPlan (an IN (...) with
    # LIMIT may be planned as a join and re-run).
    return (
        f"UPDATE {table} m SET owner = %(epoch)s, delivery_count = m.delivery_count + 1"
        f" WHERE m.id = ANY(ARRAY(SELECT id FROM {table} WHERE {pick}"
        "  LIMIT %(n)s FOR UPDATE SKIP LOCKED))"
        f" AND {FENCE}"
        f" RETURNING m.id, {'true' if transient else 'false'}, m.priority, m.exchange,"
        " m.routing_key, m.properties, m.body, m.expires_ms, m.redelivered,"
        " m.delivery_count, (extract(epoch FROM m.published_at) * 1000)::bigint, m.queue_id"
    )


def _both_tables(pick: str) -> str:
    # Both tables in one statement: one round trip, one (tiny) transaction.
    # Claimed rows are ready no more: a limited queue's count goes down.
    return (
        f"WITH d AS ({_claim_from(TABLES[0], False, pick)}),"
        f" t AS ({_claim_from(TABLES[1], True, pick)}),"
        f" kd AS ({count_update(COUNTS[TABLES[0]], 'd', '-')}),"
        f" kt AS ({count_update(COUNTS[TABLES[1]], 't', '-')})"
        " SELECT * FROM d UNION ALL SELECT * FROM t"
    )


CLAIM_SQL = _both_tables(_HEAD)
CLAIM_EXPIRED_SQL = _both_tables(_EXPIRED)

_COUNT_READY_SQL = (
    "SELECT queue_id, count(*) FROM ("
    " SELECT queue_id FROM roost_messages WHERE queue_id = ANY(%(qs)s) AND owner IS NULL"
    " UNION ALL SELECT queue_id FROM roost_transient_messages"
    "  WHERE queue_id = ANY(%(qs)s) AND owner IS NULL) r GROUP BY queue_id"
)

# Length-limited queues keep exact counts (queue_limits): read, not counted.
_COUNTED_SQL = (
    "SELECT d.queue_id, d.ready + t.ready FROM roost_queue_counts d"
    " JOIN roost_transient_queue_counts t USING (queue_id)"
    " WHERE d.queue_id = ANY(%(qs)s::bigint[])"
)


def _order(c: Claimed) -> tuple[int, int]:
    return (-c.priority, c.id)


class ClaimInDoubt(Exception):
    """The connection broke during a claim's COMMIT: the rows (``rows``,
    returned before it) may or may not be held by the epoch now. Give
    them back (:meth:`Claimer.unclaim`) before this node claims from the
    queue again; until then they are neither delivered nor claimable."""

    def __init__(self, rows: list[Claimed], cause: BaseException) -> None:
        super().__init__(f"claim outcome unknown: {cause}")
        self.rows = rows


# Gives back rows the epoch claimed and never delivered (see ClaimInDoubt).
_UNCLAIM = (
    "UPDATE {table} SET owner = NULL, delivery_count = delivery_count - 1"
    " WHERE id = ANY(%(ids)s::bigint[]) AND owner = %(epoch)s AND " + FENCE
)


class NodeNotDead(RuntimeError):
    """release_dead() was asked to release a node that is not marked dead."""


class Claimer:
    """Claims (and counts) over a small pool of autocommit connections.

    ``synchronous_commit=False`` makes a claim's COMMIT skip the wait for
    the WAL flush: claims get much cheaper, at the price that after a
    PostgreSQL crash (not a roost node's) a message delivered in the last
    moment before it may come back as not redelivered. Off by default.
    """

    def __init__(
        self, conninfo: str, *, max_connections: int = 4, synchronous_commit: bool = True
    ) -> None:
        # A queue table grows from empty faster than autovacuum analyzes it;
        # with statistics saying "a few rows" the planner reads the whole
        # ready set by bitmap and sorts it for every claim (30 ms at 100k
        # rows, not 0.3). Claims must walk the ready index in order and stop
        # at LIMIT: these connections run nothing else, so forbid the rest.
        options = ["-c enable_bitmapscan=off", "-c enable_seqscan=off"]
        if not synchronous_commit:
            options.append("-c synchronous_commit=off")
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "application_name": "roost-claims",
            "options": " ".join(options),
        }
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo, min_size=1, max_size=max_connections, kwargs=kwargs, open=False
        )
        self.claims = 0  # claim statements run (for /metrics)
        self.claimed_rows = 0

    async def open(self) -> None:
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def claim(self, queue_id: int, n: int, epoch: int) -> list[Claimed]:
        """Claim up to ``n`` ready rows of each table (so up to ``2n``) at
        the head of the queue for ``epoch``, in delivery order. Nothing
        when the epoch is dead."""
        rows: list[Claimed] | None = None
        async with self.pool.connection() as conn:
            try:
                # An explicit transaction, so that the rows are known before
                # the COMMIT: a connection lost during an autocommit claim
                # would leave rows held by this epoch that it knows nothing
                # of, never delivered until the node leaves. Binary results:
                # bodies and properties as they are, not hex-encoded by the
                # server and decoded here.
                async with conn.transaction():
                    cur = await conn.execute(
                        CLAIM_SQL, {"q": queue_id, "n": n, "epoch": epoch}, binary=True
                    )
                    rows = [Claimed(*r) for r in await cur.fetchall()]
            except psycopg.Error as exc:
                if rows and (conn.broken or conn.closed or exc.sqlstate is None):
                    raise ClaimInDoubt(rows, exc) from exc
                raise
        self.claims += 1
        self.claimed_rows += len(rows)
        rows.sort(key=_order)
        return rows

    async def unclaim(self, rows: Iterable[Claimed], epoch: int) -> None:
        """Give back rows of a :class:`ClaimInDoubt` (those the epoch holds:
        the claim committed after all), as they were before it."""
        by_table: dict[bool, list[int]] = {False: [], True: []}
        for row in rows:
            by_table[row.transient].append(row.id)
        async with self.pool.connection() as conn:
            for transient, ids in by_table.items():
                if ids:
                    await conn.execute(
                        _UNCLAIM.format(table=table_of(transient)), {"ids": ids, "epoch": epoch}
                    )
            # Ready again: claimers anywhere may be waiting for them.
            await conn.execute("SELECT pg_notify(%s, '')", (READY_CHANNEL,))

    async def claim_expired(
        self, queue_ids: Iterable[int], n: int, epoch: int, now_ms: int
    ) -> list[Claimed]:
        """Claim up to ``n`` rows per table that expired by ``now_ms`` in any
        of the queues, so the queue can dead-letter them although no
        consumer claims them (a TTL queue without consumers)."""
        args = {"qs": list(queue_ids), "n": n, "epoch": epoch, "now": now_ms}
        async with self.pool.connection() as conn:
            cur = await conn.execute(CLAIM_EXPIRED_SQL, args, binary=True)
            rows = [Claimed(*r) for r in await cur.fetchall()]
        rows.sort(key=_order)
        return rows

    async def count_ready(self, queue_ids: Iterable[int]) -> dict[int, int]:
        """Ready (unclaimed) rows per queue, cluster-wide."""
        qs = list(queue_ids)
        async with self.pool.connection() as conn:
            cur = await conn.execute(_COUNTED_SQL, {"qs": qs})
            counted = {q: int(n) for q, n in await cur.fetchall()}
            rest = [q for q in qs if q not in counted]
            counts = {q: 0 for q in rest}
            if rest:
                cur = await conn.execute(_COUNT_READY_SQL, {"qs": rest})
                for q, n in await cur.fetchall():
                    counts[q] = n
            counts.update(counted)
        return counts

    async def release_dead(self, epoch: int | None = None) -> int:
        """Make every row held by the dead ``epoch`` (None: by any dead
        epoch) ready again, redelivered; returns how many. Run it after
        the node was marked dead (the registry's ``on_node_dead``) and at
        start-up (a release lost with a crash is done again: idempotent)."""
        async with self.pool.connection() as conn:
            return await release_dead(conn, epoch)

    async def release_own(self, epoch: int) -> int:
        """A node shutting down gives back every row it still holds
        (delivered and never acked, like a closing channel's): ready again,
        redelivered. Fenced like an ack; acks that come later find the rows
        no longer theirs and do nothing."""
        async with self.pool.connection() as conn:
            return await release_own(conn, epoch)


async def release_dead(conn: psycopg.AsyncConnection[Any], epoch: int | None = None) -> int:
    """See :meth:`Claimer.release_dead`; ``conn`` must not be in a transaction."""
    async with conn.transaction():
        # Durable whatever the connection's default: the dead flag is, and
        # nothing would release these rows again until the next start-up.
        await conn.execute("SET LOCAL synchronous_commit = on")
        # FOR UPDATE waits for every fenced statement of the epoch in flight.
        if epoch is None:
            cur = await conn.execute(
                "SELECT epoch FROM roost_nodes WHERE dead ORDER BY epoch FOR UPDATE"
            )
            epochs = [r[0] for r in await cur.fetchall()]
        else:
            cur = await conn.execute(
                "SELECT dead FROM roost_nodes WHERE epoch = %s FOR UPDATE", (epoch,)
            )
            row = await cur.fetchone()
            if row is None or not row[0]:
                raise NodeNotDead(f"node epoch {epoch} is not marked dead")
            epochs = [epoch]
        return await _release_rows(conn, epochs)


async def release_own(conn: psycopg.AsyncConnection[Any], epoch: int) -> int:
    """See :meth:`Claimer.release_own`; ``conn`` must not be in a transaction."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        return await _release_rows(conn, [epoch], fence=True)


async def _release_rows(
    conn: psycopg.AsyncConnection[Any], epochs: list[int], fence: bool = False
) -> int:
    """Every row the epochs hold: ready again, redelivered; their queues
    are notified. Returns how many."""
    released = 0
    if not epochs:
        return 0  # (no dead epoch at all: a first start)
    for table in TABLES:
        cur = await conn.execute(
            f"WITH r AS (UPDATE {table} SET owner = NULL, redelivered = true"
            f" WHERE owner = ANY(%(epochs)s){' AND ' + FENCE if fence else ''}"
            " RETURNING queue_id, octet_length(body) AS size),"
            f" k AS ({count_update(COUNTS[table], 'r', '+', 'size')})"
            " SELECT count(*), CASE WHEN count(DISTINCT queue_id) > 500 THEN ''"
            " ELSE coalesce(string_agg(DISTINCT queue_id::text, ','), '') END FROM r",
            {"epochs": epochs, "epoch": epochs[0]},
        )
        row = await cur.fetchone()
        assert row is not None
        if row[0]:
            released += row[0]
            await conn.execute("SELECT pg_notify(%s, %s)", (READY_CHANNEL, row[1]))
    return released
