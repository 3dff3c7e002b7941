"""Consumer (delivery acknowledgement) timeout.

As in RabbitMQ 3.x: a channel that holds an unacknowledged delivery longer
than the timeout is closed with 406 PRECONDITION_FAILED, class and method
id 0, and the text RabbitMQ uses (rabbit_channel's
``evaluate_consumer_timeout``); its unacked messages are requeued. The
default comes from the ``consumer_timeout`` setting (ms, 0 disables); a
queue's ``x-consumer-timeout`` argument overrides it for its deliveries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pamqp import commands as C

from roost.config import load_config
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
    sync,
)

TIMEOUT_MS = 300


def timeout_text(channel: int, ms: int) -> str:
    return (
        f"PRECONDITION_FAILED - delivery acknowledgement on channel {channel} timed out. "
        f"Timeout value used: {ms} ms. This timeout value can be configured, see consumers "
        "doc guide to learn more"
    )


@pytest.fixture(scope="module")
def broker() -> Iterator[RoostBroker]:
    with RoostBroker(consumer_timeout=TIMEOUT_MS) as b:
        yield b


@pytest.fixture(scope="module")
def no_default_broker() -> Iterator[RoostBroker]:
    with RoostBroker(consumer_timeout=0) as b:
        yield b


@pytest.fixture
def client(broker: RoostBroker) -> Iterator[RawClient]:
    c = connect(broker.port, channels=2)
    yield c
    c.close()


def consume(
    client: RawClient, queue: str, tag: str, *, channel: int = 1, no_ack: bool = False
) -> None:
    client.send_frame(C.Basic.Consume(queue=queue, consumer_tag=tag, no_ack=no_ack), channel)
    expect_method(client, C.Basic.ConsumeOk, channel)


def assert_timed_out(client: RawClient, channel: int, ms: int) -> None:
    close = expect_channel_close(client, channel)
    assert close.reply_code == 406
    assert close.reply_text == timeout_text(channel, ms)
    assert (close.class_id, close.method_id) == (0, 0)


def test_unacked_delivery_closes_the_channel_and_is_requeued(
    broker: RoostBroker, client: RawClient
) -> None:
    declare_queue(client, "slow")
    publish(client, "", "slow", b"work")
    consume(client, "slow", "holder")
    first = next_message(client)
    assert first.body == b"work" and not first.method.redelivered
    assert_timed_out(client, 1, TIMEOUT_MS)
    # Only the channel went: the connection and its other channel still work.
    assert sync(client, "slow", channel=2) == (1, 0)
    other = connect(broker.port)
    consume(other, "slow", "rescuer")
    again = next_message(other)
    assert again.body == b"work"
    assert again.method.redelivered
    other.send_frame(C.Basic.Ack(delivery_tag=again.method.delivery_tag), 1)
    assert sync(other, "slow") == (0, 1)
    other.close()
    client.send_frame(C.Queue.Delete(queue="slow"), 2)
    expect_method(client, C.Queue.DeleteOk, 2)


def test_channel_that_acks_in_time_stays_open(client: RawClient) -> None:
    declare_queue(client, "prompt", exclusive=True)
    consume(client, "prompt", "c")
    start = time.monotonic()
    n = 0
    # Deliveries keep coming for longer than the timeout, each acked at once.
    while time.monotonic() - start < 2 * TIMEOUT_MS / 1000:
        n += 1
        publish(client, "", "prompt", b"%d" % n)
        msg = next_message(client)
        assert msg.body == b"%d" % n
        client.send_frame(C.Basic.Ack(delivery_tag=msg.method.delivery_tag), 1)
        time.sleep(0.05)
    time.sleep(2 * TIMEOUT_MS / 1000)  # let any armed timer fire
    assert sync(client, "prompt") == (0, 1)


def test_no_ack_consumer_is_never_timed_out(client: RawClient) -> None:
    declare_queue(client, "auto", exclusive=True)
    consume(client, "auto", "c", no_ack=True)
    publish(client, "", "auto", b"m")
    assert next_message(client).body == b"m"
    time.sleep(2 * TIMEOUT_MS / 1000)
    assert sync(client, "auto") == (0, 1)


def test_basic_get_without_ack_times_out(client: RawClient) -> None:
    declare_queue(client, "got")
    publish(client, "", "got", b"g")
    got = basic_get(client, "got")
    assert got is not None and got.body == b"g"
    assert_timed_out(client, 1, TIMEOUT_MS)
    again = basic_get(client, "got", channel=2, no_ack=True)
    assert again is not None and again.body == b"g" and again.method.redelivered
    client.send_frame(C.Queue.Delete(queue="got"), 2)
    expect_method(client, C.Queue.DeleteOk, 2)


def test_nack_with_requeue_and_redelivery_restarts_the_clock(client: RawClient) -> None:
    declare_queue(client, "bounce", exclusive=True)
    consume(client, "bounce", "c")
    publish(client, "", "bounce", b"b")
    start = time.monotonic()
    # Settled in time again and again (nack+requeue, redelivered at once):
    # every delivery is fresh, so the channel survives past the timeout.
    while time.monotonic() - start < 2 * TIMEOUT_MS / 1000:
        msg = next_message(client)
        client.send_frame(C.Basic.Nack(delivery_tag=msg.method.delivery_tag, requeue=True), 1)
        time.sleep(0.05)
    msg = next_message(client)
    client.send_frame(C.Basic.Ack(delivery_tag=msg.method.delivery_tag), 1)
    assert sync(client, "bounce") == (0, 1)


def test_queue_argument_applies_when_the_default_is_disabled(
    no_default_broker: RoostBroker,
) -> None:
    client = connect(no_default_broker.port, channels=2)
    declare_queue(client, "plain", exclusive=True)
    declare_queue(client, "timed", exclusive=True, arguments={"x-consumer-timeout": 200})
    publish(client, "", "plain", b"p")
    publish(client, "", "timed", b"t")
    consume(client, "plain", "p", channel=1)
    assert next_message(client).body == b"p"
    consume(client, "timed", "t", channel=2)
    assert_timed_out(client, 2, 200)
    # Channel 1's delivery is older than 200 ms but has no timeout at all.
    assert sync(client, "plain", channel=1) == (0, 1)
    assert sync(client, "timed", channel=1) == (1, 0)
    client.close()


def test_shorter_queue_timeout_wins_on_a_shared_channel() -> None:
    with RoostBroker(consumer_timeout=60_000) as broker:
        client = connect(broker.port)
        declare_queue(client, "long", exclusive=True)
        declare_queue(client, "short", exclusive=True, arguments={"x-consumer-timeout": 150})
        publish(client, "", "long", b"l")
        publish(client, "", "short", b"s")
        consume(client, "long", "l")
        assert next_message(client).body == b"l"
        consume(client, "short", "s")
        assert_timed_out(client, 1, 150)
        client.close()


def test_consumer_timeout_setting() -> None:
    assert load_config(env={}).consumer_timeout == 1_800_000  # RabbitMQ's default
    assert load_config(env={"ROOST_CONSUMER_TIMEOUT": "5000"}).consumer_timeout == 5000
    assert load_config(env={}, overrides={"consumer_timeout": 0}).consumer_timeout == 0
    with pytest.raises(ValueError, match="consumer_timeout"):
        load_config(env={"ROOST_CONSUMER_TIMEOUT": "-1"})
    out = subprocess.run(
        [sys.executable, "-m", "roost", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "--consumer-timeout CONSUMER_TIMEOUT" in out
    assert "env ROOST_CONSUMER_TIMEOUT" in out
