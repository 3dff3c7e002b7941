"""Definitions survive a restart, graceful (SIGTERM) or not (SIGKILL):
durable exchanges, queues and bindings come back with their flags and
arguments, non-durable ones do not, and definitions.json stays in
RabbitMQ's format."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from roost.broker.users import hash_password
from roost.testing import RoostProcess
from tests.store.helpers import connect, drain

PERSISTENT = pika.BasicProperties(delivery_mode=2)

# name -> (type, durable, auto_delete, internal, arguments)
EXCHANGES: dict[str, tuple[str, bool, bool, bool, dict[str, Any]]] = {
    "d.direct": ("direct", True, False, False, {}),
    "d.fanout": ("fanout", True, False, False, {"alternate-exchange": "d.ae"}),
    "d.ae": ("fanout", True, False, False, {}),
    "d.topic": ("topic", True, False, True, {}),
    "d.headers": ("headers", True, False, False, {"x-note": "kept"}),
    "d.autodel": ("direct", True, True, False, {}),
}
QUEUES: dict[str, dict[str, Any]] = {
    "d.q1": {"x-message-ttl": 60000, "x-max-length": 100},
    "d.q2": {"x-dead-letter-exchange": "d.direct", "x-dead-letter-routing-key": "dead"},
    "d.q3": {},
}


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data")
    try:
        yield p.start()
    finally:
        p.close()


def _declare_all(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    for name, (kind, durable, auto_delete, internal, args) in EXCHANGES.items():
        ch.exchange_declare(
            name, kind, durable=durable, auto_delete=auto_delete, internal=internal, arguments=args
        )
    for name, args in QUEUES.items():
        ch.queue_declare(name, durable=True, arguments=args)
    ch.queue_bind("d.q1", "d.direct", "rk1")
    ch.queue_bind("d.q3", "d.ae", "")
    ch.queue_bind("d.q3", "d.autodel", "x")
    ch.queue_bind("d.q2", "d.topic", "a.*")
    ch.exchange_bind("d.topic", "d.headers", "", arguments={"x-match": "all", "color": "red"})
    # Non-durable things, some tied to durable ones.
    ch.exchange_declare("t.ex", "direct", durable=False)
    ch.queue_declare("t.q", durable=False)
    ch.queue_bind("t.q", "d.direct", "rk1")
    ch.queue_bind("d.q3", "t.ex", "y")
    ch.exchange_bind("d.direct", "t.ex", "z")
    # A durable queue deleted with messages in it.
    ch.queue_declare("d.gone", durable=True)
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", "d.gone", f"g{i}".encode(), PERSISTENT)
    ch.queue_delete("d.gone")
    # Declarations are saved in order with the message log: once this
    # persistent publish is confirmed, everything above is on disk.
    ch.basic_publish("", "d.q3", b"barrier", PERSISTENT)
    conn.close()


def _graceful(proc: RoostProcess) -> None:
    assert proc.terminate() == 0


RESTARTS: dict[str, Callable[[RoostProcess], None]] = {
    "sigterm": _graceful,
    "sigkill": RoostProcess.kill,
}


def _closed_with(
    code: int, fn: Callable[[BlockingChannel], object], conn: pika.BlockingConnection
) -> str:
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        fn(ch)
    assert exc.value.reply_code == code, exc.value
    return str(exc.value.reply_text)


@pytest.mark.parametrize("stop", RESTARTS)
def test_durable_definitions_survive_restart(proc: RoostProcess, stop: str) -> None:
    _declare_all(proc)
    RESTARTS[stop](proc)
    proc.start()
    conn = connect(proc.port)
    try:
        ch = conn.channel()
        # Same declarations: accepted.
        for name, (kind, durable, auto_delete, internal, args) in EXCHANGES.items():
            ch.exchange_declare(
                name,
                kind,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                arguments=args,
            )
        for name, args in QUEUES.items():
            ch.queue_declare(name, durable=True, arguments=args)
        # Different ones: 406, naming the argument.
        diffs: list[tuple[str, Callable[[BlockingChannel], object]]] = [
            ("type", lambda c: c.exchange_declare("d.direct", "fanout", durable=True)),
            ("durable", lambda c: c.exchange_declare("d.direct", "direct", durable=False)),
            ("auto_delete", lambda c: c.exchange_declare("d.autodel", "direct", durable=True)),
            ("internal", lambda c: c.exchange_declare("d.topic", "topic", durable=True)),
            (
                "alternate-exchange",
                lambda c: c.exchange_declare(
                    "d.fanout", "fanout", durable=True, arguments={"alternate-exchange": "other"}
                ),
            ),
            (
                "x-message-ttl",
                lambda c: c.queue_declare(
                    "d.q1", durable=True, arguments={"x-message-ttl": 1, "x-max-length": 100}
                ),
            ),
            (
                "x-max-length",
                lambda c: c.queue_declare("d.q1", durable=True, arguments={"x-message-ttl": 60000}),
            ),
            ("x-dead-letter-exchange", lambda c: c.queue_declare("d.q2", durable=True)),
            ("durable", lambda c: c.queue_declare("d.q3", durable=False)),
        ]
        for arg, fn in diffs:
            text = _closed_with(406, fn, conn)
            assert f"inequivalent arg '{arg}'" in text, text
        # Non-durable things and the deleted queue are gone.
        _closed_with(404, lambda c: c.queue_declare("t.q", passive=True), conn)
        _closed_with(404, lambda c: c.exchange_declare("t.ex", passive=True), conn)
        _closed_with(404, lambda c: c.queue_declare("d.gone", passive=True), conn)
        # Bindings route as before.
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("d.direct", "rk1", b"to-q1", PERSISTENT)
        ch.basic_publish("d.fanout", "", b"via-ae", PERSISTENT)
        ch.basic_publish("d.autodel", "x", b"via-autodel", PERSISTENT)
        ch.basic_publish(
            "d.headers",
            "a.b",
            b"red",
            pika.BasicProperties(delivery_mode=2, headers={"color": "red"}),
        )
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish(
                "d.headers",
                "a.b",
                b"blue",
                pika.BasicProperties(headers={"color": "blue"}),
                mandatory=True,
            )

        # The internal exchange is still internal.
        def publish_internal(c: BlockingChannel) -> None:
            c.basic_publish("d.topic", "a.b", b"x")
            c.queue_declare("d.q1", passive=True)  # a round trip for the close to arrive

        text = _closed_with(403, publish_internal, conn)
        assert "internal" in text
        # A queue of the deleted one's name starts empty.
        ch.queue_declare("d.gone", durable=True)
    finally:
        conn.close()
    assert drain(proc.port, "d.q1") == [("to-q1", False)]
    assert drain(proc.port, "d.q2") == [("red", False)]
    assert drain(proc.port, "d.q3") == [
        ("barrier", False),
        ("via-ae", False),
        ("via-autodel", False),
    ]
    assert drain(proc.port, "d.gone") == []
    # ...and stays empty over another crash.
    proc.kill()
    proc.start()
    assert drain(proc.port, "d.gone") == []


def test_definitions_json_has_rabbitmq_shape(proc: RoostProcess) -> None:
    _declare_all(proc)
    assert proc.terminate() == 0
    data = json.loads((proc.data_dir / "definitions.json").read_text())
    for key in ("users", "vhosts", "permissions", "exchanges", "queues", "bindings"):
        assert isinstance(data[key], list), key
    assert [u["name"] for u in data["users"]] == ["guest"]
    guest = data["users"][0]
    assert guest["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert guest["password_hash"] and guest["tags"] == ["administrator"]
    assert [v["name"] for v in data["vhosts"]] == ["/"]
    assert data["permissions"] == [
        {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    ]
    exchanges = {x["name"]: x for x in data["exchanges"]}
    assert set(exchanges) == set(EXCHANGES)
    for name, (kind, durable, auto_delete, internal, args) in EXCHANGES.items():
        x = exchanges[name]
        assert (x["vhost"], x["type"], x["durable"], x["auto_delete"], x["internal"]) == (
            "/",
            kind,
            durable,
            auto_delete,
            internal,
        ), name
        assert x["arguments"] == args
    queues = {q["name"]: q for q in data["queues"]}
    assert set(queues) == set(QUEUES)
    for name, args in QUEUES.items():
        q = queues[name]
        assert (q["vhost"], q["durable"], q["auto_delete"], q["arguments"]) == (
            "/",
            True,
            False,
            args,
        )
    bindings = sorted(
        (
            b["source"],
            b["destination"],
            b["destination_type"],
            b["routing_key"],
            json.dumps(b["arguments"], sort_keys=True),
        )
        for b in data["bindings"]
    )
    assert bindings == sorted(
        [
            ("d.direct", "d.q1", "queue", "rk1", "{}"),
            ("d.ae", "d.q3", "queue", "", "{}"),
            ("d.autodel", "d.q3", "queue", "x", "{}"),
            ("d.topic", "d.q2", "queue", "a.*", "{}"),
            ("d.headers", "d.topic", "exchange", "", '{"color": "red", "x-match": "all"}'),
        ]
    )


def test_users_from_definitions_file_are_loaded(proc: RoostProcess) -> None:
    """A user added to definitions.json (RabbitMQ's format) while the broker
    is down can log in after the restart (with that password only); guest
    still can too."""
    assert proc.terminate() == 0
    path = proc.data_dir / "definitions.json"
    data = json.loads(path.read_text())
    data["users"].append(
        {
            "name": "alice",
            "password_hash": hash_password("s3cret"),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [],
            "limits": {},
        }
    )
    data["permissions"].append(
        {"user": "alice", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    )
    path.write_text(json.dumps(data))
    proc.start()
    params = pika.ConnectionParameters(
        "127.0.0.1", proc.port, credentials=pika.PlainCredentials("alice", "s3cret")
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.queue_declare("alice-q")
        ch.basic_publish("", "alice-q", b"hi")
        method, _, body = ch.basic_get("alice-q", auto_ack=True)
        assert method is not None and body == b"hi"
    finally:
        conn.close()
    connect(proc.port).close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1",
                proc.port,
                credentials=pika.PlainCredentials("alice", "wrong"),
                connection_attempts=1,
            )
        )
    # The users survive the next (crash) restart as well.
    proc.kill()
    proc.start()
    saved = json.loads(path.read_text())
    assert sorted(u["name"] for u in saved["users"]) == ["alice", "guest"]
