"""Resource limits: connections (whole broker, per vhost, per user) refused
at connection.open with 530, queues per vhost refused with 406, with
RabbitMQ's texts; the broker keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pamqp import commands as C

from roost.testing import RoostBroker
from tests.e2e.security.helpers import (
    FULL,
    add_user,
    broker_of,
    connect,
    connected,
    login,
    wait_for,
)


@pytest.fixture
def limited(request: pytest.FixtureRequest) -> Iterator[RoostBroker]:
    with RoostBroker(**request.param) as rb:
        yield rb


def open_count(rb: RoostBroker) -> int:
    return rb.call(lambda: len(broker_of(rb).connections))


@pytest.mark.parametrize("limited", [{"max_connections": 2}], indirect=True)
def test_broker_connection_limit(limited: RoostBroker) -> None:
    first, second = connect(limited), connect(limited)
    try:
        close = login(limited, "guest", "guest")
        assert isinstance(close, C.Connection.Close)
        assert (close.reply_code, close.class_id, close.method_id) == (530, 10, 40)
        assert close.reply_text == (
            "NOT_ALLOWED - connection refused: node connection limit (2) is reached"
        )
        with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
            connect(limited)
        # The open ones are unaffected.
        first.channel().queue_declare("still-works")
        second.close()
        wait_for(lambda: open_count(limited) == 1)
        assert isinstance(login(limited, "guest", "guest"), C.Connection.OpenOk)
    finally:
        for conn in (first, second):
            if conn.is_open:
                conn.close()


@pytest.mark.parametrize("limited", [{"max_connections_per_vhost": 1}], indirect=True)
def test_per_vhost_connection_limit(limited: RoostBroker) -> None:
    broker = broker_of(limited)

    def add() -> None:
        broker.add_vhost("other")
        broker.permissions[("guest", "other")] = FULL

    limited.call(add)
    with connected(limited):
        close = login(limited, "guest", "guest")
        assert isinstance(close, C.Connection.Close)
        assert close.reply_text == (
            "NOT_ALLOWED - access to vhost '/' refused for user 'guest': "
            "connection limit (1) is reached"
        )
        # Another vhost has its own count.
        with connected(limited, vhost="other"):
            close = login(limited, "guest", "guest", vhost="other")
            assert isinstance(close, C.Connection.Close) and close.reply_code == 530


@pytest.mark.parametrize("limited", [{"max_connections_per_user": 1}], indirect=True)
def test_per_user_connection_limit(limited: RoostBroker) -> None:
    add_user(limited, "bob", FULL)
    with connected(limited):
        close = login(limited, "guest", "guest")
        assert isinstance(close, C.Connection.Close)
        assert close.reply_text == (
            "NOT_ALLOWED - connection refused for user 'guest': "
            "user connection limit (1) is reached"
        )
        # Other users have their own count.
        with connected(limited, "bob"):
            pass
    wait_for(lambda: open_count(limited) == 0)
    assert isinstance(login(limited, "guest", "guest"), C.Connection.OpenOk)


def test_no_connection_limit_by_default(roost_broker: RoostBroker) -> None:
    conns = [connect(roost_broker) for _ in range(5)]
    try:
        assert open_count(roost_broker) == 5
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("limited", [{"max_queues_per_vhost": 2}], indirect=True)
def test_queue_limit_per_vhost(limited: RoostBroker) -> None:
    broker = broker_of(limited)

    def add() -> None:
        broker.add_vhost("other")
        broker.permissions[("guest", "other")] = FULL

    limited.call(add)
    with connected(limited) as conn:
        ch = conn.channel()
        ch.queue_declare("a")
        ch.queue_declare("b", durable=True)
        ch.queue_declare("a")  # redeclaring an existing queue is fine
        ch.queue_declare("b", passive=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.queue_declare("c")
        assert exc.value.reply_code == 406
        assert exc.value.reply_text == (
            "PRECONDITION_FAILED - cannot declare queue 'c': "
            "queue limit in vhost '/' (2) is reached"
        )
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.queue_declare("", exclusive=True)
        assert exc.value.reply_text.startswith(
            "PRECONDITION_FAILED - cannot declare queue 'amq.gen-"
        )
        assert exc.value.reply_text.endswith("': queue limit in vhost '/' (2) is reached")
        assert sorted(broker.vhosts["/"].queues) == ["a", "b"]
        # Each vhost counts its own queues.
        with connected(limited, vhost="other") as other:
            och = other.channel()
            och.queue_declare("c")
            och.queue_declare("d")
        # Deleting one makes room again.
        ch = conn.channel()
        ch.queue_delete("a")
        assert ch.queue_declare("c").method.queue == "c"
        ch.basic_publish("", "c", b"ok")
        assert ch.basic_get("c", auto_ack=True)[2] == b"ok"
