"""Management API logins are decided as AMQP logins are: loopback-only
users, the shared login throttle (per address and per user), refusals
logged without the password. Real broker, real sockets."""

from __future__ import annotations

import base64
import http.client
import json
import logging
from typing import Any

import pytest
from pamqp import commands as C

from roost.broker.access import LoginThrottle
from roost.testing import RoostBroker
from tests.e2e.security.helpers import FULL, broker_of, login, non_loopback_address


def http_login(
    rb: RoostBroker, user: str, password: str, host: str = "127.0.0.1", source: str | None = None
) -> tuple[int, Any]:
    """GET /api/whoami with basic auth from ``source``; status and JSON."""
    conn = http.client.HTTPConnection(
        host, rb.http_port, timeout=5, source_address=(source, 0) if source else None
    )
    try:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request("GET", "/api/whoami", headers={"Authorization": "Basic " + auth})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def add_management_user(rb: RoostBroker, name: str, password: str = "pw") -> None:
    broker = broker_of(rb)

    def add() -> None:
        broker.users.add(name, password, ("management",))
        broker.permissions[(name, "/")] = FULL

    rb.call(add)


@pytest.fixture
def external_address() -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return addr


def test_loopback_users_cannot_use_the_api_from_elsewhere(external_address: str) -> None:
    with RoostBroker(host=external_address) as rb:
        add_management_user(rb, "alice")
        status, reply = http_login(rb, "guest", "guest", host=external_address)
        assert status == 401
        assert reply == {"error": "not_authorised", "reason": "User can only log in via localhost"}
        assert http_login(rb, "alice", "pw", host=external_address)[0] == 200


def test_loopback_users_empty_lets_guest_use_the_api_from_elsewhere(
    external_address: str,
) -> None:
    with RoostBroker(host=external_address, loopback_users="") as rb:
        assert http_login(rb, "guest", "guest", host=external_address)[0] == 200


def test_failed_http_login_is_logged_without_the_password(
    roost_broker: RoostBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="roost")
    assert http_login(roost_broker, "mallory", "hunter2-secret")[0] == 401
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP login refused for user 'mallory'" in text
    assert "127.0.0.1" in text
    assert "hunter2-secret" not in text


def test_http_logins_are_throttled_per_address(roost_broker: RoostBroker) -> None:
    for _ in range(5):
        assert http_login(roost_broker, "guest", "wrong")[0] == 401
    # Backed off: the right password is refused too, with the same answer.
    assert http_login(roost_broker, "guest", "guest") == (
        401,
        {"error": "not_authorized", "reason": "Login failed"},
    )
    assert http_login(roost_broker, "guest", "guest", source="127.0.0.2")[0] == 200


def test_one_throttle_for_amqp_and_http(roost_broker: RoostBroker) -> None:
    for _ in range(5):
        assert isinstance(login(roost_broker, "guest", "wrong"), C.Connection.Close)
    assert http_login(roost_broker, "guest", "guest")[0] == 401
    assert http_login(roost_broker, "guest", "guest", source="127.0.0.2")[0] == 200


def test_guesses_for_one_user_from_many_addresses_are_throttled(
    roost_broker: RoostBroker,
) -> None:
    add_management_user(roost_broker, "alice")
    # alice's own client logged in from 127.0.0.3 before the attack.
    assert http_login(roost_broker, "alice", "pw", source="127.0.0.3")[0] == 200
    # Ten guesses, each from its own address (over AMQP and HTTP): no
    # address reaches its own limit.
    for i in range(10):
        source = f"127.0.1.{i + 1}"
        if i % 2:
            assert http_login(roost_broker, "alice", "guess", source=source)[0] == 401
        else:
            close = login(roost_broker, "alice", "guess", source=source)
            assert isinstance(close, C.Connection.Close)
    # alice is now refused from new addresses, even with her password ...
    assert http_login(roost_broker, "alice", "pw", source="127.0.2.1")[0] == 401
    close = login(roost_broker, "alice", "pw", source="127.0.2.2")
    assert isinstance(close, C.Connection.Close) and close.reply_code == 403
    # ... but not from where she logged in before, and other users are not
    # affected.
    assert http_login(roost_broker, "alice", "pw", source="127.0.0.3")[0] == 200
    assert http_login(roost_broker, "guest", "guest", source="127.0.2.3")[0] == 200


def test_per_user_block_is_bounded() -> None:
    now = [0.0]
    throttle = LoginThrottle(
        max_failures=5, max_user_failures=3, window=10.0, backoff=5.0, clock=lambda: now[0]
    )
    assert throttle.failed("10.0.0.1", "bob") is None
    assert throttle.failed("10.0.0.2", "bob") is None
    assert throttle.failed("10.0.0.3", "bob") == "user 'bob'"
    assert throttle.blocked("10.0.0.4", "bob")
    assert not throttle.blocked("10.0.0.4")  # the address itself is not
    assert not throttle.blocked("10.0.0.4", "carol")
    now[0] += 5.1
    assert not throttle.blocked("10.0.0.4", "bob")


def test_throttle_memory_is_bounded_under_made_up_names() -> None:
    throttle = LoginThrottle(max_user_failures=100)
    throttle.MAX_TRACKED = 50
    for i in range(1000):
        throttle.failed(f"10.0.{i // 250}.{i % 250}", f"user{i}")
    assert len(throttle._failures) <= 50
