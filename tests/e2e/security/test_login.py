"""Logins: the default guest user, loopback-only users, failed-login
logging and per-address throttling."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from pamqp import commands as C

from roost.broker.access import LoginThrottle, is_loopback, loopback_allowed
from roost.broker.broker import Broker
from roost.config import ConfigError, load_config
from roost.testing import RoostBroker, RoostProcess
from tests.e2e.security.helpers import FULL, Login, add_user, broker_of, login, non_loopback_address

REFUSED_PLAIN = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
    "For details see the broker logfile."
)

# -- loopback users -------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("", True),  # not an IP peer at all (a Unix socket)
        ("192.0.2.2", False),
        ("10.1.2.3", False),
        ("fd00::2", False),
        ("::ffff:192.0.2.2", False),
        ("fe80::1%eth0", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_rule_applies_to_listed_users_only() -> None:
    users = frozenset({"guest"})
    assert loopback_allowed("guest", "127.0.0.1", users)
    assert not loopback_allowed("guest", "192.0.2.2", users)
    assert loopback_allowed("alice", "192.0.2.2", users)
    assert loopback_allowed("guest", "192.0.2.2", frozenset())


def test_loopback_users_config() -> None:
    assert load_config(env={}).loopback_users == "guest"
    assert load_config(env={"ROOST_LOOPBACK_USERS": ""}).loopback_users == ""


def test_loopback_users_from_a_toml_list(tmp_path: Path) -> None:
    path = tmp_path / "roost.toml"
    path.write_text("loopback_users = []\nmax_connections = 3\n")
    cfg = load_config(str(path), env={})
    assert (cfg.loopback_users, cfg.max_connections) == ("", 3)
    path.write_text('loopback_users = ["guest", "ops"]\n')
    assert load_config(str(path), env={}).loopback_users == "guest,ops"


@pytest.fixture
def external_address() -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return addr


def test_guest_cannot_log_in_from_a_non_loopback_address(external_address: str) -> None:
    with RoostBroker(host=external_address) as rb:
        add_user(rb, "alice", FULL)
        close = login(rb, "guest", "guest", host=external_address)
        assert isinstance(close, C.Connection.Close)
        assert (close.reply_code, close.reply_text) == (403, REFUSED_PLAIN)
        # Other users may.
        assert isinstance(login(rb, "alice", "pw", host=external_address), C.Connection.OpenOk)
        assert "guest" not in rb.call(lambda: [c.username for c in broker_of(rb).connections])


def test_guest_may_log_in_remotely_when_loopback_users_is_empty(external_address: str) -> None:
    with RoostBroker(host=external_address, loopback_users="") as rb:
        assert isinstance(login(rb, "guest", "guest", host=external_address), C.Connection.OpenOk)


def test_guest_logs_in_over_loopback(roost_broker: RoostBroker) -> None:
    assert isinstance(login(roost_broker, "guest", "guest"), C.Connection.OpenOk)


def test_serve_warns_when_guest_is_the_only_user_off_loopback(
    tmp_path: Path, external_address: str
) -> None:
    proc = RoostProcess(tmp_path / "data", "--host", external_address)
    try:
        proc.start()
        out = "".join(proc.output)
        assert "warning: listening on " + external_address in out
        assert "the only user is 'guest'" in out
        assert "guest may only connect from localhost" in out
    finally:
        proc.close()


def test_serve_does_not_warn_on_loopback(roost_process: RoostProcess) -> None:
    assert "warning" not in "".join(roost_process.output)


# -- the default user -------------------------------------------------------


def test_default_user_exists_on_first_start(roost_broker: RoostBroker) -> None:
    broker = broker_of(roost_broker)
    assert list(broker.users.users) == ["guest"]
    assert broker.permissions == {("guest", "/"): FULL}


def test_default_user_is_not_recreated_once_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RoostBroker(data_dir=str(data)) as rb:
        broker = broker_of(rb)
        add_user(rb, "alice", FULL)

        def drop_guest() -> None:
            del broker.users.users["guest"]
            del broker.permissions[("guest", "/")]
            broker.definitions_changed()

        rb.call(drop_guest)
    with RoostBroker(data_dir=str(data)) as rb:
        assert list(broker_of(rb).users.users) == ["alice"]
        close = login(rb, "guest", "guest")
        assert isinstance(close, C.Connection.Close) and close.reply_code == 403
        assert isinstance(login(rb, "alice", "pw"), C.Connection.OpenOk)


def test_default_user_is_not_created_when_definitions_have_no_users(tmp_path: Path) -> None:
    """Only a brand-new data directory gets the default user: definitions
    without users (every user deleted) stay without."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "definitions.json").write_text(
        json.dumps({"users": [], "vhosts": [{"name": "/"}], "permissions": []})
    )
    with RoostBroker(data_dir=str(data), default_user="admin", default_password="s3cret") as rb:
        assert list(broker_of(rb).users.users) == []
        close = login(rb, "admin", "s3cret")
        assert isinstance(close, C.Connection.Close) and close.reply_code == 403


def test_broker_without_store_has_default_user() -> None:
    broker = Broker(default_user="root", default_password="pw")
    assert broker.users.authenticate("root", "pw") is not None
    assert broker.permissions == {("root", "/"): FULL}


# -- failed logins ----------------------------------------------------------


def test_failed_login_is_logged_without_the_password(
    roost_broker: RoostBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="roost")
    close = login(roost_broker, "mallory", "hunter2-secret")
    assert isinstance(close, C.Connection.Close) and close.reply_code == 403
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PLAIN login refused for user 'mallory'" in text
    assert "127.0.0.1:" in text
    assert "hunter2-secret" not in text


def test_login_throttle_blocks_after_repeated_failures() -> None:
    now = [100.0]
    throttle = LoginThrottle(max_failures=5, window=10.0, backoff=30.0, clock=lambda: now[0])
    for _ in range(4):
        assert throttle.failed("10.0.0.1") is None
        now[0] += 1
    assert not throttle.blocked("10.0.0.1")
    assert throttle.failed("10.0.0.1") == "address '10.0.0.1'"
    assert throttle.blocked("10.0.0.1")
    assert not throttle.blocked("10.0.0.2")
    now[0] += 29.9
    assert throttle.blocked("10.0.0.1")
    now[0] += 0.2
    assert not throttle.blocked("10.0.0.1")


def test_login_throttle_forgets_failures_outside_the_window() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=3, window=10.0, backoff=5.0, clock=lambda: now[0])
    for _ in range(10):
        assert throttle.failed("h") is None
        now[0] += 6.0  # never three within ten seconds
    assert not throttle.blocked("h")


def test_repeated_failures_refuse_even_correct_credentials(roost_broker: RoostBroker) -> None:
    broker = broker_of(roost_broker)
    # The default back-off (10 s) shortened so that its end can be seen.
    roost_broker.call(lambda: setattr(broker, "login_throttle", LoginThrottle(backoff=0.3)))
    for _ in range(5):
        close = login(roost_broker, "guest", "wrong")
        assert isinstance(close, C.Connection.Close) and close.reply_text == REFUSED_PLAIN
    # Backed off: the right password is refused too, with the same answer.
    close = login(roost_broker, "guest", "guest")
    assert isinstance(close, C.Connection.Close)
    assert (close.reply_code, close.reply_text) == (403, REFUSED_PLAIN)
    # Only that address: another source address logs in.
    assert isinstance(
        login(roost_broker, "guest", "guest", source="127.0.0.2"), C.Connection.OpenOk
    )
    # Refused attempts during the back-off do not extend it: a client that
    # keeps retrying gets in once it is over.
    deadline = time.monotonic() + 5
    while not isinstance(login(roost_broker, "guest", "guest"), C.Connection.OpenOk):
        assert time.monotonic() < deadline, "still refused after the back-off"
        time.sleep(0.02)


def test_throttled_client_without_capability_is_just_disconnected(
    roost_broker: RoostBroker,
) -> None:
    for _ in range(5):
        assert isinstance(login(roost_broker, "guest", "wrong"), C.Connection.Close)
    client = Login("127.0.0.1", roost_broker.port)
    try:
        with pytest.raises(ConnectionError):
            client.start_ok("guest", "guest", capabilities=False)
    finally:
        client.close()


def test_limits_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="max_queues_per_vhost: must not be negative"):
        load_config(env={"ROOST_MAX_QUEUES_PER_VHOST": "-1"})
