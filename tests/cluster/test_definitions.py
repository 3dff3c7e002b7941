"""Shared definitions in process: brokers of two nodes in one event loop,
against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from roost.broker.broker import Broker
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
