"""x-delivery-limit: poison-message handling as RabbitMQ's quorum queues do
it (roost also accepts it on classic queues, which RabbitMQ 3.10 refuses)."""

from __future__ import annotations

import pika
from pika.adapters.blocking_connection import BlockingChannel

from tests.e2e.queue_features.helpers import (
    count,
    declare_error,
    dlq_setup,
    get,
    unique,
    wait_until,
)


def bounce(ch: BlockingChannel, q: str, times: int) -> list[tuple[bool, object]]:
    """Get and nack(requeue) ``times`` times: [(redelivered, x-delivery-count)]."""
    seen = []
    for _ in range(times):
        m, p, _ = get(ch, q, auto_ack=False)
        seen.append((m.redelivered, (p.headers or {}).get("x-delivery-count")))
        ch.basic_nack(m.delivery_tag, requeue=True)
    return seen


def test_delivery_limit_dead_letters_after_limit_plus_one(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("dl")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-delivery-limit": 2, "x-dead-letter-exchange": dlx}
    )
    ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"app": 1}))
    seen = bounce(ch, q, 3)
    assert [r for r, _ in seen] == [False, True, True]
    # Redeliveries carry the count of earlier deliveries.
    assert [c for _, c in seen[1:]] == [1, 2]
    assert ch.basic_get(q)[0] is None
    assert count(ch, q) == 0
    m, p, body = get(ch, dlq)
    assert body == b"poison"
    assert not m.redelivered
    (death,) = p.headers["x-death"]
    assert (death["reason"], death["queue"], death["count"]) == ("delivery_limit", q, 1)
    assert p.headers["app"] == 1
    # As in RabbitMQ, the dead-lettered copy does not carry the count.
    assert "x-delivery-count" not in p.headers


def test_delivery_limit_without_dlx_drops(ch: BlockingChannel) -> None:
    q = unique("dl")
    ch.queue_declare(q, exclusive=True, arguments={"x-delivery-limit": 0})
    ch.basic_publish("", q, b"once")
    ch.basic_publish("", q, b"other")
    assert bounce(ch, q, 1) == [(False, None)]
    m, _, body = get(ch, q)
    assert (body, m.redelivered) == (b"other", False)
    assert count(ch, q) == 0


def test_ack_within_the_limit_is_normal(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("dl")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-delivery-limit": 1, "x-dead-letter-exchange": dlx}
    )
    ch.basic_publish("", q, b"ok")
    bounce(ch, q, 1)
    m, p, body = get(ch, q, auto_ack=False)
    assert (body, m.redelivered, p.headers["x-delivery-count"]) == (b"ok", True, 1)
    ch.basic_ack(m.delivery_tag)
    assert count(ch, q) == 0
    assert count(ch, dlq) == 0


def test_consumer_redeliveries_count_toward_the_limit(
    conn: pika.BlockingConnection, ch: BlockingChannel
) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("dl")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-delivery-limit": 1, "x-dead-letter-exchange": dlx}
    )
    counts: list[object] = []

    def on_message(c: BlockingChannel, m: object, p: pika.BasicProperties, b: bytes) -> None:
        counts.append((p.headers or {}).get("x-delivery-count"))
        c.basic_nack(m.delivery_tag, requeue=True)  # type: ignore[attr-defined]

    ch.basic_consume(q, on_message)
    ch.basic_publish("", q, b"loop")
    watcher = conn.channel()
    assert wait_until(lambda: (conn.process_data_events(0.01), count(watcher, dlq) == 1)[1])
    _, _, body = get(watcher, dlq)
    assert body == b"loop"
    assert counts == [None, 1]


def test_quorum_queue_default_limit_is_20(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("qq")
    ch.queue_declare(
        q, durable=True, arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": dlx}
    )
    try:
        ch.basic_publish("", q, b"q")
        seen = bounce(ch, q, 21)
        assert seen[-1] == (True, 20)
        assert ch.basic_get(q)[0] is None
        _, p, body = get(ch, dlq)
        assert body == b"q"
        assert p.headers["x-death"][0]["reason"] == "delivery_limit"
    finally:
        ch.queue_delete(q)


def test_stream_queues_are_refused(conn: pika.BlockingConnection) -> None:
    name = unique("stream")
    text = declare_error(conn, name, {"x-queue-type": "stream"}, durable=True)
    assert text.startswith("406 PRECONDITION_FAILED - ")
    assert f"'x-queue-type' for queue '{name}'" in text
