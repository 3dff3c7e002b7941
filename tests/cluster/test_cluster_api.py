"""The management API, ``/metrics`` and ``roost ctl`` of a cluster: every
node shows the whole cluster's connections, channels, consumers and queue
figures; another node's connection can be closed; a dead node's
connections disappear; non-durable queues go with their node."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from pika.exceptions import AMQPConnectionError, ConnectionClosedByBroker

from roost.testing import RoostProcess

TIMEOUT = 3  # --node-timeout of every node here
# Nodes publish their view every 2 s; a dead node is found after TIMEOUT.
WAIT = 30.0


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


def _api(proc: RoostProcess, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{proc.http_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _get(proc: RoostProcess, path: str) -> Any:
    return _api(proc, "GET", path)


def _connect(proc: RoostProcess, name: str) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        proc.host,
        proc.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        client_properties={"connection_name": name},
    )
    return pika.BlockingConnection(params)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _named(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [c for c in items if c.get("user_provided_name") == name]


def _queue(proc: RoostProcess, name: str) -> dict[str, Any] | None:
    for q in _get(proc, "/api/queues/%2F"):
        if q["name"] == name:
            return dict(q)
    return None


def test_every_node_lists_the_whole_clusters_connections_channels_consumers(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    on_a, on_b = _connect(a, "client-a"), _connect(b, "client-b")
    try:
        ch = on_b.channel()
        ch.queue_declare("api-shared", durable=True)
        ch.basic_qos(prefetch_count=7)
        ch.basic_consume("api-shared", lambda *_: None, consumer_tag="tag-on-b")
        on_a.channel()

        for asked in (a, b):

            def both_listed(asked: RoostProcess = asked) -> bool:
                return (
                    len(_named(_get(asked, "/api/connections"), "client-b")) == 1
                    and len(_named(_get(asked, "/api/connections"), "client-a")) == 1
                )

            _wait_for(both_listed, f"both connections listed by {asked.port}")
            conns = _get(asked, "/api/connections")
            assert _named(conns, "client-a")[0]["node"] == "a"
            assert _named(conns, "client-b")[0]["node"] == "b"

            channels = _get(asked, "/api/channels")
            by_node = {c["node"] for c in channels}
            assert by_node == {"a", "b"}
            on_b_channel = [c for c in channels if c["node"] == "b"]
            assert on_b_channel[0]["consumer_count"] == 1
            assert on_b_channel[0]["prefetch_count"] == 7

            consumers = _get(asked, "/api/consumers")
            assert [c["consumer_tag"] for c in consumers] == ["tag-on-b"]
            assert consumers[0]["channel_details"]["node"] == "b"
            assert consumers[0]["queue"] == {"name": "api-shared", "vhost": "/"}

            q = _queue(asked, "api-shared")
            assert q is not None and q["consumers"] == 1

            overview = _get(asked, "/api/overview")
            assert overview["object_totals"]["connections"] == 2
            assert overview["object_totals"]["channels"] == 2
            assert overview["object_totals"]["consumers"] == 1
            assert overview["cluster_name"] == "a"  # the first node's name
            assert {entry["node"] for entry in overview["listeners"]} == {"a", "b"}
            nodes = {n["name"]: n for n in _get(asked, "/api/nodes")}
            assert nodes["a"]["sockets_used"] == 1 and nodes["b"]["sockets_used"] == 1

        # Paged, as on a single node: both nodes' connections are counted.
        page = _get(a, "/api/connections?page=1&page_size=1")
        assert page["total_count"] == 2 and page["item_count"] == 1
        filtered = _get(a, "/api/connections?page=1&name=" + urllib.parse.quote("-> "))
        assert filtered["filtered_count"] == 2

        # Another node's connection and channel, one by one.
        name_b = _named(_get(a, "/api/connections"), "client-b")[0]["name"]
        quoted = urllib.parse.quote(name_b, safe="")
        shown = _get(a, f"/api/connections/{quoted}")
        assert shown["node"] == "b" and shown["user"] == "guest"
        chans = _get(a, f"/api/connections/{quoted}/channels")
        assert len(chans) == 1
        channel = _get(a, "/api/channels/" + urllib.parse.quote(chans[0]["name"], safe=""))
        assert [c["consumer_tag"] for c in channel["consumer_details"]] == ["tag-on-b"]

        # In use by a consumer on b: not deleted through a's API with if-unused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _api(a, "DELETE", "/api/queues/%2F/api-shared?if-unused=true")
        assert refused.value.code == 400
        assert _queue(a, "api-shared") is not None
    finally:
        on_a.close()
        on_b.close()


def test_queue_figures_add_up_over_the_nodes(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    publisher, consumer = _connect(a, "publisher"), _connect(b, "consumer")
    try:
        pch = publisher.channel()
        pch.queue_declare("api-counts", durable=True)
        pch.confirm_delivery()
        for i in range(10):
            pch.basic_publish(
                "", "api-counts", f"m{i}".encode(), pika.BasicProperties(delivery_mode=2)
            )
        cch = consumer.channel()
        cch.basic_qos(prefetch_count=3)
        got: list[int] = []
        cch.basic_consume("api-counts", lambda ch, m, p, body: got.append(m.delivery_tag))
        _wait_for(
            lambda: consumer.process_data_events(0.1) or len(got) == 3, "three deliveries on b"
        )

        def figures(proc: RoostProcess) -> tuple[int, int, int, int]:
            q = _queue(proc, "api-counts")
            assert q is not None
            return q["messages"], q["messages_ready"], q["messages_unacknowledged"], q["consumers"]

        for asked in (a, b):

            def seen(asked: RoostProcess = asked) -> bool:
                return figures(asked) == (10, 7, 3, 1)

            _wait_for(seen, f"10 messages, 3 unacked on b, seen from {asked.port}")
            totals = _get(asked, "/api/overview")["queue_totals"]
            assert totals["messages_unacknowledged"] == 3
            assert totals["messages"] == 10
    finally:
        publisher.close()
        consumer.close()


def test_closing_a_connection_of_another_node(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    victim = _connect(b, "victim")
    try:
        _wait_for(lambda: len(_named(_get(a, "/api/connections"), "victim")) == 1, "listed on a")
        name = _named(_get(a, "/api/connections"), "victim")[0]["name"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{a.http_port}/api/connections/{urllib.parse.quote(name, safe='')}",
            method="DELETE",
            headers={
                "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
                "X-Reason": "closed from node a",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 204

        closed: list[BaseException] = []

        def gone() -> bool:
            try:
                victim.process_data_events(0.1)
            except (ConnectionClosedByBroker, AMQPConnectionError) as exc:
                closed.append(exc)
            return bool(closed)

        _wait_for(gone, "the connection on b closed")
        assert isinstance(closed[0], ConnectionClosedByBroker)
        assert closed[0].reply_code == 320
        assert "closed from node a" in closed[0].reply_text
        _wait_for(lambda: not _named(_get(a, "/api/connections"), "victim"), "unlisted on a")
    finally:
        if victim.is_open:
            victim.close()


def test_a_killed_nodes_connections_disappear(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    survivor = _connect(a, "survivor")
    _connect(b, "doomed")  # left open: b dies with it
    try:
        _wait_for(lambda: len(_named(_get(a, "/api/connections"), "doomed")) == 1, "listed on a")
        b.kill()
        _wait_for(lambda: not _named(_get(a, "/api/connections"), "doomed"), "b's connection gone")
        assert [c["node"] for c in _get(a, "/api/connections")] == ["a"]
        assert [c["name"] for c in _get(a, "/api/nodes")] == ["a"]
        assert _get(a, "/api/overview")["object_totals"]["connections"] == 1
    finally:
        survivor.close()


def test_non_durable_queues_go_with_their_node(node: Callable[[str], RoostProcess]) -> None:
    a, b, c = node("a"), node("b"), node("c")
    on_b, on_c = _connect(b, "declarer-b"), _connect(c, "declarer-c")
    try:
        chb = on_b.channel()
        chb.queue_declare("b-transient", durable=False)
        chb.queue_declare("b-durable", durable=True)
        chc = on_c.channel()
        chc.queue_declare("c-transient", durable=False)
        on_b.close()
        on_c.close()
        # Declared on b and c, known everywhere, living on their node.
        for name, home in (("b-transient", "b"), ("c-transient", "c"), ("b-durable", "a")):
            q = _queue(a, name)
            assert q is not None and q["node"] == home, (name, q)

        # A clean stop: b leaves, its non-durable queue goes at once.
        assert b.terminate() == 0
        _wait_for(lambda: _queue(a, "b-transient") is None, "b's transient queue deleted")
        assert _queue(a, "b-durable") is not None
        assert _queue(a, "c-transient") is not None

        # A crash: c's goes once c is declared dead.
        c.kill()
        _wait_for(lambda: _queue(a, "c-transient") is None, "c's transient queue deleted")
        assert _queue(a, "b-durable") is not None
    finally:
        for conn in (on_b, on_c):
            if conn.is_open:
                conn.close()


def test_metrics_name_the_node_and_the_cluster(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    conn = _connect(b, "publisher")
    try:
        ch = conn.channel()
        ch.queue_declare("api-metrics", durable=True)
        ch.confirm_delivery()
        ch.basic_publish("", "api-metrics", b"x", pika.BasicProperties(delivery_mode=2))

        def scrape(proc: RoostProcess) -> str:
            url = f"http://127.0.0.1:{proc.http_port}/metrics/per-object"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return str(resp.read().decode())

        _wait_for(lambda: "roost_cluster_nodes 2" in scrape(b), "two nodes in b's metrics")
        text = scrape(b)
        assert 'rabbitmq_identity_info{rabbitmq_node="b",rabbitmq_cluster="a"} 1' in text
        batches = [line for line in text.splitlines() if line.startswith("roost_cluster_writer_")]
        assert any(line.startswith("roost_cluster_writer_batches_total ") for line in batches)
        assert int(next(ln for ln in batches if "batches_total " in ln).split()[1]) >= 1
        assert "roost_cluster_writer_commit_seconds_count" in text
        assert 'rabbitmq_queue_messages{vhost="/",queue="api-metrics"}' in text
        assert 'rabbitmq_node="a"' in scrape(a)
    finally:
        conn.close()


def test_roost_ctl_lists_the_whole_cluster(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    on_b = _connect(b, "ctl-client")
    try:
        ch = on_b.channel()
        ch.queue_declare("ctl-queue", durable=True)
        ch.basic_consume("ctl-queue", lambda *_: None, consumer_tag="ctl-tag")

        def ctl(*args: str) -> Any:
            out = subprocess.run(
                [sys.executable, "-m", "roost", "ctl", *args, "--data-dir", str(a.data_dir)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return json.loads(out.stdout)

        _wait_for(lambda: len(ctl("list", "connections", "--json")) == 1, "b's connection")
        assert ctl("list", "connections", "--json")[0]["node"] == "b"
        assert [c["node"] for c in ctl("list", "channels", "--json")] == ["b"]
        consumers = ctl("list", "consumers", "--json")
        assert [(c["node"], c["tag"]) for c in consumers] == [("b", "ctl-tag")]
        queues = {q["name"]: q for q in ctl("list", "queues", "--json")}
        assert queues["ctl-queue"]["consumers"] == 1
        command = [sys.executable, "-m", "roost", "ctl", "list", "connections"]
        table = subprocess.run(
            [*command, "--data-dir", str(a.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert table.split()[0] == "node"
        status = ctl("status", "--json")
        assert status["nodes"] == ["a", "b"] and status["cluster_name"] == "a"
        assert status["connections"] == 0 and status["cluster_connections"] == 1
    finally:
        on_b.close()
