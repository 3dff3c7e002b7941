"""The broker's log: a line per connection open and close (peer, user,
vhost, duration, reason) and per error, as text or JSON, never a body."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from roost.cli import main
from roost.testing import RoostProcess

SECRET = b"TOP-SECRET-BODY-8c1f"


@pytest.fixture
def text_broker() -> Iterator[RoostProcess]:
    with RoostProcess(None, "--log-level", "debug") as proc:
        yield proc


@pytest.fixture
def json_broker() -> Iterator[RoostProcess]:
    with RoostProcess(None, "--log-format", "json", "--log-level", "debug") as proc:
        yield proc


def wait_for(proc: RoostProcess, pred: Callable[[str], bool], timeout: float = 5.0) -> str:
    """The first line of the broker's output matching ``pred``, polling."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.output):
            if pred(line):
                return line
        time.sleep(0.02)
    raise AssertionError("no such log line in:\n" + "".join(proc.output))


def json_lines(proc: RoostProcess) -> list[dict[str, Any]]:
    """Every log record so far (the two start-up banners are plain text)."""
    return [json.loads(line) for line in list(proc.output) if not line.startswith("roost ")]


def wait_for_event(proc: RoostProcess, event: str, **fields: Any) -> dict[str, Any]:
    def match(line: str) -> bool:
        if not line.startswith("{"):
            return False
        record = json.loads(line)
        return record.get("event") == event and all(record.get(k) == v for k, v in fields.items())

    return dict(json.loads(wait_for(proc, match)))


def local_peer(conn: pika.BlockingConnection) -> str:
    """The client side's address, as the broker sees the peer."""
    host, port = conn._impl._transport._sock.getsockname()[:2]
    return f"{host}:{port}"


def test_text_lines_for_connection_open_and_close(text_broker: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(text_broker.url))
    peer = local_peer(conn)
    opened = wait_for(text_broker, lambda line: f"{peer}: connection opened" in line)
    assert re.search(r" INFO roost\.connection: ", opened)
    assert "user 'guest', vhost '/'" in opened
    conn.close()
    closed = wait_for(text_broker, lambda line: f"{peer}: connection closed" in line)
    assert re.search(
        r"\(user 'guest', vhost '/', \d+\.\d{3}s\): "
        r"client closed the connection: 200 Normal shutdown$",
        closed,
    ), closed


def test_json_records_with_structured_fields(json_broker: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(json_broker.url))
    peer = local_peer(conn)
    opened = wait_for_event(json_broker, "connection.opened", peer=peer)
    assert opened["user"] == "guest" and opened["vhost"] == "/"
    assert opened["level"] == "info" and opened["logger"] == "roost.connection"
    assert opened["tls"] is False and opened["client"] == "Pika Python Client Library"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", opened["time"])
    conn.close()
    closed = wait_for_event(json_broker, "connection.closed", peer=peer)
    assert closed["user"] == "guest" and closed["vhost"] == "/"
    assert isinstance(closed["duration_s"], float) and closed["duration_s"] >= 0
    assert closed["reason"] == "client closed the connection: 200 Normal shutdown"
    # Every line but the start-up banners is one JSON object.
    records = json_lines(json_broker)
    assert all(
        isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records
    )


def test_close_reason_when_the_broker_closes_it(json_broker: RoostProcess) -> None:
    rc = main(
        ["ctl", "add-user", "bob", "--password", "pw", "--data-dir", str(json_broker.data_dir)]
    )
    assert rc == 0
    rc = main(
        ["ctl", "set-permissions", "bob", ".*", ".*", ".*", "--data-dir", str(json_broker.data_dir)]
    )
    assert rc == 0
    params = pika.URLParameters(f"amqp://bob:pw@{json_broker.host}:{json_broker.port}/")
    conn = pika.BlockingConnection(params)
    peer = local_peer(conn)
    wait_for_event(json_broker, "connection.opened", peer=peer, user="bob")
    assert main(["ctl", "delete-user", "bob", "--data-dir", str(json_broker.data_dir)]) == 0
    # Let pika answer the broker's connection.close (else the broker waits
    # for its close-ok before dropping the socket).
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
        conn.process_data_events(2)
    closed = wait_for_event(json_broker, "connection.closed", peer=peer)
    assert closed["user"] == "bob"
    assert closed["reason"] == "CONNECTION_FORCED - user 'bob' is deleted"


def test_errors_are_logged_without_bodies(json_broker: RoostProcess) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(json_broker.url))
    peer = local_peer(conn)
    ch = conn.channel()
    ch.queue_declare("secrets")
    ch.basic_publish("", "secrets", SECRET, pika.BasicProperties(delivery_mode=2))
    _, _, body = ch.basic_get("secrets", auto_ack=True)
    assert body == SECRET
    ch.basic_publish("no-such-exchange", "rk", SECRET)
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.basic_get("secrets")
    assert exc.value.reply_code == 404
    error = wait_for_event(json_broker, "channel.error", peer=peer)
    assert error["code"] == 404 and error["level"] == "warning" and error["user"] == "guest"
    assert "no exchange 'no-such-exchange' in vhost '/'" in error["message"]
    conn.close()
    wait_for_event(json_broker, "connection.closed", peer=peer)
    assert SECRET.decode() not in "".join(json_broker.output)


def test_failed_login_is_a_warning_and_its_close_only_a_debug_line(
    json_broker: RoostProcess,
) -> None:
    params = pika.URLParameters(f"amqp://guest:wrong@{json_broker.host}:{json_broker.port}/")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)
    refused = wait_for_event(json_broker, "login.refused", user="guest")
    assert refused["level"] == "warning"
    assert "invalid credentials" in refused["message"] and "wrong" not in refused["message"]
    closed = wait_for_event(json_broker, "connection.closed", peer=refused["peer"])
    assert closed["level"] == "debug" and closed["vhost"] == ""
    assert closed["reason"].startswith("ACCESS_REFUSED - Login was refused")


def test_log_level_warning_hides_connection_lines() -> None:
    with RoostProcess(None, "--log-format", "json", "--log-level", "warning") as proc:
        with pika.BlockingConnection(pika.URLParameters(proc.url)) as conn:
            conn.channel().basic_publish("missing", "k", b"x")
        wait_for_event(proc, "channel.error")
        assert not [r for r in json_lines(proc) if r.get("event", "").startswith("connection.")]


def test_bad_log_format_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "roost", "serve", "--log-format", "xml", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == "roost: log_format: expected text or json, got 'xml'\n"
    assert (
        "--log-format LOG_FORMAT"
        in subprocess.run(
            [sys.executable, "-m", "roost", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    )


def test_control_characters_in_names_cannot_forge_text_lines(text_broker: RoostProcess) -> None:
    """A client chooses user (and vhost, queue ...) names: a CR/LF in one
    is escaped, so it cannot start a line of its own in the text log."""
    forged = "2026-01-01 00:00:00,000 INFO roost.connection: forged"
    creds = pika.PlainCredentials(f"mallory\r\n{forged}\x1b[2J", "pw")
    params = pika.ConnectionParameters(
        text_broker.host, text_broker.port, credentials=creds, connection_attempts=1
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)
    refused = wait_for(text_broker, lambda line: "login refused for user 'mallory" in line)
    assert "mallory\\x0d\\x0a2026-01-01" in refused and "\\x1b[2J" in refused
    assert not any(line.startswith(forged) for line in text_broker.output)
    assert not any("\x1b" in line for line in text_broker.output)
