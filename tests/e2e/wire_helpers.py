"""Helpers for the connection, channel and protocol-error tests: a raw
handshake with chosen client capabilities, reading until the broker closes,
and polling broker state with a deadline."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pamqp import commands as C
from pamqp import heartbeat as pheartbeat
from pamqp.common import FieldTable

from roost.amqp.connection import AMQPConnection
from roost.amqp.state import ConnectionState
from roost.amqp.wire import FRAME_END_BYTES, PROTOCOL_HEADER
from roost.testing import RoostBroker
from tests.conftest import RawClient

T = TypeVar("T")


def raw_frame(ftype: int, channel: int, payload: bytes, end: bytes = FRAME_END_BYTES) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + end


def start_ok(
    client: RawClient,
    *,
    user: str = "guest",
    password: str = "guest",
    mechanism: str = "PLAIN",
    capabilities: dict[str, Any] | None = None,
) -> C.Connection.Start:
    """Send the protocol header and answer connection.start."""
    client.send(PROTOCOL_HEADER)
    start = client.expect(C.Connection.Start)
    assert isinstance(start, C.Connection.Start)
    if mechanism == "AMQPLAIN":
        # pamqp wants a str; these short ASCII tables survive its UTF-8 encoding.
        response = amqplain_response(user, password).decode("ascii")
    else:
        response = f"\0{user}\0{password}"
    caps: FieldTable = (
        {"authentication_failure_close": True} if capabilities is None else capabilities
    )
    client.send_frame(
        C.Connection.StartOk(
            client_properties={"product": "roost-tests", "capabilities": caps},
            mechanism=mechanism,
            response=response,
        )
    )
    return start


def amqplain_response(user: str, password: str) -> bytes:
    """AMQPLAIN's response: a field table without its length prefix."""
    out = b""
    for key, value in (("LOGIN", user), ("PASSWORD", password)):
        raw = value.encode()
        out += bytes([len(key)]) + key.encode() + b"S" + struct.pack(">I", len(raw)) + raw
    return out


def finish_handshake(
    client: RawClient, *, heartbeat: int = 0, channel_max: int = 0, frame_max: int = 0
) -> C.Connection.Tune:
    tune = client.expect(C.Connection.Tune)
    assert isinstance(tune, C.Connection.Tune)
    client.send_frame(
        C.Connection.TuneOk(
            channel_max=channel_max or tune.channel_max,
            frame_max=frame_max or tune.frame_max,
            heartbeat=heartbeat,
        )
    )
    client.send_frame(C.Connection.Open(virtual_host="/"))
    client.expect(C.Connection.OpenOk)
    return tune


def connect(port: int, *, capabilities: dict[str, Any] | None = None, **tune: int) -> RawClient:
    client = RawClient(port)
    start_ok(client, capabilities=capabilities)
    finish_handshake(client, **tune)
    return client


def expect_close(client: RawClient, timeout: float = 5.0) -> C.Connection.Close:
    """Read (skipping anything else) until connection.close arrives."""
    client.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, frame = client.recv_frame()
        if isinstance(frame, C.Connection.Close):
            return frame
    raise AssertionError("no connection.close from the broker")


def assert_connection_closed(
    client: RawClient,
    code: int,
    text: str | None = None,
    *,
    prefix: str | None = None,
    class_id: int | None = None,
    method_id: int | None = None,
) -> C.Connection.Close:
    """connection.close with ``code`` arrives; answer close-ok; the socket closes."""
    close = expect_close(client)
    assert close.reply_code == code, close.reply_text
    if text is not None:
        assert close.reply_text == text
    if prefix is not None:
        assert close.reply_text.startswith(prefix), close.reply_text
    if class_id is not None:
        assert (close.class_id, close.method_id) == (class_id, method_id)
    client.send_frame(C.Connection.CloseOk())
    assert client.closed(timeout=5.0)
    return close


def next_non_heartbeat(client: RawClient) -> tuple[int, object]:
    while True:
        channel, frame = client.recv_frame()
        if not isinstance(frame, pheartbeat.Heartbeat):
            return channel, frame


def wait_for(fn: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
    """Poll ``fn`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(interval)


def open_connections(broker: RoostBroker) -> list[AMQPConnection]:
    """The broker's connections that completed the handshake."""
    assert broker.server is not None
    server = broker.server
    return broker.call(
        lambda: [c for c in server.connections if c.state is ConnectionState.RUNNING]
    )


def queue_depth(broker: RoostBroker, name: str, vhost: str = "/") -> int:
    assert broker.server is not None
    b = broker.server.broker

    def depth() -> int:
        vh = b.vhost(vhost)
        assert vh is not None
        return vh.queues[name].message_count

    return broker.call(depth)
