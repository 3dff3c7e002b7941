"""The other nodes of a cluster, as the management API and ``roost ctl``
show them next to this node's own objects.

Each node publishes, every few seconds, what only it knows (its
connections, channels and consumers as the API renders them, and per
queue the messages it holds claimed but not delivered, its unacked
deliveries and its consumers): :func:`local_view`. The node answering a
request merges the live peers' latest views (:class:`ClusterSnapshot`,
read through a :class:`ClusterView`) with its own live objects. Message
counts are this node's cluster-wide estimate of the ready rows in
PostgreSQL plus what each node holds.

Nothing here talks to PostgreSQL: ``roost.cluster.node_views`` does, and
this module stays importable without a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from roost.broker import read_models

if TYPE_CHECKING:
    from roost.broker.broker import Broker
    from roost.broker.queue import Queue

log = logging.getLogger("roost.http")


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """One node's share of a queue."""

    buffered: int  # claimed by the node ahead of its consumers, not delivered: ready
    unacked: int
    consumers: int


@dataclass(frozen=True)
class PeerView:
    """The latest view another live node published (empty lists until its
    first one)."""

    epoch: int
    node: str
    amqp_address: str = ""
    http_address: str = ""
    connections: list[dict[str, Any]] = field(default_factory=list)
    channels: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[tuple[str, str], QueueFigures] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSnapshot:
    cluster_name: str
    peers: list[PeerView]
    # The node a queue lives on, for queues that have one: exclusive
    # queues (their owner's) and non-durable ones (where declared).
    homes: dict[tuple[str, str], str] = field(default_factory=dict)

    def queue(self, q: Queue) -> QueueFigures:
        """The peers' shares of ``q``, summed."""
        key = (q.vhost.name, q.name)
        buffered = unacked = consumers = 0
        for peer in self.peers:
            f = peer.queues.get(key)
            if f is not None:
                buffered += f.buffered
                unacked += f.unacked
                consumers += f.consumers
        return QueueFigures(buffered, unacked, consumers)

    def connections(self) -> list[dict[str, Any]]:
        return [c for p in self.peers for c in p.connections]

    def channels(self) -> list[dict[str, Any]]:
        return [c for p in self.peers for c in p.channels]

    def consumers(self) -> list[dict[str, Any]]:
        return [c for p in self.peers for c in p.consumers]


class ClusterView(Protocol):
    """What a cluster node offers the management adapters."""

    async def snapshot(self) -> ClusterSnapshot:
        """The live peers' latest views (this node alone, with an empty
        peer list, while PostgreSQL is out of reach)."""
        ...

    async def close_connection(self, epoch: int, name: str, reason: str) -> None:
        """Ask the node of incarnation ``epoch`` to close its connection
        ``name`` with 320 CONNECTION_FORCED."""
        ...


@dataclass(frozen=True, slots=True)
class MergedQueue:
    """A queue's figures over the whole cluster."""

    messages_ready: int
    messages_unacknowledged: int
    consumers: int

    @property
    def messages(self) -> int:
        return self.messages_ready + self.messages_unacknowledged


def merged_queue(q: Queue, snapshot: ClusterSnapshot | None) -> MergedQueue:
    """``q``'s figures: this node's (its ready count is already the
    cluster-wide estimate of the rows in PostgreSQL, plus what it holds)
    and the peers' shares."""
    if snapshot is None:
        return MergedQueue(q.message_count, q.unacked, q.consumer_count)
    f = snapshot.queue(q)
    # With the consumer registry (q.peers) the count is already the
    # cluster's, and fresher than the peers' published views.
    consumers = q.consumer_count if q.peers is not None else q.local_consumer_count + f.consumers
    return MergedQueue(q.message_count + f.buffered, q.unacked + f.unacked, consumers)


def sum_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """message_stats objects added up: counts, and the rates of their
    ``*_details``."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                rate = float(value.get("rate", 0.0))
                old = out.get(key, {"rate": 0.0})
                out[key] = {"rate": round(float(old["rate"]) + rate, 1)}
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def local_view(broker: Broker, node: str) -> dict[str, Any]:
    """What this node publishes for the others (JSON): its connections,
    channels and consumers as the API renders them, its per-queue shares
    (only queues where it has any) and its message counters."""
    # Imported here: connections imports this module's types.
    from roost.http.connections import channel_dict, connection_dict, consumer_dict

    conns = read_models.connections(broker)
    now_ms = int(time.time() * 1000)
    connections = []
    for c in conns:
        d = connection_dict(node, c)
        # RabbitMQ's field; roost ctl shows how long it has been open.
        d["connected_at"] = now_ms - int(c.connected_for * 1000)
        connections.append(d)
    channels = [channel_dict(node, conn, ch) for conn in conns for ch in conn.channels]
    consumers = [consumer_dict(node, c) for c in read_models.channel_consumers(conns)]
    queues = []
    for vname, vh in broker.vhosts.items():
        for q in vh.queues.values():
            buffered = q.backing.in_memory()
            mine = q.local_consumer_count  # the peers count theirs
            if buffered or q.unacked or mine:
                queues.append([vname, q.name, buffered, q.unacked, mine])
    return {
        "connections": connections,
        "channels": channels,
        "consumers": consumers,
        "queues": queues,
        "stats": broker.stats.message_stats(("overall",)),
    }


def peer_queues(rows: Any) -> dict[tuple[str, str], QueueFigures]:
    """The ``queues`` of a published view, read back."""
    out: dict[tuple[str, str], QueueFigures] = {}
    if isinstance(rows, list):
        for r in rows:
            try:
                vhost, name, buffered, unacked, consumers = r
                out[(str(vhost), str(name))] = QueueFigures(
                    int(buffered), int(unacked), int(consumers)
                )
            except (TypeError, ValueError):
                continue
    return out
