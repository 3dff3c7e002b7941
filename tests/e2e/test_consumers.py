"""Consumers, basic.get and settling: consumer tags, exclusive and no-ack
consumers, consumer priorities, cancel, ack/nack/reject/recover, QoS and
requeueing of unacknowledged messages.

Most cases use RawClient on one connection: deliveries triggered by a
publish are written before the reply to any later method on that
connection, so a passive queue.declare round trip (``sync``) shows exactly
what was delivered without waiting. Behaviours were checked against
RabbitMQ 3.10.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pika
import pytest
from pamqp import commands as C

from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.basic_helpers import (
    Received,
    basic_get,
    collect_until,
    connect,
    declare_queue,
    expect_channel_close,
    expect_connection_close,
    expect_method,
    next_message,
    publish,
    sync,
    wait_for,
)


def consume(
    client: RawClient,
    queue: str,
    tag: str = "",
    channel: int = 1,
    *,
    no_ack: bool = False,
    exclusive: bool = False,
    arguments: dict[str, Any] | None = None,
) -> str:
    client.send_frame(
        C.Basic.Consume(
            queue=queue,
            consumer_tag=tag,
            no_ack=no_ack,
            exclusive=exclusive,
            arguments=arguments or {},
        ),
        channel,
    )
    ok = expect_method(client, C.Basic.ConsumeOk, channel)
    return str(ok.consumer_tag)


def qos(client: RawClient, count: int, channel: int = 1, *, global_: bool = False) -> None:
    client.send_frame(C.Basic.Qos(prefetch_count=count, global_=global_), channel)
    expect_method(client, C.Basic.QosOk, channel)


def publish_many(client: RawClient, queue: str, n: int, channel: int) -> None:
    for i in range(n):
        publish(client, "", queue, f"m{i}".encode(), channel=channel)


def delivered(client: RawClient, queue: str, channel: int = 1) -> tuple[list[Received], int]:
    """Deliveries received so far and the queue's ready count, via a sync round trip."""
    client.send_frame(C.Queue.Declare(queue=queue, passive=True), channel)
    messages, ok = collect_until(client, C.Queue.DeclareOk)
    return messages, int(ok.message_count)


def bodies(messages: list[Received]) -> list[bytes]:
    return [m.body for m in messages]


def tags_of(messages: list[Received]) -> list[str]:
    return [m.method.consumer_tag for m in messages]


@pytest.fixture
def client(roost_broker: RoostBroker) -> Any:
    c = connect(roost_broker.port, channels=2)
    yield c
    c.close()


# -- consumer tags ------------------------------------------------------


def test_server_generated_consumer_tags(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    first = consume(client, q)
    second = consume(client, q)
    assert first.startswith("amq.ctag-") and second.startswith("amq.ctag-")
    assert len(first) > len("amq.ctag-") + 8
    assert first != second
    publish(client, "", q, b"x", channel=2)
    msg = next_message(client)
    assert msg.method.consumer_tag in (first, second)


def test_explicit_consumer_tag_is_used_for_deliveries(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    assert consume(client, q, "my-consumer") == "my-consumer"
    publish(client, "", q, b"x", channel=2)
    msg = next_message(client)
    assert isinstance(msg.method, C.Basic.Deliver)
    assert msg.method.consumer_tag == "my-consumer"
    assert (msg.method.delivery_tag, msg.method.redelivered) == (1, False)
    assert (msg.method.exchange, msg.method.routing_key) == ("", q)


def test_duplicate_consumer_tag_closes_connection(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    consume(client, q, "dup")
    consume(client, q, "dup", channel=2)  # the same tag on another channel is fine
    client.send_frame(C.Basic.Consume(queue=q, consumer_tag="dup"), 1)
    close = expect_connection_close(client)
    assert close.reply_code == 530
    assert close.reply_text == "NOT_ALLOWED - attempt to reuse consumer tag 'dup'"
    assert (close.class_id, close.method_id) == (60, 20)
    assert client.closed()


# -- exclusive and no-ack consumers -------------------------------------


def test_exclusive_consumer_refused_when_others_exist(client: RawClient) -> None:
    q = declare_queue(client, "excl-q")
    consume(client, q, "plain", channel=2)
    client.send_frame(C.Basic.Consume(queue=q, consumer_tag="mine", exclusive=True), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 403
    assert close.reply_text == "ACCESS_REFUSED - queue 'excl-q' in vhost '/' in exclusive use"
    assert (close.class_id, close.method_id) == (60, 20)


def test_exclusive_consumer_keeps_others_out(client: RawClient) -> None:
    q = declare_queue(client, "excl-q")
    consume(client, q, "mine", exclusive=True)
    client.send_frame(C.Basic.Consume(queue=q, consumer_tag="other"), 2)
    close = expect_channel_close(client, 2)
    assert close.reply_code == 403
    assert close.reply_text == "ACCESS_REFUSED - queue 'excl-q' in vhost '/' in exclusive use"
    # Once the exclusive consumer is cancelled, others may consume again.
    client.send_frame(C.Basic.Cancel(consumer_tag="mine"), 1)
    expect_method(client, C.Basic.CancelOk, 1)
    client.open_channel(2)
    assert consume(client, q, "other", channel=2) == "other"


def test_no_ack_consumer_messages_are_settled_on_delivery(client: RawClient) -> None:
    q = declare_queue(client, "noack-q")
    consume(client, q, "c", no_ack=True)
    publish_many(client, q, 3, channel=2)
    messages, ready = delivered(client, q)
    assert bodies(messages) == [b"m0", b"m1", b"m2"]
    assert ready == 0
    # Nothing is outstanding: closing the channel requeues nothing.
    client.send_frame(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1)
    expect_method(client, C.Channel.CloseOk, 1)
    assert sync(client, q, channel=2) == (0, 0)
    # And acking a no-ack delivery is an unknown tag.
    client.open_channel(1)
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    assert expect_channel_close(client, 1).reply_code == 406


# -- consumer priorities -------------------------------------------------


def test_higher_priority_consumer_served_first_while_it_has_credit(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    qos(client, 2)
    consume(client, q, "low")
    consume(client, q, "high", arguments={"x-priority": 10})
    consume(client, q, "default-0", arguments={"x-priority": 0})
    publish_many(client, q, 7, channel=2)
    messages, ready = delivered(client, q)
    # high fills its two slots first, then the priority-0 consumers share the rest.
    assert tags_of(messages)[:2] == ["high", "high"]
    assert sorted(tags_of(messages)[2:]) == ["default-0", "default-0", "low", "low"]
    assert ready == 1
    # A slot freed on the high-priority consumer goes to it.
    high_tag = messages[0].method.delivery_tag
    client.send_frame(C.Basic.Ack(delivery_tag=high_tag), 1)
    messages, ready = delivered(client, q)
    assert tags_of(messages) == ["high"] and bodies(messages) == [b"m6"]
    assert ready == 0


def test_invalid_consumer_priority_is_refused(client: RawClient) -> None:
    q = declare_queue(client, "prio-q")
    client.send_frame(
        C.Basic.Consume(queue=q, consumer_tag="c", arguments={"x-priority": "high"}), 1
    )
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406


# -- cancel ----------------------------------------------------------------


def test_basic_cancel_stops_deliveries(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    consume(client, q, "c")
    publish(client, "", q, b"before", channel=2)
    assert next_message(client).body == b"before"
    client.send_frame(C.Basic.Cancel(consumer_tag="c"), 1)
    ok = expect_method(client, C.Basic.CancelOk, 1)
    assert ok.consumer_tag == "c"
    publish(client, "", q, b"after", channel=2)
    messages, ready = delivered(client, q)
    assert messages == [] and ready == 1
    assert sync(client, q) == (1, 0)
    # The message delivered before the cancel can still be acked.
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    got = basic_get(client, q, no_ack=True)
    assert got is not None and got.body == b"after"


def test_cancel_unknown_tag_is_answered(client: RawClient) -> None:
    client.send_frame(C.Basic.Cancel(consumer_tag="never-existed"), 1)
    ok = expect_method(client, C.Basic.CancelOk, 1)
    assert ok.consumer_tag == "never-existed"


def test_pika_consume_and_cancel(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        got: list[bytes] = []
        tag = ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
        ch.basic_publish("", q, b"one")
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline
            conn.process_data_events(time_limit=0.05)
        assert ch.basic_cancel(tag) == []
        ch.basic_publish("", q, b"two")
        assert ch.queue_declare(q, passive=True).method.message_count == 1
        assert got == [b"one"]
    finally:
        conn.close()


# -- basic.get ---------------------------------------------------------------


def test_basic_get_reports_remaining_count_then_empty(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    assert basic_get(client, q) is None
    publish_many(client, q, 3, channel=2)
    counts = []
    for i in range(3):
        got = basic_get(client, q)
        assert got is not None and got.body == f"m{i}".encode()
        assert isinstance(got.method, C.Basic.GetOk)
        assert got.method.delivery_tag == i + 1 and not got.method.redelivered
        assert (got.method.exchange, got.method.routing_key) == ("", q)
        counts.append(got.method.message_count)
    assert counts == [2, 1, 0]
    assert basic_get(client, q) is None
    # Not acked yet: the three are outstanding, none ready.
    assert sync(client, q) == (0, 0)


# -- ack / nack / reject --------------------------------------------------


def test_requeued_messages_keep_their_original_position(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    publish_many(client, q, 5, channel=2)
    got = [basic_get(client, q) for _ in range(5)]
    assert [g.body for g in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    client.send_frame(C.Basic.Nack(delivery_tag=4, requeue=True), 1)
    client.send_frame(C.Basic.Nack(delivery_tag=2, requeue=True), 1)
    again = [basic_get(client, q) for _ in range(2)]
    assert [(g.body, g.method.redelivered, g.method.message_count) for g in again] == [
        (b"m1", True, 1),
        (b"m3", True, 0),
    ]
    assert basic_get(client, q) is None


def test_requeued_messages_go_ahead_of_never_delivered_ones(client: RawClient) -> None:
    # RabbitMQ: publish 5, get 3, nack 2 then reject 1 -> m0, m1, m3, m4.
    q = declare_queue(client, exclusive=True)
    publish_many(client, q, 5, channel=2)
    for _ in range(3):
        basic_get(client, q)
    client.send_frame(C.Basic.Nack(delivery_tag=2, requeue=True), 1)
    client.send_frame(C.Basic.Reject(delivery_tag=1, requeue=True), 1)
    again = [basic_get(client, q, no_ack=True) for _ in range(4)]
    assert [(g.body, g.method.redelivered) for g in again] == [
        (b"m0", True),
        (b"m1", True),
        (b"m3", False),
        (b"m4", False),
    ]


def test_nack_multiple_and_reject_without_requeue(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    publish_many(client, q, 5, channel=2)
    for _ in range(5):
        basic_get(client, q)
    client.send_frame(C.Basic.Nack(delivery_tag=3, multiple=True, requeue=True), 1)
    client.send_frame(C.Basic.Reject(delivery_tag=4, requeue=False), 1)
    client.send_frame(C.Basic.Nack(delivery_tag=5, requeue=False), 1)
    assert sync(client, q) == (3, 0)
    again = [basic_get(client, q, no_ack=True) for _ in range(3)]
    assert [(g.body, g.method.redelivered) for g in again] == [
        (b"m0", True),
        (b"m1", True),
        (b"m2", True),
    ]
    assert basic_get(client, q) is None


def test_unknown_delivery_tag(client: RawClient) -> None:
    client.send_frame(C.Basic.Ack(delivery_tag=42), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - unknown delivery tag 42"
    assert (close.class_id, close.method_id) == (60, 80)


@pytest.mark.parametrize(
    "settle",
    [
        C.Basic.Ack(delivery_tag=1),
        C.Basic.Nack(delivery_tag=1, requeue=False),
        C.Basic.Reject(delivery_tag=1, requeue=False),
    ],
    ids=["ack", "nack", "reject"],
)
def test_settling_twice_is_an_unknown_tag(client: RawClient, settle: Any) -> None:
    q = declare_queue(client, exclusive=True)
    publish(client, "", q, b"x", channel=2)
    assert basic_get(client, q) is not None
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    client.send_frame(settle, 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - unknown delivery tag 1"
    assert close.class_id == 60


def test_ack_multiple_with_tag_zero_acks_everything(client: RawClient) -> None:
    q = declare_queue(client, "q0")
    publish_many(client, q, 4, channel=2)
    for _ in range(4):
        basic_get(client, q)
    client.send_frame(C.Basic.Ack(delivery_tag=2), 1)  # one settled singly first
    client.send_frame(C.Basic.Ack(delivery_tag=0, multiple=True), 1)
    # Everything is settled: closing the channel requeues nothing.
    client.send_frame(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1)
    expect_method(client, C.Channel.CloseOk, 1)
    assert sync(client, q, channel=2) == (0, 0)


def test_ack_multiple_with_tag_zero_and_nothing_outstanding(client: RawClient) -> None:
    client.send_frame(C.Basic.Ack(delivery_tag=0, multiple=True), 1)
    client.send_frame(C.Basic.Qos(prefetch_count=0), 1)
    expect_method(client, C.Basic.QosOk, 1)


def test_basic_recover_requeues_unacked_as_redelivered(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    consume(client, q, "c")
    publish_many(client, q, 3, channel=2)
    first = [next_message(client) for _ in range(3)]
    assert [m.method.delivery_tag for m in first] == [1, 2, 3]
    client.send_frame(C.Basic.Ack(delivery_tag=2), 1)
    client.send_frame(C.Basic.Recover(requeue=True), 1)
    expect_method(client, C.Basic.RecoverOk, 1)
    again = [next_message(client) for _ in range(2)]
    assert [(m.body, m.method.redelivered, m.method.delivery_tag) for m in again] == [
        (b"m0", True, 4),
        (b"m2", True, 5),
    ]
    messages, ready = delivered(client, q)
    assert messages == [] and ready == 0


# -- QoS ---------------------------------------------------------------------


def test_per_consumer_prefetch(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    qos(client, 2)
    consume(client, q, "a")
    consume(client, q, "b")
    publish_many(client, q, 10, channel=2)
    messages, ready = delivered(client, q)
    assert sorted(tags_of(messages)) == ["a", "a", "b", "b"]
    assert ready == 6
    # Acking one of a's frees exactly one slot, for a.
    a_tag = next(m.method.delivery_tag for m in messages if m.method.consumer_tag == "a")
    client.send_frame(C.Basic.Ack(delivery_tag=a_tag), 1)
    messages, ready = delivered(client, q)
    assert tags_of(messages) == ["a"] and ready == 5


def test_per_consumer_prefetch_applies_to_consumers_created_after_qos(
    client: RawClient,
) -> None:
    q = declare_queue(client, exclusive=True)
    consume(client, q, "unlimited")
    qos(client, 1)
    consume(client, q, "limited")
    publish_many(client, q, 6, channel=2)
    messages, ready = delivered(client, q)
    assert tags_of(messages).count("limited") == 1
    assert tags_of(messages).count("unlimited") == 5
    assert ready == 0


def test_global_prefetch_limits_the_whole_channel(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    qos(client, 3, global_=True)
    consume(client, q, "a")
    consume(client, q, "b")
    publish_many(client, q, 10, channel=2)
    messages, ready = delivered(client, q)
    assert len(messages) == 3 and set(tags_of(messages)) == {"a", "b"}
    assert ready == 7
    client.send_frame(C.Basic.Ack(delivery_tag=2, multiple=True), 1)
    messages, ready = delivered(client, q)
    assert len(messages) == 2 and ready == 5


def test_prefetch_size_is_accepted(client: RawClient) -> None:
    # roost accepts and ignores prefetch_size, as RabbitMQ 3.10 does.
    q = declare_queue(client, exclusive=True)
    client.send_frame(C.Basic.Qos(prefetch_size=10, prefetch_count=2), 1)
    expect_method(client, C.Basic.QosOk, 1)
    consume(client, q, "c")
    publish(client, "", q, b"x" * 100, channel=2)
    publish(client, "", q, b"y" * 100, channel=2)
    publish(client, "", q, b"z" * 100, channel=2)
    messages, ready = delivered(client, q)
    assert bodies(messages) == [b"x" * 100, b"y" * 100] and ready == 1


def test_raising_prefetch_releases_waiting_messages_to_global_limit(
    client: RawClient,
) -> None:
    q = declare_queue(client, exclusive=True)
    qos(client, 1, global_=True)
    consume(client, q, "c")
    publish_many(client, q, 4, channel=2)
    messages, ready = delivered(client, q)
    assert len(messages) == 1 and ready == 3
    qos(client, 3, global_=True)
    messages, ready = delivered(client, q)
    assert bodies(messages) == [b"m1", b"m2"] and ready == 1


# -- requeue of unacked messages when consumers go away --------------------


def _deliver_two_unacked(port: int, queue: str) -> RawClient:
    c = connect(port, channels=2)
    declare_queue(c, queue)
    publish_many(c, queue, 3, channel=2)
    qos(c, 2)
    consume(c, queue, "c")
    messages, ready = delivered(c, queue)
    assert bodies(messages) == [b"m0", b"m1"] and ready == 1
    return c


def _assert_requeued(port: int, queue: str) -> None:
    c = connect(port)
    try:
        wait_for(lambda: sync(c, queue) == (3, 0))
        got = [basic_get(c, queue, no_ack=True) for _ in range(3)]
        assert [(g.body, g.method.redelivered) for g in got] == [
            (b"m0", True),
            (b"m1", True),
            (b"m2", False),
        ]
    finally:
        c.close()


def test_unacked_requeued_when_channel_closes(roost_broker: RoostBroker) -> None:
    c = _deliver_two_unacked(roost_broker.port, "rq")
    try:
        c.send_frame(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1)
        expect_method(c, C.Channel.CloseOk, 1)
        assert sync(c, "rq", channel=2) == (3, 0)
    finally:
        c.close()
    _assert_requeued(roost_broker.port, "rq")


def test_unacked_requeued_when_connection_closes(roost_broker: RoostBroker) -> None:
    c = _deliver_two_unacked(roost_broker.port, "rq")
    c.send_frame(C.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 0)
    expect_method(c, C.Connection.CloseOk, 0)
    c.close()
    _assert_requeued(roost_broker.port, "rq")


def test_unacked_requeued_when_socket_dies(roost_broker: RoostBroker) -> None:
    c = _deliver_two_unacked(roost_broker.port, "rq")
    # Reset the TCP connection without any AMQP goodbye.
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    _assert_requeued(roost_broker.port, "rq")


def test_only_unsettled_messages_requeued_on_close(client: RawClient) -> None:
    q = declare_queue(client, "partial")
    consume(client, q, "c")
    publish_many(client, q, 4, channel=2)
    messages, _ = delivered(client, q)
    assert [m.method.delivery_tag for m in messages] == [1, 2, 3, 4]
    # Settle out of order so some settled deliveries are not the oldest.
    client.send_frame(C.Basic.Ack(delivery_tag=2), 1)
    client.send_frame(C.Basic.Reject(delivery_tag=3, requeue=False), 1)
    client.send_frame(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1)
    expect_method(client, C.Channel.CloseOk, 1)
    assert sync(client, q, channel=2) == (2, 0)
    got = [basic_get(client, q, no_ack=True, channel=2) for _ in range(2)]
    assert [(g.body, g.method.redelivered) for g in got] == [(b"m0", True), (b"m3", True)]


def test_pika_unacked_redelivered_to_next_consumer(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.queue_declare("pika-rq")
    ch.basic_publish("", "pika-rq", b"work")
    method, _, body = ch.basic_get("pika-rq")
    assert body == b"work" and not method.redelivered
    conn.close()
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        method, _, body = ch.basic_get("pika-rq", auto_ack=True)
        assert body == b"work" and method.redelivered
    finally:
        conn.close()


# -- load balancing ----------------------------------------------------------


def test_round_robin_across_consumers(roost_broker: RoostBroker) -> None:
    c = connect(roost_broker.port, channels=4)
    try:
        q = declare_queue(c, "rr")
        for n, tag in ((1, "a"), (2, "b"), (3, "c")):
            consume(c, q, tag, channel=n)
        publish_many(c, q, 9, channel=4)
        messages, ready = delivered(c, q, channel=4)
        assert tags_of(messages) == ["a", "b", "c"] * 3
        assert bodies(messages) == [f"m{i}".encode() for i in range(9)]
        assert ready == 0
    finally:
        c.close()


def test_slow_consumer_gets_fewer_with_prefetch_one(roost_broker: RoostBroker) -> None:
    c = connect(roost_broker.port, channels=4)
    try:
        q = declare_queue(c, "rr")
        for n, tag in ((1, "slow"), (2, "b"), (3, "c")):
            qos(c, 1, channel=n)
            consume(c, q, tag, channel=n)
        publish_many(c, q, 12, channel=4)
        counts = {"slow": 0, "b": 0, "c": 0}
        order: list[bytes] = []
        # b and c ack each delivery as it comes; slow never acks.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            messages, ready = delivered(c, q, channel=4)
            for m in messages:
                counts[m.method.consumer_tag] += 1
                order.append(m.body)
                if m.method.consumer_tag != "slow":
                    c.send_frame(C.Basic.Ack(delivery_tag=m.method.delivery_tag), m.channel)
            if not messages and ready == 0:
                break
        assert counts["slow"] == 1
        assert counts["b"] + counts["c"] == 11
        assert abs(counts["b"] - counts["c"]) <= 1
        assert sorted(order) == sorted(f"m{i}".encode() for i in range(12))
    finally:
        c.close()
