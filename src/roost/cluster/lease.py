"""How long this node may still act on the messages it claimed.

Another node declares this one dead once its heartbeat is ``node_timeout``
old, then releases its rows to be delivered elsewhere. Fencing stops a
dead node's claims and acks at the database, but not a delivery from
its local buffer: a node paused (SIGSTOP) or cut off from PostgreSQL
would wake up and hand out messages another node now delivers too.

So deliveries from the buffer need a lease. The registry renews it after
each heartbeat that committed, until ``time_sent + node_timeout`` (minus a
margin for clock-rate drift), taking ``time_sent`` from ``time.monotonic()``
*before* the heartbeat was sent: the lease then lapses before anyone can
see the heartbeat as ``node_timeout`` old. ``time.monotonic`` keeps
counting while the process is stopped, so a node that wakes from a long
pause finds its lease lapsed before it delivers anything.

Without a registry (library use, tests) the lease never lapses.
"""

from __future__ import annotations

import math
import time


class Lease:
    __slots__ = ("until",)

    def __init__(self, until: float = math.inf) -> None:
        self.until = until  # time.monotonic() deadline

    def valid(self) -> bool:
        return time.monotonic() < self.until

    def renew(self, until: float) -> None:
        """Valid until ``until`` (a ``time.monotonic()`` value)."""
        self.until = until

    def revoke(self) -> None:
        self.until = -math.inf
