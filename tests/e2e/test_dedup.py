"""Message deduplication on queues and exchanges (``x-message-deduplication``).

Modelled on LavinMQ and the rabbitmq-message-deduplication plugin: the key
is the header named by ``x-deduplication-header`` (default: that header
itself), else the message-id; duplicates are dropped and still confirmed
with basic.ack; the cache is bounded by ``x-cache-size`` and forgets keys
after ``x-cache-ttl`` ms (or the message's own ``x-cache-ttl`` header).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

from roost.testing import RoostBroker, RoostProcess

DEDUP = {"x-message-deduplication": True}


@pytest.fixture
def channel(roost_broker: RoostBroker) -> Iterator[BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.confirm_delivery()  # a nack would raise NackError in basic_publish
    yield ch
    if conn.is_open:
        conn.close()


def send(
    ch: BlockingChannel,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    exchange: str = "",
    **props: Any,
) -> None:
    ch.basic_publish(exchange, routing_key, body, pika.BasicProperties(headers=headers, **props))


def bodies(ch: BlockingChannel, queue: str) -> list[bytes]:
    out: list[bytes] = []
    while True:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(body)


def key(value: Any) -> dict[str, Any]:
    return {"x-deduplication-header": value}


# -- queues -------------------------------------------------------------------


def test_queue_drops_duplicates_by_default_header(channel: BlockingChannel) -> None:
    channel.queue_declare("q", exclusive=True, arguments=DEDUP)
    send(channel, "q", b"1", key("a"))
    send(channel, "q", b"2", key("a"))  # duplicate: confirmed, not enqueued
    send(channel, "q", b"3", key("b"))
    send(channel, "q", b"4", key("a"))
    send(channel, "q", b"5")  # no key at all: never a duplicate
    send(channel, "q", b"6")
    assert bodies(channel, "q") == [b"1", b"3", b"5", b"6"]


def test_key_stays_after_the_message_is_consumed(channel: BlockingChannel) -> None:
    channel.queue_declare("q", exclusive=True, arguments=DEDUP)
    send(channel, "q", b"first", key(7))
    assert bodies(channel, "q") == [b"first"]
    send(channel, "q", b"again", key(7))
    assert bodies(channel, "q") == []


def test_custom_header_name(channel: BlockingChannel) -> None:
    args = {**DEDUP, "x-deduplication-header": "order-id"}
    channel.queue_declare("q", exclusive=True, arguments=args)
    send(channel, "q", b"1", {"order-id": "o1"})
    send(channel, "q", b"2", {"order-id": "o1", "x-deduplication-header": "other"})
    send(channel, "q", b"3", {"order-id": "o2"})
    # The default header name means nothing to this queue.
    send(channel, "q", b"4", key("same"))
    send(channel, "q", b"5", key("same"))
    assert bodies(channel, "q") == [b"1", b"3", b"4", b"5"]


def test_message_id_is_the_fallback_key(channel: BlockingChannel) -> None:
    channel.queue_declare("q", exclusive=True, arguments=DEDUP)
    send(channel, "q", b"1", message_id="m-1")
    send(channel, "q", b"2", message_id="m-1")
    send(channel, "q", b"3", {"unrelated": 1}, message_id="m-1")
    send(channel, "q", b"4", message_id="m-2")
    # The header wins over the message-id when present.
    send(channel, "q", b"5", key("h"), message_id="m-1")
    assert bodies(channel, "q") == [b"1", b"4", b"5"]


def test_queue_without_the_argument_keeps_duplicates(channel: BlockingChannel) -> None:
    channel.queue_declare("plain", exclusive=True)
    send(channel, "plain", b"1", key("a"), message_id="m")
    send(channel, "plain", b"2", key("a"), message_id="m")
    assert bodies(channel, "plain") == [b"1", b"2"]


def test_cache_size_evicts_the_oldest_key(channel: BlockingChannel) -> None:
    channel.queue_declare("q", exclusive=True, arguments={**DEDUP, "x-cache-size": 2})
    for body, k in ((b"a1", "a"), (b"b1", "b"), (b"c1", "c")):  # "a" is evicted
        send(channel, "q", body, key(k))
    send(channel, "q", b"c2", key("c"))  # still cached
    send(channel, "q", b"a2", key("a"))  # evicted, so new (evicts "b")
    send(channel, "q", b"b2", key("b"))  # evicted too (evicts "c")
    send(channel, "q", b"a3", key("a"))
    assert bodies(channel, "q") == [b"a1", b"b1", b"c1", b"a2", b"b2"]


def _publish_until_taken(ch: BlockingChannel, queue: str, headers: dict[str, Any]) -> bytes:
    """Resend a duplicate until the queue takes it (its key expired)."""
    deadline = time.monotonic() + 5
    n = 0
    while time.monotonic() < deadline:
        n += 1
        send(ch, queue, b"retry-%d" % n, headers)
        got = bodies(ch, queue)
        if got:
            return got[0]
        time.sleep(0.02)
    raise AssertionError("the key never expired")


def test_cache_ttl_forgets_keys(channel: BlockingChannel) -> None:
    channel.queue_declare("q", exclusive=True, arguments={**DEDUP, "x-cache-ttl": 150})
    send(channel, "q", b"first", key("k"))
    send(channel, "q", b"dup", key("k"))
    assert bodies(channel, "q") == [b"first"]
    assert _publish_until_taken(channel, "q", key("k")).startswith(b"retry-")


def test_message_ttl_header_overrides_the_cache_ttl(channel: BlockingChannel) -> None:
    # No TTL on the queue: only the message's own x-cache-ttl lets the key go.
    channel.queue_declare("q", exclusive=True, arguments=DEDUP)
    send(channel, "q", b"forever", key("f"))
    send(channel, "q", b"short", {**key("s"), "x-cache-ttl": 100})
    send(channel, "q", b"dup", {**key("s"), "x-cache-ttl": 100})
    assert bodies(channel, "q") == [b"forever", b"short"]
    assert _publish_until_taken(channel, "q", key("s")).startswith(b"retry-")
    send(channel, "q", b"still-dup", key("f"))
    assert bodies(channel, "q") == []


def test_duplicate_on_one_queue_still_reaches_the_others(channel: BlockingChannel) -> None:
    channel.exchange_declare("fan", "fanout")
    channel.queue_declare("dedup", exclusive=True, arguments=DEDUP)
    channel.queue_declare("all", exclusive=True)
    channel.queue_bind("dedup", "fan")
    channel.queue_bind("all", "fan")
    send(channel, "", b"1", key("k"), exchange="fan")
    send(channel, "", b"2", key("k"), exchange="fan")
    assert bodies(channel, "dedup") == [b"1"]
    assert bodies(channel, "all") == [b"1", b"2"]


def test_refused_message_is_not_remembered(channel: BlockingChannel) -> None:
    args = {**DEDUP, "x-max-length": 1, "x-overflow": "reject-publish"}
    channel.queue_declare("q", exclusive=True, arguments=args)
    send(channel, "q", b"1", key("a"))
    with pytest.raises(NackError):
        send(channel, "q", b"2", key("b"))  # queue full: nacked
    assert bodies(channel, "q") == [b"1"]
    send(channel, "q", b"2-again", key("b"))  # the resend is not a duplicate
    assert bodies(channel, "q") == [b"2-again"]


def test_persistent_duplicates_on_a_durable_queue(channel: BlockingChannel) -> None:
    channel.queue_declare("durable-dedup", durable=True, arguments=DEDUP)
    for n in range(3):
        send(channel, "durable-dedup", b"p%d" % n, key("same"), delivery_mode=2)
    assert channel.queue_declare("durable-dedup", passive=True).method.message_count == 1
    assert bodies(channel, "durable-dedup") == [b"p0"]
    channel.queue_delete("durable-dedup")


def test_queue_argument_types_are_checked(channel: BlockingChannel) -> None:
    with pytest.raises(ChannelClosedByBroker) as info:
        channel.queue_declare("bad", arguments={**DEDUP, "x-cache-size": "ten"})
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        "PRECONDITION_FAILED - invalid arg 'x-cache-size' for queue 'bad' in vhost '/': "
        '"expected integer, got longstr"'
    )


# -- exchanges ----------------------------------------------------------------


def test_exchange_drops_duplicates_before_routing(channel: BlockingChannel) -> None:
    channel.exchange_declare("dx", "direct", arguments=DEDUP)
    channel.queue_declare("a", exclusive=True)
    channel.queue_declare("b", exclusive=True)
    channel.queue_bind("a", "dx", "a")
    channel.queue_bind("b", "dx", "b")
    send(channel, "a", b"1", key("k"), exchange="dx")
    send(channel, "b", b"2", key("k"), exchange="dx")  # same key, other route
    send(channel, "b", b"3", key("j"), exchange="dx")
    send(channel, "a", b"4", exchange="dx", message_id="m")
    send(channel, "a", b"5", exchange="dx", message_id="m")
    assert bodies(channel, "a") == [b"1", b"4"]
    assert bodies(channel, "b") == [b"3"]


def test_exchange_cache_size_and_header(channel: BlockingChannel) -> None:
    args = {**DEDUP, "x-cache-size": 1, "x-deduplication-header": "id"}
    channel.exchange_declare("dx", "fanout", arguments=args)
    channel.queue_declare("q", exclusive=True)
    channel.queue_bind("q", "dx")
    for body, k in ((b"1", "a"), (b"2", "a"), (b"3", "b"), (b"4", "a"), (b"5", "a")):
        send(channel, "", body, {"id": k}, exchange="dx")
    assert bodies(channel, "q") == [b"1", b"3", b"4"]


def test_exchange_cache_ttl(channel: BlockingChannel) -> None:
    channel.exchange_declare("dx", "fanout", arguments={**DEDUP, "x-cache-ttl": 150})
    channel.queue_declare("q", exclusive=True)
    channel.queue_bind("q", "dx")
    send(channel, "", b"first", key("k"), exchange="dx")
    send(channel, "", b"dup", key("k"), exchange="dx")
    assert bodies(channel, "q") == [b"first"]
    deadline = time.monotonic() + 5
    while not bodies(channel, "q"):
        assert time.monotonic() < deadline, "the key never expired"
        time.sleep(0.02)
        send(channel, "", b"retry", key("k"), exchange="dx")


def test_mandatory_duplicate_on_an_exchange_is_returned(channel: BlockingChannel) -> None:
    # The exchange routes a duplicate nowhere, as LavinMQ and the plugin do.
    channel.exchange_declare("dx", "direct", arguments=DEDUP)
    channel.queue_declare("a", exclusive=True)
    channel.queue_bind("a", "dx", "a")
    channel.basic_publish("dx", "a", b"1", pika.BasicProperties(headers=key("k")), mandatory=True)
    with pytest.raises(UnroutableError):
        channel.basic_publish(
            "dx", "a", b"2", pika.BasicProperties(headers=key("k")), mandatory=True
        )
    assert bodies(channel, "a") == [b"1"]


def test_exchange_with_deduplication_off_or_absent(channel: BlockingChannel) -> None:
    channel.exchange_declare("off", "fanout", arguments={"x-message-deduplication": False})
    channel.queue_declare("q", exclusive=True)
    channel.queue_bind("q", "off")
    send(channel, "", b"1", key("k"), exchange="off")
    send(channel, "", b"2", key("k"), exchange="off")
    assert bodies(channel, "q") == [b"1", b"2"]


def test_durable_dedup_exchange_survives_restart(tmp_path: Path) -> None:
    # The arguments are stored with the exchange (its cache was empty).
    with RoostBroker(data_dir=str(tmp_path)) as broker:
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        conn.channel().exchange_declare("dd", "fanout", durable=True, arguments=DEDUP)
        conn.close()
    with RoostBroker(data_dir=str(tmp_path)) as broker:
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        ch.queue_declare("q", exclusive=True)
        ch.queue_bind("q", "dd")
        send(ch, "", b"1", key("k"), exchange="dd")
        send(ch, "", b"2", key("k"), exchange="dd")
        assert bodies(ch, "q") == [b"1"]
        conn.close()


@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        (
            {"x-message-deduplication": "yes"},
            "invalid arg 'x-message-deduplication' for exchange 'bad' in vhost '/': "
            "{unacceptable_type,longstr}",
        ),
        (
            {**DEDUP, "x-cache-size": 0},
            "invalid arg 'x-cache-size' for exchange 'bad' in vhost '/': {value_zero,0}",
        ),
        (
            {**DEDUP, "x-cache-ttl": -1},
            "invalid arg 'x-cache-ttl' for exchange 'bad' in vhost '/': {value_negative,-1}",
        ),
    ],
)
def test_exchange_argument_types_are_checked(
    channel: BlockingChannel, arguments: dict[str, Any], text: str
) -> None:
    with pytest.raises(ChannelClosedByBroker) as info:
        channel.exchange_declare("bad", "direct", arguments=arguments)
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - " + text


# -- durability ---------------------------------------------------------------


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data")
    try:
        yield p.start()
    finally:
        p.close()
        print("".join(p.output))  # shown when a test fails


def confirming(proc: RoostProcess) -> tuple[pika.BlockingConnection, BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def test_durable_queue_cache_survives_sigkill(proc: RoostProcess) -> None:
    conn, ch = confirming(proc)
    ch.queue_declare("dq", durable=True, arguments=DEDUP)
    send(ch, "dq", b"1", key("k"), delivery_mode=2)  # confirmed: fsync'd
    send(ch, "dq", b"2", None, delivery_mode=2, message_id="m-1")
    proc.kill()
    proc.start()
    conn, ch = confirming(proc)
    try:
        send(ch, "dq", b"dup-1", key("k"), delivery_mode=2)
        send(ch, "dq", b"dup-2", None, delivery_mode=2, message_id="m-1")
        send(ch, "dq", b"3", key("other"), delivery_mode=2)
        assert bodies(ch, "dq") == [b"1", b"2", b"3"]
    finally:
        conn.close()


def test_durable_exchange_cache_survives_sigkill(proc: RoostProcess) -> None:
    conn, ch = confirming(proc)
    ch.exchange_declare("dx", "fanout", durable=True, arguments={**DEDUP, "x-cache-size": 2})
    ch.queue_declare("dxq", durable=True)
    ch.queue_bind("dxq", "dx")
    for k in ("a", "b", "c"):  # "a" is evicted by "c"
        send(ch, "", k.encode(), key(k), exchange="dx", delivery_mode=2)
    proc.kill()
    proc.start()
    conn, ch = confirming(proc)
    try:
        for k in ("c", "b", "a"):
            send(ch, "", k.encode() + b"-again", key(k), exchange="dx", delivery_mode=2)
        assert bodies(ch, "dxq") == [b"a", b"b", b"c", b"a-again"]
    finally:
        conn.close()


def test_key_ttls_run_on_across_a_restart(proc: RoostProcess) -> None:
    conn, ch = confirming(proc)
    ch.queue_declare("tq", durable=True, arguments=DEDUP)
    sent = time.monotonic()
    send(ch, "tq", b"short", {**key("short"), "x-cache-ttl": 300}, delivery_mode=2)
    send(ch, "tq", b"long", key("long"), delivery_mode=2)
    proc.kill()
    proc.start()
    conn, ch = confirming(proc)
    try:
        time.sleep(max(0.0, sent + 0.35 - time.monotonic()))  # "short" is now expired
        send(ch, "tq", b"short-again", key("short"), delivery_mode=2)
        send(ch, "tq", b"long-again", key("long"), delivery_mode=2)
        assert bodies(ch, "tq") == [b"short", b"long", b"short-again"]
    finally:
        conn.close()


def test_deleted_queue_leaves_no_cache_behind(proc: RoostProcess) -> None:
    conn, ch = confirming(proc)
    ch.queue_declare("gone", durable=True, arguments=DEDUP)
    send(ch, "gone", b"1", key("k"), delivery_mode=2)
    ch.queue_delete("gone")
    ch.queue_declare("gone", durable=True, arguments=DEDUP)
    send(ch, "gone", b"2", key("k"), delivery_mode=2)
    proc.kill()
    proc.start()
    conn, ch = confirming(proc)
    try:
        ch.queue_delete("gone")
        ch.queue_declare("gone", durable=True, arguments=DEDUP)
        send(ch, "gone", b"3", key("k"), delivery_mode=2)
        assert bodies(ch, "gone") == [b"3"]
    finally:
        conn.close()
    # A graceful stop keeps the cache too.
    proc.terminate()
    proc.start()
    conn, ch = confirming(proc)
    try:
        send(ch, "gone", b"4", key("k"), delivery_mode=2)
        assert bodies(ch, "gone") == []
    finally:
        conn.close()
