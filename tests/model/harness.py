"""The model tier: roost's broker core driven without sockets.

A :class:`ModelBroker` is a real :class:`~roost.broker.broker.Broker` on a
real :class:`~roost.store.durable_state.DurableState` (message store,
definitions, dedup caches) in a directory of the test's choosing, with
nothing of amqp/ in between. The test owns everything that normally runs
by itself:

- **The event loop.** A private asyncio loop that only moves when the test
  calls :meth:`ModelBroker.tick` (one loop iteration, after the store's
  writer thread has finished whatever it was handed) or
  :meth:`ModelBroker.flush` (ticks until the store is ``idle``). Nothing is
  confirmed, cut into a batch or written until then, so a test decides
  exactly where a crash falls.
- **Time.** :class:`FakeClock` replaces ``roost.broker.clock.wall_ms`` and
  ``monotonic_ms`` while the harness is open, and :class:`FakeScheduler`
  is the vhosts' timer source (``broker.set_scheduler``): a heap of
  (due, callback) fired in due order by :meth:`ModelBroker.advance`, each
  at its own time, so TTLs, x-expires, delivery retries, delayed exchanges
  and dedup TTLs run without sleeping. ``after_timer`` is called after
  each callback, so a checker can look between two of them.
- **Channels.** :class:`RecordingSink` implements the core's
  ``DeliverySink`` as ``amqp/channel.py`` does: it keeps unsettled
  deliveries by tag and settles them through the same ``Queue`` methods
  (``settle``, ``reject``, ``requeue``, then ``dispatch``), and logs every
  delivery for the test to read.
- **Confirms.** :meth:`ModelBroker.publish` goes through
  ``VirtualHost.publish`` and returns its ``(routed, refused, batch)``; a
  publish is confirmed once ``store.durable_batch >= batch``, as a channel
  confirms it. :meth:`ModelBroker.settle_barrier` is what makes an ack (or
  a purge, or a drop) durable: the batch ``store.barrier()`` names right
  after it.
- **Restarts.** :meth:`ModelBroker.restart` is a clean shutdown (channels
  closed, their deliveries requeued, ``DurableState.close()``);
  :meth:`ModelBroker.crash` is ``kill -9``: the writer finishes what it
  was handed (``pwrite`` survives a process kill), everything still on the
  loop is dropped, every file descriptor under the data directory is
  closed (which releases the data-directory lock) and nothing is flushed.
  It returns the newest batch on disk. Both then build a fresh broker on
  the same directory and recover it.

Inspection helpers read what a queue or a delayed exchange holds without
changing it (:func:`queue_contents`, :func:`delayed_contents`) and check
that the store's live reference counts match what the model holds
(:meth:`ModelBroker.check_references`).

Use::

    with ModelBroker(tmp_path / "data") as h:
        q = h.vhost.declare_queue("q", owner=None, durable=True)
        batch = h.publish("", "q", b"hello", message_id="m1").batch
        h.flush()
        assert h.confirmed(batch)
        h.crash()
        assert [m for m, _ in h.contents("q")] == ["m1"]
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pamqp import commands

from roost import properties
from roost.broker import broker as broker_module
from roost.broker import clock
from roost.broker.broker import Broker
from roost.broker.consumer import Consumer
from roost.broker.delayed import REF_MASK, DelayedExchange
from roost.broker.fifo_backing import FifoBackingQueue
from roost.broker.message import Message, QueueEntry
from roost.broker.paging import REDELIVERED
from roost.broker.priority_backing import PriorityBackingQueue
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.store.durable_state import DurableState
from roost.store.message_store import MessageStore

# A fixed, round start: failures print readable times.
START_MS = 1_700_000_000_000
UNLIMITED = 1 << 30


class FakeClock:
    """Wall and monotonic milliseconds that move only when told to."""

    def __init__(self, start_ms: int = START_MS) -> None:
        self.now = start_ms
        self._start = start_ms

    def wall_ms(self) -> int:
        return self.now

    def monotonic_ms(self) -> float:
        # Starts well above zero, as time.monotonic() does.
        return float(self.now - self._start) + 1_000_000.0


class TimerHandle:
    __slots__ = ("callback", "cancelled", "due")

    def __init__(self, due: int, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    """``call_later(seconds, callback)`` over a :class:`FakeClock`."""

    def __init__(self, fake_clock: FakeClock) -> None:
        self.clock = fake_clock
        self._heap: list[tuple[int, int, TimerHandle]] = []
        self._seq = 0

    def __call__(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        # Rounded up, as the event loop never fires a timer early.
        due = self.clock.now + max(0, -int(-delay * 1000 // 1))
        handle = TimerHandle(due, callback)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, handle))
        return handle

    def next_due(self) -> int | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_until(self, until: int, after_each: Callable[[], None] | None = None) -> int:
        """Fire every timer due by ``until``, in due order, each with the
        clock at its due time; the clock ends at ``until``. Returns how
        many fired."""
        fired = 0
        while True:
            due = self.next_due()
            if due is None or due > until:
                break
            _, _, handle = heapq.heappop(self._heap)
            self.clock.now = max(self.clock.now, due)
            handle.callback()
            fired += 1
            if after_each is not None:
                after_each()
        self.clock.now = max(self.clock.now, until)
        return fired


@dataclass
class Delivery:
    """A message handed to a :class:`RecordingSink` (by a consumer or a get)."""

    tag: int
    queue: Queue
    entry: QueueEntry
    consumer: Consumer | None
    no_ack: bool

    @property
    def message_id(self) -> str:
        return message_id(self.entry.message)


class RecordingSink:
    """A ``DeliverySink`` that keeps deliveries the way an AMQP channel does
    (``amqp/channel.py``): unsettled ones by tag until acked, rejected or
    requeued through the queue; ``log`` lists every delivery (no-ack ones
    too) until the test clears it."""

    def __init__(self, harness: ModelBroker, name: str = "ch") -> None:
        self.harness = harness
        self.name = name
        self.consumers: dict[str, Consumer] = {}
        self.unacked: dict[int, Delivery] = {}
        self.log: list[Delivery] = []
        self.next_tag = 1
        self.closed = False

    # -- DeliverySink -----------------------------------------------------

    def credit(self) -> int:
        return 0 if self.closed else UNLIMITED

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        for entry in entries:
            self._record(consumer.queue, entry, consumer, consumer.no_ack)

    def dispatch_soon(self, queue: Queue) -> None:
        self.harness.queued += 1
        self.harness.loop.call_soon(self._redispatch, queue)

    def cancelled_by_server(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.tag, None)

    def _redispatch(self, queue: Queue) -> None:
        self.harness.queued -= 1
        if not queue.deleted and not self.closed:
            queue.dispatch()

    def _record(
        self, queue: Queue, entry: QueueEntry, consumer: Consumer | None, no_ack: bool
    ) -> Delivery:
        d = Delivery(self.next_tag, queue, entry, consumer, no_ack)
        self.next_tag += 1
        if not no_ack:
            self.unacked[d.tag] = d
        self.log.append(d)
        return d

    # -- what a channel does with its methods ------------------------------

    def consume(
        self, queue: Queue, tag: str, *, no_ack: bool = False, prefetch: int = 0
    ) -> Consumer:
        consumer = Consumer(tag, queue, self, no_ack=no_ack, prefetch=prefetch)
        self.consumers[tag] = consumer
        queue.add_consumer(consumer)
        return consumer

    def cancel(self, tag: str) -> None:
        consumer = self.consumers.pop(tag, None)
        if consumer is not None:
            consumer.queue.vhost.consumer_removed(consumer)

    def get(self, queue: Queue, no_ack: bool = False) -> Delivery | None:
        entry = queue.get(no_ack)
        if entry is None:
            return None
        return self._record(queue, entry, None, no_ack)

    def take(self, tags: list[int]) -> list[Delivery]:
        return [self.unacked.pop(t) for t in tags]

    def settle(self, deliveries: list[Delivery], ack: bool, requeue: bool) -> None:
        """``Channel._apply_settle``: ack, reject (dead-letter) or requeue,
        per queue, then let the queues dispatch."""
        per_queue: dict[Queue, list[QueueEntry]] = {}
        for d in deliveries:
            if d.consumer is not None:
                d.consumer.unacked -= 1
            per_queue.setdefault(d.queue, []).append(d.entry)
        for q, entries in per_queue.items():
            if requeue and not ack:
                q.requeue(entries)
            elif ack:
                q.settle(entries)
            else:
                q.reject(entries)
        for q in per_queue:
            if not q.deleted:
                q.dispatch()

    def close(self) -> None:
        """``Channel.teardown``: cancel consumers, requeue what is unsettled."""
        for tag in list(self.consumers):
            self.cancel(tag)
        self.closed = True
        outstanding = sorted(self.unacked.values(), key=lambda d: d.tag)
        self.unacked.clear()
        if outstanding:
            self.settle(outstanding, False, True)


@dataclass
class Published:
    routed: bool
    refused: bool
    batch: int


@dataclass
class _Patches:
    saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self.saved:
            obj, name, value = self.saved.pop()
            setattr(obj, name, value)


def _nothing() -> None:
    pass


class ModelBroker:
    """A broker with a durable store in ``data_dir``, stepped by the test
    (see the module docstring). ``queue_memory_limit`` is the broker
    option; ``alarm_queue_memory_limit`` replaces what queues may keep in
    memory while the memory alarm is set (1 MB in the product)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        segment_size: int = 65536,
        queue_memory_limit: int = 4096,
        alarm_queue_memory_limit: int | None = None,
        fake_clock: FakeClock | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.segment_size = segment_size
        self.queue_memory_limit = queue_memory_limit
        self.clock = fake_clock or FakeClock()
        self._patches = _Patches()
        self._patches.set(clock, "wall_ms", self.clock.wall_ms)
        self._patches.set(clock, "monotonic_ms", self.clock.monotonic_ms)
        if alarm_queue_memory_limit is not None:
            self._patches.set(broker_module, "ALARM_QUEUE_MEMORY_LIMIT", alarm_queue_memory_limit)
        # Called after each timer callback (see FakeScheduler.run_until).
        self.after_timer: Callable[[], None] | None = None
        self.sinks: list[RecordingSink] = []
        self.restarts = 0
        self._open = False
        try:
            self._start()
        except BaseException:
            self._patches.undo()
            raise

    def __enter__(self) -> ModelBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.state = DurableState(self.data_dir, self.segment_size)
        self.broker = Broker(journal=self.state.store, queue_memory_limit=self.queue_memory_limit)
        try:
            self.state.recover(self.broker)
        except BaseException:
            self.state.close()
            self.loop.close()
            raise
        self.state.start(self.loop)
        # Timers of the previous incarnation belong to objects now gone.
        self.scheduler = FakeScheduler(self.clock)
        self.broker.set_scheduler(self.scheduler)
        self.sinks = []
        self.queued = 0  # dispatch_soon callbacks waiting on the loop
        self._open = True

    @property
    def store(self) -> MessageStore:
        return self.state.store

    @property
    def vhost(self) -> VirtualHost:
        return self.broker.vhosts["/"]

    def channel(self, name: str = "ch") -> RecordingSink:
        sink = RecordingSink(self, name)
        self.sinks.append(sink)
        return sink

    # -- stepping -------------------------------------------------------

    def _writer_done(self) -> None:
        """Wait for the writer thread to finish everything handed to it: the
        loop then only ever sees finished jobs, so runs are repeatable."""
        self.store.run_in_writer(_nothing).result()

    def tick(self) -> None:
        """One event-loop iteration once the writer is done (a batch cut,
        a finished batch committed and its confirms released), then the
        timers due now, as the loop would fire them."""
        self._writer_done()
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()
        self.scheduler.run_until(self.clock.now, self.after_timer)

    def flush(self, max_ticks: int = 1000) -> None:
        """Tick until the store has nothing to write and nothing is queued."""
        for _ in range(max_ticks):
            self.tick()
            # Besides the store, only a sink's dispatch_soon queues work
            # on this loop.
            if self.store.idle and not self.queued:
                return
        raise AssertionError(f"store not idle after {max_ticks} ticks")

    def advance(self, ms: int) -> None:
        """Move time forward ``ms``, firing due timers on the way."""
        self.scheduler.run_until(self.clock.now + ms, self.after_timer)

    # -- messages -------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        persistent: bool = True,
        priority: int | None = None,
        expiration: str | None = None,
        headers: dict[str, Any] | None = None,
        mandatory: bool = False,
    ) -> Published:
        props = commands.Basic.Properties(
            delivery_mode=2 if persistent else 1,
            message_id=message_id,
            priority=priority,
            expiration=expiration,
            headers=headers,
        )
        raw = properties.encode_properties(props)
        msg = Message(exchange, routing_key, raw, body, persistent, priority)
        vh = self.vhost
        routed, refused, batch = vh.publish(vh.exchange(exchange), msg, mandatory=mandatory)
        return Published(routed, refused, batch)

    def confirmed(self, batch: int) -> bool:
        return batch <= self.store.durable_batch

    def settle_barrier(self) -> int:
        """The batch that makes everything done so far durable (an ack is
        durable once this batch, taken right after it, is)."""
        return self.store.barrier()

    def contents(self, queue: str) -> list[tuple[str, bool]]:
        """(message id, redelivered) of the ready messages of ``queue``."""
        return [(message_id(m), r) for m, r in queue_contents(self.vhost.queues[queue])]

    # -- restarts -------------------------------------------------------

    def restart(self) -> None:
        """A clean shutdown and start: channels close first (their
        deliveries are requeued), then the store is flushed and closed."""
        for sink in self.sinks:
            sink.close()
        self.flush()
        self.state.close()
        self.loop.close()
        self._open = False
        self.restarts += 1
        self._start()

    def crash(self) -> int:
        """``kill -9``, then a fresh start on the same directory. The writer
        finishes the batch it was handed (data written with pwrite survives
        a process kill); nothing else on the loop runs (the finished
        batch's confirms are never sent), nothing pending is written, and
        every descriptor under the data directory is closed without a
        flush. Returns the newest batch that reached the disk."""
        self._writer_done()
        on_disk = self.store.written_batch
        self._kill()
        self.restarts += 1
        self._start()
        return on_disk

    def _kill(self) -> None:
        _close_descriptors_under(self.data_dir)
        self.loop.close()
        self._open = False

    def close(self) -> None:
        """Stop for good (cleanly) and restore the clocks."""
        try:
            if self._open:
                self._writer_done()
                self.state.close()
                self.loop.close()
                self._open = False
        finally:
            self._patches.undo()

    def abandon(self) -> None:
        """Stop for good without flushing (after a failed check, when the
        state may be inconsistent), and restore the clocks."""
        try:
            if self._open:
                self._writer_done()
                self._kill()
        finally:
            self._patches.undo()

    # -- consistency of the store's references ----------------------------

    def held_references(self) -> int:
        """References on the log the model holds: each paged entry (its own
        persistent reference or a paging record), each in-memory entry
        with a persistent reference (ready, or delivered and unsettled),
        and each message a delayed exchange holds."""
        n = 0
        for q in self.vhost.queues.values():
            n += _backing_references(q)
        for sink in self.sinks:
            n += sum(1 for d in sink.unacked.values() if d.entry.ref)
        for ex in self.vhost.exchanges.values():
            if isinstance(ex, DelayedExchange):
                n += len(ex.schedule)
        return n

    def check_references(self) -> None:
        """The store's live counts equal what the broker holds: a count too
        high never frees disk, one too low deletes a segment that still
        holds messages (issue 11, defect 1)."""
        live = sum(self.store.live.values())
        held = self.held_references()
        assert live == held, f"store counts {live} live references, the broker holds {held}"


def message_id(message: Message) -> str:
    mid = properties.message_id_of(message.properties)
    assert mid is not None, "every message in a model test carries a message id"
    return mid


def queue_contents(q: Queue) -> list[tuple[Message, bool]]:
    """The ready messages of ``q`` in delivery order, with their redelivered
    flags, paged ones read back from the log (nothing changes)."""
    journal = q.vhost.journal
    backing = q.backing
    out: list[tuple[Message, bool]] = []

    def paged(items: Iterator[tuple[int, int]]) -> None:
        for word, ref in items:
            assert journal is not None
            out.append((journal.read(ref), bool(word & REDELIVERED)))

    if isinstance(backing, FifoBackingQueue):
        out.extend((e.message, e.redelivered) for e in backing.ready)
        paged(iter(backing.paged))
    elif isinstance(backing, PriorityBackingQueue):
        for p in range(len(backing.levels.levels) - 1, -1, -1):
            out.extend((e.message, e.redelivered) for e in backing.ready.level(p))
            paged(iter(backing.levels.levels[p]))
    else:  # pragma: no cover - a new backing queue needs its reader here
        raise TypeError(f"no reader for {type(backing).__name__}")
    return out


def delayed_contents(ex: DelayedExchange) -> list[tuple[int, Message]]:
    """(due ms, message) of what a delayed exchange holds, in no order."""
    vh = ex.vhost
    assert vh is not None and vh.journal is not None
    journal = vh.journal
    return [(due, journal.read(word & REF_MASK)) for due, word in ex.schedule]


def _backing_references(q: Queue) -> int:
    backing = q.backing
    if isinstance(backing, FifoBackingQueue):
        return sum(1 for e in backing.ready if e.ref) + len(backing.paged)
    if isinstance(backing, PriorityBackingQueue):
        return sum(1 for e in backing.ready if e.ref) + len(backing.levels)
    raise TypeError(f"no reader for {type(backing).__name__}")  # pragma: no cover


def _close_descriptors_under(directory: Path) -> None:
    """What the kernel does to a killed process's files under ``directory``
    (flock released with the descriptor)."""
    root = os.path.realpath(directory)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, already gone
        if target == root or target.startswith(root + os.sep):
            os.close(fd)
