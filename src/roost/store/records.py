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

With encryption at rest (:mod:`encryption`), ``kind`` has the ``ENCRYPTED``
bit set and everything after the timestamp is sealed with AES-GCM::

    u8 kind|ENCRYPTED | u8 nqueues | nqueues * u32 queue id
    | u64 time written | 4-byte key id | 12-byte nonce
    | AES-GCM(u8 len | exchange | ... | body) with its 16-byte tag

What recovery and compaction read without decoding (kind, queue ids,
moved-from location, timestamp) stays in clear and is authenticated as the
associated data, with the key id; the CRC covers the whole payload as ever.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

from roost.store.encryption import KEY_ID_SIZE, Keyring

PADDING = 0
PERSISTENT = 1
PAGED = 2
MOVED = 3
# Flag bit in ``kind``: the rest of the record after the timestamp is sealed.
ENCRYPTED = 0x80

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
    keyring: Keyring | None = None,
) -> bytes:
    ex = exchange.encode("utf-8")
    rk = routing_key.encode("utf-8")
    head = [
        bytes((kind | ENCRYPTED if keyring is not None else kind, len(queue_ids))),
        b"".join(_u32.pack(q) for q in queue_ids),
    ]
    if kind == MOVED:
        assert moved_from is not None
        head.append(_moved.pack(*moved_from))
    head.append(_u64.pack(timestamp))
    rest = [
        bytes((len(ex),)),
        ex,
        bytes((len(rk),)),
        rk,
        _u32.pack(len(properties)),
        properties,
        body,
    ]
    if keyring is None:
        payload = b"".join(head + rest)
    else:
        head.append(keyring.current_id)
        clear = b"".join(head)
        payload = clear + keyring.seal(b"".join(rest), clear)
    return HEADER.pack(len(payload), crc32c(payload)) + payload


def decode_message(payload: bytes | memoryview, keyring: Keyring | None = None) -> StoredMessage:
    try:
        kind = payload[0]
        n = payload[1]
        pos = 2
        queue_ids = struct.unpack_from(f">{n}I", payload, pos)
        pos += 4 * n
        moved_from = None
        if kind & ~ENCRYPTED == MOVED:
            moved_from = _moved.unpack_from(payload, pos)
            pos += 8
        (timestamp,) = _u64.unpack_from(payload, pos)
        pos += 8
        if kind & ENCRYPTED:
            kind &= ~ENCRYPTED
            clear_end = pos + KEY_ID_SIZE
            kid = bytes(payload[pos:clear_end])
            if len(kid) != KEY_ID_SIZE:
                raise RecordError("encrypted record too short")
            if keyring is None:
                raise RecordError(
                    f"record is encrypted (key id {kid.hex()}) and no encryption key is set"
                )
            try:
                payload = keyring.open(kid, payload[clear_end:], bytes(payload[:clear_end]))
            except ValueError as exc:
                raise RecordError(str(exc)) from exc
            pos = 0
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
    """Kind (without the ``ENCRYPTED`` bit), queue ids and moved-from
    location, without decoding (or decrypting) the rest."""
    kind = payload[0] & ~ENCRYPTED
    n = payload[1]
    queue_ids = struct.unpack_from(f">{n}I", payload, 2)
    moved_from = _moved.unpack_from(payload, 2 + 4 * n) if kind == MOVED else None
    return kind, queue_ids, moved_from


def key_id_of(payload: bytes | memoryview) -> bytes | None:
    """The key id an encrypted record was sealed with; None for a plain one."""
    kind = payload[0]
    if not kind & ENCRYPTED:
        return None
    pos = 2 + 4 * payload[1] + (8 if kind & ~ENCRYPTED == MOVED else 0) + 8
    kid = bytes(payload[pos : pos + KEY_ID_SIZE])
    if len(kid) != KEY_ID_SIZE:
        raise ValueError("encrypted record too short")
    return kid


_ZEROS = bytes(64 * 1024)


def padding_crc(length: int) -> int:
    """CRC-32C of ``length`` zero bytes, without allocating them all."""
    crc = 0
    while length > 0:
        n = min(length, len(_ZEROS))
        crc = crc32c(_ZEROS[:n] if n < len(_ZEROS) else _ZEROS, crc)
        length -= n
    return crc


def check(payload: bytes | bytearray | memoryview, crc: int) -> bool:
    return crc32c(payload) == crc


# Entries in a segment's ``.acks`` file: kind, queue id, record offset.
ACK = 1
DELIVERED = 2
ACK_ENTRY = struct.Struct(">BII")
ACK_ENTRY_SIZE = ACK_ENTRY.size
