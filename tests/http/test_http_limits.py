"""The management API's listener is bounded (roost.http.limits): slow
headers and slow bodies are cut off with 408, connections beyond
http_max_connections get 503, bodies beyond http_max_body_size get 413 —
each against a real broker over real sockets."""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from roost.testing import RoostBroker

AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


@pytest.fixture
def limited() -> Iterator[RoostBroker]:
    with RoostBroker(
        http_header_timeout=1,
        http_body_timeout=1,
        http_max_connections=4,
        http_max_body_size=4096,
    ) as broker:
        yield broker


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start = time.monotonic()
    sock.settimeout(limit)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {limit}s; got {got!r}")
        if not chunk:
            return got, time.monotonic() - start
        got += chunk


def trickle(sock: socket.socket, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time until the server answers."""
    for byte in data:
        if select.select([sock], [], [], every)[0]:
            return
        sock.sendall(bytes([byte]))


def test_slow_headers_are_cut_off_with_408(limited: RoostBroker) -> None:
    with socket.create_connection(("127.0.0.1", limited.http_port)) as sock:
        sock.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        # A header a byte every 0.1 s: it would take 30 s to finish.
        trickle(sock, b"X-Slow: " + b"a" * 300, 0.1)
        got, _ = read_until_closed(sock, 10)
        assert time.monotonic() - start < 10
    assert got.startswith(b"HTTP/1.1 408")
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"


def test_silent_connection_is_closed(limited: RoostBroker) -> None:
    with socket.create_connection(("127.0.0.1", limited.http_port)) as sock:
        got, took = read_until_closed(sock, 10)
    assert took < 10
    assert got == b"" or got.startswith(b"HTTP/1.1 408")


def test_slow_body_is_cut_off_with_408(limited: RoostBroker) -> None:
    body = json.dumps({"durable": False, "arguments": {"x-pad": "p" * 500}}).encode()
    with socket.create_connection(("127.0.0.1", limited.http_port)) as sock:
        sock.sendall(
            b"PUT /api/queues/%2F/slow HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: " + AUTH.encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        start = time.monotonic()
        trickle(sock, body, 0.1)  # 50+ s at this pace
        got, _ = read_until_closed(sock, 10)
        assert time.monotonic() - start < 10
    assert got.startswith(b"HTTP/1.1 408")
    server = limited.server
    assert server is not None
    assert "slow" not in limited.call(lambda: server.broker.vhosts["/"].queues)


def test_keep_alive_requests_are_not_cut_off(limited: RoostBroker) -> None:
    # Several quick requests on one connection, spread over more than the
    # header timeout: each request gets its own deadline.
    conn = http.client.HTTPConnection("127.0.0.1", limited.http_port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/api/whoami", headers={"Authorization": AUTH})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            time.sleep(0.5)
    finally:
        conn.close()


def test_connections_beyond_the_cap_get_503(limited: RoostBroker) -> None:
    held = [socket.create_connection(("127.0.0.1", limited.http_port)) for _ in range(4)]
    try:
        time.sleep(0.2)  # all four accepted
        with socket.create_connection(("127.0.0.1", limited.http_port)) as extra:
            extra.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\n\r\n")
            got, _ = read_until_closed(extra, 5)
        assert got.startswith(b"HTTP/1.1 503")
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["reason"] == "Too many HTTP connections"
    finally:
        for sock in held:
            sock.close()
    # Slots free again once the held connections are gone.
    deadline = time.monotonic() + 5
    while True:
        req = urllib.request.Request(
            limited.http_url + "/api/whoami", headers={"Authorization": AUTH}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
                break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and time.monotonic() < deadline
            time.sleep(0.05)


def test_body_over_the_limit_gets_413(limited: RoostBroker) -> None:
    body = json.dumps({"arguments": {"x-pad": "p" * 8000}}).encode()
    req = urllib.request.Request(
        limited.http_url + "/api/queues/%2F/big",
        data=body,
        method="PUT",
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 413
    assert json.loads(info.value.read())["error"] == "request_entity_too_large"


def test_huge_header_is_refused_not_buffered(limited: RoostBroker) -> None:
    with socket.create_connection(("127.0.0.1", limited.http_port)) as sock:
        sock.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
        got, _ = read_until_closed(sock, 10)
    assert got.split(b" ", 2)[1] == b"400"


def test_default_body_limit_takes_a_large_definitions_import(roost_broker: RoostBroker) -> None:
    # 2 MB of definitions: over aiohttp's 1 MiB default, under roost's 20 MiB.
    queues = [
        {
            "name": f"def-{i:05d}",
            "vhost": "/",
            "durable": True,
            "auto_delete": False,
            "arguments": {"x-note": "n" * 150},
        }
        for i in range(10_000)
    ]
    body = json.dumps({"queues": queues}).encode()
    assert len(body) > 2 * 1024 * 1024
    req = urllib.request.Request(
        roost_broker.http_url + "/api/definitions",
        data=body,
        method="POST",
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status in (200, 201, 204)
    server = roost_broker.server
    assert server is not None
    assert roost_broker.call(lambda: len(server.broker.vhosts["/"].queues)) == 10_000


def test_limit_options_are_validated() -> None:
    from roost.config import ConfigError, load_config

    cfg = load_config(None, {"ROOST_HTTP_MAX_CONNECTIONS": "12", "ROOST_METRICS_AUTH": "true"})
    assert cfg.http_max_connections == 12 and cfg.metrics_auth
    for bad in (
        {"http_header_timeout": 0},
        {"http_body_timeout": -1},
        {"http_max_connections": -1},
        {"http_max_body_size": -1},
        {"metrics_cache_seconds": -5},
    ):
        with pytest.raises(ConfigError):
            load_config(None, {}, bad)
