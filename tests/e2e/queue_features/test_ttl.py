"""Message TTL (x-message-ttl, the expiration property) and queue expiry
(x-expires), checked against RabbitMQ 3.10's behaviour."""

from __future__ import annotations

import datetime
from pathlib import Path

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from roost.testing import RoostBroker, RoostProcess
from tests.e2e.queue_features.helpers import count, dlq_setup, get, unique, wait_until


def test_queue_ttl_expires_and_dead_letters(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": dlx}
    )
    ch.basic_publish("", q, b"short-lived", pika.BasicProperties(headers={"CC": ["cc1"]}))
    m, p, body = get(ch, dlq)
    assert body == b"short-lived"
    assert count(ch, q) == 0
    assert ch.basic_get(q)[0] is None
    assert m.exchange == dlx and m.routing_key == q
    assert not m.redelivered
    (death,) = p.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["exchange"] == ""
    assert death["count"] == 1
    assert death["routing-keys"] == [q, "cc1"]
    assert isinstance(death["time"], datetime.datetime)
    assert "original-expiration" not in death  # only a per-message TTL is recorded
    assert p.headers["x-first-death-reason"] == "expired"
    assert p.headers["x-first-death-queue"] == q
    assert p.headers["x-first-death-exchange"] == ""


def test_message_expiration_is_recorded_and_removed(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"m", pika.BasicProperties(expiration="40", delivery_mode=2))
    _, p, body = get(ch, dlq)
    assert body == b"m"
    assert p.expiration is None  # RabbitMQ strips it so the copy does not expire again
    assert p.delivery_mode == 2
    (death,) = p.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["original-expiration"] == "40"


@pytest.mark.parametrize(("queue_ttl", "expiration"), [(60_000, "30"), (30, "60000")])
def test_effective_ttl_is_the_smaller_one(
    ch: BlockingChannel, queue_ttl: int, expiration: str
) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-message-ttl": queue_ttl, "x-dead-letter-exchange": dlx}
    )
    ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
    _, _, body = get(ch, dlq, timeout=5)
    assert body == b"x"
    assert count(ch, q) == 0


def test_unexpired_messages_stay(ch: BlockingChannel) -> None:
    q = unique("ttl")
    ch.queue_declare(q, exclusive=True, arguments={"x-message-ttl": 60_000})
    ch.basic_publish("", q, b"keep", pika.BasicProperties(expiration="60000"))
    _m, p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"keep"
    # A delivered message keeps its expiration property.
    assert p.expiration == "60000"


def test_expired_message_is_never_delivered_to_a_consumer(
    conn: pika.BlockingConnection, ch: BlockingChannel
) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_qos(prefetch_count=1)
    got: list[tuple[bytes, int]] = []
    ch.basic_consume(q, lambda c, m, p, b: got.append((b, m.delivery_tag)))
    ch.basic_publish("", q, b"first")
    ch.basic_publish("", q, b"doomed", pika.BasicProperties(expiration="30"))
    ch.basic_publish("", q, b"last")
    assert wait_until(lambda: (conn.process_data_events(0.01), bool(got))[1])
    assert got[0][0] == b"first"
    # While the consumer holds "first", "doomed" expires at the head.
    checker = conn.channel()
    _, _, body = get(checker, dlq)
    assert body == b"doomed"
    ch.basic_ack(got[0][1])
    assert wait_until(lambda: (conn.process_data_events(0.01), len(got) >= 2)[1])
    conn.process_data_events(0.1)
    assert [b for b, _ in got] == [b"first", b"last"]


def test_ttl_zero_without_a_consumer_expires(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl0")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-message-ttl": 0, "x-dead-letter-exchange": dlx}
    )
    ch.basic_publish("", q, b"now-or-never")
    _, p, body = get(ch, dlq)
    assert body == b"now-or-never"
    assert p.headers["x-death"][0]["reason"] == "expired"
    assert ch.basic_get(q)[0] is None


def test_ttl_zero_expiration_without_a_consumer_expires(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl0")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"gone", pika.BasicProperties(expiration="0"))
    _, p, body = get(ch, dlq)
    assert body == b"gone"
    assert p.headers["x-death"][0]["original-expiration"] == "0"
    assert count(ch, q) == 0


def test_ttl_zero_is_delivered_to_a_waiting_consumer(
    conn: pika.BlockingConnection, ch: BlockingChannel
) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("ttl0")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-message-ttl": 0, "x-dead-letter-exchange": dlx}
    )
    got: list[bytes] = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    publisher = conn.channel()
    for i in range(5):
        publisher.basic_publish("", q, b"%d" % i)
    assert wait_until(lambda: (conn.process_data_events(0.01), len(got) == 5)[1])
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert publisher.basic_get(dlq)[0] is None


@pytest.mark.parametrize(
    ("expiration", "detail"),
    [
        ("abc", "no_integer"),
        ("", "no_integer"),
        (" 5", "no_integer"),
        ("-", "no_integer"),
        ("+", "no_integer"),
        ("\u0663", "no_integer"),  # a non-ASCII digit is no integer for Erlang
        ("-1", "{value_negative,-1}"),
        ("10x", '{leftover_string,"x"}'),
        ("5 ", '{leftover_string," "}'),
        ("1.5", '{leftover_string,".5"}'),
        ("1e3", '{leftover_string,"e3"}'),
    ],
)
def test_bad_expiration_closes_the_channel(
    conn: pika.BlockingConnection, expiration: str, detail: str
) -> None:
    c = conn.channel()
    q = c.queue_declare("", exclusive=True).method.queue
    with pytest.raises(ChannelClosedByBroker) as err:
        c.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
        c.basic_get(q)  # a round trip, so the close arrives
    assert err.value.reply_code == 406
    assert (
        err.value.reply_text == f"PRECONDITION_FAILED - invalid expiration '{expiration}': {detail}"
    )
    assert conn.is_open


@pytest.mark.parametrize(
    ("expiration", "kept"), [("+5000", True), ("4294967296", True), ("00", False), ("-0", False)]
)
def test_unusual_but_valid_expirations_are_accepted(
    ch: BlockingChannel, expiration: str, kept: bool
) -> None:
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
    if kept:
        _, p, body = get(ch, q)
        assert (body, p.expiration) == (b"x", expiration)
    else:  # a TTL of 0 with no consumer waiting: expired on arrival
        assert wait_until(lambda: count(ch, q) == 0)
    assert ch.is_open


def test_x_expires_deletes_an_unused_queue(roost_broker: RoostBroker, ch: BlockingChannel) -> None:
    q = unique("exp")
    ch.queue_declare(q, arguments={"x-expires": 100})
    vhost = roost_broker.server.broker.vhosts["/"]  # type: ignore[union-attr]
    assert roost_broker.call(lambda: q in vhost.queues)
    assert wait_until(lambda: not roost_broker.call(lambda: q in vhost.queues))
    with pytest.raises(ChannelClosedByBroker) as err:
        ch.queue_declare(q, passive=True)
    assert err.value.reply_code == 404


def test_x_expires_spares_a_queue_with_a_consumer(
    roost_broker: RoostBroker, conn: pika.BlockingConnection, ch: BlockingChannel
) -> None:
    q = unique("exp")
    ch.queue_declare(q, arguments={"x-expires": 100})
    tag = ch.basic_consume(q, lambda *a: None)
    conn.process_data_events(0.4)  # well past x-expires
    assert count(conn.channel(), q) == 0  # still there
    ch.basic_cancel(tag)
    vhost = roost_broker.server.broker.vhosts["/"]  # type: ignore[union-attr]
    # Unused again: it goes x-expires after the cancel.
    assert wait_until(lambda: not roost_broker.call(lambda: q in vhost.queues))


def test_queue_ttl_survives_a_restart(tmp_path: Path) -> None:
    with RoostProcess(tmp_path / "data") as proc:
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        ch.exchange_declare("dlx", "fanout", durable=True)
        ch.queue_declare("dlq", durable=True)
        ch.queue_bind("dlq", "dlx")
        ch.queue_declare(
            "src", durable=True, arguments={"x-message-ttl": 400, "x-dead-letter-exchange": "dlx"}
        )
        ch.confirm_delivery()
        ch.basic_publish("", "src", b"persisted", pika.BasicProperties(delivery_mode=2))
        c.close()
        proc.kill()
        proc.start()
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        # Nobody touches "src": its TTL timer alone must dead-letter the message.
        assert wait_until(lambda: count(ch, "dlq") == 1)
        _, p, body = get(ch, "dlq")
        assert body == b"persisted"
        assert p.headers["x-death"][0]["reason"] == "expired"
        assert count(ch, "src") == 0
        c.close()
