"""The consumer registry's cleanup of a dead node against a real
PostgreSQL: its rows go, the auto-delete queues it held the last
consumers of go with them, and doing it twice changes nothing more."""

from __future__ import annotations

import psycopg

from roost.cluster.consumers import release_consumers
from roost.cluster.nodes import NodeRegistry


async def test_a_dead_nodes_consumers_go_with_the_auto_delete_queues_left_unused(
    pg_url: str,
) -> None:
    a, b = NodeRegistry(pg_url, "a", 3), NodeRegistry(pg_url, "b", 3)
    await a.start()
    await b.start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO roost_vhosts (name) VALUES ('/') ON CONFLICT DO NOTHING"
            )
            ids = {}
            for name, auto in (("only-a", True), ("shared", True), ("durable", False)):
                cur = await conn.execute(
                    "INSERT INTO roost_queues (vhost, name, durable, auto_delete)"
                    " VALUES ('/', %s, false, %s) RETURNING id",
                    (name, auto),
                )
                row = await cur.fetchone()
                assert row is not None
                ids[name] = row[0]
            held = [(a.epoch, "only-a"), (a.epoch, "shared"), (a.epoch, "durable")]
            for local_id, (epoch, queue) in enumerate([*held, (b.epoch, "shared")]):
                await conn.execute(
                    "INSERT INTO roost_consumers (queue_id, epoch, local_id, tag)"
                    " VALUES (%s, %s, %s, 'ctag')",
                    (ids[queue], epoch, local_id),
                )
            cur = await conn.execute("SELECT definitions_version FROM roost_cluster")
            before = await cur.fetchone()
            assert before is not None

            for _ in range(2):  # a cleanup retried after a rollback runs it again
                async with conn.transaction():
                    await release_consumers(a.epoch, conn)

            cur = await conn.execute("SELECT name FROM roost_queues ORDER BY name")
            assert [r[0] for r in await cur.fetchall()] == ["durable", "shared"]
            cur = await conn.execute("SELECT epoch, queue_id FROM roost_consumers")
            assert await cur.fetchall() == [(b.epoch, ids["shared"])]
            cur = await conn.execute(
                "SELECT version, scope FROM roost_definition_changes ORDER BY version"
            )
            assert await cur.fetchall() == [(before[0] + 1, ["queue", "/", "only-a"])]
            # x-expires counts from the consumers' going.
            cur = await conn.execute("SELECT queue_id FROM roost_queue_use ORDER BY queue_id")
            assert [r[0] for r in await cur.fetchall()] == sorted([ids["shared"], ids["durable"]])
    finally:
        await a.leave()
        await b.leave()
