"""The definitions change log: what a node reads to catch up.

Every definitions write records, under its version, the *scopes* it
touched: the rows a reader must fetch again. A scope is wider than the key
that changed wherever the database cascades: a deleted vhost takes every
row in it, a user its permissions, an exchange or a queue the bindings to
and from it. A node that has applied version V reads the scopes logged
after V and fetches only their rows, instead of every table; it reads
everything when the log no longer reaches back to V (pruned), when the
scopes are too many to be worth it, and from time to time anyway.

======================  ====================================================
scope                   rows
======================  ====================================================
("vhost", v)            everything in vhost v (and v itself)
("user", u)             user u and its permissions
("permission", u, v)    that permission
("exchange", v, x)      exchange x and the bindings from or to it
("queue", v, q)         queue q and the bindings to it
("bindings", v, x)      the bindings from exchange x
======================  ====================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from roost.cluster.nodes import AsyncConn
from roost.cluster.rows import Key

Scope = tuple[str, ...]

# Versions of the log kept; older entries are pruned now and then.
KEEP_VERSIONS = 10_000
PRUNE_EVERY = 1_000
# Beyond this many scopes one full read is cheaper than the filters.
MAX_SCOPES = 200


def scope_of(key: Key) -> Scope:
    table = key[0]
    if table == "binding":
        return ("bindings", key[1], key[2])
    return tuple(str(part) for part in key)


class Matcher:
    """Whether a key is in any of some scopes, in constant time (a reload
    tests every row this node knows of)."""

    def __init__(self, scopes: Iterable[Scope]) -> None:
        self.by_kind: dict[str, set[tuple[str, ...]]] = {}
        for scope in scopes:
            self.by_kind.setdefault(scope[0], set()).add(tuple(scope[1:]))

    def __call__(self, key: Key) -> bool:
        table, kinds = key[0], self.by_kind
        vhosts = kinds.get("vhost", ())
        if table == "vhost":
            return (key[1],) in vhosts
        if table == "user":
            return (key[1],) in kinds.get("user", ())
        if table == "permission":
            return (
                (key[2],) in vhosts
                or (key[1],) in kinds.get("user", ())
                or (key[1], key[2]) in kinds.get("permission", ())
            )
        if (key[1],) in vhosts:
            return True
        if table in ("exchange", "queue"):
            return (key[1], key[2]) in kinds.get(table, ())
        _, vhost, source, dest_type, dest, _, _ = key
        exchanges = kinds.get("exchange", ())
        return (
            (vhost, source) in exchanges
            or (vhost, source) in kinds.get("bindings", ())
            or (dest_type == "exchange" and (vhost, dest) in exchanges)
            or (dest_type == "queue" and (vhost, dest) in kinds.get("queue", ()))
        )


def conditions(scopes: Iterable[Scope]) -> dict[str, tuple[str, list[Any]]]:
    """Per table, the WHERE clause selecting the rows in ``scopes`` (a
    table no scope reaches is left out)."""
    parts: dict[str, list[str]] = {}
    params: dict[str, list[Any]] = {}

    def add(table: str, sql: str, *values: Any) -> None:
        parts.setdefault(table, []).append(sql)
        params.setdefault(table, []).extend(values)

    for scope in scopes:
        kind = scope[0]
        if kind == "vhost":
            v = scope[1]
            add("vhost", "name = %s", v)
            add("permission", "vhost = %s", v)
            for table in ("exchange", "queue", "binding"):
                add(table, "vhost = %s", v)
        elif kind == "user":
            add("user", "name = %s", scope[1])
            add("permission", "username = %s", scope[1])
        elif kind == "permission":
            add("permission", "(username = %s AND vhost = %s)", scope[1], scope[2])
        elif kind == "exchange":
            v, x = scope[1], scope[2]
            add("exchange", "(vhost = %s AND name = %s)", v, x)
            add(
                "binding",
                "(vhost = %s AND (source = %s OR (destination_type = 'exchange'"
                " AND destination = %s)))",
                v,
                x,
                x,
            )
        elif kind == "queue":
            v, q = scope[1], scope[2]
            add("queue", "(vhost = %s AND name = %s)", v, q)
            add(
                "binding",
                "(vhost = %s AND destination_type = 'queue' AND destination = %s)",
                v,
                q,
            )
        elif kind == "bindings":
            add("binding", "(vhost = %s AND source = %s)", scope[1], scope[2])
    return {t: (" OR ".join(parts[t]), params[t]) for t in parts}


async def record(conn: AsyncConn, version: int, keys: Iterable[Key]) -> None:
    """Log the scopes of ``keys`` under ``version`` (in the write's
    transaction), pruning the log now and then."""
    scopes = sorted({scope_of(k) for k in keys})
    if scopes:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO roost_definition_changes (version, scope) VALUES (%s, %s)",
                [(version, list(s)) for s in scopes],
            )
    if version % PRUNE_EVERY == 0 and version > KEEP_VERSIONS:
        horizon = version - KEEP_VERSIONS
        await conn.execute("DELETE FROM roost_definition_changes WHERE version <= %s", (horizon,))
        await conn.execute(
            "UPDATE roost_cluster SET changes_pruned_through ="
            " greatest(changes_pruned_through, %s)",
            (horizon,),
        )


async def since(conn: AsyncConn, version: int, now: int) -> list[Scope] | None:
    """The scopes changed after ``version`` up to ``now``; None when the
    log does not reach back that far or they are too many to filter by."""
    cur = await conn.execute("SELECT changes_pruned_through FROM roost_cluster")
    got = await cur.fetchone()
    if got is None or version < int(str(got[0])):
        return None
    cur = await conn.execute(
        "SELECT DISTINCT scope FROM roost_definition_changes WHERE version > %s AND version <= %s"
        " LIMIT %s",
        (version, now, MAX_SCOPES + 1),
    )
    scopes = [tuple(str(p) for p in r[0]) for r in await cur.fetchall()]  # type: ignore[attr-defined]
    return scopes if len(scopes) <= MAX_SCOPES else None
