"""Helpers shared by the store tests: an exact confirm-tracking publisher
over a bare socket, and a pika-based drain."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

import pika
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader

from tests.conftest import RawClient


def publish_frames(
    exchange: str, routing_key: str, body: bytes, message_id: str, persistent: bool = True
) -> bytes:
    props = C.Basic.Properties(delivery_mode=2 if persistent else 1, message_id=message_id)
    return (
        pframe.marshal(C.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
        + pframe.marshal(pheader.ContentHeader(0, len(body), props), 1)
        + pframe.marshal(pbody.ContentBody(body), 1)
    )


class ConfirmingPublisher:
    """Publishes in confirm mode over a bare socket and records exactly
    which publishes the broker confirmed (basic.ack, single or multiple),
    until the socket dies (the broker was killed)."""

    def __init__(self, port: int) -> None:
        self.client = RawClient(port, timeout=5.0)
        self.client.handshake()
        self.client.open_channel(1)
        self.client.send_frame(C.Confirm.Select(), 1)
        self.client.expect(C.Confirm.SelectOk)
        self.sent: list[str] = []  # ids in publish order (index = seq - 1)
        self.confirmed: set[str] = set()
        self.nacked: set[str] = set()
        self._settled_upto = 0  # every seq <= this one is confirmed or nacked
        self._settled: set[int] = set()  # settled seqs above _settled_upto

    def _settle(self, tag: int, multiple: bool, ok: bool) -> None:
        target = self.confirmed if ok else self.nacked
        if multiple:
            for seq in range(self._settled_upto + 1, tag + 1):
                if seq not in self._settled:
                    target.add(self.sent[seq - 1])
            self._settled = {s for s in self._settled if s > tag}
            self._settled_upto = max(self._settled_upto, tag)
        else:
            assert tag not in self._settled and tag > self._settled_upto, f"double ack {tag}"
            target.add(self.sent[tag - 1])
            self._settled.add(tag)
        while self._settled_upto + 1 in self._settled:
            self._settled_upto += 1
            self._settled.discard(self._settled_upto)

    def _read_available(self, block: bool) -> None:
        sock = self.client.sock
        sock.settimeout(1.0 if block else 0.0)
        try:
            data = sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except TimeoutError:
            return
        finally:
            sock.settimeout(5.0)
        if not data:
            raise ConnectionError("closed by broker")
        self.client.buf += data
        while len(self.client.buf) >= 8:
            size = int.from_bytes(self.client.buf[3:7], "big")
            if len(self.client.buf) < size + 8:
                break
            _, fr = self.client.recv_frame()
            if isinstance(fr, C.Basic.Ack):
                self._settle(fr.delivery_tag, fr.multiple, True)
            elif isinstance(fr, C.Basic.Nack):
                self._settle(fr.delivery_tag, fr.multiple, False)
            elif isinstance(fr, C.Channel.Close | C.Connection.Close):
                raise AssertionError(f"broker closed: {fr!r}")

    def run(
        self,
        targets: Iterable[tuple[str, str]],
        prefix: str,
        count: int,
        window: int = 200,
        deadline: float = 10.0,
        pad: int = 0,
    ) -> None:
        """Publish ``count`` persistent messages (ids ``prefix-N``) to each
        (exchange, routing key) in turn until done or the broker dies;
        returns once everything sent is settled or the connection is gone.
        ``pad`` pads bodies with dots to that many bytes."""
        dests = list(targets)
        end = time.monotonic() + deadline
        try:
            i = 0
            while time.monotonic() < end:
                outstanding = len(self.sent) - len(self.confirmed) - len(self.nacked)
                if i < count and outstanding < window:
                    chunk = b""
                    for _ in range(min(50, count - i)):
                        mid = f"{prefix}-{i}"
                        ex, rk = dests[i % len(dests)]
                        chunk += publish_frames(ex, rk, mid.encode().ljust(pad, b"."), mid)
                        self.sent.append(mid)
                        i += 1
                    self.client.send(chunk)
                    self._read_available(block=False)
                elif outstanding:
                    self._read_available(block=True)
                else:
                    return
        except (ConnectionError, OSError):
            return  # the broker was killed: what is confirmed so far counts

    def close(self) -> None:
        self.client.close()


def connect(port: int) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, heartbeat=0)
    )


def drain(port: int, queue: str) -> list[tuple[str, bool]]:
    """Consume (auto-ack) every message in ``queue``, in order: (body, redelivered)."""
    conn = connect(port)
    try:
        ch = conn.channel()
        n = ch.queue_declare(queue, passive=True).method.message_count
        out: list[tuple[str, bool]] = []
        if n:
            for method, _, body in ch.consume(queue, auto_ack=True, inactivity_timeout=5):
                assert method is not None, f"{queue}: only {len(out)} of {n} messages came"
                out.append((body.decode(), bool(method.redelivered)))
                if len(out) == n:
                    break
            ch.cancel()
        method, _, _ = ch.basic_get(queue, auto_ack=False)
        assert method is None, f"{queue}: more than the {n} messages counted"
        return out
    finally:
        conn.close()


def message_count(port: int, queue: str) -> int:
    conn = connect(port)
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepting")
