"""Consumers and the interface through which queues hand them messages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from roost.broker.message import QueueEntry
    from roost.broker.queue import Queue


class DeliverySink(Protocol):
    """What a queue needs from whoever owns a consumer (an AMQP channel).

    Queues call these instead of knowing about channels or frames, so the
    broker model stays protocol-agnostic.
    """

    def credit(self) -> int:
        """How many more messages the owner takes now, across all its
        consumers: flow, channel-wide prefetch and socket back-pressure."""
        ...

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        """Hand over ``entries`` (already counted as delivered) in order."""
        ...

    def dispatch_soon(self, queue: Queue) -> None:
        """``queue`` stopped a large batch early; call its ``dispatch`` again
        on a later loop iteration so one queue cannot stall the others."""
        ...

    def cancelled_by_server(self, consumer: Consumer) -> None:
        """The queue went away under the consumer (basic.cancel from the server)."""
        ...


class Consumer:
    __slots__ = (
        "arguments",
        "exclusive",
        "no_ack",
        "prefetch",
        "priority",
        "queue",
        "sink",
        "tag",
        "unacked",
    )

    def __init__(
        self,
        tag: str,
        queue: Queue,
        sink: DeliverySink,
        no_ack: bool = False,
        exclusive: bool = False,
        prefetch: int = 0,
        priority: int = 0,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.tag = tag
        self.queue = queue
        self.sink = sink
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.prefetch = prefetch
        self.priority = priority
        self.arguments = dict(arguments or {})
        self.unacked = 0
