"""Record framing for the message segment log.

Every record is ``u32 length | u32 CRC-32C(payload) | payload``; the length
counts the payload only. A message payload is::

    u8 kind | u8 nqueues | nqueues * u32 queue id
    | u64 time written (ms since the epoch)
    | u8 len | exchange | u8 len | routing key
    | u32 len | raw property bytes | body

``kind`` says whether the message survives a restart (``PERSISTENT``) or
was only written to keep a long queue out of memory (``PAGED``); a
``MOVED`` record is a persistent message copied forward, carrying the
location of the copy it replaces. A ``PADDING`` record (all zeros) stands
where compaction freed a run of settled records.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

PADDING = 0
PERSISTENT = 1
PAGED = 2
MOVED = 3

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size
_u32 = struct.Struct(">I")
_moved = struct.Struct(">II")
_u64 = struct.Struct(">Q")


class RecordError(ValueError):
    """A record failed its length or CRC check."""


class StoredMessage:
    """A message record as read back from the log."""

    __slots__ = (
        "body",
        "exchange",
        "kind",
        "moved_from",
        "properties",
        "queue_ids",
        "routing_key",
        "timestamp",
    )

    def __init__(
        self,
        kind: int,
        queue_ids: tuple[int, ...],
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
        moved_from: tuple[int, int] | None = None,
        timestamp: int = 0,
    ) -> None:
        self.kind = kind
        self.timestamp = timestamp
        self.queue_ids = queue_ids
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body
        self.moved_from = moved_from


def encode_message(
    kind: int,
    queue_ids: tuple[int, ...] | list[int],
    exchange: str,
    routing_key: str,
    properties: bytes,
    body: bytes,
    moved_from: tuple[int, int] | None = None,
    timestamp: int = 0,
) -> bytes:
    ex = exchange.encode("utf-8")
    rk = routing_key.encode("utf-8")
    parts = [
        bytes((kind, len(queue_ids))),
        b"".join(_u32.pack(q) for q in queue_ids),
    ]
    if kind == MOVED:
        assert moved_from is not None
        parts.append(_moved.pack(*moved_from))
    parts += [
        _u64.pack(timestamp),
        bytes((len(ex),)),
        ex,
        bytes((len(rk),)),
        rk,
        _u32.pack(len(properties)),
        properties,
        body,
    ]
    payload = b"".join(parts)
    return HEADER.pack(len(payload), crc32c(payload)) + payload


def decode_message(payload: bytes | memoryview) -> StoredMessage:
    try:
        kind = payload[0]
        n = payload[1]
        pos = 2
        queue_ids = struct.unpack_from(f">{n}I", payload, pos)
        pos += 4 * n
        moved_from = None
        if kind == MOVED:
            moved_from = _moved.unpack_from(payload, pos)
            pos += 8
        (timestamp,) = _u64.unpack_from(payload, pos)
        pos += 8
        ln = payload[pos]
        exchange = bytes(payload[pos + 1 : pos + 1 + ln]).decode("utf-8")
        pos += 1 + ln
        ln = payload[pos]
        routing_key = bytes(payload[pos + 1 : pos + 1 + ln]).decode("utf-8")
        pos += 1 + ln
        (plen,) = _u32.unpack_from(payload, pos)
        pos += 4
        properties = bytes(payload[pos : pos + plen])
        if len(properties) != plen:
            raise RecordError("property list runs past the record")
        body = bytes(payload[pos + plen :])
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise RecordError(f"malformed message record: {exc}") from exc
    if kind not in (PERSISTENT, PAGED, MOVED):
        raise RecordError(f"unknown record kind {kind}")
    return StoredMessage(
        kind, queue_ids, exchange, routing_key, properties, body, moved_from, timestamp
    )


def peek_queue_ids(
    payload: bytes | memoryview,
) -> tuple[int, tuple[int, ...], tuple[int, int] | None]:
    """Kind, queue ids and moved-from location, without decoding the rest."""
    kind = payload[0]
    n = payload[1]
    queue_ids = struct.unpack_from(f">{n}I", payload, 2)
    moved_from = _moved.unpack_from(payload, 2 + 4 * n) if kind == MOVED else None
    return kind, queue_ids, moved_from


_ZEROS = bytes(64 * 1024)


def padding_crc(length: int) -> int:
    """CRC-32C of ``length`` zero bytes, without allocating them all."""
    crc = 0
    while length > 0:
        n = min(length, len(_ZEROS))
        crc = crc32c(_ZEROS[:n] if n < len(_ZEROS) else _ZEROS, crc)
        length -= n
    return crc


def check(payload: bytes | memoryview, crc: int) -> bool:
    return crc32c(payload) == crc


# Entries in a segment's ``.acks`` file: kind, queue id, record offset.
ACK = 1
DELIVERED = 2
ACK_ENTRY = struct.Struct(">BII")
ACK_ENTRY_SIZE = ACK_ENTRY.size
