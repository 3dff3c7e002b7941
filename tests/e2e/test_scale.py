"""Scale: 1,000 concurrent connections each with a channel and a consumer,
and 10,000 queues with bindings on one connection.

Runs against ``roost serve`` in a subprocess (so the test client doesn't
share the broker's GIL), with cheap raw asyncio clients speaking pamqp.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import struct
from collections.abc import Iterator

import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader

from roost.amqp.wire import PROTOCOL_HEADER
from roost.testing import RoostProcess

CONNECTIONS = 1000
QUEUES = 10_000


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> AsyncClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(PROTOCOL_HEADER)
        await client.expect(C.Connection.Start)
        client.send(C.Connection.StartOk(mechanism="PLAIN", response="\0guest\0guest"), channel=0)
        tune = await client.expect(C.Connection.Tune)
        assert isinstance(tune, C.Connection.Tune)
        client.send(C.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max), 0)
        client.send(C.Connection.Open(virtual_host="/"), 0)
        await client.expect(C.Connection.OpenOk)
        client.send(C.Channel.Open())
        await client.expect(C.Channel.OpenOk)
        return client

    def send(self, frame: object, channel: int = 1) -> None:
        self.writer.write(pframe.marshal(frame, channel))  # type: ignore[arg-type]

    def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.send(C.Basic.Publish(exchange=exchange, routing_key=routing_key))
        self.send(pheader.ContentHeader(0, len(body), C.Basic.Properties()))
        self.send(pbody.ContentBody(body))

    async def frame(self) -> object:
        head = await self.reader.readexactly(7)
        size = struct.unpack(">I", head[3:7])[0]
        rest = await self.reader.readexactly(size + 1)
        _, _, fr = pframe.unmarshal(head + rest)
        return fr

    async def expect(self, cls: type) -> object:
        while True:
            fr = await self.frame()
            if isinstance(fr, cls):
                return fr
            if type(fr).__name__ != "Heartbeat":
                raise AssertionError(f"expected {cls.__name__}, got {fr!r}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
def broker() -> Iterator[RoostProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4 * CONNECTIONS + 1024) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        # Both this process (clients) and the child (inherits it) need fds.
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with RoostProcess(None, "--http-port", "-1") as proc:
        yield proc
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_thousand_connections_each_with_a_consumer(broker: RoostProcess) -> None:
    sem = asyncio.Semaphore(100)  # bound the connect burst (accept backlog)

    async def open_consumer(i: int) -> AsyncClient:
        async with sem:
            client = await AsyncClient.connect(broker.port)
        client.send(C.Queue.Declare(queue=f"scale-c{i}", exclusive=True))
        await client.expect(C.Queue.DeclareOk)
        client.send(C.Queue.Bind(queue=f"scale-c{i}", exchange="amq.fanout"))
        await client.expect(C.Queue.BindOk)
        client.send(C.Basic.Consume(queue=f"scale-c{i}", consumer_tag=f"c{i}", no_ack=True))
        await client.expect(C.Basic.ConsumeOk)
        return client

    clients = await asyncio.gather(*(open_consumer(i) for i in range(CONNECTIONS)))
    try:
        clients[0].publish("amq.fanout", "", b"to everyone")

        async def receive(client: AsyncClient) -> bytes:
            await client.expect(C.Basic.Deliver)
            await client.expect(pheader.ContentHeader)
            fr = await client.expect(pbody.ContentBody)
            assert isinstance(fr, pbody.ContentBody)
            return fr.value

        bodies = await asyncio.wait_for(asyncio.gather(*(receive(c) for c in clients)), 30)
        assert bodies == [b"to everyone"] * CONNECTIONS
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_ten_thousand_queues_routed(broker: RoostProcess) -> None:
    client = await AsyncClient.connect(broker.port)
    try:
        client.send(C.Exchange.Declare(exchange="scale-x", exchange_type="direct"))
        await client.expect(C.Exchange.DeclareOk)
        # Pipelined: all declares and binds, then all the replies in order.
        for i in range(QUEUES):
            client.send(C.Queue.Declare(queue=f"scale-q{i}"))
            client.send(C.Queue.Bind(queue=f"scale-q{i}", exchange="scale-x", routing_key=f"k{i}"))
        for i in range(QUEUES):
            ok = await client.expect(C.Queue.DeclareOk)
            assert isinstance(ok, C.Queue.DeclareOk) and ok.queue == f"scale-q{i}"
            await client.expect(C.Queue.BindOk)
        # One message per routing key, each must land in its own queue only.
        for i in range(QUEUES):
            client.publish("scale-x", f"k{i}", str(i).encode())
        client.publish("scale-x", "unbound-key", b"nowhere")
        for i in range(QUEUES):
            client.send(C.Queue.Declare(queue=f"scale-q{i}", passive=True))
        counts = []
        for _ in range(QUEUES):
            ok = await client.expect(C.Queue.DeclareOk)
            assert isinstance(ok, C.Queue.DeclareOk)
            counts.append(ok.message_count)
        assert counts == [1] * QUEUES
        for i in range(0, QUEUES, 97):
            client.send(C.Basic.Get(queue=f"scale-q{i}", no_ack=True))
            await client.expect(C.Basic.GetOk)
            await client.expect(pheader.ContentHeader)
            fr = await client.expect(pbody.ContentBody)
            assert isinstance(fr, pbody.ContentBody) and fr.value == str(i).encode()
    finally:
        await client.close()
