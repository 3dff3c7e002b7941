"""roost's retry back-off: x-retry-delay (ms), x-retry-backoff
(fixed|exponential) and x-retry-max-delay hold a message requeued by a
nack/reject before it can be redelivered."""

from __future__ import annotations

import time
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker
from tests.e2e.queue_features.helpers import count, declare_error, get, unique


def retry_queue(ch: BlockingChannel, **arguments: Any) -> str:
    q = unique("retry")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-" + k.replace("_", "-"): v for k, v in arguments.items()}
    )
    return q


def nack_and_time(ch: BlockingChannel, q: str) -> tuple[float, Any, bytes]:
    """Get, nack(requeue), and time until the message is back."""
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(m.delivery_tag, requeue=True)
    start = time.monotonic()
    # Not back at once: the delay holds it.
    assert ch.basic_get(q)[0] is None
    m2, _, body = get(ch, q, timeout=10, auto_ack=False)
    return time.monotonic() - start, m2, body


def test_fixed_delay_holds_the_message(ch: BlockingChannel) -> None:
    q = retry_queue(ch, retry_delay=300)
    ch.basic_publish("", q, b"again")
    # Still counted while waiting, like any requeued message.
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(m.delivery_tag, requeue=True)
    assert count(ch, q) == 1
    start = time.monotonic()
    assert ch.basic_get(q)[0] is None
    m2, _, body = get(ch, q, timeout=10)
    assert time.monotonic() - start >= 0.25
    assert (body, m2.redelivered) == (b"again", True)


def test_fixed_delay_is_the_same_every_time(ch: BlockingChannel) -> None:
    q = retry_queue(ch, retry_delay=150, retry_backoff="fixed")
    ch.basic_publish("", q, b"f")
    m, _, _ = get(ch, q, auto_ack=False)
    for _ in range(3):
        ch.basic_nack(m.delivery_tag, requeue=True)
        start = time.monotonic()
        assert ch.basic_get(q)[0] is None
        m, _, body = get(ch, q, timeout=10, auto_ack=False)
        assert body == b"f"
        assert time.monotonic() - start >= 0.12


def test_other_messages_are_not_held(ch: BlockingChannel) -> None:
    q = retry_queue(ch, retry_delay=5000)
    ch.basic_publish("", q, b"slow")
    ch.basic_publish("", q, b"next")
    m, _, body = get(ch, q, auto_ack=False)
    assert body == b"slow"
    ch.basic_nack(m.delivery_tag, requeue=True)
    _, _, body = get(ch, q)
    assert body == b"next"
    assert ch.basic_get(q)[0] is None
    assert count(ch, q) == 1


def test_ack_and_reject_without_requeue_are_not_delayed(ch: BlockingChannel) -> None:
    dlq = ch.queue_declare("", exclusive=True).method.queue
    q = retry_queue(ch, retry_delay=5000, dead_letter_exchange="", dead_letter_routing_key=dlq)
    ch.basic_publish("", q, b"r")
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    _, p, body = get(ch, dlq, timeout=2)
    assert body == b"r"
    assert p.headers["x-death"][0]["reason"] == "rejected"


def test_exponential_backoff_doubles(ch: BlockingChannel) -> None:
    q = retry_queue(ch, retry_delay=100, retry_backoff="exponential")
    ch.basic_publish("", q, b"e")
    waits = []
    m, _, _ = get(ch, q, auto_ack=False)
    for _ in range(3):
        ch.basic_nack(m.delivery_tag, requeue=True)
        start = time.monotonic()
        m, _, _ = get(ch, q, timeout=10, auto_ack=False)
        waits.append(time.monotonic() - start)
    # 100, 200, 400 ms (lower bounds only; timers may run late).
    assert waits[0] >= 0.08
    assert waits[1] >= 0.18
    assert waits[2] >= 0.38


def test_max_delay_caps_the_backoff(roost_broker: RoostBroker, ch: BlockingChannel) -> None:
    q = retry_queue(ch, retry_delay=100, retry_backoff="exponential", retry_max_delay=150)
    ch.basic_publish("", q, b"cap")
    vhost = roost_broker.server.broker.vhosts["/"]  # type: ignore[union-attr]

    def pending_delay() -> int | None:
        waiting = vhost.queues[q]._waiting
        return int(waiting[0][0] - time.time() * 1000) if waiting else None

    m, _, _ = get(ch, q, auto_ack=False)
    for expected in (100, 150, 150):  # uncapped: 100, 200, 400
        ch.basic_nack(m.delivery_tag, requeue=True)
        delay = None
        deadline = time.monotonic() + 5
        while delay is None and time.monotonic() < deadline:  # the nack is asynchronous
            delay = roost_broker.call(pending_delay)
        assert delay is not None and expected - 50 <= delay <= expected
        m, _, _ = get(ch, q, timeout=10, auto_ack=False)


def test_consumer_gets_the_message_after_the_delay(
    conn: pika.BlockingConnection, ch: BlockingChannel
) -> None:
    q = retry_queue(ch, retry_delay=200)
    got: list[tuple[bytes, bool, float]] = []

    def on_message(c: BlockingChannel, m: Any, p: pika.BasicProperties, b: bytes) -> None:
        got.append((b, m.redelivered, time.monotonic()))
        if len(got) == 1:
            c.basic_nack(m.delivery_tag, requeue=True)
        else:
            c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_message)
    ch.basic_publish("", q, b"c")
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        conn.process_data_events(0.02)
    assert [(b, r) for b, r, _ in got] == [(b"c", False), (b"c", True)]
    assert got[1][2] - got[0][2] >= 0.15


def test_bad_retry_arguments(conn: pika.BlockingConnection) -> None:
    name = unique("retry")
    prefix = f"406 PRECONDITION_FAILED - invalid arg '{{}}' for queue '{name}' in vhost '/': "
    assert declare_error(conn, name, {"x-retry-delay": -1}) == (
        prefix.format("x-retry-delay") + "{value_negative,-1}"
    )
    assert declare_error(conn, name, {"x-retry-backoff": "linear"}) == (
        prefix.format("x-retry-backoff") + '"expected fixed or exponential"'
    )
    assert declare_error(conn, name, {"x-retry-max-delay": "x"}) == (
        prefix.format("x-retry-max-delay") + '"expected integer, got longstr"'
    )
