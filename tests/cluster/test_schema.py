"""Schema migrations against a real PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
import pytest

from roost.cluster import schema


def test_migrate_creates_every_table_once(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        assert schema.migrate(conn) == 0
        assert schema.migrate(conn) == schema.LATEST
        rows = conn.execute("SELECT version FROM roost_schema ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [v for v, _, _ in schema.MIGRATIONS]
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'roost_%'")
        }
        assert {"roost_nodes", "roost_queues", "roost_messages"} <= tables


def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    found: list[int] = []
    errors: list[BaseException] = []

    def node() -> None:
        try:
            with psycopg.connect(pg_url) as conn:
                found.append(schema.migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(found) == [0] + [schema.LATEST] * 3


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        schema.migrate(conn)
        conn.execute("INSERT INTO roost_schema (version, description) VALUES (999, 'future')")
        conn.commit()
        with pytest.raises(schema.SchemaTooNew, match="version 999"):
            schema.migrate(conn)


def test_message_tables_share_ids_and_follow_their_queue(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        schema.migrate(conn)
        conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/')")
        conn.execute(
            "INSERT INTO roost_queues (id, vhost, name, durable, auto_delete)"
            " VALUES (7, '/', 'q', true, false)"
        )
        ids = []
        for table in ("roost_messages", "roost_transient_messages"):
            row = conn.execute(
                f"INSERT INTO {table} (queue_id, exchange, routing_key, properties, body)"
                " VALUES (7, '', '', '', '') RETURNING id".encode()
            ).fetchone()
            assert row is not None
            ids.append(row[0])
        assert ids[1] == ids[0] + 1  # one sequence: ids are unique across both
        conn.execute("DELETE FROM roost_queues WHERE id = 7")
        for table in ("roost_messages", "roost_transient_messages"):
            row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
            assert row == (0,)
