"""Shared test helpers. The broker fixtures themselves (``roost_broker``,
``roost_process``) come from the ``roost.testing`` pytest plugin."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from pamqp import commands as C
from pamqp import frame as pframe

from roost.amqp.wire import PROTOCOL_HEADER
from roost.testing import RoostBroker


class RawClient:
    """A bare-socket AMQP client for protocol-level tests."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: object, channel: int = 0) -> None:
        self.send(pframe.marshal(frame, channel))  # type: ignore[arg-type]

    def recv_frame(self) -> tuple[int, object]:
        while True:
            if len(self.buf) >= 7:
                size = struct.unpack(">I", self.buf[3:7])[0]
                if len(self.buf) >= size + 8:
                    n, ch, fr = pframe.unmarshal(self.buf[: size + 8])
                    self.buf = self.buf[n:]
                    return ch, fr
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            self.buf += data

    def expect(self, cls: type, skip_heartbeats: bool = True) -> object:
        while True:
            ch, fr = self.recv_frame()
            if isinstance(fr, cls):
                return fr
            if skip_heartbeats and type(fr).__name__ == "Heartbeat":
                continue
            raise AssertionError(f"expected {cls.__name__}, got {fr!r} on channel {ch}")

    def handshake(
        self,
        vhost: str = "/",
        user: str = "guest",
        password: str = "guest",
        heartbeat: int = 0,
        channel_max: int = 0,
        frame_max: int = 0,
    ) -> C.Connection.Tune:
        self.send(PROTOCOL_HEADER)
        self.expect(C.Connection.Start)
        self.send_frame(
            C.Connection.StartOk(
                client_properties={
                    "capabilities": {
                        "authentication_failure_close": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                    }
                },
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            )
        )
        tune = self.expect(C.Connection.Tune)
        assert isinstance(tune, C.Connection.Tune)
        self.send_frame(
            C.Connection.TuneOk(
                channel_max=channel_max or tune.channel_max,
                frame_max=frame_max or tune.frame_max,
                heartbeat=heartbeat,
            )
        )
        self.send_frame(C.Connection.Open(virtual_host=vhost))
        self.expect(C.Connection.OpenOk)
        return tune

    def open_channel(self, channel: int = 1) -> None:
        self.send_frame(C.Channel.Open(), channel)
        self.expect(C.Channel.OpenOk)

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the broker has closed the socket."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(roost_broker: RoostBroker) -> Iterator[RawClient]:
    client = RawClient(roost_broker.port)
    yield client
    client.close()
