"""Queues end to end, over real sockets with pika, aio-pika and kombu.

Reply codes and texts are RabbitMQ 3.10's, checked against a real broker.
Integer arguments sent by pika (and py-amqp/kombu) travel as 'signedint'.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import aio_pika
import aiormq
import aiormq.exceptions
import amqp.exceptions
import kombu.connection
import kombu.entity
import pika
import pytest
from pamqp import commands as C
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from roost.testing import RoostBroker
from tests.conftest import RawClient

LOCKED = (
    "405 RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{}' in vhost '/'. "
    "It could be originally declared on another connection or the exclusive property value "
    "does not match that of the original declaration."
)

# -- helpers ----------------------------------------------------------------


def connect(broker: RoostBroker) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(broker.url))


@pytest.fixture
def conn(roost_broker: RoostBroker) -> Iterator[pika.BlockingConnection]:
    c = connect(roost_broker)
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def other(roost_broker: RoostBroker) -> Iterator[pika.BlockingConnection]:
    c = connect(roost_broker)
    yield c
    if c.is_open:
        c.close()


def channel_error(conn: pika.BlockingConnection, fn: Callable[[BlockingChannel], Any]) -> str:
    """Run ``fn`` on a fresh channel, expect the broker to close that channel,
    and return "code text". The connection must survive."""
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        fn(c)
    assert conn.is_open
    return f"{err.value.reply_code} {err.value.reply_text}"


def counts(conn: pika.BlockingConnection, queue: str) -> tuple[int, int]:
    ok = conn.channel().queue_declare(queue, passive=True).method
    return ok.message_count, ok.consumer_count


def queue_exists(broker: RoostBroker, name: str) -> bool:
    return broker.call(lambda: name in broker.server.broker.vhosts["/"].queues)  # type: ignore[union-attr]


def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def publish(ch: BlockingChannel, queue: str, *bodies: bytes) -> None:
    for body in bodies:
        ch.basic_publish("", queue, body)


# -- declare ----------------------------------------------------------------


def test_declare_returns_name_and_counts(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ok = ch.queue_declare("q1").method
    assert (ok.queue, ok.message_count, ok.consumer_count) == ("q1", 0, 0)
    publish(ch, "q1", b"a", b"b")
    ok = ch.queue_declare("q1").method
    assert (ok.queue, ok.message_count, ok.consumer_count) == ("q1", 2, 0)


def test_passive_declare_missing_is_404(conn: pika.BlockingConnection) -> None:
    assert channel_error(conn, lambda c: c.queue_declare("nope", passive=True)) == (
        "404 NOT_FOUND - no queue 'nope' in vhost '/'"
    )


def test_passive_declare_reports_ready_messages_and_consumers(
    conn: pika.BlockingConnection, other: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    publish(ch, "q", b"1", b"2", b"3")
    assert counts(conn, "q") == (3, 0)
    consumer = other.channel()
    consumer.basic_qos(prefetch_count=1)
    consumer.basic_consume("q", lambda *a: None)
    # One message is out with the consumer (unacked), two are ready.
    assert wait_until(lambda: counts(conn, "q") == (2, 1))
    # Passive declare ignores the flags it is sent.
    ok = conn.channel().queue_declare("q", passive=True, durable=True, auto_delete=True)
    assert ok.method.consumer_count == 1


def test_server_named_queues(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    names = {ch.queue_declare("", exclusive=True).method.queue for _ in range(5)}
    assert len(names) == 5
    for name in names:
        assert name.startswith("amq.gen-")
        assert len(name) == len("amq.gen-") + 22
        publish(ch, name, b"x")
        assert counts(conn, name) == (1, 0)
    # Redeclaring one by its name is refused (the prefix is reserved); a
    # passive declare finds it.
    name = sorted(names)[0]
    assert channel_error(conn, lambda c: c.queue_declare(name)) == (
        f"403 ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"
    )
    assert counts(conn, name) == (1, 0)


def test_amq_prefix_is_reserved(conn: pika.BlockingConnection) -> None:
    assert channel_error(conn, lambda c: c.queue_declare("amq.mine")) == (
        "403 ACCESS_REFUSED - queue name 'amq.mine' contains reserved prefix 'amq.*'"
    )
    assert channel_error(conn, lambda c: c.queue_declare("amq.mine", passive=True)) == (
        "404 NOT_FOUND - no queue 'amq.mine' in vhost '/'"
    )


def test_flags_are_kept(roost_broker: RoostBroker, conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("d", durable=True)
    ch.queue_declare("e", exclusive=True)
    ch.queue_declare("a", auto_delete=True)
    # An exclusive queue is never durable, as in RabbitMQ.
    ch.queue_declare("ed", exclusive=True, durable=True)
    vhost = roost_broker.server.broker.vhosts["/"]  # type: ignore[union-attr]
    flags = roost_broker.call(
        lambda: {
            n: (vhost.queues[n].durable, vhost.queues[n].exclusive, vhost.queues[n].auto_delete)
            for n in ("d", "e", "a", "ed")
        }
    )
    assert flags == {
        "d": (True, False, False),
        "e": (False, True, False),
        "a": (False, False, True),
        "ed": (False, True, False),
    }
    # Hence redeclaring it with either durable flag is fine.
    ch.queue_declare("ed", exclusive=True, durable=False)
    ch.queue_declare("ed", exclusive=True, durable=True)


# -- redeclare equivalence ------------------------------------------------------


def _inequivalent(arg: str, clause: str) -> str:
    return (
        f"406 PRECONDITION_FAILED - inequivalent arg '{arg}' for queue 'q' in vhost '/': {clause}"
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (
            {},
            {"durable": True},
            _inequivalent("durable", "received 'true' but current is 'false'"),
        ),
        (
            {"durable": True},
            {},
            _inequivalent("durable", "received 'false' but current is 'true'"),
        ),
        (
            {},
            {"auto_delete": True},
            _inequivalent("auto_delete", "received 'true' but current is 'false'"),
        ),
        ({}, {"exclusive": True}, LOCKED.format("q")),
        ({"exclusive": True}, {}, LOCKED.format("q")),
        # exclusivity is checked before the other flags
        ({}, {"exclusive": True, "durable": True, "auto_delete": True}, LOCKED.format("q")),
        (
            {"arguments": {"x-message-ttl": 10000}},
            {"arguments": {"x-message-ttl": 20000}},
            _inequivalent("x-message-ttl", "received '20000' but current is '10000'"),
        ),
        (
            {"arguments": {"x-message-ttl": 10000}},
            {},
            _inequivalent(
                "x-message-ttl",
                "received none but current is the value '10000' of type 'signedint'",
            ),
        ),
        (
            {},
            {"arguments": {"x-max-length": 5}},
            _inequivalent(
                "x-max-length", "received the value '5' of type 'signedint' but current is none"
            ),
        ),
        (
            {},
            {"arguments": {"x-expires": 2**40}},
            _inequivalent(
                "x-expires",
                "received the value '1099511627776' of type 'long' but current is none",
            ),
        ),
        (
            {"arguments": {"x-message-ttl": 10000}},
            {"arguments": {"x-message-ttl": "10000"}},
            _inequivalent("x-message-ttl", "received '10000' but current is '10000'"),
        ),
        (
            {},
            {"arguments": {"x-dead-letter-exchange": "dlx"}},
            _inequivalent(
                "x-dead-letter-exchange",
                "received the value 'dlx' of type 'longstr' but current is none",
            ),
        ),
        (
            {"arguments": {"x-max-length": 5, "x-overflow": "reject-publish"}},
            {"arguments": {"x-max-length": 5, "x-overflow": "drop-head"}},
            _inequivalent("x-overflow", "received 'drop-head' but current is 'reject-publish'"),
        ),
        (
            {},
            {"arguments": {"x-single-active-consumer": True}},
            _inequivalent(
                "x-single-active-consumer",
                "received the value 'true' of type 'bool' but current is none",
            ),
        ),
        (
            {"arguments": {"x-expires": 100000}},
            {"arguments": {"x-expires": True}},
            _inequivalent("x-expires", "received 'true' but current is '100000'"),
        ),
        (
            {},
            {"arguments": {"x-queue-type": "quorum"}},
            _inequivalent(
                "x-queue-type", "received the value 'quorum' of type 'longstr' but current is none"
            ),
        ),
        (
            {"arguments": {"x-queue-type": "classic"}},
            {"arguments": {"x-queue-type": "quorum"}},
            _inequivalent("x-queue-type", "received 'quorum' but current is 'classic'"),
        ),
        (
            {},
            {"arguments": {"x-queue-master-locator": "min-masters"}},
            _inequivalent(
                "x-queue-master-locator",
                "received the value 'min-masters' of type 'longstr' but current is none",
            ),
        ),
        # the first differing argument, in RabbitMQ's order, is reported
        (
            {"arguments": {"x-max-length": 1, "x-message-ttl": 1, "x-expires": 100000}},
            {"arguments": {"x-max-length": 2, "x-message-ttl": 2, "x-expires": 100001}},
            _inequivalent("x-expires", "received '100001' but current is '100000'"),
        ),
        (
            {"arguments": {"x-max-length": 1, "x-message-ttl": 1}},
            {"arguments": {"x-max-length": 2, "x-message-ttl": 2}},
            _inequivalent("x-message-ttl", "received '2' but current is '1'"),
        ),
    ],
)
def test_redeclare_inequivalent(
    conn: pika.BlockingConnection,
    first: dict[str, Any],
    second: dict[str, Any],
    expected: str,
) -> None:
    conn.channel().queue_declare("q", **first)
    assert channel_error(conn, lambda c: c.queue_declare("q", **second)) == expected
    # The queue is untouched and still declarable as it was.
    conn.channel().queue_declare("q", **first)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # unknown x- arguments and non-x arguments are not compared
        ({"x-message-ttl": 100, "x-foo": 1}, {"x-message-ttl": 100, "x-foo": 2, "x-bar": 1}),
        ({"x-message-ttl": 100}, {"x-message-ttl": 100, "whatever": "x"}),
        ({"x-max-in-memory-length": 3}, {}),
        # a missing queue type means classic, both ways
        ({"x-queue-type": "classic"}, {}),
        ({}, {"x-queue-type": "classic"}),
        ({"x-max-length": 5}, {"x-max-length": 5}),
    ],
)
def test_redeclare_equivalent(
    conn: pika.BlockingConnection, first: dict[str, Any], second: dict[str, Any]
) -> None:
    ch = conn.channel()
    ch.queue_declare("q", arguments=first)
    assert ch.queue_declare("q", arguments=second).method.queue == "q"


# -- exclusive queues ------------------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    [
        lambda c: c.queue_declare("excl"),
        lambda c: c.queue_declare("excl", exclusive=True),
        lambda c: c.queue_declare("excl", passive=True),
        lambda c: c.basic_consume("excl", lambda *a: None),
        lambda c: c.queue_bind("excl", "amq.direct", "k"),
        lambda c: c.queue_unbind("excl", "amq.fanout"),
        lambda c: c.queue_purge("excl"),
        lambda c: c.queue_delete("excl"),
        lambda c: c.basic_get("excl"),
    ],
    ids=[
        "declare",
        "declare-exclusive",
        "passive",
        "consume",
        "bind",
        "unbind",
        "purge",
        "delete",
        "get",
    ],
)
def test_exclusive_queue_locked_for_other_connections(
    conn: pika.BlockingConnection,
    other: pika.BlockingConnection,
    operation: Callable[[BlockingChannel], Any],
) -> None:
    ch = conn.channel()
    ch.queue_declare("excl", exclusive=True)
    ch.queue_bind("excl", "amq.fanout")
    publish(ch, "excl", b"kept")
    assert channel_error(other, operation) == LOCKED.format("excl")
    # Nothing changed for the owner.
    assert counts(conn, "excl") == (1, 0)
    ch.basic_publish("amq.fanout", "", b"still-bound")
    assert counts(conn, "excl") == (2, 0)


def test_unbind_of_missing_binding_on_exclusive_queue_is_ok(
    conn: pika.BlockingConnection, other: pika.BlockingConnection
) -> None:
    # RabbitMQ looks the binding up first: nothing to remove, nothing locked.
    conn.channel().queue_declare("excl", exclusive=True)
    ch = other.channel()
    ch.queue_unbind("excl", "amq.direct", "never-bound")
    assert ch.is_open


def test_exclusive_queue_usable_from_any_channel_of_its_connection(
    conn: pika.BlockingConnection,
) -> None:
    conn.channel().queue_declare("excl", exclusive=True)
    ch = conn.channel()
    ch.queue_declare("excl", exclusive=True)
    ch.queue_bind("excl", "amq.direct", "k")
    ch.basic_publish("amq.direct", "k", b"m")
    _, _, body = ch.basic_get("excl", auto_ack=True)
    assert body == b"m"
    # ... but redeclaring it as non-exclusive, even there, is refused.
    assert channel_error(conn, lambda c: c.queue_declare("excl")) == LOCKED.format("excl")


def test_exclusive_queue_deleted_when_connection_closes(
    roost_broker: RoostBroker, other: pika.BlockingConnection
) -> None:
    c = connect(roost_broker)
    c.channel().queue_declare("excl", exclusive=True)
    assert queue_exists(roost_broker, "excl")
    c.close()
    assert wait_until(lambda: not queue_exists(roost_broker, "excl"))
    assert channel_error(other, lambda ch: ch.queue_declare("excl", passive=True)) == (
        "404 NOT_FOUND - no queue 'excl' in vhost '/'"
    )
    # The name is free again for anyone.
    other.channel().queue_declare("excl")


def test_exclusive_queue_deleted_when_client_vanishes(roost_broker: RoostBroker) -> None:
    client = RawClient(roost_broker.port)
    client.handshake()
    client.open_channel()
    client.send_frame(C.Queue.Declare(queue="excl", exclusive=True), 1)
    client.expect(C.Queue.DeclareOk)
    assert queue_exists(roost_broker, "excl")
    # No connection.close: reset the socket (SO_LINGER 0 sends RST).
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    assert wait_until(lambda: not queue_exists(roost_broker, "excl"))


def test_exclusive_queue_survives_its_channel_closing(
    roost_broker: RoostBroker, conn: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("excl", exclusive=True)
    ch.close()
    assert counts(conn, "excl") == (0, 0)


# -- auto-delete -----------------------------------------------------------------


def test_auto_delete_queue_stays_until_it_had_a_consumer(
    roost_broker: RoostBroker, conn: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("ad", auto_delete=True)
    publish(ch, "ad", b"x")
    method, _, _ = ch.basic_get("ad", auto_ack=True)
    assert method is not None  # basic.get is not a consumer
    assert counts(conn, "ad") == (0, 0)
    tag1 = ch.basic_consume("ad", lambda *a: None)
    tag2 = ch.basic_consume("ad", lambda *a: None)
    ch.basic_cancel(tag1)
    assert counts(conn, "ad") == (0, 1)
    ch.basic_cancel(tag2)
    assert not queue_exists(roost_broker, "ad")
    assert channel_error(conn, lambda c: c.queue_declare("ad", passive=True)) == (
        "404 NOT_FOUND - no queue 'ad' in vhost '/'"
    )


def test_auto_delete_queue_deleted_when_consumer_channel_closes(
    roost_broker: RoostBroker, conn: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("ad", auto_delete=True)
    ch.basic_consume("ad", lambda *a: None)
    ch.close()
    assert wait_until(lambda: not queue_exists(roost_broker, "ad"))


# -- bindings --------------------------------------------------------------------


def test_bind_and_unbind_with_arguments(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    ch.queue_bind("q", "amq.direct", "k", arguments={"a": 1})
    # Unbinding with other arguments does not touch that binding.
    ch.queue_unbind("q", "amq.direct", "k")
    ch.queue_unbind("q", "amq.direct", "k", arguments={"a": 2})
    ch.basic_publish("amq.direct", "k", b"1")
    assert counts(conn, "q") == (1, 0)
    ch.queue_unbind("q", "amq.direct", "k", arguments={"a": 1})
    ch.basic_publish("amq.direct", "k", b"2")
    assert counts(conn, "q") == (1, 0)


def test_headers_bind_and_unbind_with_arguments(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    ch.queue_bind("q", "amq.headers", arguments={"x-match": "any", "a": 1, "b": 2})
    ch.basic_publish("amq.headers", "", b"1", pika.BasicProperties(headers={"b": 2}))
    assert counts(conn, "q") == (1, 0)
    ch.queue_unbind("q", "amq.headers", arguments={"x-match": "any", "a": 1, "b": 2})
    ch.basic_publish("amq.headers", "", b"2", pika.BasicProperties(headers={"b": 2}))
    assert counts(conn, "q") == (1, 0)


def test_unbind_nonexistent_is_ok(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    ch.queue_unbind("q", "amq.direct", "never")
    # Like RabbitMQ: missing queue or exchange is no error for unbind either.
    ch.queue_unbind("no-such-queue", "amq.direct", "k")
    ch.queue_unbind("q", "no-such-exchange", "k")
    assert ch.is_open


def test_bind_errors(conn: pika.BlockingConnection) -> None:
    conn.channel().queue_declare("q")
    assert channel_error(conn, lambda c: c.queue_bind("q", "nope", "k")) == (
        "404 NOT_FOUND - no exchange 'nope' in vhost '/'"
    )
    assert channel_error(conn, lambda c: c.queue_bind("nope", "amq.direct", "k")) == (
        "404 NOT_FOUND - no queue 'nope' in vhost '/'"
    )
    default = "403 ACCESS_REFUSED - operation not permitted on the default exchange"
    assert channel_error(conn, lambda c: c.queue_bind("q", "", "q")) == default
    assert channel_error(conn, lambda c: c.queue_unbind("q", "", "q")) == default


# -- purge and delete ------------------------------------------------------------


def test_purge_returns_count(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    publish(ch, "q", b"1", b"2", b"3")
    assert ch.queue_purge("q").method.message_count == 3
    assert ch.queue_purge("q").method.message_count == 0
    assert counts(conn, "q") == (0, 0)


def test_purge_keeps_unacked(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    publish(ch, "q", b"1", b"2")
    method, _, _ = ch.basic_get("q")
    assert method is not None
    assert ch.queue_purge("q").method.message_count == 1
    ch.basic_nack(method.delivery_tag, requeue=True)
    assert counts(conn, "q") == (1, 0)


def test_delete_returns_message_count(
    roost_broker: RoostBroker, conn: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    publish(ch, "q", b"1", b"2")
    assert ch.queue_delete("q").method.message_count == 2
    assert not queue_exists(roost_broker, "q")


def test_delete_missing_queue_is_ok(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    assert ch.queue_delete("never-was").method.message_count == 0
    assert ch.is_open


def test_purge_and_get_of_missing_queue_are_404(conn: pika.BlockingConnection) -> None:
    text = "404 NOT_FOUND - no queue 'nope' in vhost '/'"
    assert channel_error(conn, lambda c: c.queue_purge("nope")) == text
    assert channel_error(conn, lambda c: c.basic_get("nope")) == text


def test_delete_if_unused_with_consumer_is_406(
    conn: pika.BlockingConnection, other: pika.BlockingConnection
) -> None:
    other.channel().queue_declare("q")
    tag = other.channel().basic_consume("q", lambda *a: None)
    assert tag
    assert channel_error(conn, lambda c: c.queue_delete("q", if_unused=True)) == (
        "406 PRECONDITION_FAILED - queue 'q' in vhost '/' in use"
    )
    assert counts(conn, "q") == (0, 1)


def test_delete_if_empty_with_messages_is_406(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    publish(ch, "q", b"1")
    assert channel_error(conn, lambda c: c.queue_delete("q", if_empty=True)) == (
        "406 PRECONDITION_FAILED - queue 'q' in vhost '/' not empty"
    )
    assert counts(conn, "q") == (1, 0)
    conn.channel().queue_purge("q")
    assert conn.channel().queue_delete("q", if_empty=True, if_unused=True).method.message_count == 0


def test_delete_cancels_consumers_with_notification(
    conn: pika.BlockingConnection, other: pika.BlockingConnection
) -> None:
    ch = conn.channel()
    ch.queue_declare("q")
    cancelled: list[str] = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume("q", lambda *a: None, consumer_tag="ctag-1")
    assert other.channel().queue_delete("q").method.message_count == 0
    deadline = time.monotonic() + 2
    while not cancelled and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert cancelled == [tag]
    # The consumer's channel stays open and usable.
    assert ch.is_open
    assert ch.queue_declare("again").method.queue == "again"
    assert tag not in ch.consumer_tags


# -- the empty queue name -------------------------------------------------------


def test_empty_name_is_the_last_declared_queue(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    name = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind("", "amq.fanout")
    ch.basic_publish("amq.fanout", "", b"via-bind")
    _, _, body = ch.basic_get("", auto_ack=True)
    assert body == b"via-bind"
    ch.basic_publish("", name, b"x")
    assert ch.queue_purge("").method.message_count == 1
    got: list[bytes] = []
    ch.basic_consume("", lambda c, m, p, b: got.append(b), auto_ack=True)
    ch.basic_publish("", name, b"consumed")
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == [b"consumed"]
    ch.queue_unbind("", "amq.fanout")
    assert ch.queue_delete("").method.message_count == 0
    assert channel_error(conn, lambda c: c.queue_declare(name, passive=True)).startswith("404")


def test_empty_name_is_per_channel(conn: pika.BlockingConnection) -> None:
    ch1, ch2 = conn.channel(), conn.channel()
    ch1.queue_declare("first")
    ch2.queue_declare("second")
    ch1.basic_publish("", "first", b"1")
    assert ch1.queue_purge("").method.message_count == 1
    assert ch2.queue_purge("").method.message_count == 0


@pytest.mark.parametrize(
    "operation",
    [
        lambda c: c.queue_bind("", "amq.direct", "k"),
        lambda c: c.queue_unbind("", "amq.direct", "k"),
        lambda c: c.basic_consume("", lambda *a: None),
        lambda c: c.basic_get(""),
        lambda c: c.queue_purge(""),
        lambda c: c.queue_delete(""),
    ],
    ids=["bind", "unbind", "consume", "get", "purge", "delete"],
)
def test_empty_name_without_declared_queue_is_404(
    conn: pika.BlockingConnection, operation: Callable[[BlockingChannel], Any]
) -> None:
    assert channel_error(conn, operation) == "404 NOT_FOUND - no previously declared queue"


# -- aio-pika --------------------------------------------------------------------


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def test_aio_pika_declare_passive_and_counts(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("aq", durable=True)
        for i in range(3):
            await ch.default_exchange.publish(aio_pika.Message(str(i).encode()), "aq")
        again = await ch.declare_queue("aq", passive=True)
        assert again.declaration_result.message_count == 3
        assert again.declaration_result.consumer_count == 0
        assert await q.purge() is not None
        auto = await ch.declare_queue(exclusive=True)
        assert auto.name.startswith("amq.gen-")
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as err:
            await ch.declare_queue("missing", passive=True)
        assert err.value.args[0] == "NOT_FOUND - no queue 'missing' in vhost '/'"


async def test_aio_pika_redeclare_inequivalent(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        await ch.declare_queue("aq", arguments={"x-dead-letter-exchange": "dlx"})
        ch2 = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as err:
            await ch2.declare_queue("aq", arguments={"x-dead-letter-exchange": "other"})
        assert err.value.args[0] == (
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'aq' "
            "in vhost '/': received 'other' but current is 'dlx'"
        )
        ch3 = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as err:
            await ch3.declare_queue("aq", durable=True, arguments={"x-dead-letter-exchange": "dlx"})
        assert err.value.args[0] == (
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'aq' in vhost '/': "
            "received 'true' but current is 'false'"
        )


async def test_aio_pika_exclusive_locked(roost_broker: RoostBroker) -> None:
    owner = await aio_pika.connect(roost_broker.url)
    intruder = await aio_pika.connect(roost_broker.url)
    async with owner, intruder:
        await (await owner.channel()).declare_queue("excl", exclusive=True)
        ch = await intruder.channel()
        with pytest.raises(aiormq.exceptions.ChannelLockedResource) as err:
            await ch.declare_queue("excl", passive=True)
        assert f"405 {err.value.args[0]}" == LOCKED.format("excl")


async def test_aio_pika_consumer_cancelled_by_queue_delete(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("aq")
        tag = await q.consume(_ignore)
        underlay = cast(aiormq.Channel, await ch.get_underlay_channel())
        assert tag in underlay.consumers
        await (await conn.channel()).queue_delete("aq")
        deadline = time.monotonic() + 2
        while tag in underlay.consumers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # aiormq drops the consumer on the server's basic.cancel ...
        assert tag not in underlay.consumers
        # ... and the channel is still open.
        assert not ch.is_closed
        assert (await ch.declare_queue("again")).name == "again"


async def test_aio_pika_auto_delete_after_last_consumer(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("ad", auto_delete=True)
        tag = await q.consume(_ignore)
        assert queue_exists(roost_broker, "ad")
        await q.cancel(tag)
        assert not queue_exists(roost_broker, "ad")


# -- kombu -----------------------------------------------------------------------


def kombu_url(broker: RoostBroker) -> str:
    return f"amqp://guest:guest@127.0.0.1:{broker.port}//"


def test_kombu_declare_bind_and_route(roost_broker: RoostBroker) -> None:
    exchange = kombu.entity.Exchange("kx", type="topic")
    queue = kombu.entity.Queue("kq", exchange=exchange, routing_key="a.*")
    with kombu.connection.Connection(kombu_url(roost_broker)) as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        producer = conn.Producer()
        producer.publish(b"match", exchange=exchange, routing_key="a.b")
        producer.publish(b"miss", exchange=exchange, routing_key="b.b")
        name, messages, consumers = bound.queue_declare(passive=True)
        assert (name, messages, consumers) == ("kq", 1, 0)
        msg = bound.get(no_ack=True)
        assert msg is not None and msg.body == b"match"
        assert bound.purge() == 0
        assert bound.delete() == 0


def test_kombu_redeclare_inequivalent_and_passive_missing(roost_broker: RoostBroker) -> None:
    with kombu.connection.Connection(kombu_url(roost_broker)) as conn:
        kombu.entity.Queue("kq", queue_arguments={"x-message-ttl": 1000})(conn.channel()).declare()
        other = kombu.entity.Queue("kq", queue_arguments={"x-message-ttl": 2000})(conn.channel())
        with pytest.raises(amqp.exceptions.PreconditionFailed) as err:
            other.declare()
        assert err.value.reply_text == (
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'kq' in vhost '/': "
            "received '2000' but current is '1000'"
        )
        with pytest.raises(amqp.exceptions.NotFound) as nf:
            kombu.entity.Queue("nope")(conn.channel()).queue_declare(passive=True)
        assert nf.value.reply_text == "NOT_FOUND - no queue 'nope' in vhost '/'"
