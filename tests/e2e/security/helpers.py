"""Shared helpers for the security tests: users, permissions, raw logins."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pika
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp.common import FieldTable

from roost.amqp.wire import PROTOCOL_HEADER
from roost.broker.broker import Broker
from roost.testing import RoostBroker

FULL = (".*", ".*", ".*")
NONE = ("", "", "")


def broker_of(rb: RoostBroker) -> Broker:
    assert rb.server is not None
    return rb.server.broker


def add_user(
    rb: RoostBroker,
    name: str,
    perms: tuple[str, str, str] | None = FULL,
    vhost: str = "/",
    password: str = "pw",
) -> None:
    broker = broker_of(rb)

    def add() -> None:
        broker.users.add(name, password)
        if perms is not None:
            broker.permissions[(name, vhost)] = perms

    rb.call(add)


def set_permissions(
    rb: RoostBroker, user: str, perms: tuple[str, str, str], vhost: str = "/"
) -> None:
    broker = broker_of(rb)
    rb.call(lambda: broker.permissions.__setitem__((user, vhost), perms))


def connect(
    rb: RoostBroker,
    user: str = "guest",
    password: str | None = None,
    vhost: str = "/",
    host: str = "127.0.0.1",
) -> pika.BlockingConnection:
    if password is None:
        password = "guest" if user == "guest" else "pw"
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host=host,
            port=rb.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            connection_attempts=1,
        )
    )


@contextlib.contextmanager
def connected(
    rb: RoostBroker, user: str = "guest", vhost: str = "/"
) -> Iterator[pika.BlockingConnection]:
    conn = connect(rb, user, vhost=vhost)
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


class Login:
    """A bare-socket AMQP handshake that reports how the broker answered,
    optionally from a chosen local address (127.0.0.2 is another loopback
    source on Linux)."""

    def __init__(
        self, host: str, port: int, source: str | None = None, timeout: float = 5.0
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: object, channel: int = 0) -> None:
        self.sock.sendall(pframe.marshal(frame, channel))  # type: ignore[arg-type]

    def recv(self) -> object:
        while True:
            if len(self.buf) >= 7:
                size = struct.unpack(">I", self.buf[3:7])[0]
                if len(self.buf) >= size + 8:
                    n, _, fr = pframe.unmarshal(self.buf[: size + 8])
                    self.buf = self.buf[n:]
                    if type(fr).__name__ == "Heartbeat":
                        continue
                    return fr
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            self.buf += data

    def start_ok(self, user: str, password: str, capabilities: bool = True) -> object:
        """Send the header and start-ok; returns Tune or the Connection.Close."""
        self.sock.sendall(PROTOCOL_HEADER)
        assert isinstance(self.recv(), C.Connection.Start)
        caps: FieldTable = {"authentication_failure_close": True} if capabilities else {}
        self.send(
            C.Connection.StartOk(
                client_properties={"capabilities": caps},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            )
        )
        return self.recv()

    def open(self, user: str, password: str, vhost: str = "/") -> object:
        """A full handshake; returns OpenOk or the Connection.Close."""
        tune = self.start_ok(user, password)
        if not isinstance(tune, C.Connection.Tune):
            return tune
        self.send(C.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max))
        self.send(C.Connection.Open(virtual_host=vhost))
        return self.recv()


def login(rb: RoostBroker, user: str, password: str, vhost: str = "/", **kw: str) -> object:
    """Log in over a fresh socket; returns OpenOk or the Connection.Close."""
    client = Login(kw.get("host", "127.0.0.1"), rb.port, kw.get("source"))
    try:
        return client.open(user, password, vhost)
    finally:
        client.close()


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not a loopback one, that a
    socket can bind to, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for addr in out.split():
        if ":" in addr or addr.startswith("127."):
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((addr, 0))
        except OSError:
            continue
        return addr
    return None


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
