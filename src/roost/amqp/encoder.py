"""Server-to-client frames.

Most methods are marshalled by pamqp. The delivery path (basic.deliver,
get-ok, return, and the content header and body frames after them) and the
few methods whose pamqp constructors reject names RabbitMQ accepts are
written by hand; ``tests/amqp/test_encoder.py`` checks them byte for byte
against pamqp.
"""

from __future__ import annotations

import struct

from pamqp import frame as pframe
from pamqp.base import Frame as MethodFrame

from roost.amqp.wire import (
    BASIC_ACK,
    BASIC_CLASS,
    BASIC_DELIVER,
    BASIC_GET_EMPTY,
    BASIC_GET_OK,
    BASIC_NACK,
    BASIC_RETURN,
    FRAME_BODY,
    FRAME_HEADER,
    FRAME_METHOD,
    QUEUE_DECLARE_OK,
    method_prefix,
)
from roost.amqp.wire import FRAME_END_BYTES as END
from roost.broker.message import Message

_head = struct.Struct(">BHI").pack
_content_head = struct.Struct(">BHIHHQ").pack
_u64 = struct.Struct(">Q").pack
_u32 = struct.Struct(">I").pack
_DELIVER = method_prefix(BASIC_DELIVER)
_GET_OK = method_prefix(BASIC_GET_OK)
_GET_EMPTY = method_prefix(BASIC_GET_EMPTY) + b"\x00"  # and an empty cluster-id
_RETURN = method_prefix(BASIC_RETURN)
_DECLARE_OK = method_prefix(QUEUE_DECLARE_OK)
_ACK = method_prefix(BASIC_ACK)
_NACK = method_prefix(BASIC_NACK)


def method(channel: int, frame: MethodFrame) -> bytes:
    return bytes(pframe.marshal(frame, channel))


def shortstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError("short string longer than 255 bytes")
    return bytes((len(raw),)) + raw


def _method_frame(channel: int, payload: bytes) -> bytes:
    return _head(FRAME_METHOD, channel, len(payload)) + payload + END


def content(channel: int, properties: bytes, body: bytes, frame_max: int) -> bytes:
    """Content header frame plus body frames split to fit ``frame_max``."""
    size = len(body)
    header = (
        _content_head(FRAME_HEADER, channel, 12 + len(properties), BASIC_CLASS, 0, size)
        + properties
        + END
    )
    chunk = frame_max - 8 if frame_max else size or 1
    if size <= chunk:
        if not size:
            return header
        return header + _head(FRAME_BODY, channel, size) + body + END
    parts = [header]
    for i in range(0, size, chunk):
        piece = body[i : i + chunk]
        parts.append(_head(FRAME_BODY, channel, len(piece)))
        parts.append(piece)
        parts.append(END)
    return b"".join(parts)


def deliver(
    channel: int,
    consumer_tag: bytes,
    delivery_tag: int,
    redelivered: bool,
    exchange: bytes,
    routing_key: bytes,
) -> bytes:
    """basic.deliver; ``consumer_tag``, ``exchange``, ``routing_key`` are
    pre-encoded short strings."""
    payload = (
        _DELIVER
        + consumer_tag
        + _u64(delivery_tag)
        + (b"\x01" if redelivered else b"\x00")
        + exchange
        + routing_key
    )
    return _method_frame(channel, payload)


_deliver_head = struct.Struct(">BHIHH").pack
_tag_bit = struct.Struct(">QB").pack
_exrk_cache: dict[tuple[str, str], bytes] = {}


def deliver_message(
    channel: int,
    consumer_tag: bytes,
    delivery_tag: int,
    redelivered: bool,
    message: Message,
    frame_max: int,
) -> bytes:
    """basic.deliver plus the message's content frames, as one bytes object.

    ``consumer_tag`` is a pre-encoded short string. The same frames as
    :func:`deliver` followed by :func:`content`, built with fewer copies.
    """
    exrk_key = (message.exchange, message.routing_key)
    exrk = _exrk_cache.get(exrk_key)
    if exrk is None:
        exrk = shortstr(message.exchange) + shortstr(message.routing_key)
        if len(_exrk_cache) >= 4096:
            _exrk_cache.clear()
        _exrk_cache[exrk_key] = exrk
    body = message.body
    props = message.properties
    size = len(body)
    # Numbers spelled out, not the wire constants: this runs per delivery,
    # where a literal costs less than a module global's lookup (7 of them:
    # ~1% of a delivery). test_encoder.py checks the bytes against pamqp.
    method = (
        _deliver_head(1, channel, 13 + len(consumer_tag) + len(exrk), 60, 60)
        + consumer_tag
        + _tag_bit(delivery_tag, redelivered)
        + exrk
    )
    if 0 < size <= frame_max - 8:
        return b"".join(
            (
                method,
                b"\xce",
                _content_head(2, channel, 12 + len(props), 60, 0, size),
                props,
                b"\xce",
                _head(3, channel, size),
                body,
                b"\xce",
            )
        )
    return method + END + content(channel, props, body, frame_max)


def get_ok(
    channel: int,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    message_count: int,
) -> bytes:
    payload = (
        _GET_OK
        + _u64(delivery_tag)
        + (b"\x01" if redelivered else b"\x00")
        + shortstr(exchange)
        + shortstr(routing_key)
        + _u32(message_count)
    )
    return _method_frame(channel, payload)


def get_empty(channel: int) -> bytes:
    return _method_frame(channel, _GET_EMPTY)


def basic_return(
    channel: int, reply_code: int, reply_text: str, exchange: str, routing_key: str
) -> bytes:
    payload = (
        _RETURN
        + struct.pack(">H", reply_code)
        + shortstr(reply_text)
        + shortstr(exchange)
        + shortstr(routing_key)
    )
    return _method_frame(channel, payload)


def queue_declare_ok(channel: int, queue: str, message_count: int, consumer_count: int) -> bytes:
    payload = _DECLARE_OK + shortstr(queue) + _u32(message_count) + _u32(consumer_count)
    return _method_frame(channel, payload)


def basic_ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    return _method_frame(channel, _ACK + _u64(delivery_tag) + (b"\x01" if multiple else b"\x00"))


def basic_nack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    # Bits: multiple, requeue (always false from the server).
    return _method_frame(channel, _NACK + _u64(delivery_tag) + (b"\x01" if multiple else b"\x00"))
