"""A node of a cluster, as the server runs it: the node registry and the
shared definitions, started and stopped together.

The message layer (``roost_messages``, the PostgreSQL backing queue) plugs
in here: it needs :attr:`ClusterNode.registry` (``epoch``, ``is_current``,
``fence_sql``, the ``on_node_dead`` hook, ``pool``) and the queues' ids
(:meth:`ClusterDefinitions.queue_id`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

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

    async def start(self, broker: Broker, on_fenced: Callable[[], Awaitable[None]]) -> None:
        """Register and load the definitions into ``broker`` (a fresh model).
        ``on_fenced`` runs when this incarnation is found declared dead,
        before the node registers again: it must close every client
        connection. Raises ClusterError."""
        registry = self.registry
        # First of the hooks: nothing of the dead incarnation may go on.
        registry.on_fenced.append(on_fenced)
        await registry.start()
        definitions = ClusterDefinitions(registry, broker)
        try:
            await definitions.start()
        except BaseException:
            await registry.leave()
            raise
        self.definitions = definitions

    async def set_addresses(self, amqp_address: str, http_address: str) -> None:
        await self.registry.set_addresses(amqp_address, http_address)

    async def nodes(self) -> list[NodeListing]:
        """The live nodes, for /api/nodes."""
        return [
            NodeListing(n.name, n.uptime_ms, n.amqp_address, n.http_address)
            for n in await self.registry.live_nodes()
        ]

    async def stop(self) -> None:
        """Leave the cluster: write what is pending, then declare this
        incarnation dead at once (its exclusive queues go with it)."""
        if self.definitions is not None:
            await self.definitions.stop()
            self.definitions = None
        await self.registry.leave()
