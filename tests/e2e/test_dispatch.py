"""Delivery scheduling: batches, channel-wide credit across queues."""

from __future__ import annotations

import time

import pika

from roost.testing import RoostBroker


def _connect(broker: RoostBroker) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(broker.url))


def test_channel_wide_prefetch_freed_by_one_queue_lets_another_deliver(
    roost_broker: RoostBroker,
) -> None:
    conn = _connect(roost_broker)
    ch = conn.channel()
    for q in ("gp-a", "gp-b"):
        ch.queue_declare(q, auto_delete=True)
    ch.basic_qos(prefetch_count=1, global_qos=True)
    got: list[tuple[str, int]] = []
    ch.basic_consume("gp-a", lambda c, m, p, b: got.append(("gp-a", m.delivery_tag)))
    ch.basic_consume("gp-b", lambda c, m, p, b: got.append(("gp-b", m.delivery_tag)))
    ch.basic_publish("", "gp-a", b"a")
    ch.basic_publish("", "gp-b", b"b")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    conn.process_data_events(time_limit=0.2)
    assert len(got) == 1, "the channel-wide limit of 1 admits one delivery"
    first_queue, tag = got[0]
    ch.basic_ack(tag)
    while len(got) < 2 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert [q for q, _ in got] == [first_queue, "gp-b" if first_queue == "gp-a" else "gp-a"]
    conn.close()


def test_deep_queue_drains_in_order_to_an_unlimited_no_ack_consumer(
    roost_broker: RoostBroker,
) -> None:
    conn = _connect(roost_broker)
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    total = 5000  # several dispatch batches
    for i in range(total):
        ch.basic_publish("", q, str(i).encode())
    bodies: list[bytes] = []
    ch.basic_consume(q, lambda c, m, p, b: bodies.append(b), auto_ack=True)
    deadline = time.monotonic() + 20
    while len(bodies) < total and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert bodies == [str(i).encode() for i in range(total)]
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    conn.close()
