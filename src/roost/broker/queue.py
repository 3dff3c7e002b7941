"""Classic queue with RabbitMQ's delivery semantics.

The interface is the narrow one of RabbitMQ's ``rabbit_queue_type``:
enqueue, consume, cancel, settle, requeue, get, purge, delete. Ready
messages are kept in publish order (``QueueEntry.seq``, per priority in a
priority queue); a requeued message goes back to its original position, as
in RabbitMQ's classic queues.

Queue arguments (:mod:`queue_args`) add TTL (expired messages never reach a
consumer and are dead-lettered), length limits with RabbitMQ's overflow
modes, a delivery limit for poison messages, roost's retry back-off, single
active consumer, and queue expiry.

With a journal (message store) attached, a queue longer than
``ready_limit`` keeps only its head in memory: later messages are *paged*,
held as (sequence, log location, expiry) words and read back from the log
as the head drains. A priority queue pages each priority level the same
way, keeping at least the head of every non-empty level in memory, and
refills a level from the log as soon as its in-memory part runs out.
A durable queue also tells the journal which persistent messages it
delivered and settled, so a restart brings back exactly the unsettled
ones.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from roost import properties
from roost.broker import deadletter
from roost.broker.dedup import Deduplicator
from roost.broker.message import Message, QueueEntry
from roost.broker.paging import (
    PAGING_REF,
    REDELIVERED,
    SEQ_MASK,
    UNSIZED,
    PagedByPriority,
    PagedEntries,
)
from roost.broker.queue_args import QueueOptions, parse_expiration
from roost.broker.ready import ReadyByPriority, ReadyFifo

if TYPE_CHECKING:
    from roost.broker.binding import Binding
    from roost.broker.consumer import Consumer
    from roost.broker.journal import Journal
    from roost.broker.vhost import VirtualHost

# Most messages one dispatch() call hands out (see Queue.dispatch).
DISPATCH_BATCH = 1000
# A queue pages new messages to the log once its in-memory messages are
# estimated (body + ENTRY_OVERHEAD each) to pass the vhost's
# queue_memory_limit; PAGE_IN_BATCH come back per refill, so one refill
# never stalls the event loop for long.
ENTRY_OVERHEAD = 400
PAGE_IN_BATCH = 4096


def now_ms() -> int:
    return int(time.time() * 1000)


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
        options: QueueOptions | None = None,
    ) -> None:
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.exclusive_owner = exclusive_owner
        self.auto_delete = auto_delete
        self.arguments: dict[str, Any] = dict(arguments or {})
        self.options = options or QueueOptions()
        opts = self.options
        self.ready: ReadyFifo | ReadyByPriority = (
            ReadyByPriority(opts.max_priority) if opts.max_priority else ReadyFifo()
        )
        self.ready_bytes = 0  # body bytes of ready + paged messages
        self.unacked = 0
        self.bindings: set[Binding] = set()
        # Consumers grouped by priority, highest first; each group rotates
        # for round-robin delivery.
        self._groups: list[tuple[int, deque[Consumer]]] = []
        self._consumer_count = 0
        self._had_consumers = False
        # Single active consumer: registration order, the first one active.
        self._sac_order: list[Consumer] = []
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
        # A priority queue's paged entries, per level (self.paged then only
        # holds restored entries until restore() sorts them).
        self._paged_levels: PagedByPriority | None = None
        if isinstance(self.ready, ReadyByPriority):
            self._paged_levels = PagedByPriority(opts.max_priority)
            self.ready.on_empty = self._refill_level
        # Delivery counts of restored entries not yet paged in, by ref
        # (only with a delivery limit; see restore()).
        self._restored_counts: dict[int, int] = {}
        self._past_limit: list[int] = []  # restored refs to dead-letter at start
        self._paged_bytes = 0  # body bytes of the paged entries (as far as known)
        # A count limit on top of the memory estimate (tests lower it).
        self.ready_limit = 1 << 62
        # Requeued entries waiting out a retry delay: (due ms, seq, entry).
        self._waiting: list[tuple[int, int, QueueEntry]] = []
        self._ttl_timer: Any = None
        self._ttl_due = 0
        self._retry_timer: Any = None
        self._expiry_timer: Any = None
        self._last_used = now_ms()
        # Seq of the entry being enqueued while dispatch() runs: a TTL-0
        # message may still go to a consumer waiting right now (RabbitMQ's
        # attempt_delivery before the TTL applies), so expire() spares it.
        self._fresh = 0
        self.published = 0
        self.delivered = 0
        self.acked = 0
        self.redelivered = 0  # deliveries of redelivered entries (stats.py)
        self.dead_lettered = 0
        # x-message-deduplication: enforced by VirtualHost.enqueue.
        self.deduper = Deduplicator.for_queue(opts)
        # Whether enqueue may turn a message away (dedup, reject-publish):
        # VirtualHost.enqueue skips those checks for every other queue.
        self.guarded = self.deduper is not None or opts.overflow != "drop-head"
        self._limited = opts.max_length is not None or opts.max_length_bytes is not None
        if opts.expires is not None:
            self._arm_expiry()

    # -- inspection -----------------------------------------------------

    @property
    def message_count(self) -> int:
        return len(self.ready) + self._paged_count() + len(self._waiting)

    def _paged_count(self) -> int:
        levels = self._paged_levels
        return len(self.paged) + (len(levels) if levels is not None else 0)

    def memory_estimate(self) -> int:
        """Bytes this queue's messages take in memory (what the management
        API reports as ``memory``): in-memory bodies plus bookkeeping, and
        the compact words of paged entries."""
        in_memory = max(0, self.ready_bytes - self._paged_bytes)
        return in_memory + len(self.ready) * ENTRY_OVERHEAD + self._paged_count() * 24

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

    @property
    def active_consumer(self) -> Consumer | None:
        """With single active consumer, the one that gets messages."""
        return self._sac_order[0] if self._sac_order else None

    # -- messages in ----------------------------------------------------

    def enqueue(self, message: Message) -> bool:
        """Add a routed message; False when the queue refuses it
        (``x-overflow: reject-publish``), so the publisher gets a nack."""
        opts = self.options
        if self._limited and not self._make_room(message):
            return False
        self._seq += 1
        self.published += 1
        props = message.properties
        # FLAG_EXPIRATION (0x0100) is the low bit of the first flags byte.
        if opts.message_ttl is not None or (props and props[0] & 0x01):
            expires = self._expiry_for(message, now_ms())
        else:
            expires = 0
        priority = 0
        if opts.max_priority and message.priority:
            priority = min(message.priority, opts.max_priority)
        self.ready_bytes += len(message.body)
        journal = self.journal
        ready = self.ready
        levels = self._paged_levels
        if (
            journal is not None
            and (
                (self.paged if levels is None else levels.levels[priority])
                or len(ready) >= self.ready_limit
                or self.ready_bytes - self._paged_bytes + len(ready) * ENTRY_OVERHEAD
                > self.vhost.queue_memory_limit
            )
            # The head of each priority level stays in memory (_refill_level).
            and (isinstance(ready, ReadyFifo) or ready.level(priority))
        ):
            self._page_out(journal, self._seq, message, expires, priority)
        else:
            self.ready.append(QueueEntry(self._seq, message, False, expires, priority))
            if expires:
                self._arm_ttl(expires)
        if self._groups and not self._stalled:
            self._fresh = self._seq
            self.dispatch()
            self._fresh = 0
        return True

    def _has_ttl(self, message: Message) -> bool:
        return self.options.message_ttl is not None or bool(
            message.properties[0] & 0x01 if message.properties else 0
        )

    def _expiry_for(self, message: Message, base_ms: int) -> int:
        """Absolute expiry (ms) from the queue TTL and the message's expiration."""
        ttl = self.options.message_ttl
        raw = message.properties
        if len(raw) >= 2 and raw[0] & 0x01:  # FLAG_EXPIRATION is 0x0100
            exp = properties.scan(raw).expiration
            if exp is not None:
                try:
                    mttl = parse_expiration(exp)
                except ValueError:
                    mttl = None
                if mttl is not None:
                    ttl = mttl if ttl is None else min(ttl, mttl)
        if ttl is None:
            return 0
        return base_ms + ttl if ttl else base_ms  # ttl 0: due at once

    def refuses(self, message: Message) -> bool:
        """Whether ``x-overflow: reject-publish(-dlx)`` turns ``message`` away."""
        opts = self.options
        if opts.overflow == "drop-head":
            return False
        n = len(self.ready) + self._paged_count()
        return (opts.max_length is not None and n + 1 > opts.max_length) or (
            opts.max_length_bytes is not None
            and self.ready_bytes + len(message.body) > opts.max_length_bytes
        )

    def refuse(self, message: Message) -> None:
        if self.options.overflow == "reject-publish-dlx":
            self.dead_lettered += 1
            deadletter.dead_letter(self, message, deadletter.MAXLEN)

    def _make_room(self, message: Message) -> bool:
        """Apply x-max-length / x-max-length-bytes before adding ``message``."""
        opts = self.options
        size = len(message.body)

        def over() -> bool:
            n = len(self.ready) + self._paged_count()
            return (opts.max_length is not None and n + 1 > opts.max_length) or (
                opts.max_length_bytes is not None
                and self.ready_bytes + size > opts.max_length_bytes
            )

        if not over():
            return True
        if opts.overflow != "drop-head":
            self.refuse(message)
            return False
        while over() and (self.ready or self.paged):
            if not self.ready:
                self._page_in()
            entry = self.ready.popleft()
            self._drop(entry, deadletter.MAXLEN)
        if opts.max_length == 0 or (
            opts.max_length_bytes is not None and size > opts.max_length_bytes
        ):
            # Nothing could make room: the new message itself goes.
            deadletter.dead_letter(self, message, deadletter.MAXLEN)
            return False
        return True

    def _drop(self, entry: QueueEntry, reason: str) -> None:
        """A ready entry leaves without being delivered (expiry, overflow)."""
        self.ready_bytes -= len(entry.message.body)
        self.dead_lettered += 1
        deadletter.dead_letter(self, entry.message, reason)
        self._forget([entry])

    def _page_out(
        self, journal: Journal, seq: int, message: Message, expires: int, priority: int
    ) -> None:
        entry = self._paged_entry(journal, seq, message, expires)
        levels = self._paged_levels
        if levels is None:
            self.paged.append(*entry)
        else:
            levels.append(priority, *entry)

    def _paged_entry(
        self, journal: Journal, seq: int, message: Message, expires: int
    ) -> tuple[int, int, int]:
        """The (word, ref, expires) that stands for ``message`` once paged."""
        self._paged_bytes += len(message.body)
        if self._holds_durable_ref(message):
            return seq, message.ref, expires
        return seq | PAGING_REF, journal.page_out(message), expires

    def page_out_tail(self, budget: int) -> int:
        """Page the newest in-memory ready messages out to the log until the
        rest fits the vhost's queue_memory_limit (set low by the memory
        alarm) or about ``budget`` body bytes are paged; returns how many.
        Entries delivered once stay in memory (their redelivered flag and
        delivery count live on the entry); so does the head of each level
        of a priority queue, whose lowest levels go first."""
        journal = self.journal
        if journal is None:
            return 0
        ready = self.ready
        limit = self.vhost.queue_memory_limit
        in_memory = self.ready_bytes - self._paged_bytes + len(ready) * ENTRY_OVERHEAD
        paged = 0
        levels = self._paged_levels
        # (a FIFO, how many of it stay, how to take its newest, where its
        # paged entries go): the queue itself, or each priority level.
        tails: list[
            tuple[
                ReadyFifo,
                int,
                Callable[[], QueueEntry],
                Callable[[list[tuple[int, int, int]]], None],
            ]
        ] = []
        if isinstance(ready, ReadyFifo):
            tails.append((ready, 0, ready.pop, self.paged.prepend))
        elif levels is not None:
            for p in range(len(levels.levels)):  # lowest first: served last
                tails.append(
                    (
                        ready.level(p),
                        1,
                        functools.partial(ready.pop_last, p),
                        functools.partial(levels.prepend, p),
                    )
                )
        for fifo, keep, pop, prepend in tails:
            items: list[tuple[int, int, int]] = []
            while len(fifo) > keep and in_memory > limit and paged < budget:
                entry = fifo.peek_last()
                if entry.redelivered or entry.deliveries:
                    break
                pop()
                size = len(entry.message.body)
                in_memory -= size + ENTRY_OVERHEAD
                paged += size
                items.append(self._paged_entry(journal, entry.seq, entry.message, entry.expires))
            items.reverse()
            prepend(items)
        return paged

    def _holds_durable_ref(self, message: Message) -> bool:
        """Whether this queue's id is in the message's persistent log record."""
        return bool(self.store_id and message.persistent and message.ref)

    def _page_in(self) -> None:
        """Refill the in-memory head from the log."""
        journal = self.journal
        paged = self.paged
        if journal is None or not paged:
            return
        self._read_in(journal, paged.popleft, len(paged))

    def _refill_level(self, priority: int) -> None:
        """A priority level's in-memory part ran out: read its next paged
        entries back before anything of a lower level is served."""
        journal = self.journal
        levels = self._paged_levels
        if journal is None or levels is None:
            return
        pop = functools.partial(levels.popleft, priority)
        self._read_in(journal, pop, len(levels.levels[priority]))

    def _read_in(
        self, journal: Journal, pop: Callable[[], tuple[int, int, int]], available: int
    ) -> None:
        """Read up to PAGE_IN_BATCH paged entries back into memory."""
        ready = self.ready
        for _ in range(min(available, PAGE_IN_BATCH)):
            entry = self._read_back(journal, *pop())
            ready.append(entry)
            if entry.expires:
                self._arm_ttl(entry.expires)

    def _read_back(self, journal: Journal, word: int, ref: int, expires: int) -> QueueEntry:
        """The queue entry a paged (word, ref, expires) stands for."""
        msg = journal.read(ref)
        if word & UNSIZED:
            self.ready_bytes += len(msg.body)  # now known; was never counted
        else:
            self._paged_bytes -= len(msg.body)
        if word & PAGING_REF:
            journal.release(ref)
        if not expires and msg.written_ms and self._has_ttl(msg):
            expires = self._expiry_for(msg, msg.written_ms)
        opts = self.options
        priority = min(msg.priority or 0, opts.max_priority) if opts.max_priority else 0
        entry = QueueEntry(word & SEQ_MASK, msg, bool(word & REDELIVERED), expires, priority)
        if self._restored_counts and not word & PAGING_REF:
            entry.deliveries = self._restored_counts.pop(ref, 0)
        return entry

    def restore(self, refs: list[int], delivered: Mapping[int, int]) -> None:
        """Refill a durable queue from the log after a restart.

        ``delivered`` maps a ref to how often it was handed out; with a
        delivery limit those counts carry on (kept by ref until the entry
        is paged in), so a restart gives a poison message no fresh attempts.
        """
        limit = self.options.delivery_limit
        for ref in refs:
            if limit is not None and delivered.get(ref, 0) > limit:
                # Its last allowed delivery was never settled: it leaves as
                # requeue() would have it leave, once every queue is back.
                self._past_limit.append(ref)
                continue
            self._seq += 1
            self.paged.append(self._seq | UNSIZED | (REDELIVERED if ref in delivered else 0), ref)
        if limit is not None and delivered:
            self._restored_counts.update(delivered)
        if self._paged_levels is not None:
            self._sort_restored()

    def _sort_restored(self) -> None:
        """Restored entries of a priority queue come back in log order: read
        each (its priority is in the message) and page it behind its level,
        as enqueue() would have."""
        journal = self.journal
        levels = self._paged_levels
        ready = self.ready
        if journal is None or levels is None or not isinstance(ready, ReadyByPriority):
            return
        limit = self.vhost.queue_memory_limit
        paged = self.paged
        while paged:
            entry = self._read_back(journal, *paged.popleft())
            p = entry.priority
            in_memory = self.ready_bytes - self._paged_bytes + len(ready) * ENTRY_OVERHEAD
            # enqueue()'s rule: behind the level's head, once over the limit.
            if ready.level(p) and (levels.levels[p] or in_memory > limit):
                message = entry.message
                self._paged_bytes += len(message.body)
                word = entry.seq | (REDELIVERED if entry.redelivered else 0)
                levels.append(p, word, message.ref, entry.expires)
                if entry.deliveries:
                    self._restored_counts[message.ref] = entry.deliveries
            else:
                ready.append(entry)

    def requeue(self, entries: Iterable[QueueEntry]) -> None:
        """Put delivered-but-unsettled entries back at their original position
        (or dead-letter them past the delivery limit, or hold them for the
        retry delay)."""
        entries = list(entries)
        if self.deleted:
            self.settle(entries)
            return
        opts = self.options
        self.unacked -= len(entries)
        now = now_ms()
        back = False
        for entry in sorted(entries, key=_seq_of, reverse=True):
            if opts.delivery_limit is not None and entry.deliveries > opts.delivery_limit:
                self.acked += 1
                self.dead_lettered += 1
                deadletter.dead_letter(self, entry.message, deadletter.DELIVERY_LIMIT)
                self._forget([entry])
                continue
            entry.redelivered = True
            self.ready_bytes += len(entry.message.body)
            if opts.retry_delay and self.vhost.scheduler is not None:
                delay = opts.retry_delay
                if opts.retry_backoff == "exponential":
                    delay *= 2 ** max(0, entry.deliveries - 1)
                if opts.retry_max_delay is not None:
                    delay = min(delay, opts.retry_max_delay)
                heapq.heappush(self._waiting, (now + delay, entry.seq, entry))
                continue
            self.ready.requeue(entry)
            back = True
        if back and opts.overflow == "drop-head":
            self._trim_head()
        if self._waiting:
            self._arm_retry()
        if back and self._groups:
            self.dispatch()

    def _trim_head(self) -> None:
        """Requeued messages may take the queue over its limits: drop from
        the head, as rabbit_amqqueue_process:requeue_and_run does."""
        opts = self.options
        if opts.max_length is None and opts.max_length_bytes is None:
            return
        while self.ready or self.paged:
            n = len(self.ready) + self._paged_count()
            if not (
                (opts.max_length is not None and n > opts.max_length)
                or (opts.max_length_bytes is not None and self.ready_bytes > opts.max_length_bytes)
            ):
                break
            if not self.ready:
                self._page_in()
            self._drop(self.ready.popleft(), deadletter.MAXLEN)

    def _arm_retry(self) -> None:
        sched = self.vhost.scheduler
        if sched is None or not self._waiting or self._retry_timer is not None:
            return
        delay = max(0, self._waiting[0][0] - now_ms()) / 1000
        self._retry_timer = sched(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry_timer = None
        if self.deleted:
            return
        now = now_ms()
        moved = False
        while self._waiting and self._waiting[0][0] <= now:
            _, _, entry = heapq.heappop(self._waiting)
            self.ready.requeue(entry)
            moved = True
        self._arm_retry()
        if moved and self._groups:
            self.dispatch()

    # -- TTL ------------------------------------------------------------

    def _arm_ttl(self, due: int) -> None:
        sched = self.vhost.scheduler
        if sched is None or (self._ttl_timer is not None and self._ttl_due <= due):
            return
        if self._ttl_timer is not None:
            self._ttl_timer.cancel()
        self._ttl_due = due
        self._ttl_timer = sched(max(0, due - now_ms()) / 1000, self._ttl_fired)

    def _ttl_fired(self) -> None:
        self._ttl_timer = None
        if self.deleted:
            return
        self.expire()
        if self.ready:
            head = self.ready.peek()
            if head.expires:
                self._arm_ttl(head.expires)

    def expire(self) -> int:
        """Dead-letter expired messages at the head (RabbitMQ expires only
        from the head, so a long-TTL message can shelter short ones)."""
        ready = self.ready
        n = 0
        now = now_ms()
        while True:
            if not ready:
                if not self.paged:
                    break
                self._page_in()
            head = ready.peek()
            if not head.expires or head.expires > now or head.seq == self._fresh:
                break
            self._drop(ready.popleft(), deadletter.EXPIRED)
            n += 1
        return n

    # -- queue expiry (x-expires) ----------------------------------------

    def touch(self) -> None:
        """The queue was used (declared, consumed from, read): restart x-expires."""
        self._last_used = now_ms()

    def _arm_expiry(self) -> None:
        sched = self.vhost.scheduler
        expires = self.options.expires
        if sched is None or expires is None or self._expiry_timer is not None:
            return
        due = self._last_used + expires
        self._expiry_timer = sched(max(0, due - now_ms()) / 1000 + 0.001, self._expiry_fired)

    def _expiry_fired(self) -> None:
        self._expiry_timer = None
        expires = self.options.expires
        if self.deleted or expires is None:
            return
        if not self._consumer_count and now_ms() >= self._last_used + expires:
            self.vhost.remove_queue(self)
            return
        self._arm_expiry()

    def start_timers(self) -> None:
        """Arm timers once a scheduler exists (after recovery)."""
        if self._past_limit and self.journal is not None:
            refs, self._past_limit = self._past_limit, []
            for ref in refs:
                self._restored_counts.pop(ref, None)
                msg = self.journal.read(ref)
                self.dead_lettered += 1
                deadletter.dead_letter(self, msg, deadletter.DELIVERY_LIMIT)
                self.journal.ack(self.store_id, ref)
        if self.options.expires is not None:
            self._arm_expiry()
        if not self.ready and self.paged and self.options.message_ttl is not None:
            # Restored messages are paged with no expiry yet: read the head
            # back so the queue TTL runs without waiting for a consumer.
            self._page_in()
        if self.ready:
            head = self.ready.peek()
            if head.expires:
                self._arm_ttl(head.expires)

    # -- messages out ---------------------------------------------------

    def get(self, no_ack: bool) -> QueueEntry | None:
        self.touch()
        if self.ready or self.paged:
            self.expire()
        if not self.ready:
            self._page_in()
            if not self.ready:
                return None
        entry = self.ready.popleft()
        self._count_out(None, [entry], no_ack)
        return entry

    def settle(self, entries: list[QueueEntry]) -> None:
        """Delivered entries were acked (or rejected without requeue)."""
        self.unacked -= len(entries)
        self.acked += len(entries)
        self._forget(entries)

    def reject(self, entries: list[QueueEntry]) -> None:
        """Delivered entries were rejected without requeue: dead-letter them."""
        if self.options.dead_letter_exchange is not None and not self.deleted:
            for e in entries:
                deadletter.dead_letter(self, e.message, deadletter.REJECTED)
            self.dead_lettered += len(entries)
        self.settle(entries)

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
        counted = self.options.delivery_limit is not None
        for e in entries:
            m = e.message
            # With a delivery limit every delivery is recorded (recovery
            # counts them); otherwise the first one is enough.
            if m.persistent and m.ref and (counted or not e.redelivered):
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
        check_ttl = self._ttl_timer is not None or self.options.message_ttl is not None
        budget = DISPATCH_BATCH
        groups = self._groups
        if self.options.single_active_consumer:
            active = self.active_consumer
            groups = [(0, deque([active]))] if active is not None else []
        try:
            if check_ttl:
                self.expire()
            for _, group in groups:
                if len(group) == 1:
                    c = group[0]
                    k = min(len(ready), budget, c.sink.credit())
                    if not c.no_ack and c.prefetch:
                        k = min(k, c.prefetch - c.unacked)
                    if k <= 0:
                        continue
                    entries = ready.take(k)
                    self._count_out(c, entries, c.no_ack)
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
                            self._count_out(c, entries, c.no_ack)
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
                for _, group in groups:
                    group[0].sink.dispatch_soon(self)
                    break
            else:
                self._stalled = True

    def _count_out(self, c: Consumer | None, entries: list[QueueEntry], no_ack: bool) -> None:
        k = len(entries)
        self.delivered += k
        counted = self.options.delivery_limit is not None
        size = 0
        for e in entries:
            size += len(e.message.body)
            if e.redelivered:
                self.redelivered += 1
            if counted and e.deliveries:
                e.message = _with_delivery_count(e.message, e.deliveries)
            e.deliveries += 1
        self.ready_bytes -= size
        if no_ack:
            self.acked += k
            self._forget(entries)
        else:
            self.unacked += k
            if c is not None:
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
        self._sac_order.append(consumer)
        self.touch()
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
        was_active = bool(self._sac_order) and self._sac_order[0] is consumer
        if consumer in self._sac_order:
            self._sac_order.remove(consumer)
        self.touch()
        if self.options.expires is not None:
            self._arm_expiry()
        if was_active and self._sac_order and not self.deleted:
            self.dispatch()  # fail over to the next consumer
        return self.auto_delete and self._had_consumers and not self._consumer_count

    # -- whole-queue operations -----------------------------------------

    def purge(self) -> int:
        """Drop every ready message (delivered ones stay until settled)."""
        n = self.message_count
        ready = self.ready.clear()
        ready += [e for _, _, e in self._waiting]
        self._waiting.clear()
        self.ready_bytes = 0
        self._forget(ready)
        journal = self.journal
        if journal is not None and self._paged_count():
            qid = self.store_id
            levels = self._paged_levels
            for word, ref in itertools.chain(self.paged, levels if levels is not None else ()):
                if word & PAGING_REF or self.deleted:
                    journal.release(ref)
                else:
                    journal.ack(qid, ref)
            self.paged.clear()
            if levels is not None:
                levels.clear()
            self._paged_bytes = 0
            self._restored_counts.clear()
        if self.deleted and isinstance(self.ready, ReadyByPriority):
            self.ready.on_empty = None  # a cycle through the queue otherwise
        return n

    def detach_all_consumers(self) -> list[Consumer]:
        consumers = self.consumers()
        self._groups.clear()
        self._sac_order.clear()
        self._consumer_count = 0
        return consumers

    def stop_timers(self) -> None:
        for t in (self._ttl_timer, self._retry_timer, self._expiry_timer):
            if t is not None:
                t.cancel()
        self._ttl_timer = self._retry_timer = self._expiry_timer = None


def _seq_of(entry: QueueEntry) -> int:
    return entry.seq


def _with_delivery_count(message: Message, count: int) -> Message:
    """A copy of ``message`` whose headers carry ``x-delivery-count``."""
    props = properties.decode_properties(message.properties)
    headers = dict(props.headers or {})
    headers["x-delivery-count"] = count
    props.headers = headers
    m = Message(
        message.exchange,
        message.routing_key,
        properties.encode_properties(props),
        message.body,
        message.persistent,
        message.priority,
    )
    m.ref = message.ref
    m.written_ms = message.written_ms
    return m
