"""The hand-written encoders produce exactly pamqp's bytes."""

from __future__ import annotations

import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader

from roost.amqp import encoder


def marshal(frame: object, channel: int) -> bytes:
    return bytes(pframe.marshal(frame, channel))  # type: ignore[arg-type]


NAMES = [
    ("", ""),
    ("amq.direct", "a.b.c"),
    ("logs-2024_01:x", "routing/key"),
    ("x" * 127, "k" * 255),
    ("with space", "#.*"),
]


@pytest.mark.parametrize(("exchange", "routing_key"), NAMES)
@pytest.mark.parametrize("redelivered", [False, True])
@pytest.mark.parametrize(
    ("channel", "delivery_tag"), [(1, 1), (2047, 2**32 + 5), (65535, 2**63 - 1)]
)
def test_deliver(
    exchange: str, routing_key: str, redelivered: bool, channel: int, delivery_tag: int
) -> None:
    tag = "amq.ctag-Zq1_abc"
    got = encoder.deliver(
        channel,
        encoder.shortstr(tag),
        delivery_tag,
        redelivered,
        encoder.shortstr(exchange),
        encoder.shortstr(routing_key),
    )
    want = marshal(
        C.Basic.Deliver(
            consumer_tag=tag,
            delivery_tag=delivery_tag,
            redelivered=redelivered,
            exchange=exchange,
            routing_key=routing_key,
        ),
        channel,
    )
    assert got == want


@pytest.mark.parametrize(("exchange", "routing_key"), NAMES)
@pytest.mark.parametrize("redelivered", [False, True])
@pytest.mark.parametrize("message_count", [0, 1, 2**32 - 1])
def test_get_ok(exchange: str, routing_key: str, redelivered: bool, message_count: int) -> None:
    got = encoder.get_ok(7, 42, redelivered, exchange, routing_key, message_count)
    want = marshal(
        C.Basic.GetOk(
            delivery_tag=42,
            redelivered=redelivered,
            exchange=exchange,
            routing_key=routing_key,
            message_count=message_count,
        ),
        7,
    )
    assert got == want


@pytest.mark.parametrize("channel", [1, 300, 65535])
def test_get_empty(channel: int) -> None:
    assert encoder.get_empty(channel) == marshal(C.Basic.GetEmpty(), channel)


@pytest.mark.parametrize(("exchange", "routing_key"), NAMES)
@pytest.mark.parametrize(
    ("code", "text"), [(312, "NO_ROUTE"), (313, "NO_CONSUMERS"), (312, "nö route ✓")]
)
def test_basic_return(exchange: str, routing_key: str, code: int, text: str) -> None:
    got = encoder.basic_return(3, code, text, exchange, routing_key)
    want = marshal(
        C.Basic.Return(
            reply_code=code,
            reply_text=text,
            exchange=exchange,
            routing_key=routing_key,
        ),
        3,
    )
    assert got == want


@pytest.mark.parametrize("queue", ["q", "amq.gen-JzTY20BRgKO-HjmUJj0wLg", "a" * 255, ""])
@pytest.mark.parametrize(("messages", "consumers"), [(0, 0), (12, 3), (2**32 - 1, 2**32 - 1)])
def test_queue_declare_ok(queue: str, messages: int, consumers: int) -> None:
    got = encoder.queue_declare_ok(9, queue, messages, consumers)
    want = marshal(
        C.Queue.DeclareOk(queue=queue, message_count=messages, consumer_count=consumers),
        9,
    )
    assert got == want


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("delivery_tag", [0, 1, 2**32, 2**63 - 1])
def test_basic_ack(multiple: bool, delivery_tag: int) -> None:
    got = encoder.basic_ack(5, delivery_tag, multiple)
    assert got == marshal(C.Basic.Ack(delivery_tag=delivery_tag, multiple=multiple), 5)


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("delivery_tag", [1, 2**40])
def test_basic_nack(multiple: bool, delivery_tag: int) -> None:
    got = encoder.basic_nack(5, delivery_tag, multiple)
    want = marshal(C.Basic.Nack(delivery_tag=delivery_tag, multiple=multiple, requeue=False), 5)
    assert got == want


def test_utf8_names_round_trip() -> None:
    # RabbitMQ accepts any UTF-8 name; pamqp's constructors reject these, so
    # check the hand-written frames by decoding them instead.
    ex, rk, q = "ex.ü", "ключ", "tâches"
    _, ch, deliver = pframe.unmarshal(
        encoder.deliver(
            4, encoder.shortstr("tag"), 9, True, encoder.shortstr(ex), encoder.shortstr(rk)
        )
    )
    assert ch == 4 and isinstance(deliver, C.Basic.Deliver)
    assert (deliver.exchange, deliver.routing_key, deliver.delivery_tag) == (ex, rk, 9)
    _, _, get_ok = pframe.unmarshal(encoder.get_ok(4, 9, False, ex, rk, 2))
    assert isinstance(get_ok, C.Basic.GetOk)
    assert (get_ok.exchange, get_ok.routing_key, get_ok.message_count) == (ex, rk, 2)
    _, _, ret = pframe.unmarshal(encoder.basic_return(4, 312, "NO_ROUTE", ex, rk))
    assert isinstance(ret, C.Basic.Return)
    assert (ret.reply_code, ret.exchange, ret.routing_key) == (312, ex, rk)
    _, _, ok = pframe.unmarshal(encoder.queue_declare_ok(4, q, 1, 2))
    assert isinstance(ok, C.Queue.DeclareOk)
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q, 1, 2)


def test_delivery_tags_are_unsigned_64_bit() -> None:
    # pamqp's long-long is signed; AMQP's delivery tag is unsigned.
    top = b"\xff" * 8
    assert encoder.basic_ack(1, 2**64 - 1, False)[11:19] == top
    assert encoder.basic_nack(1, 2**64 - 1, False)[11:19] == top
    frame = encoder.deliver(1, b"\x01t", 2**64 - 1, False, b"\x00", b"\x00")
    assert frame[13:21] == top


def test_method_uses_pamqp() -> None:
    frame = C.Basic.ConsumeOk(consumer_tag="ctag")
    assert encoder.method(4, frame) == marshal(frame, 4)


def test_shortstr_rejects_long_strings() -> None:
    assert encoder.shortstr("é" * 127) == bytes([254]) + ("é" * 127).encode()
    with pytest.raises(ValueError):
        encoder.shortstr("é" * 128)  # 256 bytes in UTF-8


# -- content header and body frames ------------------------------------------------

PROPERTIES = [
    C.Basic.Properties(),
    C.Basic.Properties(delivery_mode=2),
    C.Basic.Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers={"x-retry": 3, "trace": "abc", "nested": {"a": [1, "b"]}},
        delivery_mode=1,
        priority=9,
        correlation_id="corr",
        reply_to="amq.rabbitmq.reply-to",
        expiration="60000",
        message_id="mid",
        message_type="event",
        user_id="guest",
        app_id="app",
    ),
]


def pamqp_content(channel: int, props: C.Basic.Properties, data: bytes, frame_max: int) -> bytes:
    out = marshal(pheader.ContentHeader(0, len(data), props), channel)
    chunk = frame_max - 8
    for i in range(0, len(data), chunk):
        out += marshal(pbody.ContentBody(data[i : i + chunk]), channel)
    return out


@pytest.mark.parametrize("props", PROPERTIES)
@pytest.mark.parametrize("size", [0, 1, 4087, 4088, 4089, 8176, 8177, 20000])
def test_content_matches_pamqp(props: C.Basic.Properties, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    got = encoder.content(2, props.marshal(), data, 4096)
    assert got == pamqp_content(2, props, data, 4096)


@pytest.mark.parametrize(
    ("size", "frame_max", "chunks"),
    [
        (0, 4096, []),
        (10, 4096, [10]),
        (4088, 4096, [4088]),
        (4089, 4096, [4088, 1]),
        (10000, 4096, [4088, 4088, 1824]),
        (131064 * 2, 131072, [131064, 131064]),
    ],
)
def test_content_splits_body_into_frame_max_minus_8_chunks(
    size: int, frame_max: int, chunks: list[int]
) -> None:
    data = bytes(i % 256 for i in range(size))
    out = encoder.content(1, b"\x00\x00", data, frame_max)
    frames = []
    pos = 0
    while pos < len(out):
        consumed, channel, frame = pframe.unmarshal(out[pos:])
        assert consumed <= frame_max
        frames.append((channel, frame))
        pos += consumed
    header = frames[0][1]
    assert isinstance(header, pheader.ContentHeader)
    assert header.body_size == size
    bodies = [f for _, f in frames[1:]]
    assert all(isinstance(b, pbody.ContentBody) for b in bodies)
    assert [len(b.value) for b in bodies] == chunks  # type: ignore[union-attr]
    assert b"".join(b.value for b in bodies) == data  # type: ignore[union-attr]
    assert {ch for ch, _ in frames} == {1}


def test_content_without_frame_max_sends_one_body_frame() -> None:
    data = b"z" * 300_000
    out = encoder.content(1, b"\x00\x00", data, 0)
    assert out == pamqp_content(1, C.Basic.Properties(), data, len(data) + 8)
