"""What the other nodes of a cluster do with a queue.

On a single node a queue knows all its consumers and :attr:`Queue.peers`
is None. In cluster mode (``roost.cluster.consumers``) every node holds a
copy of the queue and only its own consumers; the peers object is the
queue's view of the others' (from PostgreSQL), and decides what a node
cannot decide alone: which consumer is the single active one, whether a
higher-priority consumer elsewhere should get the messages first, when an
auto-delete queue lost its last consumer and when an unused queue expires.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from roost.broker.consumer import Consumer


class QueuePeers(Protocol):
    # Consumers of the queue on other nodes, as last read.
    remote_consumers: int
    # Whether one of them consumes exclusively.
    remote_exclusive: bool

    def active_consumer(self, local_order: list[Consumer]) -> Consumer | None:
        """With single active consumer: the local consumer that is the
        cluster's active one, None when it is on another node (or not
        decided yet). ``local_order`` is this node's registration order."""
        ...

    def priority_floor(self) -> int | None:
        """The priority of the highest-priority consumer with room on
        another node: local consumers below it get nothing (None: no
        such consumer)."""
        ...

    def consumer_added(self, consumer: Consumer) -> None: ...

    def consumer_removed(self, consumer: Consumer) -> None:
        """The cluster, not the node, deletes an auto-delete queue whose
        last consumer anywhere went."""
        ...

    def touched(self) -> None:
        """The queue was used (declared, consumed from, read): x-expires
        restarts cluster-wide."""
        ...

    def expire(self) -> None:
        """Unused here for the x-expires period: delete the queue if it was
        unused everywhere, else re-arm (``Queue.rearm_expiry``)."""
        ...
