"""What the broker model needs from a message store.

The model tells the store what happened (a message was routed to durable
queues, delivered, settled, paged out); the store never calls up. A broker
without a store (``Broker(journal=None)``) keeps everything in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from roost.broker.message import Message


class Journal(Protocol):
    def append(self, message: Message, queue_ids: list[int], persistent: bool) -> int:
        """Write ``message`` to the log; returns its location (``ref``).

        With ``persistent`` the record survives a restart in the durable
        queues ``queue_ids`` and holds one reference per queue; otherwise it
        only lets a long queue keep the body out of memory and holds none.
        """
        ...

    def page_out(self, message: Message) -> int:
        """A queue drops ``message``'s body from memory and will read it back
        from the log: make sure a record exists, take a reference on it and
        return its location (also left in ``message.ref``)."""
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

    @property
    def batch(self) -> int:
        """The commit batch that what is appended now will be part of."""
        ...

    @property
    def durable_batch(self) -> int:
        """Every batch up to this one is on disk (fsync'd)."""
        ...

    def wait_durable(self, batch: int, callback: object) -> None:
        """Call ``callback()`` once ``batch`` is on disk."""
        ...
