"""A classic queue's storage: ready entries in memory, and beyond the
memory limit a compact FIFO of entries paged to the message log, which
the in-memory head is refilled from as it drains."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from roost.broker.log_backed import ENTRY_OVERHEAD, PAGE_IN_BATCH, LogBacked
from roost.broker.paging import UNSIZED, PagedEntries
from roost.broker.ready import ReadyFifo

if TYPE_CHECKING:
    from roost.broker.backing_queue import MemoryLimits
    from roost.broker.journal import Journal
    from roost.broker.message import Message, QueueEntry


class FifoBackingQueue(LogBacked):
    def __init__(
        self,
        journal: Journal | None,
        limits: MemoryLimits,
        restored_expiry: Callable[[Message], int],
    ) -> None:
        super().__init__(journal, limits, restored_expiry)
        self.ready: ReadyFifo = ReadyFifo()
        self.paged = PagedEntries()

    def _paged_len(self) -> int:
        return len(self.paged)

    def __len__(self) -> int:
        # LogBacked's, without its call to _paged_len: dispatch asks often.
        return len(self.ready) + len(self.paged)

    def publish(self, entry: QueueEntry) -> bool:
        size = self.bytes + len(entry.message.body)
        self.bytes = size
        journal = self.journal
        ready = self.ready
        # Once anything is paged, everything after it is too: order is kept.
        # (_over_memory, inline: this is the publish hot path.)
        if journal is not None and (
            self.paged
            or len(ready) >= self.ready_limit
            or size - self._paged_bytes + len(ready) * ENTRY_OVERHEAD
            > self.limits.queue_memory_limit
        ):
            self.paged.append(*self._paged_entry(journal, entry))
            return False
        ready.append(entry)
        return True

    def fetch(self) -> QueueEntry | None:
        ready = self.ready
        if not ready:
            self._page_in()
            if not ready:
                return None
        entry = ready.popleft()
        self.bytes -= len(entry.message.body)
        return entry

    def fetch_many(self, k: int) -> list[QueueEntry]:
        ready = self.ready
        while len(ready) < k and self.paged:
            self._page_in()
        entries = ready.take(min(k, len(ready)))
        size = 0
        for e in entries:
            size += len(e.message.body)
        self.bytes -= size
        return entries

    def peek(self) -> QueueEntry | None:
        if not self.ready:
            self._page_in()
            if not self.ready:
                return None
        return self.ready.peek()

    def purge(self) -> int:
        n = len(self)
        self.settle(self.ready.take_all())
        journal = self.journal
        if journal is not None and self.paged:
            self._drop_paged(journal, iter(self.paged))
            self.paged.clear()
        self.bytes = 0
        return n

    def page_out(self, budget: int) -> int:
        """Page the newest in-memory entries out, in front of those already
        paged, until the rest fits the memory limit or about ``budget``
        body bytes moved. Entries delivered before stay (their redelivered
        flag and delivery count live on the entry)."""
        journal = self.journal
        if journal is None:
            return 0
        ready = self.ready
        limit = self.limits.queue_memory_limit
        in_memory = self._in_memory_bytes(len(ready))
        moved = 0
        items: list[tuple[int, int, int]] = []
        while ready and in_memory > limit and moved < budget:
            entry = ready.peek_last()
            if entry.redelivered or entry.deliveries:
                break
            ready.pop()
            size = len(entry.message.body)
            in_memory -= size + ENTRY_OVERHEAD
            moved += size
            items.append(self._paged_entry(journal, entry))
        items.reverse()
        self.paged.prepend(items)
        return moved

    def restore(
        self,
        refs: Iterable[int],
        delivered: Mapping[int, int],
        seq: int,
        keep_counts: bool,
        sized: bool = False,
    ) -> int:
        paged = self.paged
        word = self._restored_word
        journal = self.journal
        for ref in refs:
            seq += 1
            if sized and journal is not None:
                # One read per entry, but a byte-limited queue holds little.
                size = len(journal.read(ref).body)
                self.bytes += size
                self._paged_bytes += size
                paged.append(word(seq, ref, delivered) & ~UNSIZED, ref)
            else:
                paged.append(word(seq, ref, delivered), ref)
        if keep_counts:
            self._restored_counts.update(delivered)
        return seq

    def _page_in(self) -> None:
        journal = self.journal
        paged = self.paged
        if journal is None or not paged:
            return
        ready = self.ready
        read_back = self._read_back
        for _ in range(min(len(paged), PAGE_IN_BATCH)):
            ready.append(read_back(journal, *paged.popleft()))
