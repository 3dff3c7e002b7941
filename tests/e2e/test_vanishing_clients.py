"""Clients that vanish: mid-frame (FIN or RST), half-close after a publish,
and consumers that stop reading their socket while a publisher floods.

In every case the broker must free the connection (gone from
``broker.connections``, channels and consumers torn down) and requeue what
the client had unacked, so another consumer gets it with redelivered=True.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

import pika
import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader

from roost.amqp.connection import AMQPConnection
from roost.amqp.state import ConnectionState
from roost.testing import RoostBroker
from tests.conftest import RawClient

T = TypeVar("T")
QUEUE = "vanish-q"


def wait_for(fn: Callable[[], T], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def amqp_connections(broker: RoostBroker) -> list[AMQPConnection]:
    assert broker.server is not None
    conns = broker.call(lambda: list(broker.server.broker.connections))  # type: ignore[union-attr]
    return [c for c in conns if isinstance(c, AMQPConnection)]


def queue_state(broker: RoostBroker, name: str = QUEUE) -> tuple[int, int, int]:
    """(ready messages, unacked, consumers) of a queue on vhost '/'."""
    assert broker.server is not None
    vh = broker.server.broker.vhosts["/"]

    def read() -> tuple[int, int, int]:
        q = vh.queues[name]
        return q.message_count, q.unacked, q.consumer_count

    return broker.call(read)


def publish_frames(body: bytes, routing_key: str = QUEUE, channel: int = 1) -> bytes:
    out = pframe.marshal(C.Basic.Publish(exchange="", routing_key=routing_key), channel)
    out += pframe.marshal(pheader.ContentHeader(0, len(body), C.Basic.Properties()), channel)
    return out + pframe.marshal(pbody.ContentBody(body), channel)


def raw_client(broker: RoostBroker, rcvbuf: int = 0) -> RawClient:
    """A handshaken RawClient with channel 1 open; ``rcvbuf`` shrinks its
    socket receive buffer (set before connect, so the kernel can't autotune)."""
    client = RawClient.__new__(RawClient)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5.0)
    sock.connect(("127.0.0.1", broker.port))
    client.sock = sock
    client.buf = b""
    client.handshake()
    client.open_channel(1)
    return client


def vanish(client: RawClient, rst: bool) -> None:
    if rst:
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def consume_unacked(client: RawClient, count: int, prefetch: int = 0) -> None:
    """basic.consume in ack mode on QUEUE and read ``count`` deliveries."""
    if prefetch:
        client.send_frame(C.Basic.Qos(prefetch_count=prefetch), 1)
        client.expect(C.Basic.QosOk)
    client.send_frame(C.Basic.Consume(queue=QUEUE, consumer_tag="doomed"), 1)
    client.expect(C.Basic.ConsumeOk)
    for _ in range(count):
        client.expect(C.Basic.Deliver)
        client.expect(pheader.ContentHeader)
        client.expect(pbody.ContentBody)


def drain(url: str, count: int, timeout: float = 5.0) -> list[tuple[bytes, bool]]:
    """Consume ``count`` messages from QUEUE with pika: (body, redelivered)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=count)
        got: list[tuple[bytes, bool]] = []
        for method, _props, body in ch.consume(QUEUE, inactivity_timeout=timeout):
            if method is None:
                break
            got.append((body, bool(method.redelivered)))
            ch.basic_ack(method.delivery_tag)
            if len(got) == count:
                break
        ch.cancel()
        return got
    finally:
        conn.close()


@pytest.fixture
def setup(roost_broker: RoostBroker) -> RoostBroker:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.queue_declare(QUEUE)
    for i in range(3):
        ch.basic_publish("", QUEUE, f"m{i}".encode())
    conn.close()
    assert wait_for(lambda: not amqp_connections(roost_broker))
    return roost_broker


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_vanish_mid_frame_frees_connection_and_requeues(setup: RoostBroker, rst: bool) -> None:
    client = raw_client(setup)
    consume_unacked(client, 3)
    assert queue_state(setup) == (0, 3, 1)
    conns = amqp_connections(setup)
    assert len(conns) == 1
    conn = conns[0]
    # Half a publish: the method and header frames, then part of the body frame.
    frames = publish_frames(b"x" * 1000)
    client.send(frames[: len(frames) - 500])
    vanish(client, rst)

    assert wait_for(lambda: not amqp_connections(setup))
    assert setup.call(lambda: (conn.state, len(conn.channels))) == (ConnectionState.CLOSED, 0)
    # The half-published message was never enqueued; the 3 unacked are back.
    assert wait_for(lambda: queue_state(setup) == (3, 0, 0))
    got = drain(setup.url, 3)
    assert sorted(got) == [(b"m0", True), (b"m1", True), (b"m2", True)]


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_vanish_mid_frame_header_only(setup: RoostBroker, rst: bool) -> None:
    # Cut inside the 7-byte frame header of the method frame.
    client = raw_client(setup)
    client.send(publish_frames(b"y")[:4])
    vanish(client, rst)
    assert wait_for(lambda: not amqp_connections(setup))
    assert queue_state(setup) == (3, 0, 0)


def test_half_close_after_publish(setup: RoostBroker) -> None:
    client = raw_client(setup)
    consume_unacked(client, 3)
    client.send(publish_frames(b"last"))
    client.sock.shutdown(socket.SHUT_WR)
    # The broker treats EOF as the client going away: it closes the socket.
    assert client.closed()
    client.close()
    assert wait_for(lambda: not amqp_connections(setup))
    # The complete publish before the EOF was routed; the unacked requeued.
    assert wait_for(lambda: queue_state(setup) == (4, 0, 0))
    got = drain(setup.url, 4)
    # "last" may have gone to the half-closed client's own consumer before
    # the EOF was read (then it is redelivered too), so only its body counts.
    assert sorted(got)[1:] == [(b"m0", True), (b"m1", True), (b"m2", True)]
    assert sorted(got)[0][0] == b"last"


def test_stalled_consumer_is_bounded(roost_broker: RoostBroker) -> None:
    """A consumer with a huge prefetch that never reads its socket: the
    broker stops delivering to it once its transport's write buffer passes
    the high-water mark, instead of buffering the whole queue."""
    url = roost_broker.url
    pconn = pika.BlockingConnection(pika.URLParameters(url))
    pch = pconn.channel()
    pch.queue_declare(QUEUE)

    stuck = raw_client(roost_broker, rcvbuf=16 * 1024)
    stuck.send_frame(C.Basic.Qos(prefetch_count=60000), 1)
    stuck.expect(C.Basic.QosOk)
    stuck.send_frame(C.Basic.Consume(queue=QUEUE, consumer_tag="stuck"), 1)
    stuck.expect(C.Basic.ConsumeOk)
    # The publisher's connection has a channel 1 too: pick the consumer's.
    stuck_conn = next(
        c for c in amqp_connections(roost_broker) if (ch := c.channels.get(1)) and ch.consumers
    )

    body = b"z" * 16 * 1024
    total = 1500  # ~24 MB, well past the 4 MB high-water mark
    for i in range(total):
        pch.basic_publish("", QUEUE, body, pika.BasicProperties(message_id=str(i)))
    pconn.process_data_events(0)

    def write_buffer() -> int:
        t = stuck_conn.transport
        return t.get_write_buffer_size() if t is not None else -1

    assert wait_for(lambda: roost_broker.call(lambda: not stuck_conn.writable))
    # Bounded: the 4 MB high-water mark plus one dispatch round's batch
    # (deliveries stop once writable turns False), not the ~24 MB queue.
    assert roost_broker.call(write_buffer) <= 5 * 1024 * 1024

    def settled() -> tuple[int, int, int] | None:
        state = queue_state(roost_broker)
        return state if state[0] + state[1] == total else None

    state = wait_for(settled)
    assert state is not None
    ready, stuck_unacked, _ = state
    assert ready > total // 2, state
    assert 0 < stuck_unacked < total // 2

    # Another consumer still gets messages (the ready ones), while the
    # stuck one stays stuck.
    got = drain(url, 10)
    assert len(got) == 10
    assert not roost_broker.call(lambda: stuck_conn.writable)

    # The stuck client vanishes: everything it held is requeued, redelivered.
    vanish(stuck, rst=True)
    assert wait_for(lambda: stuck_conn not in amqp_connections(roost_broker))
    ready, unacked, consumers = queue_state(roost_broker)
    assert (ready, unacked, consumers) == (total - 10, 0, 0)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    redelivered = set()
    for _ in range(total - 10):
        method, props, _body = ch.basic_get(QUEUE, auto_ack=True)
        assert method is not None
        if method.redelivered:
            redelivered.add(int(props.message_id))
    # The stuck consumer held the first ``stuck_unacked`` (FIFO); the drain
    # consumer may have had up to its prefetch requeued on cancel too.
    assert set(range(stuck_unacked)) <= redelivered
    assert len(redelivered) <= stuck_unacked + 10
    conn.close()
    pconn.close()
