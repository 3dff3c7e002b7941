"""Several ``roost serve --cluster`` processes sharing one PostgreSQL,
driven with pika and the management API: shared definitions, the node
list, a killed node, a paused (fenced) node."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pika
import psycopg
import pytest
from pika.exceptions import (
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAuthenticationError,
)

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess

TIMEOUT = 3  # --node-timeout of every node here


@pytest.fixture
def node(pg_url: str) -> Iterator[Callable[[str], RoostProcess]]:
    started: list[RoostProcess] = []

    def start(name: str) -> RoostProcess:
        proc = RoostProcess(
            None, "--cluster", pg_url, "--node-name", name, "--node-timeout", str(TIMEOUT)
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
        proc.close()


def _api(
    proc: RoostProcess, method: str, path: str, body: Any = None, user: str = "guest:guest"
) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{proc.http_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(user.encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _connect(proc: RoostProcess, user: str = "guest", password: str = "guest") -> Any:
    params = pika.ConnectionParameters(
        proc.host, proc.port, credentials=pika.PlainCredentials(user, password)
    )
    return pika.BlockingConnection(params)


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_definitions_made_on_one_node_are_there_on_another_at_once(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca, _connect(b) as cb:
        cha, chb = ca.channel(), cb.channel()
        cha.exchange_declare("orders", "topic", durable=True)
        cha.queue_declare("shipping", durable=True, arguments={"x-max-length": 10})
        cha.queue_bind("shipping", "orders", "order.*")
        cha.queue_declare("scratch")  # transient ones are shared too
        # No waiting: declare-ok on a means b has them.
        chb.exchange_declare("orders", passive=True)
        assert chb.queue_declare("shipping", passive=True).method.message_count == 0
        chb.queue_declare("scratch", passive=True)
        # The arguments kept their type: an equal redeclaration is accepted.
        chb.queue_declare("shipping", durable=True, arguments={"x-max-length": 10})
        # b routes through the binding made on a.
        chb.basic_publish("orders", "order.new", b"parcel")
        _wait_for(
            lambda: chb.queue_declare("shipping", passive=True).method.message_count == 1,
            5,
            "routing",
        )
        bindings = _api(b, "GET", "/api/queues/%2F/shipping/bindings")
        assert {x["source"] for x in bindings} == {"", "orders"}

        # A consumer on b is cancelled when a deletes its queue.
        cancelled: list[Any] = []
        chb.add_on_cancel_callback(cancelled.append)
        chb.basic_consume("scratch", lambda *args: None)
        cha.queue_delete("scratch")
        _wait_for(lambda: (cb.process_data_events(0.05), bool(cancelled))[1], 5, "basic.cancel")
        cha.exchange_delete("orders")
        with pytest.raises(ChannelClosedByBroker) as info:
            chb.exchange_declare("orders", passive=True)
        assert info.value.reply_code == 404


def test_a_user_added_on_one_node_logs_in_on_another(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    _api(a, "PUT", "/api/users/alice", {"password": "s3cret", "tags": ""})
    _api(a, "PUT", "/api/permissions/%2F/alice", {"configure": ".*", "write": ".*", "read": ".*"})
    with _connect(b, "alice", "s3cret") as conn:
        conn.channel().queue_declare("alices")
    _api(b, "PUT", "/api/vhosts/shared")
    assert "shared" in {v["name"] for v in _api(a, "GET", "/api/vhosts")}
    _api(b, "DELETE", "/api/users/alice")
    with pytest.raises(ProbableAuthenticationError):
        _connect(a, "alice", "s3cret")


def test_the_default_user_is_made_only_in_a_new_database(
    node: Callable[[str], RoostProcess],
) -> None:
    a = node("a")
    _api(a, "PUT", "/api/users/admin", {"password": "pw", "tags": "administrator"})
    _api(a, "PUT", "/api/permissions/%2F/admin", {"configure": ".*", "write": ".*", "read": ".*"})
    _api(a, "DELETE", "/api/users/guest", user="admin:pw")
    b = node("b")  # joins a database that has users: no guest comes back
    with pytest.raises(ProbableAuthenticationError):
        _connect(b)
    with _connect(b, "admin", "pw"):
        pass


def test_the_node_list_shows_every_live_node(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    listed = _api(a, "GET", "/api/nodes")
    assert [n["name"] for n in listed] == ["a", "b"]
    assert all(n["running"] and n["uptime"] >= 0 for n in listed)
    assert listed[1]["amqp_address"] == f"127.0.0.1:{b.port}"
    assert _api(a, "GET", "/api/nodes/b")["name"] == "b"
    assert _api(b, "GET", "/api/overview")["node"] == "b"
    b.terminate()  # a clean stop leaves at once
    assert [n["name"] for n in _api(a, "GET", "/api/nodes")] == ["a"]


def test_a_killed_node_is_declared_dead_and_its_exclusive_queues_go(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    cb = _connect(b)
    cb.channel().queue_declare("b-only", exclusive=True)
    with _connect(a) as ca:
        with pytest.raises(ChannelClosedByBroker) as info:
            ca.channel().queue_declare("b-only", passive=True)
        assert info.value.reply_code == 405  # it exists, and is b's
        b.kill()
        _wait_for(
            lambda: [n["name"] for n in _api(a, "GET", "/api/nodes")] == ["a"],
            TIMEOUT * 3,
            "b declared dead",
        )

        # Declared dead and cleaned up are two transactions: the queue goes
        # with the cleanup, a moment after /api/nodes stops listing b.
        def gone() -> bool:
            with pytest.raises(ChannelClosedByBroker) as info:
                ca.channel().queue_declare("b-only", passive=True)
            assert info.value.reply_code in (404, 405)
            return bool(info.value.reply_code == 404)

        _wait_for(gone, TIMEOUT * 3, "b's exclusive queue deleted")


def test_a_paused_node_is_fenced_and_comes_back_as_a_new_incarnation(
    node: Callable[[str], RoostProcess], pg_url: str
) -> None:
    node("a")  # declares b dead
    b = node("b")

    def incarnations() -> list[tuple[int, bool]]:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT epoch, dead FROM roost_nodes WHERE name = 'b' ORDER BY epoch"
            ).fetchall()
        return [(int(r[0]), bool(r[1])) for r in rows]

    [(first, _)] = incarnations()
    client = _connect(b)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        _wait_for(lambda: incarnations()[0][1], TIMEOUT * 3, "b declared dead")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    with pytest.raises(ConnectionClosedByBroker) as info:
        for _ in range(100):
            client.process_data_events(0.1)
    assert info.value.reply_code == 320
    _wait_for(lambda: len(incarnations()) == 2, TIMEOUT * 3, "b registered again")
    assert incarnations() == [(first, True), (incarnations()[1][0], False)]
    with _connect(b) as again:  # and serves again
        again.channel().queue_declare("after", passive=False)


def test_nodes_ride_out_a_database_restart() -> None:
    # A server of its own: restarting the shared one would disturb others.
    with ThrowawayPostgres() as pg:
        procs = [
            RoostProcess(
                None, "--cluster", pg.url, "--node-name", n, "--node-timeout", str(TIMEOUT)
            )
            for n in ("a", "b")
        ]
        try:
            a, b = (p.start() for p in procs)
            pg.stop_immediate()
            time.sleep(0.5)
            pg.start()
            with _connect(a) as ca, _connect(b) as cb:
                # declare-ok waits for the write to get through.
                ca.channel().queue_declare("after-restart", durable=True)
                cb.channel().queue_declare("after-restart", passive=True)
            assert [n["name"] for n in _api(a, "GET", "/api/nodes")] == ["a", "b"]
        finally:
            for p in procs:
                p.close()


def test_an_exclusive_queue_goes_everywhere_with_its_connection(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(b) as cb:
        declared = cb.channel().queue_declare("", exclusive=True).method.queue
        assert _api(a, "GET", f"/api/queues/%2F/{declared}")["exclusive"] is True

    def gone() -> bool:
        try:
            _api(a, "GET", f"/api/queues/%2F/{declared}")
        except urllib.error.HTTPError as exc:
            return exc.code == 404
        return False

    _wait_for(gone, 5, "the exclusive queue deleted on a")


def test_roost_ctl_on_one_node_changes_the_cluster(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    for args in (
        ("add-user", "bob", "--password", "pw"),
        ("set-permissions", "bob", ".*", ".*", ".*"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "roost", "ctl", *args, "--data-dir", str(a.data_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
    with _connect(b, "bob", "pw"):
        pass


def test_deleting_a_vhost_on_one_node_closes_its_connections_on_another(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    _api(b, "PUT", "/api/vhosts/shared")
    _api(
        b, "PUT", "/api/permissions/shared/guest", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    params = pika.ConnectionParameters(a.host, a.port, "shared")
    conn = pika.BlockingConnection(params)
    conn.channel().queue_declare("in-shared")
    _api(b, "DELETE", "/api/vhosts/shared")
    with pytest.raises(ConnectionClosedByBroker) as info:
        for _ in range(50):
            conn.process_data_events(0.1)
    assert info.value.reply_code == 320
    assert "shared" not in {v["name"] for v in _api(a, "GET", "/api/vhosts")}
