"""What the broker model needs from a message store.

The model tells the store what happened (a message was routed to durable
queues, delivered, settled, paged out); the store never calls up. Every
reference the store hands out belongs to exactly one owner (a queue's
entry, a delayed exchange's held message), which settles or releases it
once. A broker without a store (``Broker(journal=None)``) keeps everything
in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from roost.broker.message import Message


class OutcomeUnknown(Exception):
    """A write whose outcome the store cannot know (the connection to a
    remote store broke during its commit): a channel closes its connection
    rather than confirm or nack, so the client publishes again."""


class PartlyRefused(Exception):
    """A batch that was written, but whose store refused some of its
    publishes (cluster mode decides length limits at commit): those are
    nacked, the others confirmed. Not a failure of the batch."""

    def __init__(self, refused: set[int]) -> None:
        super().__init__(f"{len(refused)} publishes refused")
        self.refused = refused  # id() of the refused messages

    def refuses(self, message: Message) -> bool:
        return id(message) in self.refused


class Journal(Protocol):
    def append(self, message: Message, queue_ids: list[int]) -> int:
        """Write ``message`` as a persistent record for the durable queues
        ``queue_ids``; returns its location (``ref``), on which each of
        those queues now holds one reference. It survives a restart in
        each queue until that queue acks it."""
        ...

    def page_out(self, message: Message) -> int:
        """Write ``message`` as a paging record (gone at the next restart)
        so its owner can drop the body from memory; returns its location,
        on which the caller holds the one reference."""
        ...

    def release(self, ref: int) -> None:
        """One reference to ``ref`` is gone, with nothing to record on disk."""
        ...

    def ack(self, queue_id: int, ref: int) -> None:
        """The durable queue settled the message: record it, drop the reference."""
        ...

    def delivered(self, queue_id: int, ref: int) -> None:
        """The message was handed to a consumer: after a crash it is redelivered."""
        ...

    def read(self, ref: int) -> Message:
        """Load a message back from the log."""
        ...

    def barrier(self) -> int:
        """The commit batch that covers everything written so far: once it
        is durable, so is all of that (0: nothing to wait for)."""
        ...

    @property
    def durable_batch(self) -> int:
        """Every batch up to this one is on disk (fsync'd)."""
        ...

    def wait_durable(self, batch: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once ``batch`` is on disk."""
        ...

    def failure(self, batch: int) -> Exception | None:
        """Why ``batch``, resolved by ``wait_durable``, was not written (None:
        it was). An :class:`OutcomeUnknown` means it may have been; a
        :class:`PartlyRefused` that it was, less some publishes; a local
        log never fails a batch it called back for."""
        ...
