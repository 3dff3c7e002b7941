"""The node registry: who is in the cluster, who is alive, and fencing.

Each start of a node is an *incarnation* with an epoch of its own (a row of
``roost_nodes``). The node heartbeats every ``timeout / 3`` seconds, and
every heartbeat is also a fencing check::

    UPDATE roost_nodes SET heartbeat_at = now() WHERE epoch = %s AND NOT dead

When no row comes back, another node has declared this incarnation dead
(it was paused, or cut off from PostgreSQL, for longer than the timeout)
and has cleaned up after it. The incarnation is over: the ``on_fenced``
hooks run first (the server closes every client connection with 320), then
the node registers again under a new epoch and the ``on_registered`` hooks
run.

Any node declares dead the nodes whose heartbeat is older than the timeout,
by PostgreSQL's clock (the nodes' own clocks are never compared), and
cleans up after each dead incarnation once, in one transaction: its
exclusive queues are deleted and the ``on_node_dead`` hooks (the message
layer's release of that epoch's claims) run on the same connection, so
that the cleanup commits whole or not at all and is retried by the next
sweep.

For the message layer, :meth:`NodeRegistry.fence_sql` is the condition
every claim or ack adds, so that a statement of a dead incarnation changes
nothing even when the node has not noticed yet::

    UPDATE roost_messages SET owner = %(epoch)s WHERE ... AND EXISTS
        (SELECT 1 FROM roost_nodes WHERE epoch = %(epoch)s AND NOT dead FOR KEY SHARE)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg_pool import AsyncConnectionPool

from roost.cluster import schema
from roost.cluster.errors import ClusterError

log = logging.getLogger("roost.cluster")

# LISTEN/NOTIFY channel on which definition changes are announced (also
# used by the sweep after deleting a dead node's exclusive queues).
DEFINITIONS_CHANNEL = "roost_definitions"

# How long rows of dead, cleaned-up incarnations are kept.
PRUNE_AFTER = "1 hour"

AsyncConn = psycopg.AsyncConnection[tuple[object, ...]]
# Called inside the cleanup transaction of a dead epoch with its
# connection, which holds the epoch's roost_nodes row FOR UPDATE: run every
# statement on it (one on another connection that locks that row would
# wait for this transaction, which waits for the hook). Must be idempotent:
# a cleanup that fails is rolled back and done again by the next sweep.
NodeDeadHook = Callable[[int, AsyncConn], Awaitable[object]]


@dataclass(frozen=True)
class NodeInfo:
    """One live node, as /api/nodes shows it."""

    epoch: int
    name: str
    started_at: datetime
    heartbeat_at: datetime
    amqp_address: str
    http_address: str
    uptime_ms: int  # by PostgreSQL's clock


class NodeRegistry:
    def __init__(
        self,
        url: str,
        name: str,
        timeout: int,
        *,
        amqp_address: str = "",
        http_address: str = "",
    ) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self.amqp_address = amqp_address
        self.http_address = http_address
        self.epoch = 0
        self._fenced = True  # until registered
        # Hooks; see the module docstring for when each runs.
        self.on_fenced: list[Callable[[], Awaitable[None]]] = []
        self.on_registered: list[Callable[[int], Awaitable[None]]] = []
        self.on_node_dead: list[NodeDeadHook] = []
        # Called after each heartbeat that committed (registering counts),
        # with the time.monotonic() taken before it was sent: no other node
        # can find this incarnation silent before ``sent + timeout`` (the
        # message layer's delivery lease).
        self.on_beat: list[Callable[[float], None]] = []
        # What the last on_beat call was given (for a hook added later).
        self.last_beat_sent = 0.0
        self.pool: AsyncConnectionPool[AsyncConn] | None = None
        # The heartbeat's own connection: never queued behind other work.
        self._beat_conn: AsyncConn | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_beat = 0.0  # time.monotonic() of the last heartbeat that held
        # No judging of other nodes before this time.monotonic() (see beat()).
        self._sweep_after = 0.0
        self._fencing: asyncio.Task[None] | None = None

    # -- for the message layer -------------------------------------------

    def is_current(self) -> bool:
        """Whether this incarnation is, as far as this node knows, alive.
        False from the moment a heartbeat found it declared dead until it
        has registered again. PostgreSQL is the authority: statements that
        must not run for a dead incarnation add :meth:`fence_sql`."""
        return not self._fenced

    @staticmethod
    def fence_sql(param: str = "%s") -> str:
        """The condition that makes a statement a no-op once the epoch bound
        to ``param`` is dead. FOR KEY SHARE: a statement that passed the
        check holds the node's row until it commits, and the dead node's
        cleanup (FOR UPDATE on that row) waits for it, so no claim of the
        dead incarnation lands after its claims were released."""
        return (
            f"EXISTS (SELECT 1 FROM roost_nodes WHERE epoch = {param} AND NOT dead FOR KEY SHARE)"
        )

    # -- life cycle --------------------------------------------------------

    async def start(self) -> None:
        """Migrate the schema, open the pool, register and start the
        heartbeat and sweeps. Raises ClusterError when PostgreSQL cannot be
        reached or the schema is newer than this roost."""
        try:
            await asyncio.to_thread(self._migrate)
            self.pool = AsyncConnectionPool(
                self.url,
                min_size=1,
                max_size=4,
                kwargs={"autocommit": True},
                open=False,
                name="roost",
                # Waiting longer for a connection than a node may stay silent
                # helps nobody (the default is 30 s).
                timeout=self.timeout,
            )
            await self.pool.open(wait=True, timeout=self.timeout)
            await self._register()
            # An earlier incarnation this one took over goes now (or, should
            # that fail, with the next sweep).
            with contextlib.suppress(TimeoutError):
                await self.clean_dead()
        except (psycopg.Error, OSError) as exc:
            await self._close_connections()
            raise ClusterError(f"cannot use the cluster database: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        self._task = asyncio.get_running_loop().create_task(self._run(), name="roost-heartbeat")

    def _migrate(self) -> None:
        try:
            with psycopg.connect(self.url, connect_timeout=self.timeout) as conn:
                schema.migrate(conn)
        except schema.SchemaTooNew as exc:
            raise ClusterError(str(exc)) from None

    async def _register(self) -> None:
        conn = await self._heartbeat_connection()
        sent = time.monotonic()
        async with conn.transaction():
            # A node that restarts (after a crash, a kill) takes over from
            # its earlier incarnation at once rather than after the timeout:
            # that one is declared dead here, and cleaned up by the next
            # sweep. Two running nodes given the same name would fence each
            # other in turn; the warning says why.
            cur = await conn.execute(
                "UPDATE roost_nodes SET dead = true WHERE name = %s AND NOT dead RETURNING epoch",
                (self.name,),
            )
            for (earlier,) in await cur.fetchall():
                log.warning(
                    "cluster node %s: taking over from its earlier incarnation (epoch %s); "
                    "if another running node has this name, give each node its own "
                    "--node-name",
                    self.name,
                    earlier,
                )
            cur = await conn.execute(
                "INSERT INTO roost_nodes (name, amqp_address, http_address)"
                " VALUES (%s, %s, %s) RETURNING epoch",
                (self.name, self.amqp_address, self.http_address),
            )
            row = await cur.fetchone()
        assert row is not None
        self.epoch = int(str(row[0]))
        self._fenced = False
        self._last_beat = time.monotonic()
        log.info("cluster node %s registered as epoch %d", self.name, self.epoch)
        self._beaten(sent)

    async def set_addresses(self, amqp_address: str, http_address: str) -> None:
        """Record where this node listens (known only once it does)."""
        self.amqp_address, self.http_address = amqp_address, http_address
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE roost_nodes SET amqp_address = %s, http_address = %s WHERE epoch = %s",
                (amqp_address, http_address, self.epoch),
            )

    async def leave(self) -> None:
        """A clean stop: declare this incarnation dead at once (no waiting
        for the timeout) and clean up after it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fencing is not None and not self._fencing.done():
            self._fencing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fencing
        if self.pool is not None and self.epoch and not self._fenced:
            self._fenced = True
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "UPDATE roost_nodes SET dead = true WHERE epoch = %s", (self.epoch,)
                    )
                await self.clean_dead()
            except (psycopg.Error, TimeoutError) as exc:
                log.error("cluster: could not leave cleanly (the others will time it out): %s", exc)
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._beat_conn is not None:
            await self._beat_conn.close()
            self._beat_conn = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- heartbeat and sweeps ----------------------------------------------

    @property
    def interval(self) -> float:
        return self.timeout / 3

    async def _heartbeat_connection(self) -> AsyncConn:
        if self._beat_conn is None or self._beat_conn.closed:
            self._beat_conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.interval))
            )
        return self._beat_conn

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                # The fencing check comes first: a node that wakes from a
                # pause must learn that it is dead before it judges others.
                await asyncio.wait_for(self.beat(), self.interval)
                if self.judging:
                    await asyncio.wait_for(self.sweep(), self.timeout)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("cluster heartbeat failed: %s", exc)
                if self._beat_conn is not None:
                    await self._beat_conn.close()
                    self._beat_conn = None
            except Exception:
                log.exception("cluster heartbeat failed")

    @property
    def judging(self) -> bool:
        """Whether this node's sweeps declare other nodes dead: not for a
        timeout after the database was out of its reach (see beat())."""
        return time.monotonic() >= self._sweep_after

    async def beat(self) -> bool:
        """One heartbeat. Returns False when this incarnation had been
        declared dead (it has then been replaced by a new one)."""
        if self._fencing is not None and not self._fencing.done():
            # A fencing cut short by the caller's timeout goes on: wait for
            # it rather than beat for the epoch it is replacing.
            await asyncio.shield(self._fencing)
            return False
        conn = await self._heartbeat_connection()
        sent = time.monotonic()
        cur = await conn.execute(
            "UPDATE roost_nodes SET heartbeat_at = now() WHERE epoch = %s AND NOT dead"
            " RETURNING epoch",
            (self.epoch,),
        )
        if await cur.fetchone() is not None:
            now = time.monotonic()
            if now - self._last_beat > self.timeout:
                # Back after PostgreSQL was out of reach for longer than the
                # timeout: so were the other nodes, most likely, and their
                # heartbeats are as stale as this one's was. Give them a
                # timeout's time to beat before judging them dead.
                self._sweep_after = now + self.timeout
                log.warning(
                    "cluster: the database is reachable again after %.0fs; declaring no "
                    "node dead for %ds",
                    now - self._last_beat,
                    self.timeout,
                )
            self._last_beat = now
            self._beaten(sent)
            return True
        # Shielded from the caller's timeout (the heartbeat's is a third of
        # the node timeout): a fencing cancelled half-way would leave the
        # connections open or the message layer on the dead epoch.
        self._fencing = asyncio.get_running_loop().create_task(self._fence())
        await asyncio.shield(self._fencing)
        return False

    def _beaten(self, sent: float) -> None:
        self.last_beat_sent = sent
        for hook in list(self.on_beat):
            try:
                hook(sent)
            except Exception:
                log.exception("cluster: a heartbeat hook failed")

    async def _fence(self) -> None:
        self._fenced = True
        log.error(
            "cluster node %s: epoch %d was declared dead by the cluster (paused or cut off "
            "for more than %ds); closing its connections and registering again",
            self.name,
            self.epoch,
            self.timeout,
        )
        for hook in list(self.on_fenced):
            try:
                await hook()
            except Exception:
                log.exception("cluster: a fencing hook failed")
        await self._register()
        for registered in list(self.on_registered):
            try:
                await registered(self.epoch)
            except Exception:
                log.exception("cluster: a registration hook failed")

    async def sweep(self) -> list[int]:
        """Declare dead the nodes silent for longer than the timeout, then
        clean up after dead nodes. Returns the epochs declared dead now."""
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE roost_nodes SET dead = true WHERE NOT dead"
                " AND heartbeat_at < now() - make_interval(secs => %s)"
                " RETURNING epoch, name",
                (self.timeout,),
            )
            declared = [(int(str(r[0])), str(r[1])) for r in await cur.fetchall()]
            # Dead incarnations are kept a while, to be seen (and, for the
            # fencing check, a missing row reads as dead anyway).
            await conn.execute(
                "DELETE FROM roost_nodes n WHERE dead AND cleaned_at < now() - %s::interval"
                " AND NOT EXISTS (SELECT 1 FROM roost_queues q WHERE q.owner_epoch = n.epoch)",
                (PRUNE_AFTER,),
            )
        for epoch, name in declared:
            log.warning("cluster node %s (epoch %d) declared dead: no heartbeat", name, epoch)
        await self.clean_dead()
        return [e for e, _ in declared]

    async def clean_dead(self) -> list[int]:
        """Clean up after each dead, not yet cleaned incarnation (each once,
        cluster-wide: others skip the rows this node has locked)."""
        assert self.pool is not None
        cleaned: list[int] = []
        while True:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "SELECT epoch FROM roost_nodes WHERE dead AND cleaned_at IS NULL"
                    " ORDER BY epoch LIMIT 1 FOR UPDATE SKIP LOCKED"
                )
                row = await cur.fetchone()
                if row is None:
                    return cleaned
                epoch = int(str(row[0]))
                # The message layer first: its statements may need rows
                # (queues) that the deletions below cascade over.
                for hook in list(self.on_node_dead):
                    try:
                        await asyncio.wait_for(hook(epoch, conn), self.timeout)
                    except TimeoutError:
                        # Rolled back, retried by the next sweep.
                        log.error(
                            "cluster: cleaning up after epoch %d: a node-dead hook did not "
                            "finish in %ds (a statement on another connection waiting for "
                            "this transaction's lock on the node's row?)",
                            epoch,
                            self.timeout,
                        )
                        raise
                dropped = await drop_exclusive_queues(conn, epoch)
                await conn.execute(
                    "UPDATE roost_nodes SET cleaned_at = now() WHERE epoch = %s", (epoch,)
                )
            cleaned.append(epoch)
            if dropped:
                log.info("cluster: deleted %d exclusive queue(s) of dead epoch %d", dropped, epoch)

    async def live_nodes(self) -> list[NodeInfo]:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT epoch, name, started_at, heartbeat_at, amqp_address, http_address,"
                " (extract(epoch FROM now() - started_at) * 1000)::bigint"
                " FROM roost_nodes WHERE NOT dead ORDER BY name, epoch"
            )
            rows = await cur.fetchall()
        return [
            NodeInfo(
                epoch=int(str(r[0])),
                name=str(r[1]),
                started_at=r[2],  # type: ignore[arg-type]
                heartbeat_at=r[3],  # type: ignore[arg-type]
                amqp_address=str(r[4]),
                http_address=str(r[5]),
                uptime_ms=int(str(r[6])),
            )
            for r in rows
        ]


async def drop_exclusive_queues(conn: AsyncConn, epoch: int) -> int:
    """Delete the exclusive queues (and bindings to them) owned by a dead
    epoch, announcing the change; inside the caller's transaction."""
    return await drop_queues(conn, "owner_epoch = %s", (epoch,))


async def drop_queues(conn: AsyncConn, where: str, params: tuple[object, ...]) -> int:
    """Delete the queues ``where`` selects (and the bindings to them),
    announcing the change; inside the caller's transaction."""
    cur = await conn.execute(f"SELECT 1 FROM roost_queues WHERE {where} LIMIT 1".encode(), params)
    if await cur.fetchone() is None:
        return 0
    # The definitions lock first, as every definitions write takes it: a
    # binding to one of these queues written meanwhile is then either seen
    # (and deleted) or refused (its queue gone), never left behind.
    cur = await conn.execute(
        "UPDATE roost_cluster SET definitions_version = definitions_version + 1"
        " RETURNING definitions_version"
    )
    version = await cur.fetchone()
    assert version is not None
    cur = await conn.execute(
        f"DELETE FROM roost_queues WHERE {where} RETURNING vhost, name".encode(), params
    )
    gone = await cur.fetchall()
    vhosts, names = [str(r[0]) for r in gone], [str(r[1]) for r in gone]
    await conn.execute(
        "DELETE FROM roost_bindings b USING unnest(%s::text[], %s::text[]) AS g(vhost, name)"
        " WHERE b.vhost = g.vhost AND b.destination_type = 'queue' AND b.destination = g.name",
        (vhosts, names),
    )
    # The change log's scopes (roost.cluster.changes): each queue, with the
    # bindings to it.
    await conn.execute(
        "INSERT INTO roost_definition_changes (version, scope)"
        " SELECT %s, ARRAY['queue', g.vhost, g.name] FROM unnest(%s::text[], %s::text[])"
        " AS g(vhost, name)",
        (version[0], vhosts, names),
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (DEFINITIONS_CHANNEL, "0"))
    return len(gone)
