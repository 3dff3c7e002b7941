"""The sans-IO frame decoder: bytes in, events out, FrameError on violations."""

from __future__ import annotations

import random
import struct

import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat

from roost.amqp.decoder import (
    ContentTooLarge,
    Event,
    FrameDecoder,
    FrameError,
    HeartbeatReceived,
    MethodReceived,
    ProtocolHeaderReceived,
    PublishReceived,
)
from roost.amqp.wire import FRAME_END_BYTES, PROTOCOL_HEADER

PROPS = C.Basic.Properties(content_type="text/plain", delivery_mode=2, headers={"a": 1})


def method(frame: object, channel: int = 1) -> bytes:
    return bytes(pframe.marshal(frame, channel))  # type: ignore[arg-type]


def publish(exchange: str = "ex", routing_key: str = "rk", channel: int = 1, **kw: bool) -> bytes:
    return method(C.Basic.Publish(exchange=exchange, routing_key=routing_key, **kw), channel)


def content_header(size: int, channel: int = 1, props: C.Basic.Properties | None = None) -> bytes:
    return bytes(pframe.marshal(pheader.ContentHeader(0, size, props or PROPS), channel))


def body(data: bytes, channel: int = 1) -> bytes:
    return bytes(pframe.marshal(pbody.ContentBody(data), channel))


def raw_frame(ftype: int, channel: int, payload: bytes, end: bytes = FRAME_END_BYTES) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + end


def opened(frame_max: int = 131072, max_message_size: int = 16 * 1024 * 1024) -> FrameDecoder:
    """A decoder that has already accepted the protocol header,
    connection.open and channel.open on channels 1 to 9 (content is only
    assembled on channels the client opened)."""
    dec = FrameDecoder(frame_max, max_message_size)
    events = dec.feed(PROTOCOL_HEADER)
    assert len(events) == 1 and isinstance(events[0], ProtocolHeaderReceived)
    dec.feed(OPENING)
    return dec


OPENING = method(C.Connection.Open(virtual_host="/"), 0) + b"".join(
    method(C.Channel.Open(), n) for n in range(1, 10)
)


def feed_chunks(dec: FrameDecoder, data: bytes, sizes: list[int]) -> list[Event]:
    events: list[Event] = []
    pos = 0
    for n in sizes:
        events.extend(dec.feed(data[pos : pos + n]))
        pos += n
    events.extend(dec.feed(data[pos:]))
    return events


def raises(dec: FrameDecoder, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        dec.feed(data)
    return info.value


# -- protocol header ----------------------------------------------------------


def test_protocol_header_ok() -> None:
    dec = FrameDecoder()
    [ev] = dec.feed(PROTOCOL_HEADER)
    assert isinstance(ev, ProtocolHeaderReceived)
    assert ev.ok is True
    assert ev.raw == PROTOCOL_HEADER


def test_protocol_header_followed_by_frame_in_same_feed() -> None:
    dec = FrameDecoder()
    events = dec.feed(PROTOCOL_HEADER + method(C.Connection.StartOk(response="\0u\0p"), 0))
    assert [type(e) for e in events] == [ProtocolHeaderReceived, MethodReceived]
    ev = events[1]
    assert isinstance(ev, MethodReceived)
    assert ev.channel == 0
    assert isinstance(ev.method, C.Connection.StartOk)
    assert ev.method.response == "\0u\0p"


@pytest.mark.parametrize(
    "raw",
    [b"AMQP\x00\x00\x09\x00", b"AMQP\x01\x01\x00\x0a", b"AMQP\x00\x00\x08\x00"],
)
def test_wrong_protocol_version(raw: bytes) -> None:
    [ev] = FrameDecoder().feed(raw)
    assert isinstance(ev, ProtocolHeaderReceived)
    assert ev.ok is False
    assert ev.raw == raw


def test_not_amqp_at_all_is_rejected_without_waiting_for_eight_bytes() -> None:
    [ev] = FrameDecoder().feed(b"GET ")
    assert isinstance(ev, ProtocolHeaderReceived)
    assert ev.ok is False
    assert ev.raw == b"GET "


def test_partial_protocol_header_waits() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"AM") == []
    assert dec.feed(b"QP\x00") == []
    assert dec.feed(b"\x00\x09") == []
    [ev] = dec.feed(b"\x01")
    assert isinstance(ev, ProtocolHeaderReceived)
    assert ev.ok is True


def test_protocol_header_byte_by_byte_then_frames() -> None:
    dec = FrameDecoder()
    stream = PROTOCOL_HEADER + method(C.Channel.Open(), 1)
    events: list[Event] = []
    for i in range(len(stream)):
        events.extend(dec.feed(stream[i : i + 1]))
    assert [type(e) for e in events] == [ProtocolHeaderReceived, MethodReceived]


# -- frames across feed() boundaries -------------------------------------------


def _conversation() -> tuple[bytes, bytes]:
    """A stream exercising every frame type, and the body it publishes."""
    payload = bytes(range(256)) * 40  # 10240 bytes, sent as three body frames
    stream = (
        method(C.Channel.Open(), 1)
        + pheartbeat.Heartbeat.marshal()
        + publish("amq.direct", "key.1", mandatory=True)
        + content_header(len(payload))
        + body(payload[:4000])
        + body(payload[4000:8000])
        + body(payload[8000:])
        + method(C.Basic.Ack(delivery_tag=7, multiple=True), 1)
        + publish("", "empty", immediate=True)
        + content_header(0)
        + pheartbeat.Heartbeat.marshal()
    )
    return stream, payload


def _check_conversation(events: list[Event], payload: bytes) -> None:
    kinds = [type(e) for e in events]
    assert kinds == [
        MethodReceived,
        HeartbeatReceived,
        PublishReceived,
        MethodReceived,
        PublishReceived,
        HeartbeatReceived,
    ]
    first = events[0]
    assert isinstance(first, MethodReceived) and isinstance(first.method, C.Channel.Open)
    pub = events[2]
    assert isinstance(pub, PublishReceived)
    assert pub.channel == 1
    assert pub.exchange == "amq.direct"
    assert pub.routing_key == "key.1"
    assert pub.mandatory is True
    assert pub.immediate is False
    assert pub.properties == PROPS.marshal()
    assert pub.body == payload
    ack = events[3]
    assert isinstance(ack, MethodReceived) and isinstance(ack.method, C.Basic.Ack)
    assert ack.method.delivery_tag == 7 and ack.method.multiple is True
    empty = events[4]
    assert isinstance(empty, PublishReceived)
    assert (empty.exchange, empty.routing_key) == ("", "empty")
    assert empty.mandatory is False and empty.immediate is True
    assert empty.body == b""


def test_whole_stream_in_one_feed() -> None:
    stream, payload = _conversation()
    _check_conversation(opened().feed(stream), payload)


def test_stream_fed_byte_by_byte() -> None:
    stream, payload = _conversation()
    dec = opened()
    events: list[Event] = []
    for i in range(len(stream)):
        events.extend(dec.feed(stream[i : i + 1]))
    _check_conversation(events, payload)


@pytest.mark.parametrize("seed", range(5))
def test_stream_fed_in_random_chunks(seed: int) -> None:
    stream, payload = _conversation()
    rnd = random.Random(seed)
    sizes = [rnd.randint(0, 50) for _ in range(len(stream) // 10)]
    _check_conversation(feed_chunks(opened(), stream, sizes), payload)


def test_frame_end_byte_arriving_alone_completes_the_frame() -> None:
    dec = opened()
    frame = method(C.Basic.Qos(prefetch_count=3), 2)
    assert dec.feed(frame[:-1]) == []
    [ev] = dec.feed(frame[-1:])
    assert isinstance(ev, MethodReceived)
    assert ev.channel == 2
    assert isinstance(ev.method, C.Basic.Qos) and ev.method.prefetch_count == 3


def test_publishes_interleaved_on_two_channels() -> None:
    dec = opened()
    events = dec.feed(
        publish("", "a", channel=1)
        + publish("", "b", channel=2)
        + content_header(3, channel=2)
        + content_header(2, channel=1)
        + body(b"b1", channel=2)
        + body(b"a1", channel=1)
        + body(b"2", channel=2)
    )
    assert [
        (e.channel, e.routing_key, e.body) for e in events if isinstance(e, PublishReceived)
    ] == [
        (1, "a", b"a1"),
        (2, "b", b"b12"),
    ]


def test_publish_keeps_property_bytes_as_received() -> None:
    props = C.Basic.Properties(
        message_id="m-1", timestamp=None, app_id="app", headers={"x": "y", "n": 3}
    )
    dec = opened()
    [ev] = dec.feed(publish() + content_header(1, props=props) + body(b"!"))
    assert isinstance(ev, PublishReceived)
    assert ev.properties == props.marshal()


def test_non_ascii_exchange_and_routing_key() -> None:
    dec = opened()
    rk = "ключ.ü".encode()
    frame_payload = b"\x00\x3c\x00\x28\x00\x00" + b"\x02ex" + bytes([len(rk)]) + rk + b"\x00"
    [ev] = dec.feed(raw_frame(1, 1, frame_payload) + content_header(0))
    assert isinstance(ev, PublishReceived)
    assert ev.exchange == "ex"
    assert ev.routing_key == "ключ.ü"


def test_heartbeat_event() -> None:
    dec = opened()
    events = dec.feed(pheartbeat.Heartbeat.marshal() * 3)
    assert len(events) == 3
    assert all(isinstance(e, HeartbeatReceived) for e in events)


# -- content sequence violations ------------------------------------------------


def test_content_header_without_publish() -> None:
    err = raises(opened(), content_header(5))
    assert err.code == 505
    assert err.text == "expected method frame, got non method frame instead"
    assert (err.class_id, err.method_id) == (0, 0)


def test_body_without_anything() -> None:
    err = raises(opened(), body(b"hello"))
    assert err.code == 505
    assert err.text == "expected method frame, got non method frame instead"


def test_body_without_header() -> None:
    err = raises(opened(), publish() + body(b"hello"))
    assert err.code == 505
    assert err.text == (
        "expected content header for class 60, got non content header frame instead"
    )
    assert (err.class_id, err.method_id) == (60, 40)


def test_method_while_awaiting_header() -> None:
    err = raises(opened(), publish() + method(C.Basic.Qos(), 1))
    assert err.code == 505
    assert err.text == (
        "expected content header for class 60, got non content header frame instead"
    )
    assert (err.class_id, err.method_id) == (60, 40)


def test_method_while_awaiting_body() -> None:
    err = raises(opened(), publish() + content_header(5) + method(C.Basic.Qos(), 1))
    assert err.code == 505
    assert err.text == "expected content body, got non content body frame instead"
    assert (err.class_id, err.method_id) == (60, 40)


def test_second_header_while_awaiting_body() -> None:
    err = raises(opened(), publish() + content_header(5) + content_header(5))
    assert err.code == 505
    assert err.text == "expected content body, got non content body frame instead"


def test_publish_while_awaiting_body() -> None:
    err = raises(opened(), publish() + content_header(5) + body(b"ab") + publish())
    assert err.code == 505


def test_content_header_for_another_class() -> None:
    header = raw_frame(2, 1, struct.pack(">HHQH", 50, 0, 5, 0))
    err = raises(opened(), publish() + header)
    assert err.code == 505
    assert err.text == "expected content header for class 60, got one for class 50 instead"
    assert (err.class_id, err.method_id) == (60, 40)


def test_body_larger_than_declared() -> None:
    err = raises(opened(), publish() + content_header(2) + body(b"hello"))
    assert err.code == 501


def test_other_channel_does_not_satisfy_content() -> None:
    # The body on channel 2 does not belong to channel 1's publish.
    err = raises(opened(), publish(channel=1) + content_header(2, channel=1) + body(b"ab", 2))
    assert err.code == 505


def test_abandon_content_forgets_half_received_publish() -> None:
    dec = opened()
    assert dec.feed(publish() + content_header(10)) == []
    dec.abandon_content(1)
    [ev] = dec.feed(method(C.Basic.Qos(), 1))
    assert isinstance(ev, MethodReceived)


# -- framing errors -----------------------------------------------------------------


def test_bad_frame_end() -> None:
    frame = method(C.Basic.Qos(), 1)
    err = raises(opened(), frame[:-1] + b"\x00")
    assert err.code == 501
    assert "0x00" in err.text


def test_bad_frame_end_detected_across_feeds() -> None:
    dec = opened()
    frame = method(C.Basic.Qos(), 1)
    assert dec.feed(frame[:-1]) == []
    err = raises(dec, b"\xff")
    assert err.code == 501


def test_frame_payload_up_to_frame_max_is_accepted() -> None:
    # RabbitMQ tolerates payloads of frame_max bytes (its FRAME_SIZE_FUDGE).
    dec = opened(frame_max=4096)
    [ev] = dec.feed(body_publish_frame(4096))
    assert isinstance(ev, PublishReceived)
    assert len(ev.body) == 4096


def body_publish_frame(size: int) -> bytes:
    return publish() + content_header(size) + body(b"x" * size)


def test_oversized_frame() -> None:
    dec = opened(frame_max=4096)
    err = raises(dec, publish() + content_header(5000) + body(b"x" * 4097))
    assert err.code == 501
    assert "4097" in err.text


def test_oversized_frame_detected_from_its_header_alone() -> None:
    # Only the 7-byte frame header has arrived: no need to buffer the payload.
    dec = opened(frame_max=4096)
    err = raises(dec, struct.pack(">BHI", 1, 1, 1_000_000))
    assert err.code == 501


def test_frame_max_raised_after_tune() -> None:
    dec = opened(frame_max=4096)
    dec.frame_max = 131072
    [ev] = dec.feed(body_publish_frame(100_000))
    assert isinstance(ev, PublishReceived)
    assert len(ev.body) == 100_000


def test_unknown_frame_type() -> None:
    err = raises(opened(), raw_frame(7, 1, b"abc"))
    assert err.code == 501
    assert "7" in err.text


def test_heartbeat_on_non_zero_channel() -> None:
    err = raises(opened(), raw_frame(8, 1, b""))
    assert err.code == 505


def test_content_too_large_skips_body() -> None:
    dec = opened(frame_max=4096, max_message_size=1000)
    events = dec.feed(
        publish(channel=3)
        + content_header(5000, channel=3)
        + b"".join(body(b"x" * 1000, 3) for _ in range(5))
    )
    assert len(events) == 1
    [ev] = events
    assert isinstance(ev, ContentTooLarge)
    assert (ev.channel, ev.size) == (3, 5000)
    # The decoder is back in sync: the next publish on that channel works.
    [ok] = dec.feed(publish(channel=3) + content_header(3, channel=3) + body(b"abc", 3))
    assert isinstance(ok, PublishReceived)
    assert ok.body == b"abc"


def test_content_too_large_body_fed_byte_by_byte() -> None:
    dec = opened(max_message_size=10)
    stream = (
        publish()
        + content_header(20)
        + body(b"y" * 20)
        + publish()
        + content_header(2)
        + body(b"ok")
    )
    events: list[Event] = []
    for i in range(len(stream)):
        events.extend(dec.feed(stream[i : i + 1]))
    assert [type(e) for e in events] == [ContentTooLarge, PublishReceived]
    last = events[1]
    assert isinstance(last, PublishReceived) and last.body == b"ok"


def test_message_at_the_size_limit_is_delivered() -> None:
    dec = opened(max_message_size=10)
    [ev] = dec.feed(publish() + content_header(10) + body(b"0123456789"))
    assert isinstance(ev, PublishReceived)


def test_unknown_method_id() -> None:
    err = raises(opened(), raw_frame(1, 1, b"\x00\x3c\x03\xe7"))
    assert err.code == 503
    assert "class 60, method 999" in err.text


def test_unknown_class_id() -> None:
    err = raises(opened(), raw_frame(1, 1, b"\x03\xe7\x00\x0a"))
    assert err.code == 503


def test_truncated_method_frame() -> None:
    # queue.declare cut short inside the queue name.
    err = raises(opened(), raw_frame(1, 1, b"\x00\x32\x00\x0a\x00\x00\x05ab"))
    assert err.code == 501
    assert (err.class_id, err.method_id) == (50, 10)


def test_method_frame_shorter_than_its_ids() -> None:
    err = raises(opened(), raw_frame(1, 1, b"\x00\x32"))
    assert err.code == 501


def test_truncated_publish_frame() -> None:
    err = raises(opened(), raw_frame(1, 1, b"\x00\x3c\x00\x28\x00\x00\x05ab"))
    assert err.code == 501
    assert (err.class_id, err.method_id) == (60, 40)


def test_content_header_too_short() -> None:
    err = raises(opened(), publish() + raw_frame(2, 1, b"\x00\x3c\x00"))
    assert err.code == 501


def test_unfinished_bytes_return_to_zero() -> None:
    """What unfinished publishes hold is given back as each completes (or
    is skipped as too large): a long-lived connection never drifts towards
    its max_unfinished limit."""
    dec = opened(frame_max=4096, max_message_size=10_000)
    rng = random.Random(7)
    for i in range(200):
        size = rng.choice([0, 1, 4000, 9000, 12_000])  # 12_000: too large, skipped
        data = publish(channel=1 + i % 3) + content_header(size, channel=1 + i % 3)
        for pos in range(0, size, 3000):
            data += body(b"x" * min(3000, size - pos), channel=1 + i % 3)
        feed_chunks(dec, data, [rng.randint(1, 5000) for _ in range(10)])
        assert dec.unfinished == 0
        assert not dec.in_content


def test_unfinished_bytes_over_the_limit_are_refused() -> None:
    dec = FrameDecoder(131072, 16 * 1024 * 1024, max_unfinished=10_000)
    dec.feed(PROTOCOL_HEADER + OPENING)
    with pytest.raises(FrameError) as err:
        dec.feed(
            publish(channel=1)
            + content_header(100_000, channel=1)
            + body(b"x" * 6000, channel=1)
            + publish(channel=2)
            + content_header(100_000, channel=2)
            + body(b"x" * 6000, channel=2)
        )
    assert err.value.code == 506


def test_publish_refused_on_a_channel_not_opened() -> None:
    dec = FrameDecoder(131072)
    dec.feed(PROTOCOL_HEADER)
    with pytest.raises(FrameError) as err:
        dec.feed(publish(channel=1))
    assert err.value.code == 503  # before connection.open
    dec = opened()
    with pytest.raises(FrameError) as err:
        dec.feed(publish(channel=12))
    assert (err.value.code, err.value.class_id, err.value.method_id) == (504, 60, 40)
    dec = opened()
    dec.feed(method(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1))
    with pytest.raises(FrameError) as err:
        dec.feed(publish(channel=1))
    assert err.value.code == 504
