"""Deduplication across the nodes of a cluster: one cache per queue or
exchange, in PostgreSQL. Real processes, pika clients."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from roost.testing import RoostProcess
from tests.cluster.test_cluster_messages import Collector, _connect, _drain

TIMEOUT = 3  # --node-timeout of every node here


@pytest.fixture
def node(pg_url: str) -> Iterator[Callable[[str], RoostProcess]]:
    started: list[RoostProcess] = []

    def start(name: str) -> RoostProcess:
        proc = RoostProcess(
            None, "--cluster", pg_url, "--node-name", name, "--node-timeout", str(TIMEOUT)
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
        proc.close()


def _props(message_id: str | None = None, **headers: Any) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, message_id=message_id, headers=headers or None)


def _channel(proc: RoostProcess) -> tuple[Any, Any]:
    conn = _connect(proc)
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def _consume_all(proc: RoostProcess, queue: str, expected: int) -> list[bytes]:
    c = Collector(proc, queue, prefetch=100)
    _drain([c], lambda: len(c.got) >= expected, 20)
    c.pump(1.0)  # nothing more may come
    c.conn.close()
    return [body for body, _ in c.got]


def test_a_queue_takes_a_key_once_whichever_node_it_was_published_to(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn_a, ch_a = _channel(a)
    ch_a.queue_declare("dq", durable=True, arguments={"x-message-deduplication": True})
    conn_b, ch_b = _channel(b)
    # Every publish is confirmed (a duplicate is dropped, not refused).
    ch_a.basic_publish("", "dq", b"m1 from a", _props("m1"))
    ch_b.basic_publish("", "dq", b"m1 from b", _props("m1"))
    ch_b.basic_publish("", "dq", b"m2 from b", _props("m2"))
    ch_a.basic_publish("", "dq", b"m2 from a", _props("m2"))
    ch_a.basic_publish("", "dq", b"no key", _props())
    ch_b.basic_publish("", "dq", b"h1", _props(None, **{"x-deduplication-header": "k1"}))
    ch_a.basic_publish("", "dq", b"h1 again", _props("other", **{"x-deduplication-header": "k1"}))
    conn_a.close()
    conn_b.close()
    got = _consume_all(a, "dq", 4)
    assert sorted(got) == sorted([b"m1 from a", b"m2 from b", b"no key", b"h1"])


def test_an_exchange_drops_a_duplicate_published_on_another_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn_a, ch_a = _channel(a)
    ch_a.exchange_declare("dx", "fanout", durable=True, arguments={"x-message-deduplication": True})
    for q in ("q1", "q2"):
        ch_a.queue_declare(q, durable=True)
        ch_a.queue_bind(q, "dx")
    conn_b, ch_b = _channel(b)
    ch_a.basic_publish("dx", "", b"first", _props("same"))
    ch_b.basic_publish("dx", "", b"second", _props("same"))
    ch_b.basic_publish("dx", "", b"third", _props("new"))
    conn_a.close()
    conn_b.close()
    for q in ("q1", "q2"):  # the exchange's verdict holds for every queue
        assert sorted(_consume_all(b, q, 2)) == [b"first", b"third"]


def test_a_key_is_taken_again_after_its_ttl_on_another_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn_a, ch_a = _channel(a)
    ch_a.queue_declare(
        "ttlq", durable=True, arguments={"x-message-deduplication": True, "x-cache-ttl": 1000}
    )
    conn_b, ch_b = _channel(b)
    ch_a.basic_publish("", "ttlq", b"one", _props("k"))
    ch_b.basic_publish("", "ttlq", b"dup", _props("k"))
    time.sleep(1.5)  # past the key's TTL (PostgreSQL's clock)
    ch_b.basic_publish("", "ttlq", b"two", _props("k"))
    conn_a.close()
    conn_b.close()
    assert sorted(_consume_all(a, "ttlq", 2)) == [b"one", b"two"]


def test_the_cache_size_bounds_the_keys_remembered_cluster_wide(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn_a, ch_a = _channel(a)
    ch_a.queue_declare(
        "small", durable=True, arguments={"x-message-deduplication": True, "x-cache-size": 2}
    )
    conn_b, ch_b = _channel(b)
    ch_a.basic_publish("", "small", b"k1", _props("k1"))
    ch_b.basic_publish("", "small", b"k2", _props("k2"))
    ch_a.basic_publish("", "small", b"k3", _props("k3"))  # k1 is forgotten
    ch_b.basic_publish("", "small", b"k1 again", _props("k1"))
    ch_b.basic_publish("", "small", b"k3 again", _props("k3"))  # still known
    conn_a.close()
    conn_b.close()
    assert sorted(_consume_all(a, "small", 4)) == [b"k1", b"k1 again", b"k2", b"k3"]


def test_a_delayed_duplicate_is_held_once(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    conn_a, ch_a = _channel(a)
    ch_a.exchange_declare(
        "ddx",
        "x-delayed-message",
        durable=True,
        arguments={"x-delayed-type": "direct", "x-message-deduplication": True},
    )
    ch_a.queue_declare("ddq", durable=True)
    ch_a.queue_bind("ddq", "ddx", routing_key="k")
    conn_b, ch_b = _channel(b)
    ch_a.basic_publish("ddx", "k", b"once", _props("d1", **{"x-delay": 500}))
    ch_b.basic_publish("ddx", "k", b"twice", _props("d1", **{"x-delay": 500}))
    conn_a.close()
    conn_b.close()
    assert _consume_all(b, "ddq", 1) == [b"once"]
