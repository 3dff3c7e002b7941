"""Messages shared by ``roost serve --cluster`` processes: published on one
node, consumed on another, shared by competing consumers, and kept (or
redelivered) when a node is killed. Real processes, pika clients."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from pika.exceptions import AMQPError

from roost.testing import RoostProcess

TIMEOUT = 3  # --node-timeout of every node here
PERSISTENT = pika.BasicProperties(delivery_mode=2)


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


def _connect(proc: RoostProcess) -> Any:
    return pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port))


def _publish_confirmed(proc: RoostProcess, queue: str, bodies: list[bytes]) -> None:
    conn = _connect(proc)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    for body in bodies:
        ch.basic_publish("", queue, body, PERSISTENT)  # returns once confirmed
    conn.close()


class Collector:
    """A consumer that records (body, redelivered) and acks as it goes."""

    def __init__(self, proc: RoostProcess, queue: str, prefetch: int, ack: bool = True) -> None:
        self.conn = _connect(proc)
        self.ch = self.conn.channel()
        self.ch.basic_qos(prefetch_count=prefetch)
        self.got: list[tuple[bytes, bool]] = []
        self.ack = ack
        self.ch.basic_consume(queue, self._on_message)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.got.append((body, bool(method.redelivered)))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    def pump(self, seconds: float = 0.05) -> None:
        self.conn.process_data_events(time_limit=seconds)


def _drain(collectors: list[Collector], until: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: got {[len(c.got) for c in collectors]}")
        for c in collectors:
            c.pump()


def _bodies(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def test_published_on_one_node_consumed_on_another(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    sent = _bodies(300)
    _publish_confirmed(a, "shared", sent)
    c = Collector(b, "shared", prefetch=50)
    _drain([c], lambda: len(c.got) >= len(sent), 20)
    c.pump(0.5)  # nothing more may come
    assert sorted(body for body, _ in c.got) == sorted(sent)
    assert not any(redelivered for _, redelivered in c.got)
    c.conn.close()


def test_competing_consumers_on_two_nodes_share_a_queue(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    sent = _bodies(600)
    _publish_confirmed(a, "work", sent)
    ca = Collector(a, "work", prefetch=5)
    cb = Collector(b, "work", prefetch=5)
    _drain([ca, cb], lambda: len(ca.got) + len(cb.got) >= len(sent), 30)
    for c in (ca, cb):
        c.pump(0.3)
    got = [body for body, _ in ca.got + cb.got]
    assert sorted(got) == sorted(sent)  # each message exactly once
    assert ca.got and cb.got
    ca.conn.close()
    cb.conn.close()


def test_unacked_deliveries_of_a_killed_node_are_redelivered_elsewhere(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    sent = _bodies(100)
    _publish_confirmed(b, "jobs", sent)
    held = Collector(a, "jobs", prefetch=20, ack=False)
    _drain([held], lambda: len(held.got) >= 20, 20)
    delivered_on_a = {body for body, _ in held.got}
    a.kill()  # SIGKILL: no clean shutdown, the unacked rows stay claimed by a
    c = Collector(b, "jobs", prefetch=50)
    started = time.monotonic()
    _drain([c], lambda: len(c.got) >= len(sent), TIMEOUT * 4 + 10)
    c.pump(0.5)
    assert sorted(body for body, _ in c.got) == sorted(sent)
    redelivered = {body for body, flag in c.got if flag}
    assert delivered_on_a <= redelivered
    # They came back once a was declared dead, not before.
    assert time.monotonic() - started >= TIMEOUT - 1
    c.conn.close()


def test_confirmed_messages_survive_a_killed_publishing_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    confirmed: list[bytes] = []
    conn = _connect(a)
    ch = conn.channel()
    ch.queue_declare("kept", durable=True)
    ch.confirm_delivery()
    killer = threading.Timer(1.0, a.kill)
    killer.start()
    try:
        for i in range(1_000_000):
            body = f"k{i}".encode()
            ch.basic_publish("", "kept", body, PERSISTENT)
            confirmed.append(body)
    except (AMQPError, OSError):
        pass  # the node is gone: what was confirmed must be there
    finally:
        killer.join()
    assert len(confirmed) > 10
    c = Collector(b, "kept", prefetch=100)
    _drain([c], lambda: len(c.got) >= len(confirmed), TIMEOUT * 4 + 20)
    c.pump(1.0)
    got = [body for body, _ in c.got]
    assert set(confirmed) <= set(got)
    # At most the one publish in flight at the kill is there unconfirmed.
    assert len(got) - len(confirmed) <= 1
    assert len(got) == len(set(got))
    c.conn.close()


def test_basic_get_on_a_node_without_consumers(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    sent = _bodies(5, "g")
    _publish_confirmed(a, "polled", sent)
    conn = _connect(b)
    ch = conn.channel()
    got = []
    for _ in sent:
        method, _props, body = ch.basic_get("polled", auto_ack=True)
        assert method is not None  # not get-empty: b claims a row for the get
        got.append(body)
    assert sorted(got) == sorted(sent)
    assert ch.basic_get("polled", auto_ack=True)[0] is None
    conn.close()


def test_a_paused_node_delivers_nothing_twice(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    sent = _bodies(60, "p")
    _publish_confirmed(a, "paused", sent)
    held = Collector(b, "paused", prefetch=10, ack=False)
    _drain([held], lambda: len(held.got) >= 10, 20)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        c = Collector(a, "paused", prefetch=50)
        # b's rows come back once it is declared dead.
        _drain([c], lambda: len(c.got) >= len(sent), TIMEOUT * 4 + 10)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    # b finds itself fenced: its connections are closed, what its channels
    # held and requeued is not delivered again when it registers anew.
    with pytest.raises(AMQPError):
        for _ in range(100):
            held.pump(0.1)
    # At once: the buffer would be given back within two idle seconds.
    again = Collector(b, "paused", prefetch=50)
    for _ in range(20):
        again.pump(0.1)
        c.pump(0.05)
    assert sorted(body for body, _ in c.got) == sorted(sent)
    assert again.got == []
    again.conn.close()
    c.conn.close()
