"""Classic in-memory queue with RabbitMQ's delivery semantics.

The interface is the narrow one of RabbitMQ's ``rabbit_queue_type``:
enqueue, consume, cancel, settle, requeue, get, purge, delete. Ready
messages are kept in publish order (``QueueEntry.seq``); a requeued message
goes back to its original position, as in RabbitMQ's classic queues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from roost.broker.message import Message, QueueEntry

if TYPE_CHECKING:
    from roost.broker.binding import Binding
    from roost.broker.consumer import Consumer
    from roost.broker.vhost import VirtualHost


# Most messages one dispatch() call hands out (see Queue.dispatch).
DISPATCH_BATCH = 1000


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
        self.published = 0
        self.delivered = 0
        self.acked = 0

    # -- inspection -----------------------------------------------------

    @property
    def message_count(self) -> int:
        return len(self.ready)

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
        self.ready.append(QueueEntry(self._seq, message))
        if self._groups and not self._stalled:
            self.dispatch()

    def requeue(self, entries: Iterable[QueueEntry]) -> None:
        """Put delivered-but-unsettled entries back at their original position."""
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
            return None
        entry = self.ready.popleft()
        self.delivered += 1
        if no_ack:
            self.acked += 1
        else:
            self.unacked += 1
        return entry

    def settle(self, count: int = 1) -> None:
        """``count`` delivered entries were acked (or rejected without requeue)."""
        self.unacked -= count
        self.acked += count

    def dispatch(self) -> None:
        """Hand ready messages to consumers with credit, round-robin by priority.

        A consumer alone in its priority group gets its messages as one
        batch (one call, one socket write); competing consumers get one
        message each in turn. At most ``DISPATCH_BATCH`` messages go out per
        call, so a deep queue drained by an unlimited consumer does not
        stall the event loop or build one huge write.
        """
        self._stalled = False
        if self._dispatching or not self.ready:
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
                    self._count_out(c, k)
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
                            self._count_out(c, 1)
                            budget -= 1
                            c.sink.deliver(c, [ready.popleft()])
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

    def _count_out(self, c: Consumer, k: int) -> None:
        self.delivered += k
        if c.no_ack:
            self.acked += k
        else:
            self.unacked += k
            c.unacked += k

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
        n = len(self.ready)
        self.ready.clear()
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
