"""AMQP ingress (issue 12, items 1 and 5): nothing is buffered for a client
before it may publish, unfinished messages are bounded in size and time,
and dead-lettering does not trust the headers a client wrote."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pika
import pytest
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import encode
from pamqp import frame as pframe
from pamqp import header as pheader

from roost.amqp.connection import AMQPConnection
from roost.amqp.wire import PROTOCOL_HEADER
from roost.config import ConfigError, load_config
from roost.resources import rss
from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.security.helpers import broker_of, wait_for

MB = 1024 * 1024


def marshal(frame: object, channel: int) -> bytes:
    return bytes(pframe.marshal(frame, channel))  # type: ignore[arg-type]


def publish_start(channel: int, body_size: int) -> bytes:
    """basic.publish and a content header announcing ``body_size`` bytes."""
    return marshal(C.Basic.Publish(exchange="", routing_key="q"), channel) + marshal(
        pheader.ContentHeader(0, body_size, C.Basic.Properties()), channel
    )


def body_frames(channel: int, total: int, frame: int = 4000) -> bytes:
    one = marshal(pbody.ContentBody(b"x" * frame), channel)
    return one * (total // frame)


def close_received(client: RawClient, timeout: float = 10.0) -> C.Connection.Close:
    client.sock.settimeout(timeout)
    fr = client.expect(C.Connection.Close)
    assert isinstance(fr, C.Connection.Close)
    return fr


@pytest.fixture
def broker() -> Iterator[RoostBroker]:
    with RoostBroker(
        max_message_size=16 * MB, unfinished_message_timeout=1, max_unfinished_bytes=2 * MB
    ) as rb:
        yield rb


@pytest.fixture
def plain() -> Iterator[RoostBroker]:
    """A broker with the default settings."""
    with RoostBroker() as rb:
        yield rb


def test_unauthenticated_body_stream_is_refused_and_memory_stays_bounded() -> None:
    """Content before login is a protocol error at its basic.publish frame:
    the broker closes the connection at once and keeps nothing of what
    follows. The bound: the process's RSS grows by less than 64 MB while
    one socket sends 200 MB of body frames (on 20 channels of 10 MB each)
    without logging in (today's main keeps all of it)."""
    with RoostBroker() as rb:
        before = rss()
        client = RawClient(rb.port)
        chunk = b"".join(body_frames(ch, MB) for ch in range(1, 21))
        client.send(PROTOCOL_HEADER + b"".join(publish_start(ch, 10 * MB) for ch in range(1, 21)))
        sent = 0
        try:
            while sent < 200 * MB:
                client.send(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the broker hung up: nothing more to send
        grown = rss() - before
        client.sock.settimeout(10)
        client.expect(C.Connection.Start)
        close = close_received(client)
        assert close.reply_code == 503, close.reply_text
        assert "before connection.open" in close.reply_text
        assert grown < 64 * MB, f"RSS grew by {grown // MB} MB"
        client.sock.close()


def test_publish_on_unopened_channel_refused_before_its_body(plain: RoostBroker) -> None:
    """A logged-in client's publish on a channel it never opened: 504 at
    the publish frame, without waiting for (and keeping) the body."""
    client = RawClient(plain.port)
    client.handshake()
    client.send(publish_start(7, 8 * MB) + body_frames(7, 64_000))
    close = close_received(client)
    assert close.reply_code == 504
    assert close.reply_text == "CHANNEL_ERROR - expected 'channel.open'"
    assert (close.class_id, close.method_id) == (60, 40)
    client.sock.close()


def open_channel(client: RawClient, channel: int = 1) -> None:
    client.handshake()
    client.open_channel(channel)


def test_unfinished_bytes_capped_per_connection(broker: RoostBroker) -> None:
    """Several half-sent messages together beyond max_unfinished_bytes
    (2 MB here): the connection is closed with 506."""
    client = RawClient(broker.port)
    open_channel(client, 1)
    client.open_channel(2)
    client.send(publish_start(1, 4 * MB) + publish_start(2, 4 * MB))
    client.send(body_frames(1, 1_200_000, 100_000) + body_frames(2, 1_200_000, 100_000))
    close = close_received(client)
    assert close.reply_code == 506
    assert "per connection" in close.reply_text
    client.sock.close()


def test_unfinished_properties_count_against_the_cap(broker: RoostBroker) -> None:
    """Content headers of messages whose bodies never come are held too:
    40 channels with 100 KB of properties each pass the 2 MB cap."""
    client = RawClient(broker.port)
    open_channel(client, 1)
    for n in range(2, 41):
        client.open_channel(n)
    props = C.Basic.Properties(headers={"pad": "p" * 100_000})
    client.send(
        b"".join(
            marshal(C.Basic.Publish(exchange="", routing_key="q"), n)
            + marshal(pheader.ContentHeader(0, 10, props), n)
            for n in range(1, 41)
        )
    )
    close = close_received(client)
    assert close.reply_code == 506
    assert "per connection" in close.reply_text
    client.sock.close()


def test_message_held_unfinished_too_long_closes_the_connection(broker: RoostBroker) -> None:
    """unfinished_message_timeout (1 s here): a message started and never
    completed closes its connection with 506 (within a generous bound); a
    message completed in time does not."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as conn:
        ch = conn.channel()
        ch.queue_declare("q")
    client = RawClient(broker.port)
    open_channel(client, 1)
    client.send(publish_start(1, 10) + marshal(pbody.ContentBody(b"12345"), 1))
    started = time.monotonic()
    close = close_received(client, timeout=15)
    assert close.reply_code == 506
    assert "unfinished_message_timeout" in close.reply_text
    assert time.monotonic() - started < 15
    client.sock.close()
    # Complete messages, however many, are not affected.
    client = RawClient(broker.port)
    open_channel(client, 1)
    client.send_frame(C.Basic.Qos(prefetch_count=0), 1)
    client.expect(C.Basic.QosOk)
    for _ in range(3):
        client.send(publish_start(1, 5) + marshal(pbody.ContentBody(b"12345"), 1))
        time.sleep(0.6)
    client.send_frame(C.Queue.Declare(queue="q", passive=True), 1)
    ok = client.expect(C.Queue.DeclareOk)
    assert isinstance(ok, C.Queue.DeclareOk) and ok.message_count == 3
    client.sock.close()


def test_unfinished_message_blocked_by_memory_alarm(plain: RoostBroker) -> None:
    """While the memory alarm is set, a connection in the middle of a
    message is no longer read, as one that completed a publish."""
    client = RawClient(plain.port)
    open_channel(client, 1)
    b = broker_of(plain)
    plain.call(lambda: b.set_alarm("memory", "test"))
    try:
        client.send(publish_start(1, MB) + body_frames(1, 100_000))

        def paused() -> bool:
            return plain.call(
                lambda: any(cast(AMQPConnection, c).flow.reading_paused for c in b.connections)
            )

        wait_for(paused, timeout=10)
    finally:
        plain.call(lambda: b.clear_alarm("memory", "test"))
        client.sock.close()


def dead_letter_setup(ch: pika.adapters.blocking_connection.BlockingChannel) -> None:
    ch.queue_declare("dead")
    ch.queue_declare(
        "src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
    )


def reject_one(ch: pika.adapters.blocking_connection.BlockingChannel) -> None:
    method, _, _ = ch.basic_get("src")
    assert method is not None
    ch.basic_reject(method.delivery_tag, requeue=False)


def get_dead(
    ch: pika.adapters.blocking_connection.BlockingChannel,
) -> tuple[pika.BasicProperties, bytes]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get("dead", auto_ack=True)
        if method is not None:
            return props, body
        time.sleep(0.05)
    raise AssertionError("nothing was dead-lettered")


def test_cc_elements_that_are_not_strings_are_ignored_when_dead_lettering(
    plain: RoostBroker,
) -> None:
    """A CC array with an integer (2**40) and a table: both ignored, as by
    RabbitMQ's header_routes; today's main allocates a buffer of that many
    bytes for the integer when the message is dead-lettered."""
    with pika.BlockingConnection(pika.URLParameters(plain.url)) as conn:
        ch = conn.channel()
        dead_letter_setup(ch)
        ch.basic_publish(
            "",
            "src",
            b"m",
            pika.BasicProperties(headers={"CC": ["other", 2**40, {"t": 1}]}),
        )
        reject_one(ch)
        props, body = get_dead(ch)
        assert body == b"m"
        [death] = props.headers["x-death"]
        assert death["routing-keys"] == ["src", "other"]


def test_malformed_x_death_is_dropped_not_trusted(plain: RoostBroker) -> None:
    """An x-death of the wrong types (not a table, a count that is a
    string): the bad entries are dropped, the message is dead-lettered."""
    with pika.BlockingConnection(pika.URLParameters(plain.url)) as conn:
        ch = conn.channel()
        dead_letter_setup(ch)
        bad = [1, "x", {"queue": "src", "reason": "rejected", "count": "9" * 5000}, {"q": 1}]
        ch.basic_publish("", "src", b"m", pika.BasicProperties(headers={"x-death": bad}))
        reject_one(ch)
        props, _ = get_dead(ch)
        [death] = props.headers["x-death"]
        assert death["queue"] == "src" and death["count"] == 1


def test_dead_lettered_header_fits_the_smallest_frame_max(plain: RoostBroker) -> None:
    """A client-written x-death of about 110 KB: the dead-lettered message's
    header is trimmed (oldest entries first) to fit the content header
    frame of a consumer that negotiated frame_max=4096, and handling it
    stays cheap (a generous bound: 20 s for 20 round trips)."""
    entries = [
        {"queue": f"q{i:05d}", "reason": "expired", "count": 1, "exchange": "x" * 40}
        for i in range(1100)
    ]
    with pika.BlockingConnection(pika.URLParameters(plain.url)) as conn:
        ch = conn.channel()
        dead_letter_setup(ch)
        ch.basic_publish("", "src", b"m", pika.BasicProperties(headers={"x-death": entries}))
        started = time.monotonic()
        for _ in range(20):
            reject_one(ch)
            props, body = get_dead(ch)
            ch.basic_publish("", "src", body, props)
        assert time.monotonic() - started < 20
    small = pika.URLParameters(plain.url)
    small.frame_max = 4096
    with pika.BlockingConnection(small) as conn:
        ch = conn.channel()
        reject_one(ch)
        props, _ = get_dead(ch)
        deaths = props.headers["x-death"]
        assert deaths[0]["queue"] == "src" and deaths[0]["reason"] == "rejected"
        assert 1 <= len(deaths) <= 32
        # Re-encoded as received (a timestamp comes back as a same-sized int).
        header = pheader.ContentHeader(0, 1, C.Basic.Properties(headers=props.headers))
        assert len(marshal(header, 1)) <= 4096


def amqplain_nested(depth: int) -> bytes:
    """An AMQPLAIN response whose LOGIN is a table nested ``depth`` deep."""
    inner = b"\x01aS\x00\x00\x00\x01x"
    for _ in range(depth):
        inner = b"\x01aF" + struct.pack(">I", len(inner)) + inner
    return b"\x05LOGINF" + struct.pack(">I", len(inner)) + inner + b"\x08PASSWORDS\x00\x00\x00\x01x"


@pytest.mark.parametrize("depth", [1, 560])
def test_nested_amqplain_response_is_a_refused_login(
    plain: RoostBroker, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A table (or one nested 560 deep, past pamqp's recursion) where AMQPLAIN wants a string:
    403 like any failed login, and no traceback in the log."""
    client = RawClient(plain.port)
    client.send(PROTOCOL_HEADER)
    client.expect(C.Connection.Start)
    # Framed by hand: pamqp takes the response only as text.
    caps = bytes(encode.field_table({"capabilities": {"authentication_failure_close": True}}))
    response = amqplain_nested(depth)
    payload = (
        struct.pack(">HH", 10, 11)
        + caps
        + b"\x08AMQPLAIN"
        + struct.pack(">I", len(response))
        + response
        + b"\x05en_US"
    )
    client.send(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
    close = close_received(client)
    assert close.reply_code == 403
    assert "AMQPLAIN" in close.reply_text
    client.sock.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_unfinished_message_options(tmp_path: Path) -> None:
    """Both options from the environment, a TOML file and the command line;
    negative values are refused with a plain message."""
    cfg = load_config(env={"ROOST_MAX_UNFINISHED_BYTES": "1000000"})
    assert cfg.max_unfinished_bytes == 1_000_000
    assert cfg.unfinished_message_timeout == 60
    toml = tmp_path / "roost.toml"
    toml.write_text("unfinished_message_timeout = 5\n")
    assert load_config(str(toml), env={}).unfinished_message_timeout == 5
    cfg = load_config(env={}, overrides={"unfinished_message_timeout": 0})
    assert cfg.unfinished_message_timeout == 0
    for name in ("max_unfinished_bytes", "unfinished_message_timeout"):
        with pytest.raises(ConfigError, match=name):
            load_config(env={}, overrides={name: -1})
    flags = subprocess.run(
        [sys.executable, "-m", "roost", "serve", "--help"], capture_output=True, text=True
    ).stdout
    assert "--max-unfinished-bytes" in flags and "--unfinished-message-timeout" in flags


def nested_headers(depth: int) -> bytes:
    """A property list whose headers hold a table nested ``depth`` deep."""
    inner = b"\x01aS\x00\x00\x00\x01x"
    for _ in range(depth):
        inner = b"\x01aF" + struct.pack(">I", len(inner)) + inner
    table = b"\x01nF" + struct.pack(">I", len(inner)) + inner
    return struct.pack(">HI", 0x2000, len(table)) + table


def test_headers_nested_too_deep_are_refused_at_publish(plain: RoostBroker) -> None:
    """A headers table nested 490 deep decoded at publish but not when the
    message was dead-lettered (deeper in the stack): a RecursionError
    killed the connection with a traceback. Tables nested more than 128
    deep are now refused at publish (501, as other malformed headers);
    128 levels are accepted and dead-lettered."""
    with pika.BlockingConnection(pika.URLParameters(plain.url)) as conn:
        dead_letter_setup(conn.channel())
    # 126 wrappers, the table holding them and the headers table: 128 levels.
    for depth, refused in ((126, False), (490, True)):
        client = RawClient(plain.port)
        client.handshake()
        client.open_channel(1)
        props = nested_headers(depth)
        header = struct.pack(">HHQ", 60, 0, 1) + props
        client.send(
            marshal(C.Basic.Publish(exchange="", routing_key="src"), 1)
            + struct.pack(">BHI", 2, 1, len(header))
            + header
            + b"\xce"
            + marshal(pbody.ContentBody(b"m"), 1)
        )
        client.send_frame(C.Basic.Get(queue="src"), 1)
        if refused:
            close = close_received(client)
            assert close.reply_code == 501
            assert "nested more than 128 levels" in close.reply_text
        else:
            ok = client.expect(C.Basic.GetOk)
            assert isinstance(ok, C.Basic.GetOk)
            client.recv_frame()
            client.recv_frame()
            client.send_frame(C.Basic.Reject(delivery_tag=ok.delivery_tag, requeue=False), 1)
            client.send_frame(C.Basic.Get(queue="dead"), 1)
            assert isinstance(client.expect(C.Basic.GetOk), C.Basic.GetOk)
        client.sock.close()
