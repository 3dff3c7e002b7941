"""The basic.qos behaviour Celery depends on: kombu sends ``global=false``
to roost (a non-RabbitMQ server), and Celery raises and lowers the prefetch
count of its running consumer that way (one more per ETA task it holds)."""

from __future__ import annotations

import pika

from roost.testing import RoostBroker


def _deliveries(channel: pika.adapters.blocking_connection.BlockingChannel) -> list[bytes]:
    """What the (one, never-acking) consumer of ``q`` has been sent so far."""
    got: list[bytes] = []
    for method, _props, body in channel.consume("q", inactivity_timeout=0.2):
        if method is None:
            break
        got.append(body)
    return got


def test_raising_per_consumer_prefetch_reaches_the_running_consumer(
    roost_broker: RoostBroker,
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        channel = conn.channel()
        channel.queue_declare("q")
        for n in range(4):
            channel.basic_publish("", "q", f"m{n}".encode())
        channel.basic_qos(prefetch_count=1)
        assert _deliveries(channel) == [b"m0"]
        channel.basic_qos(prefetch_count=3)
        assert _deliveries(channel) == [b"m1", b"m2"]
        assert channel.queue_declare("q", passive=True).method.message_count == 1
    finally:
        conn.close()


def test_unlimited_consumer_stays_unlimited_after_qos(roost_broker: RoostBroker) -> None:
    # As in RabbitMQ: a consumer started without a limit keeps none.
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        channel = conn.channel()
        channel.queue_declare("q")
        assert _deliveries(channel) == []
        channel.basic_qos(prefetch_count=1)
        for n in range(3):
            channel.basic_publish("", "q", f"m{n}".encode())
        assert _deliveries(channel) == [b"m0", b"m1", b"m2"]
    finally:
        conn.close()
