"""Delayed messages and retry back-off in a cluster: held in PostgreSQL,
routed (or brought back) exactly once, by any node, even when the node
they were published to or delivered on was killed. Real processes, pika
clients."""

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


def _declare_delayed(ch: Any, exchange: str, queue: str) -> None:
    ch.exchange_declare(
        exchange, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"}
    )
    ch.queue_declare(queue, durable=True)
    ch.queue_bind(queue, exchange, routing_key="k")


def _delayed(delay: int, persistent: bool = True) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2 if persistent else 1, headers={"x-delay": delay})


class HeaderCollector(Collector):
    """Records the x-delay header each message arrives with too."""

    def __init__(self, proc: RoostProcess, queue: str, prefetch: int) -> None:
        self.delays: list[object] = []
        self.times: list[float] = []
        super().__init__(proc, queue, prefetch)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.delays.append((props.headers or {}).get("x-delay"))
        self.times.append(time.monotonic())
        super()._on_message(ch, method, props, body)


def test_held_messages_survive_the_killed_node_they_were_published_to(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn = _connect(a)
    ch = conn.channel()
    _declare_delayed(ch, "later", "due")
    ch.confirm_delivery()
    # Published in the reverse of their due order, persistent and not.
    sent = [(b"third", 3000, True), (b"second", 2500, False), (b"first", 2000, True)]
    for body, delay, persistent in sent:
        ch.basic_publish("later", "k", body, _delayed(delay, persistent))  # confirmed
    published = time.monotonic()
    a.kill()  # before any is due: nothing of them is in a's memory only
    c = HeaderCollector(b, "due", prefetch=10)
    _drain([c], lambda: len(c.got) >= 3, 30)
    c.pump(1.0)  # and nothing twice
    assert [body for body, _ in c.got] == [b"first", b"second", b"third"]
    assert not any(redelivered for _, redelivered in c.got)
    assert c.delays == [-2000, -2500, -3000]  # as the plugin marks them
    assert c.times[0] - published >= 1.5  # not before it was due
    c.conn.close()


def test_each_held_message_is_routed_once_with_every_node_routing(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b, c_node = node("a"), node("b"), node("c")
    bodies = [f"d{i}".encode() for i in range(300)]
    for proc, part in ((a, bodies[:150]), (b, bodies[150:])):
        conn = _connect(proc)
        ch = conn.channel()
        _declare_delayed(ch, "spread", "spread-q")
        ch.confirm_delivery()
        for i, body in enumerate(part):
            ch.basic_publish("spread", "k", body, _delayed(500 + i % 7 * 100, i % 2 == 0))
        conn.close()
    c = Collector(c_node, "spread-q", prefetch=100)
    _drain([c], lambda: len(c.got) >= len(bodies), 30)
    c.pump(1.5)
    got = [body for body, _ in c.got]
    assert sorted(got) == sorted(bodies)  # each exactly once
    c.conn.close()


def test_a_message_waiting_out_its_retry_delay_comes_back_once_after_a_kill(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn = _connect(a)
    ch = conn.channel()
    ch.queue_declare("retry", durable=True, arguments={"x-retry-delay": 6000})
    ch.confirm_delivery()
    ch.basic_publish("", "retry", b"job", pika.BasicProperties(delivery_mode=2))
    ch.basic_qos(prefetch_count=1)
    got: list[Any] = []
    ch.basic_consume("retry", lambda ch_, m, p, body: got.append(m))
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert got, "the job was not delivered on a"
    ch.basic_nack(got[0].delivery_tag, requeue=True)  # now it waits 6 s
    conn.process_data_events(time_limit=0.3)
    nacked = time.monotonic()
    a.kill()
    c = Collector(b, "retry", prefetch=10)
    _drain([c], lambda: len(c.got) >= 1, 30)
    # It waited out its delay although a died (and a's death, after 3 s,
    # did not bring it back early).
    assert time.monotonic() - nacked >= 5
    c.pump(TIMEOUT + 1.0)  # once
    assert c.got == [(b"job", True)]
    c.conn.close()


def test_a_paused_node_does_not_bring_back_a_retry_another_node_delivered(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn = _connect(a)
    ch = conn.channel()
    ch.queue_declare("retry-paused", durable=True, arguments={"x-retry-delay": 9000})
    ch.confirm_delivery()
    ch.basic_publish("", "retry-paused", b"job", pika.BasicProperties(delivery_mode=2))
    ch.basic_qos(prefetch_count=1)
    got: list[Any] = []
    ch.basic_consume("retry-paused", lambda ch_, m, p, body: got.append(m))
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert got, "the job was not delivered on a"
    ch.basic_nack(got[0].delivery_tag, requeue=True)  # a holds it for 9 s
    conn.process_data_events(time_limit=0.3)
    nacked = time.monotonic()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        c = Collector(b, "retry-paused", prefetch=10)
        _drain([c], lambda: len(c.got) >= 1, TIMEOUT * 4 + 10)  # a was declared dead
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert c.got == [(b"job", True)]  # and acked
    # a wakes, finds itself fenced and registers anew; when the 9 s are
    # over, the entry it held must not be delivered a second time.
    again: Collector | None = None
    deadline = time.monotonic() + 20
    while again is None:
        try:
            again = Collector(a, "retry-paused", prefetch=10)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while time.monotonic() < nacked + 9 + 2:
        again.pump(0.1)
        c.pump(0.05)
    assert again.got == []
    assert len(c.got) == 1
    again.conn.close()
    c.conn.close()


def test_retries_keep_their_delivery_count_across_nodes(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    conn = _connect(a)
    ch = conn.channel()
    ch.queue_declare("dead", durable=True)
    ch.queue_declare(
        "poison",
        durable=True,
        arguments={
            "x-retry-delay": 300,
            "x-retry-backoff": "exponential",
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dead",
        },
    )
    ch.confirm_delivery()
    ch.basic_publish("", "poison", b"bad", pika.BasicProperties(delivery_mode=2))
    conn.close()
    # Rejected on a, then b, then a: the count travels with the row, so the
    # third rejection is past the limit wherever it happens.
    for proc in (a, b, a):
        conn = _connect(proc)
        ch = conn.channel()
        deadline = time.monotonic() + 20
        method = None
        while method is None:
            assert time.monotonic() < deadline, "the message did not come back"
            method, _, _ = ch.basic_get("poison")
            if method is None:
                time.sleep(0.1)
        ch.basic_nack(method.delivery_tag, requeue=True)
        conn.close()
    c = Collector(b, "dead", prefetch=10)
    _drain([c], lambda: len(c.got) >= 1, 20)
    assert [body for body, _ in c.got] == [b"bad"]
    c.conn.close()
