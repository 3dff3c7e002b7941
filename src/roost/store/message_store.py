"""The message store: an append-only log of segment files.

``messages/NNNNNNNN.seg`` holds a header with a random salt, then message
records (see :mod:`records`) whose CRCs are seeded with that salt; beside
each, ``NNNNNNNN.acks`` holds fixed-size, checksummed entries saying which
queue settled (or was handed) which record of that segment. Records and entries
are appended on the event loop into memory; a single writer thread writes
them with ``pwrite`` and makes them durable with one ``fdatasync`` per file
per batch (group commit). What was appended while a batch was being
written goes out in the next one, so under load each fsync covers many
publishes and the event loop never waits for the disk.

A segment whose records no queue needs any more is deleted whole, with its
``.acks`` file. A segment kept alive by a few messages is compacted in
place: each long run of settled records becomes one padding record (a
header over zeros) whose blocks are given back to the filesystem by hole
punching, so live records keep their locations and disk use follows what
is actually queued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from crc32c import crc32c

from roost import properties
from roost.broker import clock
from roost.broker.message import Message
from roost.broker.stats import Histogram
from roost.store import fsio, holes, records
from roost.store.encryption import EncryptionError, Keyring
from roost.store.records import (
    ACK,
    DELIVERED,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    SEGMENT_HEADER_SIZE,
)

log = logging.getLogger("roost.store")

DEFAULT_SEGMENT_SIZE = 32 * 1024 * 1024
READ_BLOCK = 256 * 1024
RETRY_DELAY = 1.0
# Upper bounds (seconds) of the fsync latency histogram buckets.
FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Compact a segment once fewer than this share of its references are live,
# and only runs of settled records at least this long.
COMPACT_RATIO = 0.5
COMPACT_MIN_RUN = 64 * 1024
# Compaction scans a segment through a window of this many bytes.
COMPACT_WINDOW = 1024 * 1024
# Bytes of a record's payload that hold its kind and queue ids (at most 255
# of them) and a MOVED record's origin: all the compaction scan looks at.
_PEEK_SIZE = 2 + 4 * 255 + 8


def make_ref(segment: int, offset: int) -> int:
    return (segment << 32) | offset


def ref_segment(ref: int) -> int:
    return ref >> 32


def ref_offset(ref: int) -> int:
    return ref & 0xFFFFFFFF


def _seg_name(n: int) -> str:
    return f"{n:08d}.seg"


def _acks_name(n: int) -> str:
    return f"{n:08d}.acks"


@dataclass
class Batch:
    """Everything to write in one group commit, in this order: ``before``
    jobs (definitions.json: a record's queue must be defined before the
    record is durable), the records, ``after_records`` jobs (deduplication
    caches: a key must never be durable before its message), the ``.acks``
    entries, then segment deletions (after definitions drop a queue).
    ``committed`` callbacks run on the event loop once all of it is on disk.
    Jobs are re-run if the batch is retried, so they must be idempotent."""

    number: int
    chunks: list[tuple[int, int, bytearray]] = field(default_factory=list)  # seg, offset, data
    acks: list[tuple[int, int, bytes]] = field(default_factory=list)  # seg, offset, data
    delete: list[int] = field(default_factory=list)
    new_files: bool = False
    before: list[Callable[[], None]] = field(default_factory=list)
    after_records: list[Callable[[], None]] = field(default_factory=list)
    committed: list[Callable[[], None]] = field(default_factory=list)


class StoreError(Exception):
    pass


@dataclass
class RecoveredQueue:
    """What recovery found for one durable queue: refs in order, and which
    of them had been handed to a consumer before the restart, with how many
    DELIVERED entries each has (a queue with a delivery limit writes one per
    delivery, any other queue only the first)."""

    refs: list[int] = field(default_factory=list)
    delivered: dict[int, int] = field(default_factory=dict)


@dataclass
class RecoveryReport:
    segments: int = 0
    records: int = 0
    messages: int = 0
    truncated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # The highest queue id any record carries: ids are never handed out again.
    max_queue_id: int = 0
    # Queue ids that still hold unsettled records, and how many.
    live_ids: dict[int, int] = field(default_factory=dict)


class MessageStore:
    def __init__(
        self,
        directory: Path,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        on_error: Callable[[bool], None] | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.dir = directory
        # Seals new records and opens old ones (encryption at rest), or None.
        self.keyring = keyring
        fsio.makedirs(self.dir)
        self.segment_size = segment_size
        self.on_error = on_error  # called with True on a write failure, False on recovery
        # Seconds per fdatasync of a batch write (roost_store_fsync_seconds).
        self.fsync_seconds = Histogram(FSYNC_BUCKETS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="roost-store")
        self._fds: dict[int, int] = {}
        self._ack_fds: dict[int, int] = {}
        self._ack_size: dict[int, int] = {}
        # CRC seed of each segment's records and .acks entries (from its
        # salt; 0 for a legacy segment, which has none).
        self._seeds: dict[int, int] = {}
        self._seed = 0  # the segment being written's
        self.live: dict[int, int] = {}
        # References each segment was written with, and its live count when
        # last compacted: compaction runs again once half of those are gone.
        self.total: dict[int, int] = {}
        self._compacted_at: dict[int, int] = {}
        self._compacting = False
        # Durable queue ids that exist (set by the broker side, for compaction).
        self.queue_ids: Callable[[], set[int]] = set
        self._seg = 0
        self._seg_size = 0
        self._pending = bytearray()
        self._pending_start = 0
        self._pending_seg = 0
        self._chunks: list[tuple[int, int, bytearray]] = []
        self._acks: dict[int, bytearray] = {}
        self._deletes: list[int] = []
        self._new_files = False
        self._batch_no = 1
        self._durable = 0
        self._inflight: Batch | None = None
        self._inflight_future: Future[None] | None = None
        self._scheduled = False
        self._failed: Batch | None = None
        self._waiters: dict[int, list[Callable[[], None]]] = {}
        self._read_cache: tuple[int, int, bytes] | None = None  # seg, offset, data
        # Recovery: records sealed under a key the keyring lacks, by ref.
        self._foreign: dict[int, bytes] = {}
        # Called on the loop with each batch as it is cut, to add the jobs
        # that must be written in order with its records (see Batch).
        self.batch_hooks: list[Callable[[Batch], None]] = []
        self.closed = False

    # -- start-up -------------------------------------------------------

    def recover(
        self,
        known_queue_ids: set[int],
        attribute: Callable[[dict[int, int]], None] | None = None,
    ) -> tuple[dict[int, RecoveredQueue], RecoveryReport]:
        """Scan the segments, drop torn or corrupt records, rebuild queues.

        ``attribute`` is called with the ids *not* in ``known_queue_ids``
        that still hold unsettled records (id -> how many) before anything
        on disk changes; it raises to refuse the recovery, leaving the
        store exactly as it was. Without it such records are dropped.
        """
        report = RecoveryReport()
        queues: dict[int, RecoveredQueue] = {}
        unknown: dict[int, list[int]] = {}
        settled: set[tuple[int, int]] = set()
        delivered: dict[tuple[int, int], int] = {}
        seg_numbers = _numbered(self.dir, ".seg")
        acks_numbers = _numbered(self.dir, ".acks")
        # Nothing on disk changes until every live record is known to be
        # readable with the keys given: a wrong or missing key must leave
        # the store exactly as it was. Cuts are made after that check.
        cuts: list[tuple[Path, int]] = []  # file, new size
        legacy_acks: dict[int, list[tuple[int, int, int]]] = {}
        damaged: list[str] = []  # segments whose header is unreadable
        for n in seg_numbers:
            report.segments += 1
            name = _seg_name(n)
            path = self.dir / name
            data = path.read_bytes()
            try:
                head = records.parse_segment_header(data)
            except records.UnsupportedFormat as exc:
                raise StoreError(f"{path}: {exc}; was it written by a newer roost?") from exc
            except records.SegmentHeaderError as exc:
                damaged.append(f"{name}: {exc}")
                continue
            if head is None:
                # Created just before a crash: its header (and so anything
                # after it) never reached the disk.
                if data:
                    report.truncated.append(
                        f"{name}: segment header never reached the disk, dropping {len(data)} bytes"
                    )
                    cuts.append((path, 0))
                self._seeds[n] = 0
                continue
            seed, first = head
            self._seeds[n] = seed
            good_end = self._scan_segment(
                n, data, first, seed, known_queue_ids, queues, unknown, settled, report
            )
            if good_end < len(data):
                cuts.append((path, good_end))
            acks_path = self.dir / _acks_name(n)
            try:
                raw = acks_path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                acks = records.parse_acks(raw, seed)
            except records.UnsupportedFormat as exc:
                raise StoreError(f"{acks_path}: {exc}; was it written by a newer roost?") from exc
            for off, what in acks.problems:
                report.skipped.append(f"{_acks_name(n)}: {what} at offset {off}")
            for kind, qid, roff in acks.entries:
                if kind == ACK:
                    settled.add((qid, make_ref(n, roff)))
                elif kind == DELIVERED:
                    key = (qid, make_ref(n, roff))
                    delivered[key] = delivered.get(key, 0) + 1
            if acks.legacy:
                legacy_acks[n] = acks.entries
            elif acks.end < len(raw):
                cuts.append((acks_path, acks.end))
            if acks.end:
                self._ack_size[n] = acks.end
        if damaged:
            # Its records cannot be checked, so its confirmed messages can
            # be neither served nor attributed: running without them would
            # lose them silently. Dropping them is the operator's call.
            raise StoreError(
                f"the message store in {self.dir} has segments whose header is damaged: "
                + "; ".join(damaged)
                + ". Their messages cannot be read; roost refuses to start rather than run "
                "without them, and nothing was changed. To start without those messages, "
                "move the named .seg files (and their .acks files) out of the directory."
            )
        self._check_keys(queues, settled)
        for qid, refs in unknown.items():
            left = sum(1 for ref in refs if (qid, ref) not in settled)
            if left:
                report.live_ids[qid] = left
        if attribute is not None and report.live_ids:
            attribute(dict(report.live_ids))
        for path, size in cuts:
            fsio.truncate(path, size)
        # Settled references no longer keep their segment alive.
        live: dict[int, int] = {}
        for qid, rq in queues.items():
            kept = []
            for ref in rq.refs:
                if (qid, ref) in settled:
                    continue
                kept.append(ref)
                seg = ref_segment(ref)
                live[seg] = live.get(seg, 0) + 1
                count = delivered.get((qid, ref))
                if count:
                    rq.delivered[ref] = count
            rq.refs = kept
            report.messages += len(kept)
            if kept:
                report.live_ids[qid] = len(kept)
        self.live = live
        seg_set = set(seg_numbers)
        for n in acks_numbers:
            if n not in seg_set:
                # Its segment was unlinked first (so a crash never leaves
                # records without their acks); finish the job, before a new
                # segment could take the number.
                report.truncated.append(f"{_acks_name(n)}: no segment beside it, removed")
                fsio.unlink_durably(self.dir / _acks_name(n))
        for leftover in self.dir.glob("*.tmp"):
            fsio.unlink_durably(leftover)
        for n in seg_numbers:
            if not live.get(n):
                self._unlink(n)
                self._seeds.pop(n, None)
                self._ack_size.pop(n, None)
                continue
            self._open_segment(n)
            entries = legacy_acks.get(n)
            if entries is not None:
                # Rewrite in today's format (checksummed entries), so that
                # new entries never follow unchecked ones in one file.
                content = records.acks_header() + b"".join(
                    records.encode_ack(kind, qid, roff, self._seeds[n])
                    for kind, qid, roff in entries
                )
                fsio.write_atomic(self.dir / _acks_name(n), content)
                self._ack_size[n] = len(content)
        # New records always go to a fresh segment: never append after a
        # tail that recovery may have cut.
        self._seg = max(seg_numbers + acks_numbers, default=0) + 1
        self._start_segment(self._seg)
        return queues, report

    def _check_keys(self, queues: dict[int, RecoveredQueue], settled: set[tuple[int, int]]) -> None:
        """Raise ``EncryptionError`` if a record some queue still needs was
        sealed under a key the keyring does not hold."""
        foreign, self._foreign = self._foreign, {}
        if not foreign:
            return
        needed = sorted(
            {
                foreign[ref].hex()
                for qid, rq in queues.items()
                for ref in rq.refs
                if ref in foreign and (qid, ref) not in settled
            }
        )
        if not needed:
            return
        ids = ", ".join(needed)
        if self.keyring is None:
            raise EncryptionError(
                f"the message store in {self.dir} holds messages encrypted with key id "
                f"{ids}, but no encryption key was given (encryption_key_file or "
                "ROOST_ENCRYPTION_KEY); nothing was changed"
            )
        raise EncryptionError(
            f"the message store in {self.dir} holds messages encrypted with key id {ids}, "
            f"which the encryption key given (key id {self.keyring.current_id.hex()}) "
            "cannot open; give the right key (after a rotation, pass the old one with "
            "old_encryption_key_file); nothing was changed"
        )

    def _scan_segment(
        self,
        n: int,
        data: bytes,
        first: int,
        seed: int,
        known: set[int],
        queues: dict[int, RecoveredQueue],
        unknown: dict[int, list[int]],
        settled: set[tuple[int, int]],
        report: RecoveryReport,
    ) -> int:
        pos = first
        size = len(data)
        view = memoryview(data)
        name = _seg_name(n)
        keys = self.keyring.ids if self.keyring is not None else set()
        while pos < size:
            if size - pos < HEADER_SIZE:
                report.truncated.append(f"{name}: torn record header at offset {pos}")
                return pos
            length, crc = HEADER.unpack_from(data, pos)
            end = pos + HEADER_SIZE + length
            plausible = 2 <= length < MAX_PAYLOAD
            intact = (
                plausible
                and end <= size
                and records.check(view[pos + HEADER_SIZE : end], crc, seed)
            )
            if not intact:
                # A bad length or CRC. The bytes a plausible header claims
                # are never searched for records (they may be a client's
                # body): one that claims past the end is a torn tail, cut
                # off; one inside the file is skipped whole. Only after an
                # impossible length is the rest searched byte by byte, and
                # only a record with this segment's salted CRC is taken.
                if not plausible:
                    nxt = _resync(data, pos + 1, seed)
                elif end > size:
                    nxt = -1
                else:
                    nxt = _next_record(data, end, seed)
                if nxt >= 0:
                    report.skipped.append(
                        f"{name}: corrupt data at offset {pos} ({nxt - pos} bytes) skipped"
                    )
                    pos = nxt
                    continue
                report.truncated.append(
                    f"{name}: torn or corrupt record at offset {pos}, dropping {size - pos} bytes"
                )
                return pos
            payload = view[pos + HEADER_SIZE : end]
            report.records += 1
            try:
                kind, qids, moved_from = records.peek_queue_ids(payload)
                kid = records.key_id_of(payload) if kind != records.PADDING else None
            except (IndexError, ValueError) as exc:
                report.skipped.append(f"{name}: unreadable record at offset {pos}: {exc}")
                pos = end
                continue
            if kind != records.PAGED:
                ref = make_ref(n, pos)
                if kid is not None and kid not in keys:
                    self._foreign[ref] = kid
                self.total[n] = self.total.get(n, 0) + len(qids)
                for qid in qids:
                    if qid > report.max_queue_id:
                        report.max_queue_id = qid
                    if qid in known:
                        queues.setdefault(qid, RecoveredQueue()).refs.append(ref)
                    else:
                        unknown.setdefault(qid, []).append(ref)
                    if moved_from is not None:
                        settled.add((qid, make_ref(*moved_from)))
            pos = end
        return pos

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._has_pending():
            self._schedule()  # the new segment's header, at least

    # -- Journal: appending ---------------------------------------------

    def barrier(self) -> int:
        return self._batch_no if self._has_pending() else self._batch_no - 1

    @property
    def durable_batch(self) -> int:
        return self._durable

    def append(self, message: Message, queue_ids: list[int]) -> int:
        return self._append_message(message, queue_ids, True)

    def _append_message(self, message: Message, queue_ids: list[int], persistent: bool) -> int:
        payload = records.encode_payload(
            records.PERSISTENT if persistent else records.PAGED,
            queue_ids,
            message.exchange,
            message.routing_key,
            message.properties,
            message.body,
            timestamp=clock.wall_ms(),
            keyring=self.keyring,
        )
        ref = self._append_record(payload)
        if persistent:
            seg = ref_segment(ref)
            self.live[seg] = self.live.get(seg, 0) + len(queue_ids)
            self.total[seg] = self.total.get(seg, 0) + len(queue_ids)
        return ref

    def _append_record(self, payload: bytes) -> int:
        """Frame ``payload`` (its CRC seeded with the segment it lands in)
        and append it."""
        n = len(payload)
        offset = self._seg_size
        end = offset + HEADER_SIZE + n
        if end > self.segment_size and offset > SEGMENT_HEADER_SIZE:
            self._roll()
            offset = self._seg_size
            end = offset + HEADER_SIZE + n
        if not self._pending:
            self._pending_start = offset
            self._pending_seg = self._seg
        self._pending += HEADER.pack(n, crc32c(payload, self._seed)) + payload
        self._seg_size = end
        self._schedule()
        return make_ref(self._seg, offset)

    def _roll(self) -> None:
        self._cut_pending()
        old = self._seg
        self._seg += 1
        self._start_segment(self._seg)
        if not self.live.get(old):
            self._deletes.append(old)

    def _start_segment(self, n: int) -> None:
        """A new segment: its header (with a fresh salt) goes out with its
        first records, in the same write."""
        salt = os.urandom(records.SALT_SIZE)
        self._seeds[n] = self._seed = records.seed_of(salt)
        self._open_segment(n)
        self._cut_pending()
        self._pending_start = 0
        self._pending_seg = n
        self._pending += records.segment_header(salt)
        self._seg_size = SEGMENT_HEADER_SIZE
        self._new_files = True

    def _open_segment(self, n: int) -> None:
        if n not in self._fds:
            self._fds[n] = fsio.open(self.dir / _seg_name(n), os.O_RDWR | os.O_CREAT, 0o600)

    def _cut_pending(self) -> None:
        if self._pending:
            # Handed over, not copied: a page-out can put tens of MB here.
            self._chunks.append((self._pending_seg, self._pending_start, self._pending))
            self._pending = bytearray()

    def page_out(self, message: Message) -> int:
        # A record of its own, never a persistent one shared: compaction
        # frees a persistent record once its durable queues settle it.
        ref = self._append_message(message, [], False)
        seg = ref_segment(ref)
        # Paging references are not counted in ``total``: compaction only
        # frees settled persistent records, so paging churn must not trigger it.
        self.live[seg] = self.live.get(seg, 0) + 1
        return ref

    def release(self, ref: int) -> None:
        seg = ref_segment(ref)
        left = self.live.get(seg, 0) - 1
        if left > 0:
            self.live[seg] = left
            return
        self.live.pop(seg, None)
        if seg != self._seg:
            self._deletes.append(seg)
            self._schedule()

    def ack(self, queue_id: int, ref: int) -> None:
        self._ack_entry(ACK, queue_id, ref)
        self.release(ref)

    def delivered(self, queue_id: int, ref: int) -> None:
        self._ack_entry(DELIVERED, queue_id, ref)

    def _ack_entry(self, kind: int, queue_id: int, ref: int) -> None:
        seg = ref_segment(ref)
        buf = self._acks.get(seg)
        if buf is None:
            buf = self._acks[seg] = bytearray()
        buf += records.encode_ack(kind, queue_id, ref_offset(ref), self._seeds.get(seg, 0))
        self._schedule()

    def wait_durable(self, batch: int, callback: Callable[[], None]) -> None:
        if batch == self._batch_no and not self._has_pending():
            batch -= 1  # nothing new since the batch in flight (if any)
        if batch <= self._durable:
            callback()
            return
        self._waiters.setdefault(batch, []).append(callback)

    def failure(self, batch: int) -> Exception | None:
        return None  # a failed fsync stops the broker; no batch is called back failed

    # -- Journal: reading -----------------------------------------------

    def read(self, ref: int) -> Message:
        seg, offset = ref_segment(ref), ref_offset(ref)
        payload = self._payload(seg, offset)
        stored = records.decode_message(payload, self.keyring)
        scanned = properties.scan(stored.properties)
        return Message(
            stored.exchange,
            stored.routing_key,
            stored.properties,
            stored.body,
            scanned.delivery_mode == 2,
            scanned.priority,
            written_ms=stored.timestamp,
        )

    def _payload(self, seg: int, offset: int) -> bytes:
        # Not yet handed to the writer, or being written right now?
        seed = self._seeds.get(seg, 0)
        if seg == self._pending_seg and self._pending and offset >= self._pending_start:
            return _cut(self._pending, offset - self._pending_start, seed)
        if self._chunks or self._inflight is not None or self._failed is not None:
            for cseg, coff, data in self._unwritten():
                if cseg == seg and coff <= offset < coff + len(data):
                    return _cut(data, offset - coff, seed)
        cache = self._read_cache
        if cache is not None and cache[0] == seg:
            start = offset - cache[1]
            if start >= 0 and start + HEADER_SIZE <= len(cache[2]):
                (length, _) = HEADER.unpack_from(cache[2], start)
                if start + HEADER_SIZE + length <= len(cache[2]):
                    return _cut(cache[2], start, seed)
        fd = self._fds[seg]
        block = os.pread(fd, READ_BLOCK, offset)
        (length, _) = HEADER.unpack_from(block, 0)
        if HEADER_SIZE + length > len(block):
            block = os.pread(fd, HEADER_SIZE + length, offset)
        self._read_cache = (seg, offset, block)
        return _cut(block, 0, seed)

    def _has_pending(self) -> bool:
        return bool(self._pending or self._chunks or self._acks or self._deletes)

    def _unwritten(self) -> list[tuple[int, int, bytearray]]:
        out = list(self._chunks)
        for b in (self._inflight, self._failed):
            if b is not None:
                out.extend(b.chunks)
        return out

    # -- group commit ---------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and self._inflight is None and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._submit)

    def _submit(self) -> None:
        self._scheduled = False
        if self._inflight is not None or self._failed is not None or self.closed:
            return
        batch = self._take_batch()
        if batch is None:
            return
        self._run(batch, self._done_threadsafe)

    def request_batch(self) -> None:
        """A batch hook has something to write: cut a batch soon, even
        without messages."""
        self._schedule()

    def _take_batch(self) -> Batch | None:
        self._cut_pending()
        batch = Batch(self._batch_no)
        for hook in self.batch_hooks:
            hook(batch)
        if not (
            self._chunks
            or self._acks
            or self._deletes
            or batch.before
            or batch.after_records
            or batch.committed
        ):
            return None
        self._batch_no += 1
        batch.chunks, self._chunks = self._chunks, []
        for seg, buf in self._acks.items():
            off = self._ack_size.get(seg, 0)
            data = bytes(buf) if off else records.acks_header() + buf
            batch.acks.append((seg, off, data))
            self._ack_size[seg] = off + len(data)
        self._acks = {}
        # Only delete a segment nothing in this batch still writes to.
        keep = {seg for seg, _, _ in batch.chunks} | {seg for seg, _, _ in batch.acks}
        batch.delete = sorted(
            set(s for s in self._deletes if s not in keep and not self.live.get(s))
        )
        self._deletes = [s for s in self._deletes if s in keep]
        batch.new_files = self._new_files
        self._new_files = False
        return batch

    def _write_batch(self, batch: Batch) -> None:
        """Runs on the writer thread."""
        for job in batch.before:
            job()
        # Records are made durable before the .acks entries of the same
        # batch: a dead-lettered copy must never be lost while the ack of
        # its original survives.
        touched: set[int] = set()
        pwrite_all = fsio.pwrite_all
        for seg, off, chunk in batch.chunks:
            fd = self._fds[seg]
            pwrite_all(fd, chunk, off)
            touched.add(fd)
        observe = self.fsync_seconds.observe
        for fd in touched:
            t0 = time.perf_counter()
            fsio.fdatasync(fd)
            observe(time.perf_counter() - t0)
        for job in batch.after_records:
            job()
        touched = set()
        for seg, off, data in batch.acks:
            afd = self._ack_fds.get(seg)
            if afd is None:
                afd = fsio.open(self.dir / _acks_name(seg), os.O_RDWR | os.O_CREAT, 0o600)
                self._ack_fds[seg] = afd
                batch.new_files = True
            pwrite_all(afd, data, off)
            touched.add(afd)
        for fd in touched:
            t0 = time.perf_counter()
            fsio.fdatasync(fd)
            observe(time.perf_counter() - t0)
        if batch.new_files:
            fsio.fsync_dir(self.dir)
        for seg in batch.delete:
            self._unlink(seg)

    def _run(self, batch: Batch, done: Callable[[Future[None]], None]) -> None:
        self._inflight = batch
        fut = self._executor.submit(self._write_batch, batch)
        self._inflight_future = fut
        fut.add_done_callback(done)

    def _done_threadsafe(self, fut: Future[None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._done, fut)

    def _done(self, fut: Future[None]) -> None:
        if fut is not self._inflight_future:
            return  # already settled by flush_sync()
        batch = self._inflight
        self._inflight = None
        self._inflight_future = None
        assert batch is not None
        exc = fut.exception()
        if exc is not None:
            log.error("message store write failed: %s; retrying", exc)
            self._failed = batch
            if self.on_error is not None:
                self.on_error(True)
            assert self._loop is not None
            self._loop.call_later(RETRY_DELAY, self._retry)
            return
        self._committed(batch)
        self._schedule()
        self._maybe_compact()

    def _committed(self, batch: Batch) -> None:
        for seg in batch.delete:
            self._close_segment(seg)
            self.total.pop(seg, None)
            self._compacted_at.pop(seg, None)
        self._durable = batch.number
        for cb in batch.committed:
            cb()
        ready = [b for b in self._waiters if b <= batch.number]
        for b in sorted(ready):
            for cb in self._waiters.pop(b):
                cb()

    def _retry(self) -> None:
        batch = self._failed
        if batch is None or self.closed:
            return
        self._failed = None
        self._run(batch, self._retried_threadsafe)

    def _retried_threadsafe(self, fut: Future[None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._retried, fut)

    def _retried(self, fut: Future[None]) -> None:
        if fut is not self._inflight_future:
            return
        ok = fut.exception() is None
        self._done(fut)
        if ok and self.on_error is not None:
            log.info("message store writes succeed again")
            self.on_error(False)

    # -- compaction -----------------------------------------------------

    def _maybe_compact(self) -> None:
        """Compact at most one sparse segment at a time, on the writer thread."""
        if self._compacting or self.closed or self._failed is not None:
            return
        for seg, live in self.live.items():
            if seg == self._seg or seg in self._acks:
                continue
            base = self._compacted_at.get(seg) or self.total.get(seg, 0)
            if base and live < base * COMPACT_RATIO:
                self._compacting = True
                self._compacted_at[seg] = live
                fut = self._executor.submit(self._compact_segment, seg, self.queue_ids())
                fut.add_done_callback(self._compacted_threadsafe)
                return

    def _compacted_threadsafe(self, fut: Future[int]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._compacted, fut)

    def _compacted(self, fut: Future[int]) -> None:
        self._compacting = False
        exc = fut.exception()
        if exc is not None:
            log.warning("compacting a segment failed: %s", exc)
            return
        # On to the next sparse segment, if any: waiting for the next batch
        # would leave them as they are once traffic stops.
        self._maybe_compact()

    def _compact_segment(self, seg: int, queue_ids: set[int]) -> int:
        """Runs on the writer thread, after every batch that wrote to the
        segment's .acks file. Returns the bytes given back."""
        fd = self._fds.get(seg)
        if fd is None:
            return 0
        seed = self._seeds.get(seg, 0)
        try:
            raw = (self.dir / _acks_name(seg)).read_bytes()
        except FileNotFoundError:
            raw = b""
        settled = {
            (qid, roff) for kind, qid, roff in records.parse_acks(raw, seed).entries if kind == ACK
        }
        size = os.fstat(fd).st_size
        freed = 0
        min_run = max(2 * holes.BLOCK, min(COMPACT_MIN_RUN, self.segment_size // 8))
        run_start = -1
        run_header = b""
        # Read in windows, not the whole segment: the scan needs only each
        # record's header and queue ids, and a segment-sized buffer here
        # cost its size in RSS on the writer thread's malloc arena.
        window = b""
        window_start = 0
        legacy = os.pread(fd, len(records.SEGMENT_MAGIC), 0) != records.SEGMENT_MAGIC
        pos = 0 if legacy else SEGMENT_HEADER_SIZE
        while pos + HEADER_SIZE <= size:
            i = pos - window_start
            if i + min(HEADER_SIZE + _PEEK_SIZE, size - pos) > len(window):
                window = os.pread(fd, COMPACT_WINDOW, pos)
                window_start, i = pos, 0
            if len(window) - i < HEADER_SIZE + 2:
                break
            length, _ = HEADER.unpack_from(window, i)
            end = pos + HEADER_SIZE + length
            if length < 2 or end > size:
                break
            peek = memoryview(window)[i + HEADER_SIZE : i + HEADER_SIZE + length]
            try:
                kind, qids, _ = records.peek_queue_ids(peek)
            except struct.error:
                break  # a torn header: the rest is recovery's business
            dead = kind == records.PADDING or (
                kind in (records.PERSISTENT, records.MOVED)
                and all(q not in queue_ids or (q, pos) in settled for q in qids)
            )
            # A padding header is written over the first record of its run
            # in place: never where it would straddle a block, so a torn
            # write cannot leave a length that is half old, half new.
            if dead and (run_start >= 0 or pos % holes.BLOCK <= holes.BLOCK - HEADER_SIZE):
                if run_start < 0:
                    run_start = pos
                    run_header = bytes(window[i : i + HEADER_SIZE])
            elif run_start >= 0:
                freed += _pad(fd, run_header, run_start, pos, min_run, seed)
                run_start = -1
            pos = end
        if run_start >= 0:
            freed += _pad(fd, run_header, run_start, pos, min_run, seed)
        if freed:
            fsio.fdatasync(fd)
        return freed

    def run_in_writer(self, fn: Callable[..., None], *args: object) -> Future[None]:
        """Run ``fn`` on the writer thread, in order with message batches."""
        return self._executor.submit(fn, *args)

    @property
    def failing(self) -> bool:
        return self._failed is not None

    # -- shutdown -------------------------------------------------------

    def flush_sync(self) -> None:
        """Write and fsync everything pending, on the calling thread."""
        batch, fut = self._inflight, self._inflight_future
        self._inflight = self._inflight_future = None
        if batch is not None and fut is not None:
            try:
                fut.result()
            except OSError:
                self._write_batch(batch)
            self._committed(batch)
        failed, self._failed = self._failed, None
        for b in (failed, self._take_batch()):
            if b is not None:
                self._write_batch(b)
                self._committed(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush_sync()
        finally:
            self.closed = True
            self._executor.shutdown(wait=True)
            for fd in list(self._fds.values()) + list(self._ack_fds.values()):
                fsio.close(fd)
            self._fds.clear()
            self._ack_fds.clear()

    def _close_segment(self, seg: int) -> None:
        for fds in (self._fds, self._ack_fds):
            fd = fds.pop(seg, None)
            if fd is not None:
                fsio.close(fd)
        self._ack_size.pop(seg, None)
        self._seeds.pop(seg, None)
        if self._read_cache is not None and self._read_cache[0] == seg:
            self._read_cache = None

    def _unlink(self, seg: int) -> None:
        """The segment first, durably, then its .acks: a crash in between
        leaves acks without records (removed at recovery), never records
        without their acks (settled messages would come back)."""
        fsio.unlink_durably(self.dir / _seg_name(seg))
        fsio.unlink_durably(self.dir / _acks_name(seg))

    # -- inspection -----------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing left to write: no batch pending, cut, being written or
        waiting for a retry, and no compaction running. Tests that step the
        event loop by hand (tests/model/) run it until this holds."""
        return (
            self._inflight is None
            and self._failed is None
            and not self._scheduled
            and not self._compacting
            and not self._has_pending()
        )

    @property
    def written_batch(self) -> int:
        """The newest batch handed to the writer thread, written or being
        written: once the writer is done, a process killed without running
        anything more on the loop leaves every batch up to this one on disk
        (``durable_batch`` only moves when the loop hears of it)."""
        return self._inflight.number if self._inflight is not None else self._durable

    def disk_usage(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())


def _numbered(directory: Path, suffix: str) -> list[int]:
    cut = -len(suffix)
    return sorted(int(p.name[:cut]) for p in directory.glob("*" + suffix) if p.name[:cut].isdigit())


def _cut(data: bytes | bytearray, start: int, seed: int) -> bytes:
    (length, crc) = HEADER.unpack_from(data, start)
    payload = data[start + HEADER_SIZE : start + HEADER_SIZE + length]
    if len(payload) != length or not records.check(payload, crc, seed):
        raise StoreError(f"record at {start} failed its check")
    return bytes(payload)


def _pad(fd: int, current: bytes, start: int, end: int, min_run: int, seed: int) -> int:
    """Turn the settled records in ``[start, end)`` into one padding record
    and give its blocks back; ``current`` is the header now at ``start``.
    Returns the bytes freed."""
    span = end - start
    if span < min_run:
        return 0
    header = HEADER.pack(span - HEADER_SIZE, records.padding_crc(span - HEADER_SIZE, seed))
    if current == header:
        return 0  # already padding
    # Zero what the hole punch cannot reach (the partial blocks at both
    # ends) before the header goes in: until then the old records still
    # parse; after, the padding checks out. A crash in between leaves a
    # record with a bad CRC, which recovery skips.
    first = min(end, -(-(start + HEADER_SIZE) // holes.BLOCK) * holes.BLOCK)
    last = max(first, end // holes.BLOCK * holes.BLOCK)
    if first > start + HEADER_SIZE:
        fsio.pwrite_all(fd, bytes(first - start - HEADER_SIZE), start + HEADER_SIZE)
    if end > last:
        fsio.pwrite_all(fd, bytes(end - last), last)
    if not fsio.punch_hole(fd, first, last - first):
        fsio.pwrite_all(fd, bytes(last - first), first)
    fsio.pwrite_all(fd, header, start)
    return span


def _resync(data: bytes, start: int, seed: int) -> int:
    """Offset of the next intact record at or after ``start``, searched
    byte by byte, or -1. Only after a header with an impossible length:
    nothing tells where the next record starts. A record found must carry
    the segment's salted CRC, which bytes from a client cannot.

    Candidates are filtered on a plausible header (the kind byte, the queue
    count) before their CRC is computed, so scanning garbage stays cheap.
    """
    size = len(data)
    for p in range(start, size - HEADER_SIZE - 2):
        kind = data[p + HEADER_SIZE] & ~records.ENCRYPTED
        if kind > records.MOVED or data[p + HEADER_SIZE + 1] > 64:
            continue
        if _valid_record_at(data, p, seed):
            return p
    return -1


def _next_record(data: bytes, pos: int, seed: int) -> int:
    """Offset of the first intact record at or after ``pos`` (a record
    boundary), stepping over damaged records whose length is plausible and
    never looking inside the bytes they claim; -1 if none."""
    size = len(data)
    while size - pos >= HEADER_SIZE:
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if not 2 <= length < MAX_PAYLOAD:
            return _resync(data, pos + 1, seed)
        if end > size:
            return -1
        if records.check(data[pos + HEADER_SIZE : end], crc, seed):
            return pos
        pos = end
    return -1


def _valid_record_at(data: bytes, pos: int, seed: int) -> bool:
    if len(data) - pos < HEADER_SIZE:
        return False
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER_SIZE + length
    return (
        length >= 2 and end <= len(data) and records.check(data[pos + HEADER_SIZE : end], crc, seed)
    )
