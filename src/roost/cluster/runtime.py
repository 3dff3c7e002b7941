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

from roost.broker.broker import Broker
from roost.cluster.definitions import ClusterDefinitions
from roost.cluster.nodes import NodeRegistry
from roost.http.nodes import ClusterNode as NodeListing

log = logging.getLogger("roost.cluster")


class ClusterNode:
    def __init__(self, url: str, name: str, timeout: int) -> None:
        self.registry = NodeRegistry(url, name, timeout)
        self.definitions: ClusterDefinitions | None = None

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
        await self.registry.start()

    async def load(self, broker: Broker) -> None:
        """Load the shared definitions into ``broker`` (a fresh model) and
        keep them in step from now on."""
        definitions = ClusterDefinitions(self.registry, broker)
        try:
            await definitions.start()
        except BaseException:
            await self.registry.leave()
            raise
        self.definitions = definitions

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

    async def stop(self) -> None:
        """Leave the cluster: write what is pending, then declare this
        incarnation dead at once (its exclusive queues go with it)."""
        if self.definitions is not None:
            await self.definitions.stop()
            self.definitions = None
        await self.registry.leave()
