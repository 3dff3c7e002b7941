"""Reading and writing the definitions tables.

:func:`write` turns the difference between two snapshots (:mod:`rows`)
into statements, inside the caller's transaction: deletions first, last
table first (a deleted queue or exchange takes the bindings to and from it
along, whoever declared them), then insertions and updates, first table
first. Every statement is idempotent (upserts, deletes of what may already
be gone), so two nodes writing the same change do not fail each other.
"""

from __future__ import annotations

from typing import Any

from roost.cluster import changes
from roost.cluster.nodes import AsyncConn
from roost.cluster.rows import TABLES, Key, Row, Rows

_DELETE = {
    "vhost": ["DELETE FROM roost_vhosts WHERE name = %s"],
    "user": ["DELETE FROM roost_users WHERE name = %s"],
    "permission": ["DELETE FROM roost_permissions WHERE username = %s AND vhost = %s"],
    "exchange": [
        "DELETE FROM roost_exchanges WHERE vhost = %s AND name = %s",
        "DELETE FROM roost_bindings WHERE vhost = %(0)s AND (source = %(1)s"
        " OR (destination_type = 'exchange' AND destination = %(1)s))",
    ],
    "queue": [
        "DELETE FROM roost_queues WHERE vhost = %s AND name = %s",
        "DELETE FROM roost_bindings WHERE vhost = %s AND destination_type = 'queue'"
        " AND destination = %s",
    ],
    "binding": [
        "DELETE FROM roost_bindings WHERE vhost = %s AND source = %s AND destination_type = %s"
        " AND destination = %s AND routing_key = %s AND arguments = %s"
    ],
}

_UPSERT = {
    "vhost": "INSERT INTO roost_vhosts (name) VALUES (%s) ON CONFLICT DO NOTHING",
    "user": "INSERT INTO roost_users (name, password_hash, hashing_algorithm, tags)"
    " VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET"
    " password_hash = EXCLUDED.password_hash, hashing_algorithm = EXCLUDED.hashing_algorithm,"
    " tags = EXCLUDED.tags",
    "permission": "INSERT INTO roost_permissions (username, vhost, configure, write, read)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (username, vhost) DO UPDATE SET"
    " configure = EXCLUDED.configure, write = EXCLUDED.write, read = EXCLUDED.read",
    "exchange": "INSERT INTO roost_exchanges"
    " (vhost, name, type, durable, auto_delete, internal, arguments)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (vhost, name) DO UPDATE SET"
    " type = EXCLUDED.type, durable = EXCLUDED.durable, auto_delete = EXCLUDED.auto_delete,"
    " internal = EXCLUDED.internal, arguments = EXCLUDED.arguments",
    # The id is kept on update: it is the key of the queue's messages.
    # A non-durable queue's home is the incarnation that first wrote it
    # (the last parameter); it goes with that incarnation.
    "queue": "INSERT INTO roost_queues"
    " (vhost, name, durable, auto_delete, arguments, owner_epoch, owner_connection, home_epoch)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, CASE WHEN %s::boolean THEN NULL ELSE %s::bigint END)"
    " ON CONFLICT (vhost, name) DO UPDATE SET"
    " durable = EXCLUDED.durable, auto_delete = EXCLUDED.auto_delete,"
    " arguments = EXCLUDED.arguments, owner_epoch = EXCLUDED.owner_epoch,"
    " owner_connection = EXCLUDED.owner_connection,"
    " home_epoch = CASE WHEN EXCLUDED.durable THEN NULL"
    " ELSE coalesce(roost_queues.home_epoch, EXCLUDED.home_epoch) END RETURNING id",
    # Only while both ends exist: another node may have deleted one since
    # this node's model last heard (writes are serialised by the
    # roost_cluster row lock, so the check sees every earlier write). The
    # amq.* exchanges every vhost has are not rows.
    "binding": "INSERT INTO roost_bindings"
    " (vhost, source, destination_type, destination, routing_key, arguments)"
    " SELECT %(0)s, %(1)s, %(2)s, %(3)s, %(4)s, %(5)s"
    " WHERE (%(1)s LIKE 'amq.%%'"
    " OR EXISTS (SELECT 1 FROM roost_exchanges WHERE vhost = %(0)s AND name = %(1)s))"
    " AND CASE WHEN %(2)s = 'queue'"
    " THEN EXISTS (SELECT 1 FROM roost_queues WHERE vhost = %(0)s AND name = %(3)s)"
    " ELSE %(3)s LIKE 'amq.%%'"
    " OR EXISTS (SELECT 1 FROM roost_exchanges WHERE vhost = %(0)s AND name = %(3)s) END"
    " ON CONFLICT DO NOTHING",
}


def _params(key: Key, row: Row) -> list[Any]:
    values = [*key[1:], *row]
    if key[0] == "user":
        values[3] = list(values[3])  # tags: a text[]
    return values


async def write(
    conn: AsyncConn,
    base: Rows,
    rows: Rows,
    queue_ids: dict[Key, int],
    version: int,
    replaced: frozenset[Key] = frozenset(),
    home_epoch: int | None = None,
) -> int:
    """Make the tables hold ``rows`` where they held ``base``; returns the
    number of rows changed. Ids of upserted queues go into ``queue_ids``.

    ``replaced`` are queues deleted and declared again since ``base``: a
    new queue, which must not inherit the old one's id (the key of its
    messages), so its row is deleted and inserted anew, and the bindings
    to it (gone with the old row) inserted again. What changed is logged
    under ``version`` (:mod:`changes`). Non-durable queues written for the
    first time get ``home_epoch`` (the writing incarnation) as their home."""
    changed = 0
    touched: list[Key] = []
    for table in reversed(TABLES):
        for key in (base.keys() - rows.keys()) | (replaced & base.keys()):
            if key[0] != table:
                continue
            for sql in _DELETE[table]:
                if "%(" in sql:
                    await conn.execute(sql, {str(i): v for i, v in enumerate(key[1:])})
                else:
                    await conn.execute(sql, key[1:])
            queue_ids.pop(key, None)
            touched.append(key)
            changed += 1
    for table in TABLES:
        for key, row in rows.items():
            if key[0] != table:
                continue
            if base.get(key) == row and key not in replaced and not _binds(key, replaced):
                continue
            params = _params(key, row)
            if table == "queue":
                params += [row[0], home_epoch]  # durable, home
            cur = await conn.execute(
                _UPSERT[table],
                {str(i): v for i, v in enumerate(params)} if table == "binding" else params,
            )
            if table == "queue":
                got = await cur.fetchone()
                if got is not None:
                    queue_ids[key] = int(str(got[0]))
            touched.append(key)
            changed += 1
    await changes.record(conn, version, touched)
    return changed


def _binds(key: Key, queues: frozenset[Key]) -> bool:
    """Whether ``key`` is a binding to one of ``queues``."""
    return key[0] == "binding" and key[3] == "queue" and ("queue", key[1], key[4]) in queues


_SELECT = {
    "vhost": "SELECT name FROM roost_vhosts",
    "user": "SELECT name, password_hash, hashing_algorithm, tags FROM roost_users",
    "permission": "SELECT username, vhost, configure, write, read FROM roost_permissions",
    "exchange": "SELECT vhost, name, type, durable, auto_delete, internal, arguments"
    " FROM roost_exchanges",
    "queue": "SELECT id, vhost, name, durable, auto_delete, arguments, owner_epoch,"
    " owner_connection FROM roost_queues",
    "binding": "SELECT vhost, source, destination_type, destination, routing_key, arguments"
    " FROM roost_bindings",
}


async def version(conn: AsyncConn) -> int:
    cur = await conn.execute("SELECT definitions_version FROM roost_cluster")
    got = await cur.fetchone()
    return int(str(got[0])) if got is not None else 0


async def read(
    conn: AsyncConn, where: dict[str, tuple[str, list[Any]]] | None = None
) -> tuple[Rows, dict[Key, int]]:
    """Every definition row (only those ``where`` selects, per table, when
    given) and the queues' ids; in the caller's transaction."""
    rows: Rows = {}
    queue_ids: dict[Key, int] = {}
    for table in TABLES:
        sql, params = _SELECT[table], list[Any]()
        if where is not None:
            if table not in where:
                continue
            condition, params = where[table]
            sql += f" WHERE {condition}"
        cur = await conn.execute(sql.encode(), params)
        for r in await cur.fetchall():
            if table == "vhost":
                rows[("vhost", r[0])] = ()
            elif table == "user":
                rows[("user", r[0])] = (r[1], r[2], tuple(r[3]))  # type: ignore[arg-type]
            elif table == "permission":
                rows[("permission", r[0], r[1])] = (r[2], r[3], r[4])
            elif table == "exchange":
                rows[("exchange", r[0], r[1])] = (r[2], r[3], r[4], r[5], bytes(r[6]))  # type: ignore[call-overload]
            elif table == "queue":
                key = ("queue", r[1], r[2])
                rows[key] = (r[3], r[4], bytes(r[5]), r[6], r[7])  # type: ignore[call-overload]
                queue_ids[key] = int(str(r[0]))
            else:
                rows[("binding", r[0], r[1], r[2], r[3], r[4], bytes(r[5]))] = ()  # type: ignore[call-overload]
    return rows, queue_ids
