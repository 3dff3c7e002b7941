"""/api/vhosts, /api/users and /api/permissions (read-only)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roost.broker import read_models
from roost.broker.broker import Broker
from roost.broker.vhost import VirtualHost
from roost.http.common import (
    broker_of,
    json_response,
    require_admin,
    vhost_of,
    visible_vhosts,
)


def vhost_json(broker: Broker, vh: VirtualHost) -> dict[str, Any]:
    totals = read_models.totals([vh])
    description = "Default virtual host" if vh.name == "/" else ""
    return {
        "name": vh.name,
        "description": description,
        "tags": [],
        "metadata": {"description": description, "tags": []},
        "default_queue_type": "undefined",
        "tracing": False,
        "messages": totals.messages,
        "messages_ready": totals.messages_ready,
        "messages_unacknowledged": totals.messages_unacknowledged,
        "message_stats": broker.stats.message_stats(("vhost", vh.name)),
    }


async def list_vhosts(request: web.Request) -> web.Response:
    return json_response([vhost_json(broker_of(request), vh) for vh in visible_vhosts(request)])


async def get_vhost(request: web.Request) -> web.Response:
    return json_response(vhost_json(broker_of(request), vhost_of(request)))


async def list_users(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(
        [
            {
                "name": u.name,
                "password_hash": u.password_hash,
                "hashing_algorithm": u.algorithm,
                "tags": list(u.tags),
                "limits": {},
            }
            for u in broker_of(request).users.users.values()
        ]
    )


async def list_permissions(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(
        [
            {"user": user, "vhost": vhost, "configure": c, "write": w, "read": r}
            for (user, vhost), (c, w, r) in broker_of(request).permissions.items()
        ]
    )


def register(app: web.Application) -> None:
    app.router.add_get("/api/vhosts", list_vhosts)
    app.router.add_get("/api/vhosts/{vhost}", get_vhost)
    app.router.add_get("/api/users", list_users)
    app.router.add_get("/api/permissions", list_permissions)
