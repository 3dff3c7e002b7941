"""Other client libraries end to end: kombu (pyamqp transport), amqpstorm
and a real Celery worker with the rpc:// result backend."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from amqpstorm.connection import Connection as StormConnection
from amqpstorm.message import Message as StormMessage
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer

from roost.testing import RoostBroker


@pytest.fixture
def kombu_conn(roost_broker: RoostBroker) -> Iterator[Connection]:
    with Connection(roost_broker.url) as conn:
        yield conn


# -- kombu -------------------------------------------------------------------


def test_kombu_uses_pyamqp(kombu_conn: Connection) -> None:
    kombu_conn.connect()
    assert kombu_conn.transport.driver_type == "amqp"
    assert kombu_conn.connected
    props = kombu_conn.connection.server_properties
    assert props["product"] == "roost"


def test_kombu_simple_queue(kombu_conn: Connection) -> None:
    queue = kombu_conn.SimpleQueue("kombu-simple")
    try:
        for i in range(5):
            queue.put({"n": i, "text": "héllo"})
        received = []
        for _ in range(5):
            message = queue.get(block=True, timeout=5)
            received.append(message.payload)
            message.ack()
        assert received == [{"n": i, "text": "héllo"} for i in range(5)]
        assert message.content_type == "application/json"
        with pytest.raises(queue.Empty):
            queue.get(block=False)
        assert queue.qsize() == 0
    finally:
        queue.close()


@pytest.mark.parametrize(
    ("kind", "bind_key", "publish_key", "bind_args", "headers"),
    [
        ("direct", "jobs", "jobs", None, None),
        ("fanout", "", "ignored", None, None),
        ("topic", "orders.*.created", "orders.eu.created", None, None),
        ("headers", "", "", {"x-match": "all", "kind": "order"}, {"kind": "order"}),
    ],
)
def test_kombu_producer_consumer_per_exchange_type(
    kombu_conn: Connection,
    kind: str,
    bind_key: str,
    publish_key: str,
    bind_args: dict[str, Any] | None,
    headers: dict[str, Any] | None,
) -> None:
    exchange = Exchange(f"kombu-{kind}", type=kind, durable=False, auto_delete=True)
    queue = Queue(
        f"kombu-{kind}-q",
        exchange,
        routing_key=bind_key,
        binding_arguments=bind_args,
        exclusive=True,
    )
    received: list[tuple[Any, Any]] = []

    def on_message(body: Any, message: Any) -> None:
        received.append((body, message))
        message.ack()

    with Consumer(kombu_conn, queues=[queue], callbacks=[on_message], accept=["json"]):
        producer = Producer(kombu_conn)
        # Non-matching publishes go first: had one been routed, it would be
        # delivered ahead of the matching message.
        if kind in ("direct", "topic"):
            producer.publish({"kind": "miss"}, exchange=exchange, routing_key="other.key")
        if kind == "headers":
            producer.publish({"kind": "miss"}, exchange=exchange, headers={"kind": "other"})
        producer.publish(
            {"kind": kind},
            exchange=exchange,
            routing_key=publish_key,
            headers=headers or {},
            serializer="json",
        )
        deadline = time.monotonic() + 5
        while not received:
            assert time.monotonic() < deadline, "nothing delivered"
            with contextlib.suppress(TimeoutError):
                kombu_conn.drain_events(timeout=0.2)
    assert [body for body, _ in received] == [{"kind": kind}]
    message = received[0][1]
    assert message.delivery_info["exchange"] == f"kombu-{kind}"
    if headers:
        assert message.headers == headers


def test_kombu_direct_reply_to(kombu_conn: Connection) -> None:
    reply_queue = Queue("amq.rabbitmq.reply-to", no_ack=True, no_declare=True)
    replies: list[tuple[Any, Any]] = []
    with Consumer(
        kombu_conn, queues=[reply_queue], callbacks=[lambda b, m: replies.append((b, m))]
    ):
        producer = Producer(kombu_conn)
        producer.publish(
            {"q": 1},
            routing_key="kombu-rpc",
            reply_to="amq.rabbitmq.reply-to",
            correlation_id="c-1",
            declare=[Queue("kombu-rpc", auto_delete=True)],
        )
        request = Queue("kombu-rpc", auto_delete=True)(kombu_conn.default_channel).get(no_ack=True)
        assert request is not None and request.payload == {"q": 1}
        reply_to = request.properties["reply_to"]
        assert reply_to.startswith("amq.rabbitmq.reply-to.")
        Producer(kombu_conn.channel()).publish(
            {"a": 2}, routing_key=reply_to, correlation_id=request.properties["correlation_id"]
        )
        deadline = time.monotonic() + 5
        while not replies:
            assert time.monotonic() < deadline, "no reply"
            with contextlib.suppress(TimeoutError):
                kombu_conn.drain_events(timeout=0.2)
    body, message = replies[0]
    assert body == {"a": 2}
    assert message.properties["correlation_id"] == "c-1"


# -- amqpstorm ---------------------------------------------------------------


def test_amqpstorm_publish_get_consume(roost_broker: RoostBroker) -> None:
    conn = StormConnection("127.0.0.1", "guest", "guest", port=roost_broker.port, heartbeat=60)
    try:
        channel = conn.channel()
        channel.queue.declare("storm", auto_delete=True)
        properties = {"content_type": "text/plain", "headers": {"n": 1}, "message_id": "m1"}
        message = StormMessage.create(channel, "first", properties)
        message.publish("storm")
        got = channel.basic.get("storm", no_ack=False)
        assert isinstance(got, StormMessage)
        assert got.body == "first"
        assert got.content_type == "text/plain"
        assert got.message_id == "m1"
        assert got.properties["headers"] == {"n": 1}
        got.ack()
        assert channel.basic.get("storm") is None

        channel.confirm_deliveries()
        for i in range(3):
            assert StormMessage.create(channel, f"c{i}").publish("storm") is True
        bodies: list[bytes | str | None] = []

        def on_message(msg: StormMessage) -> None:
            bodies.append(msg.body)
            msg.ack()
            if len(bodies) == 3:
                channel.stop_consuming()

        channel.basic.qos(prefetch_count=1)
        channel.basic.consume(on_message, "storm", no_ack=False)
        deadline = time.monotonic() + 5
        while len(bodies) < 3:
            assert time.monotonic() < deadline, "consume stalled"
            channel.process_data_events(to_tuple=False)
            time.sleep(0.005)
        assert bodies == ["c0", "c1", "c2"]
        channel.close()
    finally:
        conn.close()


# -- Celery ------------------------------------------------------------------


def test_celery_task_with_rpc_result_backend(roost_broker: RoostBroker) -> None:
    """A real worker (solo pool, in a thread) runs tasks; results come back
    through the rpc:// backend, which publishes them to the caller's own
    auto-delete result queue named by the task's reply_to."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery("roost_e2e", broker=roost_broker.url, backend="rpc://")
    app.conf.update(
        broker_connection_retry_on_startup=False,
        worker_hijack_root_logger=False,
        task_default_queue="roost-celery",
        # Without AMQP heartbeats the worker's event loop polls with a short
        # timeout, so it notices the shutdown request promptly.
        broker_heartbeat=0,
    )

    @app.task(name="roost_e2e.add")  # type: ignore[untyped-decorator]  # celery is untyped
    def add(x: int, y: int) -> int:
        return x + y

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        results = [add.delay(i, 10) for i in range(3)]
        assert [r.get(timeout=10) for r in results] == [10, 11, 12]
        assert all(r.state == "SUCCESS" for r in results)
