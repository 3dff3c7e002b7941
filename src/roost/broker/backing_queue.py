"""The backing-queue interface: how a queue stores its ready messages.

RabbitMQ splits a classic queue into ``rabbit_amqqueue_process`` (consumers,
dispatch, TTL, dead-lettering, overflow) and ``rabbit_backing_queue``
(storage). roost does the same: :class:`roost.broker.queue.Queue` keeps the
policy and a :class:`BackingQueue` keeps the entries, deciding what stays in
memory and what is paged to the message log, and owning every entry's
storage reference. Nothing else reads or writes the log for a queue's
entries, so no two queues can share (and disturb) a reference.

Implementations: :class:`roost.broker.fifo_backing.FifoBackingQueue` and
:class:`roost.broker.priority_backing.PriorityBackingQueue` over the local
segment log; a PostgreSQL one (cluster mode) implements the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from roost.broker.journal import Journal
    from roost.broker.message import Message, QueueEntry


class MemoryLimits(Protocol):
    """Where a backing queue reads how much it may keep in memory (the
    vhost: the limit drops while the memory alarm is set)."""

    queue_memory_limit: int


class BackingQueue(Protocol):
    """Ready entries of one queue, in delivery order, and their storage.

    Contract (every implementation, local or remote):

    - ``publish(entry)`` adds a new entry. When ``entry.ref`` is set the
      caller wrote a persistent record carrying this queue's id
      (``store_id``) and hands the backing queue that reference.
    - ``fetch`` / ``fetch_many`` take entries from the head (highest
      priority first, then publish order); a fetched entry is *out* (being
      delivered, waiting out a retry delay, being dead-lettered) and keeps
      its reference until it is given back to ``requeue`` or ``settle``.
    - ``requeue(entry)`` puts a fetched entry back at its original position.
    - ``settle(entries)`` ends fetched entries for good: their references
      are recorded as settled in the log (a restart never brings them back).
    - ``delivered(entries, every)`` records that fetched entries were handed
      to a consumer, so a restart marks them redelivered (``every``: record
      each delivery, for delivery limits).
    - ``purge()`` settles every ready entry and returns how many there were.
    - ``page_out(budget)`` moves in-memory entries to the log, newest first,
      about ``budget`` body bytes; returns the bytes moved.
    - ``restore(refs, delivered, seq, keep_counts, sized)`` refills from the
      log after a restart, numbering entries after ``seq`` (``delivered``:
      how often each ref was handed out, kept on the entries with
      ``keep_counts``); with ``sized`` their body bytes are counted at once
      (a queue with a byte limit needs them), otherwise as they are read
      back. Returns the last number.
    - ``len()`` counts ready entries, in memory or not; ``bytes`` their
      body bytes as far as known (all of them when restored ``sized``).
    - Settling goes on after the queue is deleted (its purge, deliveries
      still out): a deleted queue's records are settled like any other, so
      nothing of it is left unsettled on disk once that is durable.
    """

    store_id: int
    bytes: int
    ready_limit: int
    # Called with the expiry of each entry read back from the log, so the
    # queue's TTL timer covers entries that were paged.
    expiry_seen: Callable[[int], None] | None
    # Set by the queue; called only by a backing queue whose len() counts
    # entries held elsewhere (cluster mode: ready rows in PostgreSQL) and
    # which fetches them asynchronously. ``ready_changed()``: entries
    # arrived, dispatch again. ``demand()``: how many more messages the
    # queue's consumers can take now (how much to fetch ahead).
    ready_changed: Callable[[], None] | None
    demand: Callable[[], int] | None
    # Set by a backing queue that keeps requeued entries waiting out a
    # retry delay itself (cluster mode: in PostgreSQL, where they outlive
    # the node): ``requeue_later(entry, delay_ms)``, False when it cannot
    # for this entry (the queue then holds it). None: the queue holds them.
    requeue_later: Callable[[QueueEntry, int], bool] | None

    def __len__(self) -> int: ...

    def in_memory(self) -> int:
        """Ready entries held in memory (the rest are paged)."""
        ...

    def memory(self) -> int:
        """Bytes the ready entries take in memory (bodies and bookkeeping)."""
        ...

    def publish(self, entry: QueueEntry) -> bool:
        """Add a new entry; True when it stays in memory."""
        ...

    def fetch(self) -> QueueEntry | None: ...

    def fetch_many(self, k: int) -> list[QueueEntry]: ...

    def peek(self) -> QueueEntry | None: ...

    def requeue(self, entry: QueueEntry) -> None: ...

    def settle(self, entries: Iterable[QueueEntry]) -> None: ...

    def delivered(self, entries: Iterable[QueueEntry], every: bool) -> None: ...

    def purge(self) -> int: ...

    def page_out(self, budget: int) -> int: ...

    def restore(
        self,
        refs: Iterable[int],
        delivered: Mapping[int, int],
        seq: int,
        keep_counts: bool,
        sized: bool = False,
    ) -> int: ...

    def close(self) -> None:
        """The queue is deleted and purged: drop callbacks and references
        that would keep it in memory (what is still out may be settled)."""
        ...

    def read_restored(self, ref: int) -> QueueEntry:
        """A fetched entry for a restored reference the queue did not take
        back (past its delivery limit): settle it once dealt with."""
        ...


def make_backing_queue(
    journal: Journal | None,
    limits: MemoryLimits,
    max_priority: int,
    restored_expiry: Callable[[Message], int],
) -> BackingQueue:
    """The local implementation for a queue with these options."""
    from roost.broker.fifo_backing import FifoBackingQueue
    from roost.broker.priority_backing import PriorityBackingQueue

    if max_priority:
        return PriorityBackingQueue(journal, limits, restored_expiry, max_priority)
    return FifoBackingQueue(journal, limits, restored_expiry)
