"""Deleting queues from inside another transaction: an auto-delete queue
whose last consumer went, a queue past its x-expires
(``roost.cluster.consumers``).

The caller holds the definitions lock (``roost_cluster``'s row, taken
before any queue row, as every definitions write takes it). The nodes
apply the deletion as one made elsewhere (the notification names epoch 0,
so the deciding node reloads too): the queue's consumers are cancelled on
every node. (``nodes.drop_exclusive_queues`` does the same for the
exclusive queues of a dead epoch.)
"""

from __future__ import annotations

from collections.abc import Iterable

from roost.cluster.nodes import DEFINITIONS_CHANNEL, AsyncConn

LOCK_DEFINITIONS = "SELECT 1 FROM roost_cluster FOR UPDATE"


async def drop_queues(conn: AsyncConn, queue_ids: Iterable[int]) -> list[tuple[str, str]]:
    """Delete the queues (with the bindings to them, and their messages by
    cascade) and announce it; returns the (vhost, name) deleted."""
    ids = sorted(set(queue_ids))
    if not ids:
        return []
    cur = await conn.execute(
        "DELETE FROM roost_queues WHERE id = ANY(%s) RETURNING vhost, name", (ids,)
    )
    gone = [(str(r[0]), str(r[1])) for r in await cur.fetchall()]
    if not gone:
        return []
    cur = await conn.execute(
        "UPDATE roost_cluster SET definitions_version = definitions_version + 1"
        " RETURNING definitions_version"
    )
    version = await cur.fetchone()
    assert version is not None
    vhosts, names = [v for v, _ in gone], [n for _, n in gone]
    await conn.execute(
        "DELETE FROM roost_bindings b USING unnest(%s::text[], %s::text[]) AS g(vhost, name)"
        " WHERE b.vhost = g.vhost AND b.destination_type = 'queue' AND b.destination = g.name",
        (vhosts, names),
    )
    # The change log's scope of a queue covers the bindings to it.
    await conn.execute(
        "INSERT INTO roost_definition_changes (version, scope)"
        " SELECT %s, ARRAY['queue', g.vhost, g.name] FROM unnest(%s::text[], %s::text[])"
        " AS g(vhost, name)",
        (version[0], vhosts, names),
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (DEFINITIONS_CHANNEL, "0"))
    return gone
