"""Delayed delivery: the ``x-delayed-message`` exchange type, as RabbitMQ's
rabbitmq-delayed-message-exchange plugin defines it (reply texts from the
plugin's ``rabbit_exchange_type_delayed_message:validate/1``), but durable
and compact over large backlogs.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from roost.broker import delayed
from roost.broker.delayed import DelayedExchange, now_ms
from roost.broker.message import Message
from roost.testing import RoostBroker, RoostProcess

DX = "x-delayed-message"

# -- helpers ----------------------------------------------------------------


@pytest.fixture
def ch(conn: pika.BlockingConnection) -> BlockingChannel:
    """The shared ``ch``, in confirm mode."""
    c = conn.channel()
    c.confirm_delivery()
    return c


def declare_delayed(
    ch: BlockingChannel, name: str, kind: str = "direct", durable: bool = False
) -> None:
    ch.exchange_declare(name, DX, durable=durable, arguments={"x-delayed-type": kind})


def temp_queue(ch: BlockingChannel) -> str:
    return str(ch.queue_declare("", exclusive=True).method.queue)


def props(delay: Any = None, persistent: bool = False, **headers: Any) -> pika.BasicProperties:
    if delay is not None:
        headers["x-delay"] = delay
    return pika.BasicProperties(headers=headers or None, delivery_mode=2 if persistent else None)


def get_now(ch: BlockingChannel, queue: str) -> bytes | None:
    """One basic.get; None when the queue is empty right now."""
    method, _, body = ch.basic_get(queue, auto_ack=True)
    return None if method is None else bytes(body)


def wait_for(
    ch: BlockingChannel, queue: str, count: int, timeout: float = 5.0
) -> list[tuple[bytes, dict[str, Any], float]]:
    """Fetch ``count`` messages, polling with a deadline: (body, headers,
    monotonic time first seen)."""
    got: list[tuple[bytes, dict[str, Any], float]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        method, header, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.005)
            continue
        got.append((bytes(body), dict(header.headers or {}), time.monotonic()))
    assert len(got) == count, f"got {len(got)} of {count}: {got}"
    return got


def channel_error(conn: pika.BlockingConnection, arguments: dict[str, Any] | None) -> str:
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        c.exchange_declare("dx-bad", DX, arguments=arguments)
    assert conn.is_open
    return f"{err.value.reply_code} {err.value.reply_text}"


# -- declaration ------------------------------------------------------------


def test_declare_without_delayed_type_is_refused(conn: pika.BlockingConnection) -> None:
    expected = (
        "406 PRECONDITION_FAILED - Invalid argument, "
        "'x-delayed-type' must be an existing exchange type"
    )
    assert channel_error(conn, None) == expected
    assert channel_error(conn, {"x-delayed-type": 5}) == expected


def test_declare_with_delayed_type_x_delayed_message_is_refused(
    conn: pika.BlockingConnection,
) -> None:
    assert channel_error(conn, {"x-delayed-type": DX}) == (
        "406 PRECONDITION_FAILED - Invalid argument, "
        "'x-delayed-message' can't be used for 'x-delayed-type'"
    )


def test_declare_with_unknown_delayed_type_closes_the_connection(
    conn: pika.BlockingConnection,
) -> None:
    c = conn.channel()
    with pytest.raises(ConnectionClosedByBroker) as err:
        c.exchange_declare("dx-bad", DX, arguments={"x-delayed-type": "nosuch"})
    assert err.value.reply_code == 503
    assert err.value.reply_text == "COMMAND_INVALID - unknown exchange type 'nosuch'"


def test_redeclare_equivalence(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    declare_delayed(ch, "dx-eq", "topic")
    declare_delayed(ch, "dx-eq", "topic")
    ch.exchange_declare("dx-eq", passive=True)
    # As in RabbitMQ, only a new exchange is validated and, of the
    # arguments, only alternate-exchange is compared.
    ch.exchange_declare("dx-eq", DX)
    declare_delayed(ch, "dx-eq", "fanout")
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        c.exchange_declare("dx-eq", "topic")
    assert err.value.reply_code == 406
    assert err.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'dx-eq' in vhost '/': "
        "received 'topic' but current is 'x-delayed-message'"
    )
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        declare_delayed(c, "dx-eq", "topic", durable=True)
    assert err.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'dx-eq' in vhost '/': "
        "received 'true' but current is 'false'"
    )


# -- routing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key", "binding", "binding_args", "extra"),
    [
        ("direct", "k1", "k1", None, {}),
        ("topic", "a.b.c", "a.#", None, {}),
        ("fanout", "whatever", "", None, {}),
        ("headers", "", "", {"x-match": "all", "colour": "red"}, {"colour": "red"}),
    ],
)
def test_held_for_x_delay_then_routed_by_the_underlying_type(
    ch: BlockingChannel,
    kind: str,
    key: str,
    binding: str,
    binding_args: dict[str, Any] | None,
    extra: dict[str, Any],
) -> None:
    declare_delayed(ch, f"dx-{kind}", kind)
    hit, miss = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(hit, f"dx-{kind}", binding, arguments=binding_args)
    if kind != "fanout":
        other = {"x-match": "all", "colour": "blue"} if kind == "headers" else None
        ch.queue_bind(miss, f"dx-{kind}", "other", arguments=other)
    sent = time.monotonic()
    ch.basic_publish(f"dx-{kind}", key, b"later", props(300, **extra))
    assert get_now(ch, hit) is None  # confirmed, yet held
    [(body, headers, seen)] = wait_for(ch, hit, 1)
    assert body == b"later"
    assert seen - sent >= 0.29
    # Swapped to minus the delay, as the plugin does.
    assert headers["x-delay"] == -300
    for k, v in extra.items():
        assert headers[k] == v
    if kind != "fanout":
        assert get_now(ch, miss) is None


def test_delivered_in_due_order_not_publish_order(ch: BlockingChannel) -> None:
    declare_delayed(ch, "dx-order")
    q = temp_queue(ch)
    ch.queue_bind(q, "dx-order", "k")
    for delay in (600, 200, 400, 150, 300):
        ch.basic_publish("dx-order", "k", str(delay).encode(), props(delay))
    ch.basic_publish("dx-order", "k", b"now", props())
    got = wait_for(ch, q, 6)
    assert [b for b, _, _ in got] == [b"now", b"150", b"200", b"300", b"400", b"600"]


def test_equal_due_times_keep_publish_order(roost_broker: RoostBroker) -> None:
    def run() -> list[bytes]:
        assert roost_broker.server is not None
        vh = roost_broker.server.broker.vhosts["/"]
        ex = vh.declare_exchange("dx-ties", DX, arguments={"x-delayed-type": "fanout"})
        assert isinstance(ex, DelayedExchange)
        now = now_ms()
        for i in range(50):
            ex.hold(Message("dx-ties", "", b"\x00\x00", str(i).encode()), 500 - 10 * (i % 3), now)
        out = []
        while len(ex.schedule):
            _, word = ex.schedule.pop()
            out.append(vh.journal.read(word & delayed.REF_MASK).body)  # type: ignore[union-attr]
        return out

    got = roost_broker.call(run)
    expected = sorted(range(50), key=lambda i: (500 - 10 * (i % 3), i))
    assert got == [str(i).encode() for i in expected]


@pytest.mark.parametrize("delay", [None, 0, -1000, "abc", True])
def test_no_positive_delay_routes_at_once(ch: BlockingChannel, delay: Any) -> None:
    declare_delayed(ch, "dx-now")
    q = temp_queue(ch)
    ch.queue_bind(q, "dx-now", "k")
    ch.basic_publish("dx-now", "k", b"at once", props(delay))
    method, header, body = ch.basic_get(q, auto_ack=True)
    assert method is not None and body == b"at once"
    # An x-delay that does not delay is left as it was.
    assert (header.headers or {}).get("x-delay") == delay


@pytest.mark.parametrize(("delay", "swapped"), [("250", -250), (Decimal("250.9"), -250)])
def test_string_and_float_delays_are_read_as_the_plugin_reads_them(
    ch: BlockingChannel, delay: Any, swapped: int
) -> None:
    declare_delayed(ch, "dx-conv")
    q = temp_queue(ch)
    ch.queue_bind(q, "dx-conv", "k")
    ch.basic_publish("dx-conv", "k", b"x", props(delay))
    assert get_now(ch, q) is None
    [(_, headers, _)] = wait_for(ch, q, 1)
    assert headers["x-delay"] == swapped


def test_mandatory_delayed_message_is_returned_and_still_delivered(
    conn: pika.BlockingConnection,
) -> None:
    # The plugin's route is empty at publish time, so a mandatory message
    # comes back with NO_ROUTE at once, and is routed when due all the same.
    ch = conn.channel()
    returned: list[tuple[int, str, bytes]] = []
    ch.add_on_return_callback(
        lambda _c, method, _p, body: returned.append((method.reply_code, method.reply_text, body))
    )
    declare_delayed(ch, "dx-mand")
    q = temp_queue(ch)
    ch.queue_bind(q, "dx-mand", "k")
    ch.basic_publish("dx-mand", "k", b"m", props(200), mandatory=True)
    deadline = time.monotonic() + 2
    while not returned and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.02)
    assert returned == [(312, "NO_ROUTE", b"m")]
    [(body, _, _)] = wait_for(ch, q, 1)
    assert body == b"m"


def test_alternate_exchange_only_when_due(ch: BlockingChannel) -> None:
    ch.exchange_declare("dx-ae-target", "fanout")
    ae_q = temp_queue(ch)
    ch.queue_bind(ae_q, "dx-ae-target")
    ch.exchange_declare(
        "dx-ae", DX, arguments={"x-delayed-type": "direct", "alternate-exchange": "dx-ae-target"}
    )
    ch.basic_publish("dx-ae", "unbound", b"held", props(200))
    assert get_now(ch, ae_q) is None
    [(body, headers, _)] = wait_for(ch, ae_q, 1)
    assert body == b"held" and headers["x-delay"] == -200
    ch.basic_publish("dx-ae", "unbound", b"now", props())
    assert get_now(ch, ae_q) == b"now"
    assert get_now(ch, ae_q) is None


def test_exchange_to_exchange_binding_into_a_delayed_exchange(ch: BlockingChannel) -> None:
    ch.exchange_declare("dx-src", "fanout")
    declare_delayed(ch, "dx-e2e")
    ch.exchange_bind("dx-e2e", "dx-src")
    direct, later = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(direct, "dx-src")
    ch.queue_bind(later, "dx-e2e", "k")
    ch.basic_publish("dx-src", "k", b"both", props(200))
    assert get_now(ch, direct) == b"both"
    assert get_now(ch, later) is None
    [(body, _, _)] = wait_for(ch, later, 1)
    assert body == b"both"


def test_deleting_the_exchange_drops_held_messages(
    roost_broker: RoostBroker, ch: BlockingChannel
) -> None:
    declare_delayed(ch, "dx-del")
    q = temp_queue(ch)
    ch.queue_bind(q, "dx-del", "k")
    ch.basic_publish("dx-del", "k", b"gone", props(150))

    def held() -> int:
        assert roost_broker.server is not None
        ex = roost_broker.server.broker.vhosts["/"].exchanges["dx-del"]
        assert isinstance(ex, DelayedExchange)
        return ex.messages_delayed

    assert roost_broker.call(held) == 1
    ch.exchange_delete("dx-del")
    declare_delayed(ch, "dx-del")  # a new exchange of the same name holds nothing
    ch.queue_bind(q, "dx-del", "k")
    assert roost_broker.call(held) == 0
    ch.basic_publish("dx-del", "k", b"new", props(200))
    [(body, _, _)] = wait_for(ch, q, 1)
    assert body == b"new"


# -- durability ---------------------------------------------------------------


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data")
    try:
        yield p.start()
    finally:
        p.close()
        print("".join(p.output))  # shown when a test fails


def test_persistent_delayed_messages_survive_sigkill(proc: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.confirm_delivery()
    declare_delayed(ch, "dx-durable", "topic", durable=True)
    ch.queue_declare("dq", durable=True)
    ch.queue_bind("dq", "dx-durable", "t.#")
    start = time.time()
    # Due while the broker is down, due after the restart, and a message
    # held far beyond this test; one transient message, not kept.
    ch.basic_publish("dx-durable", "t.a", b"late", props(2500, persistent=True))
    ch.basic_publish("dx-durable", "t.a", b"early", props(100, persistent=True))
    ch.basic_publish("dx-durable", "t.a", b"transient", props(100))
    ch.basic_publish("dx-durable", "t.a", b"far", props(3_600_000, persistent=True))
    conn.close()
    proc.kill()
    time.sleep(0.2)  # let "early" fall due while nothing runs
    proc.start()
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    try:
        ch = conn.channel()
        got = wait_for(ch, "dq", 2, timeout=8)
        assert [b for b, _, _ in got] == [b"early", b"late"]
        assert [h["x-delay"] for _, h, _ in got] == [-100, -2500]
        # Not before it was due.
        late_seen_wall = time.time() - (time.monotonic() - got[1][2])
        assert late_seen_wall >= start + 2.5 - 0.05
        assert get_now(ch, "dq") is None  # the transient one is gone, "far" still held
        ch.queue_purge("dq")
    finally:
        conn.close()
    # Delivered messages are settled in the log: another restart brings
    # back neither, and the one still held stays held.
    proc.kill()
    proc.start()
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    try:
        ch = conn.channel()
        ch.exchange_declare("dx-durable", passive=True)
        time.sleep(0.3)  # give a wrongly redelivered message the time to show up
        assert get_now(ch, "dq") is None
    finally:
        conn.close()


def test_graceful_restart_keeps_the_schedule(proc: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.confirm_delivery()
    declare_delayed(ch, "dx-term", "fanout", durable=True)
    ch.queue_declare("tq", durable=True)
    ch.queue_bind("tq", "dx-term")
    for delay in (900, 300, 600):
        ch.basic_publish("dx-term", "", str(delay).encode(), props(delay, persistent=True))
    conn.close()
    assert proc.terminate() == 0
    proc.start()
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    try:
        got = wait_for(conn.channel(), "tq", 3, timeout=8)
        assert [b for b, _, _ in got] == [b"300", b"600", b"900"]
    finally:
        conn.close()


# -- backlog ----------------------------------------------------------------

BACKLOG = 100_000


def test_large_backlog_is_compact_and_delivered_in_due_order(roost_broker: RoostBroker) -> None:
    rng = random.Random(7)
    delays = [rng.randint(1, 1500) for _ in range(BACKLOG)]
    body = b"x" * 16
    raw_props = b"\x00\x00"

    def schedule() -> tuple[int, int, int]:
        assert roost_broker.server is not None
        vh = roost_broker.server.broker.vhosts["/"]
        ex = vh.declare_exchange("dx-backlog", DX, arguments={"x-delayed-type": "fanout"})
        q = vh.declare_queue("backlog-q", owner=None)
        vh.bind("dx-backlog", q, "", None)
        assert isinstance(ex, DelayedExchange)
        now = now_ms() + 300
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i, d in enumerate(delays):
            ex.hold(Message("dx-backlog", str(i), raw_props, body), d, now)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        # What the schedule itself took (the log's write buffer aside).
        grown = sum(
            s.size_diff
            for s in after.compare_to(before, "filename")
            if s.traceback[0].filename == delayed.__file__
        )
        return grown, ex.schedule.memory(), len(ex.schedule)

    grown, arrays, held = roost_broker.call(schedule, timeout=60)
    assert held == BACKLOG
    assert arrays <= 24 * BACKLOG
    assert grown <= 40 * BACKLOG, f"{grown / BACKLOG:.1f} bytes per held message"

    def count() -> int:
        assert roost_broker.server is not None
        return roost_broker.server.broker.vhosts["/"].queues["backlog-q"].message_count

    deadline = time.monotonic() + 25
    while roost_broker.call(count) < BACKLOG and time.monotonic() < deadline:
        time.sleep(0.05)
    assert roost_broker.call(count) == BACKLOG

    def drain() -> list[int]:
        assert roost_broker.server is not None
        q = roost_broker.server.broker.vhosts["/"].queues["backlog-q"]
        out = []
        while (entry := q.get(no_ack=True)) is not None:
            out.append(int(entry.message.routing_key))
        return out

    order = roost_broker.call(drain, timeout=60)
    assert order == sorted(range(BACKLOG), key=lambda i: (delays[i], i))


# -- sender-selected distribution ----------------------------------------------


@pytest.mark.parametrize("persistent", [False, True])
def test_cc_and_bcc_keys_of_a_delayed_message_are_routed_when_due(
    ch: BlockingChannel, persistent: bool
) -> None:
    declare_delayed(ch, "dx-cc")
    main, cc, bcc, other = (temp_queue(ch) for _ in range(4))
    ch.queue_bind(main, "dx-cc", "main")
    ch.queue_bind(cc, "dx-cc", "cc-key")
    ch.queue_bind(bcc, "dx-cc", "bcc-key")
    ch.queue_bind(other, "dx-cc", "other")
    ch.basic_publish("dx-cc", "main", b"m", props(150, persistent, CC=["cc-key"], BCC=["bcc-key"]))
    assert get_now(ch, cc) is None  # held
    for q in (main, cc, bcc):
        [(body, headers, _)] = wait_for(ch, q, 1)
        assert body == b"m"
        assert headers["CC"] == ["cc-key"]
        assert "BCC" not in headers
        assert headers["x-delay"] == -150
    assert get_now(ch, other) is None
    assert get_now(ch, main) is None  # each queue got it once


def test_cc_keys_of_a_delayed_message_survive_sigkill(proc: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.confirm_delivery()
    declare_delayed(ch, "dx-cc-durable", durable=True)
    for q in ("cc-main", "cc-copy"):
        ch.queue_declare(q, durable=True)
    ch.queue_bind("cc-main", "dx-cc-durable", "main")
    ch.queue_bind("cc-copy", "dx-cc-durable", "copy")
    ch.basic_publish("dx-cc-durable", "main", b"m", props(400, True, CC=["copy"]))
    conn.close()
    proc.kill()
    proc.start()
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    try:
        ch = conn.channel()
        for q in ("cc-main", "cc-copy"):
            [(body, headers, _)] = wait_for(ch, q, 1, timeout=8)
            assert body == b"m"
            assert headers["CC"] == ["copy"]
    finally:
        conn.close()
