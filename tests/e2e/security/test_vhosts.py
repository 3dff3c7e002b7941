"""Virtual hosts: access at connection.open, isolation, and deletion."""

from __future__ import annotations

import json
from pathlib import Path

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
    set_permissions,
    wait_for,
)


def add_vhost(rb: RoostBroker, name: str, users: tuple[str, ...] = ("guest",)) -> None:
    broker = broker_of(rb)

    def add() -> None:
        broker.add_vhost(name)
        for user in users:
            broker.permissions[(user, name)] = FULL

    rb.call(add)


def test_unknown_vhost_is_refused_with_530(roost_broker: RoostBroker) -> None:
    close = login(roost_broker, "guest", "guest", vhost="nope")
    assert isinstance(close, C.Connection.Close)
    assert (close.reply_code, close.reply_text) == (530, "NOT_ALLOWED - vhost nope not found")
    assert (close.class_id, close.method_id) == (10, 40)


def test_user_without_permissions_on_the_vhost_is_refused(roost_broker: RoostBroker) -> None:
    add_user(roost_broker, "bob", None)
    close = login(roost_broker, "bob", "pw")
    assert isinstance(close, C.Connection.Close)
    assert close.reply_code == 530
    assert close.reply_text == "NOT_ALLOWED - access to vhost '/' refused for user 'bob'"
    # Any permission entry, even one permitting nothing, grants the vhost.
    set_permissions(roost_broker, "bob", ("", "", ""))
    assert isinstance(login(roost_broker, "bob", "pw"), C.Connection.OpenOk)


def test_permissions_on_one_vhost_do_not_open_another(roost_broker: RoostBroker) -> None:
    add_vhost(roost_broker, "tenant-a", users=())
    add_user(roost_broker, "alice", FULL, vhost="tenant-a")
    assert isinstance(login(roost_broker, "alice", "pw", vhost="tenant-a"), C.Connection.OpenOk)
    close = login(roost_broker, "alice", "pw", vhost="/")
    assert isinstance(close, C.Connection.Close)
    assert close.reply_text == "NOT_ALLOWED - access to vhost '/' refused for user 'alice'"
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        connect(roost_broker, "guest", vhost="tenant-a")


def test_vhosts_are_isolated(roost_broker: RoostBroker) -> None:
    add_vhost(roost_broker, "a")
    add_vhost(roost_broker, "b")
    with connected(roost_broker, vhost="a") as ca, connected(roost_broker, vhost="b") as cb:
        cha, chb = ca.channel(), cb.channel()
        # Same names, separate objects.
        for ch, tag in ((cha, b"a"), (chb, b"b")):
            ch.queue_declare("jobs")
            ch.exchange_declare("events", "fanout")
            ch.queue_bind("jobs", "events")
            ch.confirm_delivery()
            ch.basic_publish("events", "", b"from " + tag)
        cha.exchange_declare("only-in-a", "direct")
        cha.queue_declare("only-in-a")
        assert cha.basic_get("jobs", auto_ack=True)[2] == b"from a"
        assert cha.basic_get("jobs")[0] is None
        assert chb.basic_get("jobs", auto_ack=True)[2] == b"from b"
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            chb.exchange_declare("only-in-a", passive=True)
        assert exc.value.reply_text == "NOT_FOUND - no exchange 'only-in-a' in vhost 'b'"
        chb = cb.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            chb.queue_declare("only-in-a", passive=True)
        assert exc.value.reply_text == "NOT_FOUND - no queue 'only-in-a' in vhost 'b'"
        # Publishing in b to a's exchange name routes within b only.
        chb = cb.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            chb.confirm_delivery()
            chb.basic_publish("only-in-a", "only-in-a", b"lost")
        assert exc.value.reply_code == 404
        assert cha.queue_declare("only-in-a", passive=True).method.message_count == 0
    with connected(roost_broker) as conn, pytest.raises(pika.exceptions.ChannelClosedByBroker):
        conn.channel().queue_declare("jobs", passive=True)


def test_permissions_are_per_vhost(roost_broker: RoostBroker) -> None:
    add_vhost(roost_broker, "a", users=())
    add_vhost(roost_broker, "b", users=())
    add_user(roost_broker, "bob", FULL, vhost="a")
    set_permissions(roost_broker, "bob", ("", "", ".*"), vhost="b")
    with connected(roost_broker, "bob", vhost="a") as conn:
        conn.channel().queue_declare("q")
    with connected(roost_broker, "bob", vhost="b") as conn:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            conn.channel().queue_declare("q")
        assert exc.value.reply_text == (
            "ACCESS_REFUSED - access to queue 'q' in vhost 'b' refused for user 'bob'"
        )


def test_deleting_a_vhost_closes_its_connections_only(roost_broker: RoostBroker) -> None:
    add_vhost(roost_broker, "doomed")
    broker = broker_of(roost_broker)
    doomed = connect(roost_broker, vhost="doomed")
    other = connect(roost_broker)
    try:
        doomed.channel().queue_declare("q")
        assert roost_broker.call(lambda: broker.delete_vhost("doomed")) is True
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as exc:
            for _ in range(100):
                doomed.process_data_events(0.05)
        assert exc.value.reply_code == 320
        assert exc.value.reply_text == "CONNECTION_FORCED - vhost 'doomed' is down"
        assert other.is_open
        other.channel().queue_declare("still-here")
    finally:
        other.close()
    close = login(roost_broker, "guest", "guest", vhost="doomed")
    assert isinstance(close, C.Connection.Close)
    assert close.reply_text == "NOT_ALLOWED - vhost doomed not found"
    assert roost_broker.call(lambda: broker.delete_vhost("doomed")) is False


def test_deleted_vhost_loses_queues_exchanges_messages_and_permissions(
    roost_broker: RoostBroker,
) -> None:
    add_vhost(roost_broker, "v")
    add_user(roost_broker, "bob", FULL, vhost="v")
    broker = broker_of(roost_broker)
    with connected(roost_broker, "bob", vhost="v") as conn:
        ch = conn.channel()
        ch.queue_declare("dq", durable=True)
        ch.exchange_declare("dx", "direct", durable=True)
        ch.queue_bind("dq", "dx", "k")
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("dx", "k", b"%d" % i, pika.BasicProperties(delivery_mode=2))
    journal = broker.journal
    assert journal is not None
    assert roost_broker.call(lambda: sum(journal.live.values())) == 3  # type: ignore[attr-defined]
    roost_broker.call(lambda: broker.delete_vhost("v"))
    assert roost_broker.call(lambda: sum(journal.live.values())) == 0  # type: ignore[attr-defined]
    assert ("bob", "v") not in broker.permissions
    # Re-created, the vhost starts empty and grants nobody access.
    add_vhost(roost_broker, "v", users=("guest",))
    assert isinstance(login(roost_broker, "bob", "pw", vhost="v"), C.Connection.Close)
    with (
        connected(roost_broker, vhost="v") as conn,
        pytest.raises(pika.exceptions.ChannelClosedByBroker),
    ):
        conn.channel().queue_declare("dq", passive=True)


def test_deleted_vhost_stays_deleted_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RoostBroker(data_dir=str(data)) as rb:
        add_vhost(rb, "v")
        add_vhost(rb, "kept")
        for vh in ("v", "kept"):
            with connected(rb, vhost=vh) as conn:
                ch = conn.channel()
                ch.queue_declare("dq", durable=True)
                ch.confirm_delivery()
                ch.basic_publish("", "dq", vh.encode(), pika.BasicProperties(delivery_mode=2))
        broker = broker_of(rb)
        rb.call(lambda: broker.delete_vhost("v"))
        wait_for(
            lambda: (
                "v"
                not in {
                    v["name"] for v in json.loads((data / "definitions.json").read_text())["vhosts"]
                }
            )
        )
    with RoostBroker(data_dir=str(data)) as rb:
        assert sorted(broker_of(rb).vhosts) == ["/", "kept"]
        close = login(rb, "guest", "guest", vhost="v")
        assert isinstance(close, C.Connection.Close) and close.reply_code == 530
        with connected(rb, vhost="kept") as conn:
            assert conn.channel().basic_get("dq", auto_ack=True)[2] == b"kept"
        assert sum(broker_of(rb).journal.live.values()) == 0  # type: ignore[union-attr]
