"""Shared definitions in process: brokers of two nodes in one event loop,
against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from roost.broker.broker import Broker
from roost.broker.errors import BrokerError
from roost.cluster import store
from roost.cluster.rows import Owners, Rows, snapshot
from roost.cluster.runtime import ClusterNode

Node = tuple[Broker, ClusterNode]


async def _nothing() -> None:
    pass


async def _saved(broker: Broker) -> None:
    done = asyncio.get_running_loop().create_future()
    broker.when_definitions_saved(lambda: done.set_result(None))
    await asyncio.wait_for(done, 10)


@pytest.fixture
async def start_node(pg_url: str) -> AsyncIterator[Callable[[str], Awaitable[Node]]]:
    started: list[ClusterNode] = []

    async def start(name: str) -> Node:
        broker = Broker()
        broker.set_scheduler(asyncio.get_running_loop().call_later)
        node = ClusterNode(pg_url, name, 3)
        await node.register(_nothing)
        await node.load(broker)
        started.append(node)
        return broker, node

    yield start
    for node in started:
        await node.stop()


def _rows(pg_url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql.encode()).fetchall()


async def test_a_change_is_applied_on_the_other_node_before_it_is_confirmed(
    start_node: Callable[[str], Awaitable[Node]],
) -> None:
    a, _ = await start_node("a")
    b, _ = await start_node("b")
    for i in range(20):
        a.vhosts["/"].declare_queue(f"q{i}", owner=object(), durable=True)
        await _saved(a)
        assert f"q{i}" in b.vhosts["/"].queues


async def test_a_queue_deleted_and_declared_again_is_a_new_queue(
    start_node: Callable[[str], Awaitable[Node]], pg_url: str
) -> None:
    a, node = await start_node("a")
    vh = a.vhosts["/"]
    q = vh.declare_queue("q", owner=object(), durable=True)
    vh.bind("amq.direct", q, "k", {})
    await _saved(a)
    assert node.definitions is not None
    first = node.definitions.queue_id("/", "q")
    # Within one write: the rows are the same, the queue is not.
    vh.remove_queue(q)
    again = vh.declare_queue("q", owner=object(), durable=True)
    vh.bind("amq.direct", again, "k", {})
    await _saved(a)
    second = node.definitions.queue_id("/", "q")
    assert first is not None and second is not None and second != first
    assert _rows(pg_url, "SELECT id FROM roost_queues") == [(second,)]
    assert _rows(pg_url, "SELECT source, destination, routing_key FROM roost_bindings") == [
        ("amq.direct", "q", "k")
    ]


@pytest.mark.parametrize("seed", [13, 7, 42, 2026])
async def test_random_changes_on_two_nodes_converge(
    start_node: Callable[[str], Awaitable[Node]], pg_url: str, seed: int
) -> None:
    a, _ = await start_node("a")
    b, _ = await start_node("b")
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(6)]

    def change(broker: Broker) -> None:
        vh = broker.vhosts.get(rng.choice(("/", "/", "v2")))
        op, name, other = rng.randrange(10), rng.choice(names), rng.choice(names)
        try:
            if op == 6:
                broker.add_vhost("v2")
            elif op == 7 and rng.random() < 0.3:
                broker.delete_vhost("v2")
            elif op == 8:
                broker.users.add(name, "pw")
                where = rng.choice(("/", "v2"))
                if where in broker.vhosts:
                    broker.permissions[(name, where)] = (".*", "", "")
                broker.definitions_changed()
            elif op == 9 and name in broker.users.users:
                del broker.users.users[name]
                for key in [k for k in broker.permissions if k[0] == name]:
                    del broker.permissions[key]
                broker.definitions_changed()
            elif vh is None:
                pass
            elif op == 0:
                vh.declare_queue(name, owner=object(), durable=rng.random() < 0.5)
            elif op == 1:
                q = vh.queues.get(name)
                if q is not None:
                    vh.remove_queue(q)
            elif op == 2:
                vh.declare_exchange(name, "direct")
            elif op == 3:
                vh.delete_exchange(name)
            elif op == 4 and name in vh.exchanges and other in vh.queues:
                vh.bind(name, vh.queues[other], rng.choice("xy"), {})
            elif op == 5 and name in vh.exchanges and other in vh.queues:
                vh.unbind(name, vh.queues[other], rng.choice("xy"), {})
        except BrokerError:
            pass  # an inequivalent redeclaration, as a client would get

    for _ in range(300):
        change(rng.choice((a, b)))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice((0, 0.001, 0.01)))
    await _saved(a)
    await _saved(b)

    async def tables() -> Rows:
        conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
        try:
            return (await store.read(conn))[0]
        finally:
            await conn.close()

    deadline = asyncio.get_running_loop().time() + 10
    while True:
        rows_a, rows_b = snapshot(a, Owners()), snapshot(b, Owners())
        db = await tables()
        if rows_a == rows_b == db or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert rows_a == db
    assert rows_b == db
