"""Delayed exchanges in cluster mode: held messages are rows in
PostgreSQL, routed when due by whichever node claims them.

- **Holding** (:meth:`DelayStore.hold`, the broker's
  :class:`~roost.broker.delayed.DelayStore` port): the message goes into the
  node's writer batch as a row of ``roost_delayed`` (persistent messages on
  durable exchanges) or ``roost_transient_delayed``, due ``x-delay`` ms
  after its COMMIT by PostgreSQL's clock. The publish is confirmed after
  that COMMIT, as any other publish: group commit, no transaction of its
  own. Nothing stays in the node's memory, so the node may die the next
  moment.
- **Retries**: a delivered message requeued on a queue with
  ``x-retry-delay`` waits as a held row too (``PgBackingQueue.requeue_later``:
  the writer moves the row, fenced by the epoch that delivered it), so it
  waits out its delay even if that node dies, and comes back as the very
  row it was (its place in the queue, its delivery count), redelivered, in
  one statement run by whichever node's mover finds it due.
- **Routing** (the *mover*, one task per node): claims up to
  :data:`ROUTE_BATCH` due rows (see :mod:`roost.cluster.held`), in due
  order, routes each through its exchange on this node
  (``VirtualHost.publish``, origin DELAYED, ``x-delay`` negated as the
  plugin does), and enqueues the fenced delete of the held row in the
  same writer batch as the routed rows, which require it. A batch that
  fails gives the claimed rows back. Then it sleeps until the next row is
  due, at most :data:`POLL_INTERVAL`, and is woken early by a hold on this
  node due sooner: a node that publishes a delayed message routes it on
  time; when it died, another node's poll finds it due.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from roost import properties
from roost.broker.dedup import SharedKey
from roost.broker.delayed import DelayedExchange, released
from roost.broker.message import Message
from roost.broker.origins import DELAYED
from roost.cluster import held
from roost.cluster.message_writer import HeldRow

if TYPE_CHECKING:
    from roost.broker.broker import Broker
    from roost.cluster.message_writer import MessageWriter

log = logging.getLogger(__name__)

# Held messages routed per claim (and per writer batch).
ROUTE_BATCH = 1000
# Expired dedup keys are deleted this often (seconds), up to PRUNE_BATCH
# at a time: a cache that takes no new keys never evicts its old ones, and
# an expired key only counts as absent, it does not go by itself.
PRUNE_INTERVAL = 30.0
PRUNE_BATCH = 10_000
PRUNE_KEYS_SQL = (
    "DELETE FROM roost_dedup_keys WHERE (scope, key) IN (SELECT scope, key"
    " FROM roost_dedup_keys WHERE expires_at <= now() LIMIT %s FOR UPDATE SKIP LOCKED)"
)
# Pause (ms) before looking again when a held message is due but was not
# claimed by the last look.
DUE_AGAIN_MS = 50
# Longest sleep of a node's mover: how late a message may be routed when
# the node that held it died (its own mover wakes for it on time).
POLL_INTERVAL = 1.0


class DelayStore:
    def __init__(
        self,
        broker: Broker,
        writer: MessageWriter,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        epoch: int,
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.broker = broker
        self.writer = writer
        self.pool = pool
        self.epoch = epoch
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # When the mover means to look next (loop time).
        self._next_look = 0.0
        self.routed = 0  # held messages routed by this node (tests, stats)
        self._chores: set[asyncio.Task[None]] = set()  # (kept referenced)

    # -- the broker's port -------------------------------------------------

    def hold(self, exchange: DelayedExchange, message: Message, delay: int) -> int:
        vhost = exchange.vhost
        assert vhost is not None
        row = HeldRow(
            vhost.name,
            exchange.name,
            message.routing_key,
            message.properties,
            message.body,
            list(message.cc),
            delay,
            not (exchange.durable and message.persistent),
            tuple(r for r in message.requires if isinstance(r, SharedKey)),
        )
        return self.writer.hold(row, message)

    def _held(self, delay_ms: int, batch: int) -> None:
        """The writer took a held message or a retry: due before the mover
        looks again, it looks once that batch committed."""
        if asyncio.get_running_loop().time() + delay_ms / 1000 < self._next_look:
            self.writer.wait_durable(batch, self._wake.set)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        # Rows claimed by incarnations that died while no node was up to
        # clean up after them (later deaths: release_dead_hook).
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT epoch FROM roost_nodes WHERE dead FOR UPDATE")
            epochs = [r[0] for r in await cur.fetchall()]
            if epochs:
                await held.release_held(conn, epochs)
        self.writer.on_hold = self._held

    def run(self) -> None:
        """Start routing, once the definitions are loaded: a held message
        is routed through its exchange as this node knows it."""
        if self._task is None:
            self._task = asyncio.create_task(self._move(), name="roost-delayed-mover")

    async def close(self) -> None:
        self.writer.on_hold = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- the mover ----------------------------------------------------------

    async def _move(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_INTERVAL
        while True:
            wait = self.poll_interval
            try:
                async with self.pool.connection() as conn:
                    if loop.time() >= next_prune:
                        next_prune = loop.time() + PRUNE_INTERVAL
                        await conn.execute(PRUNE_KEYS_SQL, (PRUNE_BATCH,))
                    back = await held.retries_back(conn, ROUTE_BATCH)
                    due = await held.claim_due(conn, self.epoch, ROUTE_BATCH)
                    if due:
                        self._route(due)
                    if len(due) >= ROUTE_BATCH or back >= ROUTE_BATCH:
                        wait = 0.0  # a backlog: the next slice at once
                    else:
                        ms = await held.next_due_in(conn)
                        if ms is not None:
                            # Due already but not claimed just now: it fell
                            # due meanwhile, or this node cannot take it (its
                            # exchange unknown here, this epoch fenced); a
                            # short pause, not a busy loop.
                            wait = min(max(ms, DUE_AGAIN_MS) / 1000, self.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("routing delayed messages: %s", exc)
            self._next_look = loop.time() + wait
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            else:
                await asyncio.sleep(0)  # let connections be served between slices

    def _route(self, due: list[held.Due]) -> None:
        """Route claimed held messages, all in the writer's open batch (this
        runs in one event-loop step), each row requiring its held row's
        fenced delete."""
        writer, epoch = self.writer, self.epoch
        claimed: dict[bool, list[int]] = {False: [], True: []}
        unknown: dict[bool, list[int]] = {False: [], True: []}
        for d in due:
            vhost = self.broker.vhosts.get(d.vhost)
            exchange = vhost.exchanges.get(d.exchange) if vhost is not None else None
            if exchange is None:
                # Not known here yet (a deleted exchange takes its held
                # rows with its own row): another node, or a later look.
                unknown[d.transient].append(d.id)
                continue
            claimed[d.transient].append(d.id)
            if vhost is not None and isinstance(exchange, DelayedExchange):
                scanned = properties.scan(d.properties)
                message = released(
                    Message(
                        d.exchange,
                        d.routing_key,
                        d.properties,
                        d.body,
                        scanned.delivery_mode == 2,
                        scanned.priority,
                    ),
                    tuple(d.cc),
                )
                message.requires = (d.id,)
                vhost.publish(exchange, message, origin=DELAYED)
                self.routed += 1
            # else: no longer a delayed exchange: dropped.
            writer.release_held_nowait([d.id], epoch, d.transient)
        if unknown[False] or unknown[True]:
            self._chore(self._unclaim(unknown, epoch, wake=False))
        batch = writer.barrier()
        writer.wait_durable(batch, functools.partial(self._routed, batch, claimed, epoch))

    def _routed(self, batch: int, claimed: dict[bool, list[int]], epoch: int) -> None:
        if self.writer.failure(batch) is None:
            return
        # Not written (or perhaps not): claimable again. Fenced, and only
        # rows still held, so a batch that did commit leaves nothing to undo.
        self._chore(self._unclaim(claimed, epoch))

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _unclaim(self, claimed: dict[bool, list[int]], epoch: int, wake: bool = True) -> None:
        try:
            async with self.pool.connection() as conn:
                await held.unclaim(conn, claimed, epoch)
        except Exception as exc:
            # Given back when this incarnation is declared dead instead.
            log.warning("giving back delayed messages: %s", exc)
        if wake:
            self._wake.set()


async def release_dead_hook(epoch: int, conn: psycopg.AsyncConnection[Any]) -> None:
    """``on_node_dead``: the dead epoch's claimed held rows are claimable
    again (on the cleanup transaction's connection)."""
    await held.release_held(conn, [epoch])
