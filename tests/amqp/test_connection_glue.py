"""AMQPConnection driving its state machine and flow control, over a fake
transport (no sockets): the cases the end-to-end tests cannot see from the
client's side."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import header as pheader
from pamqp.common import FieldTable

from roost.amqp.connection import AMQPConnection, ConnectionSettings
from roost.amqp.state import ConnectionState
from roost.amqp.wire import PROTOCOL_HEADER
from roost.broker.broker import Broker
from tests.amqp.test_connection_state_machine import FakeTransport, marshal, parse_output


class PausableTransport(FakeTransport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def spin(loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(3):
        loop.call_soon(loop.stop)
        loop.run_forever()


def connect(
    loop: asyncio.AbstractEventLoop, broker: Broker
) -> tuple[AMQPConnection, PausableTransport]:
    transport = PausableTransport(loop)
    conn = AMQPConnection(broker, ConnectionSettings(heartbeat=0))
    transport.protocol = conn
    conn.connection_made(transport)
    return conn, transport


def start_ok(password: str, capabilities: FieldTable | None = None) -> bytes:
    return marshal(
        C.Connection.StartOk(
            client_properties={"capabilities": capabilities or {}},
            mechanism="PLAIN",
            response=f"\0guest\0{password}",
        ),
        0,
    )


def handshake() -> bytes:
    return (
        PROTOCOL_HEADER
        + start_ok("guest")
        + marshal(C.Connection.TuneOk(channel_max=0, frame_max=131072, heartbeat=0), 0)
        + marshal(C.Connection.Open(virtual_host="/"), 0)
        + marshal(C.Channel.Open(), 1)
    )


def publish(body: bytes) -> bytes:
    return (
        marshal(C.Basic.Publish(exchange="", routing_key="q"), 1)
        + marshal(pheader.ContentHeader(0, len(body), C.Basic.Properties()), 1)
        + marshal(pbody.ContentBody(body), 1)
    )


def state(conn: AMQPConnection) -> ConnectionState:
    return conn.state  # not narrowed by mypy across data_received()


def sent(transport: FakeTransport) -> list[type]:
    out = parse_output(bytes(transport.out))
    transport.out.clear()
    return [type(o.method) for o in out]


def test_frames_pipelined_behind_a_refused_login_are_ignored(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Without authentication_failure_close a refused login just hangs up;
    what the client sent after it must not log in or open anything."""
    broker = Broker()
    conn, transport = connect(loop, broker)
    conn.data_received(
        PROTOCOL_HEADER
        + start_ok("wrong")
        + start_ok("guest")
        + marshal(C.Connection.TuneOk(channel_max=0, frame_max=131072, heartbeat=0), 0)
        + marshal(C.Connection.Open(virtual_host="/"), 0)
    )
    assert state(conn) is ConnectionState.CLOSING
    assert conn.username == "" and conn.vhost is None
    assert conn not in broker.connections
    assert transport.closed
    spin(loop)
    assert state(conn) is ConnectionState.CLOSED
    assert sent(transport) == [C.Connection.Start]


def test_handshake_walks_the_states(loop: asyncio.AbstractEventLoop) -> None:
    broker = Broker()
    conn, _ = connect(loop, broker)
    assert state(conn) is ConnectionState.AWAITING_HEADER
    conn.data_received(PROTOCOL_HEADER)
    assert state(conn) is ConnectionState.STARTING
    conn.data_received(start_ok("guest"))
    assert state(conn) is ConnectionState.TUNING
    conn.data_received(
        marshal(C.Connection.TuneOk(channel_max=0, frame_max=131072, heartbeat=0), 0)
    )
    assert state(conn) is ConnectionState.OPENING
    conn.data_received(marshal(C.Connection.Open(virtual_host="/"), 0))
    assert state(conn) is ConnectionState.RUNNING
    assert conn in broker.connections


def test_writable_follows_the_transport(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop, Broker())
    assert conn.writable
    conn.pause_writing()
    assert not conn.writable
    conn.resume_writing()
    assert conn.writable


def test_a_publisher_is_not_read_during_an_alarm(loop: asyncio.AbstractEventLoop) -> None:
    broker = Broker()
    conn, transport = connect(loop, broker)
    conn.data_received(handshake() + marshal(C.Queue.Declare(queue="q"), 1))
    spin(loop)
    broker.set_alarm("disk")
    # A connection that does not publish keeps being read.
    conn.data_received(marshal(C.Basic.Qos(prefetch_count=1), 1))
    assert transport.reading
    conn.data_received(publish(b"m"))
    assert not transport.reading
    assert not conn.flow.heartbeats_expected
    broker.clear_alarm("disk")
    assert transport.reading
    assert conn.flow.heartbeats_expected
    # Once unblocked, a publish does not pause it again.
    conn.data_received(publish(b"n"))
    assert transport.reading
    assert broker.vhosts["/"].queues["q"].message_count == 2
