"""GET /api/openapi.json: an OpenAPI 3.0 description of what roost's
management API serves. The table below is the description; a test checks
that it and the routes the application registers name the same endpoints."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from roost import __version__
from roost.http.common import json_response

# (method, path, tag, summary). Paths as the aiohttp routes write them.
ENDPOINTS: list[tuple[str, str, str, str]] = [
    ("GET", "/api/overview", "overview", "Broker overview: totals, message_stats, listeners"),
    ("GET", "/api/whoami", "overview", "The authenticated user"),
    ("GET", "/api/aliveness-test/{vhost}", "health", "Whether the vhost is alive"),
    ("GET", "/api/health/checks/alarms", "health", "503 while a resource alarm is set"),
    ("GET", "/api/healthchecks/node", "health", "Node health"),
    ("GET", "/api/healthchecks/node/{node}", "health", "Node health"),
    ("GET", "/api/nodes", "nodes", "The node: memory, disk, fds, uptime (monitoring)"),
    ("GET", "/api/nodes/{name}", "nodes", "Show the node by name (404 for another)"),
    ("GET", "/api/openapi.json", "overview", "This description"),
    ("GET", "/api/vhosts", "vhosts", "List vhosts (with message_stats)"),
    ("GET", "/api/vhosts/{vhost}", "vhosts", "Show a vhost"),
    ("PUT", "/api/vhosts/{vhost}", "vhosts", "Create a vhost (201; 204 when it exists)"),
    ("DELETE", "/api/vhosts/{vhost}", "vhosts", "Delete a vhost, its queues and permissions"),
    ("GET", "/api/vhosts/{vhost}/permissions", "permissions", "Permissions in a vhost"),
    ("GET", "/api/vhosts/{vhost}/connections", "connections", "Connections to a vhost"),
    ("GET", "/api/vhosts/{vhost}/channels", "connections", "Channels in a vhost"),
    ("GET", "/api/users", "users", "List users"),
    ("GET", "/api/users/{user}", "users", "Show a user"),
    (
        "PUT",
        "/api/users/{user}",
        "users",
        "Create or update a user: password or password_hash, tags",
    ),
    ("DELETE", "/api/users/{user}", "users", "Delete a user, its permissions and connections"),
    ("GET", "/api/users/{user}/permissions", "permissions", "A user's permissions"),
    ("GET", "/api/permissions", "permissions", "List all permissions"),
    ("GET", "/api/permissions/{vhost}/{user}", "permissions", "Show a user's permissions"),
    ("PUT", "/api/permissions/{vhost}/{user}", "permissions", "Set configure/write/read"),
    ("DELETE", "/api/permissions/{vhost}/{user}", "permissions", "Clear permissions"),
    ("GET", "/api/exchanges", "exchanges", "List exchanges (paginated, filtered)"),
    ("GET", "/api/exchanges/{vhost}", "exchanges", "List a vhost's exchanges"),
    ("GET", "/api/exchanges/{vhost}/{name}", "exchanges", "Show an exchange"),
    ("PUT", "/api/exchanges/{vhost}/{name}", "exchanges", "Declare an exchange"),
    ("DELETE", "/api/exchanges/{vhost}/{name}", "exchanges", "Delete an exchange (?if-unused)"),
    ("GET", "/api/exchanges/{vhost}/{name}/bindings/source", "bindings", "Bindings from it"),
    ("GET", "/api/exchanges/{vhost}/{name}/bindings/destination", "bindings", "Bindings to it"),
    ("POST", "/api/exchanges/{vhost}/{name}/publish", "messages", "Publish: {routed}"),
    ("GET", "/api/queues", "queues", "List queues (paginated, filtered)"),
    ("GET", "/api/queues/{vhost}", "queues", "List a vhost's queues"),
    ("GET", "/api/queues/{vhost}/{name}", "queues", "Show a queue"),
    ("PUT", "/api/queues/{vhost}/{name}", "queues", "Declare a queue"),
    ("DELETE", "/api/queues/{vhost}/{name}", "queues", "Delete a queue (?if-unused, ?if-empty)"),
    ("DELETE", "/api/queues/{vhost}/{name}/contents", "queues", "Purge a queue"),
    ("GET", "/api/queues/{vhost}/{name}/bindings", "bindings", "A queue's bindings"),
    ("POST", "/api/queues/{vhost}/{name}/get", "messages", "Get messages (count, ackmode)"),
    ("GET", "/api/bindings", "bindings", "List bindings"),
    ("GET", "/api/bindings/{vhost}", "bindings", "List a vhost's bindings"),
]
for _kind, _what in (("q", "queue"), ("e", "exchange")):
    _base = "/api/bindings/{vhost}/e/{source}/" + _kind + "/{destination}"
    ENDPOINTS += [
        ("GET", _base, "bindings", f"Bindings from an exchange to a {_what}"),
        ("POST", _base, "bindings", f"Bind an exchange to a {_what} (201, Location)"),
        ("GET", _base + "/{props}", "bindings", "Show a binding by its properties_key"),
        ("DELETE", _base + "/{props}", "bindings", "Delete a binding by its properties_key"),
    ]
ENDPOINTS += [
    ("GET", "/api/connections", "connections", "List connections"),
    ("GET", "/api/connections/{name}", "connections", "Show a connection"),
    ("DELETE", "/api/connections/{name}", "connections", "Close it (320; X-Reason header)"),
    ("GET", "/api/connections/{name}/channels", "connections", "A connection's channels"),
    ("GET", "/api/channels", "connections", "List channels"),
    ("GET", "/api/channels/{name}", "connections", "Show a channel"),
    ("GET", "/api/consumers", "connections", "List consumers"),
    ("GET", "/api/consumers/{vhost}", "connections", "List a vhost's consumers"),
    ("GET", "/api/definitions", "definitions", "Export definitions"),
    ("POST", "/api/definitions", "definitions", "Import definitions"),
    ("GET", "/metrics", "metrics", "Prometheus metrics, aggregated (auth with metrics_auth)"),
    ("GET", "/metrics/per-object", "metrics", "Prometheus metrics per queue, exchange, vhost"),
]

_PARAM = re.compile(r"\{(\w+)[^}]*\}")


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, tag, summary in ENDPOINTS:
        op: dict[str, Any] = {
            "tags": [tag],
            "summary": summary,
            "responses": {"200": {"description": "OK"}},
        }
        params = _PARAM.findall(path)
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
        if path.startswith("/api/"):
            op["security"] = [{"basic": []}]
            op["responses"]["401"] = {"description": "not authorised"}
        if method in ("PUT", "POST"):
            op["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "roost management API",
            "version": __version__,
            "description": "A subset of RabbitMQ's management HTTP API (3.10 shapes).",
        },
        "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
        "paths": paths,
    }


async def openapi(request: web.Request) -> web.Response:
    return json_response(document())


def register(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi)
