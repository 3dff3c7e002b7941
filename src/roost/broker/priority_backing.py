"""A priority queue's storage: one FIFO per priority level, each keeping
at least its head in memory and continuing in the message log beyond the
memory limit, refilled from there as soon as its in-memory part runs out,
so a paged higher-priority message is never passed over."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from roost.broker.log_backed import ENTRY_OVERHEAD, PAGE_IN_BATCH, LogBacked
from roost.broker.paging import REDELIVERED, PagedByPriority
from roost.broker.ready import ReadyByPriority

if TYPE_CHECKING:
    from roost.broker.backing_queue import MemoryLimits
    from roost.broker.journal import Journal
    from roost.broker.message import Message, QueueEntry


class PriorityBackingQueue(LogBacked):
    def __init__(
        self,
        journal: Journal | None,
        limits: MemoryLimits,
        restored_expiry: Callable[[Message], int],
        max_priority: int,
    ) -> None:
        super().__init__(journal, limits, restored_expiry, max_priority)
        self.ready: ReadyByPriority = ReadyByPriority(max_priority)
        self.levels = PagedByPriority(max_priority)
        if journal is not None:
            self.ready.on_empty = self._refill_level

    def _paged_len(self) -> int:
        return len(self.levels)

    def publish(self, entry: QueueEntry) -> bool:
        self.bytes += len(entry.message.body)
        journal = self.journal
        p = entry.priority
        if (
            journal is not None
            and (self.levels.levels[p] or self._over_memory(len(self.ready)))
            # The head of each level stays in memory (see _refill_level).
            and self.ready.level(p)
        ):
            self.levels.append(p, *self._paged_entry(journal, entry))
            return False
        self.ready.append(entry)
        return True

    def fetch(self) -> QueueEntry | None:
        # Every non-empty level has its head in memory.
        if not self.ready:
            return None
        entry = self.ready.popleft()
        self.bytes -= len(entry.message.body)
        return entry

    def fetch_many(self, k: int) -> list[QueueEntry]:
        ready = self.ready
        entries: list[QueueEntry] = []
        size = 0
        while ready and len(entries) < k:
            e = ready.popleft()
            size += len(e.message.body)
            entries.append(e)
        self.bytes -= size
        return entries

    def peek(self) -> QueueEntry | None:
        return self.ready.peek() if self.ready else None

    def purge(self) -> int:
        n = len(self)
        self.settle(self.ready.take_all())
        journal = self.journal
        if journal is not None and len(self.levels):
            self._drop_paged(journal, iter(self.levels))
            self.levels.clear()
        self.bytes = 0
        return n

    def close(self) -> None:
        self.ready.on_empty = None  # a cycle through this object otherwise
        self.expiry_seen = None

    def page_out(self, budget: int) -> int:
        """As FifoBackingQueue.page_out, level by level, lowest first (it is
        served last); each non-empty level keeps its head in memory."""
        journal = self.journal
        if journal is None:
            return 0
        ready = self.ready
        limit = self.limits.queue_memory_limit
        in_memory = self._in_memory_bytes(len(ready))
        moved = 0
        for p in range(len(self.levels.levels)):
            fifo = ready.level(p)
            items: list[tuple[int, int, int]] = []
            while len(fifo) > 1 and in_memory > limit and moved < budget:
                entry = fifo.peek_last()
                if entry.redelivered or entry.deliveries:
                    break
                ready.pop_last(p)
                size = len(entry.message.body)
                in_memory -= size + ENTRY_OVERHEAD
                moved += size
                items.append(self._paged_entry(journal, entry))
            items.reverse()
            self.levels.prepend(p, items)
        return moved

    def restore(
        self,
        refs: Iterable[int],
        delivered: Mapping[int, int],
        seq: int,
        keep_counts: bool,
        sized: bool = False,
    ) -> int:
        """Restored messages come back in log order: read each (its priority
        is in the message) and put it where publish() would have; so they
        are always sized."""
        journal = self.journal
        assert journal is not None
        if keep_counts:
            self._restored_counts.update(delivered)
        ready = self.ready
        levels = self.levels
        limit = self.limits.queue_memory_limit
        for ref in refs:
            seq += 1
            entry = self._read_back(journal, self._restored_word(seq, ref, delivered), ref, 0)
            p = entry.priority
            in_memory = self._in_memory_bytes(len(ready))
            if ready.level(p) and (levels.levels[p] or in_memory > limit):
                self._paged_bytes += len(entry.message.body)
                word = entry.seq | (REDELIVERED if entry.redelivered else 0)
                levels.append(p, word, entry.ref, entry.expires)
                if entry.deliveries:
                    self._restored_counts[entry.ref] = entry.deliveries
            else:
                ready.append(entry)
        return seq

    def _refill_level(self, priority: int) -> None:
        """A level's in-memory part ran out: read its next paged entries back
        before anything of a lower level is served."""
        journal = self.journal
        paged = self.levels
        level = paged.levels[priority]
        if journal is None or not level:
            return
        ready = self.ready
        read_back = self._read_back
        for _ in range(min(len(level), PAGE_IN_BATCH)):
            ready.append(read_back(journal, *paged.popleft(priority)))
