"""Direct reply-to (``amq.rabbitmq.reply-to``): RPC with pika and aio-pika,
and the errors RabbitMQ 3.10 gives for misuse.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import pika
import pytest
from pamqp import commands as C

from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.basic_helpers import (
    basic_get,
    connect,
    declare_queue,
    expect_channel_close,
    expect_method,
    next_message,
    publish,
)

REPLY_TO = "amq.rabbitmq.reply-to"


@pytest.fixture
def client(roost_broker: RoostBroker) -> Iterator[RawClient]:
    c = connect(roost_broker.port, channels=2)
    yield c
    c.close()


def _consume_replies(client: RawClient, channel: int = 1) -> str:
    client.send_frame(C.Basic.Consume(queue=REPLY_TO, no_ack=True), channel)
    return str(expect_method(client, C.Basic.ConsumeOk, channel).consumer_tag)


def test_pika_rpc(roost_broker: RoostBroker) -> None:
    requester = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    responder = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        rch = responder.channel()
        rch.queue_declare("rpc")
        seen_reply_to: list[str] = []

        def serve(ch: Any, method: Any, props: Any, body: bytes) -> None:
            seen_reply_to.append(props.reply_to)
            ch.basic_publish(
                "",
                props.reply_to,
                body.upper(),
                pika.BasicProperties(correlation_id=props.correlation_id),
            )
            ch.basic_ack(method.delivery_tag)

        rch.basic_consume("rpc", serve)

        qch = requester.channel()
        replies: list[tuple[str, bytes, Any]] = []
        qch.basic_consume(
            REPLY_TO,
            lambda ch, m, p, b: replies.append((p.correlation_id, b, m)),
            auto_ack=True,
        )
        for i in range(3):
            qch.basic_publish(
                "",
                "rpc",
                f"request {i}".encode(),
                pika.BasicProperties(reply_to=REPLY_TO, correlation_id=f"c{i}"),
            )
        deadline = time.monotonic() + 5
        while len(replies) < 3:
            assert time.monotonic() < deadline, "no reply"
            responder.process_data_events(time_limit=0.01)
            requester.process_data_events(time_limit=0.01)

        assert [(c, b) for c, b, _ in replies] == [
            ("c0", b"REQUEST 0"),
            ("c1", b"REQUEST 1"),
            ("c2", b"REQUEST 2"),
        ]
        assert all(
            r.startswith(REPLY_TO + ".") and len(r) > len(REPLY_TO) + 1 for r in seen_reply_to
        )
        assert len(set(seen_reply_to)) == 1  # one channel, one reply address
        method = replies[0][2]
        assert method.exchange == "" and method.routing_key == seen_reply_to[0]
        assert not method.redelivered
    finally:
        requester.close()
        responder.close()


async def test_aio_pika_rpc(roost_broker: RoostBroker) -> None:
    responder = await aio_pika.connect(roost_broker.url)
    requester = await aio_pika.connect(roost_broker.url)
    async with responder, requester:
        rch = await responder.channel()
        rpc_queue = await rch.declare_queue("rpc-aio", auto_delete=True)
        seen_reply_to: list[str] = []

        async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                assert message.reply_to is not None
                seen_reply_to.append(message.reply_to)
                await rch.default_exchange.publish(
                    aio_pika.Message(message.body[::-1], correlation_id=message.correlation_id),
                    message.reply_to,
                )

        await rpc_queue.consume(serve)

        qch = await requester.channel()
        loop = asyncio.get_running_loop()
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            assert message.correlation_id is not None
            pending.pop(message.correlation_id).set_result(message.body)

        reply_queue = await qch.get_queue(REPLY_TO, ensure=False)
        await reply_queue.consume(on_reply, no_ack=True)
        for i in range(3):
            pending[f"id{i}"] = loop.create_future()
        futures = dict(pending)
        for i in range(3):
            await qch.default_exchange.publish(
                aio_pika.Message(b"abc%d" % i, reply_to=REPLY_TO, correlation_id=f"id{i}"),
                "rpc-aio",
            )
        results = await asyncio.wait_for(asyncio.gather(*futures.values()), timeout=5)
        assert results == [b"0cba", b"1cba", b"2cba"]
        assert seen_reply_to and all(r.startswith(REPLY_TO + ".") for r in seen_reply_to)


def test_consume_with_acks_is_refused(client: RawClient) -> None:
    client.send_frame(C.Basic.Consume(queue=REPLY_TO, no_ack=False), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - reply consumer cannot acknowledge"
    assert (close.class_id, close.method_id) == (60, 20)


def test_pika_consume_with_acks_is_refused(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=False)
        assert info.value.reply_code == 406
        assert info.value.reply_text == "PRECONDITION_FAILED - reply consumer cannot acknowledge"
    finally:
        conn.close()


def test_second_reply_consumer_is_refused(client: RawClient) -> None:
    _consume_replies(client)
    client.send_frame(C.Basic.Consume(queue=REPLY_TO, no_ack=True), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - reply consumer already set"


def test_publish_with_reply_to_before_consuming_is_refused(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    publish(client, "", q, b"ask", C.Basic.Properties(reply_to=REPLY_TO))
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - fast reply consumer does not exist"
    assert (close.class_id, close.method_id) == (60, 40)
    assert basic_get(client, q, channel=2) is None


def test_reply_consumer_is_per_channel(client: RawClient) -> None:
    # A reply consumer on channel 1 does not let channel 2 use reply-to.
    q = declare_queue(client, exclusive=True)
    _consume_replies(client, 1)
    publish(client, "", q, b"ask", C.Basic.Properties(reply_to=REPLY_TO), channel=2)
    close = expect_channel_close(client, 2)
    assert close.reply_text == "PRECONDITION_FAILED - fast reply consumer does not exist"


def test_passive_declare_of_reply_queue(client: RawClient) -> None:
    client.send_frame(C.Queue.Declare(queue=REPLY_TO, passive=True), 1)
    ok = expect_method(client, C.Queue.DeclareOk, 1)
    assert (ok.queue, ok.message_count, ok.consumer_count) == (REPLY_TO, 0, 0)


def test_only_reply_to_is_rewritten(client: RawClient) -> None:
    """The request's other properties, headers included, stay byte-exact."""
    headers = b"".join(
        [
            b"\x01d" + b"d" + struct.pack(">d", 0.1),  # a double must not become a float
            b"\x01z" + b"b" + struct.pack(">b", -1),
            b"\x01a" + b"u" + struct.pack(">H", 7),
        ]
    )
    table = struct.pack(">I", len(headers)) + headers

    def props(reply_to: bytes) -> bytes:
        return (
            struct.pack(">H", 0x2000 | 0x0400 | 0x0200 | 0x0080)
            + table
            + b"\x04corr"
            + bytes([len(reply_to)])
            + reply_to
            + b"\x03mid"
        )

    q = declare_queue(client, exclusive=True)
    _consume_replies(client)
    publish(client, "", q, b"ask", props(REPLY_TO.encode()))
    got = basic_get(client, q, channel=2, no_ack=True)
    assert got is not None
    reply_to = got.properties.reply_to
    assert reply_to.startswith(REPLY_TO + ".")
    assert got.properties_raw == props(reply_to.encode())
    # And the reply reaches the consumer, properties untouched.
    publish(client, "", reply_to, b"answer", props(b"plain"), channel=2)
    reply = next_message(client)
    assert reply.body == b"answer" and reply.properties_raw == props(b"plain")


def test_unknown_or_stale_reply_address_is_unroutable(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    tag = _consume_replies(client)
    publish(client, "", q, b"ask", C.Basic.Properties(reply_to=REPLY_TO))
    got = basic_get(client, q, channel=2, no_ack=True)
    assert got is not None
    reply_to = got.properties.reply_to

    publish(client, "", REPLY_TO + ".no-such-key", b"x", mandatory=True, channel=2)
    returned = next_message(client)
    assert isinstance(returned.method, C.Basic.Return)
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")

    # Once the requester cancels, its address no longer routes.
    client.send_frame(C.Basic.Cancel(consumer_tag=tag), 1)
    expect_method(client, C.Basic.CancelOk, 1)
    publish(client, "", reply_to, b"late", mandatory=True, channel=2)
    returned = next_message(client)
    assert isinstance(returned.method, C.Basic.Return)
    assert returned.method.routing_key == reply_to and returned.body == b"late"
