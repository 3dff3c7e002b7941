"""Shared definitions: the cluster-mode counterpart of DurableState's
definitions.json.

Users, vhosts, permissions, exchanges, queues (transient and exclusive
ones too: every node routes to every queue) and bindings live in
PostgreSQL. Each node keeps its broker model as a cache of the tables:

- A change on this node (``broker.on_definitions_changed``) wakes the
  worker, which diffs the model against what it last wrote or read (the
  *base*), applies the difference in one transaction that also bumps
  ``roost_cluster.definitions_version`` and sends ``NOTIFY
  roost_definitions '<epoch>:<version>'``. The callbacks waiting on the
  change (declare-ok, bind-ok, a 2xx of the HTTP API) run only after the
  COMMIT *and* once every other live node has announced that it applied
  that version (``NOTIFY roost_definitions_applied``), so that what a
  client was told exists on one node exists on all of them: a queue
  declared on A can be used on B right after declare-ok. A node that does
  not announce within the node timeout is not waited for any longer (it
  is about to be declared dead).
- A notification from another node makes the worker read the tables (one
  REPEATABLE READ snapshot) and reconcile the model (:mod:`reconcile`),
  then announce the version it has applied.

Writes and reloads are done by one task, one at a time, so the base
always describes the tables as of the last of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import psycopg

from roost.broker.broker import Broker
from roost.broker.queue import Queue
from roost.cluster import changes, store
from roost.cluster.errors import ClusterError
from roost.cluster.nodes import DEFINITIONS_CHANNEL, AsyncConn, NodeRegistry
from roost.cluster.reconcile import reconcile
from roost.cluster.rows import Key, Owners, RemoteOwner, Rows, snapshot

log = logging.getLogger("roost.cluster")

APPLIED_CHANNEL = "roost_definitions_applied"
# pg_advisory_xact_lock key under which a brand-new database gets its
# default vhost and user ("roostdef").
SEED_LOCK = 0x726F6F7374646566
# Catching up reads the change log; every so often everything instead, so
# that a change that could not be applied here is tried again.
FULL_READ_EVERY = 300.0
# How often a wait for the other nodes looks at who is still alive.
_ACK_POLL = 0.25


class ClusterDefinitions:
    def __init__(self, registry: NodeRegistry, broker: Broker) -> None:
        self.registry = registry
        self.broker = broker
        self.owners = Owners()
        self.base: Rows = {}
        self.version = 0  # the definitions version the model has applied
        # roost_queues.id by ("queue", vhost, name): the key of a queue's
        # messages for the message layer.
        self.queue_ids: dict[Key, int] = {}
        # Called (synchronously) whenever queue ids may have been added or
        # changed: after a write committed and after a reload was applied.
        self.on_queue_ids: list[Callable[[], None]] = []
        # The queue object each row of the base stands for: a queue deleted
        # and declared again has the same row but is a new queue.
        self._queue_objects: dict[Key, Queue] = {}
        self._next_full_read = 0.0  # time.monotonic()
        self._applying = False
        self._reload_wanted = False
        self._wake = asyncio.Event()
        self._acks = asyncio.Event()  # set whenever another node announces
        self.applied: dict[int, int] = {}  # epoch -> version it announced
        self._written_generation = 0
        self._released_generation = 0
        # Reached by reloads while a write was waiting for acknowledgements.
        self._deferred_release = 0
        self._waiters: list[tuple[int, Callable[[], None]]] = []
        self._listen_conn: AsyncConn | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ack_tasks: set[asyncio.Task[None]] = set()

    def queue_id(self, vhost: str, name: str) -> int | None:
        return self.queue_ids.get(("queue", vhost, name))

    def identified_queues(self) -> list[tuple[Queue, int]]:
        """The model's queues whose row is known, with its id: a queue
        declared here is not until its write committed, and one deleted
        and declared again here keeps the old row's id (which is not its
        own) until then, so it is left out too."""
        objects = self._queue_objects
        found = []
        for vname, vh in self.broker.vhosts.items():
            for q in vh.queues.values():
                key = ("queue", vname, q.name)
                qid = self.queue_ids.get(key)
                if qid is not None and objects.get(key) is q:
                    found.append((q, qid))
        return found

    def _ids_changed(self) -> None:
        for hook in list(self.on_queue_ids):
            try:
                hook()
            except Exception:
                log.exception("cluster: a queue-id hook failed")

    # -- life cycle --------------------------------------------------------

    async def start(self) -> None:
        """Load the definitions into the (fresh) broker model and keep it in
        step from now on. The registry must be started."""
        broker = self.broker
        self.owners.epoch = self.registry.epoch
        broker.clustered = True
        for vh in broker.vhosts.values():
            vh.clustered = True
        try:
            # LISTEN before the first read: no change may fall between them.
            self._listen_conn = await self._listen()
            # The fresh model is the base: what the tables lack of it (the
            # default vhost and user, once deleted) goes from the model.
            self.base = snapshot(broker, self.owners)
            await self._seed()
            await self._reload()
        except (psycopg.Error, OSError) as exc:
            if self._listen_conn is not None:
                await self._listen_conn.close()
                self._listen_conn = None
            raise ClusterError(f"cannot load the cluster's definitions: {exc}") from exc
        self._written_generation = broker.definitions_generation
        self._released_generation = broker.definitions_generation
        broker.on_definitions_changed = self._changed
        broker.definitions_saved_hook = self._when_saved
        self.registry.on_fenced.append(self._fenced)
        self.registry.on_registered.append(self._registered)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._work(), name="roost-definitions"),
            loop.create_task(self._receive(), name="roost-definitions-listen"),
            loop.create_task(self._refresh(), name="roost-definitions-refresh"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is still pending (exclusive queues of connections
        just closed), then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.broker.definitions_generation > self._written_generation:
                    self._wake.set()
                    await asyncio.sleep(0.02)
        for task in [*self._tasks, *self._ack_tasks]:
            task.cancel()
        for task in [*self._tasks, *self._ack_tasks]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._listen_conn is not None:
            await self._listen_conn.close()
            self._listen_conn = None

    # -- the broker's hooks ------------------------------------------------

    def _changed(self) -> None:
        if not self._applying:
            self._wake.set()

    def _when_saved(self, generation: int, callback: Callable[[], None]) -> None:
        if generation <= self._released_generation:
            callback()
        else:
            self._waiters.append((generation, callback))

    def _release(self, generation: int) -> None:
        if generation <= self._released_generation:
            return
        self._released_generation = generation
        ready = [w for w in self._waiters if w[0] <= generation]
        self._waiters = [w for w in self._waiters if w[0] > generation]
        for _, callback in ready:
            callback()

    def _release_unwritten(self, generation: int) -> None:
        """Everything up to ``generation`` is in the tables without a write
        of this node's own to wait for."""
        if self._ack_tasks:
            # A write is waiting for the other nodes: releasing now would
            # let its declare-ok overtake them. The end of its wait does it.
            self._deferred_release = max(self._deferred_release, generation)
        else:
            self._release(generation)

    # -- the worker --------------------------------------------------------

    async def _work(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while (
                    self._reload_wanted
                    or self.broker.definitions_generation > self._written_generation
                ):
                    if self._reload_wanted:
                        self._reload_wanted = False
                        await self._reload()
                    if self.broker.definitions_generation > self._written_generation:
                        await self._flush()
                failures = 0
            except Exception as exc:
                # The database is away or a write conflicted with another
                # node's (a permission for a user just deleted there): read
                # the tables again, then write what is still different.
                # Anything else is a bug, but this task must go on: every
                # declare-ok waits for it.
                failures += 1
                if isinstance(exc, (psycopg.Error, OSError)):
                    log.warning("cluster: writing definitions failed (will retry): %s", exc)
                else:
                    log.exception("cluster: syncing definitions failed (will retry)")
                self._reload_wanted = True
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                self._wake.set()

    async def _flush(self) -> None:
        generation = self.broker.definitions_generation
        rows = snapshot(self.broker, self.owners)
        queues = self._queues_now()
        replaced = self._replaced(queues)
        pool = self.registry.pool
        assert pool is not None
        if rows == self.base and not replaced:
            # Nothing to write (a change undone before it was written).
            self._written_generation = max(self._written_generation, generation)
            self._release_unwritten(generation)
            return
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE roost_cluster SET definitions_version = definitions_version + 1"
                " RETURNING definitions_version"
            )
            got = await cur.fetchone()
            assert got is not None
            version = int(str(got[0]))
            # Ids go into a copy, taken only once committed: a write rolled
            # back must not leave ids of rows that never were.
            queue_ids = dict(self.queue_ids)
            await store.write(
                conn, self.base, rows, queue_ids, version, replaced, self.registry.epoch
            )
            await conn.execute(
                "SELECT pg_notify(%s, %s)",
                (DEFINITIONS_CHANNEL, f"{self.registry.epoch}:{version}"),
            )
            # The nodes to wait for: those registered before this commit. A
            # node registering after it loads the tables as they are now.
            peers = await self._live_peers(conn)
        self.base = rows
        self.queue_ids = queue_ids
        self._queue_objects = queues
        # Before the waiting declare-ok can go out: the new queue gets its
        # message storage (cluster mode) before a client can publish to it.
        self._ids_changed()
        self._written_generation = max(self._written_generation, generation)
        task = asyncio.get_running_loop().create_task(
            self._acknowledged(generation, version, peers)
        )
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _acknowledged(self, generation: int, version: int, peers: set[int]) -> None:
        """Release the callbacks up to ``generation`` once every peer still
        alive has applied ``version`` (or the node timeout has passed)."""
        deadline = time.monotonic() + self.registry.timeout
        while True:
            if all(self.applied.get(epoch, 0) >= version for epoch in peers):
                break
            if time.monotonic() >= deadline:
                log.warning(
                    "cluster: definitions version %d not acknowledged by every node in %ds",
                    version,
                    self.registry.timeout,
                )
                break
            self._acks.clear()
            try:
                await asyncio.wait_for(self._acks.wait(), _ACK_POLL)
            except TimeoutError:
                # Slow to answer: still alive? A node declared dead is not
                # waited for any longer.
                pool = self.registry.pool
                if pool is not None:
                    with contextlib.suppress(psycopg.Error):
                        async with pool.connection() as conn:
                            peers &= await self._live_peers(conn)
        log.debug("cluster: definitions version %d acknowledged by %s", version, sorted(peers))
        self._release(generation)
        # Out of the set now, not in the done callback: two waits ending in
        # one turn of the loop would each still see the other, and the
        # deferred release would wait for a wait that never comes.
        current = asyncio.current_task()
        if current is not None:
            self._ack_tasks.discard(current)
        if not self._ack_tasks:
            self._release(self._deferred_release)

    async def _live_peers(self, conn: AsyncConn) -> set[int]:
        cur = await conn.execute(
            "SELECT epoch FROM roost_nodes WHERE NOT dead AND epoch <> %s", (self.registry.epoch,)
        )
        return {int(str(r[0])) for r in await cur.fetchall()}

    async def _seed(self) -> None:
        """On a brand-new database (no users, no vhosts) write the fresh
        model's defaults: the vhost "/" and the default user."""
        pool = self.registry.pool
        assert pool is not None
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SEED_LOCK,))
            cur = await conn.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM roost_users)"
                " AND NOT EXISTS (SELECT 1 FROM roost_vhosts)"
            )
            got = await cur.fetchone()
            if got is None or not got[0]:
                return
            cur = await conn.execute(
                "UPDATE roost_cluster SET definitions_version = definitions_version + 1"
                " RETURNING definitions_version"
            )
            got = await cur.fetchone()
            assert got is not None
            # The ids are read with everything else right after.
            await store.write(conn, {}, self.base, {}, int(str(got[0])))
            log.info("cluster: new database; created the default vhost and user")

    async def _reload(self) -> None:
        pool = self.registry.pool
        assert pool is not None
        full = self.version == 0 or time.monotonic() >= self._next_full_read
        async with pool.connection() as conn, conn.transaction():
            # One snapshot: the version, the changes up to it, the rows.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            version = await store.version(conn)
            scopes = None
            if not full and version >= self.version:
                scopes = await changes.since(conn, self.version, version)
            if scopes is None:
                remote, queue_ids = await store.read(conn)
            else:
                fetched, fetched_ids = await store.read(conn, changes.conditions(scopes))
        if scopes is None:
            self._next_full_read = time.monotonic() + FULL_READ_EVERY
        else:
            # The rest of the tables is as this node last wrote or read it.
            touched = changes.Matcher(scopes)
            remote = {k: row for k, row in self.base.items() if not touched(k)}
            remote.update(fetched)
            queue_ids = {k: i for k, i in self.queue_ids.items() if not touched(k)}
            queue_ids.update(fetched_ids)
        # From here to the end, no await: nothing changes the model meanwhile.
        self._applying = True
        try:
            pending = self._replaced(self._queues_now())
            merged = reconcile(self.broker, self.owners, self.base, remote, pending)
        finally:
            self._applying = False
        self.base = merged.base
        self.owners.retain(merged.model)
        self._track_queues(pending, merged.base)
        log.debug(
            "cluster: applied definitions version %d (%s)",
            version,
            "read everything" if scopes is None else f"{len(scopes)} changed scope(s)",
        )
        self.queue_ids = queue_ids
        self._ids_changed()
        self.version = max(self.version, version)
        if merged.model == merged.base:
            # Nothing local is pending: what reconciling changed needs no
            # write, and whoever waits on a change so far may go on.
            generation = self.broker.definitions_generation
            self._written_generation = max(self._written_generation, generation)
            self._release_unwritten(generation)
        async with pool.connection() as conn:
            await conn.execute(
                "SELECT pg_notify(%s, %s)", (APPLIED_CHANNEL, f"{self.registry.epoch}:{version}")
            )

    # -- queue identity ----------------------------------------------------

    def _queues_now(self) -> dict[Key, Queue]:
        return {
            ("queue", vname, q.name): q
            for vname, vh in self.broker.vhosts.items()
            for q in vh.queues.values()
        }

    def _replaced(self, queues: dict[Key, Queue]) -> frozenset[Key]:
        """Queues deleted and declared again here since they were written."""
        known = self._queue_objects
        return frozenset(k for k, q in queues.items() if k in known and known[k] is not q)

    def _track_queues(self, pending: frozenset[Key], base: Rows) -> None:
        """After a merge: the model's queues stand for the rows, but for
        local replacements and deletions still to be written."""
        old = self._queue_objects
        objects = {k: old[k] if k in pending else q for k, q in self._queues_now().items()}
        for k, q in old.items():
            if k not in objects and k in base:  # a deletion still to write
                objects[k] = q
        self._queue_objects = objects

    # -- notifications -----------------------------------------------------

    async def _listen(self) -> AsyncConn:
        conn = await psycopg.AsyncConnection.connect(self.registry.url, autocommit=True)
        await conn.execute(f"LISTEN {DEFINITIONS_CHANNEL}")
        await conn.execute(f"LISTEN {APPLIED_CHANNEL}")
        return conn

    async def _receive(self) -> None:
        while True:
            try:
                if self._listen_conn is None or self._listen_conn.closed:
                    self._listen_conn = await self._listen()
                    # Notifications sent while it was away are lost: read all.
                    self._request_reload()
                async for note in self._listen_conn.notifies():
                    self._notified(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster: lost the notification connection: %s", exc)
                if self._listen_conn is not None:
                    await self._listen_conn.close()
                    self._listen_conn = None
                await asyncio.sleep(1.0)

    def _notified(self, channel: str, payload: str) -> None:
        epoch_text, _, version_text = payload.partition(":")
        try:
            epoch = int(epoch_text)
            version = int(version_text or 0)
        except ValueError:
            return
        if channel == APPLIED_CHANNEL:
            if version > self.applied.get(epoch, 0):
                self.applied[epoch] = version
                self._acks.set()
        elif epoch != self.registry.epoch:
            self._request_reload()

    async def _refresh(self) -> None:
        """Read everything now and then even when nothing is announced: a
        row that could not be applied is tried again."""
        while True:
            await asyncio.sleep(FULL_READ_EVERY)
            self._request_reload()

    def _request_reload(self) -> None:
        self._reload_wanted = True
        self._wake.set()

    # -- fencing -----------------------------------------------------------

    async def _fenced(self) -> None:
        """This incarnation was declared dead: its exclusive queues are
        gone from the tables already (the sweep deleted them); drop them
        here too, cancelling their consumers."""
        for vh in self.broker.vhosts.values():
            for q in list(vh.queues.values()):
                owner = q.exclusive_owner
                if owner is not None and not isinstance(owner, RemoteOwner):
                    vh.remove_queue(q)

    async def _registered(self, epoch: int) -> None:
        self.owners.epoch = epoch
        self._request_reload()
