"""Connection-level behaviour over real sockets: handshake, authentication,
tuning, heartbeats, close in both directions, update-secret and resource
alarms (connection.blocked)."""

from __future__ import annotations

import threading
import time
from typing import cast

import amqpstorm.connection
import amqpstorm.message
import kombu.connection
import kombu.entity
import pika
import pytest
from pamqp import commands as C
from pamqp import heartbeat as pheartbeat
from pika import exceptions as pika_exc

from roost.amqp.wire import PROTOCOL_HEADER
from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.wire_helpers import (
    assert_connection_closed,
    connect,
    finish_handshake,
    open_connections,
    queue_depth,
    start_ok,
    wait_for,
)

CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}
LOGIN_REFUSED = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism {}. "
    "For details see the broker logfile."
)


def pika_params(broker: RoostBroker, **kw: object) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=broker.port,
        credentials=kw.pop("credentials", pika.PlainCredentials("guest", "guest")),
        **kw,
    )


def round_trip(conn: pika.BlockingConnection, body: bytes = b"ping") -> bytes:
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, body)
    method, _, got = ch.basic_get(q, auto_ack=True)
    assert method is not None
    ch.close()
    return cast(bytes, got)


# -- connection.start and login --------------------------------------------------


def test_connection_start_contents(raw: RawClient) -> None:
    raw.send(PROTOCOL_HEADER)
    start = raw.expect(C.Connection.Start)
    assert isinstance(start, C.Connection.Start)
    assert (start.version_major, start.version_minor) == (0, 9)
    props = start.server_properties
    assert props["product"] == "roost"
    assert props["capabilities"] == CAPABILITIES
    for key in ("version", "platform", "copyright", "information", "cluster_name"):
        assert isinstance(props[key], str) and props[key], key
    assert start.mechanisms == "PLAIN AMQPLAIN"
    assert start.locales == "en_US"


def test_pika_sees_server_properties(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    try:
        props = conn._impl.server_properties
        assert props["product"] == "roost"
        assert conn.publisher_confirms_supported
        assert conn.basic_nack_supported
        assert conn.consumer_cancel_notify_supported
        assert conn.exchange_exchange_bindings_supported
    finally:
        conn.close()


def test_plain_login_with_pika(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    try:
        assert round_trip(conn) == b"ping"
        [server_side] = open_connections(roost_broker)
        assert server_side.username == "guest"
        assert server_side.client_properties["product"] == "Pika Python Client Library"
    finally:
        conn.close()


def test_plain_login_raw(raw: RawClient) -> None:
    start_ok(raw, mechanism="PLAIN")
    tune = finish_handshake(raw)
    assert tune.channel_max == 2047


def test_amqplain_login_raw(raw: RawClient) -> None:
    start_ok(raw, mechanism="AMQPLAIN")
    finish_handshake(raw)
    raw.open_channel(1)


def test_amqplain_wrong_password_raw(raw: RawClient) -> None:
    start_ok(raw, mechanism="AMQPLAIN", password="nope")
    assert_connection_closed(raw, 403, LOGIN_REFUSED.format("AMQPLAIN"), class_id=0, method_id=0)


def test_amqplain_login_with_kombu(roost_broker: RoostBroker) -> None:
    url = f"pyamqp://guest:guest@127.0.0.1:{roost_broker.port}//"
    with kombu.connection.Connection(url, login_method="AMQPLAIN") as conn:
        conn.connect()
        queue = kombu.entity.Queue("kombu-amqplain", exclusive=True)
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key="kombu-amqplain", declare=[queue])
        message = conn.SimpleQueue(queue).get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()


def test_amqplain_wrong_password_with_kombu(roost_broker: RoostBroker) -> None:
    url = f"pyamqp://guest:bad@127.0.0.1:{roost_broker.port}//"
    with kombu.connection.Connection(url, login_method="AMQPLAIN") as conn:
        with pytest.raises(Exception, match="AMQPLAIN") as info:
            conn.connect()
        assert "ACCESS_REFUSED" in str(info.value)


def test_plain_login_with_amqpstorm(roost_broker: RoostBroker) -> None:
    conn = amqpstorm.connection.Connection("127.0.0.1", "guest", "guest", port=roost_broker.port)
    try:
        assert conn.is_open
        assert conn.server_properties["product"] == "roost"
        channel = conn.channel()
        channel.queue.declare("storm", exclusive=True)
        channel.basic.publish(b"hi", "storm")
        message = channel.basic.get("storm", no_ack=True)
        assert isinstance(message, amqpstorm.message.Message) and message.body == "hi"
    finally:
        conn.close()


def test_wrong_password_raw(raw: RawClient) -> None:
    start_ok(raw, password="wrong")
    assert_connection_closed(raw, 403, LOGIN_REFUSED.format("PLAIN"), class_id=0, method_id=0)


def test_unknown_user_raw(raw: RawClient) -> None:
    start_ok(raw, user="nobody")
    assert_connection_closed(raw, 403, LOGIN_REFUSED.format("PLAIN"))


def test_wrong_password_without_capability_just_closes(raw: RawClient) -> None:
    # Without authentication_failure_close the client gets no close frame.
    start_ok(raw, password="wrong", capabilities={})
    assert raw.closed(timeout=5.0)


def test_wrong_password_with_pika(roost_broker: RoostBroker) -> None:
    params = pika_params(roost_broker, credentials=pika.PlainCredentials("guest", "wrong"))
    with pytest.raises(pika_exc.ProbableAuthenticationError) as info:
        pika.BlockingConnection(params)
    assert "(403)" in str(info.value)
    assert LOGIN_REFUSED.format("PLAIN") in str(info.value)


def test_unknown_vhost_raw(raw: RawClient) -> None:
    start_ok(raw)
    tune = raw.expect(C.Connection.Tune)
    assert isinstance(tune, C.Connection.Tune)
    raw.send_frame(C.Connection.TuneOk(channel_max=0, frame_max=131072, heartbeat=0))
    raw.send_frame(C.Connection.Open(virtual_host="missing"))
    assert_connection_closed(
        raw, 530, "NOT_ALLOWED - vhost missing not found", class_id=10, method_id=40
    )


def test_unknown_vhost_with_pika(roost_broker: RoostBroker) -> None:
    with pytest.raises(pika_exc.ProbableAccessDeniedError) as info:
        pika.BlockingConnection(pika_params(roost_broker, virtual_host="missing"))
    assert "(530)" in str(info.value)


def test_added_vhost_is_usable(roost_broker: RoostBroker) -> None:
    assert roost_broker.server is not None
    b = roost_broker.server.broker
    roost_broker.call(lambda: b.add_vhost("tenant-a"))
    # As in RabbitMQ, a new vhost grants nobody access until permissions are set.
    roost_broker.call(lambda: b.permissions.update({("guest", "tenant-a"): (".*", ".*", ".*")}))
    conn = pika.BlockingConnection(pika_params(roost_broker, virtual_host="tenant-a"))
    try:
        assert round_trip(conn) == b"ping"
    finally:
        conn.close()


@pytest.mark.parametrize(
    "header",
    [b"AMQP\x00\x00\x09\x00", b"AMQP\x01\x01\x00\x0a", b"GET / HTTP/1.1\r\n\r\n"],
)
def test_wrong_protocol_header(raw: RawClient, header: bytes) -> None:
    raw.send(header)
    raw.sock.settimeout(5.0)
    received = b""
    while True:
        try:
            data = raw.sock.recv(100)
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    assert received == PROTOCOL_HEADER


def test_broker_keeps_serving_after_wrong_header(roost_broker: RoostBroker) -> None:
    bad = RawClient(roost_broker.port)
    bad.send(b"AMQP\x00\x00\x08\x00")
    assert bad.closed()
    bad.close()
    conn = pika.BlockingConnection(pika_params(roost_broker))
    try:
        assert round_trip(conn) == b"ping"
    finally:
        conn.close()


# -- tuning ---------------------------------------------------------------------


def test_tune_defaults(raw: RawClient) -> None:
    start_ok(raw)
    tune = raw.expect(C.Connection.Tune)
    assert isinstance(tune, C.Connection.Tune)
    assert (tune.channel_max, tune.frame_max, tune.heartbeat) == (2047, 131072, 60)


def test_tune_accepting_server_values(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, heartbeat=60)
    try:
        [conn] = open_connections(roost_broker)
        assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (2047, 131072, 60)
    finally:
        client.close()


def test_tune_negotiated_down_by_pika(roost_broker: RoostBroker) -> None:
    params = pika_params(roost_broker, channel_max=10, frame_max=8192, heartbeat=7)
    conn = pika.BlockingConnection(params)
    try:
        [server_side] = open_connections(roost_broker)
        assert server_side.channel_max == 10
        assert server_side.frame_max == 8192
        assert server_side.heartbeat == 7
        assert conn._impl.params.channel_max == 10
        assert conn._impl.params.frame_max == 8192
        # Bodies larger than frame_max travel split in both directions.
        body = bytes(range(256)) * 200
        assert round_trip(conn, body) == body
    finally:
        conn.close()


def test_frames_the_broker_sends_respect_negotiated_frame_max(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, frame_max=4096)
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="fm", exclusive=True), 1)
        client.expect(C.Queue.DeclareOk)
        client.send_frame(C.Basic.Publish(exchange="", routing_key="fm"), 1)
        from pamqp import body as pbody
        from pamqp import header as pheader

        data = b"q" * 10000
        client.send_frame(pheader.ContentHeader(0, len(data), C.Basic.Properties()), 1)
        for i in range(0, len(data), 4088):
            client.send_frame(pbody.ContentBody(data[i : i + 4088]), 1)
        client.send_frame(C.Basic.Get(queue="fm", no_ack=True), 1)
        client.expect(C.Basic.GetOk)
        client.expect(pheader.ContentHeader)
        sizes: list[int] = []
        while sum(sizes) < len(data):
            frame = client.expect(pbody.ContentBody)
            assert isinstance(frame, pbody.ContentBody)
            sizes.append(len(frame.value))
        assert sizes == [4088, 4088, 1824]
    finally:
        client.close()


def test_heartbeat_zero_from_client_disables_heartbeats(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, heartbeat=0)
    try:
        [conn] = open_connections(roost_broker)
        assert conn.heartbeat == 0
    finally:
        client.close()


def test_client_channel_max_above_server_is_refused(raw: RawClient) -> None:
    start_ok(raw)
    raw.expect(C.Connection.Tune)
    raw.send_frame(C.Connection.TuneOk(channel_max=4000, frame_max=131072, heartbeat=0))
    close = assert_connection_closed(raw, 530)
    assert "channel_max" in close.reply_text


def test_client_frame_max_below_minimum_is_refused(raw: RawClient) -> None:
    start_ok(raw)
    raw.expect(C.Connection.Tune)
    raw.send_frame(C.Connection.TuneOk(channel_max=0, frame_max=1024, heartbeat=0))
    close = assert_connection_closed(raw, 530)
    assert "frame_max" in close.reply_text


# -- heartbeats -------------------------------------------------------------------


def test_broker_sends_heartbeats(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, heartbeat=1)
    try:
        client.sock.settimeout(3.0)
        _, frame = client.recv_frame()
        assert isinstance(frame, pheartbeat.Heartbeat)
        # The client keeps answering, so the broker keeps the connection.
        client.send(pheartbeat.Heartbeat.marshal())
        _, frame = client.recv_frame()
        assert isinstance(frame, pheartbeat.Heartbeat)
    finally:
        client.close()


def test_silent_client_is_disconnected_after_two_intervals(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, heartbeat=1)
    try:
        began = time.monotonic()
        assert client.closed(timeout=6.0)
        # Not before two heartbeat intervals were missed.
        assert time.monotonic() - began >= 1.5
        wait_for(lambda: not open_connections(roost_broker))
    finally:
        client.close()


def test_pika_with_heartbeat_one_survives_idle(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker, heartbeat=1))
    try:
        [server_side] = open_connections(roost_broker)
        assert server_side.heartbeat == 1
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        assert conn.is_open
        assert round_trip(conn) == b"ping"
    finally:
        conn.close()


# -- closing -----------------------------------------------------------------------


def test_client_close_gets_close_ok(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.open_channel(1)
        client.send_frame(
            C.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
        )
        client.expect(C.Connection.CloseOk)
        assert client.closed()
        wait_for(lambda: not open_connections(roost_broker))
    finally:
        client.close()


def test_client_close_drops_exclusive_queues(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    ch = conn.channel()
    ch.queue_declare("mine", exclusive=True)
    conn.close()
    assert roost_broker.server is not None
    b = roost_broker.server.broker

    def gone() -> bool:
        vh = b.vhost("/")
        return vh is not None and "mine" not in vh.queues

    wait_for(lambda: roost_broker.call(gone))


def test_pika_close(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    conn.channel()
    conn.close()
    assert conn.is_closed
    wait_for(lambda: not open_connections(roost_broker))


def test_shutdown_closes_connections_with_connection_forced() -> None:
    broker = RoostBroker().start()
    try:
        client = connect(broker.port)
        conn = pika.BlockingConnection(pika_params(broker))
        stopper = threading.Thread(target=broker.stop)
        stopper.start()
        try:
            assert_connection_closed(
                client,
                320,
                "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                class_id=0,
                method_id=0,
            )
            with pytest.raises(pika_exc.ConnectionClosedByBroker) as info:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    conn.process_data_events(time_limit=0.1)
            assert info.value.reply_code == 320
        finally:
            stopper.join(10)
            client.close()
    finally:
        broker.stop()


def test_update_secret(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    try:
        client.send_frame(C.Connection.UpdateSecret(new_secret="guest", reason="rotation"))
        client.expect(C.Connection.UpdateSecretOk)
        client.open_channel(1)  # the connection carries on
    finally:
        client.close()


def test_method_before_handshake_finishes_is_refused(raw: RawClient) -> None:
    start_ok(raw)
    raw.expect(C.Connection.Tune)
    raw.send_frame(C.Connection.Open(virtual_host="/"))  # tune-ok skipped
    close = assert_connection_closed(raw, 503)
    assert (close.class_id, close.method_id) == (10, 40)


# -- resource alarms: connection.blocked / unblocked ---------------------------------


def _set_alarm(broker: RoostBroker, on: bool) -> None:
    assert broker.server is not None
    b = broker.server.broker
    if on:
        broker.call(lambda: b.set_alarm("memory"))
    else:
        broker.call(lambda: b.clear_alarm("memory"))


def test_blocked_and_unblocked_are_sent(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, capabilities={"connection.blocked": True})
    try:
        _set_alarm(roost_broker, True)
        blocked = client.expect(C.Connection.Blocked)
        assert isinstance(blocked, C.Connection.Blocked)
        assert blocked.reason == "low on memory"
        _set_alarm(roost_broker, False)
        client.expect(C.Connection.Unblocked)
    finally:
        client.close()


def test_blocked_sent_on_open_while_alarm_is_set(roost_broker: RoostBroker) -> None:
    _set_alarm(roost_broker, True)
    client = connect(roost_broker.port, capabilities={"connection.blocked": True})
    try:
        client.expect(C.Connection.Blocked)
        _set_alarm(roost_broker, False)
        client.expect(C.Connection.Unblocked)
    finally:
        client.close()


def test_no_blocked_without_the_capability(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port, capabilities={})
    try:
        _set_alarm(roost_broker, True)
        _set_alarm(roost_broker, False)
        # The next frame is the answer to this, not a blocked notification.
        client.send_frame(C.Channel.Open(), 1)
        client.expect(C.Channel.OpenOk)
    finally:
        client.close()


def test_pika_blocked_callbacks(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    events: list[str] = []
    conn.add_on_connection_blocked_callback(lambda _c, frame: events.append(frame.method.NAME))
    conn.add_on_connection_unblocked_callback(lambda _c, frame: events.append(frame.method.NAME))
    try:
        _set_alarm(roost_broker, True)

        def pump(n: int) -> bool:
            conn.process_data_events(time_limit=0.05)
            return len(events) >= n

        wait_for(lambda: pump(1))
        _set_alarm(roost_broker, False)
        wait_for(lambda: pump(2))
        assert events == ["Connection.Blocked", "Connection.Unblocked"]
    finally:
        conn.close()


def test_publisher_is_held_while_blocked(roost_broker: RoostBroker) -> None:
    from pamqp import body as pbody
    from pamqp import header as pheader

    def publish(client: RawClient, body: bytes) -> None:
        client.send_frame(C.Basic.Publish(exchange="", routing_key="held"), 1)
        client.send_frame(pheader.ContentHeader(0, len(body), C.Basic.Properties()), 1)
        client.send_frame(pbody.ContentBody(body), 1)

    client = connect(roost_broker.port, capabilities={"connection.blocked": True})
    try:
        client.open_channel(1)
        client.send_frame(C.Queue.Declare(queue="held"), 1)
        client.expect(C.Queue.DeclareOk)
        _set_alarm(roost_broker, True)
        client.expect(C.Connection.Blocked)
        # The publish that finds the broker blocked is the last one read.
        publish(client, b"first")
        wait_for(lambda: any(c.flow.reading_paused for c in open_connections(roost_broker)))
        count = queue_depth(roost_broker, "held")
        publish(client, b"second")
        publish(client, b"third")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert queue_depth(roost_broker, "held") == count
            time.sleep(0.02)
        _set_alarm(roost_broker, False)
        client.expect(C.Connection.Unblocked)
        wait_for(lambda: queue_depth(roost_broker, "held") == 3)
    finally:
        client.close()

    # Everything arrives, in order.
    conn = pika.BlockingConnection(pika_params(roost_broker))
    try:
        ch = conn.channel()
        bodies = []
        for _ in range(3):
            method, _, body = ch.basic_get("held", auto_ack=True)
            assert method is not None
            bodies.append(body)
        assert bodies == [b"first", b"second", b"third"]
    finally:
        conn.close()


def test_consumers_are_not_blocked(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika_params(roost_broker))
    try:
        ch = conn.channel()
        ch.queue_declare("drain")
        ch.basic_publish("", "drain", b"before")
        wait_for(lambda: queue_depth(roost_broker, "drain") == 1)
        # Only connections that publish during an alarm stop being read.
        _set_alarm(roost_broker, True)
        method, _, body = ch.basic_get("drain", auto_ack=True)
        assert method is not None and body == b"before"
    finally:
        _set_alarm(roost_broker, False)
        conn.close()
