"""GET /api/nodes and /api/nodes/{name}: the one node roost is, with the
fields of RabbitMQ 3.10's node objects that clients and monitoring scripts
read (memory, disk, file descriptors, uptime, exchange types).

In cluster mode the list holds every live node of the cluster (from the
node registry in PostgreSQL): this node with all its fields, the others
with what the registry knows of them (name, running, uptime, addresses).

Erlang-specific figures are mapped onto what a Python process has:
``proc_used`` counts the event loop's asyncio tasks (RabbitMQ counts Erlang
processes) and ``proc_total`` is RabbitMQ's default process limit, as roost
has no limit of its own; ``run_queue`` is always 0."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from roost import __version__
from roost.broker.exchange import EXCHANGE_TYPES
from roost.http.common import (
    INFO,
    HTTPError,
    broker_of,
    cluster_snapshot,
    json_response,
    not_found,
    sees_all,
    user_of,
)
from roost.resources import rss, total_ram

# RabbitMQ's defaults: the memory alarm at 40% of the RAM, the disk alarm
# below 50 MB free, at most 1048576 Erlang processes.
MEMORY_WATERMARK = 0.4
DISK_FREE_LIMIT = 50_000_000
PROC_TOTAL = 1_048_576


@dataclass(frozen=True)
class ClusterNode:
    """A live node of the cluster, as the node registry reports it."""

    name: str
    uptime_ms: int
    amqp_address: str = ""
    http_address: str = ""


# Lists the cluster's live nodes (given to build_app in cluster mode).
ClusterNodes = Callable[[], Awaitable[list[ClusterNode]]]


def _fd_used() -> int:
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return 0


def _disk_free(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _describe(exchange_type: str) -> str:
    # RabbitMQ's descriptions (the delayed one is its plugin's).
    if exchange_type == "x-delayed-message":
        return "Delayed Message Exchange."
    return f"AMQP {exchange_type} exchange, as per the AMQP specification"


def node_info(request: web.Request) -> dict[str, Any]:
    broker = broker_of(request)
    info = request.app[INFO]
    fd_total = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_total == resource.RLIM_INFINITY:
        fd_total = 1_048_576
    return {
        "name": info["node"],
        "type": "disc",
        "running": True,
        "os_pid": str(os.getpid()),  # a string in RabbitMQ too
        "uptime": int((time.time() - info["started"]) * 1000),
        "mem_used": rss(),
        "mem_limit": broker.memory_limit or int(total_ram() * MEMORY_WATERMARK),
        "mem_alarm": "memory" in broker.alarms,
        "mem_calculation_strategy": "rss",
        "disk_free": _disk_free(info["data_dir"]),
        "disk_free_limit": broker.disk_free_limit or DISK_FREE_LIMIT,
        "disk_free_alarm": "disk" in broker.alarms,
        "fd_used": _fd_used(),
        "fd_total": fd_total,
        "sockets_used": len(broker.connections),
        "sockets_total": fd_total,
        "proc_used": len(asyncio.all_tasks()),
        "proc_total": PROC_TOTAL,
        "run_queue": 0,
        "processors": os.cpu_count() or 1,
        "db_dir": info["data_dir"],
        "rates_mode": "none",
        "partitions": [],
        "cluster_links": [],
        "enabled_plugins": [],
        "applications": [
            {"name": "roost", "description": "roost AMQP 0-9-1 broker", "version": __version__}
        ],
        "exchange_types": [
            {"name": name, "description": _describe(name), "enabled": True}
            for name in sorted(EXCHANGE_TYPES)
        ],
        "auth_mechanisms": [
            {
                "name": "PLAIN",
                "description": "SASL PLAIN authentication mechanism",
                "enabled": True,
            },
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": True},
        ],
        "contexts": [],
    }


def _require_monitor(request: web.Request) -> None:
    # As RabbitMQ: node details are for monitoring users and administrators.
    if not sees_all(user_of(request)):
        raise HTTPError(401, "not_authorised", "Not monitor user")


def _peer_info(node: ClusterNode, connections: int | None) -> dict[str, Any]:
    # Another node's figures (memory, disk ...) are its own to report; the
    # registry knows that it is alive and since when, and its published
    # view how many connections it serves.
    info: dict[str, Any] = {
        "name": node.name,
        "type": "disc",
        "running": True,
        "uptime": node.uptime_ms,
        "amqp_address": node.amqp_address,
        "http_address": node.http_address,
    }
    if connections is not None:
        info["sockets_used"] = connections
    return info


async def _nodes(request: web.Request) -> list[dict[str, Any]]:
    info = request.app[INFO]
    listing: ClusterNodes | None = info.get("cluster_nodes")
    if listing is None:
        return [node_info(request)]
    snap = await cluster_snapshot(request)
    connections = {p.node: len(p.connections) for p in snap.peers} if snap is not None else {}
    out = []
    for node in await listing():
        if node.name == info["node"]:
            own = node_info(request)
            own.update(amqp_address=node.amqp_address, http_address=node.http_address)
            out.append(own)
        else:
            out.append(_peer_info(node, connections.get(node.name)))
    return out


async def list_nodes(request: web.Request) -> web.Response:
    _require_monitor(request)
    return json_response(await _nodes(request))


async def show_node(request: web.Request) -> web.Response:
    _require_monitor(request)
    # RabbitMQ answers an unknown node with an empty 500 (the RPC to it
    # fails); a 404 says the same thing more usefully.
    for node in await _nodes(request):
        if node["name"] == request.match_info["name"]:
            return json_response(node)
    not_found()


def register(app: web.Application) -> None:
    app.router.add_get("/api/nodes", list_nodes)
    app.router.add_get("/api/nodes/{name}", show_node)
