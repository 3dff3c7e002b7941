"""What a cluster node reports to whoever starts it."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster database cannot be used (unreachable, refused login,
    a schema newer than this roost): a message fit for a user."""
