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
  would otherwise wait a claim round trip per few messages. On top of
  that, while consumers take entries, a *read-ahead*: what they take in
  two claim round trips (:meth:`_update_reserve`), so a consumer that
  acks finds its next messages here, not a claim away. These are all a
  node holds back from other nodes' consumers; what no local consumer
  takes for a while is given back (:meth:`give_back`).
- **No claim for nothing.** A consumer's credit starts a claim only while
  ready rows may be there (a wake-up, a count, a commit of this node's
  ready rows, a give-back); a claim that comes back short ends that.
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
from roost.broker.dedup import Deduplicator, SharedKey
from roost.broker.log_backed import ENTRY_OVERHEAD
from roost.broker.message import Message, QueueEntry
from roost.cluster.claims import ClaimInDoubt
from roost.cluster.lease import Lease
from roost.cluster.message_writer import CommitOutcomeUnknown, MessageRow
from roost.cluster.queue_limits import Counted, HeadRow, Limit

if TYPE_CHECKING:
    from roost.broker.queue import Queue
    from roost.cluster.claims import Claimed, Claimer
    from roost.cluster.message_writer import MessageWriter

log = logging.getLogger(__name__)

# Pause after a failed claim before the next attempt.
CLAIM_RETRY_DELAY = 0.5

# The read-ahead (see PgBackingQueue._reserve): enough entries for this many
# claim round trips at the rate local consumers take them, and only while
# they took some within RESERVE_IDLE seconds.
RESERVE_TRIPS = 2.0
RESERVE_IDLE = 0.5
# Weight of the newest sample in the moving averages of rate and claim time.
EWMA_WEIGHT = 0.2


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
        max_buffer: int = 2000,
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
        # The queue's shared deduplication cache (x-message-deduplication).
        self.deduper: Deduplicator | None = None
        self.requeue_later: Callable[[QueueEntry, int], bool] | None = self._wait_retry
        # x-max-length(-bytes): each publish is decided by its batch against
        # the exact count of ready rows (queue_limits); what was refused
        # or dropped goes to overflowed().
        self.limit: Limit | None = None
        self.overflowed: Callable[[Counted], None] | None = None
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
        # Ready rows may be there (a wake-up, a count, a commit of ours, a
        # give-back) since the last claim came back short. Without that a
        # consumer's credit starts no claim: in a steady stream of
        # hand-offs every dispatch would claim, and find nothing.
        self._maybe_ready = True
        self._hints = 0
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
        # Read-ahead: how fast local consumers take entries, how long a
        # claim takes (moving averages), and the reserve they call for.
        self._taken = 0  # entries fetched since _rate_at
        self._rate_at = 0.0
        self._last_taken_at = 0.0
        self._rate = 0.0  # entries/s
        self._claim_time = 0.0  # s
        self._reserve = 0
        self._taken_total = 0  # ever fetched (housekeeping's idle check)

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
        if ready:
            self._hint()

    def _hint(self) -> None:
        """Ready rows may be there: the next fetch that comes up short, or
        the next top-up, claims."""
        self._maybe_ready = True
        self._hints += 1

    # -- messages in ------------------------------------------------------

    def publish(self, entry: QueueEntry) -> bool:
        message = entry.message
        transient = not (self.durable and message.persistent)
        writer = self.writer
        dedup, held = self._requires(message)
        if self.limit is not None:
            # Never handed off: the batch decides whether it gets in.
            writer.enqueue(
                MessageRow(
                    self.store_id,
                    message.exchange,
                    message.routing_key,
                    message.properties,
                    message.body,
                    entry.priority,
                    entry.expires or None,
                    transient,
                    dedup=dedup,
                    held=held,
                    limit=self.limit,
                    message=message,
                ),
                message,
            )
            return False
        # A row that may not be written (a duplicate, a release that lost
        # its fence) must not be in the buffer already: no hand-off.
        row_id = None if dedup or held is not None else self._handoff_id()
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
                dedup,
                held,
            ),
            message,
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

    def _requires(self, message: Message) -> tuple[tuple[SharedKey, ...], int | None]:
        """The dedup keys (the exchange's, this queue's) the row needs new,
        and the held row whose release it is."""
        dedup: list[SharedKey] = []
        held = None
        for r in message.requires:
            if isinstance(r, SharedKey):
                dedup.append(r)
            elif isinstance(r, int):
                held = r
        if self.deduper is not None:
            key = self.deduper.shared_key(message)
            if key is not None:
                dedup.append(key)
        return tuple(dedup), held

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

    def counted(self, counted: Counted) -> None:
        """A committed batch decided this (limited) queue's publishes;
        ``counted.ready`` is the exact count of its ready rows then."""
        self._remote = counted.ready
        self.generation += 1
        limit = self.limit
        if self.overflowed is not None and (
            counted.dropped
            or counted.dropped_rows
            or (counted.refused and limit is not None and limit.overflow == "reject-publish-dlx")
        ):
            self.overflowed(counted)

    def _unowned_resolved(self, batch: int) -> None:
        n = self._unowned_by_batch.pop(batch, 0)
        self._unowned -= n
        if self.writer.failure(batch) is None:
            self._remote += n
            self.generation += 1
            self._hint()

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
            self._hint()
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
        self._taken += 1
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
        self._taken += n
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

    def _wait_retry(self, entry: QueueEntry, delay_ms: int) -> bool:
        """The entry waits out a retry delay as a held row in PostgreSQL
        (see roost.cluster.delay_store), not in this node's memory."""
        ref = entry.ref
        if not ref:
            return False  # (published before the queue was attached: not a row yet)
        self.writer.retry_nowait(abs(ref), self.epoch, ref < 0, delay_ms)
        return True

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
        self._hint()
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
        self._hint()
        if self._claiming is not None:
            self._again = True
        elif self._wanted() > 0:
            self._start_claim()

    def _short(self, n: int) -> None:
        if self._closed:
            return
        if self.limit is not None and (self.demand is None or self.demand() <= 0):
            # A basic.get miss: the get claims for itself (fill). A claim
            # kept for later would take a row out of a length-limited
            # queue's ready count with no one to deliver it to.
            return
        # The latest miss is the need (a dispatch retried for the same
        # credit must not add up to a claim of max_buffer rows).
        self._shortfall = min(self.max_buffer, max(self._shortfall, n))
        if self._claiming is None:
            if self._maybe_ready:
                self._start_claim()
        else:
            self._again = True

    @property
    def _low_water(self) -> int:
        return self.claim_ahead // 2 + self._reserve

    def _top_up(self) -> None:
        # Not for a handful of entries: while a claim is out the next one
        # waits, so each should bring at least half the reserve.
        if not self._closed and self._maybe_ready and self._wanted() > self._reserve // 2:
            self._start_claim()

    def _wanted(self) -> int:
        # What a fetch missed (basic.get, or dispatch beyond the buffer),
        # and while consumers have credit, that credit but at least
        # claim_ahead; plus the reserve while they are taking entries.
        want = self._shortfall
        demand = self.demand
        if demand is not None:
            credit = demand()
            if credit > 0:
                want = max(want, credit + self._reserve, self.claim_ahead)
            elif self._reserve:
                want = max(want, self._reserve)
        return min(want, self.max_buffer) - len(self._heap)

    def _update_reserve(self, now: float) -> None:
        """Before a claim: the read-ahead that keeps local consumers busy
        while the next claim is out, the rate they take entries at times
        the claim round trip (RESERVE_TRIPS of them), up to half the
        buffer. A slow consumer (a few entries per round trip) gets next to
        nothing, one that took nothing for RESERVE_IDLE nothing at all; a
        fast one is not left waiting a round trip each time it acks. What
        the node holds back from other nodes' consumers beyond their
        credit and claim_ahead is this reserve, no more."""
        taken, self._taken = self._taken, 0
        self._taken_total += taken
        elapsed = now - self._rate_at
        self._rate_at = now
        if taken:
            self._last_taken_at = now
        if now - self._last_taken_at > RESERVE_IDLE:
            self._rate = 0.0
        elif elapsed > 0:
            sample = taken / elapsed
            self._rate += EWMA_WEIGHT * (sample - self._rate)
        self._reserve = min(
            self.max_buffer // 2, int(self._rate * self._claim_time * RESERVE_TRIPS)
        )
        if self.limit is not None:
            # A length-limited queue claims only what its consumers take
            # (claim_ahead 0): a claimed row no longer counts as ready.
            self._reserve = 0

    def taken_total(self) -> int:
        """Entries ever fetched from the buffer (a consumer at work takes
        some between two housekeeping ticks, whatever its credit then)."""
        return self._taken_total + self._taken

    async def fill(self, n: int = 1) -> int:
        """Claim now until the buffer holds ``n`` entries or the queue is
        empty; returns how many it holds. For ``basic.get``: the channel
        awaits it before ``Queue.get()`` when ``in_memory()`` is 0, since a
        synchronous fetch can only start a claim and miss."""
        want = n - len(self._heap)
        if want > 0 and not self._closed and self.lease.valid():
            generation, hints, epoch = self.generation, self._hints, self.epoch
            try:
                rows = await self.claimer.claim(self.store_id, want, epoch)
            except ClaimInDoubt as exc:
                await self._give_back_doubtful(exc.rows, epoch)
                raise
            self.claims += 1
            self._take(rows, want, generation, hints, epoch)
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
        self._hint()  # released: claimable again, under the next epoch

    def _start_claim(self) -> None:
        if not self.lease.valid():
            return  # claimed rows could not be delivered anyway
        self._claiming = asyncio.get_running_loop().create_task(self._claim_loop())

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                self._again = False
                started = loop.time()
                self._update_reserve(started)
                want = self._wanted()
                if want <= 0:
                    break
                generation, hints, epoch = self.generation, self._hints, self.epoch
                try:
                    rows = await self.claimer.claim(self.store_id, want, epoch)
                    took = loop.time() - started
                    self._claim_time += EWMA_WEIGHT * (took - self._claim_time)
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
                self._take(rows, want, generation, hints, epoch)
                if self._closed:
                    break
                if rows and self.ready_changed is not None:
                    self.ready_changed()
                if len(rows) < want and not self._again:
                    break
        finally:
            self._claiming = None

    def _take(
        self, rows: list[Claimed], wanted: int, generation: int, hints: int, epoch: int
    ) -> None:
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
            # unless rows of ours committed since, or a wake-up came.
            self._shortfall = 0
            if generation == self.generation:
                self._remote = 0
            if hints == self._hints:
                self._maybe_ready = False
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
    if queue.deduper is not None:
        # The cache is PostgreSQL's from now on, named by the queue's row.
        queue.deduper.share(f"q{backing.store_id}", backing.store_id)
        backing.deduper = queue.deduper
    opts = queue.options
    if opts.max_length is not None or opts.max_length_bytes is not None:
        limit = Limit(
            opts.max_length,
            opts.max_length_bytes,
            opts.overflow,
            opts.overflow == "drop-head" and opts.dead_letter_exchange is not None,
        )
        backing.limit = limit
        # A claimed row counts as delivered, not ready: claim no more than
        # the consumers take, or the ready rows would be fewer than the
        # messages waiting for a consumer.
        backing.claim_ahead = 0
        queue.delegate_limits()
        backing.overflowed = functools.partial(_overflowed, queue, limit)

    def ready_changed() -> None:
        if queue.consumer_count and not queue.deleted:
            queue.dispatch()

    backing.ready_changed = ready_changed
    backing.demand = lambda: queue_demand(queue)


def _overflowed(queue: Queue, limit: Limit, counted: Counted) -> None:
    """Dead-letter what a batch refused (reject-publish-dlx) or dropped
    (drop-head) from ``queue``."""
    messages: list[Message] = []
    if limit.overflow == "reject-publish-dlx":
        messages += counted.refused
    messages += counted.dropped
    uncounted = 0
    for row in counted.dropped_rows:
        if limit.dead_letter:
            messages.append(_dropped_message(row))
        else:
            uncounted += 1
    queue.overflowed(messages, uncounted)


def _dropped_message(row: HeadRow) -> Message:
    props = row.properties
    persistent = not row.transient or (bool(props) and properties.scan(props).delivery_mode == 2)
    return Message(row.exchange, row.routing_key, props, row.body, persistent, row.priority or None)


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
        # Nothing is claimed for consumers a higher-priority one elsewhere
        # comes before (roost.cluster.consumers).
        floor = queue.priority_floor()
        if floor is not None:
            consumers = [c for c in consumers if c.priority >= floor]
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
