"""Exchanges end to end, over real sockets with pika and aio-pika.

Reply codes and texts are RabbitMQ 3.10's, checked against a real broker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import aio_pika
import aiormq.exceptions
import pika
import pytest
from pamqp.common import FieldTable
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from roost.testing import RoostBroker

# -- helpers ----------------------------------------------------------------


def channel_error(conn: pika.BlockingConnection, fn: Callable[[BlockingChannel], Any]) -> str:
    """Run ``fn`` on a fresh channel, expect the broker to close that channel,
    and return "code text". The connection must survive."""
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        fn(c)
    assert c.is_closed
    assert conn.is_open
    return f"{err.value.reply_code} {err.value.reply_text}"


def temp_queue(ch: BlockingChannel) -> str:
    return str(ch.queue_declare("", exclusive=True).method.queue)


def bodies(ch: BlockingChannel, queue: str, expected: int, timeout: float = 2.0) -> list[bytes]:
    """Fetch ``expected`` messages (polling with a deadline), then check that
    nothing more is there."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.01)
            continue
        got.append(body)
    method, _, body = ch.basic_get(queue, auto_ack=True)
    assert method is None, f"unexpected extra message {body!r}"
    return got


def exchange_exists(conn: pika.BlockingConnection, name: str) -> bool:
    c = conn.channel()
    try:
        c.exchange_declare(name, passive=True)
    except ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    c.close()
    return True


# -- declare ----------------------------------------------------------------


@pytest.mark.parametrize("type_", ["direct", "fanout", "topic", "headers"])
def test_declare_each_type(conn: pika.BlockingConnection, type_: str) -> None:
    ch = conn.channel()
    ok = ch.exchange_declare(f"x-{type_}", type_)
    assert isinstance(ok.method, pika.spec.Exchange.DeclareOk)
    # Redeclaring with the same properties is fine, and passive finds it.
    ch.exchange_declare(f"x-{type_}", type_)
    ch.exchange_declare(f"x-{type_}", passive=True)
    assert exchange_exists(conn, f"x-{type_}")


def test_passive_declare_of_missing_exchange_is_404(conn: pika.BlockingConnection) -> None:
    assert channel_error(conn, lambda c: c.exchange_declare("nope", passive=True)) == (
        "404 NOT_FOUND - no exchange 'nope' in vhost '/'"
    )


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (
            {"exchange_type": "fanout"},
            "inequivalent arg 'type' for exchange 'ex' in vhost '/': "
            "received 'fanout' but current is 'direct'",
        ),
        (
            {"exchange_type": "direct", "durable": True},
            "inequivalent arg 'durable' for exchange 'ex' in vhost '/': "
            "received 'true' but current is 'false'",
        ),
        (
            {"exchange_type": "direct", "auto_delete": True},
            "inequivalent arg 'auto_delete' for exchange 'ex' in vhost '/': "
            "received 'true' but current is 'false'",
        ),
        (
            {"exchange_type": "direct", "internal": True},
            "inequivalent arg 'internal' for exchange 'ex' in vhost '/': "
            "received 'true' but current is 'false'",
        ),
        (
            {"exchange_type": "direct", "arguments": {"alternate-exchange": "ae"}},
            "inequivalent arg 'alternate-exchange' for exchange 'ex' in vhost '/': "
            "received the value 'ae' of type 'longstr' but current is none",
        ),
    ],
)
def test_redeclare_with_different_properties_is_406(
    conn: pika.BlockingConnection, kwargs: dict[str, Any], text: str
) -> None:
    conn.channel().exchange_declare("ex", "direct")
    assert channel_error(conn, lambda c: c.exchange_declare("ex", **kwargs)) == (
        f"406 PRECONDITION_FAILED - {text}"
    )
    # The exchange is unchanged.
    conn.channel().exchange_declare("ex", "direct")


def test_redeclare_with_different_alternate_exchange_is_406(
    conn: pika.BlockingConnection,
) -> None:
    conn.channel().exchange_declare("ex", "direct", arguments={"alternate-exchange": "a1"})
    assert channel_error(
        conn, lambda c: c.exchange_declare("ex", "direct", arguments={"alternate-exchange": "a2"})
    ) == (
        "406 PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'ex' "
        "in vhost '/': received 'a2' but current is 'a1'"
    )
    assert channel_error(conn, lambda c: c.exchange_declare("ex", "direct")) == (
        "406 PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'ex' "
        "in vhost '/': received none but current is the value 'a1' of type 'longstr'"
    )
    # Other arguments are not compared.
    conn.channel().exchange_declare(
        "ex", "direct", arguments={"alternate-exchange": "a1", "x-whatever": 1}
    )


def test_alternate_exchange_of_wrong_type_is_406(conn: pika.BlockingConnection) -> None:
    assert channel_error(
        conn, lambda c: c.exchange_declare("ex", "direct", arguments={"alternate-exchange": 5})
    ) == (
        "406 PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' "
        "in exchange 'ex' in vhost '/'"
    )
    assert not exchange_exists(conn, "ex")


@pytest.mark.parametrize("name", ["new-x", "existing-x", "amq.direct"])
def test_unknown_type_closes_connection_503(roost_broker: RoostBroker, name: str) -> None:
    c = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    c.channel().exchange_declare("existing-x", "direct")
    with pytest.raises(ConnectionClosedByBroker) as err:
        c.channel().exchange_declare(name, "bogus")
    assert err.value.reply_code == 503
    assert err.value.reply_text == "COMMAND_INVALID - unknown exchange type 'bogus'"
    assert c.is_closed


def test_amq_prefix_is_reserved(conn: pika.BlockingConnection) -> None:
    assert channel_error(conn, lambda c: c.exchange_declare("amq.mine", "direct")) == (
        "403 ACCESS_REFUSED - exchange name 'amq.mine' contains reserved prefix 'amq.*'"
    )
    assert not exchange_exists(conn, "amq.mine")


def test_default_exchange_cannot_be_declared(conn: pika.BlockingConnection) -> None:
    text = "403 ACCESS_REFUSED - operation not permitted on the default exchange"
    assert channel_error(conn, lambda c: c.exchange_declare("", "direct")) == text
    assert channel_error(conn, lambda c: c.exchange_declare("", passive=True)) == text


@pytest.mark.parametrize(
    ("name", "type_"),
    [
        ("amq.direct", "direct"),
        ("amq.fanout", "fanout"),
        ("amq.topic", "topic"),
        ("amq.headers", "headers"),
        ("amq.match", "headers"),
    ],
)
def test_predeclared_exchanges(conn: pika.BlockingConnection, name: str, type_: str) -> None:
    ch = conn.channel()
    ch.exchange_declare(name, passive=True)
    # Redeclaring with the same properties is allowed despite the prefix...
    ch.exchange_declare(name, type_, durable=True)
    # ... but not with different ones.
    assert channel_error(conn, lambda c: c.exchange_declare(name, type_)) == (
        f"406 PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in "
        "vhost '/': received 'false' but current is 'true'"
    )
    q = temp_queue(ch)
    key = {"direct": "k", "fanout": "", "topic": "k.*", "headers": ""}[type_]
    ch.queue_bind(q, name, key, arguments={"h": "v"} if type_ == "headers" else None)
    ch.basic_publish(
        name, "k.x" if type_ == "topic" else "k", b"m1", pika.BasicProperties(headers={"h": "v"})
    )
    ch.basic_publish(name, "other", b"m2", pika.BasicProperties(headers={"h": "w"}))
    expected = [b"m1", b"m2"] if type_ == "fanout" else [b"m1"]
    assert bodies(ch, q, len(expected)) == expected


def test_default_exchange_routes_to_queue_by_name(ch: BlockingChannel) -> None:
    q = temp_queue(ch)
    ch.basic_publish("", q, b"hello")
    assert bodies(ch, q, 1) == [b"hello"]


# -- delete -----------------------------------------------------------------


def test_delete(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.exchange_declare("gone", "fanout")
    ok = ch.exchange_delete("gone")
    assert isinstance(ok.method, pika.spec.Exchange.DeleteOk)
    assert not exchange_exists(conn, "gone")


def test_delete_removes_bindings(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    q = temp_queue(ch)
    ch.exchange_declare("gone", "fanout")
    ch.queue_bind(q, "gone")
    ch.exchange_delete("gone")
    ch.exchange_declare("gone", "fanout")
    ch.basic_publish("gone", "", b"after")
    assert bodies(ch, q, 0) == []


def test_delete_if_unused_with_bindings_is_406(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    q = temp_queue(ch)
    ch.exchange_declare("used", "direct")
    ch.queue_bind(q, "used", "k")
    assert channel_error(conn, lambda c: c.exchange_delete("used", if_unused=True)) == (
        "406 PRECONDITION_FAILED - exchange 'used' in vhost '/' in use"
    )
    assert exchange_exists(conn, "used")
    ch.queue_unbind(q, "used", "k")
    ch.exchange_delete("used", if_unused=True)
    assert not exchange_exists(conn, "used")


def test_delete_if_unused_ignores_bindings_into_it(conn: pika.BlockingConnection) -> None:
    # Only bindings with this exchange as the source make it "used".
    ch = conn.channel()
    ch.exchange_declare("dest", "fanout")
    ch.exchange_bind("dest", "amq.fanout")
    ch.exchange_delete("dest", if_unused=True)
    assert not exchange_exists(conn, "dest")


def test_delete_missing_exchange_is_ok(ch: BlockingChannel) -> None:
    ok = ch.exchange_delete("never-was")
    assert isinstance(ok.method, pika.spec.Exchange.DeleteOk)
    assert ch.is_open


def test_delete_system_and_default_exchange_refused(conn: pika.BlockingConnection) -> None:
    assert channel_error(conn, lambda c: c.exchange_delete("amq.direct")) == (
        "403 ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"
    )
    assert channel_error(conn, lambda c: c.exchange_delete("")) == (
        "403 ACCESS_REFUSED - operation not permitted on the default exchange"
    )
    assert exchange_exists(conn, "amq.direct")


# -- exchange to exchange bindings -------------------------------------------


def test_exchange_bind_and_unbind_route(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.exchange_declare("src", "direct")
    ch.exchange_declare("dst", "fanout")
    q = temp_queue(ch)
    ch.queue_bind(q, "dst")
    ok = ch.exchange_bind(destination="dst", source="src", routing_key="k")
    assert isinstance(ok.method, pika.spec.Exchange.BindOk)
    ch.basic_publish("src", "k", b"through")
    ch.basic_publish("src", "other", b"dropped")
    assert bodies(ch, q, 1) == [b"through"]
    ok2 = ch.exchange_unbind(destination="dst", source="src", routing_key="k")
    assert isinstance(ok2.method, pika.spec.Exchange.UnbindOk)
    ch.basic_publish("src", "k", b"after-unbind")
    assert bodies(ch, q, 0) == []


def test_exchange_cycle_delivers_once(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    for name in ("c1", "c2"):
        ch.exchange_declare(name, "fanout")
    ch.exchange_bind("c2", "c1")
    ch.exchange_bind("c1", "c2")
    q = temp_queue(ch)
    ch.queue_bind(q, "c1")
    ch.queue_bind(q, "c2")
    ch.basic_publish("c1", "", b"once")
    assert bodies(ch, q, 1) == [b"once"]


def test_exchange_bind_errors(conn: pika.BlockingConnection) -> None:
    conn.channel().exchange_declare("real", "fanout")
    assert channel_error(conn, lambda c: c.exchange_bind("real", "nope")) == (
        "404 NOT_FOUND - no exchange 'nope' in vhost '/'"
    )
    assert channel_error(conn, lambda c: c.exchange_bind("nope", "real")) == (
        "404 NOT_FOUND - no exchange 'nope' in vhost '/'"
    )
    default = "403 ACCESS_REFUSED - operation not permitted on the default exchange"
    assert channel_error(conn, lambda c: c.exchange_bind("", "real")) == default
    assert channel_error(conn, lambda c: c.exchange_bind("real", "")) == default


def test_exchange_unbind_of_nonexistent_binding_is_ok(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.exchange_declare("real", "fanout")
    ch.exchange_unbind("real", "amq.direct", "never-bound")
    # RabbitMQ answers unbind-ok even when the source does not exist.
    ch.exchange_unbind("real", "missing-source", "k")
    assert ch.is_open


def test_auto_delete_exchange_goes_with_last_binding(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.exchange_declare("ad", "direct", auto_delete=True)
    # Never bound: it stays.
    assert exchange_exists(conn, "ad")
    q1, q2 = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(q1, "ad", "a")
    ch.queue_bind(q2, "ad", "b")
    ch.queue_unbind(q1, "ad", "a")
    assert exchange_exists(conn, "ad")
    ch.queue_unbind(q2, "ad", "b")
    assert not exchange_exists(conn, "ad")


def test_auto_delete_exchange_goes_when_its_queue_does(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    ch.exchange_declare("ad", "fanout", auto_delete=True)
    q = temp_queue(ch)
    ch.queue_bind(q, "ad")
    ch.queue_delete(q)
    assert not exchange_exists(conn, "ad")


def test_auto_delete_exchange_goes_with_last_exchange_binding(
    conn: pika.BlockingConnection,
) -> None:
    ch = conn.channel()
    ch.exchange_declare("ad", "fanout", auto_delete=True)
    ch.exchange_declare("plain", "fanout")
    ch.exchange_bind("plain", "ad")
    ch.exchange_unbind("plain", "ad")
    assert not exchange_exists(conn, "ad")
    # An auto-delete exchange that was only a destination stays.
    ch.exchange_declare("ad2", "fanout", auto_delete=True)
    ch.exchange_bind("ad2", "amq.fanout")
    ch.exchange_unbind("ad2", "amq.fanout")
    assert exchange_exists(conn, "ad2")


# -- internal exchanges ------------------------------------------------------


def test_publish_to_internal_exchange_is_403(conn: pika.BlockingConnection) -> None:
    conn.channel().exchange_declare("int", "fanout", internal=True)

    def publish(c: BlockingChannel) -> None:
        c.basic_publish("int", "", b"no")
        c.queue_declare("", exclusive=True)  # a round trip to see the close

    assert channel_error(conn, publish) == (
        "403 ACCESS_REFUSED - cannot publish to internal exchange 'int' in vhost '/'"
    )


def test_internal_exchange_routes_when_bound(ch: BlockingChannel) -> None:
    ch.exchange_declare("int", "fanout", internal=True)
    ch.exchange_declare("front", "direct")
    q = temp_queue(ch)
    ch.queue_bind(q, "int")
    ch.exchange_bind("int", "front", "k")
    ch.basic_publish("front", "k", b"via-front")
    assert bodies(ch, q, 1) == [b"via-front"]


# -- alternate exchanges -----------------------------------------------------


def test_alternate_exchange_catches_unroutable(ch: BlockingChannel) -> None:
    ch.exchange_declare("ae", "fanout")
    ch.exchange_declare("main", "direct", arguments={"alternate-exchange": "ae"})
    routed, caught = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(routed, "main", "k")
    ch.queue_bind(caught, "ae")
    ch.confirm_delivery()
    ch.basic_publish("main", "k", b"normal", mandatory=True)
    # Caught by the alternate: not returned although mandatory.
    ch.basic_publish("main", "zzz", b"stray", mandatory=True)
    assert bodies(ch, routed, 1) == [b"normal"]
    assert bodies(ch, caught, 1) == [b"stray"]


def test_alternate_exchange_that_routes_nowhere_returns_mandatory(ch: BlockingChannel) -> None:
    ch.exchange_declare("ae", "fanout")
    ch.exchange_declare("main", "direct", arguments={"alternate-exchange": "ae"})
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("main", "zzz", b"lost", mandatory=True)


def test_alternate_of_alternate(ch: BlockingChannel) -> None:
    ch.exchange_declare("ae2", "fanout")
    ch.exchange_declare("ae1", "direct", arguments={"alternate-exchange": "ae2"})
    ch.exchange_declare("main", "direct", arguments={"alternate-exchange": "ae1"})
    q1, q2 = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(q1, "ae1", "special")
    ch.queue_bind(q2, "ae2")
    ch.basic_publish("main", "special", b"s")
    ch.basic_publish("main", "plain", b"p")
    assert bodies(ch, q1, 1) == [b"s"]
    assert bodies(ch, q2, 1) == [b"p"]


# -- topic and headers ---------------------------------------------------------


def test_topic_routing(ch: BlockingChannel) -> None:
    ch.exchange_declare("logs", "topic")
    queues = {pattern: temp_queue(ch) for pattern in ("#", "kern.*", "*.critical", "a.#.z")}
    for pattern, q in queues.items():
        ch.queue_bind(q, "logs", pattern)
    for key in ("kern.critical", "kern.info", "app.critical", "a.z", "a.b.c.z", "", "kern"):
        ch.basic_publish("logs", key, key.encode())
    assert bodies(ch, queues["#"], 7) == [
        b"kern.critical",
        b"kern.info",
        b"app.critical",
        b"a.z",
        b"a.b.c.z",
        b"",
        b"kern",
    ]
    assert bodies(ch, queues["kern.*"], 2) == [b"kern.critical", b"kern.info"]
    assert bodies(ch, queues["*.critical"], 2) == [b"kern.critical", b"app.critical"]
    assert bodies(ch, queues["a.#.z"], 2) == [b"a.z", b"a.b.c.z"]


def test_headers_routing(ch: BlockingChannel) -> None:
    ch.exchange_declare("hx", "headers")
    q_all, q_any, q_void = temp_queue(ch), temp_queue(ch), temp_queue(ch)
    ch.queue_bind(q_all, "hx", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    ch.queue_bind(q_any, "hx", arguments={"x-match": "any", "format": "pdf", "type": "log"})
    ch.queue_bind(q_void, "hx", arguments={"urgent": None})

    def pub(body: bytes, headers: dict[str, Any] | None) -> None:
        ch.basic_publish("hx", "ignored", body, pika.BasicProperties(headers=headers))

    pub(b"pdf-report", {"format": "pdf", "type": "report"})
    pub(b"pdf-only", {"format": "pdf"})
    pub(b"log", {"type": "log", "urgent": 0})
    pub(b"none", None)
    assert bodies(ch, q_all, 1) == [b"pdf-report"]
    assert bodies(ch, q_any, 3) == [b"pdf-report", b"pdf-only", b"log"]
    assert bodies(ch, q_void, 1) == [b"log"]


def test_headers_binding_with_invalid_x_match_is_406(conn: pika.BlockingConnection) -> None:
    def bind(c: BlockingChannel) -> None:
        q = temp_queue(c)
        c.queue_bind(q, "amq.headers", arguments={"x-match": "some"})

    assert channel_error(conn, bind) == (
        '406 PRECONDITION_FAILED - Invalid x-match field value <<"some">>; '
        "expected all, any, all-with-x, or any-with-x"
    )


# -- aio-pika ------------------------------------------------------------------


async def test_aio_pika_declare_and_route_each_type(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("", exclusive=True)
        for type_, key, headers in (
            (aio_pika.ExchangeType.DIRECT, "k", None),
            (aio_pika.ExchangeType.FANOUT, "", None),
            (aio_pika.ExchangeType.TOPIC, "k.#", None),
            (aio_pika.ExchangeType.HEADERS, "", {"x-match": "any", "h": 1}),
        ):
            x = await ch.declare_exchange(f"aio-{type_.value}", type_)
            await q.bind(x, key, arguments=cast("FieldTable | None", headers))
            await x.publish(aio_pika.Message(type_.value.encode(), headers={"h": 1}), "k")
        got = []
        for _ in range(4):
            msg = await q.get(no_ack=True, timeout=2)
            got.append(msg.body)
        assert got == [b"direct", b"fanout", b"topic", b"headers"]
        assert await q.get(no_ack=True, fail=False) is None


async def test_aio_pika_passive_missing_exchange(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as err:
            await ch.get_exchange("nope", ensure=True)
        assert err.value.args[0] == "NOT_FOUND - no exchange 'nope' in vhost '/'"
        assert ch.is_closed
        assert not conn.is_closed


async def test_aio_pika_redeclare_inequivalent(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        await ch.declare_exchange("ex", aio_pika.ExchangeType.TOPIC, durable=True)
        ch2 = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as err:
            await ch2.declare_exchange("ex", aio_pika.ExchangeType.TOPIC, durable=False)
        assert err.value.args[0] == (
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'ex' in vhost '/': "
            "received 'false' but current is 'true'"
        )


async def test_aio_pika_unknown_type_closes_connection(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    try:
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ConnectionCommandInvalid) as err:
            await ch.declare_exchange("ex", "bogus")
        assert err.value.args[0] == "COMMAND_INVALID - unknown exchange type 'bogus'"
    finally:
        await conn.close()


async def test_aio_pika_exchange_to_exchange_and_delete(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        src = await ch.declare_exchange("src", aio_pika.ExchangeType.TOPIC)
        dst = await ch.declare_exchange("dst", aio_pika.ExchangeType.FANOUT)
        q = await ch.declare_queue("", exclusive=True)
        await q.bind(dst)
        await dst.bind(src, "a.*")
        await src.publish(aio_pika.Message(b"a.b"), "a.b")
        await src.publish(aio_pika.Message(b"a.b.c"), "a.b.c")
        msg = await q.get(no_ack=True, timeout=2)
        assert msg.body == b"a.b"
        assert await q.get(no_ack=True, fail=False) is None
        await dst.unbind(src, "a.*")
        await src.publish(aio_pika.Message(b"later"), "a.b")
        assert await q.get(no_ack=True, fail=False) is None
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await dst.delete(if_unused=True)
        ch = await conn.channel()
        q = await ch.get_queue(q.name)
        dst = await ch.get_exchange("dst")
        await q.unbind(dst)
        await dst.delete(if_unused=True)
        ch2 = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await ch2.get_exchange("dst", ensure=True)
