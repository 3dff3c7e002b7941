"""Priority queues (x-max-priority), as RabbitMQ 3.10's classic queues order them."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker, RoostProcess
from tests.e2e.queue_features.helpers import declare_error, drain, get, unique


def publish_all(ch: BlockingChannel, q: str, items: list[tuple[bytes, int | None]]) -> None:
    for body, prio in items:
        ch.basic_publish("", q, body, pika.BasicProperties(priority=prio))


@pytest.mark.parametrize("max_priority", [1, 10, 255])
def test_max_priority_range_is_accepted(ch: BlockingChannel, max_priority: int) -> None:
    q = unique("prio")
    ch.queue_declare(q, exclusive=True, arguments={"x-max-priority": max_priority})
    publish_all(ch, q, [(b"low", 0), (b"high", max_priority)])
    assert drain(ch, q) == [b"high", b"low"]


def test_max_priority_validation(conn: pika.BlockingConnection) -> None:
    name = unique("prio")
    assert declare_error(conn, name, {"x-max-priority": 256}) == (
        f"406 PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{name}' "
        "in vhost '/': {max_value_exceeded,256}"
    )
    # 0 is accepted and means "no priorities".
    ch = conn.channel()
    ch.queue_declare(name, exclusive=True, arguments={"x-max-priority": 0})
    publish_all(ch, name, [(b"a", 0), (b"b", 9)])
    assert drain(ch, name) == [b"a", b"b"]


def test_higher_priority_first_fifo_within_a_priority(ch: BlockingChannel) -> None:
    q = unique("prio")
    ch.queue_declare(q, exclusive=True, arguments={"x-max-priority": 5})
    publish_all(
        ch,
        q,
        [
            (b"p1-a", 1),
            (b"none-a", None),
            (b"p5-a", 5),
            (b"p3-a", 3),
            (b"p1-b", 1),
            (b"p0-a", 0),
            (b"p5-b", 5),
            (b"none-b", None),
            (b"p3-b", 3),
        ],
    )
    assert drain(ch, q) == [
        b"p5-a",
        b"p5-b",
        b"p3-a",
        b"p3-b",
        b"p1-a",
        b"p1-b",
        # No priority property counts as 0, FIFO with explicit 0s.
        b"none-a",
        b"p0-a",
        b"none-b",
    ]


def test_priority_above_max_is_treated_as_max(ch: BlockingChannel) -> None:
    q = unique("prio")
    ch.queue_declare(q, exclusive=True, arguments={"x-max-priority": 3})
    publish_all(ch, q, [(b"three", 3), (b"nine", 9), (b"two", 2), (b"255", 255)])
    # 9 and 255 rank as 3: FIFO with the earlier 3, ahead of 2.
    assert drain(ch, q) == [b"three", b"nine", b"255", b"two"]
    # The property itself is delivered unchanged.
    ch.basic_publish("", q, b"x", pika.BasicProperties(priority=9))
    _, p, _ = get(ch, q)
    assert p.priority == 9


def test_non_priority_queue_ignores_the_property(ch: BlockingChannel) -> None:
    q = unique("fifo")
    ch.queue_declare(q, exclusive=True)
    publish_all(ch, q, [(b"a", 1), (b"b", 9), (b"c", None), (b"d", 5)])
    assert drain(ch, q) == [b"a", b"b", b"c", b"d"]


def test_requeue_returns_to_its_place(ch: BlockingChannel) -> None:
    q = unique("prio")
    ch.queue_declare(q, exclusive=True, arguments={"x-max-priority": 9})
    publish_all(ch, q, [(b"h1", 9), (b"h2", 9), (b"l1", 1), (b"l2", 1)])
    m1, _, b1 = ch.basic_get(q)
    m2, _, b2 = ch.basic_get(q)
    assert (b1, b2) == (b"h1", b"h2")
    ch.basic_publish("", q, b"h3", pika.BasicProperties(priority=9))
    ch.basic_nack(m2.delivery_tag, requeue=True)
    ch.basic_nack(m1.delivery_tag, requeue=True)
    got = []
    for _ in range(5):
        m, _, body = ch.basic_get(q, auto_ack=True)
        got.append((body, m.redelivered))
    assert got == [
        (b"h1", True),
        (b"h2", True),
        (b"h3", False),
        (b"l1", False),
        (b"l2", False),
    ]


async def test_consumer_gets_priority_order_aio_pika(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(exclusive=True, arguments={"x-max-priority": 10})
        for body, prio in [(b"1", 1), (b"10", 10), (b"5", 5), (b"0", 0), (b"5b", 5)]:
            await ch.default_exchange.publish(
                aio_pika.Message(body, priority=prio), routing_key=q.name
            )
        got = []
        async with q.iterator() as it:
            async for msg in it:
                async with msg.process():
                    got.append(msg.body)
                if len(got) == 5:
                    break
        assert got == [b"10", b"5", b"5b", b"1", b"0"]


def test_durable_priority_queue_keeps_order_across_restart(tmp_path: Path) -> None:
    proc = RoostProcess(tmp_path / "data")
    try:
        proc.start()
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        ch.queue_declare("prio", durable=True, arguments={"x-max-priority": 5})
        ch.confirm_delivery()
        for body, prio in [(b"a1", 1), (b"b5", 5), (b"c0", 0), (b"d5", 5), (b"e1", 1)]:
            ch.basic_publish("", "prio", body, pika.BasicProperties(priority=prio, delivery_mode=2))
        c.close()
        proc.kill()
        proc.start()
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        assert drain(ch, "prio") == [b"b5", b"d5", b"a1", b"e1", b"c0"]
        c.close()
    finally:
        proc.close()
