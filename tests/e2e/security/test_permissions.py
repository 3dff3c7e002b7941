"""Per-user, per-vhost permissions, checked where RabbitMQ's rabbit_channel
checks them, with a real client and a user lacking exactly one permission.

Texts and the order of checks were taken from RabbitMQ 3.10: e.g. write on
a missing exchange is refused (403) before the lookup would say 404, and
passive declarations check nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker
from tests.e2e.security.helpers import FULL, NONE, add_user, broker_of, connected, set_permissions

Op = Callable[[BlockingChannel], object]


def lacking(which: str, pattern: str = "") -> tuple[str, str, str]:
    """Full permissions except ``which`` (configure, write or read)."""
    perms = dict(zip(("configure", "write", "read"), FULL, strict=True))
    perms[which] = pattern
    return perms["configure"], perms["write"], perms["read"]


def refused(what: str, user: str = "bob", vhost: str = "/") -> str:
    return f"ACCESS_REFUSED - access to {what} in vhost '{vhost}' refused for user '{user}'"


def publish(exchange: str, key: str = "k") -> Op:
    def op(ch: BlockingChannel) -> None:
        ch.confirm_delivery()  # the publish then waits: an error surfaces here
        ch.basic_publish(exchange, key, b"body")

    return op


def consume(ch: BlockingChannel) -> object:
    return ch.basic_consume("q", lambda *a: None)


@dataclass
class Case:
    id: str
    op: Op
    perms: tuple[str, str, str]
    refused: str | None  # the resource named in the 403, or None: permitted
    exists: bool = True  # False: with full permissions the op finds nothing (404)


CASES = [
    # exchange.declare: configure on the exchange; a new one with an
    # alternate exchange also needs read on itself and write on the AE.
    Case(
        "exchange.declare",
        lambda ch: ch.exchange_declare("newx", "direct"),
        lacking("configure"),
        "exchange 'newx'",
    ),
    Case(
        "exchange.declare-ae-read",
        lambda ch: ch.exchange_declare("newx", "direct", arguments={"alternate-exchange": "ae"}),
        lacking("read"),
        "exchange 'newx'",
    ),
    Case(
        "exchange.declare-ae-write",
        lambda ch: ch.exchange_declare("newx", "direct", arguments={"alternate-exchange": "ae"}),
        lacking("write", "^(?!ae$)"),
        "exchange 'ae'",
    ),
    Case(
        "exchange.declare-existing-with-ae",
        lambda ch: ch.exchange_declare("xae", "direct", arguments={"alternate-exchange": "ae"}),
        ("^xae$", "", ""),
        None,
    ),
    Case("exchange.declare-passive", lambda ch: ch.exchange_declare("x", passive=True), NONE, None),
    Case(
        "exchange.delete", lambda ch: ch.exchange_delete("x"), lacking("configure"), "exchange 'x'"
    ),
    # queue.declare: configure on the queue; a new one with a dead-letter
    # exchange also needs read on itself and write on the DLX.
    Case(
        "queue.declare", lambda ch: ch.queue_declare("newq"), lacking("configure"), "queue 'newq'"
    ),
    Case(
        "queue.declare-existing",
        lambda ch: ch.queue_declare("q"),
        lacking("configure"),
        "queue 'q'",
    ),
    Case(
        "queue.declare-dlx-read",
        lambda ch: ch.queue_declare("newq", arguments={"x-dead-letter-exchange": "dlx"}),
        lacking("read"),
        "queue 'newq'",
    ),
    Case(
        "queue.declare-dlx-write",
        lambda ch: ch.queue_declare("newq", arguments={"x-dead-letter-exchange": "dlx"}),
        lacking("write", "^(?!dlx$)"),
        "exchange 'dlx'",
    ),
    Case("queue.declare-passive", lambda ch: ch.queue_declare("q", passive=True), NONE, None),
    Case("queue.delete", lambda ch: ch.queue_delete("q"), lacking("configure"), "queue 'q'"),
    Case("queue.purge", lambda ch: ch.queue_purge("q"), lacking("read"), "queue 'q'"),
    # Bindings: write on the destination, read on the source.
    Case(
        "queue.bind-write", lambda ch: ch.queue_bind("q", "x", "k2"), lacking("write"), "queue 'q'"
    ),
    Case(
        "queue.bind-read", lambda ch: ch.queue_bind("q", "x", "k2"), lacking("read"), "exchange 'x'"
    ),
    Case(
        "queue.unbind-write",
        lambda ch: ch.queue_unbind("q", "x", "k"),
        lacking("write"),
        "queue 'q'",
    ),
    Case(
        "queue.unbind-read",
        lambda ch: ch.queue_unbind("q", "x", "k"),
        lacking("read"),
        "exchange 'x'",
    ),
    Case(
        "exchange.bind-write",
        lambda ch: ch.exchange_bind("x2", "x", "k"),
        lacking("write"),
        "exchange 'x2'",
    ),
    Case(
        "exchange.bind-read",
        lambda ch: ch.exchange_bind("x2", "x", "k"),
        lacking("read"),
        "exchange 'x'",
    ),
    Case(
        "exchange.unbind-write",
        lambda ch: ch.exchange_unbind("x2", "x", "k"),
        lacking("write"),
        "exchange 'x2'",
    ),
    Case(
        "exchange.unbind-read",
        lambda ch: ch.exchange_unbind("x2", "x", "k"),
        lacking("read"),
        "exchange 'x'",
    ),
    # basic.publish: write on the exchange (the default one is amq.default).
    Case("basic.publish", publish("x"), lacking("write"), "exchange 'x'"),
    Case("basic.publish-default", publish("", "q"), lacking("write"), "exchange 'amq.default'"),
    Case(
        "basic.publish-missing", publish("nope"), lacking("write"), "exchange 'nope'", exists=False
    ),
    # Consuming: read on the queue.
    Case("basic.get", lambda ch: ch.basic_get("q"), lacking("read"), "queue 'q'"),
    Case(
        "basic.get-missing",
        lambda ch: ch.basic_get("nope"),
        lacking("read"),
        "queue 'nope'",
        exists=False,
    ),
    Case("basic.consume", consume, lacking("read"), "queue 'q'"),
]


@pytest.fixture
def broker(roost_broker: RoostBroker) -> Iterator[RoostBroker]:
    """guest sets the scene: queue q (one message) bound to x with key k,
    exchanges x2, ae, dlx, and xae (alternate exchange ae)."""
    with connected(roost_broker) as conn:
        ch = conn.channel()
        ch.queue_declare("q")
        for name in ("x", "x2", "ae", "dlx"):
            ch.exchange_declare(name, "direct")
        ch.exchange_declare("xae", "direct", arguments={"alternate-exchange": "ae"})
        ch.queue_bind("q", "x", "k")
        ch.exchange_bind("x2", "x", "k")
        ch.basic_publish("", "q", b"waiting")
    yield roost_broker


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_operation_refused_without_its_permission(broker: RoostBroker, case: Case) -> None:
    add_user(broker, "bob", case.perms)
    with connected(broker, "bob") as conn:
        ch = conn.channel()
        if case.refused is None:
            case.op(ch)
            assert ch.is_open
            return
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            case.op(ch)
        assert exc.value.reply_code == 403
        assert exc.value.reply_text == refused(case.refused)
        # A channel error: the connection stays usable.
        assert conn.channel().queue_declare("q", passive=True).method.message_count == 1


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.refused is not None], ids=[c.id for c in CASES if c.refused]
)
def test_operation_permitted_with_full_permissions(broker: RoostBroker, case: Case) -> None:
    add_user(broker, "bob", FULL)
    with connected(broker, "bob") as conn:
        ch = conn.channel()
        if case.exists:
            case.op(ch)
            assert ch.is_open
        else:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
                case.op(ch)
            assert exc.value.reply_code == 404


def test_server_named_queue_is_checked_under_its_generated_name(broker: RoostBroker) -> None:
    add_user(broker, "bob", lacking("configure"))
    with (
        connected(broker, "bob") as conn,
        pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc,
    ):
        conn.channel().queue_declare("", exclusive=True)
    text = exc.value.reply_text
    assert exc.value.reply_code == 403
    assert text.startswith("ACCESS_REFUSED - access to queue 'amq.gen-")
    assert text.endswith("' in vhost '/' refused for user 'bob'")
    # Nothing was created.
    assert list(broker_of(broker).vhosts["/"].queues) == ["q"]


def test_patterns_match_anywhere_unless_anchored(broker: RoostBroker) -> None:
    # RabbitMQ runs the pattern unanchored: "q" permits any name containing q.
    add_user(broker, "bob", ("q", "", ""))
    with connected(broker, "bob") as conn:
        assert conn.channel().queue_declare("my-queue").method.queue == "my-queue"
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            conn.channel().queue_declare("other")
        assert exc.value.reply_text == refused("queue 'other'")
    set_permissions(broker, "bob", ("^q$", "", ""))
    with connected(broker, "bob") as conn:
        conn.channel().queue_declare("q")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            conn.channel().queue_declare("qq")
        assert exc.value.reply_text == refused("queue 'qq'")


def test_only_names_matching_the_pattern_are_permitted(broker: RoostBroker) -> None:
    # One user, app-prefixed resources only; others refused.
    add_user(broker, "app", ("^app\\.", "^app\\.", "^app\\."))
    with connected(broker, "app") as conn:
        ch = conn.channel()
        ch.queue_declare("app.jobs")
        ch.confirm_delivery()
        ch.exchange_declare("app.events", "fanout")
        ch.queue_bind("app.jobs", "app.events")
        ch.basic_publish("app.events", "", b"event")
        method, _, body = ch.basic_get("app.jobs", auto_ack=True)
        assert method is not None and body == b"event"
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_get("q")
        assert exc.value.reply_text == refused("queue 'q'", user="app")


def test_permission_change_applies_to_open_channels(broker: RoostBroker) -> None:
    add_user(broker, "bob", FULL)
    with connected(broker, "bob") as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("x", "k", b"one")  # remembered as writable
        set_permissions(broker, "bob", lacking("write"))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_publish("x", "k", b"two")
        assert exc.value.reply_text == refused("exchange 'x'")
        set_permissions(broker, "bob", FULL)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("x", "k", b"three")
    with connected(broker) as conn:
        bodies = []
        ch = conn.channel()
        while True:
            method, _, body = ch.basic_get("q", auto_ack=True)
            if method is None:
                break
            bodies.append(body)
    assert bodies == [b"waiting", b"one", b"three"]


def test_removed_permissions_refuse_everything_on_open_connections(broker: RoostBroker) -> None:
    add_user(broker, "bob", FULL)
    with connected(broker, "bob") as conn:
        ch = conn.channel()
        ch.queue_declare("q", passive=True)
        broker.call(lambda: broker_of(broker).permissions.pop(("bob", "/")))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_get("q")
        assert exc.value.reply_text == refused("queue 'q'")


def test_refused_publish_routes_nothing(broker: RoostBroker) -> None:
    add_user(broker, "bob", lacking("write"))
    with connected(broker, "bob") as conn, pytest.raises(pika.exceptions.ChannelClosedByBroker):
        publish("x")(conn.channel())
    assert broker.call(lambda: broker_of(broker).vhosts["/"].queues["q"].message_count) == 1


def test_user_id_must_match_the_authenticated_user(broker: RoostBroker) -> None:
    add_user(broker, "bob", FULL)
    with connected(broker, "bob") as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", "q", b"mine", pika.BasicProperties(user_id="bob"))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_publish("", "q", b"forged", pika.BasicProperties(user_id="guest"))
        assert exc.value.reply_code == 406
        assert exc.value.reply_text == (
            "PRECONDITION_FAILED - user_id property set to 'guest' but authenticated user was 'bob'"
        )
    with connected(broker) as conn:
        ch = conn.channel()
        assert ch.basic_get("q", auto_ack=True)[2] == b"waiting"
        _, props, body = ch.basic_get("q", auto_ack=True)
        assert body == b"mine" and props.user_id == "bob"
        assert ch.basic_get("q")[0] is None
