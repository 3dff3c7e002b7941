"""A compact FIFO of paged-out queue entries.

A paged entry is three machine words in ``array`` chunks: its sequence
number (with flag bits), its location in the message log and its expiry
time. A million entries cost 24 MB instead of several hundred as Python
objects.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterator

CHUNK = 4096
REDELIVERED = 1 << 63
PAGING_REF = 1 << 62  # the entry holds its own reference on the log record
UNSIZED = 1 << 61  # restored from the log: its body size is not counted yet
SEQ_MASK = UNSIZED - 1


class PagedEntries:
    __slots__ = ("_chunks", "_head", "_len")

    def __init__(self) -> None:
        self._chunks: deque[tuple[array[int], array[int], array[int]]] = deque()
        self._head = 0  # index of the first live entry in the first chunk
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, word: int, ref: int, expires: int = 0) -> None:
        chunks = self._chunks
        if not chunks or len(chunks[-1][0]) >= CHUNK:
            chunks.append((array("Q"), array("Q"), array("q")))
        words, refs, exps = chunks[-1]
        words.append(word)
        refs.append(ref)
        exps.append(expires)
        self._len += 1

    def prepend(self, items: list[tuple[int, int, int]]) -> None:
        """Put ``items`` (word, ref, expires), in order, before every entry."""
        if not items:
            return
        chunks = self._chunks
        if chunks and self._head:
            # The first chunk's consumed slots would otherwise sit between
            # the new entries and the old ones.
            words, refs, exps = chunks.popleft()
            h = self._head
            chunks.appendleft((words[h:], refs[h:], exps[h:]))
            self._head = 0
        for end in range(len(items), 0, -CHUNK):
            part = items[max(0, end - CHUNK) : end]
            chunks.appendleft(
                (
                    array("Q", [w for w, _, _ in part]),
                    array("Q", [r for _, r, _ in part]),
                    array("q", [e for _, _, e in part]),
                )
            )
        self._len += len(items)

    def popleft(self) -> tuple[int, int, int]:
        if not self._len:
            raise IndexError("pop from empty PagedEntries")
        words, refs, exps = self._chunks[0]
        i = self._head
        item = (words[i], refs[i], exps[i])
        self._len -= 1
        if i + 1 >= len(words):
            self._chunks.popleft()
            self._head = 0
        else:
            self._head = i + 1
        return item

    def first_seq(self) -> int:
        words = self._chunks[0][0]
        return words[self._head] & SEQ_MASK

    def __iter__(self) -> Iterator[tuple[int, int]]:
        head = self._head
        for words, refs, _ in self._chunks:
            for i in range(head, len(words)):
                yield words[i], refs[i]
            head = 0

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._len = 0


class PagedByPriority:
    """A priority queue's paged entries: one FIFO per priority level, each
    continuing that level's in-memory entries (see Queue)."""

    __slots__ = ("_len", "levels")

    def __init__(self, max_priority: int) -> None:
        self.levels = [PagedEntries() for _ in range(max_priority + 1)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, priority: int, word: int, ref: int, expires: int = 0) -> None:
        self.levels[priority].append(word, ref, expires)
        self._len += 1

    def prepend(self, priority: int, items: list[tuple[int, int, int]]) -> None:
        self.levels[priority].prepend(items)
        self._len += len(items)

    def popleft(self, priority: int) -> tuple[int, int, int]:
        item = self.levels[priority].popleft()
        self._len -= 1
        return item

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for level in self.levels:
            yield from level

    def clear(self) -> None:
        for level in self.levels:
            level.clear()
        self._len = 0
