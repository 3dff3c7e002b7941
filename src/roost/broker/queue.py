"""Classic queue with RabbitMQ's delivery semantics.

The interface is the narrow one of RabbitMQ's ``rabbit_queue_type``:
enqueue, consume, cancel, settle, requeue, get, purge, delete. Ready
messages are kept in publish order (``QueueEntry.seq``); a requeued message
goes back to its original position, as in RabbitMQ's classic queues.

With a journal (message store) attached, a queue longer than
``ready_limit`` keeps only its head in memory: later messages are *paged*,
held as (sequence, log location) pairs and read back from the log as the
head drains. A durable queue also tells the journal which persistent
messages it delivered and settled, so a restart brings back exactly the
unsettled ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from roost.broker.message import Message, QueueEntry
from roost.broker.paging import PAGING_REF, REDELIVERED, SEQ_MASK, PagedEntries

if TYPE_CHECKING:
    from roost.broker.binding import Binding
    from roost.broker.consumer import Consumer
    from roost.broker.journal import Journal
    from roost.broker.vhost import VirtualHost


# Most messages one dispatch() call hands out (see Queue.dispatch).
DISPATCH_BATCH = 1000
# Messages a queue keeps in memory before paging the rest to the log.
READY_LIMIT = 8192


class Queue:
    kind: ClassVar[str] = "queue"

    def __init__(
        self,
        vhost: VirtualHost,
        name: str,
        durable: bool = False,
        exclusive_owner: object | None = None,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.exclusive_owner = exclusive_owner
        self.auto_delete = auto_delete
        self.arguments: dict[str, Any] = dict(arguments or {})
        self.ready: deque[QueueEntry] = deque()
        self.unacked = 0
        self.bindings: set[Binding] = set()
        # Consumers grouped by priority, highest first; each group rotates
        # for round-robin delivery.
        self._groups: list[tuple[int, deque[Consumer]]] = []
        self._consumer_count = 0
        self._had_consumers = False
        self._seq = 0
        self._dispatching = False
        # Set when the last dispatch() left messages because no consumer had
        # credit. Enqueueing cannot add credit, so it skips dispatch() until
        # an explicit call (ack, new consumer, qos, flow, socket drained).
        self._stalled = False
        self.deleted = False
        self.journal: Journal | None = vhost.journal
        # Identity of a durable queue in the message log (0: not logged).
        self.store_id = 0
        self.paged = PagedEntries()
        self.ready_limit = READY_LIMIT
        self.published = 0
        self.delivered = 0
        self.acked = 0

    # -- inspection -----------------------------------------------------

    @property
    def message_count(self) -> int:
        return len(self.ready) + len(self.paged)

    @property
    def consumer_count(self) -> int:
        return self._consumer_count

    @property
    def exclusive(self) -> bool:
        return self.exclusive_owner is not None

    def consumers(self) -> list[Consumer]:
        return [c for _, group in self._groups for c in group]

    def has_exclusive_consumer(self) -> bool:
        return any(c.exclusive for c in self.consumers())

    # -- messages in ----------------------------------------------------

    def enqueue(self, message: Message) -> None:
        self._seq += 1
        self.published += 1
        journal = self.journal
        if journal is not None and (self.paged or len(self.ready) >= self.ready_limit):
            self._page_out(journal, self._seq, message)
        else:
            self.ready.append(QueueEntry(self._seq, message))
        if self._groups and not self._stalled:
            self.dispatch()

    def _holds_durable_ref(self, message: Message) -> bool:
        """Whether this queue's id is in the message's persistent log record."""
        return bool(self.store_id and message.persistent and message.ref)

    def _page_out(self, journal: Journal, seq: int, message: Message) -> None:
        if self._holds_durable_ref(message):
            self.paged.append(seq, message.ref)
        else:
            self.paged.append(seq | PAGING_REF, journal.page_out(message))

    def _page_in(self) -> None:
        """Refill the in-memory head from the log."""
        journal = self.journal
        paged = self.paged
        if journal is None or not paged:
            return
        ready = self.ready
        n = min(len(paged), max(self.ready_limit // 2, self.ready_limit - len(ready)))
        for _ in range(n):
            word, ref = paged.popleft()
            msg = journal.read(ref)
            if word & PAGING_REF:
                journal.release(ref)
            ready.append(QueueEntry(word & SEQ_MASK, msg, bool(word & REDELIVERED)))

    def restore(self, refs: list[int], delivered: set[int]) -> None:
        """Refill a durable queue from the log after a restart (all paged)."""
        for ref in refs:
            self._seq += 1
            self.paged.append(self._seq | (REDELIVERED if ref in delivered else 0), ref)

    def requeue(self, entries: Iterable[QueueEntry]) -> None:
        """Put delivered-but-unsettled entries back at their original position."""
        if self.deleted:
            self.settle(list(entries))
            return
        ready = self.ready
        n = 0
        for entry in sorted(entries, key=_seq_of, reverse=True):
            n += 1
            entry.redelivered = True
            if not ready or entry.seq < ready[0].seq:
                ready.appendleft(entry)
            elif entry.seq > ready[-1].seq:
                ready.append(entry)
            else:
                ready.insert(_bisect(ready, entry.seq), entry)
        self.unacked -= n
        if n and self._groups:
            self.dispatch()

    # -- messages out ---------------------------------------------------

    def get(self, no_ack: bool) -> QueueEntry | None:
        if not self.ready:
            self._page_in()
            if not self.ready:
                return None
        entry = self.ready.popleft()
        self.delivered += 1
        if no_ack:
            self.acked += 1
            self._forget([entry])
        else:
            self.unacked += 1
            self._mark_delivered([entry])
        return entry

    def settle(self, entries: list[QueueEntry]) -> None:
        """Delivered entries were acked (or rejected without requeue)."""
        self.unacked -= len(entries)
        self.acked += len(entries)
        self._forget(entries)

    def _forget(self, entries: list[QueueEntry]) -> None:
        """These entries leave the queue for good: record it in the log."""
        journal = self.journal
        if journal is None or not self.store_id:
            return
        qid = self.store_id
        deleted = self.deleted
        for e in entries:
            m = e.message
            if m.persistent and m.ref:
                if deleted:
                    journal.release(m.ref)  # the queue's id is gone from the log
                else:
                    journal.ack(qid, m.ref)

    def _mark_delivered(self, entries: list[QueueEntry]) -> None:
        journal = self.journal
        if journal is None or not self.store_id:
            return
        qid = self.store_id
        for e in entries:
            m = e.message
            if m.persistent and m.ref and not e.redelivered:
                journal.delivered(qid, m.ref)

    def dispatch(self) -> None:
        """Hand ready messages to consumers with credit, round-robin by priority.

        A consumer alone in its priority group gets its messages as one
        batch (one call, one socket write); competing consumers get one
        message each in turn. At most ``DISPATCH_BATCH`` messages go out per
        call, so a deep queue drained by an unlimited consumer does not
        stall the event loop or build one huge write.
        """
        self._stalled = False
        if self._dispatching:
            return
        if len(self.ready) < DISPATCH_BATCH and self.paged and self._groups:
            self._page_in()
        if not self.ready:
            return
        self._dispatching = True
        ready = self.ready
        budget = DISPATCH_BATCH
        try:
            for _, group in self._groups:
                if len(group) == 1:
                    c = group[0]
                    k = min(len(ready), budget, c.sink.credit())
                    if not c.no_ack and c.prefetch:
                        k = min(k, c.prefetch - c.unacked)
                    if k <= 0:
                        continue
                    entries = [ready.popleft() for _ in range(k)]
                    self._count_out(c, entries)
                    budget -= k
                    c.sink.deliver(c, entries)
                else:
                    misses = 0
                    n = len(group)
                    while ready and misses < n and budget:
                        c = group[0]
                        group.rotate(-1)
                        if (
                            c.no_ack or not c.prefetch or c.unacked < c.prefetch
                        ) and c.sink.credit() > 0:
                            entries = [ready.popleft()]
                            self._count_out(c, entries)
                            budget -= 1
                            c.sink.deliver(c, entries)
                            misses = 0
                        else:
                            misses += 1
                if not ready or not budget:
                    break
        finally:
            self._dispatching = False
        if ready:
            if not budget:
                for _, group in self._groups:
                    group[0].sink.dispatch_soon(self)
                    break
            else:
                self._stalled = True

    def _count_out(self, c: Consumer, entries: list[QueueEntry]) -> None:
        k = len(entries)
        self.delivered += k
        if c.no_ack:
            self.acked += k
            self._forget(entries)
        else:
            self.unacked += k
            c.unacked += k
            self._mark_delivered(entries)

    # -- consumers ------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        for prio, group in self._groups:
            if prio == consumer.priority:
                group.append(consumer)
                break
        else:
            self._groups.append((consumer.priority, deque([consumer])))
            self._groups.sort(key=lambda g: -g[0])
        self._consumer_count += 1
        self._had_consumers = True
        self.dispatch()

    def remove_consumer(self, consumer: Consumer) -> bool:
        """Detach a consumer; True when that leaves an auto-delete queue unused."""
        for i, (_, group) in enumerate(self._groups):
            if consumer in group:
                group.remove(consumer)
                self._consumer_count -= 1
                if not group:
                    del self._groups[i]
                break
        return self.auto_delete and self._had_consumers and not self._consumer_count

    # -- whole-queue operations -----------------------------------------

    def purge(self) -> int:
        """Drop every ready message (delivered ones stay until settled)."""
        n = self.message_count
        ready = list(self.ready)
        self.ready.clear()
        self._forget(ready)
        journal = self.journal
        if journal is not None and self.paged:
            qid = self.store_id
            for word, ref in self.paged:
                if word & PAGING_REF or self.deleted:
                    journal.release(ref)
                else:
                    journal.ack(qid, ref)
            self.paged.clear()
        return n

    def detach_all_consumers(self) -> list[Consumer]:
        consumers = self.consumers()
        self._groups.clear()
        self._consumer_count = 0
        return consumers


def _seq_of(entry: QueueEntry) -> int:
    return entry.seq


def _bisect(ready: deque[QueueEntry], seq: int) -> int:
    lo, hi = 0, len(ready)
    while lo < hi:
        mid = (lo + hi) // 2
        if ready[mid].seq < seq:
            lo = mid + 1
        else:
            hi = mid
    return lo
