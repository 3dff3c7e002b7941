"""Basic-class content properties, kept as the raw bytes a publisher sent.

Messages carry their properties exactly as received so they are delivered
byte-for-byte; the few fields the broker itself acts on are read from the raw
bytes without decoding the rest. Shared by the wire layer, the broker model
and the store, so it lives outside all three.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands, decode

FLAG_CONTENT_TYPE = 0x8000
FLAG_CONTENT_ENCODING = 0x4000
FLAG_HEADERS = 0x2000
FLAG_DELIVERY_MODE = 0x1000
FLAG_PRIORITY = 0x0800
FLAG_CORRELATION_ID = 0x0400
FLAG_REPLY_TO = 0x0200
FLAG_EXPIRATION = 0x0100
FLAG_MESSAGE_ID = 0x0080
FLAG_TIMESTAMP = 0x0040
FLAG_TYPE = 0x0020
FLAG_USER_ID = 0x0010
FLAG_APP_ID = 0x0008
FLAG_CLUSTER_ID = 0x0004

EMPTY = b"\x00\x00"

_unpack_long = struct.Struct(">I").unpack_from


class PropertyError(ValueError):
    """The property list is malformed."""


class Scanned:
    """The fields the broker acts on, read straight from the raw bytes."""

    __slots__ = ("delivery_mode", "expiration", "priority", "reply_to", "user_id")

    def __init__(self) -> None:
        self.delivery_mode = 0
        self.priority: int | None = None
        self.reply_to: str | None = None
        self.expiration: str | None = None
        self.user_id: str | None = None


def _skip_flags(raw: bytes) -> tuple[int, int]:
    if len(raw) < 2:
        raise PropertyError("property flags truncated")
    flags = (raw[0] << 8) | raw[1]
    pos = 2
    word = flags
    while word & 1:  # continuation bit: further flag words follow
        if len(raw) < pos + 2:
            raise PropertyError("property flags truncated")
        word = (raw[pos] << 8) | raw[pos + 1]
        pos += 2
    return flags, pos


def scan(raw: bytes) -> Scanned:
    """Read delivery mode, priority, reply-to, expiration and user-id.

    Also checks that the list is exactly as long as its flags say: RabbitMQ
    refuses a publish whose properties do not parse, and a malformed list
    must never reach a consumer, whose client would fail on it.
    """
    out = Scanned()
    flags, pos = _skip_flags(raw)
    try:
        if flags & FLAG_CONTENT_TYPE:
            pos += 1 + raw[pos]
        if flags & FLAG_CONTENT_ENCODING:
            pos += 1 + raw[pos]
        if flags & FLAG_HEADERS:
            pos += 4 + _unpack_long(raw, pos)[0]
        if flags & FLAG_DELIVERY_MODE:
            out.delivery_mode = raw[pos]
            pos += 1
        if flags & FLAG_PRIORITY:
            out.priority = raw[pos]
            pos += 1
        if flags & FLAG_CORRELATION_ID:
            pos += 1 + raw[pos]
        if flags & FLAG_REPLY_TO:
            n = raw[pos]
            out.reply_to = raw[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
            pos += 1 + n
        if flags & FLAG_EXPIRATION:
            n = raw[pos]
            out.expiration = raw[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
            pos += 1 + n
        if flags & FLAG_MESSAGE_ID:
            pos += 1 + raw[pos]
        if flags & FLAG_TIMESTAMP:
            pos += 8
        if flags & FLAG_TYPE:
            pos += 1 + raw[pos]
        if flags & FLAG_USER_ID:
            n = raw[pos]
            out.user_id = raw[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
            pos += 1 + n
        if flags & FLAG_APP_ID:
            pos += 1 + raw[pos]
        if flags & FLAG_CLUSTER_ID:
            pos += 1 + raw[pos]
    except (IndexError, struct.error) as exc:
        raise PropertyError("property list truncated") from exc
    if pos != len(raw):
        raise PropertyError(
            "property list truncated" if pos > len(raw) else "property list has trailing bytes"
        )
    return out


# Property fields in wire order, with how to skip each: a short string,
# the headers table (long length), or a fixed number of bytes.
_FIELDS = (
    (FLAG_CONTENT_TYPE, "s"),
    (FLAG_CONTENT_ENCODING, "s"),
    (FLAG_HEADERS, "t"),
    (FLAG_DELIVERY_MODE, 1),
    (FLAG_PRIORITY, 1),
    (FLAG_CORRELATION_ID, "s"),
    (FLAG_REPLY_TO, "s"),
    (FLAG_EXPIRATION, "s"),
    (FLAG_MESSAGE_ID, "s"),
    (FLAG_TIMESTAMP, 8),
    (FLAG_TYPE, "s"),
    (FLAG_USER_ID, "s"),
    (FLAG_APP_ID, "s"),
    (FLAG_CLUSTER_ID, "s"),
)


def _field_at(raw: bytes, target: int) -> tuple[int, int]:
    """Flags, and the offset where property ``target`` starts (skipping the
    fields before it); raises PropertyError on a truncated list."""
    flags, pos = _skip_flags(raw)
    try:
        for flag, how in _FIELDS:
            if flag == target:
                break
            if flags & flag:
                if how == "s":
                    pos += 1 + raw[pos]
                elif how == "t":
                    pos += 4 + _unpack_long(raw, pos)[0]
                else:
                    assert isinstance(how, int)
                    pos += how
    except (IndexError, struct.error) as exc:
        raise PropertyError("property list truncated") from exc
    if pos >= len(raw) and flags & target:
        raise PropertyError("property list truncated")
    return flags, pos


def replace_reply_to(raw: bytes, reply_to: str) -> bytes:
    """``raw`` with its reply-to property replaced and every other byte kept.

    Re-encoding the whole property list would not round-trip: field tables
    lose their value types (a double comes back as a float, key order
    changes), whereas RabbitMQ keeps them exactly as sent.
    """
    flags, pos = _field_at(raw, FLAG_REPLY_TO)
    if not flags & FLAG_REPLY_TO:
        raise PropertyError("no reply-to property to replace")
    end = pos + 1 + raw[pos]
    if end > len(raw):
        raise PropertyError("property list truncated")
    value = reply_to.encode("utf-8")
    return raw[:pos] + bytes((len(value),)) + value + raw[end:]


def decode_properties(raw: bytes) -> commands.Basic.Properties:
    """Decode every property (slow path: only when the broker must rewrite)."""
    scan(raw)  # pamqp reads short strings past the end without complaint
    flags, pos = _skip_flags(raw)
    props = commands.Basic.Properties()
    try:
        props.unmarshal(flags, raw[pos:])
    # RecursionError: pamqp decodes nested tables recursively, so a table
    # nested a few hundred levels deep would otherwise escape as a crash.
    except (struct.error, ValueError, IndexError, RecursionError) as exc:
        raise PropertyError(str(exc)) from exc
    return props


def encode_properties(props: commands.Basic.Properties) -> bytes:
    return bytes(props.marshal())


def headers_of(raw: bytes) -> dict[str, Any] | None:
    """The headers table, or None when the message has none."""
    flags, pos = _field_at(raw, FLAG_HEADERS)
    if not flags & FLAG_HEADERS:
        return None
    try:
        _, table = decode.field_table(raw[pos:])
    except (struct.error, ValueError, IndexError, RecursionError) as exc:  # see above
        raise PropertyError(str(exc)) from exc
    return dict(table)


# The deepest headers table a publish may carry, itself the first level
# (tables and arrays count alike). pamqp decodes recursively, two stack
# frames a level: without a fixed bound, a table just shallow enough to
# decode at publish could fail to decode deeper in the stack
# (dead-lettering), outside any handler.
MAX_HEADER_NESTING = 128


def nesting_depth(value: Any) -> int:
    """How deeply tables and arrays nest in ``value`` (0 for a scalar);
    iterative, so it works at any depth."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((item, depth) for item in v)
    return deepest


def message_id_of(raw: bytes) -> str | None:
    """The message-id property, or None when the message has none."""
    flags, pos = _field_at(raw, FLAG_MESSAGE_ID)
    if not flags & FLAG_MESSAGE_ID:
        return None
    n = raw[pos]
    return raw[pos + 1 : pos + 1 + n].decode("utf-8", "replace")


def _find_header(raw: bytes, name: str) -> tuple[int, int, int, int, int] | None:
    """Where header ``name`` sits: (table offset, table length, entry start,
    value start, entry end), or None when there is no such header."""
    flags, pos = _field_at(raw, FLAG_HEADERS)
    if not flags & FLAG_HEADERS:
        return None
    key = name.encode("utf-8")
    try:
        length = _unpack_long(raw, pos)[0]
        end = pos + 4 + length
        entry = pos + 4
        while entry < end:
            value = entry + 1 + raw[entry]
            consumed, _ = decode.embedded_value(raw[value:end])
            if not consumed:
                raise PropertyError("header table truncated")
            if raw[entry + 1 : value] == key:
                return pos, length, entry, value, value + consumed
            entry = value + consumed
    except (IndexError, struct.error, ValueError, RecursionError) as exc:  # deep nesting
        raise PropertyError(str(exc)) from exc
    return None


def remove_header(raw: bytes, name: str) -> bytes:
    """``raw`` without the header ``name`` (unchanged when it has none).

    Only that entry's bytes go and the table length shrinks by as much; the
    other entries and properties keep their exact encoding (see
    :func:`replace_reply_to`). A table left empty stays, as in RabbitMQ.
    """
    found = _find_header(raw, name)
    if found is None:
        return raw
    pos, length, entry, _, after = found
    return (
        raw[:pos] + struct.pack(">I", length - (after - entry)) + raw[pos + 4 : entry] + raw[after:]
    )


def replace_header_int(raw: bytes, name: str, value: int) -> bytes:
    """``raw`` with the value of the existing header ``name`` replaced by the
    integer ``value`` (a signed 32-bit ``I``, or a 64-bit ``l`` when it does
    not fit); unchanged when there is no such header. Every other byte keeps
    its encoding, as in :func:`remove_header`."""
    found = _find_header(raw, name)
    if found is None:
        return raw
    pos, length, _, start, after = found
    new = (
        b"I" + struct.pack(">i", value)
        if -(2**31) <= value < 2**31
        else b"l" + struct.pack(">q", value)
    )
    return (
        raw[:pos]
        + struct.pack(">I", length - (after - start) + len(new))
        + raw[pos + 4 : start]
        + new
        + raw[after:]
    )
