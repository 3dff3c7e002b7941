"""roost.properties reads raw property bytes as pamqp writes them."""

from __future__ import annotations

import datetime
import decimal
import itertools
import struct
from typing import Any

import pytest
from pamqp import commands as C
from pamqp import encode

from roost import properties
from roost.properties import PropertyError, decode_properties, headers_of, scan

# The five fields scan() extracts, with the values used for them.
SCANNED: dict[str, Any] = {
    "delivery_mode": 2,
    "priority": 7,
    "reply_to": "amq.rabbitmq.reply-to.g1h2AA==",
    "expiration": "60000",
    "user_id": "guest",
}
# Every other field, which scan() must step over.
SKIPPED: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "headers": {"x-death": [{"count": 1, "queue": "q"}], "n": 5, "s": "v"},
    "correlation_id": "corr-1",
    "message_id": "msg-1",
    "timestamp": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
    "message_type": "order.created",
    "app_id": "billing",
}
SKIPPED_SETS = [
    (),
    tuple(SKIPPED),
    ("content_type", "headers", "correlation_id", "timestamp", "app_id"),
    ("content_encoding", "message_id", "message_type"),
    ("headers",),
    ("correlation_id", "message_id", "timestamp", "message_type"),
]


def _combinations() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    scanned_sets = [
        combo for n in range(len(SCANNED) + 1) for combo in itertools.combinations(SCANNED, n)
    ]
    return [(a, b) for a in scanned_sets for b in SKIPPED_SETS]


def _props(fields: tuple[str, ...]) -> C.Basic.Properties:
    values = {**SCANNED, **SKIPPED}
    return C.Basic.Properties(**{name: values[name] for name in fields})


@pytest.mark.parametrize(("scanned", "skipped"), _combinations())
def test_scan_reads_the_fields_it_needs(scanned: tuple[str, ...], skipped: tuple[str, ...]) -> None:
    raw = _props(scanned + skipped).marshal()
    out = scan(raw)
    assert out.delivery_mode == (2 if "delivery_mode" in scanned else 0)
    assert out.priority == (7 if "priority" in scanned else None)
    assert out.reply_to == (SCANNED["reply_to"] if "reply_to" in scanned else None)
    assert out.expiration == (SCANNED["expiration"] if "expiration" in scanned else None)
    assert out.user_id == ("guest" if "user_id" in scanned else None)


@pytest.mark.parametrize(("scanned", "skipped"), _combinations()[::7])
def test_decode_properties_round_trips(scanned: tuple[str, ...], skipped: tuple[str, ...]) -> None:
    props = _props(scanned + skipped)
    decoded = decode_properties(props.marshal())
    for name in props.__slots__:
        assert getattr(decoded, name) == getattr(props, name), name
    assert properties.encode_properties(decoded) == props.marshal()


def test_empty_property_list() -> None:
    assert C.Basic.Properties().marshal() == properties.EMPTY
    out = scan(properties.EMPTY)
    assert (out.delivery_mode, out.priority, out.reply_to) == (0, None, None)
    assert headers_of(properties.EMPTY) is None
    assert decode_properties(properties.EMPTY).delivery_mode is None


def test_cluster_id_is_stepped_over() -> None:
    # pamqp refuses to write the deprecated cluster-id; it comes last, after
    # everything scan() reads, so appending it by hand is enough.
    raw = bytearray(_props(("delivery_mode", "user_id", "app_id")).marshal())
    raw[1] |= properties.FLAG_CLUSTER_ID
    raw += b"\x03c-1"
    out = scan(bytes(raw))
    assert out.delivery_mode == 2 and out.user_id == "guest"


def test_non_utf8_short_strings_do_not_break_scan() -> None:
    raw = struct.pack(">H", properties.FLAG_REPLY_TO) + b"\x02\xff\xfe"
    assert scan(raw).reply_to == "\ufffd\ufffd"


# -- headers --------------------------------------------------------------------

# Every type pamqp's encoder writes into a field table.
ALL_TYPES: dict[str, Any] = {
    "true": True,
    "false": False,
    "short-short": -5,
    "short": 1000,
    "short-neg": -1000,
    "unsigned-short": 40000,
    "long": -100000,
    "unsigned-long": 3_000_000_000,
    "long-long": 2**40,
    "long-long-neg": -(2**40),
    "float": 1.5,
    "decimal": decimal.Decimal("3.14"),
    "string": "héllo",
    "empty": "",
    "bytes": bytearray(b"\x00\x01\xff"),
    "timestamp": datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "table": {"inner": {"deep": 1}, "list": [1, "two"]},
    "array": [True, 2, "three", 4.5, {"k": "v"}, [1, [2]], None],
    "void": None,
}


@pytest.mark.parametrize(
    "before",
    [(), ("content_type",), ("content_encoding",), ("content_type", "content_encoding")],
)
def test_headers_with_every_field_type(before: tuple[str, ...]) -> None:
    props = C.Basic.Properties(
        **{name: SKIPPED[name] for name in before},
        headers=ALL_TYPES,
        delivery_mode=2,
        reply_to="r",
    )
    raw = props.marshal()
    assert headers_of(raw) == ALL_TYPES
    out = scan(raw)
    assert out.delivery_mode == 2 and out.reply_to == "r"


def _table(entries: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(bytes([len(k)]) + k.encode() + v for k, v in entries)
    return struct.pack(">I", len(body)) + body


def test_headers_with_type_tags_pamqp_only_reads() -> None:
    # Other clients write types pamqp's encoder never produces (RabbitMQ's
    # 'b'/'B' octets, 'd' doubles, 'l' long-longs, 'u' short-uints ...).
    table = _table(
        [
            ("b", b"b" + struct.pack(">b", -3)),
            ("B", b"B" + struct.pack(">B", 250)),
            ("s", b"s" + struct.pack(">h", -300)),
            ("u", b"u" + struct.pack(">H", 65000)),
            ("I", b"I" + struct.pack(">i", -70000)),
            ("i", b"i" + struct.pack(">I", 4_000_000_000)),
            ("l", b"l" + struct.pack(">q", -(2**50))),
            ("d", b"d" + struct.pack(">d", 2.718281828)),
            ("f", b"f" + struct.pack(">f", 0.25)),
            ("x", b"x" + struct.pack(">I", 2) + b"\xca\xfe"),
            ("S", b"S" + encode.long_string("text")),
            ("V", b"V"),
        ]
    )
    raw = struct.pack(">H", properties.FLAG_HEADERS | properties.FLAG_PRIORITY) + table + b"\x04"
    assert headers_of(raw) == {
        "b": -3,
        "B": 250,
        "s": -300,
        "u": 65000,
        "I": -70000,
        "i": 4_000_000_000,
        "l": -(2**50),
        "d": 2.718281828,
        "f": 0.25,
        "x": bytearray(b"\xca\xfe"),
        "S": "text",
        "V": None,
    }
    assert scan(raw).priority == 4


def test_no_headers() -> None:
    assert headers_of(_props(("content_type", "delivery_mode")).marshal()) is None


def test_empty_headers_table() -> None:
    raw = C.Basic.Properties(headers={}, delivery_mode=1).marshal()
    assert headers_of(raw) in ({}, None)
    assert scan(raw).delivery_mode == 1


# -- malformed ----------------------------------------------------------------------

FULL = _props(tuple(SCANNED) + tuple(SKIPPED)).marshal()


@pytest.mark.parametrize("cut", [0, 1])
def test_truncated_flags(cut: int) -> None:
    with pytest.raises(PropertyError):
        scan(FULL[:cut])
    with pytest.raises(PropertyError):
        headers_of(FULL[:cut])
    with pytest.raises(PropertyError):
        decode_properties(FULL[:cut])


def test_truncated_continuation_flag_word() -> None:
    with pytest.raises(PropertyError):
        scan(b"\x90\x01")  # continuation bit set, no second word


@pytest.mark.parametrize("cut", range(3, len(FULL), 3))
def test_truncated_property_list_in_scan(cut: int) -> None:
    with pytest.raises(PropertyError):
        scan(FULL[:cut])


@pytest.mark.parametrize("cut", range(3, len(FULL), 3))
def test_truncated_property_list_in_decode(cut: int) -> None:
    with pytest.raises(PropertyError):
        decode_properties(FULL[:cut])


def test_truncated_headers_table() -> None:
    raw = C.Basic.Properties(headers={"key": "value", "n": 1}).marshal()
    for cut in range(3, len(raw)):
        with pytest.raises(PropertyError):
            headers_of(raw[:cut])


def test_truncated_before_delivery_mode_only() -> None:
    # Flags say delivery-mode follows, but the list ends there.
    raw = struct.pack(">H", properties.FLAG_DELIVERY_MODE)
    with pytest.raises(PropertyError):
        scan(raw)


def test_trailing_bytes_are_rejected() -> None:
    # RabbitMQ refuses a property list longer than its flags announce.
    with pytest.raises(PropertyError, match="trailing"):
        scan(FULL + b"zz")
    with pytest.raises(PropertyError):
        scan(properties.EMPTY + b"\x00")
