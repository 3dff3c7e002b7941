"""One node's message path in cluster mode, assembled: the group-commit
writer, the claimer, the Journal gate, the backing queues, and the two
background jobs that keep them fed:

- a LISTEN on :data:`~roost.cluster.claims.READY_CHANNEL`: another node
  committed rows (or released some) for queues whose consumers here may be
  waiting; after a lost listening connection every queue is woken (its
  notifications may be lost);
- housekeeping every ``count_interval`` seconds: the cluster-wide ready
  counts behind ``len()`` (deep queues less often, see :data:`COUNT_ROWS`);
  buffered entries no local consumer wants are given back; rows past
  their expiry that nobody claimed are claimed for their queue to
  dead-letter (up to ``expiry_batch`` per table a tick; every node
  sweeps, ``SKIP LOCKED`` keeps them apart).

This node's own commits wake its queues directly (no round trip through
NOTIFY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from roost.broker import clock
from roost.cluster.claims import READY_CHANNEL, Claimed, Claimer
from roost.cluster.lease import Lease
from roost.cluster.message_writer import MessageWriter
from roost.cluster.pg_backing import PgBackingQueue
from roost.cluster.pg_journal import PgJournal
from roost.cluster.queue_limits import Counted

log = logging.getLogger(__name__)

RECONNECT_DELAY = 1.0

# A count reads every ready row of the queue (250 ms at a million rows
# here): a queue is counted every count_interval per this many rows, so
# deep queues cost about as much as shallow ones. In between, len() moves
# with this node's publishes and claims.
COUNT_ROWS = 50_000


class NodeMessages:
    def __init__(
        self,
        conninfo: str,
        epoch: int,
        *,
        writer_connections: int = 1,
        claim_connections: int = 4,
        synchronous_claims: bool = True,
        max_buffer: int = 2000,
        claim_ahead: int = 64,
        handoff: bool = True,
        count_interval: float = 1.0,
        expiry_batch: int = 1000,
        max_pending_bytes: int = 0,
    ) -> None:
        self.conninfo = conninfo
        self.epoch = epoch
        self.max_buffer = max_buffer
        self.claim_ahead = claim_ahead
        self.handoff = handoff
        self.count_interval = count_interval
        self.expiry_batch = expiry_batch
        self.writer = MessageWriter(
            conninfo,
            connections=writer_connections,
            on_committed=self._ready,
            on_counted=self._counted,
            max_pending_bytes=max_pending_bytes,
        )
        self.claimer = Claimer(
            conninfo, max_connections=claim_connections, synchronous_commit=synchronous_claims
        )
        self.journal = PgJournal(self.writer)
        # Renewed by the registry after each heartbeat (see lease.py).
        self.lease = Lease()
        self.queues: dict[int, PgBackingQueue] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        await self.claimer.open()
        await self.writer.start()
        self._tasks = [
            asyncio.create_task(self._listen(), name="roost-ready-listener"),
            asyncio.create_task(self._housekeeping(), name="roost-message-housekeeping"),
        ]
        await self._listening.wait()

    async def close(self) -> None:
        """Shut down: buffered entries go back as they were, then every row
        still held (delivered, unacked) goes back redelivered, as a closing
        channel requeues its unacked messages. Close the AMQP connections
        first, so their acks are written before. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for q in list(self.queues.values()):
            q.close()  # gives buffered entries back through the writer
        self.queues.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.writer.close()
        try:
            await self.claimer.release_own(self.epoch)
        except Exception as exc:
            # Released when the node is declared dead instead.
            log.warning("giving back held messages at shutdown: %s", exc)
        await self.claimer.close()

    def backing_queue(self, queue_id: int, durable: bool) -> PgBackingQueue:
        """The backing queue of ``roost_queues.id = queue_id`` on this node."""
        q = PgBackingQueue(
            queue_id,
            durable,
            self.epoch,
            self.writer,
            self.claimer,
            max_buffer=self.max_buffer,
            claim_ahead=self.claim_ahead,
            lease=self.lease,
            handoff=self.handoff,
        )
        self.queues[queue_id] = q
        return q

    def set_epoch(self, epoch: int) -> None:
        """The node registered again after being fenced (``lost()``): claim,
        hand off and settle under the new incarnation."""
        self.epoch = epoch
        for q in self.queues.values():
            q.epoch = epoch
            # Closing the connections after lost() requeued their unacked
            # entries into the buffers: rows released to the cluster, which
            # the renewed lease would let this node deliver a second time.
            q.forget_buffer()

    def renew_lease(self, until: float) -> None:
        """The registry's heartbeat committed: deliver until ``until``. A
        lease that had lapsed (PostgreSQL out of reach for a while) held
        back what the buffers hold, and no claim started meanwhile: nothing
        else would wake those queues, so they are woken here."""
        lapsed = not self.lease.valid()
        self.lease.renew(until)
        if not lapsed:
            return
        for q in list(self.queues.values()):
            if q.in_memory() and q.ready_changed is not None:
                q.ready_changed()
            q.wake()

    def forget(self, queue_id: int) -> None:
        """The queue was deleted here (call after ``close()`` on it)."""
        self.queues.pop(queue_id, None)

    def lost(self) -> None:
        """This node's own epoch was declared dead (the registry found out):
        everything it held was released to the cluster. Stop delivering
        and drop the buffers; the broker should close its AMQP connections
        (their unacked messages are redelivered elsewhere) and register
        again under a new epoch, with a new NodeMessages."""
        self.lease.revoke()
        for q in self.queues.values():
            q.forget_buffer()

    async def on_node_dead(self, epoch: int) -> int:
        """The registry declared ``epoch`` dead: its rows are ready again."""
        return await self.claimer.release_dead(epoch)

    # -- wake-ups ---------------------------------------------------------

    async def _sweep_expired(self, queues: dict[int, PgBackingQueue]) -> None:
        try:
            await _sweep_expired_rows(self.claimer, queues, self.expiry_batch, self.epoch)
        except Exception as exc:
            log.warning("sweeping expired messages: %s", exc)

    def _counted(self, counted: list[Counted]) -> None:
        queues = self.queues
        for c in counted:
            q = queues.get(c.queue_id)
            if q is not None:
                q.counted(c)

    def _ready(self, queue_ids: set[int] | None) -> None:
        queues = self.queues
        if queue_ids is None:
            targets = list(queues.values())
        else:
            targets = [q for i in queue_ids if (q := queues.get(i)) is not None]
        for q in targets:
            q.wake()

    async def _listen(self) -> None:
        while True:
            try:
                conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, application_name="roost-listener"
                )
                async with conn:
                    await conn.execute(f"LISTEN {READY_CHANNEL}")
                    if self._listening.is_set():
                        self._ready(None)  # notifications may have been lost
                    self._listening.set()
                    async for note in conn.notifies():
                        self._ready(_parse(note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s: %s; reconnecting", READY_CHANNEL, exc)
                self._listening.set()  # start() must not hang on an outage
                await asyncio.sleep(RECONNECT_DELAY)

    async def _housekeeping(self) -> None:
        idle: set[int] = set()
        taken: dict[int, int] = {}
        next_count: dict[int, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.count_interval)
            queues = dict(self.queues)
            if not queues:
                continue
            now = loop.time()
            due = [qid for qid in queues if next_count.get(qid, 0.0) <= now]
            if due:
                generations = {qid: queues[qid].generation for qid in due}
                try:
                    counts = await self.claimer.count_ready(due)
                except Exception as exc:
                    log.warning("counting ready messages: %s", exc)
                    counts = {}
                for qid, n in counts.items():
                    q = queues[qid]
                    q.set_remote_count(n, generations[qid])
                    next_count[qid] = now + self.count_interval * max(1.0, n / COUNT_ROWS)
                    if n:
                        q.wake()
            await self._sweep_expired(queues)
            for qid, q in queues.items():
                # Given back on the second tick without demand: a consumer
                # between two deliveries is not "gone", nor one that took
                # entries since the last tick (its credit may be used up
                # at this moment; the buffer is its read-ahead).
                n, taken[qid] = taken.get(qid, -1), q.taken_total()
                if q.in_memory() and (q.demand is None or q.demand() <= 0) and n == taken[qid]:
                    if qid in idle:
                        q.give_back()
                        idle.discard(qid)
                    else:
                        idle.add(qid)
                else:
                    idle.discard(qid)
            for qid in list(next_count):
                if qid not in queues:
                    del next_count[qid]
            for qid in list(taken):
                if qid not in queues:
                    del taken[qid]


async def _sweep_expired_rows(
    claimer: Claimer, queues: dict[int, PgBackingQueue], n: int, epoch: int
) -> int:
    rows = await claimer.claim_expired(queues, n, epoch, clock.wall_ms())
    by_queue: dict[int, list[Claimed]] = {}
    for row in rows:
        by_queue.setdefault(row.queue_id, []).append(row)
    for qid, mine in by_queue.items():
        queues[qid].take_expired(mine, epoch)
    return len(rows)


def _parse(payload: str) -> set[int] | None:
    if not payload:
        return None
    try:
        return {int(s) for s in payload.split(",")}
    except ValueError:
        return None
