"""Classic queue with RabbitMQ's delivery semantics.

The interface is the narrow one of RabbitMQ's ``rabbit_queue_type``:
admit, enqueue, consume, cancel, settle, requeue, get, purge, delete. The
queue keeps consumers, dispatch, prefetch, TTL, dead-lettering and
overflow policy; its :class:`~roost.broker.backing_queue.BackingQueue`
keeps the ready entries (in publish order, per priority in a priority
queue), pages them to the message log beyond the memory limit and owns
their storage references. A requeued message goes back to its original
position, as in RabbitMQ's classic queues.

Queue arguments (:mod:`queue_args`) add TTL (expired messages never reach a
consumer and are dead-lettered), length limits with RabbitMQ's overflow
modes, a delivery limit for poison messages, roost's retry back-off, single
active consumer, and queue expiry.
"""

from __future__ import annotations

import functools
import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from roost import properties
from roost.broker import clock, deadletter
from roost.broker.backing_queue import BackingQueue, make_backing_queue
from roost.broker.dedup import Deduplicator
from roost.broker.message import Message, QueueEntry
from roost.broker.queue_args import QueueOptions, parse_expiration

if TYPE_CHECKING:
    from roost.broker.binding import Binding
    from roost.broker.consumer import Consumer
    from roost.broker.queue_peers import QueuePeers
    from roost.broker.vhost import VirtualHost

# Most messages one dispatch() call hands out (see Queue.dispatch).
DISPATCH_BATCH = 1000

# What admit() says of a message.
ACCEPT = 0
DUPLICATE = 1  # x-message-deduplication: already seen; dropped, confirmed
REFUSE = 2  # x-overflow reject-publish(-dlx): the publisher gets a nack
DISCARD = 3  # drop-head, and it can never fit: dead-lettered at once


def now_ms() -> int:
    return clock.wall_ms()


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
        self.backing: BackingQueue = make_backing_queue(
            vhost.journal, vhost, opts.max_priority or 0, functools.partial(restored_expiry, opts)
        )
        self.backing.expiry_seen = self._arm_ttl
        self.unacked = 0
        self.bindings: set[Binding] = set()
        # Consumers grouped by priority, highest first; each group rotates
        # for round-robin delivery.
        self._groups: list[tuple[int, deque[Consumer]]] = []
        self._consumer_count = 0
        self._had_consumers = False
        # Single active consumer: registration order, the first one active.
        self._sac_order: list[Consumer] = []
        # Cluster mode: the other nodes' consumers (roost.cluster.consumers).
        self.peers: QueuePeers | None = None
        self._seq = 0
        self._dispatching = False
        # Set when the last dispatch() left messages because no consumer had
        # credit. Enqueueing cannot add credit, so it skips dispatch() until
        # an explicit call (ack, new consumer, qos, flow, socket drained).
        self._stalled = False
        self.deleted = False
        # Restored refs past the delivery limit, dead-lettered once timers start.
        self._past_limit: list[int] = []
        # Requeued entries waiting out a retry delay: (due ms, seq, entry).
        # They are out of the backing queue, like delivered ones.
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
        # x-message-deduplication (see admit()).
        self.deduper = Deduplicator.for_queue(opts)
        self._limited = opts.max_length is not None or opts.max_length_bytes is not None
        # Whether admit() can say anything but ACCEPT: the publish path
        # skips it for every other queue.
        self.admits_all = self.deduper is None and not self._limited
        if opts.expires is not None:
            self._arm_expiry()

    # -- inspection -----------------------------------------------------

    @property
    def store_id(self) -> int:
        """The durable queue's id in the message log (0: not logged)."""
        return self.backing.store_id

    @store_id.setter
    def store_id(self, value: int) -> None:
        self.backing.store_id = value

    @property
    def ready_bytes(self) -> int:
        """Body bytes of the ready messages (as far as known)."""
        return self.backing.bytes

    @property
    def ready_limit(self) -> int:
        """Ready messages kept in memory at most, on top of the memory limit."""
        return self.backing.ready_limit

    @ready_limit.setter
    def ready_limit(self, value: int) -> None:
        self.backing.ready_limit = value

    @property
    def message_count(self) -> int:
        return len(self.backing) + len(self._waiting)

    def memory_estimate(self) -> int:
        """Bytes this queue's messages take in memory (what the management
        API reports as ``memory``): in-memory bodies plus bookkeeping, and
        the compact words of paged entries."""
        return self.backing.memory()

    @property
    def consumer_count(self) -> int:
        """Consumers of the queue, on every node of a cluster."""
        peers = self.peers
        if peers is None:
            return self._consumer_count
        return self._consumer_count + peers.remote_consumers

    @property
    def local_consumer_count(self) -> int:
        return self._consumer_count

    @property
    def exclusive(self) -> bool:
        return self.exclusive_owner is not None

    def consumers(self) -> list[Consumer]:
        return [c for _, group in self._groups for c in group]

    def has_exclusive_consumer(self) -> bool:
        if self.peers is not None and self.peers.remote_exclusive:
            return True
        return any(c.exclusive for c in self.consumers())

    @property
    def active_consumer(self) -> Consumer | None:
        """With single active consumer, the one that gets messages (in a
        cluster: None when it is on another node)."""
        if self.peers is not None:
            return self.peers.active_consumer(self._sac_order)
        return self._sac_order[0] if self._sac_order else None

    def priority_floor(self) -> int | None:
        """Consumers below this priority get nothing now: a consumer of
        higher priority on another node has room (None: no floor)."""
        return self.peers.priority_floor() if self.peers is not None else None

    # -- messages in ----------------------------------------------------

    def admit(self, message: Message) -> int:
        """Whether this queue takes ``message`` (ACCEPT), drops it as a
        duplicate, refuses it (reject-publish) or can never hold it
        (DISCARD). Decided before anything is written to the log; a
        DUPLICATE's key stays seen, anything else but ACCEPT leaves the
        cache as it was."""
        deduper = self.deduper
        if deduper is not None and deduper.check_and_add(message):
            return DUPLICATE
        verdict = ACCEPT
        if self._limited:
            opts = self.options
            size = len(message.body)
            if opts.overflow != "drop-head":
                if self._over(len(self.backing) + 1, self.backing.bytes + size):
                    verdict = REFUSE
            elif opts.max_length == 0 or (
                opts.max_length_bytes is not None and size > opts.max_length_bytes
            ):
                verdict = DISCARD  # nothing it could drop would make room
        if verdict != ACCEPT and deduper is not None:
            deduper.forget(message)  # a resend may still get in
        return verdict

    def refuse(self, message: Message) -> None:
        """admit() said REFUSE: ``reject-publish-dlx`` dead-letters it."""
        if self.options.overflow == "reject-publish-dlx":
            self.dead_lettered += 1
            deadletter.dead_letter(self, message, deadletter.MAXLEN)

    def discard(self, message: Message) -> None:
        """admit() said DISCARD: the message goes as if dropped from the head."""
        self.published += 1
        self.dead_lettered += 1
        deadletter.dead_letter(self, message, deadletter.MAXLEN)

    def delegate_limits(self) -> None:
        """The backing queue enforces x-max-length(-bytes) from now on (a
        cluster's, deciding at commit against the count of every node's
        rows): admit(), enqueue() and requeue() no longer do, and it
        reports what it refused or dropped through :meth:`overflowed`."""
        self._limited = False
        self.admits_all = self.deduper is None

    def overflowed(self, messages: Iterable[Message], uncounted: int = 0) -> None:
        """The backing queue refused (reject-publish-dlx) or dropped
        (drop-head) ``messages`` for the length limits: they are
        dead-lettered; ``uncounted`` more were dropped whose content it
        did not fetch, the queue having no dead-letter exchange."""
        for message in messages:
            self.dead_lettered += 1
            deadletter.dead_letter(self, message, deadletter.MAXLEN)
        if uncounted:
            self.dead_lettered += uncounted
            by = self.vhost.dead_lettered_by
            key = (deadletter.MAXLEN, "disabled")
            by[key] = by.get(key, 0) + uncounted

    def _over(self, count: int, size: int) -> bool:
        opts = self.options
        return (opts.max_length is not None and count > opts.max_length) or (
            opts.max_length_bytes is not None and size > opts.max_length_bytes
        )

    def enqueue(self, message: Message, ref: int = 0) -> None:
        """Add an admitted message; ``ref`` is this queue's reference on its
        persistent record (0: none), handed to the backing queue."""
        opts = self.options
        if self._limited:
            self._make_room(len(message.body))
        self._seq += 1
        self.published += 1
        props = message.properties
        # FLAG_EXPIRATION (0x0100) is the low bit of the first flags byte.
        if opts.message_ttl is not None or (props and props[0] & 0x01):
            expires = expiry_for(opts, message, now_ms())
        else:
            expires = 0
        priority = 0
        if opts.max_priority and message.priority:
            priority = min(message.priority, opts.max_priority)
        entry = QueueEntry(self._seq, message, False, expires, priority, ref)
        if self.backing.publish(entry) and expires:
            self._arm_ttl(expires)
        if self._groups and not self._stalled:
            self._fresh = self._seq
            self.dispatch()
            self._fresh = 0

    def _make_room(self, size: int) -> None:
        """drop-head: drop from the head until ``size`` more bytes fit
        (admit() made sure they can)."""
        backing = self.backing
        while self._over(len(backing) + 1, backing.bytes + size):
            entry = backing.fetch()
            if entry is None:
                break
            self._drop(entry, deadletter.MAXLEN)

    def _drop(self, entry: QueueEntry, reason: str) -> None:
        """A ready entry leaves without being delivered (expiry, overflow)."""
        self.dead_lettered += 1
        deadletter.dead_letter(self, entry.message, reason)
        self.backing.settle([entry])

    def page_out_tail(self, budget: int) -> int:
        """Page the newest in-memory ready messages out to the log until the
        rest fits the vhost's queue_memory_limit (set low by the memory
        alarm) or about ``budget`` body bytes are paged; returns how many."""
        return self.backing.page_out(budget)

    def restore(self, refs: list[int], delivered: Mapping[int, int]) -> None:
        """Refill a durable queue from the log after a restart.

        ``delivered`` maps a ref to how often it was handed out; with a
        delivery limit those counts carry on, so a restart gives a poison
        message no fresh attempts.
        """
        limit = self.options.delivery_limit
        if limit is not None and delivered:
            # Their last allowed delivery was never settled: they leave as
            # requeue() would have them leave, once every queue is back.
            self._past_limit.extend(r for r in refs if delivered.get(r, 0) > limit)
            if self._past_limit:
                past = set(self._past_limit)
                refs = [r for r in refs if r not in past]
        # x-max-length-bytes needs the restored bytes before the next
        # publish, not as the entries are read back.
        sized = self.options.max_length_bytes is not None
        self._seq = self.backing.restore(refs, delivered, self._seq, limit is not None, sized)

    def requeue(self, entries: Iterable[QueueEntry]) -> None:
        """Put delivered-but-unsettled entries back at their original position
        (or dead-letter them past the delivery limit, or hold them for the
        retry delay)."""
        entries = list(entries)
        if self.deleted:
            self.settle(entries)
            return
        opts = self.options
        backing = self.backing
        self.unacked -= len(entries)
        now = now_ms()
        back = False
        for entry in sorted(entries, key=_seq_of, reverse=True):
            if opts.delivery_limit is not None and entry.deliveries > opts.delivery_limit:
                self.acked += 1
                self._drop(entry, deadletter.DELIVERY_LIMIT)
                continue
            entry.redelivered = True
            if opts.retry_delay and self.vhost.scheduler is not None:
                delay = opts.retry_delay
                if opts.retry_backoff == "exponential":
                    delay *= 2 ** max(0, entry.deliveries - 1)
                if opts.retry_max_delay is not None:
                    delay = min(delay, opts.retry_max_delay)
                later = backing.requeue_later
                if later is not None and later(entry, delay):
                    continue
                heapq.heappush(self._waiting, (now + delay, entry.seq, entry))
                continue
            backing.requeue(entry)
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
        if not self._limited:
            return
        backing = self.backing
        while self._over(len(backing), backing.bytes):
            entry = backing.fetch()
            if entry is None:
                break
            self._drop(entry, deadletter.MAXLEN)

    def drop_waiting(self) -> int:
        """Forget the entries waiting out a retry delay without a word to
        the backing queue (cluster: this node was declared dead, their rows
        were released to the others); returns how many."""
        n = len(self._waiting)
        self._waiting.clear()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        return n

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
            self.backing.requeue(entry)
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
        head = self.backing.peek()
        if head is not None and head.expires:
            self._arm_ttl(head.expires)

    def expire(self) -> int:
        """Dead-letter expired messages at the head (RabbitMQ expires only
        from the head, so a long-TTL message can shelter short ones)."""
        backing = self.backing
        n = 0
        now = now_ms()
        while True:
            head = backing.peek()
            if head is None or not head.expires or head.expires > now or head.seq == self._fresh:
                break
            backing.fetch()
            self._drop(head, deadletter.EXPIRED)
            n += 1
        return n

    # -- queue expiry (x-expires) ----------------------------------------

    def touch(self) -> None:
        """The queue was used (declared, consumed from, read): restart x-expires."""
        self._last_used = now_ms()
        if self.peers is not None:
            self.peers.touched()

    def rearm_expiry(self, last_used_ms: int) -> None:
        """The cluster found the queue used at ``last_used_ms`` (on another
        node, possibly): x-expires counts from there."""
        self._last_used = max(self._last_used, last_used_ms)
        self._arm_expiry()

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
            if self.peers is not None:
                # Unused here; the cluster knows whether it was elsewhere.
                self.peers.expire()
                return
            if self.vhost.clustered:
                return  # not attached to the cluster yet: no id to ask about
            self.vhost.remove_queue(self)
            return
        self._arm_expiry()

    def start_timers(self) -> None:
        """Arm timers once a scheduler exists (after recovery)."""
        if self._past_limit:
            refs, self._past_limit = self._past_limit, []
            for ref in refs:
                entry = self.backing.read_restored(ref)
                self._drop(entry, deadletter.DELIVERY_LIMIT)
        if self.options.expires is not None:
            self._arm_expiry()
        # Restored messages are paged with no expiry yet: reading the head
        # back lets the queue TTL run without waiting for a consumer.
        head = self.backing.peek() if self.options.message_ttl is not None else None
        if head is not None and head.expires:
            self._arm_ttl(head.expires)

    # -- messages out ---------------------------------------------------

    def get(self, no_ack: bool) -> QueueEntry | None:
        self.touch()
        if len(self.backing):
            self.expire()
        entry = self.backing.fetch()
        if entry is None:
            return None
        self._count_out(None, [entry], no_ack)
        return entry

    def settle(self, entries: list[QueueEntry]) -> None:
        """Delivered entries were acked (or rejected without requeue)."""
        self.unacked -= len(entries)
        self.acked += len(entries)
        self.backing.settle(entries)
        if self.deleted and not self.unacked and self.store_id:
            self.vhost.store_id_settled(self.store_id)

    def reject(self, entries: list[QueueEntry]) -> None:
        """Delivered entries were rejected without requeue: dead-letter them."""
        if self.options.dead_letter_exchange is not None and not self.deleted:
            for e in entries:
                deadletter.dead_letter(self, e.message, deadletter.REJECTED)
            self.dead_lettered += len(entries)
        self.settle(entries)

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
        backing = self.backing
        if not len(backing):
            return
        self._dispatching = True
        check_ttl = self._ttl_timer is not None or self.options.message_ttl is not None
        budget = DISPATCH_BATCH
        available = 0
        groups = self._groups
        if self.options.single_active_consumer:
            active = self.active_consumer
            groups = [(0, deque([active]))] if active is not None else []
        elif self.peers is not None:
            floor = self.peers.priority_floor()
            # (Groups are sorted highest first: the last is the lowest.)
            if floor is not None and groups and groups[-1][0] < floor:
                groups = [g for g in groups if g[0] >= floor]
        try:
            if check_ttl:
                self.expire()
            # Only this loop takes from the backing queue while it runs.
            available = len(backing)
            for _, group in groups:
                if len(group) == 1:
                    c = group[0]
                    k = min(available, budget, c.sink.credit())
                    if not c.no_ack and c.prefetch:
                        k = min(k, c.prefetch - c.unacked)
                    if k <= 0:
                        continue
                    entries = backing.fetch_many(k)
                    if not entries:
                        # len() may count entries the backing queue does not
                        # hold here (cluster mode: ready rows elsewhere); it
                        # calls ready_changed() when some arrive.
                        available = 0
                        break
                    k = len(entries)
                    self._count_out(c, entries, c.no_ack)
                    budget -= k
                    available -= k
                    c.sink.deliver(c, entries)
                else:
                    misses = 0
                    n = len(group)
                    while misses < n and budget and available:
                        c = group[0]
                        group.rotate(-1)
                        if (
                            c.no_ack or not c.prefetch or c.unacked < c.prefetch
                        ) and c.sink.credit() > 0:
                            entry = backing.fetch()
                            if entry is None:
                                available = 0  # as above: none here after all
                                break
                            entries = [entry]
                            self._count_out(c, entries, c.no_ack)
                            budget -= 1
                            available -= 1
                            c.sink.deliver(c, entries)
                            misses = 0
                        else:
                            misses += 1
                if not budget or not available:
                    break
        finally:
            self._dispatching = False
        if available:
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
        for e in entries:
            if e.redelivered:
                self.redelivered += 1
            if counted and e.deliveries:
                e.message = _with_delivery_count(e.message, e.deliveries)
            e.deliveries += 1
        if no_ack:
            self.acked += k
            self.backing.settle(entries)
        else:
            self.unacked += k
            if c is not None:
                c.unacked += k
            self.backing.delivered(entries, counted)

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
        if self.peers is not None:
            self.peers.consumer_added(consumer)
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
        peers = self.peers
        if peers is not None:
            peers.consumer_removed(consumer)
        self.touch()
        if self.options.expires is not None:
            self._arm_expiry()
        if peers is not None:
            # The cluster fails over and auto-deletes (its last consumer
            # may be on another node).
            return False
        if was_active and self._sac_order and not self.deleted:
            self.dispatch()  # fail over to the next consumer
        return self.auto_delete and self._had_consumers and not self._consumer_count

    # -- whole-queue operations -----------------------------------------

    def purge(self) -> int:
        """Drop every ready message (delivered ones stay until settled)."""
        n = self.message_count
        waiting = [e for _, _, e in self._waiting]
        self._waiting.clear()
        self.backing.settle(waiting)
        self.backing.purge()
        return n

    def mark_deleted(self) -> None:
        """The queue is being deleted: what is still out (delivered, not
        settled) is settled when it comes back, never requeued."""
        self.deleted = True

    def detach_all_consumers(self) -> list[Consumer]:
        consumers = self.consumers()
        self._groups.clear()
        self._sac_order.clear()
        self._consumer_count = 0
        if self.peers is not None:
            for c in consumers:
                self.peers.consumer_removed(c)
        return consumers

    def stop_timers(self) -> None:
        for t in (self._ttl_timer, self._retry_timer, self._expiry_timer):
            if t is not None:
                t.cancel()
        self._ttl_timer = self._retry_timer = self._expiry_timer = None
        self.backing.close()


def expiry_for(opts: QueueOptions, message: Message, base_ms: int) -> int:
    """Absolute expiry (ms) from the queue TTL and the message's expiration."""
    ttl = opts.message_ttl
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


def restored_expiry(opts: QueueOptions, message: Message) -> int:
    """Expiry of a message read back from the log, counted from when it
    was written (its entry's own expiry was not kept)."""
    has_ttl = opts.message_ttl is not None or bool(
        message.properties[0] & 0x01 if message.properties else 0
    )
    return expiry_for(opts, message, message.written_ms) if has_ttl else 0


def _seq_of(entry: QueueEntry) -> int:
    return entry.seq


def _with_delivery_count(message: Message, count: int) -> Message:
    """A copy of ``message`` whose headers carry ``x-delivery-count``."""
    props = properties.decode_properties(message.properties)
    headers = dict(props.headers or {})
    headers["x-delivery-count"] = count
    props.headers = headers
    return Message(
        message.exchange,
        message.routing_key,
        properties.encode_properties(props),
        message.body,
        message.persistent,
        message.priority,
        written_ms=message.written_ms,
    )
