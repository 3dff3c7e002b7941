"""basic.publish and delivery end to end: round trips with pika and aio-pika,
mandatory returns, publish errors, byte-exact properties, framing of large
bodies, the message size limit and empty bodies.

Reply codes and texts were checked against RabbitMQ 3.10.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import aiormq
import pika
import pytest
from pamqp import commands as C
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from roost.amqp.wire import FRAME_BODY, FRAME_HEADER
from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.basic_helpers import (
    basic_get,
    connect,
    declare_queue,
    expect_channel_close,
    expect_connection_close,
    expect_method,
    next_message,
    publish,
    recv_raw,
)


@pytest.fixture
def pika_conn(roost_broker: RoostBroker) -> Iterator[pika.BlockingConnection]:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    yield conn
    if conn.is_open:
        conn.close()


def _drain(conn: pika.BlockingConnection, done: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the broker"
        conn.process_data_events(time_limit=0.05)


def _consume_n(
    conn: pika.BlockingConnection, ch: BlockingChannel, queue: str, n: int
) -> list[tuple[Any, Any, bytes]]:
    got: list[tuple[Any, Any, bytes]] = []

    def on_message(c: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
        got.append((method, props, body))
        c.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(queue, on_message)
    _drain(conn, lambda: len(got) >= n)
    ch.basic_cancel(tag)
    return got


# -- round trips ---------------------------------------------------------


def test_pika_round_trip_keeps_order(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    for i in range(20):
        ch.basic_publish("", q, f"msg-{i}".encode())
    got = _consume_n(pika_conn, ch, q, 20)
    assert [body for _, _, body in got] == [f"msg-{i}".encode() for i in range(20)]
    assert all(m.routing_key == q and m.exchange == "" for m, _, _ in got)
    assert all(not m.redelivered for m, _, _ in got)
    assert [m.delivery_tag for m, _, _ in got] == list(range(1, 21))
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_pika_publish_through_named_exchange(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    ch.exchange_declare("pc.direct", "direct", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "pc.direct", "key")
    ch.basic_publish("pc.direct", "key", b"routed")
    ch.basic_publish("pc.direct", "other", b"dropped")
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"routed"
    assert method.exchange == "pc.direct" and method.routing_key == "key"
    assert method.message_count == 0
    assert ch.basic_get(q) == (None, None, None)


async def test_aio_pika_round_trip(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("", exclusive=True)
        for i in range(10):
            await ch.default_exchange.publish(
                aio_pika.Message(f"m{i}".encode(), content_type="text/plain"), q.name
            )
        bodies: list[bytes] = []
        async with q.iterator() as it:
            async for message in it:
                async with message.process():
                    assert message.content_type == "text/plain"
                    assert message.redelivered is False
                    bodies.append(message.body)
                if len(bodies) == 10:
                    break
        assert bodies == [f"m{i}".encode() for i in range(10)]
        declared = await ch.declare_queue(q.name, passive=True)
        assert declared.declaration_result.message_count == 0


# -- mandatory and publish errors ---------------------------------------


def test_pika_mandatory_unroutable_is_returned(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    returned: list[tuple[Any, Any, bytes]] = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m, p, b)))
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"routable", mandatory=True)
    ch.basic_publish(
        "amq.direct",
        "nobody-home",
        b"lost",
        pika.BasicProperties(message_id="m-1"),
        mandatory=True,
    )
    ch.basic_publish("amq.direct", "nobody-home", b"not mandatory")
    _drain(pika_conn, lambda: bool(returned))
    # A queue declare round trip after the publishes: no second return came.
    ch.queue_declare(q, passive=True)
    pika_conn.process_data_events(time_limit=0)
    assert len(returned) == 1
    method, props, body = returned[0]
    assert (method.reply_code, method.reply_text) == (312, "NO_ROUTE")
    assert (method.exchange, method.routing_key) == ("amq.direct", "nobody-home")
    assert body == b"lost" and props.message_id == "m-1"
    assert ch.basic_get(q, auto_ack=True)[2] == b"routable"


async def test_aio_pika_mandatory_unroutable_is_returned(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=False)
        returned: list[Any] = []
        ch.return_callbacks.add(lambda _ch, message: returned.append(message))
        result = await ch.default_exchange.publish(
            aio_pika.Message(b"lost", message_id="r1"), "no-such-queue", mandatory=True
        )
        assert len(returned) == 1
        assert returned[0].body == b"lost"
        assert returned[0].routing_key == "no-such-queue"
        # With a return callback, publish resolves to the returned message.
        assert isinstance(result, aiormq.abc.DeliveredMessage)
        assert isinstance(result.delivery, C.Basic.Return)
        assert result.delivery.reply_code == 312

        raising = await conn.channel(publisher_confirms=True, on_return_raises=True)
        with pytest.raises(aio_pika.exceptions.PublishError) as info:
            await raising.default_exchange.publish(
                aio_pika.Message(b"lost again", message_id="r2"), "no-such-queue"
            )
        frame = info.value.frame
        assert isinstance(frame, C.Basic.Return)
        assert (frame.reply_code, frame.reply_text) == (312, "NO_ROUTE")


def test_immediate_is_not_implemented(raw: RawClient, roost_broker: RoostBroker) -> None:
    # RabbitMQ 3.x: connection.close 540 "NOT_IMPLEMENTED - immediate=true".
    raw.handshake()
    raw.open_channel(1)
    publish(raw, "", "anything", b"x", immediate=True)
    close = expect_connection_close(raw)
    assert close.reply_code == 540
    assert close.reply_text == "NOT_IMPLEMENTED - immediate=true"
    assert (close.class_id, close.method_id) == (60, 40)
    assert raw.closed()


def test_publish_to_missing_exchange_closes_channel(raw: RawClient) -> None:
    raw.handshake()
    raw.open_channel(1)
    raw.open_channel(2)
    publish(raw, "does-not-exist", "key", b"x")
    close = expect_channel_close(raw, 1)
    assert close.reply_code == 404
    assert close.reply_text == "NOT_FOUND - no exchange 'does-not-exist' in vhost '/'"
    assert (close.class_id, close.method_id) == (60, 40)
    # Only the channel died.
    q = declare_queue(raw, channel=2, exclusive=True)
    publish(raw, "", q, b"still fine", channel=2)
    got = basic_get(raw, q, channel=2, no_ack=True)
    assert got is not None and got.body == b"still fine"


def test_pika_publish_to_missing_exchange(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    ch.basic_publish("does-not-exist", "key", b"x")
    with pytest.raises(ChannelClosedByBroker) as info:
        ch.queue_declare("", exclusive=True)
    assert info.value.reply_code == 404
    assert info.value.reply_text == "NOT_FOUND - no exchange 'does-not-exist' in vhost '/'"
    assert pika_conn.is_open


def test_user_id_must_match_authenticated_user(raw: RawClient) -> None:
    raw.handshake()
    raw.open_channel(1)
    q = declare_queue(raw, exclusive=True)
    publish(raw, "", q, b"mine", C.Basic.Properties(user_id="guest"))
    got = basic_get(raw, q, no_ack=True)
    assert got is not None and got.properties.user_id == "guest"

    publish(raw, "", q, b"forged", C.Basic.Properties(user_id="mallory"))
    close = expect_channel_close(raw, 1)
    assert close.reply_code == 406
    assert close.reply_text == (
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'"
    )
    assert (close.class_id, close.method_id) == (60, 40)
    raw.open_channel(1)
    assert basic_get(raw, q) is None  # the forged message was not enqueued


# -- properties and headers ----------------------------------------------


def _shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def _longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    return _longstr(b"".join(_shortstr(k) + v for k, v in entries))


def _every_field_type() -> bytes:
    """A headers table using every field type RabbitMQ knows, hand-encoded."""
    nested = _table([(b"inner", b"S" + _longstr(b"deep")), (b"n", b"I" + struct.pack(">i", -1))])
    array = _longstr(
        b"I"
        + struct.pack(">i", 1)
        + b"S"
        + _longstr(b"two")
        + b"t\x00"
        + b"F"
        + nested
        + b"V"
        + b"A"
        + _longstr(b"b\x05")
    )
    return _table(
        [
            (b"bool", b"t\x01"),
            (b"int8", b"b" + struct.pack(">b", -8)),
            (b"uint8", b"B" + struct.pack(">B", 200)),
            (b"int16", b"s" + struct.pack(">h", -1600)),
            (b"uint16", b"u" + struct.pack(">H", 65000)),
            (b"int32", b"I" + struct.pack(">i", -320000)),
            (b"uint32", b"i" + struct.pack(">I", 4000000000)),
            (b"int64", b"l" + struct.pack(">q", -(2**60))),
            (b"float", b"f" + struct.pack(">f", 1.5)),
            (b"double", b"d" + struct.pack(">d", -2.25)),
            (b"decimal", b"D" + struct.pack(">Bi", 2, 31415)),
            (b"longstr", b"S" + _longstr("héllo".encode())),
            (b"array", b"A" + array),
            (b"timestamp", b"T" + struct.pack(">Q", 1700000000)),
            (b"table", b"F" + nested),
            (b"void", b"V"),
            (b"bytes", b"x" + _longstr(b"\x00\x01\xfe\xff")),
        ]
    )


def _every_property() -> bytes:
    """Property flags (all 14 set) and list, hand-encoded."""
    return (
        struct.pack(">H", 0xFFFC)
        + _shortstr(b"application/json")
        + _shortstr(b"gzip")
        + _every_field_type()
        + b"\x02"  # delivery mode
        + b"\x07"  # priority
        + _shortstr(b"corr-42")
        + _shortstr(b"reply-queue")
        + _shortstr(b"60000")
        + _shortstr(b"msg-1")
        + struct.pack(">Q", 1700000001)
        + _shortstr(b"kind")
        + _shortstr(b"guest")
        + _shortstr(b"app")
        + _shortstr(b"cluster")
    )


def test_every_property_comes_back_byte_exact(raw: RawClient) -> None:
    raw.handshake()
    raw.open_channel(1)
    raw.open_channel(2)
    props = _every_property()
    q = declare_queue(raw, exclusive=True)
    publish(raw, "", q, b"payload", props)
    publish(raw, "", q, b"payload", props)
    # via basic.get
    got = basic_get(raw, q, no_ack=True)
    assert got is not None
    assert got.properties_raw == props
    assert got.body == b"payload"
    # via basic.deliver
    raw.send_frame(C.Basic.Consume(queue=q, consumer_tag="c", no_ack=True), 2)
    expect_method(raw, C.Basic.ConsumeOk, 2)
    delivered = next_message(raw)
    assert isinstance(delivered.method, C.Basic.Deliver)
    assert delivered.properties_raw == props
    # via basic.return
    publish(raw, "amq.direct", "unbound", b"back", props, mandatory=True)
    returned = next_message(raw)
    assert isinstance(returned.method, C.Basic.Return)
    assert returned.properties_raw == props
    # and the bytes decode to what was sent
    decoded = got.properties
    assert decoded.headers is not None
    assert decoded.headers["uint32"] == 4000000000
    assert decoded.headers["bytes"] == b"\x00\x01\xfe\xff"
    assert decoded.headers["decimal"] == Decimal("314.15")
    assert (decoded.priority, decoded.delivery_mode, decoded.cluster_id) == (7, 2, "cluster")


def test_empty_property_flags_come_back_as_sent(raw: RawClient) -> None:
    raw.handshake()
    raw.open_channel(1)
    q = declare_queue(raw, exclusive=True)
    publish(raw, "", q, b"bare", b"\x00\x00")
    got = basic_get(raw, q, no_ack=True)
    assert got is not None and got.properties_raw == b"\x00\x00" and got.body == b"bare"


def test_pika_property_and_header_values(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    headers = {
        "str": "text ✓",
        "bytes": b"\x00\xff",
        "int": 42,
        "negative": -5,
        "big": 2**40,
        "true": True,
        "false": False,
        "none": None,
        "decimal": Decimal("3.14"),
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "list": [1, "a", [2, 3], {"k": "v"}],
        "table": {"nested": {"deep": 1}},
    }
    sent = pika.BasicProperties(
        content_type="application/octet-stream",
        content_encoding="identity",
        headers=headers,
        delivery_mode=2,
        priority=3,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="id-1",
        timestamp=1700000000,
        type="event",
        user_id="guest",
        app_id="tests",
        cluster_id="c1",
    )
    ch.basic_publish("", q, b"body", sent)
    _, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"body"
    for name in (
        "content_type",
        "content_encoding",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
        "cluster_id",
    ):
        assert getattr(props, name) == getattr(sent, name), name
    assert props.headers == headers


# -- framing ------------------------------------------------------------


def test_one_mebibyte_body_is_split_and_reassembled(
    raw: RawClient, pika_conn: pika.BlockingConnection
) -> None:
    body = bytes(range(256)) * 4096
    tune = raw.handshake()
    raw.open_channel(1)
    q = declare_queue(raw, exclusive=True)
    frame_max = int(tune.frame_max)
    assert frame_max == 131072
    publish(raw, "", q, body, frame_max=frame_max)
    got = basic_get(raw, q, no_ack=True)
    assert got is not None and got.body == body and got.body_size == len(body)
    chunk = frame_max - 8
    assert got.body_frame_sizes == [chunk] * (len(body) // chunk) + [len(body) % chunk]

    ch = pika_conn.channel()
    q2 = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q2, body)
    [(_, _, received)] = _consume_n(pika_conn, ch, q2, 1)
    assert received == body


@pytest.mark.parametrize("frame_max", [4096, 131072])
@pytest.mark.parametrize("overhead", [8, 7])
def test_body_at_frame_max_boundary(
    roost_broker: RoostBroker, frame_max: int, overhead: int
) -> None:
    """frame_max-8 bytes fill exactly one body frame; frame_max-7 need two."""
    client = connect(roost_broker.port, channels=2, frame_max=frame_max)
    try:
        size = frame_max - overhead
        body = bytes(i % 251 for i in range(size))
        q = declare_queue(client, exclusive=True)
        publish(client, "", q, body, frame_max=frame_max)
        got = basic_get(client, q, no_ack=True)
        assert got is not None and got.body == body
        expected = [frame_max - 8] if overhead == 8 else [frame_max - 8, 1]
        assert got.body_frame_sizes == expected
        # The same through a consumer.
        publish(client, "", q, body, frame_max=frame_max)
        client.send_frame(C.Basic.Consume(queue=q, no_ack=True), 2)
        expect_method(client, C.Basic.ConsumeOk, 2)
        delivered = next_message(client)
        assert delivered.body == body and delivered.body_frame_sizes == expected
    finally:
        client.close()


def test_message_above_max_message_size_is_refused() -> None:
    with RoostBroker(max_message_size=1000) as broker:
        client = connect(broker.port, channels=2)
        try:
            q = declare_queue(client, exclusive=True)
            publish(client, "", q, b"a" * 1001)
            close = expect_channel_close(client, 1)
            assert close.reply_code == 406
            assert close.reply_text == (
                "PRECONDITION_FAILED - message size 1001 is larger than configured max size 1000"
            )
            assert (close.class_id, close.method_id) == (60, 40)
            # The connection stays usable: other channels and a reopened one.
            publish(client, "", q, b"b" * 1000, channel=2)
            client.open_channel(1)
            got = basic_get(client, q, no_ack=True)
            assert got is not None and got.body == b"b" * 1000
            assert basic_get(client, q) is None
        finally:
            client.close()


def test_oversized_body_arriving_after_channel_close_is_skipped() -> None:
    """The body frames of a refused publish may reach the broker after it
    closed the channel; they are skipped, not treated as unexpected frames."""
    with RoostBroker(max_message_size=1000) as broker:
        client = connect(broker.port)
        try:
            q = declare_queue(client, exclusive=True)
            client.send_frame(C.Basic.Publish(exchange="", routing_key=q), 1)
            client.send_frame(ContentHeader(0, 3000, C.Basic.Properties()), 1)
            close = expect_method(client, C.Channel.Close, 1)
            assert close.reply_code == 406
            for _ in range(3):
                client.send_frame(ContentBody(b"c" * 1000), 1)
            client.send_frame(C.Channel.CloseOk(), 1)
            client.open_channel(1)
            publish(client, "", q, b"after")
            got = basic_get(client, q, no_ack=True)
            assert got is not None and got.body == b"after"
        finally:
            client.close()


def test_pika_message_above_max_message_size() -> None:
    with RoostBroker(max_message_size=1000) as broker:
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            q = ch.queue_declare("", exclusive=True).method.queue
            with pytest.raises(ChannelClosedByBroker) as info:
                ch.basic_publish("", q, b"x" * 5000)
            assert info.value.reply_code == 406
            assert info.value.reply_text == (
                "PRECONDITION_FAILED - message size 5000 is larger than configured max size 1000"
            )
            ch = conn.channel()
            ch.basic_publish("", q, b"ok")
            assert ch.basic_get(q, auto_ack=True)[2] == b"ok"
        finally:
            conn.close()


def test_zero_length_body_has_no_body_frame(raw: RawClient) -> None:
    raw.handshake()
    raw.open_channel(1)
    q = declare_queue(raw, exclusive=True)
    publish(raw, "", q, b"", C.Basic.Properties(message_id="empty"))
    raw.send_frame(C.Basic.Get(queue=q, no_ack=True), 1)
    expect_method(raw, C.Basic.GetOk, 1)
    ftype, _, payload = recv_raw(raw)
    assert ftype == FRAME_HEADER and struct.unpack(">Q", payload[4:12])[0] == 0
    # The very next frame is the get-empty, not a body frame.
    raw.send_frame(C.Basic.Get(queue=q), 1)
    ftype, _, _ = recv_raw(raw)
    assert ftype != FRAME_BODY
    assert ftype == 1


def test_zero_length_bodies_with_clients(pika_conn: pika.BlockingConnection) -> None:
    ch = pika_conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"")
    ch.basic_publish("", q, b"", pika.BasicProperties(content_type="empty"))
    got = _consume_n(pika_conn, ch, q, 2)
    assert [body for _, _, body in got] == [b"", b""]
    assert got[1][1].content_type == "empty"


async def test_aio_pika_zero_length_and_large_bodies(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("", exclusive=True)
        big = b"z" * (512 * 1024 + 3)
        for body in (b"", big, b""):
            await ch.default_exchange.publish(aio_pika.Message(body), q.name)
        got: list[bytes] = []
        for _ in range(3):
            message = await q.get(no_ack=True, timeout=5)
            assert message is not None
            got.append(message.body)
        assert got == [b"", big, b""]
