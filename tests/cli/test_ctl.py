"""``roost ctl``: users, vhosts and permissions, on a running broker
(through its control socket) and on a stopped broker's data directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pika
import pytest
from pika.exceptions import (
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from roost.cli import main
from roost.testing import RoostProcess

Ctl = tuple[int, str, str]


def _ctl(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Ctl:
    """``roost ctl ARGS --data-dir DIR`` in this process: (exit code, stdout, stderr)."""
    rc = main(["ctl", *args, "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    return rc, out, err


def _ctl_process(data_dir: Path, *args: str, stdin: str = "") -> Ctl:
    """``roost ctl`` as its own process, as an administrator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "roost", "ctl", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stdout, done.stderr


def _ok(result: Ctl) -> str:
    rc, out, err = result
    assert (rc, err) == (0, ""), (rc, out, err)
    return out


def _connect(
    proc: RoostProcess, user: str, password: str, vhost: str = "/"
) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        host=proc.host,
        port=proc.port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=5,
    )
    return pika.BlockingConnection(params)


def _round_trip(conn: pika.BlockingConnection, queue: str) -> bytes | None:
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    ch.basic_publish("", queue, b"hello " + queue.encode())
    _, _, body = ch.basic_get(queue, auto_ack=True)
    return cast("bytes | None", body)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def broker(data_dir: Path) -> Iterator[RoostProcess]:
    proc = RoostProcess(data_dir)
    try:
        yield proc.start()
    finally:
        proc.close()


# -- the control socket ---------------------------------------------------


def test_control_socket_is_owner_only_and_removed_at_shutdown(
    broker: RoostProcess, data_dir: Path
) -> None:
    st = os.stat(data_dir / "roost.ctl")
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert broker.terminate() == 0
    assert not (data_dir / "roost.ctl").exists()
    assert [p.name for p in data_dir.iterdir() if p.name.startswith("roost.ctl")] == []


def test_raw_protocol_is_one_json_line_each_way(broker: RoostProcess, data_dir: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(data_dir / "roost.ctl"))
        reader = sock.makefile("rb")
        sock.sendall(b'{"command": "list_vhosts"}\n{"command": "nope"}\nnot json\n')
        assert json.loads(reader.readline()) == {"ok": True, "result": [{"name": "/"}]}
        assert json.loads(reader.readline()) == {"ok": False, "error": "unknown command 'nope'"}
        bad = json.loads(reader.readline())
        assert bad["ok"] is False
        assert bad["error"].startswith("request is not valid JSON")


# -- a running broker -------------------------------------------------------


def test_added_user_with_permissions_logs_in(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _ok(_ctl(capsys, data_dir, "add-user", "alice", "--password", "s3cret", "--tags", "a,b"))
    assert out == "added user 'alice'\n"
    out = _ok(_ctl(capsys, data_dir, "set-permissions", "alice", "^alice\\.", ".*", ".*"))
    assert out == "set permissions of user 'alice' in vhost '/'\n"
    conn = _connect(broker, "alice", "s3cret")
    assert _round_trip(conn, "alice.q") == b"hello alice.q"
    conn.close()
    with pytest.raises(ProbableAuthenticationError):
        _connect(broker, "alice", "wrong")
    # On disk by the time ctl returns, and hashed: never the plaintext.
    saved = json.loads((data_dir / "definitions.json").read_text())
    alice = next(u for u in saved["users"] if u["name"] == "alice")
    assert alice["tags"] == ["a", "b"]
    assert alice["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert "s3cret" not in (data_dir / "definitions.json").read_text()
    assert {
        "user": "alice",
        "vhost": "/",
        "configure": "^alice\\.",
        "write": ".*",
        "read": ".*",
    } in (saved["permissions"])


def test_deleted_user_cannot_log_in(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(_ctl(capsys, data_dir, "add-user", "bob", "--password", "pw"))
    _ok(_ctl(capsys, data_dir, "set-permissions", "bob", ".*", ".*", ".*"))
    _connect(broker, "bob", "pw").close()
    open_conn = _connect(broker, "bob", "pw")
    assert _ok(_ctl(capsys, data_dir, "delete-user", "bob")) == "deleted user 'bob'\n"
    # Its open connection is closed, as RabbitMQ does.
    with pytest.raises(ConnectionClosedByBroker) as closed:
        open_conn.process_data_events(time_limit=5)
    assert (closed.value.reply_code, closed.value.reply_text) == (
        320,
        "CONNECTION_FORCED - user 'bob' is deleted",
    )
    with pytest.raises(ProbableAuthenticationError):
        _connect(broker, "bob", "pw")
    users = json.loads(_ok(_ctl(capsys, data_dir, "list-users", "--json")))
    assert [u["name"] for u in users] == ["guest"]
    # Its permissions went with it.
    perms = json.loads(_ok(_ctl(capsys, data_dir, "list-permissions", "--json")))
    assert [p["user"] for p in perms] == ["guest"]


def test_change_password_from_stdin(broker: RoostProcess, data_dir: Path) -> None:
    _ok(_ctl_process(data_dir, "add-user", "carol", "--password-stdin", stdin="first\n"))
    _ok(_ctl_process(data_dir, "set-permissions", "carol", ".*", ".*", ".*"))
    _connect(broker, "carol", "first").close()
    out = _ok(_ctl_process(data_dir, "change-password", "carol", "--password-stdin", stdin="2nd\n"))
    assert out == "changed the password of user 'carol'\n"
    with pytest.raises(ProbableAuthenticationError):
        _connect(broker, "carol", "first")
    _connect(broker, "carol", "2nd").close()


def test_vhost_add_list_delete(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _ok(_ctl(capsys, data_dir, "add-vhost", "orders")) == "added vhost 'orders'\n"
    _ok(_ctl(capsys, data_dir, "set-permissions", "-p", "orders", "guest", ".*", ".*", ".*"))
    assert _ok(_ctl(capsys, data_dir, "list-vhosts")) == "name\n/\norders\n"
    conn = _connect(broker, "guest", "guest", "orders")
    ch = conn.channel()
    ch.queue_declare("kept", durable=True)
    ch.basic_publish("", "kept", b"x", pika.BasicProperties(delivery_mode=2))
    conn.close()
    assert _ok(_ctl(capsys, data_dir, "delete-vhost", "orders")) == "deleted vhost 'orders'\n"
    assert json.loads(_ok(_ctl(capsys, data_dir, "list-vhosts", "--json"))) == [{"name": "/"}]
    with pytest.raises(ProbableAccessDeniedError) as info:
        _connect(broker, "guest", "guest", "orders")
    assert "vhost orders not found" in str(info.value)
    saved = json.loads((data_dir / "definitions.json").read_text())
    assert [v["name"] for v in saved["vhosts"]] == ["/"]
    assert saved["queues"] == []
    assert all(p["vhost"] == "/" for p in saved["permissions"])
    # Re-created, it starts empty: the old queue and its message are gone.
    _ok(_ctl(capsys, data_dir, "add-vhost", "orders"))
    assert _ok(_ctl(capsys, data_dir, "list-permissions", "-p", "orders")) == (
        "user  configure  write  read\n"
    )
    _ok(_ctl(capsys, data_dir, "set-permissions", "-p", "orders", "guest", ".*", ".*", ".*"))
    conn = _connect(broker, "guest", "guest", "orders")
    with pytest.raises(ChannelClosedByBroker) as closed:
        conn.channel().queue_declare("kept", passive=True)
    assert closed.value.reply_code == 404
    conn.close()


def test_list_outputs_as_tables_and_json(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(_ctl(capsys, data_dir, "add-user", "zed", "--password", "pw", "--tags", "monitoring"))
    _ok(_ctl(capsys, data_dir, "add-user", "amy", "--password", "pw"))
    out = _ok(_ctl(capsys, data_dir, "set-tags", "amy", "management", "policymaker"))
    assert out == "set the tags of user 'amy' to: management, policymaker\n"
    _ok(_ctl(capsys, data_dir, "set-permissions", "amy", "", "^x$", ".*"))
    assert _ok(_ctl(capsys, data_dir, "list-users")) == (
        "name   tags\namy    management, policymaker\nguest  administrator\nzed    monitoring\n"
    )
    assert json.loads(_ok(_ctl(capsys, data_dir, "list-users", "--json"))) == [
        {"name": "amy", "tags": ["management", "policymaker"]},
        {"name": "guest", "tags": ["administrator"]},
        {"name": "zed", "tags": ["monitoring"]},
    ]
    assert _ok(_ctl(capsys, data_dir, "list-permissions", "-p", "/")) == (
        "user   configure  write  read\namy               ^x$    .*\nguest  .*         .*     .*\n"
    )
    assert json.loads(_ok(_ctl(capsys, data_dir, "list-permissions", "--json"))) == [
        {"user": "amy", "configure": "", "write": "^x$", "read": ".*"},
        {"user": "guest", "configure": ".*", "write": ".*", "read": ".*"},
    ]
    _ok(_ctl(capsys, data_dir, "clear-permissions", "amy"))
    out = _ok(_ctl(capsys, data_dir, "list-permissions", "--json"))
    assert [p["user"] for p in json.loads(out)] == ["guest"]
    # set-tags with no tags clears them.
    _ok(_ctl(capsys, data_dir, "set-tags", "zed"))
    users = json.loads(_ok(_ctl(capsys, data_dir, "list-users", "--json")))
    assert {"name": "zed", "tags": []} in users


# -- a stopped data directory -------------------------------------------


def test_stopped_data_dir_changes_are_served_at_next_start(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fresh directory: ctl creates its definitions, guest included.
    _ok(_ctl(capsys, data_dir, "add-user", "dave", "--password", "pw", "--tags", "monitoring"))
    assert not (data_dir / "roost.ctl").exists()
    _ok(_ctl(capsys, data_dir, "add-vhost", "jobs"))
    _ok(_ctl(capsys, data_dir, "set-permissions", "-p", "jobs", "dave", ".*", ".*", ".*"))
    _ok(_ctl(capsys, data_dir, "add-user", "gone", "--password", "pw"))
    _ok(_ctl(capsys, data_dir, "delete-user", "gone"))
    offline = [
        _ok(_ctl(capsys, data_dir, *cmd))
        for cmd in (("list-users",), ("list-vhosts", "--json"), ("list-permissions", "-p", "jobs"))
    ]
    assert "dave   monitoring" in offline[0]
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "dave", "pw", "jobs")
        assert _round_trip(conn, "q") == b"hello q"
        conn.close()
        _connect(proc, "guest", "guest").close()
        with pytest.raises(ProbableAuthenticationError):
            _connect(proc, "gone", "pw")
        # The same answers, now from the running broker.
        online = [
            _ok(_ctl(capsys, data_dir, *cmd))
            for cmd in (
                ("list-users",),
                ("list-vhosts", "--json"),
                ("list-permissions", "-p", "jobs"),
            )
        ]
        assert online == offline


def test_stopped_data_dir_password_change_and_vhost_delete(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "guest", "guest")
        ch = conn.channel()
        ch.queue_declare("durable-q", durable=True)
        conn.close()
        assert proc.terminate() == 0
    _ok(_ctl(capsys, data_dir, "change-password", "guest", "--password", "new"))
    _ok(_ctl(capsys, data_dir, "add-vhost", "temp"))
    _ok(_ctl(capsys, data_dir, "delete-vhost", "temp"))
    with RoostProcess(data_dir) as proc:
        with pytest.raises(ProbableAuthenticationError):
            _connect(proc, "guest", "guest")
        conn = _connect(proc, "guest", "new")
        # The edit kept the queue that was there.
        assert conn.channel().queue_declare("durable-q", passive=True).method.queue == "durable-q"
        conn.close()
        with pytest.raises(ProbableAccessDeniedError):
            _connect(proc, "guest", "new", "temp")


def test_killed_broker_leaves_a_stale_socket_that_ctl_and_serve_get_past(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker.kill()
    assert (data_dir / "roost.ctl").exists()  # SIGKILL: no clean-up
    _ok(_ctl(capsys, data_dir, "add-user", "erin", "--password", "pw"))
    _ok(_ctl(capsys, data_dir, "set-permissions", "erin", ".*", ".*", ".*"))
    broker.start()
    _connect(broker, "erin", "pw").close()
    # The restarted broker answers on the socket again.
    _ok(_ctl(capsys, data_dir, "delete-user", "erin"))
    with pytest.raises(ProbableAuthenticationError):
        _connect(broker, "erin", "pw")


# -- errors -----------------------------------------------------------------


ERRORS = [
    (("delete-user", "nobody"), "roost: user 'nobody' does not exist\n"),
    (("set-tags", "nobody", "x"), "roost: user 'nobody' does not exist\n"),
    (("change-password", "nobody", "--password", "x"), "roost: user 'nobody' does not exist\n"),
    (("add-user", "guest", "--password", "x"), "roost: user 'guest' already exists\n"),
    (("add-vhost", "/"), "roost: vhost '/' already exists\n"),
    (("delete-vhost", "nope"), "roost: vhost 'nope' does not exist\n"),
    (
        ("set-permissions", "guest", ".*", "(", ".*"),
        "roost: invalid write pattern '(': missing ): (\n",
    ),
    # Patterns run on RE2: what it cannot match in linear time is refused.
    (
        ("set-permissions", "guest", ".*", ".*", "(a)\\1"),
        "roost: invalid read pattern '(a)\\\\1': invalid escape sequence: \\1\n",
    ),
    (
        ("set-permissions", "guest", "(?=q)q", ".*", ".*"),
        "roost: invalid configure pattern '(?=q)q': invalid perl operator: (?=\n",
    ),
    (
        ("set-permissions", "-p", "nope", "guest", ".*", ".*", ".*"),
        "roost: vhost 'nope' does not exist\n",
    ),
    (("set-permissions", "nobody", ".*", ".*", ".*"), "roost: user 'nobody' does not exist\n"),
    (("clear-permissions", "nobody"), "roost: user 'nobody' does not exist\n"),
    (("list-permissions", "-p", "nope"), "roost: vhost 'nope' does not exist\n"),
]


def test_errors_on_a_running_broker_are_plain_messages(
    broker: RoostProcess, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (data_dir / "definitions.json").read_bytes()
    for args, message in ERRORS:
        assert _ctl(capsys, data_dir, *args) == (1, "", message), args
    assert (data_dir / "definitions.json").read_bytes() == before
    # As its own process too: no traceback, exit code 1.
    rc, out, err = _ctl_process(data_dir, "delete-user", "nobody")
    assert (rc, out, err) == (1, "", "roost: user 'nobody' does not exist\n")


def test_errors_on_a_stopped_data_dir_are_the_same(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(_ctl(capsys, data_dir, "add-vhost", "v"))  # creates the directory
    before = (data_dir / "definitions.json").read_bytes()
    for args, message in ERRORS:
        assert _ctl(capsys, data_dir, *args) == (1, "", message), args
    assert (data_dir / "definitions.json").read_bytes() == before


def test_password_is_required(data_dir: Path) -> None:
    rc, out, err = _ctl_process(data_dir, "add-user", "frank")
    assert (rc, out) == (1, "")
    assert err == "roost: give the password with --password or --password-stdin\n"
    rc, out, err = _ctl_process(data_dir, "add-user", "frank", "--password-stdin")
    assert (rc, err) == (1, "roost: no password on standard input\n")
    assert not data_dir.exists()  # nothing was written


def test_stopped_data_dir_edit_keeps_delayed_messages(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A delayed exchange's held persistent messages are logged under an id
    # of its own, kept in definitions.json: an offline edit must keep it.
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "guest", "guest")
        ch = conn.channel()
        ch.confirm_delivery()
        args = {"x-delayed-type": "direct"}
        ch.exchange_declare("later", "x-delayed-message", durable=True, arguments=args)
        ch.queue_declare("due", durable=True)
        ch.queue_bind("due", "later", "k")
        props = pika.BasicProperties(delivery_mode=2, headers={"x-delay": 400})
        ch.basic_publish("later", "k", b"held", props)
        conn.close()
        assert proc.terminate() == 0  # well before it is due
    _ok(_ctl(capsys, data_dir, "add-user", "x", "--password", "pw"))
    saved = json.loads((data_dir / "definitions.json").read_text())
    assert [e[1] for e in saved["roost"]["exchange_ids"]] == ["later"]
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "guest", "guest")
        ch = conn.channel()
        body = None
        deadline = time.monotonic() + 5
        while body is None and time.monotonic() < deadline:
            _, _, body = ch.basic_get("due", auto_ack=True)
            if body is None:
                conn.sleep(0.05)
        assert body == b"held"
        conn.close()


def test_a_stopped_cluster_nodes_data_directory_is_not_edited(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOST_CLUSTER", "postgresql://db.invalid/roost")
    rc, _, err = _ctl(capsys, tmp_path, "add-user", "alice", "--password", "pw")
    assert rc == 1 and "definitions are in the cluster's database" in err
    assert not (tmp_path / "definitions.json").exists()
