"""Group commit of one node's message writes to PostgreSQL.

Every connection of a node feeds one :class:`MessageWriter`: new rows
(publishes), settles (acks), releases (requeues) and purges go into the
*open batch*; a worker takes the open batch as a whole, writes it in one
transaction (one statement per kind and table, sent in one pipeline: a
single round trip) and commits. Whatever arrives while that COMMIT is in
flight forms the next batch, so the number of transactions per second
stays near what the server's commit latency allows while the rows per
transaction grow with the load: many publishes, one COMMIT, one WAL flush.

Batches are numbered. :meth:`barrier` names the open batch (everything
enqueued so far, and everything enqueued in the same event-loop step, is
in it or an earlier one); :attr:`durable_batch` is the highest number up
to which every batch is *resolved*; :meth:`wait_durable` calls back once
a batch is resolved. That is the shape of the broker's
:class:`~roost.broker.journal.Journal` gate, so channel confirms and
``tx.commit`` wait on it unchanged. A resolved batch either committed or
failed; :meth:`failure` says which. A batch fails with:

- :class:`WriteFailed`: PostgreSQL reported an error and the transaction
  was rolled back, or (:class:`Unreachable`) the writer could not
  connect: nothing of it was written. A publish may be nacked.
- :class:`CommitOutcomeUnknown`: the connection broke or timed out while
  the transaction was in flight, so the COMMIT may or may not have
  happened (a crash or a failover during COMMIT). Never confirm such a
  publish; close the channel or connection so the client re-publishes
  (a duplicate is allowed, a loss is not).

Deadlocks, serialization failures and a foreign-key violation (a queue
deleted while its rows were in the batch) roll the transaction back and
are retried; the retry drops the rows of queues that no longer exist, as
a publish routed to a queue deleted meanwhile is dropped in RabbitMQ.

Settles and releases are *fenced* by the node epoch (see :mod:`claims`):
they touch only rows the epoch owns, and only while it is alive. That
makes them idempotent, so those of a batch lost to an outage are carried
into the next batch rather than dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from roost.broker.dedup import SharedKey
from roost.broker.journal import OutcomeUnknown
from roost.broker.stats import Histogram
from roost.cluster.claims import FENCE, READY_CHANNEL, TABLES, table_of
from roost.cluster.held import HELD_TABLES
from roost.cluster.queue_limits import (
    COUNTS,
    Counted,
    HeadRow,
    Limit,
    Publish,
    count_update,
    decide,
)

if TYPE_CHECKING:
    from roost.broker.message import Message

log = logging.getLogger(__name__)

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
_NOTIFY_PAYLOAD_MAX = 7000

# Failed batches remembered for failure().
_FAILURES_KEPT = 10_000

# Ids reserved at a time for hand-off rows.
ID_RESERVE = 1000
# Upper bounds (seconds) of the commit latency histogram's buckets.
COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Server errors after which the batch is rolled back and tried again.
_RETRIABLE = (
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.ForeignKeyViolation,
)


class WriteFailed(Exception):
    """The batch was not written: nack, or retry the operation."""


class CommitOutcomeUnknown(WriteFailed, OutcomeUnknown):
    """The batch may or may not have committed: close the connection so the
    client re-publishes (never confirm)."""


class Unreachable(WriteFailed):
    """No connection to PostgreSQL: the batch was not sent."""


class MessageRow(NamedTuple):
    """A message routed to one queue, as a row of ``roost_messages`` (or of
    ``roost_transient_messages`` when ``transient``)."""

    queue_id: int
    exchange: str
    routing_key: str
    properties: bytes
    body: bytes
    priority: int = 0
    expires_ms: int | None = None  # wall-clock ms (None: never)
    transient: bool = False
    # Hand-off: inserted already claimed by this epoch (if it is alive at
    # COMMIT), under this id from reserve_id(). See MessageWriter.handed().
    id: int | None = None
    owner: int | None = None
    # Written only if, in the same transaction, each of these keys was new
    # to its deduplication cache (see DedupKey), and (held) this epoch
    # deleted that row of the delayed tables: the message it releases.
    dedup: tuple[DedupKey, ...] = ()
    held: int | None = None
    # A length-limited queue's: the batch decides whether it is inserted
    # (queue_limits), and tells the node by ``message`` (never a hand-off).
    limit: Limit | None = None
    message: Message | None = None


# A dedup key a row requires to be new to its cache (roost.broker.dedup).
DedupKey = SharedKey


class HeldRow(NamedTuple):
    """A message held by a delayed exchange (``roost_delayed``), due
    ``delay_ms`` after the COMMIT by PostgreSQL's clock."""

    vhost: str
    exchange: str
    routing_key: str
    properties: bytes
    body: bytes
    cc: list[str]
    delay_ms: int
    transient: bool
    dedup: tuple[DedupKey, ...] = ()


def held_token(held_id: int) -> str:
    return f"h{held_id}"


# (epoch, transient) -> ids
_IdsByOwner = dict[tuple[int, bool], list[int]]


class _Batch:
    __slots__ = (
        "counted",
        "dedup_owner",
        "futures",
        "handed",
        "held_deletes",
        "held_rows",
        "id_request",
        "limited",
        "new_ids",
        "number",
        "purges",
        "releases",
        "retries",
        "rows",
        "settles",
        "size",
        "unclaims",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.rows: list[MessageRow] = []
        self.size = 0  # body bytes of rows
        self.settles: _IdsByOwner = {}
        self.releases: _IdsByOwner = {}
        self.unclaims: _IdsByOwner = {}
        self.purges: list[tuple[int, asyncio.Future[int] | None]] = []
        self.futures: list[asyncio.Future[None]] = []
        self.id_request = 0  # ids to reserve from the sequence
        self.new_ids: list[int] = []
        # Whether its hand-off rows are owned (the epoch was alive); None:
        # it had none.
        self.handed: bool | None = None
        # Delayed exchanges' held messages, and held rows released (their
        # messages routed) by this batch, by (epoch, transient).
        self.held_rows: list[HeldRow] = []
        self.held_deletes: _IdsByOwner = {}
        # Delivered rows going to wait out a retry delay: ids, and delays (ms).
        self.retries: dict[tuple[int, bool], tuple[list[int], list[int]]] = {}
        # Dedup token -> the publish (its message) that first carried it.
        self.dedup_owner: dict[str, object] = {}
        # Limited queues: whether it has rows of one; what the batch
        # decided (set by each attempt).
        self.limited = False
        self.counted: list[Counted] = []

    def conditional(self) -> bool:
        """Whether the batch needs the general insert statement."""
        return bool(self.held_rows or self.held_deletes or self.dedup_owner)

    def has_work(self) -> bool:
        return bool(
            self.rows
            or self.held_rows
            or self.held_deletes
            or self.retries
            or self.settles
            or self.releases
            or self.unclaims
            or self.purges
            or self.id_request
        )


class MessageWriter:
    """The group-committing writer of one node (see the module docstring).

    ``connections`` workers commit batches concurrently (1 keeps ids in
    enqueue order; more overlap round trips on a slow link). A batch closes
    early (at the end of the event-loop step) once it holds
    ``max_batch_rows`` rows or ``max_batch_bytes`` body bytes, bounding the
    size of one transaction. ``on_committed`` is told the queue ids that
    got new ready rows after each COMMIT (local wake-ups; other nodes hear
    the NOTIFY).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        connections: int = 1,
        max_batch_rows: int = 5000,
        max_batch_bytes: int = 16 << 20,
        commit_timeout: float = 30.0,
        retries: int = 3,
        on_committed: Callable[[set[int]], None] | None = None,
        on_counted: Callable[[list[Counted]], None] | None = None,
        max_pending_bytes: int = 0,
        on_backlog: Callable[[bool], None] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.max_batch_rows = max_batch_rows
        self.max_batch_bytes = max_batch_bytes
        self.commit_timeout = commit_timeout
        self.retries = retries
        self.on_committed = on_committed
        # Told, before the batch's confirms go out, what each committed
        # batch decided for the length-limited queues it published to.
        self.on_counted = on_counted
        self._open = _Batch(1)
        self._full: deque[_Batch] = deque()  # closed early, waiting for a worker
        self._wake = asyncio.Event()
        self._conns: list[psycopg.AsyncConnection[Any] | None] = [None] * connections
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._close_pending = False
        self._durable = 0
        self._resolved: set[int] = set()  # resolved above _durable (workers > 1)
        self._waiters: dict[int, list[Callable[[], None]]] = {}
        self._failures: dict[int, WriteFailed] = {}
        # Committed batches that refused publishes (length limits): batch
        # -> id() of the refused messages, alive until the batch resolved,
        # so no message published in that batch can share one.
        self._refusals: dict[int, set[int]] = {}
        self._waited_on = 0  # highest batch someone waits for
        # Ids reserved from the sequence for hand-off rows, which need one
        # before their batch commits.
        self._ids: deque[int] = deque()
        self._ids_requested = False
        self._handed: dict[int, bool] = {}
        # Told (delay ms, batch) of each message held or put to wait out a
        # retry delay: whoever routes them may want to look sooner.
        self.on_hold: Callable[[int, int], None] | None = None
        self.pending_rows = 0  # enqueued, not yet resolved (flow control)
        self.pending_bytes = 0
        # Flow control: on_backlog(True) once the body bytes enqueued and not
        # yet resolved exceed max_pending_bytes (PostgreSQL falls behind or
        # is out of reach), on_backlog(False) once they are back under half
        # of it, so a writer hovering at the limit does not flap. 0: never.
        self.max_pending_bytes = max_pending_bytes
        self.on_backlog = on_backlog
        self.backlogged = False
        # Counters for stats and tests.
        self.transactions = 0
        # Each committed batch's round trip (for /metrics).
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.rows_written = 0

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        for i in range(len(self._conns)):
            self._workers.append(asyncio.create_task(self._worker(i), name=f"roost-writer-{i}"))

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closing = True
        self._wake.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    # -- the Journal-shaped gate -------------------------------------------

    def barrier(self) -> int:
        """The batch that holds everything enqueued so far (and anything
        enqueued before the event loop runs again)."""
        return self._open.number

    @property
    def durable_batch(self) -> int:
        """Every batch up to this one is resolved (committed or failed)."""
        return self._durable

    def wait_durable(self, batch: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once ``batch`` is resolved; then check
        :meth:`failure`."""
        if batch <= self._durable:
            callback()
            return
        self._waiters.setdefault(batch, []).append(callback)
        if batch > self._waited_on:
            self._waited_on = batch
        self._wake.set()

    def reserve_id(self) -> int | None:
        """A row id for a hand-off row (None: none reserved yet; more are
        reserved with the next batch)."""
        ids = self._ids
        if len(ids) < ID_RESERVE // 2 and not self._ids_requested:
            self._ids_requested = True
            self._open.id_request = ID_RESERVE
            self._wake.set()
        return ids.popleft() if ids else None

    def handed(self, batch: int) -> bool | None:
        """Whether the hand-off rows of a committed batch are owned by their
        epoch (False: it was dead by then, they were inserted ready; None:
        the batch had none, or it is long gone). Ask in the wait_durable
        callback: the answer is kept for the last 10,000 such batches."""
        return self._handed.get(batch)

    def failure(self, batch: int) -> WriteFailed | None:
        """Why a resolved batch failed (None: it committed). The last
        10,000 failures are kept: ask soon after the batch resolved."""
        return self._failures.get(batch)

    def refusals(self, batch: int) -> set[int] | None:
        """``id()`` of the messages a committed batch refused (a queue's
        length limit, see :mod:`queue_limits`); None: it refused none.
        Kept for the last 1,000 batches that refused any: ask in the
        wait_durable callback."""
        return self._refusals.get(batch)

    # -- enqueueing (synchronous: called from the broker's event loop) ------

    def enqueue(self, row: MessageRow, publish: object = None) -> int:
        """Add one row; returns its batch (for :meth:`wait_durable`).
        ``publish`` (the message) tells the rows of one publish apart from
        another's that carries the same dedup key in this batch: only the
        first publish may take the key."""
        batch = self._open
        if row.dedup:
            owners = batch.dedup_owner
            for k in row.dedup:
                first = owners.setdefault(k.token, publish)
                if first is not publish:
                    return batch.number  # a duplicate within the batch
        batch.rows.append(row)
        if row.limit is not None:
            batch.limited = True
        n = len(row.body)
        batch.size += n
        self.pending_rows += 1
        self.pending_bytes += n
        if (
            self.max_pending_bytes
            and not self.backlogged
            and self.pending_bytes > self.max_pending_bytes
        ):
            self._backlog(True)
        if (
            len(batch.rows) >= self.max_batch_rows or batch.size >= self.max_batch_bytes
        ) and not self._close_pending:
            # Closed in the next event-loop step, never now: a publish
            # routed to several queues enqueues a row per queue after one
            # barrier(), and all of them must be in the batch it named.
            self._close_pending = True
            asyncio.get_running_loop().call_soon(self._close_full)
        self._wake.set()
        return batch.number

    def submit(self, rows: Iterable[MessageRow]) -> asyncio.Future[None]:
        """Add rows; the future is resolved after the COMMIT that holds
        them, or raises :class:`WriteFailed` / :class:`CommitOutcomeUnknown`."""
        for row in rows:
            self.enqueue(row)
        return self._future()

    def hold(self, row: HeldRow, publish: object = None) -> int:
        """Add a delayed exchange's held message; returns its batch."""
        batch = self._open
        if row.dedup:
            owners = batch.dedup_owner
            for k in row.dedup:
                if owners.setdefault(k.token, publish) is not publish:
                    return batch.number
        batch.held_rows.append(row)
        self.pending_rows += 1
        self.pending_bytes += len(row.body)
        batch.size += len(row.body)
        self._wake.set()
        if self.on_hold is not None:
            self.on_hold(row.delay_ms, batch.number)
        return batch.number

    def retry_nowait(self, row_id: int, epoch: int, transient: bool, delay_ms: int) -> int:
        """A row ``epoch`` delivered waits out a retry delay: moved to the
        delayed tables (fenced), back in its queue as itself once due."""
        ids, delays = self._open.retries.setdefault((epoch, transient), ([], []))
        ids.append(row_id)
        delays.append(delay_ms)
        self._wake.set()
        if self.on_hold is not None:
            self.on_hold(delay_ms, self._open.number)
        return self._open.number

    def release_held_nowait(self, ids: Iterable[int], epoch: int, transient: bool) -> int:
        """Delete held rows ``epoch`` claimed, in the batch that writes the
        rows their messages were routed to (which require it: ``held``)."""
        return self._add_ids(self._open.held_deletes, ids, epoch, transient)

    def settle_nowait(self, ids: Iterable[int], epoch: int, transient: bool = False) -> int:
        """Delete rows ``epoch`` owns (acked); returns the batch."""
        return self._add_ids(self._open.settles, ids, epoch, transient)

    def release_nowait(self, ids: Iterable[int], epoch: int, transient: bool = False) -> int:
        """Give delivered rows back (requeue): ready again, redelivered."""
        return self._add_ids(self._open.releases, ids, epoch, transient)

    def unclaim_nowait(self, ids: Iterable[int], epoch: int, transient: bool = False) -> int:
        """Give claimed rows that were never delivered back as they were
        (the claim's delivery count undone, redelivered unchanged)."""
        return self._add_ids(self._open.unclaims, ids, epoch, transient)

    def settle(
        self, ids: Iterable[int], epoch: int, transient: bool = False
    ) -> asyncio.Future[None]:
        self.settle_nowait(ids, epoch, transient)
        return self._future()

    def release(
        self, ids: Iterable[int], epoch: int, transient: bool = False
    ) -> asyncio.Future[None]:
        self.release_nowait(ids, epoch, transient)
        return self._future()

    def unclaim(
        self, ids: Iterable[int], epoch: int, transient: bool = False
    ) -> asyncio.Future[None]:
        self.unclaim_nowait(ids, epoch, transient)
        return self._future()

    def purge(self, queue_id: int) -> asyncio.Future[int]:
        """Delete the queue's ready rows (both tables); the future says how
        many. Claimed rows stay until their owner settles them."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._open.purges.append((queue_id, fut))
        self._wake.set()
        return fut

    def _add_ids(self, into: _IdsByOwner, ids: Iterable[int], epoch: int, transient: bool) -> int:
        into.setdefault((epoch, transient), []).extend(ids)
        self._wake.set()
        return self._open.number

    def _future(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open.futures.append(fut)
        self._wake.set()
        return fut

    def _carry_forward(self, batch: _Batch) -> None:
        """Settles, releases and unclaims of a batch lost to an outage go
        into the next batch: each only ever applies to rows the epoch still
        owns, so doing one twice is harmless, while losing one would leave
        its rows held by a live node that believes them settled. (New rows
        are never retried: their publishers were told to publish again.)"""
        target = self._open
        for mine, theirs in (
            (batch.settles, target.settles),
            (batch.releases, target.releases),
            (batch.unclaims, target.unclaims),
        ):
            for key, ids in mine.items():
                theirs.setdefault(key, []).extend(ids)
        for key, (ids, delays) in batch.retries.items():
            into = target.retries.setdefault(key, ([], []))
            into[0].extend(ids)
            into[1].extend(delays)
        if batch.settles or batch.releases or batch.unclaims or batch.retries:
            self._wake.set()

    def _close_full(self) -> None:
        self._close_pending = False
        batch = self._open
        if len(batch.rows) >= self.max_batch_rows or batch.size >= self.max_batch_bytes:
            self._close_open()

    def _close_open(self) -> None:
        self._full.append(self._open)
        self._open = _Batch(self._open.number + 1)

    # -- workers ----------------------------------------------------------

    async def _next_batch(self) -> _Batch | None:
        while True:
            if self._full:
                return self._full.popleft()
            batch = self._open
            if batch.has_work() or batch.futures or self._waited_on >= batch.number:
                self._close_open()
                return self._full.popleft()
            if self._closing:
                return None
            self._wake.clear()
            await self._wake.wait()

    async def _worker(self, slot: int) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            error: WriteFailed | None = None
            queues: set[int] = set()
            if batch.has_work():
                try:
                    queues = await self._write(slot, batch)
                except WriteFailed as exc:
                    error = exc
                except Exception as exc:  # a bug: still never resolve on doubt
                    log.exception("message batch %d", batch.number)
                    error = CommitOutcomeUnknown(f"unexpected error: {exc!r}")
            if error is None and batch.counted:
                self._counted(batch)
            self._resolve(batch, error)
            if error is None and queues and self.on_committed is not None:
                try:
                    self.on_committed(queues)
                except Exception:
                    log.exception("on_committed hook")

    def _counted(self, batch: _Batch) -> None:
        refused: set[int] = set()
        for c in batch.counted:
            refused.update(id(m) for m in c.refused)
        if refused:
            refusals = self._refusals
            refusals[batch.number] = refused
            if len(refusals) > 1000:
                del refusals[next(iter(refusals))]
        if self.on_counted is not None:
            try:
                self.on_counted(batch.counted)
            except Exception:
                log.exception("on_counted hook")

    def _backlog(self, over: bool) -> None:
        self.backlogged = over
        if self.on_backlog is not None:
            try:
                self.on_backlog(over)
            except Exception:
                log.exception("on_backlog hook")

    def _resolve(self, batch: _Batch, error: WriteFailed | None) -> None:
        self.pending_rows -= len(batch.rows) + len(batch.held_rows)
        self.pending_bytes -= batch.size
        if self.backlogged and self.pending_bytes <= self.max_pending_bytes // 2:
            self._backlog(False)
        if error is not None:
            failures = self._failures
            failures[batch.number] = error
            if len(failures) > _FAILURES_KEPT:
                del failures[next(iter(failures))]  # the oldest (dicts keep order)
            if isinstance(error, CommitOutcomeUnknown | Unreachable) and not self._closing:
                self._carry_forward(batch)
            if batch.id_request:
                self._ids_requested = False  # ask again with a later batch
        for fut in batch.futures:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
        for _, pfut in batch.purges:
            if pfut is not None and not pfut.done() and error is not None:
                pfut.set_exception(error)
        # Batches resolve out of order with several workers: durable_batch
        # moves over the contiguous prefix only.
        self._resolved.add(batch.number)
        start = self._durable
        while self._durable + 1 in self._resolved:
            self._durable += 1
            self._resolved.discard(self._durable)
        for b in range(start + 1, self._durable + 1):
            for cb in self._waiters.pop(b, ()):
                try:
                    cb()
                except Exception:
                    log.exception("wait_durable callback")

    async def _connection(self, slot: int) -> psycopg.AsyncConnection[Any]:
        current = self._conns[slot]
        if current is not None:
            if not current.closed and _still_up(current):
                return current
            self._drop_connection(slot)
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=False, application_name="roost-writer"
                ),
                self.commit_timeout,
            )
        except (OSError, psycopg.Error, TimeoutError) as exc:
            # Nothing was sent: the batch is certainly not written. Pause a
            # little so an outage does not become a busy loop of attempts.
            await asyncio.sleep(0.2)
            raise Unreachable(f"cannot connect to PostgreSQL: {exc}") from exc
        self._conns[slot] = conn
        return conn

    def _drop_connection(self, slot: int) -> None:
        conn = self._conns[slot]
        self._conns[slot] = None
        if conn is not None:
            # Without waiting: the socket may be dead or the server gone.
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    async def _write(self, slot: int, batch: _Batch) -> set[int]:
        """Write ``batch`` in one transaction; returns the queue ids that got
        ready rows. Raises WriteFailed / CommitOutcomeUnknown."""
        drop_deleted = False
        for attempt in range(self.retries + 1):
            conn = await self._connection(slot)
            try:
                started = time.perf_counter()
                async with asyncio.timeout(self.commit_timeout):
                    counts = await self._transaction(conn, batch, drop_deleted)
                self.commit_seconds.observe(time.perf_counter() - started)
            except psycopg.Error as exc:
                # A server error (it has a SQLSTATE) on a connection still
                # up means PostgreSQL rolled the transaction back; anything
                # else (no SQLSTATE, connection broken) may have been after
                # the COMMIT reached the server.
                if conn.broken or conn.closed or exc.sqlstate is None:
                    # The transaction (and its COMMIT) was sent, or partly;
                    # whether it committed is unknowable from here.
                    self._drop_connection(slot)
                    raise CommitOutcomeUnknown(
                        f"connection to PostgreSQL lost during commit: {exc}"
                    ) from exc
                # The server answered with an error: rolled back, nothing written.
                if isinstance(exc, _RETRIABLE) and attempt < self.retries:
                    drop_deleted = drop_deleted or isinstance(exc, pg_errors.ForeignKeyViolation)
                    continue
                raise WriteFailed(f"PostgreSQL refused the batch: {exc}") from exc
            except TimeoutError as exc:
                self._drop_connection(slot)
                raise CommitOutcomeUnknown(
                    f"no answer from PostgreSQL within {self.commit_timeout}s during commit"
                ) from exc
            self.transactions += 1
            self.rows_written += len(batch.rows)  # (refused ones included)
            if batch.id_request:
                self._ids.extend(batch.new_ids)
                self._ids_requested = False
            if batch.handed is not None:
                handed = self._handed
                handed[batch.number] = batch.handed
                if len(handed) > _FAILURES_KEPT:
                    del handed[next(iter(handed))]
            for (_, pfut), n in zip(batch.purges, counts, strict=True):
                if pfut is not None and not pfut.done():
                    pfut.set_result(n)
            # Hand-off rows are nobody else's business, unless they went
            # in ready (the epoch was dead).
            return {r.queue_id for r in batch.rows if r.owner is None or not batch.handed}
        raise AssertionError("unreachable")

    async def _transaction(
        self, conn: psycopg.AsyncConnection[Any], batch: _Batch, drop_deleted: bool
    ) -> list[int]:
        """One pipelined transaction for the whole batch; returns the purge
        counts."""
        purge_curs = []
        hand_cur = id_cur = None
        async with conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            rows = batch.rows
            if batch.limited:
                rows = await self._apply_limits(conn, batch)
            owner = next((r.owner for r in rows if r.owner is not None), None)
            if batch.conditional():
                hand_cur = conn.cursor()
                sql, params = _general_insert(batch, rows, owner, drop_deleted)
                await hand_cur.execute(sql, params)
                evict = _evictions(batch)
                if evict:
                    await cur.execute(_EVICT_KEYS, evict)
                if batch.limited:
                    await _recount_conditional(cur, rows)
            elif owner is not None:
                hand_cur = conn.cursor()
                await hand_cur.execute(
                    _insert_handoff_sql(drop_deleted),
                    {
                        **dict(zip(_COLUMN_NAMES, _columns(rows), strict=True)),
                        "transient": [r.transient for r in rows],
                        "id": [r.id for r in rows],
                        "owned": [r.owner is not None for r in rows],
                        "epoch": owner,
                    },
                )
            elif rows:
                kinds = {r.transient for r in rows}
                if len(kinds) == 1:
                    await cur.execute(_insert_sql(kinds.pop(), drop_deleted), _columns(rows))
                else:
                    await cur.execute(
                        _insert_mixed_sql(drop_deleted),
                        (*_columns(rows), [r.transient for r in rows]),
                    )
            for sql, ops in (
                (_SETTLE, batch.settles),
                (_RELEASE, batch.releases),
                (_UNCLAIM, batch.unclaims),
            ):
                for (epoch, transient), ids in ops.items():
                    ids.sort()  # one lock order for every writer: fewer deadlocks
                    table = table_of(transient)
                    query = sql.format(table=table, fence=FENCE, counts=COUNTS[table])
                    await cur.execute(query, {"ids": ids, "epoch": epoch, "channel": READY_CHANNEL})
            for (epoch, transient), (ids, delays) in batch.retries.items():
                await cur.execute(
                    _RETRY.format(
                        table=table_of(transient), held=HELD_TABLES[transient], fence=FENCE
                    ),
                    {"ids": ids, "delays": delays, "epoch": epoch},
                )
            if batch.id_request:
                id_cur = conn.cursor()
                await id_cur.execute(
                    "SELECT nextval('roost_messages_id_seq') FROM generate_series(1, %s)",
                    (batch.id_request,),
                )
            for queue_id, _ in batch.purges:
                pcur = conn.cursor()
                await pcur.execute(_PURGE, {"q": queue_id})
                purge_curs.append(pcur)
            # Delivered at COMMIT, and only if it commits. Hand-off rows
            # are claimed already: other nodes hear of them only if they
            # went in ready (the epoch was dead by then; dead stays dead,
            # so this check, later than the insert's, cannot miss that).
            ready = {r.queue_id for r in rows if r.owner is None}
            for payload in _notify_payloads(ready):
                await cur.execute("SELECT pg_notify(%s, %s)", (READY_CHANNEL, payload))
            if owner is not None:
                for payload in _notify_payloads({r.queue_id for r in rows} - ready):
                    await cur.execute(
                        "SELECT pg_notify(%s, %s) WHERE NOT EXISTS"
                        " (SELECT 1 FROM roost_nodes WHERE epoch = %s AND NOT dead)",
                        (READY_CHANNEL, payload, owner),
                    )
        if hand_cur is not None:
            found = await hand_cur.fetchone()
            batch.handed = bool(found and found[0])
        if id_cur is not None:
            batch.new_ids = [r[0] for r in await id_cur.fetchall()]
        counts = []
        for pcur in purge_curs:
            row = await pcur.fetchone()
            counts.append(int(row[0]) if row else 0)
        return counts

    async def _apply_limits(
        self, conn: psycopg.AsyncConnection[Any], batch: _Batch
    ) -> list[MessageRow]:
        """Lock the counts of the length-limited queues the batch publishes
        to, decide each of their publishes (queue_limits.decide), enqueue
        the drop-head deletes and the count updates; returns the rows to
        insert (the batch's rows less those refused or dropped)."""
        rows = batch.rows
        batch.counted = []
        by_queue: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.limit is not None:
                by_queue.setdefault(r.queue_id, []).append(i)
        counts = await _lock_counts(conn, sorted(by_queue))
        keep = [True] * len(rows)
        deletes: dict[bool, list[int]] = {False: [], True: []}
        shifts: dict[bool, tuple[list[int], list[int], list[int]]] = {
            False: ([], [], []),
            True: ([], [], []),
        }

        def transient(i: int) -> bool:
            return rows[i].transient

        for q, indexes in sorted(by_queue.items()):
            found = counts.get(q)
            if found is None:
                # The queue was deleted meanwhile: its publishes are dropped,
                # as RabbitMQ drops a publish to a queue deleted meanwhile.
                for i in indexes:
                    keep[i] = False
                continue
            limit = rows[indexes[0]].limit
            assert limit is not None
            ready, size = found
            decision = await decide(
                limit,
                ready,
                size,
                [Publish(i, len(rows[i].body), rows[i].priority) for i in indexes],
                transient,
                functools.partial(_fetch_head, conn, q, limit.dead_letter),
            )
            accepted = set(decision.accepted)
            for i in indexes:
                if i not in accepted:
                    keep[i] = False
            for head in decision.dropped:
                deletes[head.transient].append(head.id)
            for kind, (dr, db) in decision.shift.items():
                if dr or db:
                    qs, drs, dbs = shifts[kind]
                    qs.append(q)
                    drs.append(dr)
                    dbs.append(db)
                    ready += dr
            batch.counted.append(
                Counted(
                    q,
                    _messages(rows, decision.refused),
                    _messages(rows, decision.discarded + decision.dropped_new),
                    decision.dropped,
                    ready,
                )
            )
        cur = conn.cursor()
        for kind, ids in deletes.items():
            if ids:
                await cur.execute(f"DELETE FROM {table_of(kind)} WHERE id = ANY(%s)", (ids,))
        for kind, (qs, drs, dbs) in shifts.items():
            if qs:
                await cur.execute(
                    f"UPDATE {COUNTS[table_of(kind)]} k"
                    " SET ready = k.ready + u.r, bytes = k.bytes + u.b"
                    " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS u(q, r, b)"
                    " WHERE k.queue_id = u.q",
                    (qs, drs, dbs),
                )
        return [r for r, k in zip(rows, keep, strict=True) if k]


def _messages(rows: list[MessageRow], positions: list[int]) -> list[Message]:
    return [m for i in positions if (m := rows[i].message) is not None]


async def _lock_counts(
    conn: psycopg.AsyncConnection[Any], queue_ids: list[int]
) -> dict[int, tuple[int, int]]:
    """Lock the count rows of the queues (both tables'); returns ready rows
    and bytes per queue. A queue without them gets them (counted under
    row locks that make claims in flight finish first, see
    :data:`_RECOUNT`); a deleted queue is left out."""
    found = await _select_counts(conn, queue_ids)
    missing = [q for q in queue_ids if q not in found]
    if missing:
        for table in TABLES:
            await conn.execute(
                _RECOUNT.format(table=table, counts=COUNTS[table]).encode(), {"qs": missing}
            )
        found.update(await _select_counts(conn, missing))
    return found


async def _select_counts(
    conn: psycopg.AsyncConnection[Any], queue_ids: list[int]
) -> dict[int, tuple[int, int]]:
    cur = await conn.execute(_LOCK_COUNTS, (queue_ids,))
    return {q: (int(r), int(b)) for q, r, b in await cur.fetchall()}


async def _fetch_head(
    conn: psycopg.AsyncConnection[Any], queue_id: int, content: bool, n: int, seen: list[int]
) -> list[HeadRow]:
    cur = await conn.execute(
        _HEAD_WITH_CONTENT if content else _HEAD, {"q": queue_id, "n": n, "seen": list(seen)}
    )
    return [HeadRow(*r) for r in await cur.fetchall()]


# Both tables' counts of each queue, locked in queue order (a batch of
# another node waits here, then reads what this one committed).
_LOCK_COUNTS = (
    "SELECT d.queue_id, d.ready + t.ready, d.bytes + t.bytes FROM roost_queue_counts d"
    " JOIN roost_transient_queue_counts t USING (queue_id)"
    " WHERE d.queue_id = ANY(%s::bigint[]) ORDER BY d.queue_id FOR UPDATE"
)

# A count row for a queue that has none yet: usually a queue that never
# had a row. FOR SHARE waits for claims in flight (which, not seeing the
# count row yet, do not count themselves) and leaves out what they took.
_RECOUNT = (
    "INSERT INTO {counts} (queue_id, ready, bytes)"
    " SELECT q.id, c.n, c.s FROM roost_queues q CROSS JOIN LATERAL ("
    "  SELECT count(*) AS n, coalesce(sum(octet_length(r.body)), 0) AS s FROM ("
    "   SELECT body FROM {table} WHERE queue_id = q.id AND owner IS NULL FOR SHARE) r) c"
    " WHERE q.id = ANY(%(qs)s::bigint[])"
    " ON CONFLICT (queue_id) DO NOTHING"
)


def _head_sql(content: bool) -> str:
    # The next rows to deliver, both tables merged, locked so no claim
    # takes them meanwhile (and rows being claimed are skipped: they are
    # leaving the ready rows anyway).
    extra = ", exchange, routing_key, properties, body" if content else ""
    pick = (
        "SELECT id, {kind} AS transient, priority, octet_length(body) AS size" + extra + ""
        " FROM {table} WHERE queue_id = %(q)s AND owner IS NULL"
        " AND id <> ALL(%(seen)s::bigint[])"
        " ORDER BY priority DESC, id LIMIT %(n)s FOR UPDATE SKIP LOCKED"
    )
    return (
        f"WITH a AS ({pick.format(kind='false', table=TABLES[0])}),"
        f" b AS ({pick.format(kind='true', table=TABLES[1])})"
        " SELECT * FROM (SELECT * FROM a UNION ALL SELECT * FROM b) h"
        " ORDER BY priority DESC, id LIMIT %(n)s"
    )


_HEAD = _head_sql(False)
_HEAD_WITH_CONTENT = _head_sql(True)


def _still_up(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection survived: a server that restarted or
    closed it meanwhile left an EOF or an error message in the socket, which
    libpq reads here without blocking. Sending a batch on such a connection
    would fail it as CommitOutcomeUnknown for nothing."""
    pgconn = conn.pgconn
    try:
        # A dying backend may send its FATAL message first, then the EOF.
        for _ in range(4):
            if not select.select([pgconn.socket], [], [], 0)[0]:
                break
            pgconn.consume_input()
    except (psycopg.OperationalError, OSError, ValueError):
        return False
    return pgconn.status == pq.ConnStatus.OK


def _insert_sql(transient: bool, drop_deleted: bool) -> str:
    # unnest() of one array per column: one statement, whatever the row
    # count, with every parameter sent in binary (bodies unescaped).
    sql = (
        f"INSERT INTO {table_of(transient)}"
        " (queue_id, priority, exchange, routing_key, properties, body, expires_ms)"
        " SELECT u.* FROM unnest(%b::bigint[], %b::smallint[], %b::text[], %b::text[],"
        " %b::bytea[], %b::bytea[], %b::bigint[])"
        " AS u(queue_id, priority, exchange, routing_key, properties, body, expires_ms)"
    )
    if drop_deleted:
        sql += " WHERE EXISTS (SELECT 1 FROM roost_queues q WHERE q.id = u.queue_id)"
    return sql


_COLUMNS = "queue_id, priority, exchange, routing_key, properties, body, expires_ms"


def _insert_mixed_sql(drop_deleted: bool) -> str:
    # Both tables in one statement, the ids drawn from their shared sequence
    # in row order (unnest() yields rows in array order), so publish order
    # holds across durable and transient rows of one batch.
    where = " WHERE EXISTS (SELECT 1 FROM roost_queues q WHERE q.id = u.queue_id)"
    return (
        f"WITH u AS (SELECT nextval('roost_messages_id_seq') AS id, u.* FROM unnest("
        "%b::bigint[], %b::smallint[], %b::text[], %b::text[], %b::bytea[], %b::bytea[],"
        f" %b::bigint[], %b::boolean[]) AS u({_COLUMNS}, transient)"
        f"{where if drop_deleted else ''}),"
        f" a AS (INSERT INTO {TABLES[0]} (id, {_COLUMNS})"
        f" SELECT id, {_COLUMNS} FROM u WHERE NOT transient)"
        f" INSERT INTO {TABLES[1]} (id, {_COLUMNS}) SELECT id, {_COLUMNS} FROM u WHERE transient"
    )


_COLUMN_NAMES = _COLUMNS.split(", ")


def _insert_handoff_sql(drop_deleted: bool) -> str:
    # Rows with an owner are inserted claimed by it, and counted delivered,
    # if the epoch is alive, fenced as a claim is (FOR KEY SHARE: a
    # release_dead of the epoch waits for this COMMIT, then releases them);
    # otherwise ready. The answer comes back, for all of them at once.
    arrays = ", ".join(
        f"%({name})b::{kind}[]"
        for name, kind in (
            ("queue_id", "bigint"),
            ("priority", "smallint"),
            ("exchange", "text"),
            ("routing_key", "text"),
            ("properties", "bytea"),
            ("body", "bytea"),
            ("expires_ms", "bigint"),
            ("transient", "boolean"),
            ("id", "bigint"),
            ("owned", "boolean"),
        )
    )
    where = " WHERE EXISTS (SELECT 1 FROM roost_queues q WHERE q.id = u.queue_id)"
    target = f"(id, owner, delivery_count, {_COLUMNS})"
    source = f"id, owner, CASE WHEN owner IS NULL THEN 0 ELSE 1 END, {_COLUMNS}"
    return (
        "WITH alive AS (SELECT EXISTS (SELECT 1 FROM roost_nodes"
        " WHERE epoch = %(epoch)s AND NOT dead FOR KEY SHARE) AS ok),"
        " u AS (SELECT coalesce(u.id, nextval('roost_messages_id_seq')) AS id,"
        " CASE WHEN u.owned AND (SELECT ok FROM alive) THEN %(epoch)s::bigint END AS owner,"
        f" {', '.join('u.' + c for c in _COLUMN_NAMES)}, u.transient"
        f" FROM unnest({arrays}) AS u({_COLUMNS}, transient, id, owned)"
        f"{where if drop_deleted else ''}),"
        f" a AS (INSERT INTO {TABLES[0]} {target} SELECT {source} FROM u WHERE NOT transient),"
        f" b AS (INSERT INTO {TABLES[1]} {target} SELECT {source} FROM u WHERE transient)"
        " SELECT ok FROM alive"
    )


async def _recount_conditional(cur: psycopg.AsyncCursor[Any], rows: list[MessageRow]) -> None:
    """A length-limited queue's row accepted by its limit may still not be
    written (a duplicate, a release that lost its fence), which the
    batch's count shift does not know: count such queues again, under the
    count rows this transaction holds (O(ready rows), only for limited
    queues that deduplicate or take delayed messages)."""
    qs = sorted(
        {r.queue_id for r in rows if r.limit is not None and (r.dedup or r.held is not None)}
    )
    if qs:
        for table in TABLES:
            await cur.execute(
                _RECOUNT_AGAIN.format(table=table, counts=COUNTS[table]).encode(), {"qs": qs}
            )


# As _RECOUNT, for count rows that exist (FOR SHARE: claims in flight,
# which count themselves out when they commit, finish first).
_RECOUNT_AGAIN = (
    "UPDATE {counts} k SET ready = c.n, bytes = c.s"
    " FROM unnest(%(qs)s::bigint[]) AS q(id) CROSS JOIN LATERAL ("
    "  SELECT count(*) AS n, coalesce(sum(octet_length(r.body)), 0) AS s FROM ("
    "   SELECT body FROM {table} WHERE queue_id = q.id AND owner IS NULL FOR SHARE) r) c"
    " WHERE k.queue_id = q.id"
)


def _general_insert(
    batch: _Batch, rows: list[MessageRow], owner: int | None, drop_deleted: bool
) -> tuple[str, dict[str, Any]]:
    """The hand-off statement, grown by what a batch with conditions needs:
    released held rows deleted (fenced), dedup keys inserted where new,
    held messages inserted, and every row or held message written only if
    what it requires happened in this very statement."""
    held = batch.held_rows
    keys: dict[str, DedupKey] = {}
    for dedup in [r.dedup for r in rows] + [h.dedup for h in held]:
        for k in dedup:
            keys.setdefault(k.token, k)
    ordered = sorted(keys.values(), key=lambda k: (k.scope, k.key))  # one lock order
    deletes: dict[bool, list[int]] = {False: [], True: []}
    held_epoch = max((e for e, _ in batch.held_deletes), default=0)
    for (epoch, transient), ids in batch.held_deletes.items():
        if epoch == held_epoch:  # an older epoch's are fenced off anyway
            deletes[transient].extend(ids)
    needs = [_requirements(r.dedup, r.held) for r in rows]
    held_needs = [_requirements(h.dedup, None) for h in held]
    params: dict[str, Any] = {
        **dict(zip(_COLUMN_NAMES, _columns(rows), strict=True)),
        "transient": [r.transient for r in rows],
        "id": [r.id for r in rows],
        "owned": [r.owner is not None for r in rows],
        "epoch": owner if owner is not None else held_epoch,
        "r1": [n[0] for n in needs],
        "r2": [n[1] for n in needs],
        "r3": [n[2] for n in needs],
        "held_epoch": held_epoch,
        "held_durable": sorted(deletes[False]),
        "held_transient": sorted(deletes[True]),
        "kscope": [k.scope for k in ordered],
        "kkey": [k.key for k in ordered],
        "kttl": [k.ttl_ms for k in ordered],
        "kqueue": [k.queue_id for k in ordered],
        "hvhost": [h.vhost for h in held],
        "hexchange": [h.exchange for h in held],
        "hkey": [h.routing_key for h in held],
        "hprops": [h.properties for h in held],
        "hbody": [h.body for h in held],
        "hcc": ["\x1f".join(h.cc) if h.cc else None for h in held],
        "hdelay": [h.delay_ms for h in held],
        "htransient": [h.transient for h in held],
        "h1": [n[0] for n in held_needs],
        "h2": [n[1] for n in held_needs],
    }
    return _general_sql(drop_deleted), params


def _requirements(dedup: tuple[DedupKey, ...], held: int | None) -> tuple[str | None, ...]:
    tokens: list[str | None] = [k.token for k in dedup]
    if held is not None:
        tokens.append(held_token(held))
    if len(tokens) > 3:
        raise ValueError("a row requires at most three conditions")
    return (*tokens, *([None] * (3 - len(tokens))))


def _general_sql(drop_deleted: bool) -> str:
    arrays = ", ".join(
        f"%({name})b::{kind}[]"
        for name, kind in (
            ("queue_id", "bigint"),
            ("priority", "smallint"),
            ("exchange", "text"),
            ("routing_key", "text"),
            ("properties", "bytea"),
            ("body", "bytea"),
            ("expires_ms", "bigint"),
            ("transient", "boolean"),
            ("id", "bigint"),
            ("owned", "boolean"),
            ("r1", "text"),
            ("r2", "text"),
            ("r3", "text"),
        )
    )
    held_arrays = ", ".join(
        f"%({name})b::{kind}[]"
        for name, kind in (
            ("hvhost", "text"),
            ("hexchange", "text"),
            ("hkey", "text"),
            ("hprops", "bytea"),
            ("hbody", "bytea"),
            ("hcc", "text"),
            ("hdelay", "bigint"),
            ("htransient", "boolean"),
            ("h1", "text"),
            ("h2", "text"),
        )
    )
    queue_exists = " AND EXISTS (SELECT 1 FROM roost_queues q WHERE q.id = u.queue_id)"
    exchange_exists = (
        " AND EXISTS (SELECT 1 FROM roost_exchanges e WHERE e.vhost = h.vhost AND e.name = h.ex)"
    )
    key_queue_exists = (
        " WHERE k.queue_id IS NULL OR EXISTS (SELECT 1 FROM roost_queues q WHERE q.id = k.queue_id)"
    )
    target = f"(id, owner, delivery_count, {_COLUMNS})"
    source = f"id, owner, CASE WHEN owner IS NULL THEN 0 ELSE 1 END, {_COLUMNS}"
    held_fence = FENCE.replace("%(epoch)s", "%(held_epoch)s")
    held_cols = "id, vhost, exchange, routing_key, properties, body, cc, due_ms"
    held_source = (
        "h.id, h.vhost, h.ex, h.rk, h.props, h.body,"
        " coalesce(string_to_array(h.cc, chr(31)), '{}'),"
        " (extract(epoch FROM now()) * 1000)::bigint + h.delay"
    )
    met = "(%s IS NULL OR %s IN (SELECT token FROM got))"
    return (
        "WITH alive AS (SELECT EXISTS (SELECT 1 FROM roost_nodes"
        " WHERE epoch = %(epoch)s AND NOT dead FOR KEY SHARE) AS ok),"
        # Released held rows: only while this epoch still owns them.
        f" hd AS (DELETE FROM {HELD_TABLES[0]} WHERE id = ANY(%(held_durable)s::bigint[])"
        f" AND owner = %(held_epoch)s AND {held_fence} RETURNING id),"
        f" ht AS (DELETE FROM {HELD_TABLES[1]} WHERE id = ANY(%(held_transient)s::bigint[])"
        f" AND owner = %(held_epoch)s AND {held_fence} RETURNING id),"
        # Dedup keys: new, or back from expiry; an unexpired one stays.
        " k AS (INSERT INTO roost_dedup_keys AS d (scope, key, expires_at, queue_id)"
        " SELECT k.scope, k.key, CASE WHEN k.ttl IS NULL THEN NULL"
        " ELSE now() + k.ttl * interval '1 millisecond' END, k.queue_id"
        " FROM unnest(%(kscope)s::text[], %(kkey)s::text[], %(kttl)s::bigint[],"
        " %(kqueue)s::bigint[]) AS k(scope, key, ttl, queue_id)"
        f"{key_queue_exists if drop_deleted else ''}"
        " ON CONFLICT (scope, key) DO UPDATE SET expires_at = EXCLUDED.expires_at,"
        " seq = EXCLUDED.seq WHERE d.expires_at IS NOT NULL AND d.expires_at <= now()"
        " RETURNING 'k' || d.scope || chr(31) || d.key AS token),"
        " got AS (SELECT token FROM k UNION ALL SELECT 'h' || id FROM hd"
        " UNION ALL SELECT 'h' || id FROM ht),"
        " u AS (SELECT coalesce(u.id, nextval('roost_messages_id_seq')) AS id,"
        " CASE WHEN u.owned AND (SELECT ok FROM alive) THEN %(epoch)s::bigint END AS owner,"
        f" {', '.join('u.' + c for c in _COLUMN_NAMES)}, u.transient"
        f" FROM unnest({arrays}) AS u({_COLUMNS}, transient, id, owned, r1, r2, r3)"
        f" WHERE {met % ('u.r1', 'u.r1')} AND {met % ('u.r2', 'u.r2')}"
        f" AND {met % ('u.r3', 'u.r3')}{queue_exists if drop_deleted else ''}),"
        f" a AS (INSERT INTO {TABLES[0]} {target} SELECT {source} FROM u WHERE NOT transient),"
        f" b AS (INSERT INTO {TABLES[1]} {target} SELECT {source} FROM u WHERE transient),"
        # Ids in row order (one sequence for both tables): publish order.
        f" h AS (SELECT nextval('roost_delayed_id_seq') AS id, * FROM unnest({held_arrays})"
        " AS h(vhost, ex, rk, props, body, cc, delay, transient, h1, h2)"
        f" WHERE {met % ('h.h1', 'h.h1')} AND {met % ('h.h2', 'h.h2')}"
        f"{exchange_exists if drop_deleted else ''}),"
        f" hi AS (INSERT INTO {HELD_TABLES[0]} ({held_cols})"
        f" SELECT {held_source} FROM h WHERE NOT h.transient),"
        f" hj AS (INSERT INTO {HELD_TABLES[1]} ({held_cols})"
        f" SELECT {held_source} FROM h WHERE h.transient)"
        " SELECT ok FROM alive"
    )


def _evictions(batch: _Batch) -> dict[str, Any] | None:
    """Each cache the batch added keys to keeps its ``size`` newest."""
    sizes: dict[str, int] = {}
    for dedup in [r.dedup for r in batch.rows] + [h.dedup for h in batch.held_rows]:
        for k in dedup:
            sizes[k.scope] = k.size
    if not sizes:
        return None
    scopes = sorted(sizes)
    return {"scope": scopes, "size": [sizes[s] for s in scopes]}


_EVICT_KEYS = (
    "DELETE FROM roost_dedup_keys d"
    " USING unnest(%(scope)s::text[], %(size)s::int[]) AS s(scope, size)"
    " WHERE d.scope = s.scope AND d.seq <= (SELECT e.seq FROM roost_dedup_keys e"
    " WHERE e.scope = s.scope ORDER BY e.seq DESC OFFSET s.size LIMIT 1)"
)


def _columns(rows: list[MessageRow]) -> tuple[list[Any], ...]:
    return (
        [r.queue_id for r in rows],
        [r.priority for r in rows],
        [r.exchange for r in rows],
        [r.routing_key for r in rows],
        [r.properties for r in rows],
        [r.body for r in rows],
        [r.expires_ms for r in rows],
    )


def _notify_payloads(queue_ids: set[int]) -> list[str]:
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for q in sorted(queue_ids):
        s = str(q)
        if size + len(s) + 1 > _NOTIFY_PAYLOAD_MAX:
            payloads.append(",".join(current))
            current, size = [], 0
        current.append(s)
        size += len(s) + 1
    if current:
        payloads.append(",".join(current))
    return payloads


# Fenced: only rows the epoch owns, only while the epoch is alive (FENCE
# takes a key-share lock on the node row, so a node being declared dead
# waits for this statement, and this one sees the verdict; see claims).
#
# The rows are found by id, through the primary key. The planner would
# rather scan roost_messages_owned (small, by its statistics), but that
# index still holds an entry for every row the epoch settled since the
# last vacuum, so under a steady stream of acks each statement would walk
# thousands of dead entries, and ever more. IS NOT DISTINCT FROM (not
# strict: it does not imply "owner IS NOT NULL", the index's predicate)
# leaves it no way into that index; with a non-null epoch it means "=".
_MINE = "id = ANY(%(ids)s::bigint[]) AND owner IS NOT DISTINCT FROM %(epoch)s"
_SETTLE = "DELETE FROM {table} WHERE " + _MINE + " AND {fence}"

# Released rows are ready again: counted (a limited queue's), and the
# queues' consumers everywhere are told.
_READY_NOTIFY = (
    ", k AS (" + count_update("{counts}", "r", "+", "size") + ")"
    " SELECT pg_notify(%(channel)s, CASE WHEN count(DISTINCT queue_id) > 500 THEN ''"
    " ELSE string_agg(DISTINCT queue_id::text, ',') END) FROM r HAVING count(*) > 0"
)
_RELEASE = (
    "WITH r AS (UPDATE {table} SET owner = NULL, redelivered = true"
    " WHERE " + _MINE + " AND {fence}"
    " RETURNING queue_id, octet_length(body) AS size)" + _READY_NOTIFY
)
_UNCLAIM = (
    "WITH r AS (UPDATE {table} SET owner = NULL, delivery_count = delivery_count - 1"
    " WHERE " + _MINE + " AND {fence}"
    " RETURNING queue_id, octet_length(body) AS size)" + _READY_NOTIFY
)
# Fenced like a settle: only rows the epoch delivered, while it is alive.
_RETRY = (
    "WITH r AS (DELETE FROM {table} m"
    " USING unnest(%(ids)s::bigint[], %(delays)s::bigint[]) AS x(id, delay)"
    " WHERE m.id = x.id AND m.owner = %(epoch)s AND {fence}"
    " RETURNING m.*, x.delay)"
    " INSERT INTO {held} (vhost, exchange, routing_key, properties, body, due_ms, queue_id,"
    " message_id, priority, expires_ms, delivery_count, published_at)"
    " SELECT NULL, exchange, routing_key, properties, body,"
    " (extract(epoch FROM now()) * 1000)::bigint + delay, queue_id, id, priority, expires_ms,"
    " delivery_count, published_at FROM r"
)

_PURGE = (
    "WITH a AS (DELETE FROM roost_messages WHERE queue_id = %(q)s AND owner IS NULL"
    " RETURNING queue_id, octet_length(body) AS size),"
    " b AS (DELETE FROM roost_transient_messages WHERE queue_id = %(q)s AND owner IS NULL"
    " RETURNING queue_id, octet_length(body) AS size),"
    f" ka AS ({count_update(COUNTS[TABLES[0]], 'a', '-', 'size')}),"
    f" kb AS ({count_update(COUNTS[TABLES[1]], 'b', '-', 'size')})"
    " SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b)"
)

__all__ = [
    "READY_CHANNEL",
    "TABLES",
    "CommitOutcomeUnknown",
    "DedupKey",
    "HeldRow",
    "MessageRow",
    "MessageWriter",
    "Unreachable",
    "WriteFailed",
]
