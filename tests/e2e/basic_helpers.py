"""Raw-protocol helpers shared by the basic-class end-to-end tests
(publish/consume, consumers, confirms/tx, direct reply-to).

They build on ``tests.conftest.RawClient`` and read frames straight off its
buffer when a test needs the exact bytes the broker sent.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands as C
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from roost.amqp.wire import (
    BASIC_CLASS,
    FRAME_BODY,
    FRAME_END,
    FRAME_END_BYTES,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
)
from tests.conftest import RawClient


def recv_raw(client: RawClient) -> tuple[int, int, bytes]:
    """The next frame as (type, channel, payload), heartbeats skipped."""
    while True:
        while len(client.buf) < 7 or len(client.buf) < struct.unpack(">I", client.buf[3:7])[0] + 8:
            data = client.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            client.buf += data
        ftype, channel, size = struct.unpack(">BHI", client.buf[:7])
        payload = client.buf[7 : 7 + size]
        assert client.buf[7 + size] == FRAME_END, "bad frame end"
        client.buf = client.buf[size + 8 :]
        if ftype != FRAME_HEARTBEAT:
            return ftype, channel, payload


def next_frame(client: RawClient) -> tuple[int, object]:
    """The next frame decoded by pamqp, heartbeats skipped."""
    while True:
        channel, frame = client.recv_frame()
        if type(frame).__name__ != "Heartbeat":
            return channel, frame


def connect(port: int, channels: int = 1, frame_max: int = 0) -> RawClient:
    client = RawClient(port)
    client.handshake(frame_max=frame_max)
    for n in range(1, channels + 1):
        client.open_channel(n)
    return client


def raw_header(properties: bytes, body_size: int, channel: int = 1) -> bytes:
    """A content header frame with ``properties`` (flags + list) given as raw bytes."""
    payload = struct.pack(">HHQ", BASIC_CLASS, 0, body_size) + properties
    return struct.pack(">BHI", FRAME_HEADER, channel, len(payload)) + payload + FRAME_END_BYTES


def publish(
    client: RawClient,
    exchange: str,
    routing_key: str,
    body: bytes = b"",
    properties: C.Basic.Properties | bytes | None = None,
    *,
    mandatory: bool = False,
    immediate: bool = False,
    channel: int = 1,
    frame_max: int = 131072,
) -> None:
    """basic.publish + content header + body frames split to fit ``frame_max``."""
    out = [
        pframe.marshal(
            C.Basic.Publish(
                exchange=exchange,
                routing_key=routing_key,
                mandatory=mandatory,
                immediate=immediate,
            ),
            channel,
        )
    ]
    if isinstance(properties, bytes):
        out.append(raw_header(properties, len(body), channel))
    else:
        header = ContentHeader(0, len(body), properties or C.Basic.Properties())
        out.append(pframe.marshal(header, channel))
    chunk = frame_max - 8
    for i in range(0, len(body), chunk):
        out.append(pframe.marshal(ContentBody(body[i : i + chunk]), channel))
    client.send(b"".join(out))


@dataclass
class Received:
    """A method with content (deliver, get-ok, return) read off the wire."""

    method: Any
    channel: int
    properties_raw: bytes  # property flags + property list, exactly as sent
    body_size: int
    body: bytes
    body_frame_sizes: list[int] = field(default_factory=list)

    @property
    def properties(self) -> C.Basic.Properties:
        header = ContentHeader()
        header.unmarshal(struct.pack(">HHQ", 60, 0, self.body_size) + self.properties_raw)
        return header.properties


def read_content(client: RawClient, method: object, channel: int) -> Received:
    ftype, ch, payload = recv_raw(client)
    assert ftype == FRAME_HEADER and ch == channel, (ftype, ch)
    body_size = struct.unpack(">Q", payload[4:12])[0]
    parts: list[bytes] = []
    sizes: list[int] = []
    got = 0
    while got < body_size:
        ftype, ch, chunk = recv_raw(client)
        assert ftype == FRAME_BODY and ch == channel, (ftype, ch)
        parts.append(chunk)
        sizes.append(len(chunk))
        got += len(chunk)
    return Received(method, channel, payload[12:], body_size, b"".join(parts), sizes)


def next_method(client: RawClient) -> tuple[int, object]:
    """The next method frame; content that follows is left in the buffer."""
    ftype, channel, payload = recv_raw(client)
    assert ftype == FRAME_METHOD, f"expected a method frame, got type {ftype}"
    frame = pframe.unmarshal(
        struct.pack(">BHI", ftype, channel, len(payload)) + payload + FRAME_END_BYTES
    )
    return channel, frame[2]


def next_message(client: RawClient) -> Received:
    """The next deliver / get-ok / return with its content."""
    channel, method = next_method(client)
    assert isinstance(method, C.Basic.Deliver | C.Basic.GetOk | C.Basic.Return), method
    return read_content(client, method, channel)


def expect_method(client: RawClient, cls: type, channel: int | None = None) -> Any:
    ch, method = next_method(client)
    assert isinstance(method, cls), f"expected {cls.__name__}, got {method!r}"
    if channel is not None:
        assert ch == channel
    return method


def basic_get(client: RawClient, queue: str, *, no_ack: bool = False, channel: int = 1) -> Any:
    """Received for get-ok, None for get-empty."""
    client.send_frame(C.Basic.Get(queue=queue, no_ack=no_ack), channel)
    ch, method = next_method(client)
    if isinstance(method, C.Basic.GetEmpty):
        return None
    assert isinstance(method, C.Basic.GetOk), method
    return read_content(client, method, ch)


def declare_queue(client: RawClient, name: str = "", channel: int = 1, **kw: Any) -> str:
    client.send_frame(C.Queue.Declare(queue=name, **kw), channel)
    ok = expect_method(client, C.Queue.DeclareOk, channel)
    return str(ok.queue)


def sync(client: RawClient, queue: str, channel: int = 1) -> tuple[int, int]:
    """A passive declare round trip: every frame the broker wrote before its
    reply is already in the buffer. Returns (message_count, consumer_count)."""
    client.send_frame(C.Queue.Declare(queue=queue, passive=True), channel)
    ok = expect_method(client, C.Queue.DeclareOk, channel)
    return int(ok.message_count), int(ok.consumer_count)


def collect_until(client: RawClient, cls: type) -> tuple[list[Received], Any]:
    """Messages received before the next ``cls`` method, and that method."""
    messages: list[Received] = []
    while True:
        ch, method = next_method(client)
        if isinstance(method, cls):
            return messages, method
        assert isinstance(method, C.Basic.Deliver | C.Basic.GetOk | C.Basic.Return), method
        messages.append(read_content(client, method, ch))


def expect_channel_close(client: RawClient, channel: int = 1) -> C.Channel.Close:
    """Skip deliveries until channel.close, answer it, return it."""
    while True:
        ch, method = next_method(client)
        if isinstance(method, C.Channel.Close):
            assert ch == channel
            client.send_frame(C.Channel.CloseOk(), channel)
            return method
        if isinstance(method, C.Basic.Deliver | C.Basic.GetOk | C.Basic.Return):
            read_content(client, method, ch)
            continue
        if isinstance(method, C.Connection.Close):
            raise AssertionError(f"connection closed: {method.reply_code} {method.reply_text}")


def expect_connection_close(client: RawClient) -> C.Connection.Close:
    while True:
        ch, method = next_method(client)
        if isinstance(method, C.Connection.Close):
            assert ch == 0
            client.send_frame(C.Connection.CloseOk(), 0)
            return method
        if isinstance(method, C.Basic.Deliver | C.Basic.GetOk | C.Basic.Return):
            read_content(client, method, ch)


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before deadline")
        time.sleep(interval)
