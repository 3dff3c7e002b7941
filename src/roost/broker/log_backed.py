"""What the local backing queues share: entries paged to the message log
and the references they hold there.

A paged entry is three words (see :mod:`paging`). Its ref is either the
queue's own reference on the message's persistent record (the record
carries the queue's id) or, with ``PAGING_REF`` set, a paging record the
entry wrote for itself when it left memory. Either way the reference
belongs to this entry alone: it is settled (persistent) or released
(paging) exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from roost.broker.message import Message, QueueEntry
from roost.broker.paging import PAGING_REF, REDELIVERED, SEQ_MASK, UNSIZED
from roost.broker.ready import ReadyByPriority, ReadyFifo

if TYPE_CHECKING:
    from roost.broker.backing_queue import MemoryLimits
    from roost.broker.journal import Journal

# A queue pages new messages to the log once its in-memory messages are
# estimated (body + ENTRY_OVERHEAD each) to pass the vhost's
# queue_memory_limit; PAGE_IN_BATCH come back per refill, so one refill
# never stalls the event loop for long.
ENTRY_OVERHEAD = 400
PAGED_ENTRY_SIZE = 24
PAGE_IN_BATCH = 4096


class LogBacked:
    """Base of the local backing queues: ``ready`` holds the in-memory
    entries, ``_paged_len()`` counts the paged ones."""

    ready: ReadyFifo | ReadyByPriority

    def __init__(
        self,
        journal: Journal | None,
        limits: MemoryLimits,
        restored_expiry: Callable[[Message], int],
        max_priority: int = 0,
    ) -> None:
        self.journal = journal
        self.limits = limits
        self.store_id = 0  # the queue's id in the log (0: not durable)
        self.bytes = 0  # body bytes of ready entries, in memory and paged (as known)
        self._paged_bytes = 0  # body bytes of the paged entries (as known)
        # A count limit on top of the memory estimate (tests lower it).
        self.ready_limit = 1 << 62
        self.max_priority = max_priority
        # Absolute expiry of a message read back from the log (0: none);
        # the queue's TTL rules, counted from when the record was written.
        self._restored_expiry = restored_expiry
        # Delivery counts of restored entries not yet paged in, by ref
        # (recorded only for queues with a delivery limit).
        self._restored_counts: dict[int, int] = {}
        # Told the expiry of each entry read back from the log, so the
        # queue's TTL timer covers entries that were paged.
        self.expiry_seen: Callable[[int], None] | None = None
        # A local backing queue holds everything it counts: it never calls
        # these (see BackingQueue).
        self.ready_changed: Callable[[], None] | None = None
        self.demand: Callable[[], int] | None = None
        self.requeue_later: Callable[[QueueEntry, int], bool] | None = None

    def _paged_len(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ready) + self._paged_len()

    def in_memory(self) -> int:
        return len(self.ready)

    def memory(self) -> int:
        in_memory = max(0, self.bytes - self._paged_bytes)
        return in_memory + len(self.ready) * ENTRY_OVERHEAD + self._paged_len() * PAGED_ENTRY_SIZE

    def requeue(self, entry: QueueEntry) -> None:
        self.bytes += len(entry.message.body)
        self.ready.requeue(entry)

    def close(self) -> None:
        self.expiry_seen = None  # a bound method of the queue: a cycle

    # -- references -----------------------------------------------------

    def settle(self, entries: Iterable[QueueEntry]) -> None:
        journal = self.journal
        if journal is None or not self.store_id:
            return
        qid = self.store_id
        for e in entries:
            ref = e.ref
            if ref:
                e.ref = 0
                journal.ack(qid, ref)

    def delivered(self, entries: Iterable[QueueEntry], every: bool) -> None:
        journal = self.journal
        if journal is None or not self.store_id:
            return
        qid = self.store_id
        for e in entries:
            # Without a delivery limit the first delivery is enough: it
            # makes the redelivered flag survive a restart.
            if e.ref and (every or not e.redelivered):
                journal.delivered(qid, e.ref)

    def _drop_paged(self, journal: Journal, paged: Iterator[tuple[int, int]]) -> None:
        """Settle (or release) the references of purged paged entries."""
        qid = self.store_id
        for word, ref in paged:
            if word & PAGING_REF:
                journal.release(ref)
            else:
                journal.ack(qid, ref)
        self._paged_bytes = 0
        self._restored_counts.clear()

    # -- paging -----------------------------------------------------------

    def _over_memory(self, in_memory_entries: int) -> bool:
        return (
            in_memory_entries >= self.ready_limit
            or self.bytes - self._paged_bytes + in_memory_entries * ENTRY_OVERHEAD
            > self.limits.queue_memory_limit
        )

    def _in_memory_bytes(self, in_memory_entries: int) -> int:
        return self.bytes - self._paged_bytes + in_memory_entries * ENTRY_OVERHEAD

    def _paged_entry(self, journal: Journal, entry: QueueEntry) -> tuple[int, int, int]:
        """The (word, ref, expires) that stands for ``entry`` once paged: its
        own persistent reference, or a paging record written for it."""
        message = entry.message
        self._paged_bytes += len(message.body)
        word = entry.seq | (REDELIVERED if entry.redelivered else 0)
        if entry.ref:
            return word, entry.ref, entry.expires
        return word | PAGING_REF, journal.page_out(message), entry.expires

    def _read_back(self, journal: Journal, word: int, ref: int, expires: int) -> QueueEntry:
        """The queue entry a paged (word, ref, expires) stands for."""
        msg = journal.read(ref)
        if word & UNSIZED:
            self.bytes += len(msg.body)  # now known; was never counted
        else:
            self._paged_bytes -= len(msg.body)
        own = ref
        if word & PAGING_REF:
            journal.release(ref)
            own = 0
        if not expires and msg.written_ms:
            expires = self._restored_expiry(msg)
        mp = self.max_priority
        priority = min(msg.priority or 0, mp) if mp else 0
        entry = QueueEntry(word & SEQ_MASK, msg, bool(word & REDELIVERED), expires, priority, own)
        if own and self._restored_counts:
            entry.deliveries = self._restored_counts.pop(ref, 0)
        if expires and self.expiry_seen is not None:
            self.expiry_seen(expires)
        return entry

    def read_restored(self, ref: int) -> QueueEntry:
        journal = self.journal
        assert journal is not None
        self._restored_counts.pop(ref, None)
        return QueueEntry(0, journal.read(ref), True, 0, 0, ref)

    @staticmethod
    def _restored_word(seq: int, ref: int, delivered: Mapping[int, int]) -> int:
        return seq | UNSIZED | (REDELIVERED if ref in delivered else 0)
