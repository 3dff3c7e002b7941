"""Channel lifecycle over real sockets: open/close, reuse, channel.flow,
channel_max and the connection errors for misused channels."""

from __future__ import annotations

import pika
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import header as pheader

from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.wire_helpers import (
    assert_connection_closed,
    connect,
    next_non_heartbeat,
    open_connections,
    wait_for,
)


def publish(client: RawClient, channel: int, routing_key: str, body: bytes) -> None:
    client.send_frame(C.Basic.Publish(exchange="", routing_key=routing_key), channel)
    client.send_frame(pheader.ContentHeader(0, len(body), C.Basic.Properties()), channel)
    client.send_frame(pbody.ContentBody(body), channel)


def test_open_and_close_raw(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.send_frame(C.Channel.Open(), 1)
        channel, frame = next_non_heartbeat(client)
        assert channel == 1 and isinstance(frame, C.Channel.OpenOk)
        client.send_frame(
            C.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 1
        )
        channel, frame = next_non_heartbeat(client)
        assert channel == 1 and isinstance(frame, C.Channel.CloseOk)
        [conn] = open_connections(roost_broker)
        assert roost_broker.call(lambda: list(conn.channels)) == []
    finally:
        client.close()


def test_open_and_close_with_pika(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        channels = [conn.channel() for _ in range(5)]
        assert [c.channel_number for c in channels] == [1, 2, 3, 4, 5]
        channels[2].close()
        assert channels[2].is_closed
        # The others carry on.
        for ch in (channels[0], channels[4]):
            q = ch.queue_declare("", exclusive=True).method.queue
            ch.basic_publish("", q, b"x")
            method, _, body = ch.basic_get(q, auto_ack=True)
            assert method is not None and body == b"x"
        [server_side] = open_connections(roost_broker)
        assert sorted(roost_broker.call(lambda: list(server_side.channels))) == [1, 2, 4, 5]
    finally:
        conn.close()


def test_channel_number_reused_after_close(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Basic.Qos(prefetch_count=1), 1)
        client.expect(C.Basic.QosOk)
        client.send_frame(
            C.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 1
        )
        client.expect(C.Channel.CloseOk)
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="reused", exclusive=True), 1)
        ok = client.expect(C.Queue.DeclareOk)
        assert isinstance(ok, C.Queue.DeclareOk) and ok.queue == "reused"
    finally:
        client.close()


def test_channel_reused_after_server_closed_it(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="nope", passive=True), 1)
        close = client.expect(C.Channel.Close)
        assert isinstance(close, C.Channel.Close) and close.reply_code == 404
        client.send_frame(C.Channel.CloseOk(), 1)
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="", exclusive=True), 1)
        client.expect(C.Queue.DeclareOk)
    finally:
        client.close()


def test_methods_after_server_close_are_ignored_until_close_ok(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="nope", passive=True), 1)
        client.send_frame(C.Basic.Qos(prefetch_count=5), 1)  # in flight, dropped
        client.expect(C.Channel.Close)
        client.send_frame(C.Channel.CloseOk(), 1)
        client.open_channel(2)  # next frame is this, not a qos-ok
    finally:
        client.close()


# -- channel.flow -------------------------------------------------------------------


def test_flow_stops_and_resumes_deliveries(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)  # consumer
        client.open_channel(2)  # publisher, with confirms
        client.send_frame(C.Queue.Declare(queue="flowq", exclusive=True), 1)
        client.expect(C.Queue.DeclareOk)
        client.send_frame(C.Basic.Consume(queue="flowq", consumer_tag="c1", no_ack=True), 1)
        client.expect(C.Basic.ConsumeOk)
        client.send_frame(C.Confirm.Select(), 2)
        client.expect(C.Confirm.SelectOk)

        publish(client, 2, "flowq", b"one")
        deliver = client.expect(C.Basic.Deliver)
        assert isinstance(deliver, C.Basic.Deliver) and deliver.consumer_tag == "c1"
        client.expect(pheader.ContentHeader)
        client.expect(pbody.ContentBody)
        client.expect(C.Basic.Ack)

        client.send_frame(C.Channel.Flow(active=False), 1)
        ok = client.expect(C.Channel.FlowOk)
        assert isinstance(ok, C.Channel.FlowOk) and ok.active is False

        # A delivery would be written before the publish's confirm.
        publish(client, 2, "flowq", b"two")
        channel, frame = next_non_heartbeat(client)
        assert (channel, type(frame)) == (2, C.Basic.Ack)

        client.send_frame(C.Channel.Flow(active=True), 1)
        ok = client.expect(C.Channel.FlowOk)
        assert isinstance(ok, C.Channel.FlowOk) and ok.active is True
        client.expect(C.Basic.Deliver)
        client.expect(pheader.ContentHeader)
        body = client.expect(pbody.ContentBody)
        assert isinstance(body, pbody.ContentBody) and body.value == b"two"
    finally:
        client.close()


def test_flow_does_not_stop_basic_get(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="flowget", exclusive=True), 1)
        client.expect(C.Queue.DeclareOk)
        client.send_frame(C.Channel.Flow(active=False), 1)
        client.expect(C.Channel.FlowOk)
        publish(client, 1, "flowget", b"g")
        client.send_frame(C.Basic.Get(queue="flowget", no_ack=True), 1)
        client.expect(C.Basic.GetOk)
    finally:
        client.close()


# -- channel_max ------------------------------------------------------------------


def test_channel_max_limits_open_channels(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, channel_max=2)
    try:
        client.open_channel(1)
        client.open_channel(2)
        client.send_frame(C.Channel.Open(), 3)
        assert_connection_closed(
            client,
            530,
            "NOT_ALLOWED - number of channels opened (2) has reached the "
            "negotiated channel_max (2)",
            class_id=0,
            method_id=0,
        )
    finally:
        client.close()


def test_channel_max_counts_channels_not_numbers(roost_broker: RoostBroker) -> None:
    # RabbitMQ lets a client pick any channel number while fewer than
    # channel_max channels are open.
    client = connect(roost_broker.port, channel_max=2)
    try:
        client.open_channel(7)
        client.send_frame(
            C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 7
        )
        client.expect(C.Channel.CloseOk)
        client.open_channel(1)
        client.open_channel(65535)
        client.send_frame(C.Queue.Declare(queue="", exclusive=True), 65535)
        client.expect(C.Queue.DeclareOk)
    finally:
        client.close()


def test_pika_channel_max(roost_broker: RoostBroker) -> None:
    params = pika.URLParameters(roost_broker.url + "?channel_max=3")
    conn = pika.BlockingConnection(params)
    try:
        channels = [conn.channel() for _ in range(3)]
        assert all(c.is_open for c in channels)
        [server_side] = open_connections(roost_broker)
        assert server_side.channel_max == 3
    finally:
        conn.close()


# -- misused channels -------------------------------------------------------------


def test_method_on_unopened_channel(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.send_frame(C.Basic.Qos(prefetch_count=1), 5)
        assert_connection_closed(
            client, 504, "CHANNEL_ERROR - expected 'channel.open'", class_id=60, method_id=10
        )
    finally:
        client.close()


def test_publish_on_unopened_channel(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        publish(client, 3, "q", b"x")
        assert_connection_closed(
            client, 504, "CHANNEL_ERROR - expected 'channel.open'", class_id=60, method_id=40
        )
    finally:
        client.close()


def test_method_on_closed_channel(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(
            C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1
        )
        client.expect(C.Channel.CloseOk)
        client.send_frame(C.Queue.Declare(queue="x"), 1)
        assert_connection_closed(
            client, 504, "CHANNEL_ERROR - expected 'channel.open'", class_id=50, method_id=10
        )
    finally:
        client.close()


def test_second_channel_open(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Channel.Open(), 1)
        assert_connection_closed(
            client,
            504,
            "CHANNEL_ERROR - second 'channel.open' seen",
            class_id=20,
            method_id=10,
        )
    finally:
        client.close()


def test_channel_method_on_channel_zero(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.send_frame(C.Channel.Open(), 0)
        assert_connection_closed(
            client,
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            class_id=20,
            method_id=10,
        )
    finally:
        client.close()


def test_basic_method_on_channel_zero(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.send_frame(C.Basic.Qos(prefetch_count=1), 0)
        assert_connection_closed(client, 504, class_id=60, method_id=10)
    finally:
        client.close()


def test_connection_method_on_a_channel(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(C.Connection.UpdateSecret(new_secret="s", reason="r"), 1)
        assert_connection_closed(client, 503, class_id=10, method_id=70)
    finally:
        client.close()


def test_channel_error_leaves_other_connections_alone(roost_broker: RoostBroker) -> None:
    good = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = good.channel()
        ch.queue_declare("kept")
        bad = connect(roost_broker.port)
        bad.send_frame(C.Basic.Qos(), 9)
        assert_connection_closed(bad, 504)
        bad.close()
        wait_for(lambda: len(open_connections(roost_broker)) == 1)
        ch.basic_publish("", "kept", b"still here")
        method, _, body = ch.basic_get("kept", auto_ack=True)
        assert method is not None and body == b"still here"
    finally:
        good.close()
