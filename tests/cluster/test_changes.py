"""The change log's scopes: the rows a scope's SQL selects are exactly the
rows its Matcher says it covers (the reader relies on both agreeing)."""

from __future__ import annotations

import psycopg
import pytest

from roost.broker.broker import Broker
from roost.cluster import changes, schema, store
from roost.cluster.rows import Owners, snapshot

SCOPES = [
    ("vhost", "/"),
    ("vhost", "other"),
    ("user", "guest"),
    ("user", "alice"),
    ("permission", "alice", "other"),
    ("exchange", "/", "orders"),
    ("exchange", "/", "back"),
    ("queue", "/", "q1"),
    ("queue", "other", "q1"),
    ("bindings", "/", "orders"),
    ("bindings", "/", "amq.topic"),
]


def _model() -> Broker:
    broker = Broker()
    broker.users.add("alice", "pw")
    broker.add_vhost("other")
    broker.permissions[("alice", "other")] = (".*", ".*", ".*")
    broker.permissions[("alice", "/")] = ("", "", "")
    for vname in ("/", "other"):
        vh = broker.vhosts[vname]
        vh.declare_exchange("orders", "topic")
        vh.declare_exchange("back", "fanout")
        vh.bind("orders", vh.exchanges["back"], "#", {})
        for qname in ("q1", "q2"):
            q = vh.declare_queue(qname, owner=object())
            vh.bind("orders", q, "a.*", {"x": 1})
            vh.bind("amq.topic", q, qname, {})
        vh.bind("back", vh.queues["q1"], "", {})
    return broker


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_scopes_sql_and_matcher_agree(pg_url: str, scope: changes.Scope) -> None:
    with psycopg.connect(pg_url) as sync:
        schema.migrate(sync)
    rows = snapshot(_model(), Owners())
    conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        async with conn.transaction():
            await store.write(conn, {}, rows, {}, 1)
        selected, _ = await store.read(conn, changes.conditions([scope]))
    finally:
        await conn.close()
    matched = {k for k in rows if changes.Matcher([scope])(k)}
    assert set(selected) == matched
    assert matched  # every scope here selects something


def test_a_key_is_logged_under_a_scope_that_covers_it() -> None:
    for key in snapshot(_model(), Owners()):
        assert changes.Matcher([changes.scope_of(key)])(key), key


def test_nothing_is_in_no_scope() -> None:
    assert changes.conditions([]) == {}
    assert not changes.Matcher([])(("vhost", "/"))


async def test_a_pruned_log_sends_readers_to_the_tables(pg_url: str) -> None:
    with psycopg.connect(pg_url) as sync:
        schema.migrate(sync)
    conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        await changes.record(conn, 500, [("queue", "/", "old")])
        last = changes.KEEP_VERSIONS + changes.PRUNE_EVERY
        await changes.record(conn, last, [("queue", "/", "new")])
        # Everything after 1000 is still there; from before it, not.
        assert await changes.since(conn, 500, last) is None
        assert await changes.since(conn, 1000, last) == [("queue", "/", "new")]
        assert await changes.since(conn, last, last) == []
    finally:
        await conn.close()
