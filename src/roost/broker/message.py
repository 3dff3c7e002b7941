"""Messages as the broker holds them.

A :class:`Message` is shared by every queue it was routed to; each queue
keeps its own :class:`QueueEntry` recording the entry's position and whether
it has been delivered before.
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
        "ref",
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
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties  # raw property flags + list, as received
        self.body = body
        # Extra routing keys from the CC and BCC headers (sender-selected
        # distribution), set by the publishing channel; used only to route.
        self.cc: tuple[str, ...] = ()
        self.persistent = persistent
        self.priority = priority
        self._headers: dict[str, Any] | None = None
        # Location of this message's record in the message log (0: none).
        self.ref = 0
        # When the record was written (ms since the epoch; 0: not from the log).
        self.written_ms = 0

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
    """One message's place in one queue."""

    __slots__ = ("deliveries", "expires", "message", "priority", "redelivered", "seq")

    def __init__(
        self,
        seq: int,
        message: Message,
        redelivered: bool = False,
        expires: int = 0,
        priority: int = 0,
    ) -> None:
        self.seq = seq
        self.message = message
        self.redelivered = redelivered
        self.expires = expires  # wall-clock ms after which it is dead (0: never)
        self.priority = priority
        self.deliveries = 0  # times handed to a consumer
