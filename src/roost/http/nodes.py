"""GET /api/nodes and /api/nodes/{name}: the one node roost is, with the
fields of RabbitMQ 3.10's node objects that clients and monitoring scripts
read (memory, disk, file descriptors, uptime, exchange types).

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
from typing import Any

from aiohttp import web

from roost import __version__
from roost.broker.exchange import EXCHANGE_TYPES
from roost.http.common import (
    INFO,
    HTTPError,
    broker_of,
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


async def list_nodes(request: web.Request) -> web.Response:
    _require_monitor(request)
    return json_response([node_info(request)])


async def show_node(request: web.Request) -> web.Response:
    _require_monitor(request)
    # RabbitMQ answers an unknown node with an empty 500 (the RPC to it
    # fails); a 404 says the same thing more usefully.
    if request.match_info["name"] != request.app[INFO]["node"]:
        not_found()
    return json_response(node_info(request))


def register(app: web.Application) -> None:
    app.router.add_get("/api/nodes", list_nodes)
    app.router.add_get("/api/nodes/{name}", show_node)
