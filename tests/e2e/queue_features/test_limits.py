"""Length limits (x-max-length, x-max-length-bytes) and the overflow modes
drop-head, reject-publish and reject-publish-dlx, as in RabbitMQ 3.10."""

from __future__ import annotations

from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import NackError

from roost.testing import RoostBroker
from tests.e2e.queue_features.helpers import count, dlq_setup, drain, get, unique


def limited(ch: BlockingChannel, **arguments: Any) -> str:
    q = unique("lim")
    args = {"x-" + k.replace("_", "-"): v for k, v in arguments.items()}
    ch.queue_declare(q, exclusive=True, arguments=args)
    return q


def test_drop_head_dead_letters_the_oldest(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length=2, dead_letter_exchange=dlx)
    for i in range(4):
        ch.basic_publish("", q, b"m%d" % i)
    assert drain(ch, q) == [b"m2", b"m3"]
    dropped = []
    for _ in range(2):
        m, p, body = get(ch, dlq)
        (death,) = p.headers["x-death"]
        assert (death["reason"], death["queue"], m.routing_key) == ("maxlen", q, q)
        dropped.append(body)
    assert dropped == [b"m0", b"m1"]


def test_drop_head_by_bytes(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length_bytes=10, dead_letter_exchange=dlx)
    for body in (b"aaaa", b"bbbb", b"cccc"):  # 12 bytes: "aaaa" must go
        ch.basic_publish("", q, body)
    assert drain(ch, q) == [b"bbbb", b"cccc"]
    _, p, body = get(ch, dlq)
    assert body == b"aaaa"
    assert p.headers["x-death"][0]["reason"] == "maxlen"


def test_max_length_zero_drops_every_message(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length=0, dead_letter_exchange=dlx)
    ch.basic_publish("", q, b"zero")
    _, p, body = get(ch, dlq)
    assert body == b"zero"
    assert p.headers["x-death"][0]["reason"] == "maxlen"
    assert count(ch, q) == 0


def test_drop_head_without_dlx_just_drops(ch: BlockingChannel) -> None:
    q = limited(ch, max_length=1)
    ch.basic_publish("", q, b"old")
    ch.basic_publish("", q, b"new")
    assert drain(ch, q) == [b"new"]


def test_reject_publish_nacks_and_does_not_enqueue(ch: BlockingChannel) -> None:
    q = limited(ch, max_length=2, overflow="reject-publish")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"3")
    # The channel goes on; later publishes are confirmed again once there is room.
    assert drain(ch, q) == [b"1", b"2"]
    ch.basic_publish("", q, b"4")
    assert drain(ch, q) == [b"4"]


def test_reject_publish_by_bytes(ch: BlockingChannel) -> None:
    q = limited(ch, max_length_bytes=5, overflow="reject-publish")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"12345")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"6")
    assert drain(ch, q) == [b"12345"]


def test_reject_publish_does_not_dead_letter(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length=1, overflow="reject-publish", dead_letter_exchange=dlx)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"in")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"out")
    assert count(ch, dlq) == 0
    assert drain(ch, q) == [b"in"]


def test_reject_publish_dlx_nacks_and_dead_letters(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length=1, overflow="reject-publish-dlx", dead_letter_exchange=dlx)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"k1")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"k2")
    _m, p, body = get(ch, dlq)
    assert body == b"k2"
    (death,) = p.headers["x-death"]
    assert (death["reason"], death["queue"], death["routing-keys"]) == ("maxlen", q, [q])
    assert drain(ch, q) == [b"k1"]


def test_one_refusing_queue_nacks_but_others_still_get_it(ch: BlockingChannel) -> None:
    ex = unique("fan")
    ch.exchange_declare(ex, "fanout", auto_delete=True)
    full = limited(ch, max_length=0, overflow="reject-publish")
    free = limited(ch)
    ch.queue_bind(full, ex)
    ch.queue_bind(free, ex)
    ch.confirm_delivery()
    with pytest.raises(NackError):
        ch.basic_publish(ex, "", b"both")
    assert drain(ch, free) == [b"both"]
    assert count(ch, full) == 0


def test_limits_count_only_ready_messages(ch: BlockingChannel) -> None:
    q = limited(ch, max_length=2, overflow="reject-publish")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    m, _, body = ch.basic_get(q)  # unacked: no longer counted
    assert body == b"1"
    ch.basic_publish("", q, b"3")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"4")
    ch.basic_ack(m.delivery_tag)
    assert drain(ch, q) == [b"2", b"3"]


def test_drop_head_counts_only_ready_messages(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = limited(ch, max_length=1, dead_letter_exchange=dlx)
    ch.basic_publish("", q, b"held")
    m, _, _ = ch.basic_get(q)
    ch.basic_publish("", q, b"next")  # "held" is unacked: room for one more
    assert count(ch, dlq) == 0
    # Requeued, "held" goes back to the head and over the limit: RabbitMQ
    # then drops the head, i.e. "held" itself.
    ch.basic_nack(m.delivery_tag, requeue=True)
    _, p, body = get(ch, dlq)
    assert body == b"held"
    assert p.headers["x-death"][0]["reason"] == "maxlen"
    assert drain(ch, q) == [b"next"]


def test_reject_publish_lets_requeued_messages_exceed_the_limit(ch: BlockingChannel) -> None:
    q = limited(ch, max_length=1, overflow="reject-publish")
    ch.basic_publish("", q, b"held")
    m, _, _ = ch.basic_get(q)
    ch.basic_publish("", q, b"next")
    ch.basic_nack(m.delivery_tag, requeue=True)
    assert count(ch, q) == 2
    assert drain(ch, q) == [b"held", b"next"]


async def test_reject_publish_nack_aio_pika(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        q = await ch.declare_queue(
            exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await ch.default_exchange.publish(aio_pika.Message(b"a"), routing_key=q.name)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await ch.default_exchange.publish(aio_pika.Message(b"b"), routing_key=q.name)
        msg = await q.get(no_ack=True)
        assert msg.body == b"a"
        assert await q.get(fail=False) is None
