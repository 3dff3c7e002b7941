"""Queue argument validation: codes and texts are RabbitMQ 3.10's, checked
against a real broker (pika sends Python ints as 'signedint', str as 'longstr')."""

from __future__ import annotations

from typing import Any

import pika
import pytest

from tests.e2e.queue_features.helpers import declare_error, unique

PF = "406 PRECONDITION_FAILED - "


def invalid(key: str, detail: str) -> str:
    return PF + f"invalid arg '{key}' for queue 'Q' in vhost '/': {detail}"


CASES: list[tuple[dict[str, Any], str]] = [
    ({"x-message-ttl": -5}, invalid("x-message-ttl", "{value_negative,-5}")),
    ({"x-message-ttl": "a"}, invalid("x-message-ttl", '"expected integer, got longstr"')),
    ({"x-message-ttl": True}, invalid("x-message-ttl", '"expected integer, got bool"')),
    ({"x-expires": 0}, invalid("x-expires", "{value_zero,0}")),
    ({"x-expires": -1}, invalid("x-expires", "{value_negative,-1}")),
    ({"x-expires": "x"}, invalid("x-expires", '"expected integer, got longstr"')),
    ({"x-max-length": -1}, invalid("x-max-length", "{value_negative,-1}")),
    ({"x-max-length": "x"}, invalid("x-max-length", '"expected integer, got longstr"')),
    ({"x-max-length-bytes": -1}, invalid("x-max-length-bytes", "{value_negative,-1}")),
    ({"x-max-length-bytes": "y"}, invalid("x-max-length-bytes", '"expected integer, got longstr"')),
    ({"x-max-priority": 256}, invalid("x-max-priority", "{max_value_exceeded,256}")),
    ({"x-max-priority": -1}, invalid("x-max-priority", "{value_negative,-1}")),
    ({"x-max-priority": "a"}, invalid("x-max-priority", '"expected integer, got longstr"')),
    ({"x-overflow": "bogus"}, invalid("x-overflow", "invalid_overflow")),
    ({"x-overflow": 5}, invalid("x-overflow", "{unacceptable_type,signedint}")),
    (
        {"x-dead-letter-exchange": 5},
        PF + "invalid type 'signedint' for arg 'x-dead-letter-exchange' in queue 'Q' in vhost '/'",
    ),
    (
        {"x-dead-letter-exchange": True},
        PF + "invalid type 'bool' for arg 'x-dead-letter-exchange' in queue 'Q' in vhost '/'",
    ),
    (
        {"x-dead-letter-routing-key": "k"},
        invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined"),
    ),
    (
        {"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": 5},
        invalid("x-dead-letter-routing-key", "{unacceptable_type,signedint}"),
    ),
    ({"x-queue-type": "bogus"}, invalid("x-queue-type", "\"unsupported queue type 'bogus'\"")),
    ({"x-queue-type": 5}, invalid("x-queue-type", "{unacceptable_type,signedint}")),
    ({"x-queue-mode": "bogus"}, invalid("x-queue-mode", "\"unsupported queue mode 'bogus'\"")),
    ({"x-queue-mode": 5}, invalid("x-queue-mode", "{unacceptable_type,signedint}")),
    ({"x-queue-version": 3}, invalid("x-queue-version", "\"unsupported queue version '3'\"")),
    ({"x-queue-version": "x"}, invalid("x-queue-version", '"expected integer, got longstr"')),
    (
        {"x-single-active-consumer": "yes"},
        invalid("x-single-active-consumer", "{unacceptable_type,longstr}"),
    ),
    (
        {"x-single-active-consumer": 1},
        invalid("x-single-active-consumer", "{unacceptable_type,signedint}"),
    ),
    # Several bad arguments: RabbitMQ checks them in a fixed order.
    (
        {"x-message-ttl": "b", "x-expires": "a"},
        invalid("x-expires", '"expected integer, got longstr"'),
    ),
    (
        {"x-max-length": "a", "x-message-ttl": "b"},
        invalid("x-message-ttl", '"expected integer, got longstr"'),
    ),
    (
        {"x-single-active-consumer": "yes", "x-max-length": "a"},
        invalid("x-max-length", '"expected integer, got longstr"'),
    ),
]


@pytest.mark.parametrize(("arguments", "expected"), CASES, ids=[repr(a) for a, _ in CASES])
def test_invalid_argument_is_refused_like_rabbitmq(
    conn: pika.BlockingConnection, arguments: dict[str, Any], expected: str
) -> None:
    name = unique("args")
    assert declare_error(conn, name, arguments).replace(name, "Q") == expected


@pytest.mark.parametrize(
    "arguments",
    [
        {"x-queue-mode": "lazy"},
        {"x-queue-mode": "default"},
        {"x-queue-version": 1},
        {"x-queue-version": 2},
        {"x-max-priority": 0},
        {"x-max-length": 0},
        {"x-message-ttl": 0},
        {"x-single-active-consumer": True},
        {"x-overflow": "reject-publish-dlx"},
        {"x-unknown-argument": "ignored"},
    ],
    ids=repr,
)
def test_valid_arguments_are_accepted(
    conn: pika.BlockingConnection, arguments: dict[str, Any]
) -> None:
    ch = conn.channel()
    name = unique("ok")
    ok = ch.queue_declare(name, arguments=arguments)
    assert ok.method.queue == name
    # Redeclaring with the same arguments is equivalent.
    ch.queue_declare(name, arguments=arguments)
    ch.queue_delete(name)


def test_queue_mode_and_version_are_ignored(conn: pika.BlockingConnection) -> None:
    ch = conn.channel()
    name = unique("lazy")
    ch.queue_declare(name, arguments={"x-queue-mode": "lazy", "x-queue-version": 2})
    for i in range(3):
        ch.basic_publish("", name, b"%d" % i)
    got = [ch.basic_get(name, auto_ack=True)[2] for _ in range(3)]
    assert got == [b"0", b"1", b"2"]


def test_quorum_queue_must_be_durable_and_not_exclusive(conn: pika.BlockingConnection) -> None:
    name = unique("qq")
    text = declare_error(conn, name, {"x-queue-type": "quorum"}).replace(name, "Q")
    assert text == PF + "invalid property 'non-durable' for queue 'Q' in vhost '/'"
    c = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        c.queue_declare(name, durable=True, exclusive=True, arguments={"x-queue-type": "quorum"})
    assert err.value.reply_code == 406
    assert err.value.reply_text.replace(name, "Q") == (
        "PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue 'Q' in vhost '/'"
    )


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        ({"x-retry-delay": -1}, ("x-retry-delay", "{value_negative,-1}")),
        ({"x-retry-delay": "soon"}, ("x-retry-delay", '"expected integer, got longstr"')),
        ({"x-retry-backoff": "linear"}, ("x-retry-backoff", '"expected fixed or exponential"')),
        ({"x-retry-max-delay": -3}, ("x-retry-max-delay", "{value_negative,-3}")),
        ({"x-delivery-limit": "x"}, ("x-delivery-limit", '"expected integer, got longstr"')),
    ],
    ids=repr,
)
def test_roost_arguments_are_validated(
    conn: pika.BlockingConnection, arguments: dict[str, Any], detail: tuple[str, str]
) -> None:
    name = unique("roostargs")
    assert declare_error(conn, name, arguments).replace(name, "Q") == invalid(*detail)
