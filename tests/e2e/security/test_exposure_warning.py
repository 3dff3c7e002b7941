"""The start-up warning names every listener other machines can reach
while only loopback-only or well-known accounts exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.config import Config
from roost.listener_exposure import exposure_warning
from roost.testing import RoostProcess
from tests.e2e.security.helpers import non_loopback_address

GUEST_ONLY = ["guest"]
LOOPBACK = frozenset({"guest"})


def test_all_loopback_listeners_give_no_warning() -> None:
    cfg = Config(host="127.0.0.1", tls_cert="c.pem", http_host="::1")
    assert exposure_warning(cfg, GUEST_ONLY, LOOPBACK) is None


def test_http_alone_beyond_loopback_is_named() -> None:
    warning = exposure_warning(Config(host="127.0.0.1", http_host="0.0.0.0"), GUEST_ONLY, LOOPBACK)
    assert warning is not None
    assert "listening on 0.0.0.0 (HTTP)" in warning
    assert "AMQP" not in warning


def test_every_exposed_listener_is_named() -> None:
    cfg = Config(host="", tls_cert="c.pem", http_host="192.0.2.2", http_tls_cert="h.pem")
    warning = exposure_warning(cfg, GUEST_ONLY, LOOPBACK)
    assert warning is not None
    assert "all interfaces (AMQP, AMQPS) and 192.0.2.2 (HTTPS)" in warning
    assert "guest may only connect from localhost" in warning


def test_disabled_http_is_not_named() -> None:
    assert (
        exposure_warning(
            Config(host="127.0.0.1", http_port=-1, http_host="0.0.0.0"), GUEST_ONLY, LOOPBACK
        )
        is None
    )


def test_loopback_only_users_beside_others_are_named() -> None:
    warning = exposure_warning(Config(host="0.0.0.0"), ["guest", "alice"], LOOPBACK)
    assert warning is not None
    assert "'guest' may only connect from localhost" in warning
    assert exposure_warning(Config(host="0.0.0.0"), ["alice"], LOOPBACK) is None


def test_guest_without_loopback_rule_is_open_to_anyone() -> None:
    warning = exposure_warning(Config(host="0.0.0.0"), GUEST_ONLY, frozenset())
    assert warning is not None and "anyone on the network" in warning


def test_serve_warns_about_an_http_listener_beyond_loopback(tmp_path: Path) -> None:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    proc = RoostProcess(tmp_path / "data", "--http-host", addr)
    try:
        proc.start()
        out = "".join(proc.output)
        assert f"warning: listening on {addr} (HTTP)" in out
        assert "guest may only connect from localhost" in out
    finally:
        proc.close()


def test_no_users_at_all_is_said_on_any_listener() -> None:
    warning = exposure_warning(Config(host="127.0.0.1"), [], LOOPBACK)
    assert warning is not None and "there are no users" in warning
