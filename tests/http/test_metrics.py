"""Prometheus metrics (roost.http.metrics) after real AMQP traffic, parsed
with prometheus_client's parser; names and labels as RabbitMQ's
rabbitmq_prometheus plugin (per-object queue metrics)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from roost.http.metrics import render
from roost.testing import RoostBroker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def scrape(broker: RoostBroker) -> tuple[Samples, dict[str, str]]:
    server = broker.server
    assert server is not None
    return parse(broker.call(lambda: render(server.broker)))


def q(name: str, vhost: str = "/") -> tuple[tuple[str, str], ...]:
    return (("queue", name), ("vhost", vhost))


def wait_for(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def channel(
    roost_broker: RoostBroker,
) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def test_queue_metrics_after_publishing(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("m1")
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish("", "m1", b"x" * (i + 1))
    samples, types = scrape(roost_broker)
    assert samples[("rabbitmq_queue_messages_ready", q("m1"))] == 5
    assert samples[("rabbitmq_queue_messages_unacked", q("m1"))] == 0
    assert samples[("rabbitmq_queue_messages", q("m1"))] == 5
    assert samples[("rabbitmq_queue_messages_ready_bytes", q("m1"))] == 15
    assert samples[("rabbitmq_queue_consumers", q("m1"))] == 0
    assert samples[("rabbitmq_queue_messages_published_total", q("m1"))] == 5
    assert types["rabbitmq_queue_messages_published"] == "counter"
    assert types["rabbitmq_queue_messages_ready"] == "gauge"
    assert samples[("rabbitmq_global_messages_received_total", ())] == 5
    assert samples[("rabbitmq_global_messages_confirmed_total", ())] == 5
    assert samples[("rabbitmq_queues", ())] == 1
    assert samples[("rabbitmq_connections", ())] == 1
    assert samples[("rabbitmq_channels", ())] == 1
    assert (
        samples[("roost_exchange_messages_published_in_total", (("exchange", ""), ("vhost", "/")))]
        == 5
    )


def test_delivery_ack_redeliver_and_unacked(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("m2")
    for _ in range(3):
        channel.basic_publish("", "m2", b"body")
    first, _, _ = channel.basic_get("m2")
    second, _, _ = channel.basic_get("m2")
    assert first is not None and second is not None
    channel.basic_ack(first.delivery_tag)
    channel.basic_nack(second.delivery_tag, requeue=True)
    again, _, _ = channel.basic_get("m2")
    assert again is not None and again.redelivered
    samples, _ = scrape(roost_broker)
    assert samples[("rabbitmq_queue_messages_ready", q("m2"))] == 1
    assert samples[("rabbitmq_queue_messages_unacked", q("m2"))] == 1
    assert samples[("rabbitmq_queue_messages", q("m2"))] == 2
    assert samples[("rabbitmq_global_messages_delivered_total", ())] == 3
    assert samples[("rabbitmq_global_messages_acknowledged_total", ())] == 1
    assert samples[("rabbitmq_global_messages_redelivered_total", ())] == 1
    assert samples[("roost_queue_messages_redelivered_total", q("m2"))] == 1


def test_consumers_and_unroutable(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("m3")
    channel.basic_consume("m3", lambda *a: None)
    channel.basic_publish("amq.direct", "nowhere", b"dropped")
    returned: list[bytes] = []
    channel.add_on_return_callback(lambda ch, method, props, body: returned.append(body))
    channel.basic_publish("amq.direct", "nowhere", b"back", mandatory=True)
    channel.basic_get("m3")  # an empty get (the consumer has nothing either)
    wait_for(lambda: (channel.connection.process_data_events(0), bool(returned))[1])
    assert returned == [b"back"]
    samples, _ = scrape(roost_broker)
    assert samples[("rabbitmq_queue_consumers", q("m3"))] == 1
    assert samples[("rabbitmq_consumers", ())] == 1
    assert samples[("rabbitmq_global_messages_unroutable_dropped_total", ())] == 1
    assert samples[("rabbitmq_global_messages_unroutable_returned_total", ())] == 1
    assert samples[("rabbitmq_global_messages_get_empty_total", ())] == 1
    assert samples[("rabbitmq_global_messages_received_total", ())] == 2


def test_dead_lettered_by_reason(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("dlq")
    channel.queue_declare(
        "m4",
        arguments={
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dlq",
            "x-message-ttl": 0,
        },
    )
    channel.queue_declare("ttl-no-dlx", arguments={"x-message-ttl": 0})
    channel.basic_publish("", "m4", b"a")
    channel.basic_publish("", "ttl-no-dlx", b"b")
    wait_for(lambda: channel.queue_declare("dlq", passive=True).method.message_count == 1)
    samples, _ = scrape(roost_broker)
    expired = "rabbitmq_global_messages_dead_lettered_expired_total"
    classic = ("queue_type", "rabbit_classic_queue")
    assert samples[(expired, (("dead_letter_strategy", "at_most_once"), classic))] == 1
    assert samples[(expired, (("dead_letter_strategy", "disabled"), classic))] == 1
    rejected = "rabbitmq_global_messages_dead_lettered_rejected_total"
    assert samples[(rejected, (("dead_letter_strategy", "at_most_once"), classic))] == 0
    assert samples[("rabbitmq_queue_messages_ready", q("dlq"))] == 1


def test_store_and_loop_metrics(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("durable-m", durable=True)
    channel.confirm_delivery()
    channel.basic_publish(
        "", "durable-m", b"p" * 1000, pika.BasicProperties(delivery_mode=2)
    )  # confirmed once fsync'd
    samples, types = scrape(roost_broker)
    assert types["roost_store_fsync_seconds"] == "histogram"
    assert samples[("roost_store_fsync_seconds_count", ())] >= 1
    assert (
        samples[("roost_store_fsync_seconds_bucket", (("le", "+Inf"),))]
        == samples[("roost_store_fsync_seconds_count", ())]
    )
    assert samples[("roost_store_bytes", ())] >= 1000
    assert samples[("roost_event_loop_lag_seconds", ())] >= 0
    assert samples[("roost_alarms", (("alarm", "disk"),))] == 0
    assert samples[("roost_alarms", (("alarm", "memory"),))] == 0


def test_alarm_shows(roost_broker: RoostBroker) -> None:
    server = roost_broker.server
    assert server is not None
    roost_broker.call(lambda: server.broker.set_alarm("memory"))
    samples, _ = scrape(roost_broker)
    assert samples[("roost_alarms", (("alarm", "memory"),))] == 1
    assert samples[("rabbitmq_alarms_memory_used_watermark", ())] == 1
    assert samples[("rabbitmq_alarms_free_disk_space_watermark", ())] == 0


def test_labels_are_escaped(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    name = 'we"ird\\queue'
    channel.queue_declare(name)
    channel.confirm_delivery()  # published once basic_publish returns
    channel.basic_publish("", name, b"x")
    samples, _ = scrape(roost_broker)
    assert samples[("rabbitmq_queue_messages_ready", q(name))] == 1


def test_metrics_over_http(
    roost_broker: RoostBroker, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare("m-http")
    channel.confirm_delivery()  # published once basic_publish returns
    for _ in range(2):
        channel.basic_publish("", "m-http", b"x")
    samples = http_scrape(roost_broker.http_url + "/metrics/per-object")
    assert samples[("rabbitmq_queue_messages_ready", q("m-http"))] == 2


def http_scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(resp.read().decode())[0]
