"""Protocol violations close the offending connection with RabbitMQ's reply
code (checked against RabbitMQ 3.10 with raw sockets), and the broker keeps
serving its other connections and new ones."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pika
import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader

from roost.amqp.wire import PROTOCOL_HEADER
from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.wire_helpers import (
    assert_connection_closed,
    connect,
    expect_close,
    next_non_heartbeat,
    open_connections,
    raw_frame,
    wait_for,
)

FRAME_MAX = 131072


def method_frame(frame: object, channel: int = 1) -> bytes:
    return bytes(pframe.marshal(frame, channel))  # type: ignore[arg-type]


def publish_frame(channel: int = 1) -> bytes:
    return method_frame(C.Basic.Publish(exchange="", routing_key="q"), channel)


def header_frame(size: int, channel: int = 1, class_id: int = 60, props: bytes = b"\0\0") -> bytes:
    return raw_frame(2, channel, struct.pack(">HHQ", class_id, 0, size) + props)


@dataclass
class Violation:
    data: bytes
    code: int
    text: str | None = None  # exact reply text, when it is RabbitMQ's
    prefix: str = ""
    ids: tuple[int, int] | None = None
    # The stream cannot be parsed past the error, so the broker cannot read
    # our close-ok either: like RabbitMQ it drops the socket after a timeout.
    unparseable: bool = False


VIOLATIONS: dict[str, Violation] = {
    "garbage after handshake": Violation(
        b"this is not an AMQP frame at all, sorry",
        501,
        prefix="FRAME_ERROR - ",
        unparseable=True,
    ),
    "frame larger than frame_max": Violation(
        raw_frame(1, 1, b"\x00\x3c\x00\x0a" + b"x" * FRAME_MAX),
        501,
        prefix="FRAME_ERROR - ",
        unparseable=True,
    ),
    "content header with no publish": Violation(
        header_frame(5),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        ids=(0, 0),
    ),
    "body frame with no publish": Violation(
        raw_frame(3, 1, b"hello"),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        ids=(0, 0),
    ),
    "body frame without header": Violation(
        publish_frame() + raw_frame(3, 1, b"hello"),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, "
        "got non content header frame instead",
        ids=(60, 40),
    ),
    "method while awaiting header": Violation(
        publish_frame() + method_frame(C.Basic.Qos()),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, "
        "got non content header frame instead",
        ids=(60, 40),
    ),
    "channel.close while awaiting header": Violation(
        publish_frame()
        + method_frame(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0)),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, "
        "got non content header frame instead",
        ids=(60, 40),
    ),
    "method while awaiting body": Violation(
        publish_frame() + header_frame(5) + method_frame(C.Basic.Qos()),
        505,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        ids=(60, 40),
    ),
    "second content header": Violation(
        publish_frame() + header_frame(5) + header_frame(5),
        505,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        ids=(60, 40),
    ),
    "content header of another class": Violation(
        publish_frame() + header_frame(5, class_id=50),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
        ids=(60, 40),
    ),
    "unknown method id": Violation(
        raw_frame(1, 1, b"\x00\x3c\x03\xe7"), 503, prefix="COMMAND_INVALID - "
    ),
    "unknown class id": Violation(
        raw_frame(1, 1, b"\x03\xe7\x00\x0a"), 503, prefix="COMMAND_INVALID - "
    ),
    "truncated method frame": Violation(
        raw_frame(1, 1, b"\x00\x32\x00\x0a\x00\x00\x05ab"),
        501,
        prefix="FRAME_ERROR - ",
        ids=(50, 10),
    ),
    "method frame without method id": Violation(
        raw_frame(1, 1, b"\x00\x32"), 501, prefix="FRAME_ERROR - ", ids=(0, 0)
    ),
    "truncated basic.publish": Violation(
        raw_frame(1, 1, b"\x00\x3c\x00\x28\x00\x00\x05ab"),
        501,
        prefix="FRAME_ERROR - ",
        ids=(60, 40),
    ),
    "bad frame-end byte": Violation(
        method_frame(C.Basic.Qos())[:-1] + b"\x00",
        501,
        prefix="FRAME_ERROR - ",
        ids=(0, 0),
        unparseable=True,
    ),
    "heartbeat on channel 1": Violation(
        raw_frame(8, 1, b""), 505, prefix="UNEXPECTED_FRAME - ", ids=(0, 0)
    ),
    "unknown frame type": Violation(
        raw_frame(7, 1, b"abc"), 501, prefix="FRAME_ERROR - ", ids=(0, 0)
    ),
    "body larger than declared": Violation(
        publish_frame() + header_frame(2) + raw_frame(3, 1, b"hello"),
        501,
        prefix="FRAME_ERROR - ",
    ),
    "truncated property list": Violation(
        # Flags announce delivery-mode and app-id; only delivery-mode follows.
        publish_frame() + header_frame(2, props=b"\x10\x08\x02") + raw_frame(3, 1, b"hi"),
        501,
        prefix="FRAME_ERROR - ",
        ids=(60, 40),
    ),
}


@pytest.fixture
def bystander(roost_broker: RoostBroker) -> Iterator[pika.BlockingConnection]:
    """A connection opened before the violation, which must survive it."""
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    yield conn
    if conn.is_open:
        conn.close()


def round_trip(conn: pika.BlockingConnection, body: bytes) -> None:
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, body)
    method, _, got = ch.basic_get(q, auto_ack=True)
    assert method is not None and got == body
    ch.close()


def check_broker_still_serves(broker: RoostBroker, bystander: pika.BlockingConnection) -> None:
    wait_for(lambda: len(open_connections(broker)) == 1)
    round_trip(bystander, b"old connection")
    fresh = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        round_trip(fresh, b"new connection")
    finally:
        fresh.close()


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violation_closes_connection(
    roost_broker: RoostBroker, bystander: pika.BlockingConnection, name: str
) -> None:
    v = VIOLATIONS[name]
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send(v.data)
        if v.unparseable:
            close = expect_close(client)
            assert close.reply_code == v.code
            assert close.reply_text.startswith(v.prefix), close.reply_text
            if v.ids is not None:
                assert (close.class_id, close.method_id) == v.ids
        elif v.ids is None:
            close = assert_connection_closed(client, v.code, v.text, prefix=v.prefix)
        else:
            close = assert_connection_closed(
                client, v.code, v.text, prefix=v.prefix, class_id=v.ids[0], method_id=v.ids[1]
            )
        assert close.reply_code == v.code
    finally:
        client.close()
    check_broker_still_serves(roost_broker, bystander)


def test_violation_split_across_tcp_writes(
    roost_broker: RoostBroker, bystander: pika.BlockingConnection
) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        data = publish_frame() + header_frame(5) + method_frame(C.Basic.Qos())
        for i in range(len(data)):
            client.send(data[i : i + 1])
        assert_connection_closed(client, 505, class_id=60, method_id=40)
    finally:
        client.close()
    check_broker_still_serves(roost_broker, bystander)


def test_frame_of_exactly_frame_max_payload_is_accepted(roost_broker: RoostBroker) -> None:
    # RabbitMQ accepts payloads up to frame_max bytes (its FRAME_SIZE_FUDGE)
    # and refuses one byte more; clients that forget the 8 framing bytes work.
    client = connect(roost_broker.port, frame_max=4096)
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="fudge", exclusive=True), 1)
        client.expect(C.Queue.DeclareOk)
        client.send(
            method_frame(C.Basic.Publish(exchange="", routing_key="fudge"))
            + header_frame(4096)
            + raw_frame(3, 1, b"f" * 4096)
        )
        client.send_frame(C.Basic.Get(queue="fudge", no_ack=True), 1)
        client.expect(C.Basic.GetOk)
        client.expect(pheader.ContentHeader)
        received = b""
        while len(received) < 4096:  # the broker itself sends at most frame_max
            got = client.expect(pbody.ContentBody)
            assert isinstance(got, pbody.ContentBody)
            received += got.value
        assert received == b"f" * 4096
        client.send(raw_frame(3, 1, b"f" * 4097))
        assert expect_close(client).reply_code == 501
    finally:
        client.close()


def test_frame_limit_before_tune_is_4096(roost_broker: RoostBroker) -> None:
    client = RawClient(roost_broker.port)
    try:
        client.send(PROTOCOL_HEADER)
        client.expect(C.Connection.Start)
        client.send_frame(
            C.Connection.StartOk(
                client_properties={"padding": "p" * 5000},
                mechanism="PLAIN",
                response="\0guest\0guest",
            )
        )
        close = expect_close(client)
        assert close.reply_code == 501
        assert "4096" in close.reply_text
    finally:
        client.close()


def test_channel_method_before_connection_open(roost_broker: RoostBroker) -> None:
    client = RawClient(roost_broker.port)
    try:
        client.send(PROTOCOL_HEADER)
        client.expect(C.Connection.Start)
        client.send_frame(
            C.Connection.StartOk(client_properties={}, mechanism="PLAIN", response="\0guest\0guest")
        )
        client.expect(C.Connection.Tune)
        client.send_frame(C.Channel.Open(), 1)
        assert_connection_closed(client, 503)
    finally:
        client.close()


def test_message_too_large_closes_only_the_channel() -> None:
    with RoostBroker(max_message_size=1000) as broker:
        client = connect(broker.port, frame_max=4096)
        try:
            client.open_channel(1)
            client.open_channel(2)
            client.send_frame(C.Queue.Declare(queue="big", exclusive=True), 2)
            client.expect(C.Queue.DeclareOk)
            body = b"b" * 5000
            chunks = [body[i : i + 4088] for i in range(0, len(body), 4088)]
            client.send(
                publish_frame()
                + header_frame(len(body))
                + b"".join(raw_frame(3, 1, c) for c in chunks)
            )
            channel, close = next_non_heartbeat(client)
            assert channel == 1 and isinstance(close, C.Channel.Close)
            assert close.reply_code == 406
            assert close.reply_text == (
                "PRECONDITION_FAILED - message size 5000 is larger than configured max size 1000"
            )
            assert (close.class_id, close.method_id) == (60, 40)
            client.send_frame(C.Channel.CloseOk(), 1)
            # The skipped body did not desynchronise the stream: channel 2
            # and a reopened channel 1 still work.
            client.send(
                method_frame(C.Basic.Publish(exchange="", routing_key="big"), 2)
                + header_frame(3, channel=2)
                + raw_frame(3, 2, b"ok!")
            )
            client.send_frame(C.Basic.Get(queue="big", no_ack=True), 2)
            client.expect(C.Basic.GetOk)
            client.expect(pheader.ContentHeader)
            got = client.expect(pbody.ContentBody)
            assert isinstance(got, pbody.ContentBody) and got.value == b"ok!"
            client.open_channel(1)
        finally:
            client.close()
