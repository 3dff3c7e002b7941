"""The broker's :class:`~roost.broker.journal.Journal` port in cluster mode.

In cluster mode the backing queues write the rows themselves (one per
queue, through the node's writer), so ``append`` writes nothing and hands
out no reference; what the port still does is gate confirms and
``tx.commit``: ``barrier()`` names the writer's open batch, which every
row the publish enqueues right after joins, and ``wait_durable`` calls
back once that batch committed or failed. A caller that may confirm must
then ask :meth:`failure`: a failed batch is nacked (:class:`WriteFailed`)
or closes the connection (:class:`CommitOutcomeUnknown`), never acked; a
batch in which length-limited queues refused publishes says which
(:class:`~roost.broker.journal.PartlyRefused`).

Paging records have no cluster implementation (the rows are in
PostgreSQL): those methods raise. The delayed exchanges' held messages do
not come here either: ``VirtualHost.delay_store`` (see
:mod:`roost.cluster.delay_store`) writes them as rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from roost.broker.journal import PartlyRefused

if TYPE_CHECKING:
    from roost.broker.message import Message
    from roost.cluster.message_writer import MessageWriter, WriteFailed


class PgJournal:
    def __init__(self, writer: MessageWriter) -> None:
        self.writer = writer

    def append(self, message: Message, queue_ids: list[int]) -> int:
        return 0  # each queue's PgBackingQueue.publish writes its row

    def barrier(self) -> int:
        return self.writer.barrier()

    @property
    def durable_batch(self) -> int:
        return self.writer.durable_batch

    def wait_durable(self, batch: int, callback: Callable[[], None]) -> None:
        self.writer.wait_durable(batch, callback)

    def failure(self, batch: int) -> WriteFailed | PartlyRefused | None:
        writer = self.writer
        exc = writer.failure(batch)
        if exc is None:
            refused = writer.refusals(batch)
            if refused is not None:
                return PartlyRefused(refused)
        return exc

    def page_out(self, message: Message) -> int:
        raise NotImplementedError("no paging in cluster mode: the rows are in PostgreSQL")

    def release(self, ref: int) -> None:
        pass  # PgBackingQueue never hands the journal a reference

    def ack(self, queue_id: int, ref: int) -> None:
        raise NotImplementedError("cluster queues settle through their backing queue")

    def delivered(self, queue_id: int, ref: int) -> None:
        pass  # a claim records the delivery

    def read(self, ref: int) -> Message:
        raise NotImplementedError("cluster mode keeps no local log to read")
