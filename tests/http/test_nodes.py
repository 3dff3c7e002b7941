"""GET /api/nodes and /api/nodes/{name}: RabbitMQ 3.10's node objects."""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pika
import pytest

from roost.testing import RoostBroker

pytest.importorskip("requests")  # amqpstorm.management needs it
from amqpstorm.management.api import ManagementApi
from amqpstorm.management.exception import ApiError


def call(broker: RoostBroker, path: str, auth: str = "guest:guest") -> tuple[int, Any]:
    req = urllib.request.Request(broker.http_url + path)
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    return status, json.loads(raw) if raw else None


def node(broker: RoostBroker) -> dict[str, Any]:
    status, body = call(broker, "/api/nodes")
    assert status == 200
    assert isinstance(body, list) and len(body) == 1
    result: dict[str, Any] = body[0]
    return result


def add_user(broker: RoostBroker, name: str, tags: tuple[str, ...]) -> None:
    srv = broker.server
    assert srv is not None
    broker.call(lambda: srv.broker.users.add(name, name, tags))


def test_node_fields(roost_broker: RoostBroker) -> None:
    n = node(roost_broker)
    _, overview = call(roost_broker, "/api/overview")
    assert n["name"] == overview["node"]
    assert (n["type"], n["running"], n["run_queue"], n["partitions"]) == ("disc", True, 0, [])
    # The in-process broker is this very process.
    assert n["os_pid"] == str(os.getpid())
    assert n["processors"] == os.cpu_count()
    assert n["fd_total"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0 < n["fd_used"] <= n["fd_total"]
    assert n["mem_used"] > 1_000_000  # a Python process's RSS is megabytes
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert n["mem_limit"] == int(ram * 0.4)
    assert n["disk_free_limit"] == 50_000_000
    assert (n["mem_alarm"], n["disk_free_alarm"]) == (False, False)
    assert isinstance(n["uptime"], int) and n["uptime"] >= 0
    assert n["proc_used"] >= 1  # at least the task serving this request
    assert n["proc_total"] == 1_048_576
    types = {t["name"]: t for t in n["exchange_types"]}
    assert [t["name"] for t in n["exchange_types"]] == sorted(types)
    for name in ("direct", "fanout", "headers", "topic"):
        assert types[name] == {
            "name": name,
            "description": f"AMQP {name} exchange, as per the AMQP specification",
            "enabled": True,
        }
    assert [a["name"] for a in n["applications"]] == ["roost"]


def test_disk_free_is_of_the_data_dir(roost_broker: RoostBroker) -> None:
    n = node(roost_broker)
    expected = shutil.disk_usage(roost_broker.config.data_dir).free
    # Other processes write to the same file system meanwhile.
    assert abs(n["disk_free"] - expected) < max(expected // 20, 200_000_000)
    assert n["disk_free"] > 0


def test_uptime_grows(roost_broker: RoostBroker) -> None:
    first = node(roost_broker)["uptime"]
    deadline = time.monotonic() + 1.5
    later = first
    while later <= first and time.monotonic() < deadline:
        time.sleep(0.01)
        later = node(roost_broker)["uptime"]
    assert later > first


def test_alarms_are_reported(roost_broker: RoostBroker) -> None:
    srv = roost_broker.server
    assert srv is not None
    roost_broker.call(lambda: srv.broker.set_alarm("memory"))
    n = node(roost_broker)
    assert (n["mem_alarm"], n["disk_free_alarm"]) == (True, False)
    roost_broker.call(lambda: srv.broker.set_alarm("disk"))
    n = node(roost_broker)
    assert (n["mem_alarm"], n["disk_free_alarm"]) == (True, True)
    roost_broker.call(lambda: srv.broker.clear_alarm("memory"))
    roost_broker.call(lambda: srv.broker.clear_alarm("disk"))
    n = node(roost_broker)
    assert (n["mem_alarm"], n["disk_free_alarm"]) == (False, False)


def test_sockets_used_counts_connections(roost_broker: RoostBroker) -> None:
    assert node(roost_broker)["sockets_used"] == 0
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        assert node(roost_broker)["sockets_used"] == 1
    finally:
        conn.close()
    deadline = time.monotonic() + 1.5
    while node(roost_broker)["sockets_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert node(roost_broker)["sockets_used"] == 0


def test_show_node_by_name(roost_broker: RoostBroker) -> None:
    name = node(roost_broker)["name"]
    status, body = call(roost_broker, "/api/nodes/" + urllib.parse.quote(name))
    assert status == 200
    assert body["name"] == name
    assert body["os_pid"] == str(os.getpid())
    status, body = call(roost_broker, "/api/nodes/rabbit@elsewhere")
    assert (status, body) == (404, {"error": "Object Not Found", "reason": "Not Found"})


def test_nodes_need_monitoring_tag(roost_broker: RoostBroker) -> None:
    add_user(roost_broker, "watcher", ("monitoring",))
    add_user(roost_broker, "manager", ("management",))
    status, body = call(roost_broker, "/api/nodes", auth="watcher:watcher")
    assert status == 200 and len(body) == 1
    for path in ("/api/nodes", "/api/nodes/" + body[0]["name"]):
        status, body2 = call(roost_broker, path, auth="manager:manager")
        assert (status, body2) == (401, {"error": "not_authorised", "reason": "Not monitor user"})


def test_amqpstorm_management_client(roost_broker: RoostBroker) -> None:
    api = ManagementApi(roost_broker.http_url, "guest", "guest", timeout=5)
    nodes = api.nodes()
    assert len(nodes) == 1
    name = nodes[0]["name"]
    assert name.startswith("roost@")
    shown = api.node(name)
    assert (shown["name"], shown["running"], shown["os_pid"]) == (name, True, str(os.getpid()))
    with pytest.raises(ApiError) as err:
        api.node("rabbit@elsewhere")
    assert err.value.error_code == 404
