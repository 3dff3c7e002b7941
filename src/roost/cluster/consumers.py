"""The consumer registry: every node's consumers in ``roost_consumers``.

Each node knows its own consumers (the broker's ``Queue``); what depends
on the consumers of *every* node is decided from this table, read back
after each change and on ``NOTIFY roost_consumers '<epoch>:<queue ids>'``
from the others (and every ``REFRESH_EVERY`` seconds, in case one was
lost). Each queue gets a :class:`SharedQueue` (``Queue.peers``) holding
that view:

- **Single active consumer**: the queue's row with the lowest id (the
  cluster's registration order) is the active consumer; the node holding
  it delivers, the others neither deliver nor claim. Rows of one queue are
  written under its ``roost_queues`` row's lock, so ids follow commits and
  a node that sees its row first stays active until that row goes: no two
  nodes are ever active at once. When it goes (cancel, channel or
  connection closed, node dead and cleaned up after the node timeout) the
  next row's node becomes active; the old one gives back what it had
  claimed, requeued deliveries included.
- **Consumer counts**: ``Queue.consumer_count`` adds the other nodes'
  rows (declare-ok, ``if-unused``, the management API).
- **Auto-delete**: a node's writer deletes its rows under the queue row's
  lock and then counts what is left; the transaction that removes the
  last row anywhere deletes the queue (the cleanup of a dead node too).
- **x-expires**: ``roost_queue_use.used_at`` is when the queue was last
  used on any node. A node whose own timer finds the queue unused asks
  the table, under the locks, and deletes the queue (once: the others find
  it gone) or re-arms for what is left of the period.
- **Consumer priorities**: each row says whether its consumer has room
  (credit within its prefetch), polled every ``ROOM_POLL`` seconds for the
  queues whose consumers have different priorities. A node delivers to,
  and claims for, only those of its consumers whose priority is at least
  that of every consumer with room on another node.

Lock order, as everywhere: the node's own row (the fencing check, ``FOR
KEY SHARE``), then ``roost_cluster`` (only when a queue may be deleted),
then queue rows by id (``FOR NO KEY UPDATE``, which does not block the
foreign-key checks of message inserts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from roost.broker import clock
from roost.cluster.nodes import AsyncConn, NodeRegistry
from roost.cluster.pg_backing import PgBackingQueue
from roost.cluster.queue_drop import LOCK_DEFINITIONS, drop_queues

if TYPE_CHECKING:
    from roost.broker.consumer import Consumer
    from roost.broker.queue import Queue

log = logging.getLogger("roost.cluster")

CHANNEL = "roost_consumers"
# Safety net for a lost notification, and the pace of x-expires re-checks
# between notifications.
REFRESH_EVERY = 5.0
# How often the room of consumers of mixed-priority queues is looked at.
ROOM_POLL = 0.2
RETRY_DELAY = 0.5

_ROWS = "SELECT queue_id, epoch, local_id, priority, exclusive, has_room, tag FROM roost_consumers"


@dataclass(frozen=True)
class ConsumerRow:
    queue_id: int
    epoch: int
    local_id: int
    priority: int
    exclusive: bool
    has_room: bool
    tag: str


@dataclass(frozen=True)
class Written:
    """What this node last wrote of one of its consumers."""

    queue_id: int
    has_room: bool
    auto_delete: bool


def has_room(c: Consumer) -> bool:
    return (c.no_ack or not c.prefetch or c.unacked < c.prefetch) and c.sink.credit() > 0


class SharedQueue:
    """A queue's view of the other nodes' consumers (``Queue.peers``)."""

    def __init__(self, registry: ClusterConsumers, queue: Queue, queue_id: int) -> None:
        self.registry = registry
        self.queue = queue
        self.queue_id = queue_id
        self.remote_consumers = 0
        self.remote_exclusive = False
        # (epoch, local id) of the cluster's first consumer: with single
        # active consumer, the active one.
        self.first: tuple[int, int] | None = None
        # Its tag, on whichever node it is (for the management API).
        self.first_tag: str | None = None
        self.floor: int | None = None
        # Consumers of different priorities: their room matters.
        self.mixed = False

    def active_consumer(self, local_order: list[Consumer]) -> Consumer | None:
        first = self.first
        if first is None or first[0] != self.registry.epoch:
            return None
        ids = self.registry.local_ids
        for c in local_order:
            if ids.get(c) == first[1]:
                return c
        return None

    def priority_floor(self) -> int | None:
        return self.floor

    def consumer_added(self, consumer: Consumer) -> None:
        self.registry.added(self, consumer)

    def consumer_removed(self, consumer: Consumer) -> None:
        self.registry.removed(consumer)

    def touched(self) -> None:
        if self.queue.options.expires is not None:
            self.registry.touch(self.queue_id)

    def expire(self) -> None:
        self.registry.expire(self)

    def apply(self, rows: list[ConsumerRow]) -> None:
        """The queue's rows, in id order, as just read."""
        epoch = self.registry.epoch
        queue = self.queue
        remote = [r for r in rows if r.epoch != epoch]
        self.remote_consumers = len(remote)
        self.remote_exclusive = any(r.exclusive for r in remote)
        before_first, before_floor = self.first, self.floor
        self.first = (rows[0].epoch, rows[0].local_id) if rows else None
        self.first_tag = rows[0].tag if rows else None
        self.floor = max((r.priority for r in remote if r.has_room), default=None)
        priorities = {r.priority for r in rows} | {c.priority for c in queue.consumers()}
        self.mixed = len(priorities) > 1
        if queue.deleted:
            return
        if queue.options.single_active_consumer:
            if self.first != before_first:
                self._serve_or_give_back(queue.active_consumer is not None)
        elif self.floor != before_floor:
            floor = self.floor
            self._serve_or_give_back(
                floor is None or any(c.priority >= floor for c in queue.consumers())
            )

    def _serve_or_give_back(self, serving: bool) -> None:
        queue = self.queue
        backing = queue.backing
        if serving:
            if isinstance(backing, PgBackingQueue):
                backing.wake()  # claims for the consumers that may take now
            queue.dispatch()
        elif isinstance(backing, PgBackingQueue):
            # Claimed here (requeued deliveries of a consumer that was
            # active here included): the consumer that takes over elsewhere
            # gets them now, not after the housekeeping's idle ticks.
            backing.give_back()


class ClusterConsumers:
    """This node's side of ``roost_consumers`` (see the module docstring)."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self.queues: dict[int, SharedQueue] = {}
        self.local_ids: dict[Consumer, int] = {}
        self._last_id = 0
        # Local id -> (its queue, the consumer): what the rows should be.
        self._wanted: dict[int, tuple[SharedQueue, Consumer]] = {}
        self._written: dict[int, Written] = {}
        self._touched: set[int] = set()
        # Queues with x-expires seen for the first time: their period runs
        # from now unless some node recorded a use already.
        self._first_seen: set[int] = set()
        self._expiring: dict[int, SharedQueue] = {}
        self._reread: set[int] = set()
        self._reread_all = True
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def epoch(self) -> int:
        return self.registry.epoch

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        registry = self.registry
        registry.on_node_dead.append(release_consumers)
        registry.on_registered.append(self._registered)
        loop = asyncio.get_running_loop()
        for name, coro in (
            ("roost-consumers", self._write_loop()),
            ("roost-consumers-listen", self._listen()),
            ("roost-consumers-poll", self._poll()),
        ):
            self._tasks.append(loop.create_task(coro, name=name))

    async def stop(self) -> None:
        """Stop writing; this node's rows go with its incarnation (the
        cleanup when it leaves runs :func:`release_consumers`)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _registered(self, epoch: int) -> None:
        # The old incarnation's rows go in its cleanup; its connections
        # were closed, so nothing of it is wanted any more.
        self._written.clear()
        self._reread_all = True
        self._wake.set()

    # -- the broker's side -------------------------------------------------

    def attach(self, queue: Queue, queue_id: int) -> None:
        """``queue``'s row is ``queue_id``: give it its view."""
        shared = SharedQueue(self, queue, queue_id)
        old = queue.peers
        queue.peers = shared
        self.queues[queue_id] = shared
        if isinstance(old, SharedQueue) and self.queues.get(old.queue_id) is old:
            del self.queues[old.queue_id]
        for c in queue.consumers():
            self.added(shared, c)
        if queue.options.expires is not None:
            self._first_seen.add(queue_id)
        self._reread.add(queue_id)
        self._wake.set()

    def forget(self, queue_id: int) -> None:
        self.queues.pop(queue_id, None)

    def added(self, shared: SharedQueue, consumer: Consumer) -> None:
        local_id = self.local_ids.get(consumer)
        if local_id is None:
            self._last_id += 1
            local_id = self.local_ids[consumer] = self._last_id
        self._wanted[local_id] = (shared, consumer)
        self._wake.set()

    def removed(self, consumer: Consumer) -> None:
        local_id = self.local_ids.pop(consumer, None)
        if local_id is not None:
            self._wanted.pop(local_id, None)
            self._wake.set()

    def touch(self, queue_id: int) -> None:
        self._touched.add(queue_id)
        self._wake.set()

    def expire(self, shared: SharedQueue) -> None:
        self._expiring[shared.queue_id] = shared
        self._wake.set()

    async def consumer_counts(self) -> dict[tuple[str, str], int]:
        """Consumers per queue (vhost, name) on every node, read now."""
        pool = self.registry.pool
        assert pool is not None
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT q.vhost, q.name, count(*) FROM roost_consumers c"
                " JOIN roost_queues q ON q.id = c.queue_id GROUP BY q.vhost, q.name"
            )
            return {(str(r[0]), str(r[1])): int(str(r[2])) for r in await cur.fetchall()}

    # -- writing and reading -----------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster: writing the consumer registry: %s", exc)
                self._reread_all = True
                await asyncio.sleep(RETRY_DELAY)
                self._wake.set()

    async def _flush(self) -> None:
        registry = self.registry
        if not registry.is_current():
            return  # fenced: registering again resets the rows (_registered)
        epoch = registry.epoch
        wanted = {
            lid: (shared, c, has_room(c) if shared.mixed else True)
            for lid, (shared, c) in self._wanted.items()
        }
        written = self._written
        removed = [
            lid
            for lid, w in written.items()
            if lid not in wanted or wanted[lid][0].queue_id != w.queue_id
        ]
        added = [
            lid
            for lid in sorted(wanted)
            if lid not in written or written[lid].queue_id != wanted[lid][0].queue_id
        ]
        room = [
            lid
            for lid, (shared, _, r) in wanted.items()
            if lid in written
            and written[lid].queue_id == shared.queue_id
            and written[lid].has_room != r
        ]
        touched, self._touched = self._touched, set()
        first_seen, self._first_seen = self._first_seen, set()
        expiring, self._expiring = self._expiring, {}
        reread, self._reread = self._reread, set()
        reread_all, self._reread_all = self._reread_all, False
        changed = (
            {written[lid].queue_id for lid in removed}
            | {wanted[lid][0].queue_id for lid in added + room}
            | touched
            | first_seen
            | set(expiring)
        )
        if not changed and not reread and not reread_all:
            return
        pool = registry.pool
        assert pool is not None
        try:
            async with pool.connection() as conn:
                rows: list[ConsumerRow] = []
                dropped: set[int] = set()
                used: dict[int, int] = {}
                if changed:
                    result = await self._write(
                        conn,
                        epoch,
                        wanted,
                        (removed, added, room),
                        (touched, first_seen),
                        expiring,
                        changed,
                    )
                    if result is None:
                        return  # declared dead: the fencing hooks take over
                    rows, dropped, used = result
                if reread_all:
                    cur = await conn.execute(_ROWS + " ORDER BY id")
                    rows = [_row(r) for r in await cur.fetchall()]
                elif reread - changed:
                    cur = await conn.execute(
                        _ROWS + " WHERE queue_id = ANY(%s) ORDER BY id", (sorted(reread),)
                    )
                    rows += [_row(r) for r in await cur.fetchall()]
        except BaseException:
            # Tried again with the next flush.
            self._touched |= touched
            self._first_seen |= first_seen
            self._expiring.update(expiring)
            self._reread |= reread
            raise
        if registry.epoch != epoch:
            return
        if reread_all:
            self._apply(rows, set(self.queues))
        else:
            self._apply(rows, changed | reread)
        for qid, shared in expiring.items():
            if qid not in dropped:
                shared.queue.rearm_expiry(used.get(qid, clock.wall_ms()))

    async def _write(
        self,
        conn: AsyncConn,
        epoch: int,
        wanted: dict[int, tuple[SharedQueue, Consumer, bool]],
        rows_changed: tuple[list[int], list[int], list[int]],
        use: tuple[set[int], set[int]],
        expiring: dict[int, SharedQueue],
        changed: set[int],
    ) -> tuple[list[ConsumerRow], set[int], dict[int, int]] | None:
        """One transaction: this node's rows (``removed``, ``added`` and
        ``room`` changed, by local id), queue use (touched, first seen),
        the auto-deletes and expiries they decide. Returns the rows of the
        queues ``changed``, the ids of the queues deleted and, for the
        expiring queues still in use, when they were last used (wall-clock
        ms); None when this epoch was declared dead."""
        removed, added, room = rows_changed
        touched, first_seen = use
        written = self._written
        may_drop = bool(expiring) or any(written[lid].auto_delete for lid in removed)
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT 1 FROM roost_nodes WHERE epoch = %s AND NOT dead FOR KEY SHARE", (epoch,)
            )
            if await cur.fetchone() is None:
                # Declared dead: the cleanup removes this epoch's rows.
                return None
            if may_drop:
                await conn.execute(LOCK_DEFINITIONS)
            cur = await conn.execute(
                "SELECT id, auto_delete FROM roost_queues WHERE id = ANY(%s)"
                " ORDER BY id FOR NO KEY UPDATE",
                (sorted(changed),),
            )
            auto_delete = {int(str(r[0])): bool(r[1]) for r in await cur.fetchall()}
            lost: set[int] = set()
            if removed:
                cur = await conn.execute(
                    "DELETE FROM roost_consumers WHERE epoch = %s AND local_id = ANY(%s)"
                    " RETURNING queue_id",
                    (epoch, removed),
                )
                lost = {int(str(r[0])) for r in await cur.fetchall()}
            # Consumers of a queue deleted meanwhile are cancelled when this
            # node applies the deletion.
            new = [lid for lid in added if wanted[lid][0].queue_id in auto_delete]
            if new:
                cs = [wanted[lid][1] for lid in new]
                await conn.execute(
                    "INSERT INTO roost_consumers"
                    " (queue_id, epoch, local_id, tag, priority, exclusive, has_room)"
                    " SELECT q, %s, l, t, p, x, r FROM unnest(%s::bigint[], %s::bigint[],"
                    " %s::text[], %s::int[], %s::bool[], %s::bool[]) WITH ORDINALITY"
                    " AS u(q, l, t, p, x, r, n) ORDER BY n",
                    (
                        epoch,
                        [wanted[lid][0].queue_id for lid in new],
                        new,
                        [c.tag for c in cs],
                        [c.priority for c in cs],
                        [c.exclusive for c in cs],
                        [wanted[lid][2] for lid in new],
                    ),
                )
            if room:
                await conn.execute(
                    "UPDATE roost_consumers c SET has_room = u.r"
                    " FROM unnest(%s::bigint[], %s::bool[]) AS u(l, r)"
                    " WHERE c.epoch = %s AND c.local_id = u.l",
                    (room, [wanted[lid][2] for lid in room], epoch),
                )
            # x-expires counts from the last consumer's going, too.
            used_now = [
                qid
                for qid in sorted(touched | lost)
                if qid in auto_delete
                and (s := self.queues.get(qid)) is not None
                and s.queue.options.expires is not None
            ]
            if used_now:
                await conn.execute(
                    "INSERT INTO roost_queue_use (queue_id) SELECT unnest(%s::bigint[])"
                    " ON CONFLICT (queue_id) DO UPDATE SET used_at = now()",
                    (used_now,),
                )
            seen = sorted(q for q in first_seen if q in auto_delete)
            if seen:
                await conn.execute(
                    "INSERT INTO roost_queue_use (queue_id) SELECT unnest(%s::bigint[])"
                    " ON CONFLICT DO NOTHING",
                    (seen,),
                )
            drop: set[int] = set()
            # (Only under the definitions lock, taken when this node knew
            # the queue as auto-delete.)
            empty = sorted(q for q in lost if auto_delete.get(q)) if may_drop else []
            if empty:
                cur = await conn.execute(
                    "SELECT q FROM unnest(%s::bigint[]) AS q WHERE NOT EXISTS"
                    " (SELECT 1 FROM roost_consumers c WHERE c.queue_id = q)",
                    (empty,),
                )
                drop.update(int(str(r[0])) for r in await cur.fetchall())
            used: dict[int, int] = {}
            checks = sorted(q for q in expiring if q in auto_delete and q not in drop)
            if checks:
                used = await self._unused(conn, checks, expiring, drop)
            for vhost, name in await drop_queues(conn, drop):
                log.info("cluster: deleted queue '%s' in vhost '%s': unused", name, vhost)
            cur = await conn.execute(
                _ROWS + " WHERE queue_id = ANY(%s) ORDER BY id", (sorted(changed),)
            )
            rows = [_row(r) for r in await cur.fetchall()]
            await conn.execute(
                "SELECT pg_notify(%s, %s)",
                (CHANNEL, f"{epoch}:{','.join(str(q) for q in sorted(changed))}"),
            )
        for lid in removed:
            written.pop(lid, None)
        for lid in added + room:
            shared, _, r = wanted[lid]
            written[lid] = Written(shared.queue_id, r, shared.queue.auto_delete)
        return rows, drop, used

    async def _unused(
        self,
        conn: AsyncConn,
        checks: list[int],
        expiring: dict[int, SharedQueue],
        drop: set[int],
    ) -> dict[int, int]:
        """Add to ``drop`` the queues unused everywhere for their x-expires
        period; returns when the others were last used (wall-clock ms, for
        re-arming: a queue with consumers counts as used now)."""
        cur = await conn.execute(
            "SELECT q, EXISTS (SELECT 1 FROM roost_consumers c WHERE c.queue_id = q),"
            " (SELECT (extract(epoch FROM now() - u.used_at) * 1000)::bigint"
            "    FROM roost_queue_use u WHERE u.queue_id = q)"
            " FROM unnest(%s::bigint[]) AS q",
            (checks,),
        )
        now = clock.wall_ms()
        used: dict[int, int] = {}
        unknown: list[int] = []
        for r in await cur.fetchall():
            qid, consumed, idle = int(str(r[0])), bool(r[1]), r[2]
            expires = expiring[qid].queue.options.expires or 0
            if consumed:
                used[qid] = now
            elif idle is None:
                unknown.append(qid)  # never recorded: its period starts now
                used[qid] = now
            elif int(str(idle)) >= expires:
                drop.add(qid)
            else:
                used[qid] = now - int(str(idle))
        if unknown:
            await conn.execute(
                "INSERT INTO roost_queue_use (queue_id) SELECT unnest(%s::bigint[])"
                " ON CONFLICT DO NOTHING",
                (unknown,),
            )
        return used

    def _apply(self, rows: list[ConsumerRow], queue_ids: set[int]) -> None:
        by_queue: dict[int, list[ConsumerRow]] = {qid: [] for qid in queue_ids}
        for row in rows:
            if row.queue_id in by_queue:
                by_queue[row.queue_id].append(row)
        for qid, mine in by_queue.items():
            shared = self.queues.get(qid)
            if shared is not None:
                try:
                    shared.apply(mine)
                except Exception:
                    log.exception("cluster: applying the consumers of queue %d", qid)

    # -- others' changes -----------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                    self.registry.url, autocommit=True, application_name="roost-consumers"
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._reread_all = True  # what was announced before LISTEN
                    self._wake.set()
                    async for note in conn.notifies():
                        self._notified(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s: %s; reconnecting", CHANNEL, exc)
                await asyncio.sleep(RETRY_DELAY)

    def _notified(self, payload: str) -> None:
        epoch_text, _, ids = payload.partition(":")
        try:
            epoch = int(epoch_text)
            queue_ids = {int(s) for s in ids.split(",") if s}
        except ValueError:
            self._reread_all = True
            self._wake.set()
            return
        if epoch != self.registry.epoch:
            self._reread |= queue_ids
            self._wake.set()

    async def _poll(self) -> None:
        """Room changes of consumers in mixed-priority queues, and now and
        then everything again."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + REFRESH_EVERY
        while True:
            await asyncio.sleep(ROOM_POLL)
            if loop.time() >= next_refresh:
                next_refresh = loop.time() + REFRESH_EVERY
                self._reread_all = True
                self._wake.set()
            written = self._written
            for lid, (shared, c) in self._wanted.items():
                if not shared.mixed:
                    continue
                w = written.get(lid)
                if w is not None and w.has_room != has_room(c):
                    self._wake.set()
                    break


async def release_consumers(epoch: int, conn: AsyncConn) -> None:
    """The ``on_node_dead`` hook: remove a dead epoch's consumers, in its
    cleanup transaction, deleting the auto-delete queues they were the last
    consumers of (idempotent: a second run finds no rows)."""
    cur = await conn.execute(
        "SELECT DISTINCT c.queue_id, q.auto_delete FROM roost_consumers c"
        " JOIN roost_queues q ON q.id = c.queue_id WHERE c.epoch = %s",
        (epoch,),
    )
    found = {int(str(r[0])): bool(r[1]) for r in await cur.fetchall()}
    if not found:
        await conn.execute("DELETE FROM roost_consumers WHERE epoch = %s", (epoch,))
        return
    ids = sorted(found)
    if any(found.values()):
        await conn.execute(LOCK_DEFINITIONS)
    await conn.execute(
        "SELECT id FROM roost_queues WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE", (ids,)
    )
    await conn.execute("DELETE FROM roost_consumers WHERE epoch = %s", (epoch,))
    await conn.execute(
        "INSERT INTO roost_queue_use (queue_id)"
        " SELECT q FROM unnest(%s::bigint[]) AS q WHERE EXISTS"
        " (SELECT 1 FROM roost_queues WHERE id = q)"
        " ON CONFLICT (queue_id) DO UPDATE SET used_at = now()",
        (ids,),
    )
    auto = [q for q in ids if found[q]]
    if auto:
        cur = await conn.execute(
            "SELECT q FROM unnest(%s::bigint[]) AS q WHERE NOT EXISTS"
            " (SELECT 1 FROM roost_consumers c WHERE c.queue_id = q)",
            (auto,),
        )
        gone = await drop_queues(conn, [int(str(r[0])) for r in await cur.fetchall()])
        for vhost, name in gone:
            log.info(
                "cluster: deleted auto-delete queue '%s' in vhost '%s': its last consumer "
                "was on dead epoch %d",
                name,
                vhost,
                epoch,
            )
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"0:{','.join(str(q) for q in ids)}"))


def _row(r: tuple[Any, ...]) -> ConsumerRow:
    return ConsumerRow(
        int(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]), bool(r[5]), str(r[6])
    )
