"""A queue's storage in cluster mode: the rows in PostgreSQL, and a local
buffer of the rows this node claimed.

How the synchronous backing-queue protocol meets the asynchronous database:

- **Writes never wait.** ``publish``, ``settle`` and ``requeue`` (when it
  gives rows back) only *enqueue* work on the node's
  :class:`~roost.cluster.message_writer.MessageWriter` and return. Whoever
  needs to know the outcome waits on the writer's batch: a publisher's
  confirm goes through the Journal-shaped gate
  (:class:`~roost.cluster.pg_journal.PgJournal`: ``barrier()`` before the
  queues enqueue, ``wait_durable`` for the confirm), exactly as with the
  local log. A published message becomes visible to every node's
  consumers when it commits; only a *hand-off* (a local consumer has
  room, see :meth:`publish`) is inserted claimed by this node and joins
  its buffer at the COMMIT.
- **Reads come from the buffer.** ``fetch``/``fetch_many``/``peek`` only
  look at entries this node already claimed (held in PostgreSQL by its
  epoch), ordered by priority, then arrival here. When a fetch comes up
  short, the shortfall is recorded and a claim is started in the
  background; when it returns, the entries join the buffer and
  ``ready_changed()`` tells the queue to dispatch again.
- **Wake-ups.** New ready rows (a commit on this node, a NOTIFY from
  another) call :meth:`wake`: if local consumers have credit (``demand()``)
  beyond what the buffer holds, a claim starts.
- **The buffer stays small.** While local consumers want anything, a
  claim asks for what they can take now (``demand()``) but at least
  ``claim_ahead`` (capped by ``max_buffer``), and the next claim starts
  when the buffer is half drained: a consumer with a small prefetch
  would otherwise wait a claim round trip per few messages. That
  ``claim_ahead`` is all a node holds back from other nodes' consumers;
  what sits without local demand for a while is given back
  (:meth:`give_back`).
- **Expiry.** Only claimed entries reach the queue's TTL logic, so the
  node sweeps rows past their expiry that nobody claims (a TTL queue
  without consumers) into the buffer (:meth:`take_expired`), and the
  queue dead-letters them as usual.
- **The lease.** Fetches serve the buffer, and claims start, only while
  the node's :class:`~roost.cluster.lease.Lease` is valid: a node whose
  heartbeats stopped (paused, cut off) may already be declared dead and
  its rows delivered elsewhere.
- **len()** is the buffer, this node's publishes in flight, and an
  estimate of the ready rows elsewhere: counted cluster-wide every so
  often (:meth:`set_remote_count`), raised by local commits and lowered by
  claims in between. Dispatch tolerates an
  estimate: a fetch may return fewer entries than ``len()`` suggested.

Two small additions to the backing-queue protocol, both optional callbacks
the queue sets (a local backing queue never calls them):

- ``ready_changed: Callable[[], None]``: entries arrived asynchronously;
  the queue should dispatch (``Queue.dispatch`` when it has consumers).
- ``demand: Callable[[], int]``: how many more messages the queue's
  consumers can take right now (the sum over consumers of their credit,
  within prefetch). Without it, only a fetch that came up short causes a
  claim.

``ref`` of an entry is the row id (negative for the transient table).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from roost import properties
from roost.broker.log_backed import ENTRY_OVERHEAD
from roost.broker.message import Message, QueueEntry
from roost.cluster.claims import ClaimInDoubt
from roost.cluster.lease import Lease
from roost.cluster.message_writer import CommitOutcomeUnknown, MessageRow

if TYPE_CHECKING:
    from roost.broker.queue import Queue
    from roost.cluster.claims import Claimed, Claimer
    from roost.cluster.message_writer import MessageWriter

log = logging.getLogger(__name__)

# Pause after a failed claim before the next attempt.
CLAIM_RETRY_DELAY = 0.5


class PgBackingQueue:
    """A :class:`~roost.broker.backing_queue.BackingQueue` over PostgreSQL
    (see the module docstring)."""

    def __init__(
        self,
        queue_id: int,
        durable: bool,
        epoch: int,
        writer: MessageWriter,
        claimer: Claimer,
        *,
        max_buffer: int = 1000,
        claim_ahead: int = 64,
        lease: Lease | None = None,
        handoff: bool = True,
    ) -> None:
        self.store_id = queue_id
        self.durable = durable
        self.epoch = epoch
        self.writer = writer
        self.claimer = claimer
        self.max_buffer = max_buffer
        self.claim_ahead = min(claim_ahead, max_buffer)
        # Nothing leaves the buffer, and nothing is claimed, without it.
        self.lease = lease or Lease()
        self.bytes = 0  # body bytes of the buffered entries
        self.ready_limit = 1 << 62
        self.expiry_seen: Callable[[int], None] | None = None
        self.ready_changed: Callable[[], None] | None = None
        self.demand: Callable[[], int] | None = None
        # (-priority, id, entry): the head is the next to deliver.
        self._heap: list[tuple[int, int, QueueEntry]] = []
        self._remote = 0  # committed ready rows not claimed by us (estimate)
        # This node's publishes that were not handed off and are not yet
        # committed, in all and by batch.
        self._unowned = 0
        self._unowned_by_batch: dict[int, int] = {}
        # Moves on when such rows commit: a claim or count that began before
        # cannot have seen them, so it may not say "nothing ready".
        self.generation = 0
        self._shortfall = 0  # asked of fetch and not there (without demand())
        self._claiming: asyncio.Task[None] | None = None
        self._again = False  # woken while a claim was in flight
        self._closed = False
        self.claims = 0  # claim statements run (stats, tests)
        self.handoff = handoff
        # Hand-off entries waiting for their batch's COMMIT, by batch.
        self._pending: dict[int, list[QueueEntry]] = {}
        self._pending_n = 0
        # Batches whose hand-offs belong to an incarnation declared dead.
        self._void: set[int] = set()
        # Buffer order: priority, then arrival here (claims in id order,
        # hand-offs in publish order); a requeued entry keeps its place.
        self._seq = 0

    # -- counts -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._heap) + self._remote + self._pending_n + self._unowned

    def in_memory(self) -> int:
        return len(self._heap)

    def memory(self) -> int:
        return self.bytes + len(self._heap) * ENTRY_OVERHEAD

    def set_remote_count(self, ready: int, generation: int) -> None:
        """The cluster-wide count of unclaimed rows, measured by a query
        that began at ``generation`` (see :attr:`generation`)."""
        if generation == self.generation:
            self._remote = ready
        else:
            self._remote = max(self._remote, ready)

    # -- messages in ------------------------------------------------------

    def publish(self, entry: QueueEntry) -> bool:
        message = entry.message
        transient = not (self.durable and message.persistent)
        writer = self.writer
        row_id = self._handoff_id()
        batch = writer.enqueue(
            MessageRow(
                self.store_id,
                message.exchange,
                message.routing_key,
                message.properties,
                message.body,
                entry.priority,
                entry.expires or None,
                transient,
                row_id,
                None if row_id is None else self.epoch,
            )
        )
        if row_id is None:
            # Claimed, here or elsewhere, once committed.
            self._unowned += 1
            by_batch = self._unowned_by_batch
            n = by_batch.get(batch)
            if n is None:
                by_batch[batch] = 1
                writer.wait_durable(batch, functools.partial(self._unowned_resolved, batch))
            else:
                by_batch[batch] = n + 1
            return False
        # Hand-off: a local consumer has room, so the row is inserted
        # already claimed by this node and the entry joins the buffer once
        # it commits: no claim round trip, no UPDATE of the row.
        entry.ref = -row_id if transient else row_id
        self._seq += 1
        entry.seq = self._seq
        pending = self._pending.get(batch)
        if pending is None:
            pending = self._pending[batch] = []
            writer.wait_durable(batch, functools.partial(self._committed, batch))
        pending.append(entry)
        self._pending_n += 1
        return False

    def _handoff_id(self) -> int | None:
        """A reserved row id when this publish may be handed to a local
        consumer: one has room beyond what the buffer and the hand-offs in
        flight hold, and no ready row of the queue is known (our own
        publishes that were not handed off, or others'), so a hand-off
        never overtakes an earlier message (per-publisher order)."""
        demand = self.demand
        if (
            not self.handoff
            or demand is None
            or self._remote
            or self._unowned
            or self._closed
            or demand() <= len(self._heap) + self._pending_n
            or not self.lease.valid()
        ):
            return None
        return self.writer.reserve_id()

    def _unowned_resolved(self, batch: int) -> None:
        n = self._unowned_by_batch.pop(batch, 0)
        self._unowned -= n
        if self.writer.failure(batch) is None:
            self._remote += n
            self.generation += 1

    def _committed(self, batch: int) -> None:
        """The batch holding hand-off entries resolved."""
        entries = self._pending.pop(batch, [])
        self._pending_n -= len(entries)
        if batch in self._void:
            self._void.discard(batch)
            return
        writer = self.writer
        error = writer.failure(batch)
        if error is None and writer.handed(batch) and not self._closed:
            for e in entries:
                self._push(e)
            if self.ready_changed is not None:
                self.ready_changed()
            return
        if error is None:
            # Committed as ready rows (the epoch was dead), or the queue
            # was closed meanwhile: give back what may be ours.
            self._remote += len(entries)
            self.generation += 1
        if error is None or isinstance(error, CommitOutcomeUnknown):
            # (Unknown: they may exist, owned by this epoch.)
            for transient in (False, True):
                ids = [abs(e.ref) for e in entries if (e.ref < 0) is transient]
                if ids:
                    writer.unclaim_nowait(ids, self.epoch, transient)

    # -- messages out -----------------------------------------------------

    def fetch(self) -> QueueEntry | None:
        heap = self._heap
        if not heap or not self.lease.valid():
            self._short(1)
            return None
        entry = heapq.heappop(heap)[2]
        self.bytes -= len(entry.message.body)
        if len(heap) < self._low_water and self._claiming is None:
            self._top_up()
        return entry

    def fetch_many(self, k: int) -> list[QueueEntry]:
        heap = self._heap
        n = min(k, len(heap)) if self.lease.valid() else 0
        pop = heapq.heappop
        entries = [pop(heap)[2] for _ in range(n)]
        size = 0
        for e in entries:
            size += len(e.message.body)
        self.bytes -= size
        if n < k:
            self._short(k - n)
        elif len(heap) < self._low_water and self._claiming is None:
            self._top_up()
        return entries

    def peek(self) -> QueueEntry | None:
        return self._heap[0][2] if self._heap and self.lease.valid() else None

    def requeue(self, entry: QueueEntry) -> None:
        # Back into the buffer at its place: still claimed by this node, so
        # the next local consumer gets it first (RabbitMQ's requeue
        # position); give_back() hands it to the cluster if none comes.
        self._push(entry)

    def settle(self, entries: Iterable[QueueEntry]) -> None:
        durable: list[int] = []
        transient: list[int] = []
        for e in entries:
            ref = e.ref
            if ref > 0:
                durable.append(ref)
            elif ref < 0:
                transient.append(-ref)
        if durable:
            self.writer.settle_nowait(durable, self.epoch)
        if transient:
            self.writer.settle_nowait(transient, self.epoch, transient=True)

    def delivered(self, entries: Iterable[QueueEntry], every: bool) -> None:
        # The claim already recorded it: the row is owned by this epoch,
        # and if the node dies it comes back redelivered.
        pass

    def purge(self) -> int:
        n = len(self)
        entries = [item[2] for item in self._heap]
        self._heap.clear()
        self.bytes = 0
        self.settle(entries)
        self._remote = 0
        fut = self.writer.purge(self.store_id)
        fut.add_done_callback(_log_failure)
        return n

    def page_out(self, budget: int) -> int:
        return 0  # the buffer is bounded by max_buffer; the rest is in PostgreSQL

    def restore(
        self,
        refs: Iterable[int],
        delivered: Mapping[int, int],
        seq: int,
        keep_counts: bool,
        sized: bool = False,
    ) -> int:
        return seq  # nothing to restore: the rows are in PostgreSQL

    def read_restored(self, ref: int) -> QueueEntry:
        raise NotImplementedError("cluster queues restore nothing locally")

    def close(self) -> None:
        self._closed = True
        self.give_back()
        self.ready_changed = self.demand = self.expiry_seen = None
        if self._claiming is not None:
            self._claiming.cancel()

    # -- the buffer and claims ---------------------------------------------

    def give_back(self) -> int:
        """Hand every buffered entry back to the cluster (no local consumer
        wants it): never-delivered ones as they were, requeued ones
        redelivered. Returns how many."""
        heap = self._heap
        if not heap:
            return 0
        fresh: dict[bool, list[int]] = {False: [], True: []}
        seen: dict[bool, list[int]] = {False: [], True: []}
        for _, _, e in heap:
            ids = seen if e.redelivered else fresh
            ids[e.ref < 0].append(abs(e.ref))
        n = len(heap)
        heap.clear()
        self.bytes = 0
        self._remote += n
        for transient in (False, True):
            if fresh[transient]:
                self.writer.unclaim_nowait(fresh[transient], self.epoch, transient)
            if seen[transient]:
                self.writer.release_nowait(seen[transient], self.epoch, transient)
        return n

    def take_expired(self, rows: Iterable[Claimed], epoch: int | None = None) -> None:
        """Rows past their expiry, claimed by the node's sweep for ``epoch``
        (None: the current one): into the buffer, and the queue's TTL timer
        (``expiry_seen``) dead-letters them from the head as it does
        locally."""
        if epoch is not None and epoch != self.epoch:
            return  # claimed for a dead incarnation (see _take)
        for row in rows:
            self._push(self._entry(row))
        if self._closed:
            self.give_back()

    def wake(self) -> None:
        """New ready rows may be there (a commit here, a NOTIFY from elsewhere)."""
        if self._closed:
            return
        if self._claiming is not None:
            self._again = True
        elif self._wanted() > 0:
            self._start_claim()

    def _short(self, n: int) -> None:
        if self._closed:
            return
        self._shortfall = min(self.max_buffer, self._shortfall + n)
        if self._claiming is None:
            self._start_claim()
        else:
            self._again = True

    @property
    def _low_water(self) -> int:
        return self.claim_ahead // 2

    def _top_up(self) -> None:
        if not self._closed and self._wanted() > 0:
            self._start_claim()

    def _wanted(self) -> int:
        # What a fetch missed (basic.get, or dispatch beyond the buffer),
        # and while consumers have credit, that credit but at least
        # claim_ahead.
        want = self._shortfall
        demand = self.demand
        if demand is not None:
            credit = demand()
            if credit > 0:
                want = max(want, credit, self.claim_ahead)
        return min(want, self.max_buffer) - len(self._heap)

    async def fill(self, n: int = 1) -> int:
        """Claim now until the buffer holds ``n`` entries or the queue is
        empty; returns how many it holds. For ``basic.get``: the channel
        awaits it before ``Queue.get()`` when ``in_memory()`` is 0, since a
        synchronous fetch can only start a claim and miss."""
        want = n - len(self._heap)
        if want > 0 and not self._closed and self.lease.valid():
            generation, epoch = self.generation, self.epoch
            try:
                rows = await self.claimer.claim(self.store_id, want, epoch)
            except ClaimInDoubt as exc:
                await self._give_back_doubtful(exc.rows, epoch)
                raise
            self.claims += 1
            self._take(rows, want, generation, epoch)
        return len(self._heap)

    async def _give_back_doubtful(self, rows: list[Claimed], epoch: int) -> None:
        """Rows of a claim whose COMMIT may or may not have happened: given
        back before the next claim from this queue (which could otherwise
        get them legitimately, and then see them given back under it),
        retrying until PostgreSQL answers, or the epoch is over (a dead
        epoch's rows are released by the cluster)."""
        while not self._closed and epoch == self.epoch:
            try:
                await self.claimer.unclaim(rows, epoch)
                return
            except Exception as exc:
                log.warning("giving back the rows of a claim in doubt: %s", exc)
                await asyncio.sleep(CLAIM_RETRY_DELAY)

    def forget_buffer(self) -> None:
        """This node was declared dead: the buffered rows were released to
        the cluster and are not ours; drop them without a word to it. So
        are the hand-offs waiting for their batch: inserted for the dead
        epoch, they are released with its other rows (or were inserted
        ready, the epoch being dead by their COMMIT)."""
        self._heap.clear()
        self.bytes = 0
        self._void.update(self._pending)

    def _start_claim(self) -> None:
        if not self.lease.valid():
            return  # claimed rows could not be delivered anyway
        self._claiming = asyncio.get_running_loop().create_task(self._claim_loop())

    async def _claim_loop(self) -> None:
        try:
            while not self._closed:
                self._again = False
                want = self._wanted()
                if want <= 0:
                    break
                generation, epoch = self.generation, self.epoch
                try:
                    rows = await self.claimer.claim(self.store_id, want, epoch)
                except ClaimInDoubt as exc:
                    log.warning("claim from queue %d: %s", self.store_id, exc)
                    await self._give_back_doubtful(exc.rows, epoch)
                    continue
                except Exception as exc:
                    # (A warning, not a traceback: during an outage every
                    # queue with consumers says this twice a second.)
                    log.warning("claim from queue %d: %s", self.store_id, exc)
                    await asyncio.sleep(CLAIM_RETRY_DELAY)
                    continue
                self.claims += 1
                self._take(rows, want, generation, epoch)
                if self._closed:
                    break
                if rows and self.ready_changed is not None:
                    self.ready_changed()
                if len(rows) < want and not self._again:
                    break
        finally:
            self._claiming = None

    def _take(self, rows: list[Claimed], wanted: int, generation: int, epoch: int) -> None:
        """Claimed rows join the buffer (or go back, the queue being closed)."""
        if epoch != self.epoch:
            # Claimed for an incarnation that has since been declared dead:
            # the cluster releases its rows to others (release_dead), so
            # they must not be delivered from here as well.
            return
        self._shortfall = max(0, self._shortfall - len(rows))
        for row in rows:
            self._push(self._entry(row))
        if len(rows) < wanted:
            # The queue's head was empty, cluster-wide, when the claim ran;
            # unless rows of ours committed since.
            self._shortfall = 0
            if generation == self.generation:
                self._remote = 0
        else:
            self._remote = max(0, self._remote - len(rows))
        if self._closed:
            self.give_back()

    def _push(self, entry: QueueEntry) -> None:
        heapq.heappush(self._heap, (-entry.priority, entry.seq, entry))
        self.bytes += len(entry.message.body)

    def _entry(self, row: Claimed) -> QueueEntry:
        props = row.properties
        # A row in the transient table may still be a persistent message
        # (routed to a non-durable queue): dead-lettering needs to know.
        persistent = not row.transient or (
            bool(props) and properties.scan(props).delivery_mode == 2
        )
        message = Message(
            row.exchange,
            row.routing_key,
            props,
            row.body,
            persistent,
            row.priority or None,
            written_ms=row.published_ms,
        )
        self._seq += 1
        entry = QueueEntry(
            self._seq,
            message,
            row.redelivered,
            row.expires_ms or 0,
            row.priority,
            -row.id if row.transient else row.id,
        )
        entry.deliveries = row.delivery_count - 1  # the queue counts this one
        if entry.expires and self.expiry_seen is not None:
            self.expiry_seen(entry.expires)
        return entry


def attach(queue: Queue, backing: PgBackingQueue) -> None:
    """Put ``backing`` under ``queue``, which must not hold anything yet,
    and connect the two callbacks (see the module docstring)."""
    backing.expiry_seen = queue.backing.expiry_seen  # the queue's TTL timer
    queue.backing = backing

    def ready_changed() -> None:
        if queue.consumer_count and not queue.deleted:
            queue.dispatch()

    backing.ready_changed = ready_changed
    backing.demand = lambda: queue_demand(queue)


def queue_demand(queue: Queue) -> int:
    """How many more messages ``queue``'s consumers can take now: each
    one's credit, within its prefetch. (A channel's credit is shared by its
    consumers, so this may count it more than once: an upper bound, and
    claims are capped by the buffer size anyway.)"""
    if queue.options.single_active_consumer:
        active = queue.active_consumer
        consumers = [active] if active is not None else []
    else:
        consumers = queue.consumers()
    total = 0
    for c in consumers:
        credit = c.sink.credit()
        if not c.no_ack and c.prefetch:
            credit = min(credit, c.prefetch - c.unacked)
        if credit > 0:
            total += credit
    return total


def _log_failure(fut: asyncio.Future[int]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = fut.exception()
        if exc is not None:
            log.warning("purge failed: %s", exc)
