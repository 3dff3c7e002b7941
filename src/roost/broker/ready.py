"""Containers for a queue's ready (in-memory, not yet delivered) entries.

Both keep entries in publish order (``seq``) and put a requeued entry back
at its original position. :class:`ReadyByPriority` serves higher priorities
first, FIFO within one priority, as RabbitMQ's priority queues do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from roost.broker.message import QueueEntry


class ReadyFifo(deque[QueueEntry]):
    """A deque of entries in publish order: append, popleft, pop and len
    stay C-level calls on the publish and delivery hot paths."""

    __slots__ = ()

    def peek(self) -> QueueEntry:
        return self[0]

    def peek_last(self) -> QueueEntry:
        return self[-1]

    def take(self, k: int) -> list[QueueEntry]:
        popleft = self.popleft
        return [popleft() for _ in range(k)]

    def requeue(self, entry: QueueEntry) -> None:
        if not self or entry.seq < self[0].seq:
            self.appendleft(entry)
        elif entry.seq > self[-1].seq:
            self.append(entry)
        else:
            lo, hi = 0, len(self)
            while lo < hi:
                mid = (lo + hi) // 2
                if self[mid].seq < entry.seq:
                    lo = mid + 1
                else:
                    hi = mid
            self.insert(lo, entry)

    def take_all(self) -> list[QueueEntry]:
        """Empty it; returns what it held."""
        out = list(self)
        self.clear()
        return out


class ReadyByPriority:
    """One FIFO per priority level 0..max_priority.

    ``on_empty(level)`` is called when taking an entry empties a level: a
    queue whose levels continue in the message log (paged) refills the
    level there, so a paged higher-priority message is never passed over.
    """

    __slots__ = ("_len", "_levels", "on_empty")

    def __init__(self, max_priority: int) -> None:
        self._levels = [ReadyFifo() for _ in range(max_priority + 1)]
        self._len = 0
        self.on_empty: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[QueueEntry]:
        for level in reversed(self._levels):
            yield from level

    def _top(self) -> int:
        """The highest priority with an entry."""
        levels = self._levels
        for p in range(len(levels) - 1, -1, -1):
            if levels[p]:
                return p
        raise IndexError("no ready entries")

    def append(self, entry: QueueEntry) -> None:
        self._levels[entry.priority].append(entry)
        self._len += 1

    def popleft(self) -> QueueEntry:
        p = self._top()
        level = self._levels[p]
        entry = level.popleft()
        self._len -= 1
        if not level and self.on_empty is not None:
            self.on_empty(p)
        return entry

    def level(self, priority: int) -> ReadyFifo:
        """One level, to look at (change it through this class)."""
        return self._levels[priority]

    def pop_last(self, priority: int) -> QueueEntry:
        """Take the newest entry of one level (paging it out)."""
        entry = self._levels[priority].pop()
        self._len -= 1
        return entry

    def peek(self) -> QueueEntry:
        return self._levels[self._top()].peek()

    def take(self, k: int) -> list[QueueEntry]:
        return [self.popleft() for _ in range(k)]

    def requeue(self, entry: QueueEntry) -> None:
        self._levels[entry.priority].requeue(entry)
        self._len += 1

    def take_all(self) -> list[QueueEntry]:
        """Empty it; returns what it held (highest priority first)."""
        out = list(self)
        for level in self._levels:
            level.clear()
        self._len = 0
        return out
