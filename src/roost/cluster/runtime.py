"""A node of a cluster, as the server runs it: the node registry and the
shared definitions, started and stopped together.

The message layer (``roost_messages``, the PostgreSQL backing queue) plugs
in between :meth:`ClusterNode.register` and :meth:`ClusterNode.load` (see
``Server._join_cluster``): it needs the registry's ``epoch`` (which changes
when the node is fenced and registers again: ``on_registered``),
``fence_sql``, the ``on_node_dead`` hook (given the cleanup transaction's
connection) and ``pool``; and the queues' ids
(:meth:`ClusterDefinitions.queue_id`), known once the definitions are
loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from roost.broker.broker import Broker
from roost.cluster import cluster_metrics
from roost.cluster.claims import release_dead
from roost.cluster.consumers import ClusterConsumers, SharedQueue
from roost.cluster.definitions import ClusterDefinitions
from roost.cluster.delay_store import DelayStore, release_dead_hook
from roost.cluster.node_messages import NodeMessages
from roost.cluster.node_views import NodeViews, forget_incarnation
from roost.cluster.nodes import NodeRegistry
from roost.cluster.pg_backing import PgBackingQueue, attach
from roost.cluster.reply_relay import ReplyRelay, forget_dead
from roost.http.cluster_view import local_view
from roost.http.connections import close_local
from roost.http.nodes import ClusterNode as NodeListing
from roost.resources import MEMORY_ALARM

log = logging.getLogger("roost.cluster")


# The delivery lease ends this long before another node may find this one
# silent: room for the two clocks' rates to differ and for a delivery
# already on its way out.
LEASE_MARGIN = 1.0

# The source under which a writer falling behind PostgreSQL holds the memory
# alarm (what it holds back is memory: rows enqueued, not yet committed).
WRITER_BACKLOG_SOURCE = "cluster_writer_backlog"

# Default of max_pending_bytes: body bytes a node's writer may hold,
# enqueued and not yet committed, before its publishers are blocked.
MAX_PENDING_BYTES = 64 * 1024 * 1024


def conninfo_for_failures(url: str, timeout: int) -> str:
    """``url`` with what lets every connection of the node notice a
    database machine that vanished without closing its sockets (power
    loss, a network partition) within about ``timeout``, rather than the
    kernel's default of minutes to hours: TCP keepalives on idle
    connections (the LISTEN ones are idle until a notification comes),
    ``tcp_user_timeout`` on data sent and never acknowledged, and a
    ``connect_timeout`` that holds per host of a multi-host URL, so a
    dead host in the list does not stall the failover to the next. Settings
    the URL makes itself are kept."""
    given = conninfo_to_dict(url)
    defaults = {
        "keepalives": "1",
        "keepalives_idle": str(max(1, timeout // 3)),
        "keepalives_interval": "1",
        "keepalives_count": "3",
        "tcp_user_timeout": str(timeout * 1000),
        "connect_timeout": str(timeout),
    }
    extra = {k: v for k, v in defaults.items() if k not in given}
    return make_conninfo(url, **extra) if extra else url


class ClusterNode:
    def __init__(
        self, url: str, name: str, timeout: int, max_pending_bytes: int = MAX_PENDING_BYTES
    ) -> None:
        self.registry = NodeRegistry(conninfo_for_failures(url, timeout), name, timeout)
        self.max_pending_bytes = max_pending_bytes
        self.definitions: ClusterDefinitions | None = None
        self.messages: NodeMessages | None = None
        self.consumers: ClusterConsumers | None = None
        self.delays: DelayStore | None = None
        # This node's connections etc. for the others' management API.
        self.views: NodeViews | None = None
        self.replies: ReplyRelay | None = None

    @property
    def name(self) -> str:
        return self.registry.name

    async def register(self, on_fenced: Callable[[], Awaitable[None]]) -> None:
        """Migrate the schema and register this incarnation (its epoch is
        then ``registry.epoch``). ``on_fenced`` runs when the incarnation
        is found declared dead, before the node registers again: it must
        close every client connection. Raises ClusterError."""
        # First of the fencing hooks: nothing of the dead incarnation may go on.
        self.registry.on_fenced.append(on_fenced)
        # A dead incarnation's published view and non-durable queues go
        # (also for an earlier incarnation this one takes over at start).
        self.registry.on_node_dead.append(forget_incarnation)
        await self.registry.start()

    async def start_messages(self, broker: Broker) -> None:
        """Plug the message layer into ``broker``, between :meth:`register`
        and :meth:`load` (the epoch is known, no queue exists yet): every
        message routed to a queue becomes a row in PostgreSQL, delivered by
        whichever node claims it."""
        registry = self.registry
        messages = NodeMessages(
            registry.url, registry.epoch, max_pending_bytes=self.max_pending_bytes
        )
        await messages.start()
        self.messages = messages
        try:
            # Rows held by incarnations that died while no node was up to
            # clean up after them (later deaths: on_node_dead below).
            await messages.claimer.release_dead()
        except BaseException:
            await messages.close()
            self.messages = None
            raise
        delays = DelayStore(broker, messages.writer, messages.claimer.pool, registry.epoch)
        try:
            await delays.start()
        except BaseException:
            await messages.close()
            self.messages = None
            raise
        self.delays = delays
        broker.journal = messages.journal  # vhosts created later take it
        broker.delay_store = delays

        def backlog(over: bool) -> None:
            # Flow control as the memory alarm's: publishing connections
            # get connection.blocked and are no longer read from, until the
            # writer has caught up with half of the limit.
            if over:
                log.warning(
                    "cluster: %d bytes of messages wait for PostgreSQL; blocking publishers",
                    messages.writer.pending_bytes,
                )
                broker.set_alarm(MEMORY_ALARM, WRITER_BACKLOG_SOURCE)
            else:
                log.info("cluster: PostgreSQL caught up; unblocking publishers")
                broker.clear_alarm(MEMORY_ALARM, WRITER_BACKLOG_SOURCE)

        messages.writer.on_backlog = backlog
        for vhost in broker.vhosts.values():
            vhost.journal = messages.journal
            vhost.delay_store = delays
        # Before the server's hook closes the connections: nothing more
        # may be delivered from the buffers, whose rows are others' now.
        registry.on_fenced.insert(0, self._lost)
        registry.on_registered.append(self._registered)
        # On the cleanup transaction's own connection, which holds the dead
        # node's row FOR UPDATE (Claimer.release_dead would lock it from
        # another connection and wait for ever).
        registry.on_node_dead.append(lambda epoch, conn: release_dead(conn, epoch))
        registry.on_node_dead.append(release_dead_hook)
        registry.on_beat.append(self._beat)
        # Direct reply-to: replies to requesters on other nodes.
        replies = ReplyRelay(registry.url, registry.epoch, broker)
        await replies.start()
        self.replies = broker.reply_relay = replies  # vhosts created later take it
        for vhost in broker.vhosts.values():
            vhost.reply_relay = replies
        registry.on_node_dead.append(lambda epoch, conn: forget_dead(conn, epoch))
        # The registration was the first heartbeat: the lease starts from
        # it, not unbounded until the next one.
        self._beat(registry.last_beat_sent)

    async def _lost(self) -> None:
        if self.messages is not None:
            self.messages.lost()
        self._drop_waiting()

    async def _registered(self, epoch: int) -> None:
        # A new incarnation after fencing: claims, hand-offs and acks from
        # now on are under the new epoch (the old one's rows were released).
        if self.messages is not None:
            self.messages.set_epoch(epoch)
        if self.delays is not None:
            self.delays.set_epoch(epoch)
        if self.replies is not None:
            self.replies.set_epoch(epoch)
        self._drop_waiting()
        if self.messages is not None:
            # Only now may it deliver: the registration was a heartbeat.
            self._beat(self.registry.last_beat_sent)

    def _drop_waiting(self) -> None:
        # Entries waiting out a retry delay are claims of the dead
        # incarnation too (released to the cluster, maybe delivered
        # elsewhere already); requeued by the closing connections meanwhile
        # or not, none may come back here.
        if self.definitions is not None:
            for queue, _ in self.definitions.identified_queues():
                queue.drop_waiting()

    def _beat(self, sent: float) -> None:
        # Not for a registration the message layer has not moved to yet
        # (set_epoch() in _registered): the lease would let it deliver what
        # claims of the dead epoch bring into the buffers meanwhile, rows
        # the cluster has already released to other nodes.
        if self.messages is not None and self.messages.epoch == self.registry.epoch:
            self.messages.renew_lease(sent + self.registry.timeout - LEASE_MARGIN)

    def _attach_queues(self) -> None:
        """Give each queue whose row is known its PostgreSQL backing queue
        (once per queue object), and forget the deleted ones'."""
        messages, definitions = self.messages, self.definitions
        if messages is None or definitions is None:
            return
        live: set[int] = set()
        for queue, qid in definitions.identified_queues():
            live.add(qid)
            backing = queue.backing
            if isinstance(backing, PgBackingQueue) and backing.store_id == qid:
                continue
            # Normally empty: a queue is attached once its declaration is
            # written, before declare-ok. A client that published before
            # that (pipelining) had its messages kept here: they move over.
            left = []
            while (entry := backing.fetch()) is not None:
                left.append(entry)
            new = messages.backing_queue(qid, queue.durable)
            attach(queue, new)  # takes over the queue's TTL hook from backing
            backing.close()
            for entry in left:
                new.publish(entry)
            if left:
                queue.dispatch()
        for qid in [qid for qid in messages.queues if qid not in live]:
            messages.forget(qid)
        consumers = self.consumers
        if consumers is not None:
            for queue, qid in definitions.identified_queues():
                peers = queue.peers
                if not (isinstance(peers, SharedQueue) and peers.queue_id == qid):
                    consumers.attach(queue, qid)
            for qid in [qid for qid in consumers.queues if qid not in live]:
                consumers.forget(qid)

    async def load(self, broker: Broker) -> None:
        """Load the shared definitions into ``broker`` (a fresh model) and
        keep them in step from now on."""
        definitions = ClusterDefinitions(self.registry, broker)
        if self.messages is not None:
            # Consumers across the cluster need the queues' shared messages.
            consumers = ClusterConsumers(self.registry)
            consumers.start()
            self.consumers = consumers
            definitions.on_queue_ids.append(self._attach_queues)
        self.definitions = definitions
        try:
            await definitions.start()
        except BaseException:
            self.definitions = None
            if self.consumers is not None:
                await self.consumers.stop()
                self.consumers = None
            await self.registry.leave()
            raise
        self.views = NodeViews(
            self.registry,
            collect=lambda: local_view(broker, self.name),
            close_local=lambda name, reason: close_local(broker, name, reason),
        )
        await self.views.start()
        if self.delays is not None:
            self.delays.run()

    async def consumer_counts(self) -> dict[tuple[str, str], int]:
        """Consumers per queue, (vhost, name), on every node (for the
        management API; ``Queue.consumer_count`` is the same figure as
        this node last read it)."""
        if self.consumers is None:
            return {}
        return await self.consumers.consumer_counts()

    async def set_addresses(self, amqp_address: str, http_address: str) -> None:
        await self.registry.set_addresses(amqp_address, http_address)

    async def nodes(self) -> list[NodeListing]:
        """The live nodes, for /api/nodes: while PostgreSQL is out of reach,
        this node alone (what it knows for sure)."""
        try:
            live = await self.registry.live_nodes()
        except (psycopg.Error, OSError) as exc:
            log.warning("cluster: cannot list the nodes: %s", exc)
            return [NodeListing(self.name, 0)]
        return [NodeListing(n.name, n.uptime_ms, n.amqp_address, n.http_address) for n in live]

    async def metrics(self) -> str:
        """The node's cluster series for its /metrics."""
        return await cluster_metrics.render(self.registry, self.views, self.messages)

    async def stop(self) -> None:
        """Leave the cluster: write what is pending, then declare this
        incarnation dead at once (its exclusive and non-durable queues go
        with it)."""
        if self.views is not None:
            await self.views.stop()
            self.views = None
        if self.definitions is not None:
            await self.definitions.stop()
            self.definitions = None
        if self.consumers is not None:
            # This node's rows go when it leaves (release_consumers).
            await self.consumers.stop()
            self.consumers = None
        if self.delays is not None:
            await self.delays.close()  # routes nothing more; the writer flushes
            self.delays = None
        if self.replies is not None:
            await self.replies.close()
            self.replies = None
        if self.messages is not None:
            # After the AMQP connections closed (their acks are enqueued):
            # writes what is pending, then hands back every row still held,
            # before the incarnation is declared dead.
            await self.messages.close()
            self.messages = None
        await self.registry.leave()
