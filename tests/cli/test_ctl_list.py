"""``roost ctl`` on a running broker's contents: list, purge, delete,
publish, get, status, and export/import of definitions."""

from __future__ import annotations

import base64
import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from roost import __version__
from roost.cli import main
from roost.control import cli as control_cli
from roost.control.commands import ControlError
from roost.control.socket_path import control_socket
from roost.testing import RoostProcess

Ctl = tuple[int, str, str]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoostProcess]:
    proc = RoostProcess(tmp_path_factory.mktemp("ctl-list") / "data")
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture
def conn(broker: RoostProcess) -> Iterator[pika.BlockingConnection]:
    c = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        yield c
    finally:
        if c.is_open:
            c.close()


@pytest.fixture
def name() -> str:
    """A queue/exchange name of this test's own (the broker is shared)."""
    return f"ctl-{uuid.uuid4().hex[:8]}"


def ctl(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Ctl:
    """``roost ctl ARGS --data-dir DIR`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["ctl", *args, "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(result: Ctl) -> str:
    rc, out, err = result
    assert rc == 0, (rc, out, err)
    return out


def ctl_json(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Any:
    return json.loads(ok(ctl(capsys, data_dir, *args, "--json")))


def ctl_process(data_dir: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", "ctl", *args, "--data-dir", str(data_dir)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def depth(conn: pika.BlockingConnection, queue: str) -> int:
    ch = conn.channel()
    count = ch.queue_declare(queue, passive=True).method.message_count
    ch.close()
    return int(count)


# -- list -------------------------------------------------------------------


def test_list_queues_table_and_json(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name, durable=True)
    for i in range(3):
        ch.basic_publish("", name, f"m{i}".encode())
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(name, lambda *a: None)
    conn.process_data_events(0.2)  # let the one delivery arrive (unacked)

    rows = table(ok(ctl(capsys, broker.data_dir, "list", "queues")))
    assert rows[0] == ["name", "messages", "ready", "unacked", "consumers", "durable"]
    assert [name, "3", "2", "1", "1", "True"] in rows[1:]

    [row] = [r for r in ctl_json(capsys, broker.data_dir, "list", "queues") if r["name"] == name]
    assert row == {
        "name": name,
        "messages": 3,
        "ready": 2,
        "unacked": 1,
        "consumers": 1,
        "durable": True,
        "auto_delete": False,
        "exclusive": False,
    }


def test_list_exchanges_and_bindings(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.exchange_declare(name, "topic", durable=True)
    ch.queue_declare(name, auto_delete=True)
    ch.queue_bind(name, name, "orders.*")

    rows = table(ok(ctl(capsys, broker.data_dir, "list", "exchanges")))
    assert rows[0] == ["name", "type", "durable", "auto_delete", "internal"]
    assert [name, "topic", "True", "False", "False"] in rows
    assert ["amq.fanout", "fanout", "True", "False", "False"] in rows
    exchanges = ctl_json(capsys, broker.data_dir, "list", "exchanges")
    assert {
        "name": name,
        "type": "topic",
        "durable": True,
        "auto_delete": False,
        "internal": False,
    } in exchanges

    bindings = ctl_json(capsys, broker.data_dir, "list", "bindings")
    assert {
        "source": name,
        "destination": name,
        "destination_type": "queue",
        "routing_key": "orders.*",
        "arguments": {},
    } in bindings
    # The default exchange's implicit binding, as rabbitmqctl lists it.
    assert {
        "source": "",
        "destination": name,
        "destination_type": "queue",
        "routing_key": name,
        "arguments": {},
    } in bindings
    rows = table(ok(ctl(capsys, broker.data_dir, "list", "bindings")))
    assert rows[0] == ["source", "destination", "destination_type", "routing_key"]
    assert [name, name, "queue", "orders.*"] in rows


def test_list_connections_channels_and_consumers(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch1 = conn.channel()
    ch1.queue_declare(name, auto_delete=True)
    ch2 = conn.channel()
    ch2.basic_qos(prefetch_count=7)
    ch2.basic_consume(name, lambda *a: None, consumer_tag=f"{name}-tag")
    ch2.confirm_delivery()

    conns = ctl_json(capsys, broker.data_dir, "list", "connections")
    [mine] = [c for c in conns if c["channels"] == 2]
    assert mine["user"] == "guest" and mine["vhost"] == "/" and mine["tls"] is False
    assert mine["peer"].startswith("127.0.0.1:")
    assert mine["client"] == "Pika Python Client Library"
    rows = table(ok(ctl(capsys, broker.data_dir, "list", "connections")))
    assert rows[0] == ["peer", "user", "vhost", "channels", "tls", "client"]
    assert [mine["peer"], "guest", "/", "2", "False"] in [r[:5] for r in rows]

    channels = [
        c
        for c in ctl_json(capsys, broker.data_dir, "list", "channels")
        if c["connection"] == mine["peer"]
    ]
    assert [(c["number"], c["consumers"], c["prefetch"], c["confirm"]) for c in channels] == [
        (ch1.channel_number, 0, 0, False),
        (ch2.channel_number, 1, 7, True),
    ]

    consumers = ctl_json(capsys, broker.data_dir, "list", "consumers")
    assert {
        "queue": name,
        "tag": f"{name}-tag",
        "connection": mine["peer"],
        "channel": ch2.channel_number,
        "ack_required": True,
        "prefetch": 7,
        "exclusive": False,
    } in consumers
    rows = table(ok(ctl(capsys, broker.data_dir, "list", "consumers")))
    assert [name, f"{name}-tag", mine["peer"], str(ch2.channel_number), "True", "7"] in rows


def test_list_in_another_vhost(
    broker: RoostProcess, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(ctl(capsys, broker.data_dir, "add-vhost", name))
    ok(ctl(capsys, broker.data_dir, "set-permissions", "-p", name, "guest", ".*", ".*", ".*"))
    params = pika.URLParameters(broker.url)
    params.virtual_host = name
    with pika.BlockingConnection(params) as c:
        c.channel().queue_declare("only-here")
        queues = ctl_json(capsys, broker.data_dir, "list", "queues", "-p", name)
        assert [q["name"] for q in queues] == ["only-here"]
        conns = ctl_json(capsys, broker.data_dir, "list", "connections", "-p", name)
        assert [(c["user"], c["vhost"]) for c in conns] == [("guest", name)]
    assert "only-here" not in ok(ctl(capsys, broker.data_dir, "list", "queues"))
    assert ctl(capsys, broker.data_dir, "list", "queues", "-p", "nope") == (
        1,
        "",
        "roost: vhost 'nope' does not exist\n",
    )


# -- purge, delete ----------------------------------------------------------


def test_purge(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name)
    for i in range(5):
        ch.basic_publish("", name, f"m{i}".encode())
    assert ok(ctl(capsys, broker.data_dir, "purge", name)) == (
        f"purged 5 message(s) from queue '{name}'\n"
    )
    assert depth(conn, name) == 0
    assert ctl(capsys, broker.data_dir, "purge", "missing-q") == (
        1,
        "",
        "roost: queue 'missing-q' does not exist in vhost '/'\n",
    )


def test_delete_queue_and_exchange(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name, durable=True)
    ch.basic_publish("", name, b"x")
    ch.exchange_declare(name, "fanout")
    assert ok(ctl(capsys, broker.data_dir, "delete", "queue", name)) == (
        f"deleted queue '{name}' (1 message(s))\n"
    )
    assert ok(ctl(capsys, broker.data_dir, "delete", "exchange", name)) == (
        f"deleted exchange '{name}'\n"
    )
    with pytest.raises(ChannelClosedByBroker) as exc:
        conn.channel().queue_declare(name, passive=True)
    assert exc.value.reply_code == 404
    with pytest.raises(ChannelClosedByBroker) as exc:
        conn.channel().exchange_declare(name, passive=True)
    assert exc.value.reply_code == 404
    rc, _, err = ctl(capsys, broker.data_dir, "delete", "exchange", "amq.topic")
    assert (rc, err) == (1, "roost: exchange 'amq.topic' is built in and cannot be deleted\n")
    rc, _, err = ctl(capsys, broker.data_dir, "delete", "queue", name)
    assert (rc, err) == (1, f"roost: queue '{name}' does not exist in vhost '/'\n")


# -- publish, get -------------------------------------------------------------


def test_publish_body_with_count_and_exchange(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name)
    ch.queue_bind(name, "amq.direct", "k1")
    assert ok(ctl(capsys, broker.data_dir, "publish", name, "hello", "--count", "3")) == (
        "published 3 message(s), 3 routed\n"
    )
    assert ok(ctl(capsys, broker.data_dir, "publish", "-e", "amq.direct", "k1", "direct!")) == (
        "published 1 message(s), 1 routed\n"
    )
    got = []
    for _ in range(4):
        method, _props, body = ch.basic_get(name, auto_ack=True)
        assert method is not None
        got.append((method.exchange, method.routing_key, body))
    assert got == [("", name, b"hello")] * 3 + [("amq.direct", "k1", b"direct!")]
    assert ok(ctl(capsys, broker.data_dir, "publish", "nowhere-" + name, "lost")) == (
        "published 1 message(s), 0 routed\n"
    )
    rc, _, err = ctl(capsys, broker.data_dir, "publish", "-e", "no-such-ex", "k", "x")
    assert (rc, err) == (1, "roost: exchange 'no-such-ex' does not exist in vhost '/'\n")


def test_publish_from_file_and_stdin(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name)
    body = bytes(range(256))
    (tmp_path / "body.bin").write_bytes(body)
    ok(
        ctl(
            capsys,
            broker.data_dir,
            "publish",
            name,
            "--file",
            str(tmp_path / "body.bin"),
            "--persistent",
        )
    )
    done = ctl_process(broker.data_dir, "publish", name, stdin=b"from stdin\n")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "published 1 message(s), 1 routed\n",
        "",
    )
    _, props, got = ch.basic_get(name, auto_ack=True)
    assert got == body and props.delivery_mode == 2
    _, props, got = ch.basic_get(name, auto_ack=True)
    assert got == b"from stdin\n" and props.delivery_mode is None


def test_get_acknowledges_or_requeues(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name)
    for body in (b"one", b"two", b"\xff\xfe"):
        ch.basic_publish("", name, body)

    got = ctl_json(capsys, broker.data_dir, "get", name, "--count", "2", "--requeue")
    assert [(m["payload"], m["redelivered"]) for m in got] == [("one", False), ("two", False)]
    assert depth(conn, name) == 3
    rows = table(ok(ctl(capsys, broker.data_dir, "get", name, "--count", "5")))
    assert rows[0] == ["routing_key", "exchange", "redelivered", "payload_bytes", "payload"]
    # The default exchange's empty name leaves its column blank.
    assert rows[1:3] == [[name, "True", "3", "one"], [name, "True", "3", "two"]]
    assert depth(conn, name) == 0

    ch.basic_publish("", name, b"\xff\xfe")
    [binary] = ctl_json(capsys, broker.data_dir, "get", name, "--count", "3")
    assert binary["payload_encoding"] == "base64"
    assert base64.b64decode(binary["payload"]) == b"\xff\xfe"
    assert ctl_json(capsys, broker.data_dir, "get", name) == []


# -- status -------------------------------------------------------------------


def test_status(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.queue_declare(name)
    ch.basic_publish("", name, b"x")
    status = ctl_json(capsys, broker.data_dir, "status")
    assert status["version"] == __version__
    assert status["uptime_s"] >= 0
    assert {"protocol": "amqp", "ip_address": broker.host, "port": broker.port} in status[
        "listeners"
    ]
    assert {"protocol": "http", "ip_address": broker.host, "port": broker.http_port} in status[
        "listeners"
    ]
    assert status["connections"] >= 1
    assert status["queues"] >= 1 and status["messages"] >= 1
    assert status["memory_rss"] > 1024 * 1024
    assert status["alarms"] == []
    assert status["data_dir"] == str(broker.data_dir)
    assert status["store_bytes"] > 0
    lines = dict(
        line.split(None, 1)
        for line in ok(ctl(capsys, broker.data_dir, "status")).splitlines()
        if not line.startswith(("memory", "data", "store"))
    )
    assert lines["version"] == __version__
    assert f"amqp {broker.host}:{broker.port}" in lines["listeners"]
    assert lines["alarms"] == "none"
    out = ok(ctl(capsys, broker.data_dir, "status"))
    assert f"data directory  {broker.data_dir}\n" in out
    assert "memory (RSS)" in out and "store size" in out


# -- export / import ----------------------------------------------------------


def test_export_import_round_trip_on_a_running_broker(
    broker: RoostProcess,
    conn: pika.BlockingConnection,
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ch = conn.channel()
    ch.exchange_declare(name, "direct", durable=True)
    ch.queue_declare(name, durable=True)
    ch.queue_bind(name, name, "rk")
    ok(ctl(capsys, broker.data_dir, "add-user", name, "--password", "pw"))
    path = tmp_path / "defs.json"
    rc, _, err = ctl(capsys, broker.data_dir, "export", str(path))
    assert rc == 0 and "from the running broker" in err
    assert os.stat(path).st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert name in [q["name"] for q in data["queues"]]
    assert name in [u["name"] for u in data["users"]]

    ok(ctl(capsys, broker.data_dir, "delete", "queue", name))
    ok(ctl(capsys, broker.data_dir, "delete", "exchange", name))
    ok(ctl(capsys, broker.data_dir, "delete-user", name))
    rc, _, err = ctl(capsys, broker.data_dir, "import", str(path))
    assert rc == 0, err
    assert "into the running broker" in err

    assert name in [q["name"] for q in ctl_json(capsys, broker.data_dir, "list", "queues")]
    assert name in [u["name"] for u in ctl_json(capsys, broker.data_dir, "list-users")]
    ch.basic_publish(name, "rk", b"routed again")
    _, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"routed again"


def test_export_import_on_a_stopped_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "defs.json"
    src.write_text(
        json.dumps(
            {
                "vhosts": [{"name": "/"}],
                "queues": [{"name": "offline-q", "vhost": "/", "durable": True}],
            }
        )
    )
    data_dir = tmp_path / "data"
    rc, _, err = ctl(capsys, data_dir, "import", str(src))
    assert rc == 0 and "imported" in err, err
    out = tmp_path / "out.json"
    rc, _, err = ctl(capsys, data_dir, "export", str(out))
    assert rc == 0, err
    assert [q["name"] for q in json.loads(out.read_text())["queues"]] == ["offline-q"]
    # Standard input works too (read before finding no broker).
    more = json.dumps({"queues": [{"name": "stdin-q", "vhost": "/", "durable": True}]})
    done = ctl_process(data_dir, "import", "-", stdin=more.encode())
    assert done.returncode == 0, done.stderr
    assert "from standard input" in done.stderr
    with RoostProcess(data_dir) as proc:
        names = [q["name"] for q in ctl_json(capsys, proc.data_dir, "list", "queues")]
        assert names == ["offline-q", "stdin-q"]


def test_without_a_running_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "stopped"
    message = f"roost: no broker running on {data_dir}\n"
    for args in (
        ("list", "queues"),
        ("list", "connections"),
        ("purge", "q"),
        ("delete", "queue", "q"),
        ("publish", "q", "body"),
        ("get", "q"),
        ("status",),
    ):
        assert ctl(capsys, data_dir, *args) == (1, "", message), args


def test_bad_import_file(
    broker: RoostProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"queues": "nope"}')
    rc, _, err = ctl(capsys, broker.data_dir, "import", str(path))
    assert (rc, err) == (2, f"roost: {path} is not a definitions file: 'queues' must be a list\n")


def test_broker_refuses_bad_definitions_whole(broker: RoostProcess, name: str) -> None:
    # The broker checks each import request as the client checks the file,
    # so another client of the control socket cannot half-apply one either.
    path = control_socket(broker.data_dir)
    bad = {"users": [{"name": name, "password": "pw"}], "queues": "nope"}
    with pytest.raises(ControlError, match=r"^not a definitions file: 'queues' must be a list$"):
        control_cli.request(path, "import_definitions", {"definitions": bad})
    users = control_cli.request(path, "list_users", {})
    assert name not in [u["name"] for u in users]


# -- progress bars --------------------------------------------------------------


def _run_with_tty_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run with standard error on a pseudo-terminal: (exit code, stdout, terminal output)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode()


def test_bulk_publish_shows_progress_only_on_a_terminal(
    broker: RoostProcess, conn: pika.BlockingConnection, name: str
) -> None:
    conn.channel().queue_declare(name)
    args = ["publish", name, "b", "--count", "25000"]
    cmd = [sys.executable, "-m", "roost", "ctl", *args, "--data-dir", str(broker.data_dir)]
    rc, out, terminal = _run_with_tty_stderr(cmd)
    assert (rc, out) == (0, "published 25000 message(s), 25000 routed\n")
    assert "publishing [" in terminal
    assert "100% 25000/25000" in terminal
    assert "10000/25000" in terminal  # drawn between batches, not only at the end
    done = ctl_process(broker.data_dir, *args)
    assert (done.returncode, done.stderr) == (0, "")
    assert depth(conn, name) == 50000
    conn.channel().queue_purge(name)


def test_large_import_shows_progress_on_a_terminal(broker: RoostProcess, tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(
        json.dumps(
            {"queues": [{"name": f"bulk-{i}", "vhost": "/", "durable": False} for i in range(1200)]}
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "roost",
        "ctl",
        "import",
        str(path),
        "--data-dir",
        str(broker.data_dir),
    ]
    rc, _, terminal = _run_with_tty_stderr(cmd)
    assert rc == 0, terminal
    assert "importing [" in terminal and "1200/1200" in terminal
    assert "500/1200" in terminal
