"""What each node publishes for the management API of the others, and what
goes with a node's incarnation.

Connections, channels and consumers exist only in the memory of the node
that serves them. Every :data:`PUBLISH_INTERVAL` seconds a node writes
its view (``roost.http.cluster_view.local_view``) into its row of
``roost_node_views`` (keyed by epoch; written only when it changed, and
fenced: a dead incarnation writes nothing). The node answering an API
request reads the live nodes' rows (:meth:`NodeViews.snapshot`) and
merges them with its own live objects. A node declared dead, or leaving,
loses its row in its cleanup transaction (:func:`forget_incarnation`),
and the readers skip rows of dead nodes anyway, so its connections are
gone from every listing from the moment it is declared dead.

Closing another node's connection is a ``NOTIFY roost_close_connection``
naming the epoch and the connection; that node closes it.

The same cleanup deletes the non-durable queues whose home
(``roost_queues.home_epoch``: the incarnation that declared them) is the
dead one: in RabbitMQ a non-durable queue goes with its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from roost.cluster.nodes import AsyncConn, NodeRegistry, drop_queues
from roost.http.cluster_view import ClusterSnapshot, PeerView, peer_queues

log = logging.getLogger("roost.cluster")

# How often a node publishes its view: how stale another node's listing of
# this node's connections may be.
PUBLISH_INTERVAL = 2.0
# Readers share one read for this long (a dashboard asks for several
# listings at once).
SNAPSHOT_CACHE = 0.5
# A listing waits this long for the others' views, then shows this node
# alone (PostgreSQL out of reach: the pool would wait the node timeout).
READ_TIMEOUT = 2.0
CLOSE_CHANNEL = "roost_close_connection"
RECONNECT_DELAY = 1.0

_COLUMNS = ("connections", "channels", "consumers", "queues", "stats")

# A queue is a non-durable queue of the incarnation when it is its home.
_HOMED = "home_epoch = %s AND NOT durable"
# Non-durable queues whose home is gone (a node that wrote one after it was
# declared dead and cleaned up, before it noticed): no cleanup will come
# for them.
_ORPHANED = (
    "home_epoch IS NOT NULL AND NOT durable AND NOT EXISTS (SELECT 1 FROM roost_nodes n"
    " WHERE n.epoch = home_epoch AND (NOT n.dead OR n.cleaned_at IS NULL))"
)


async def forget_incarnation(epoch: int, conn: AsyncConn) -> None:
    """The registry's ``on_node_dead`` hook: the incarnation's published
    view and its non-durable queues go (idempotent)."""
    await conn.execute("DELETE FROM roost_node_views WHERE epoch = %s", (epoch,))
    dropped = await drop_queues(conn, _HOMED, (epoch,))
    if dropped:
        log.info("cluster: deleted %d non-durable queue(s) of epoch %d", dropped, epoch)


class NodeViews:
    """Publishes this node's view, reads the others', and closes this
    node's connections when another node asks. Implements
    ``roost.http.cluster_view.ClusterView``."""

    def __init__(
        self,
        registry: NodeRegistry,
        collect: Callable[[], dict[str, Any]],
        close_local: Callable[[str, str], object],
        *,
        interval: float = PUBLISH_INTERVAL,
    ) -> None:
        self.registry = registry
        self.collect = collect
        self.close_local = close_local
        self.interval = interval
        self._tasks: list[asyncio.Task[None]] = []
        self._published: tuple[int, list[str]] | None = None  # (epoch, columns' JSON)
        self._cached: tuple[float, ClusterSnapshot] | None = None
        self._reading: asyncio.Task[ClusterSnapshot] | None = None

    async def start(self) -> None:
        pool = self.registry.pool
        assert pool is not None
        with contextlib.suppress(psycopg.Error, OSError):
            # RabbitMQ's cluster name defaults to its first node's name.
            async with pool.connection() as conn:
                await conn.execute(
                    "UPDATE roost_cluster SET cluster_name = %s WHERE cluster_name = ''",
                    (self.registry.name,),
                )
            await self.publish()
        self._tasks = [
            asyncio.create_task(self._run(), name="roost-node-views"),
            asyncio.create_task(self._listen(), name="roost-close-listener"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    # -- publishing ----------------------------------------------------------

    async def publish(self) -> bool:
        """Write this node's view when it changed; returns whether it wrote."""
        epoch = self.registry.epoch
        pool = self.registry.pool
        if pool is None or not self.registry.is_current():
            return False
        view = self.collect()
        texts = [json.dumps(view[c], default=str, separators=(",", ":")) for c in _COLUMNS]
        if self._published == (epoch, texts):
            return False
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO roost_node_views (epoch, connections, channels, consumers, queues,"
                " stats) SELECT %s, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb"
                f" WHERE {NodeRegistry.fence_sql()} ON CONFLICT (epoch) DO UPDATE SET"
                " taken_at = now(), connections = EXCLUDED.connections,"
                " channels = EXCLUDED.channels, consumers = EXCLUDED.consumers,"
                " queues = EXCLUDED.queues, stats = EXCLUDED.stats",
                (epoch, *texts, epoch),
            )
        self._published = (epoch, texts)
        return True

    async def drop_orphans(self) -> int:
        """Delete non-durable queues whose home incarnation is gone."""
        pool = self.registry.pool
        if pool is None:
            return 0
        async with pool.connection() as conn, conn.transaction():
            return await drop_queues(conn, _ORPHANED, ())

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.interval)
            ticks += 1
            try:
                await self.publish()
                # Rare (a fenced node's late write): looked for now and then.
                if ticks % 15 == 0 and await self.drop_orphans():
                    log.info("cluster: deleted non-durable queues of vanished nodes")
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("cluster: publishing this node's view failed: %s", exc)
            except Exception:
                log.exception("cluster: publishing this node's view failed")

    # -- reading ---------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < SNAPSHOT_CACHE:
            return self._cached[1]
        if self._reading is None or self._reading.done():
            # A read left behind by a reader that timed out is stale by now.
            self._reading = asyncio.get_running_loop().create_task(self._read())
            self._reading.add_done_callback(_retrieve)
        reading = self._reading
        try:
            snap = await asyncio.wait_for(asyncio.shield(reading), READ_TIMEOUT)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("cluster: cannot read the other nodes' views: %s", exc)
            return ClusterSnapshot("", [])
        finally:
            if self._reading is reading and reading.done():
                self._reading = None
        self._cached = (time.monotonic(), snap)
        return snap

    async def _read(self) -> ClusterSnapshot:
        pool = self.registry.pool
        if pool is None:
            return ClusterSnapshot("", [])
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT n.epoch, n.name, n.amqp_address, n.http_address, v.connections,"
                " v.channels, v.consumers, v.queues, v.stats FROM roost_nodes n"
                " LEFT JOIN roost_node_views v ON v.epoch = n.epoch"
                " WHERE NOT n.dead AND n.epoch <> %s ORDER BY n.name, n.epoch",
                (self.registry.epoch,),
            )
            peers = [
                PeerView(
                    epoch=int(str(r[0])),
                    node=str(r[1]),
                    amqp_address=str(r[2]),
                    http_address=str(r[3]),
                    connections=_list(r[4]),
                    channels=_list(r[5]),
                    consumers=_list(r[6]),
                    queues=peer_queues(r[7]),
                    stats=r[8] if isinstance(r[8], dict) else {},
                )
                for r in await cur.fetchall()
            ]
            cur = await conn.execute(
                "SELECT q.vhost, q.name, n.name FROM roost_queues q JOIN roost_nodes n"
                " ON n.epoch = coalesce(q.owner_epoch, q.home_epoch)"
                " WHERE q.owner_epoch IS NOT NULL OR q.home_epoch IS NOT NULL"
            )
            homes = {(str(r[0]), str(r[1])): str(r[2]) for r in await cur.fetchall()}
            cur = await conn.execute("SELECT cluster_name FROM roost_cluster")
            got = await cur.fetchone()
        return ClusterSnapshot(str(got[0]) if got else "", peers, homes)

    # -- closing connections of other nodes -------------------------------------

    async def close_connection(self, epoch: int, name: str, reason: str) -> None:
        pool = self.registry.pool
        assert pool is not None
        payload = json.dumps({"epoch": epoch, "name": name, "reason": reason})
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CLOSE_CHANNEL, payload))

    async def _listen(self) -> None:
        while True:
            try:
                conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                    self.registry.url, autocommit=True, application_name="roost-close-listener"
                )
                async with conn:
                    await conn.execute(f"LISTEN {CLOSE_CHANNEL}")
                    async for note in conn.notifies():
                        self._close_requested(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s: %s; reconnecting", CLOSE_CHANNEL, exc)
                await asyncio.sleep(RECONNECT_DELAY)

    def _close_requested(self, payload: str) -> None:
        try:
            request = json.loads(payload)
            epoch, name = int(request["epoch"]), str(request["name"])
            reason = str(request.get("reason", "Closed via management plugin"))
        except (ValueError, KeyError, TypeError):
            return
        if epoch == self.registry.epoch:
            self.close_local(name, reason)


def _retrieve(task: asyncio.Task[ClusterSnapshot]) -> None:
    # A read nobody waits for any more: its failure was logged by a reader
    # (or will be by the next one), not "never retrieved".
    if not task.cancelled():
        task.exception()


def _list(value: object) -> list[dict[str, Any]]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []
