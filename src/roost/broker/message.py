"""Messages as the broker holds them.

A :class:`Message` is shared by every queue it was routed to and is never
changed once routed: whatever one queue does with its copy (paging it to
the log, counting its deliveries) lives in that queue's :class:`QueueEntry`,
so no queue can disturb another's bookkeeping.
"""

from __future__ import annotations

from typing import Any

from roost.properties import headers_of

_NO_HEADERS: dict[str, Any] = {}


class Message:
    __slots__ = (
        "_headers",
        "body",
        "cc",
        "exchange",
        "persistent",
        "priority",
        "properties",
        "requires",
        "routing_key",
        "written_ms",
    )

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
        persistent: bool = False,
        priority: int | None = None,
        cc: tuple[str, ...] = (),
        written_ms: int = 0,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties  # raw property flags + list, as received
        self.body = body
        # Extra routing keys (the CC and BCC headers of sender-selected
        # distribution, or a dead-lettered message's CC keys); used only
        # to route.
        self.cc = cc
        self.persistent = persistent
        self.priority = priority
        self._headers: dict[str, Any] | None = None
        # When the message was written to the log (ms since the epoch; 0:
        # not read back from the log). TTLs of restored messages count from it.
        self.written_ms = written_ms
        # Cluster mode: what must happen in the transaction that writes
        # this publish's rows for them to be written (a SharedKey new to
        # its deduplication cache, or the int id of the held row a delayed
        # exchange releases it from). Always empty on a single node.
        self.requires: tuple[object, ...] = ()

    @property
    def headers(self) -> dict[str, Any]:
        """The headers table (decoded once, on first use)."""
        h = self._headers
        if h is None:
            h = headers_of(self.properties) or _NO_HEADERS
            self._headers = h
        return h

    @property
    def size(self) -> int:
        return len(self.body)


class QueueEntry:
    """One message's place in one queue.

    ``ref`` is this queue's reference on the message's persistent log
    record (0: none): set only when the record carries the queue's id, so
    settling the entry acks exactly that record. The backing queue owns it.
    """

    __slots__ = ("deliveries", "expires", "message", "priority", "redelivered", "ref", "seq")

    def __init__(
        self,
        seq: int,
        message: Message,
        redelivered: bool = False,
        expires: int = 0,
        priority: int = 0,
        ref: int = 0,
    ) -> None:
        self.seq = seq
        self.message = message
        self.redelivered = redelivered
        self.expires = expires  # wall-clock ms after which it is dead (0: never)
        self.priority = priority
        self.deliveries = 0  # times handed to a consumer
        self.ref = ref
