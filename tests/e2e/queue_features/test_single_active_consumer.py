"""x-single-active-consumer: one consumer gets everything; the next
registered one takes over when it goes."""

from __future__ import annotations

import time
from typing import Any, cast

import pika
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker
from tests.e2e.queue_features.helpers import declare_error, unique

Log = list[tuple[str, bytes]]


def consumer(ch: BlockingChannel, q: str, name: str, log: Log, ack: bool = True) -> str:
    def on_message(c: BlockingChannel, m: Any, p: pika.BasicProperties, b: bytes) -> None:
        log.append((name, b))
        if ack:
            c.basic_ack(m.delivery_tag)

    return cast(str, ch.basic_consume(q, on_message))


def pump(conn: pika.BlockingConnection, cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.process_data_events(0.01)
        if cond():
            return True
    return bool(cond())


def sac_queue(ch: BlockingChannel) -> str:
    q = unique("sac")
    ch.queue_declare(q, exclusive=True, arguments={"x-single-active-consumer": True})
    return q


def test_only_the_first_consumer_receives(conn: pika.BlockingConnection) -> None:
    pub = conn.channel()
    q = sac_queue(pub)
    log: Log = []
    consumer(conn.channel(), q, "a", log)
    consumer(conn.channel(), q, "b", log)
    for i in range(6):
        pub.basic_publish("", q, b"%d" % i)
    assert pump(conn, lambda: len(log) == 6)
    conn.process_data_events(0.1)
    assert log == [("a", b"%d" % i) for i in range(6)]


def test_cancel_hands_over_to_the_next(conn: pika.BlockingConnection) -> None:
    pub = conn.channel()
    q = sac_queue(pub)
    log: Log = []
    ch_a = conn.channel()
    tag_a = consumer(ch_a, q, "a", log)
    consumer(conn.channel(), q, "b", log)
    consumer(conn.channel(), q, "c", log)
    pub.basic_publish("", q, b"1")
    assert pump(conn, lambda: len(log) == 1)
    ch_a.basic_cancel(tag_a)
    pub.basic_publish("", q, b"2")
    pub.basic_publish("", q, b"3")
    assert pump(conn, lambda: len(log) == 3)
    assert log == [("a", b"1"), ("b", b"2"), ("b", b"3")]


def test_channel_close_hands_over_with_unacked_messages(conn: pika.BlockingConnection) -> None:
    pub = conn.channel()
    q = sac_queue(pub)
    log: Log = []
    ch_a = conn.channel()
    consumer(ch_a, q, "a", log, ack=False)  # holds its messages unacked
    consumer(conn.channel(), q, "b", log)
    for i in range(3):
        pub.basic_publish("", q, b"%d" % i)
    assert pump(conn, lambda: len(log) == 3)
    assert {n for n, _ in log} == {"a"}
    ch_a.close()
    # The unacked messages come back, redelivered to the new active consumer.
    assert pump(conn, lambda: len(log) == 6)
    assert log[3:] == [("b", b"0"), ("b", b"1"), ("b", b"2")]


def test_inactive_consumers_wait(roost_broker: RoostBroker, conn: pika.BlockingConnection) -> None:
    pub = conn.channel()
    q = sac_queue(pub)
    log: Log = []
    consumer(conn.channel(), q, "a", log, ack=False)
    consumer(conn.channel(), q, "b", log)
    vhost = roost_broker.server.broker.vhosts["/"]  # type: ignore[union-attr]
    assert roost_broker.call(lambda: vhost.queues[q].consumer_count) == 2
    assert pub.queue_declare(q, passive=True).method.consumer_count == 2
    pub.basic_publish("", q, b"x")
    assert pump(conn, lambda: len(log) == 1)
    conn.process_data_events(0.1)
    assert log == [("a", b"x")]


def test_bad_type_is_refused(conn: pika.BlockingConnection) -> None:
    name = unique("sac")
    assert declare_error(conn, name, {"x-single-active-consumer": "yes"}) == (
        f"406 PRECONDITION_FAILED - invalid arg 'x-single-active-consumer' for queue '{name}' "
        "in vhost '/': {unacceptable_type,longstr}"
    )
