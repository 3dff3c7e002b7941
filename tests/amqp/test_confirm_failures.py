"""Confirms over a journal whose writes can fail (cluster mode's PgJournal
is one): a failed batch is nacked, a batch whose outcome is unknown closes
the connection, and neither is ever acked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import header as pheader

from roost.amqp.connection import AMQPConnection
from roost.broker.broker import Broker
from roost.broker.journal import OutcomeUnknown
from roost.broker.message import Message
from tests.amqp.test_connection_glue import connect, handshake, spin
from tests.amqp.test_connection_state_machine import FakeTransport, marshal, parse_output


class FailingJournal:
    """Writes nothing; batch 1 resolves when told, with the given failure."""

    def __init__(self) -> None:
        self.durable_batch = 0
        self.failures: dict[int, Exception] = {}
        self.waiting: list[Callable[[], None]] = []

    def append(self, message: Message, queue_ids: list[int]) -> int:
        return 1

    def page_out(self, message: Message) -> int:
        raise NotImplementedError

    def release(self, ref: int) -> None:
        pass

    def ack(self, queue_id: int, ref: int) -> None:
        pass

    def delivered(self, queue_id: int, ref: int) -> None:
        pass

    def read(self, ref: int) -> Message:
        raise NotImplementedError

    def barrier(self) -> int:
        return 1

    def wait_durable(self, batch: int, callback: Callable[[], None]) -> None:
        self.waiting.append(callback)

    def failure(self, batch: int) -> Exception | None:
        return self.failures.get(batch)

    def resolve(self, failure: Exception | None) -> None:
        if failure is not None:
            self.failures[1] = failure
        self.durable_batch = 1
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def publish_persistent(
    loop: asyncio.AbstractEventLoop, journal: FailingJournal
) -> tuple[AMQPConnection, FakeTransport]:
    broker = Broker(journal=journal)
    conn, transport = connect(loop, broker)
    conn.data_received(
        handshake()
        + marshal(C.Queue.Declare(queue="q", durable=True), 1)
        + marshal(C.Confirm.Select(), 1)
    )
    broker.vhosts["/"].queues["q"].store_id = 1  # a journal-backed queue
    conn.data_received(
        marshal(C.Basic.Publish(exchange="", routing_key="q"), 1)
        + marshal(pheader.ContentHeader(0, 1, C.Basic.Properties(delivery_mode=2)), 1)
        + marshal(pbody.ContentBody(b"x"), 1)
    )
    spin(loop)
    transport.out.clear()
    return conn, transport


def replies(transport: FakeTransport) -> list[object]:
    return [o.method for o in parse_output(bytes(transport.out))]


def test_a_written_batch_is_confirmed(loop: asyncio.AbstractEventLoop) -> None:
    journal = FailingJournal()
    _, transport = publish_persistent(loop, journal)
    assert replies(transport) == []  # nothing before the batch resolves
    journal.resolve(None)
    spin(loop)
    assert [type(m) for m in replies(transport)] == [C.Basic.Ack]


def test_a_failed_batch_is_nacked(loop: asyncio.AbstractEventLoop) -> None:
    journal = FailingJournal()
    _, transport = publish_persistent(loop, journal)
    journal.resolve(RuntimeError("not written"))
    spin(loop)
    assert [type(m) for m in replies(transport)] == [C.Basic.Nack]


def test_a_batch_of_unknown_outcome_closes_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    journal = FailingJournal()
    _, transport = publish_persistent(loop, journal)
    journal.resolve(OutcomeUnknown("connection lost during COMMIT"))
    spin(loop)
    [close] = replies(transport)
    assert isinstance(close, C.Connection.Close)
    assert close.reply_code == 541
