"""The management API enforces what AMQP enforces, as the requesting user:
a real broker, real HTTP requests, and the broker's state compared before
and after each operation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pika
import pytest

from roost.testing import RoostBroker
from tests.http.test_management_api import call

FULL = (".*", ".*", ".*")
CONFIGURE, WRITE, READ = 0, 1, 2


def _without(which: int) -> tuple[str, str, str]:
    perms = list(FULL)
    perms[which] = "^$"
    return (perms[0], perms[1], perms[2])


def _state(rb: RoostBroker) -> Any:
    """Everything an operation could change: queues with their message
    counts, exchanges, bindings."""
    assert rb.server is not None
    vh = rb.server.broker.vhosts["/"]

    def snapshot() -> Any:
        return (
            sorted((q.name, q.message_count) for q in vh.queues.values()),
            sorted(vh.exchanges),
            sorted(
                (ex.name, b.destination.name, b.routing_key)
                for ex in vh.exchanges.values()
                for b in ex.bindings.values()
            ),
        )

    return rb.call(snapshot)


@pytest.fixture
def rb() -> Iterator[RoostBroker]:
    with RoostBroker() as broker:
        assert broker.server is not None
        b = broker.server.broker
        broker.call(lambda: b.users.add("bob", "bob", ("management",)))
        for method, path, body in (
            ("PUT", "/api/exchanges/%2F/ex", {"type": "topic"}),
            ("PUT", "/api/exchanges/%2F/ex2", {"type": "topic"}),
            ("PUT", "/api/queues/%2F/q", {}),
            ("POST", "/api/bindings/%2F/e/ex/q/q", {"routing_key": "k"}),
            ("POST", "/api/exchanges/%2F/ex/publish", {"routing_key": "k", "payload": "m"}),
        ):
            assert call(broker, path, method, body)[0] in (200, 201), path
        yield broker


def _grant(rb: RoostBroker, perms: tuple[str, str, str]) -> None:
    assert rb.server is not None
    b = rb.server.broker
    rb.call(lambda: b.permissions.__setitem__(("bob", "/"), perms))


# (operation, method, path, body, the permission it needs, success status)
OPERATIONS: list[tuple[str, str, str, Any, int, int]] = [
    ("declare queue", "PUT", "/api/queues/%2F/new", {}, CONFIGURE, 201),
    ("delete queue", "DELETE", "/api/queues/%2F/q", None, CONFIGURE, 204),
    ("purge queue", "DELETE", "/api/queues/%2F/q/contents", None, READ, 204),
    (
        "get from queue",
        "POST",
        "/api/queues/%2F/q/get",
        {"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"},
        READ,
        200,
    ),
    ("declare exchange", "PUT", "/api/exchanges/%2F/new", {"type": "direct"}, CONFIGURE, 201),
    ("delete exchange", "DELETE", "/api/exchanges/%2F/ex2", None, CONFIGURE, 204),
    # A new queue with a dead-letter exchange / exchange with an alternate
    # one: also read on itself and write on the other exchange.
    (
        "declare queue with DLX (read)",
        "PUT",
        "/api/queues/%2F/new",
        {"arguments": {"x-dead-letter-exchange": "ex"}},
        READ,
        201,
    ),
    (
        "declare queue with DLX (write)",
        "PUT",
        "/api/queues/%2F/new",
        {"arguments": {"x-dead-letter-exchange": "ex"}},
        WRITE,
        201,
    ),
    (
        "declare exchange with AE (read)",
        "PUT",
        "/api/exchanges/%2F/new",
        {"type": "direct", "arguments": {"alternate-exchange": "ex"}},
        READ,
        201,
    ),
    (
        "declare exchange with AE (write)",
        "PUT",
        "/api/exchanges/%2F/new",
        {"type": "direct", "arguments": {"alternate-exchange": "ex"}},
        WRITE,
        201,
    ),
    (
        "publish",
        "POST",
        "/api/exchanges/%2F/ex/publish",
        {"routing_key": "k", "payload": "x", "properties": {}, "payload_encoding": "string"},
        WRITE,
        200,
    ),
    (
        "bind queue (write on queue)",
        "POST",
        "/api/bindings/%2F/e/ex/q/q",
        {"routing_key": "n"},
        WRITE,
        201,
    ),
    (
        "bind queue (read on exchange)",
        "POST",
        "/api/bindings/%2F/e/ex/q/q",
        {"routing_key": "n"},
        READ,
        201,
    ),
    ("unbind queue (write on queue)", "DELETE", "/api/bindings/%2F/e/ex/q/q/k", None, WRITE, 204),
    ("unbind queue (read on exchange)", "DELETE", "/api/bindings/%2F/e/ex/q/q/k", None, READ, 204),
    (
        "bind exchange (write on destination)",
        "POST",
        "/api/bindings/%2F/e/ex/e/ex2",
        {},
        WRITE,
        201,
    ),
    ("bind exchange (read on source)", "POST", "/api/bindings/%2F/e/ex/e/ex2", {}, READ, 201),
]


@pytest.mark.parametrize(
    ("op", "method", "path", "body", "needs", "ok"), OPERATIONS, ids=[o[0] for o in OPERATIONS]
)
def test_operation_needs_exactly_its_permission(
    rb: RoostBroker, op: str, method: str, path: str, body: Any, needs: int, ok: int
) -> None:
    _grant(rb, _without(needs))
    before = _state(rb)
    status, reply = call(rb, path, method, body, auth="bob:bob")
    assert status == 401, (op, status, reply)
    assert reply["error"] == "not_authorised"
    assert _state(rb) == before, f"{op} was refused but had an effect"

    # Every other permission missing instead: still allowed.
    _grant(rb, FULL)
    status, reply = call(rb, path, method, body, auth="bob:bob")
    assert status == ok, (op, status, reply)
    assert _state(rb) != before


def test_management_user_with_no_permissions_can_do_nothing(rb: RoostBroker) -> None:
    _grant(rb, ("^$", "^$", "^$"))
    before = _state(rb)
    for _, method, path, body, _, _ in OPERATIONS:
        status, _ = call(rb, path, method, body, auth="bob:bob")
        assert status == 401, path
    assert _state(rb) == before
    # Listing the vhost's objects is still allowed, as in RabbitMQ.
    assert call(rb, "/api/queues/%2F", auth="bob:bob")[0] == 200


def test_administrator_needs_vhost_permissions_for_resource_operations(rb: RoostBroker) -> None:
    assert rb.server is not None
    b = rb.server.broker
    rb.call(lambda: b.add_vhost("other"))
    # guest is an administrator without permissions on "other": it sees the
    # vhost but cannot act in it, as with RabbitMQ's management plugin.
    assert call(rb, "/api/queues/other")[0] == 200
    status, reply = call(rb, "/api/queues/other/q", "PUT", {})
    assert status == 401 and "other" in reply["reason"]
    assert call(rb, "/api/queues/other")[1] == []


def test_vhost_created_over_http_is_usable_by_its_creator(rb: RoostBroker) -> None:
    # As RabbitMQ: creating a vhost grants the creator full permissions.
    assert call(rb, "/api/vhosts/made", "PUT", {})[0] == 201
    assert call(rb, "/api/permissions/made/guest")[1]["configure"] == ".*"
    assert call(rb, "/api/queues/made/q", "PUT", {})[0] == 201


def test_internal_exchange_cannot_be_published_to(rb: RoostBroker) -> None:
    call(rb, "/api/exchanges/%2F/inner", "PUT", {"type": "topic", "internal": True})
    call(rb, "/api/bindings/%2F/e/inner/q/q", "POST", {"routing_key": "#"})
    before = _state(rb)
    status, reply = call(
        rb, "/api/exchanges/%2F/inner/publish", "POST", {"routing_key": "k", "payload": "x"}
    )
    assert status == 401 and reply["error"] == "not_authorised"
    assert _state(rb) == before


def test_user_id_must_be_the_requesting_user(rb: RoostBroker) -> None:
    _grant(rb, FULL)
    before = _state(rb)
    body = {"routing_key": "k", "payload": "x", "properties": {"user_id": "guest"}}
    status, reply = call(rb, "/api/exchanges/%2F/ex/publish", "POST", body, auth="bob:bob")
    assert status == 400 and "user_id" in reply["reason"]
    assert _state(rb) == before
    body["properties"] = {"user_id": "bob"}
    status, reply = call(rb, "/api/exchanges/%2F/ex/publish", "POST", body, auth="bob:bob")
    assert status == 200 and reply["routed"] is True


def test_queue_limit_applies_to_http_declares(rb: RoostBroker) -> None:
    assert rb.server is not None
    b = rb.server.broker
    rb.call(lambda: setattr(b, "max_queues_per_vhost", 1))
    status, reply = call(rb, "/api/queues/%2F/second", "PUT", {})
    assert status == 400 and "queue limit" in reply["reason"]
    assert "second" not in [q["name"] for q in call(rb, "/api/queues/%2F")[1]]


def test_exclusive_queue_of_a_connection_is_off_limits(rb: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(rb.url))
    try:
        ch = conn.channel()
        ch.queue_declare("mine", exclusive=True)
        ch.basic_publish("", "mine", b"secret")
        ch.queue_declare("mine", passive=True)  # round trip: the message is in
        before = _state(rb)
        for method, path, body in (
            ("PUT", "/api/queues/%2F/mine", {}),
            ("DELETE", "/api/queues/%2F/mine", None),
            ("DELETE", "/api/queues/%2F/mine/contents", None),
            ("POST", "/api/queues/%2F/mine/get", {"count": 1, "ackmode": "ack_requeue_false"}),
            ("POST", "/api/bindings/%2F/e/ex/q/mine", {"routing_key": "x"}),
        ):
            status, reply = call(rb, path, method, body)
            # RabbitMQ's management plugin turns the channel's 405
            # RESOURCE_LOCKED into a 400.
            assert status == 400, (path, status, reply)
            assert "exclusive" in reply["reason"]
        assert _state(rb) == before
    finally:
        conn.close()
