"""Record framing for the message segment log.

A segment file starts with a 32-byte header (see :func:`segment_header`)
holding a random per-segment salt. Every record after it is
``u32 length | u32 CRC-32C(salt + payload) | payload``; the length counts
the payload only. The salt never leaves the disk, so a client cannot make
bytes of a message body pass as a record of their own: the CRC of a forged
record would have to be guessed (one chance in 2**32 per record). Segments
written before the header existed (legacy) start with their first record
and use the unsalted CRC (seed 0). A message payload is::

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

Each segment has an ``.acks`` file: a 16-byte header, then 16-byte entries
``u8 kind | 3 zero bytes | u32 queue id | u32 record offset |
u32 CRC-32C(salt + the 12 bytes before)``, salted with the segment's salt.
Legacy ``.acks`` files (no header) hold 9-byte entries without a CRC.
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
# No record payload is this long (a message is bounded by max_message_size,
# a padding record by its segment): a longer length is corruption, not a
# claim on the bytes that follow.
MAX_PAYLOAD = 1 << 31

# Segment file header: magic | u32 version | 16-byte salt | u32 CRC-32C of
# the 28 bytes before. The magic's first byte makes it read as an
# impossible record length, so a legacy segment is never mistaken for one.
SEGMENT_MAGIC = b"\xffROOSTSG"
SEGMENT_VERSION = 1
SALT_SIZE = 16
SEGMENT_HEADER = struct.Struct(">8sI16sI")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size
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


def segment_header(salt: bytes) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, salt, 0)[:-4]
    return head + _u32.pack(crc32c(head))


def seed_of(salt: bytes) -> int:
    """The CRC seed of a segment's records: CRC-32C(salt + payload) is
    ``crc32c(payload, seed)``, at no extra cost per record."""
    return crc32c(salt)


class SegmentHeaderError(ValueError):
    """A segment header is damaged."""


class UnsupportedFormat(SegmentHeaderError):
    """A segment or ``.acks`` file of a format version this roost cannot read."""


def parse_segment_header(data: bytes | memoryview) -> tuple[int, int] | None:
    """(seed, offset of the first record) of a segment starting with
    ``data``; ``(0, 0)`` for a legacy segment; None when the header never
    reached the disk whole (shorter than a header and a prefix of one, or
    zeros: a segment created just before a crash, holding nothing that was
    made durable). Raises :class:`SegmentHeaderError` for a damaged header."""
    head = bytes(data[:SEGMENT_HEADER_SIZE])
    if not head:
        return None
    if head[0] != SEGMENT_MAGIC[0]:
        if not head.strip(b"\0"):
            return None  # zeros: the size reached the disk, the data did not
        return (0, 0)  # legacy: a record header comes first
    if len(head) < SEGMENT_HEADER_SIZE:
        if SEGMENT_MAGIC.startswith(head[: len(SEGMENT_MAGIC)]):
            return None
        raise SegmentHeaderError("segment header cut short")
    magic, version, salt, crc = SEGMENT_HEADER.unpack(head)
    if magic != SEGMENT_MAGIC or crc32c(head[:-4]) != crc:
        raise SegmentHeaderError("segment header fails its check")
    if version != SEGMENT_VERSION:
        raise UnsupportedFormat(f"segment format version {version} is not supported")
    return seed_of(salt), SEGMENT_HEADER_SIZE


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
    seed: int = 0,
) -> bytes:
    """A whole record (header and payload), its CRC seeded with ``seed``."""
    payload = encode_payload(
        kind, queue_ids, exchange, routing_key, properties, body, moved_from, timestamp, keyring
    )
    return HEADER.pack(len(payload), crc32c(payload, seed)) + payload


def encode_payload(
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
    """A record's payload; the store frames it once it knows the segment
    (and so the CRC seed) it goes to."""
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
    return payload


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


def padding_crc(length: int, seed: int = 0) -> int:
    """CRC-32C of ``length`` zero bytes (seeded), without allocating them all."""
    crc = seed
    while length > 0:
        n = min(length, len(_ZEROS))
        crc = crc32c(_ZEROS[:n] if n < len(_ZEROS) else _ZEROS, crc)
        length -= n
    return crc


def check(payload: bytes | bytearray | memoryview, crc: int, seed: int = 0) -> bool:
    return crc32c(payload, seed) == crc


# Entries in a segment's ``.acks`` file: kind, queue id, record offset, CRC.
ACK = 1
DELIVERED = 2
ACKS_MAGIC = b"\xffROOSTAK"
ACKS_VERSION = 1
ACKS_HEADER = struct.Struct(">8sII")  # magic, version, CRC-32C of the 12 bytes before
ACKS_HEADER_SIZE = ACKS_HEADER.size
ACK_ENTRY = struct.Struct(">BxxxIII")
ACK_ENTRY_SIZE = ACK_ENTRY.size  # 16: entries never straddle a 4 KiB block
_ACK_BODY = struct.Struct(">BxxxII")
# Before the header existed: u8 kind | u32 queue id | u32 offset, no CRC.
LEGACY_ACK_ENTRY = struct.Struct(">BII")
LEGACY_ACK_ENTRY_SIZE = LEGACY_ACK_ENTRY.size


def acks_header() -> bytes:
    head = ACKS_MAGIC + _u32.pack(ACKS_VERSION)
    return head + _u32.pack(crc32c(head))


def encode_ack(kind: int, queue_id: int, offset: int, seed: int) -> bytes:
    body = _ACK_BODY.pack(kind, queue_id, offset)
    return body + _u32.pack(crc32c(body, seed))


class AcksFile:
    """What an ``.acks`` file holds, as read back: its entries (kind, queue
    id, record offset) in order, and where the next entry goes."""

    __slots__ = ("end", "entries", "legacy", "problems", "torn")

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, int]] = []
        # Offset just past the last intact entry (0: not even a header;
        # the next write starts the file over, header first).
        self.end = 0
        self.legacy = False
        # Damage found (offset, what): logged as errors.
        self.problems: list[tuple[int, str]] = []
        # Bytes past ``end`` that are a torn tail (zeros, a partial entry).
        self.torn = 0


def parse_acks(raw: bytes, seed: int) -> AcksFile:
    """Read an ``.acks`` file. Every entry is checked on its own: a damaged
    one is reported and skipped, the ones after it still count; zeros or a
    partial entry at the end (a crash before the write reached the disk)
    are a torn tail."""
    out = AcksFile()
    if not raw:
        return out
    if raw[0] in (ACK, DELIVERED):
        out.legacy = True
        whole = len(raw) - len(raw) % LEGACY_ACK_ENTRY_SIZE
        out.entries = [
            LEGACY_ACK_ENTRY.unpack_from(raw, off) for off in range(0, whole, LEGACY_ACK_ENTRY_SIZE)
        ]
        out.end = whole
        out.torn = len(raw) - whole
        return out
    head = raw[:ACKS_HEADER_SIZE]
    header_ok = head == acks_header()
    if not header_ok and len(head) == ACKS_HEADER_SIZE and head.startswith(ACKS_MAGIC):
        version = _u32.unpack_from(head, 8)[0]
        if version != ACKS_VERSION and crc32c(head[:12]) == _u32.unpack_from(head, 12)[0]:
            raise UnsupportedFormat(f".acks format version {version} is not supported")
    pos = ACKS_HEADER_SIZE
    last_good = ACKS_HEADER_SIZE if header_ok else 0
    bad: list[int] = []
    size = len(raw)
    while pos + ACK_ENTRY_SIZE <= size:
        kind, qid, roff, crc = ACK_ENTRY.unpack_from(raw, pos)
        if crc32c(raw[pos : pos + 12], seed) == crc and kind in (ACK, DELIVERED):
            out.entries.append((kind, qid, roff))
            last_good = pos + ACK_ENTRY_SIZE
        else:
            bad.append(pos)
        pos += ACK_ENTRY_SIZE
    if not header_ok and (out.entries or raw[:ACKS_HEADER_SIZE].strip(b"\0")):
        # Entries after it check out (or it holds something other than
        # zeros): damage, not a file whose creation never reached the disk.
        out.problems.append((0, "damaged .acks header"))
        last_good = max(last_good, ACKS_HEADER_SIZE) if out.entries else 0
    for off in bad:
        entry = raw[off : off + ACK_ENTRY_SIZE]
        if off >= last_good and not entry.strip(b"\0"):
            continue  # zeros at the end: a torn tail
        out.problems.append((off, "entry fails its check, skipped"))
    out.end = last_good
    out.torn = size - last_good
    return out
