"""Sender-selected distribution: the CC and BCC headers.

Behaviour checked against RabbitMQ 3.10: a message goes to the queues of
its routing key and of every string in its CC and BCC arrays (each queue
once, non-string elements ignored, the delivered routing key unchanged);
BCC is removed from what consumers and basic.return see, CC stays; the keys
apply at every exchange-to-exchange hop, and an alternate exchange gets the
message only when no key matched; a CC that is not an array is refused with
406 ``invalid message: {unacceptable_type_in_header,"CC",longstr}``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pika
import pytest
from pamqp import commands as C
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from roost.testing import RoostBroker
from tests.e2e.basic_helpers import (
    basic_get,
    connect,
    declare_queue,
    expect_method,
    next_message,
    publish,
)

QUEUES = ("qa", "qb", "qc")


@pytest.fixture
def channel(roost_broker: RoostBroker) -> Iterator[BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.exchange_declare("x", "direct")
    for q in QUEUES:
        ch.queue_declare(q, exclusive=True)
        ch.queue_bind(q, "x", q)
    ch.confirm_delivery()
    yield ch
    if conn.is_open:
        conn.close()


def drain(ch: BlockingChannel, queue: str) -> list[tuple[str, dict[str, object] | None, bytes]]:
    """(routing key, headers, body) of every message in ``queue``."""
    out: list[tuple[str, dict[str, object] | None, bytes]] = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((method.routing_key, props.headers, body))


def test_cc_and_bcc_add_queues_and_bcc_is_removed(channel: BlockingChannel) -> None:
    headers = {"CC": ["qb"], "BCC": ["qc"], "other": 1}
    channel.basic_publish("x", "qa", b"m", pika.BasicProperties(headers=headers))
    for q in QUEUES:
        assert drain(channel, q) == [("qa", {"CC": ["qb"], "other": 1}, b"m")], q


def test_each_queue_gets_the_message_once(channel: BlockingChannel) -> None:
    cc = ["qa", "qa", 5, "qb"]  # the routing key's queue again, a non-string
    channel.basic_publish(
        "x", "qa", b"once", pika.BasicProperties(headers={"CC": cc, "BCC": ["qb", "qa"]})
    )
    assert drain(channel, "qa") == [("qa", {"CC": cc}, b"once")]
    assert drain(channel, "qb") == [("qa", {"CC": cc}, b"once")]
    assert drain(channel, "qc") == []


def test_bcc_only_leaves_an_empty_header_table(channel: BlockingChannel) -> None:
    channel.basic_publish("x", "nowhere", b"b", pika.BasicProperties(headers={"BCC": ["qc"]}))
    assert drain(channel, "qc") == [("nowhere", {}, b"b")]
    assert drain(channel, "qa") == []


def test_topic_patterns_match_cc_keys(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.exchange_declare("t", "topic")
    ch.queue_declare("logs", exclusive=True)
    ch.queue_declare("audit", exclusive=True)
    ch.queue_bind("logs", "t", "log.#")
    ch.queue_bind("audit", "t", "*.audit")
    ch.basic_publish("t", "log.info", b"1", pika.BasicProperties(headers={"CC": ["user.audit"]}))
    ch.basic_publish("t", "none", b"2", pika.BasicProperties(headers={"BCC": ["log.x.y"]}))
    assert drain(ch, "logs") == [
        ("log.info", {"CC": ["user.audit"]}, b"1"),
        ("none", {}, b"2"),
    ]
    assert drain(ch, "audit") == [("log.info", {"CC": ["user.audit"]}, b"1")]
    conn.close()


def test_cc_keys_apply_at_every_exchange_hop(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.exchange_declare("x1", "direct")
    ch.exchange_declare("x2", "direct")
    ch.exchange_bind("x2", "x1", "k2")  # matched through the CC key
    ch.queue_declare("q2", exclusive=True)
    ch.queue_bind("q2", "x2", "a")  # matched through the routing key
    ch.basic_publish("x1", "a", b"hop", pika.BasicProperties(headers={"CC": ["k2"]}))
    assert drain(ch, "q2") == [("a", {"CC": ["k2"]}, b"hop")]
    conn.close()


def test_alternate_exchange_only_when_no_key_matches(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.exchange_declare("ae", "fanout")
    ch.exchange_declare("xa", "direct", arguments={"alternate-exchange": "ae"})
    ch.queue_declare("hit", exclusive=True)
    ch.queue_declare("fallback", exclusive=True)
    ch.queue_bind("hit", "xa", "hit")
    ch.queue_bind("fallback", "ae", "")
    ch.basic_publish("xa", "miss", b"cc-hit", pika.BasicProperties(headers={"CC": ["hit"]}))
    ch.basic_publish("xa", "miss", b"cc-miss", pika.BasicProperties(headers={"CC": ["miss2"]}))
    assert [body for _, _, body in drain(ch, "hit")] == [b"cc-hit"]
    assert [body for _, _, body in drain(ch, "fallback")] == [b"cc-miss"]
    conn.close()


def test_default_exchange_routes_cc_to_queues_by_name(channel: BlockingChannel) -> None:
    channel.basic_publish("", "nothing", b"d", pika.BasicProperties(headers={"CC": ["qb"]}))
    assert drain(channel, "qb") == [("nothing", {"CC": ["qb"]}, b"d")]


def test_returned_message_has_no_bcc(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.confirm_delivery()
    returned: list[dict[str, object] | None] = []
    ch.add_on_return_callback(lambda _c, _m, props, _b: returned.append(props.headers))
    with pytest.raises(UnroutableError):
        ch.basic_publish(
            "",
            "no-such-queue",
            b"r",
            pika.BasicProperties(headers={"BCC": ["also-missing"], "x": 1}),
            mandatory=True,
        )
    conn.process_data_events(0)
    assert returned == [{"x": 1}]
    conn.close()


def test_cc_that_is_not_an_array_closes_the_channel(channel: BlockingChannel) -> None:
    with pytest.raises(ChannelClosedByBroker) as info:
        channel.basic_publish("x", "qa", b"s", pika.BasicProperties(headers={"CC": "qb"}))
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        'PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,"CC",longstr}'
    )


def _table_entry(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + value


def test_bcc_removal_keeps_every_other_byte(roost_broker: RoostBroker) -> None:
    # Headers a re-encoder would change: a double, a short int ('s') and a
    # byte array ('x'); plus content-type before and message-id after them.
    entries = [
        _table_entry(b"d", b"d" + struct.pack(">d", 1.5)),
        _table_entry(b"BCC", b"A" + struct.pack(">I", 7) + b"S" + struct.pack(">I", 2) + b"qc"),
        _table_entry(b"s", b"s" + struct.pack(">h", -2)),
        _table_entry(b"CC", b"A" + struct.pack(">I", 7) + b"S" + struct.pack(">I", 2) + b"qb"),
        _table_entry(b"x", b"x" + struct.pack(">I", 3) + b"\x00\x01\x02"),
    ]

    def props(table_entries: list[bytes]) -> bytes:
        table = b"".join(table_entries)
        flags = 0x8000 | 0x2000 | 0x0080  # content-type, headers, message-id
        return (
            struct.pack(">H", flags)
            + b"\x04text"
            + struct.pack(">I", len(table))
            + table
            + b"\x03id1"
        )

    expected = props([e for i, e in enumerate(entries) if i != 1])
    client = connect(roost_broker.port)
    for q in QUEUES:
        declare_queue(client, q, exclusive=True)
    publish(client, "", "qa", b"raw", props(entries))  # CC qb, BCC qc
    for q in QUEUES:
        got = basic_get(client, q, no_ack=True)
        assert got is not None, q
        assert got.properties_raw == expected, q
        assert got.body == b"raw"
    client.close()


def test_confirms_and_mandatory_with_cc_only_match(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    declare_queue(client, "only-cc", exclusive=True)
    client.send_frame(C.Confirm.Select(), 1)
    expect_method(client, C.Confirm.SelectOk, 1)
    properties = C.Basic.Properties(headers={"CC": ["only-cc"]})
    publish(client, "", "unbound", b"m", properties, mandatory=True)
    # Routed through the CC key: no basic.return, just the confirm.
    ack = expect_method(client, C.Basic.Ack, 1)
    assert ack.delivery_tag == 1
    got = basic_get(client, "only-cc", no_ack=True)
    assert got is not None and got.body == b"m"
    assert got.method.routing_key == "unbound"
    client.close()


def test_cc_is_delivered_to_a_consumer(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    declare_queue(client, "consumed", exclusive=True)
    client.send_frame(C.Basic.Consume(queue="consumed", consumer_tag="c", no_ack=True), 1)
    expect_method(client, C.Basic.ConsumeOk, 1)
    properties = C.Basic.Properties(headers={"BCC": ["consumed"], "keep": "me"})
    publish(client, "", "elsewhere", b"hello", properties)
    msg = next_message(client)
    assert isinstance(msg.method, C.Basic.Deliver)
    assert msg.method.routing_key == "elsewhere"
    assert msg.properties.headers == {"keep": "me"}
    client.close()
