"""Accounts: blank passwords are refused wherever a password is set (the
management API, ``roost ctl``, definitions imports) and never log in, and
the default user exists only on a brand-new data directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest
from pika.exceptions import ProbableAuthenticationError

from roost.testing import RoostBroker, RoostProcess
from tests.http.test_management_api import call

BLANKS = ["", "   "]


def _roost(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _users(broker: RoostBroker) -> set[str]:
    srv = broker.server
    assert srv is not None
    return broker.call(lambda: set(srv.broker.users.users))


def _can_log_in(host: str, port: int, user: str, password: str) -> bool:
    params = pika.ConnectionParameters(
        host=host,
        port=port,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=5,
    )
    try:
        pika.BlockingConnection(params).close()
    except ProbableAuthenticationError:
        return False
    return True


# -- blank passwords --------------------------------------------------------------


@pytest.mark.parametrize("blank", BLANKS)
def test_api_refuses_a_blank_password(roost_broker: RoostBroker, blank: str) -> None:
    status, body = call(roost_broker, "/api/users/bob", "PUT", {"password": blank, "tags": ""})
    assert status == 400
    assert body["error"] == "bad_request" and "blank" in body["reason"]
    assert "bob" not in _users(roost_broker)
    # An existing user's password cannot be blanked either.
    status, _ = call(roost_broker, "/api/users/guest", "PUT", {"password": blank, "tags": ""})
    assert status == 400
    assert _can_log_in("127.0.0.1", roost_broker.port, "guest", "guest")


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_ctl_refuses_a_blank_password(tmp_path: Path, running: bool) -> None:
    data = str(tmp_path / "data")
    proc = RoostProcess(data, "--http-port", "-1")
    if running:
        proc.start()
    try:
        for args, stdin in (
            (["add-user", "bob", "--password", ""], ""),
            (["add-user", "bob", "--password-stdin"], "\n"),
            (["change-password", "guest", "--password", "  "], ""),
        ):
            done = _roost("ctl", *args, "--data-dir", data, stdin=stdin)
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            assert "password must not be blank" in done.stderr
            assert "Traceback" not in done.stderr
        users = _roost("ctl", "list-users", "--data-dir", data)
        assert "bob" not in users.stdout
        if running:
            assert _can_log_in(proc.host, proc.port, "guest", "guest")
    finally:
        proc.close()


def test_definitions_import_refuses_a_blank_password(tmp_path: Path) -> None:
    source = tmp_path / "defs.json"
    source.write_text(json.dumps({"users": [{"name": "bob", "password": "", "tags": ""}]}))
    data = str(tmp_path / "data")
    done = _roost("definitions", "import", str(source), "--data-dir", data)
    assert done.returncode != 0
    assert "users[0]: password must not be blank" in done.stderr
    assert "bob" not in _roost("ctl", "list-users", "--data-dir", data).stdout


def test_api_definitions_import_refuses_a_blank_password(roost_broker: RoostBroker) -> None:
    body = {"users": [{"name": "bob", "password": "", "tags": ""}]}
    status, reply = call(roost_broker, "/api/definitions", "POST", body)
    assert status == 400 and "password must not be blank" in reply["reason"]
    assert "bob" not in _users(roost_broker)


def test_a_user_without_a_password_cannot_log_in_with_a_blank_one(
    roost_broker: RoostBroker,
) -> None:
    """As RabbitMQ: a user imported without password or hash exists (for
    EXTERNAL), but no password logs it in, the blank one least of all."""
    body = {
        "users": [{"name": "nopw", "tags": ""}, {"name": "blankhash", "password_hash": ""}],
        "permissions": [
            {"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
            for u in ("nopw", "blankhash")
        ],
    }
    assert call(roost_broker, "/api/definitions", "POST", body) == (204, None)
    assert {"nopw", "blankhash"} <= _users(roost_broker)
    for user in ("nopw", "blankhash"):
        assert not _can_log_in("127.0.0.1", roost_broker.port, user, "")
    status, _ = call(roost_broker, "/api/whoami", auth="nopw:")
    assert status == 401


# -- the default user ---------------------------------------------------------------


def test_deleting_every_user_never_brings_guest_back(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RoostProcess(data, "--http-port", "-1"):
        deleted = _roost("ctl", "delete-user", "guest", "--data-dir", str(data))
        assert deleted.returncode == 0, deleted.stderr
    with RoostProcess(data, "--http-port", "-1") as proc:
        assert not _can_log_in(proc.host, proc.port, "guest", "guest")
        deadline = time.monotonic() + 10
        while "there are no users" not in "".join(proc.output) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "there are no users, so nobody can log in" in "".join(proc.output)
        users = _roost("ctl", "list-users", "--data-dir", str(data), "--json")
        assert json.loads(users.stdout) == []
        # The way back in: a user made with roost ctl, as the broker's owner.
        added = _roost("ctl", "add-user", "admin", "--password", "s3cret", "--data-dir", str(data))
        assert added.returncode == 0, added.stderr
    saved = json.loads((data / "definitions.json").read_text())
    assert [u["name"] for u in saved["users"]] == ["admin"]


def test_a_brand_new_data_dir_gets_the_default_user(tmp_path: Path) -> None:
    with RoostProcess(tmp_path / "data", "--http-port", "-1") as proc:
        assert _can_log_in(proc.host, proc.port, "guest", "guest")
