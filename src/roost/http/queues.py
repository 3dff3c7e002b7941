"""/api/queues (list, show, declare, delete, purge) and /api/bindings."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from aiohttp import web

from roost.broker.binding import Binding, args_key
from roost.broker.fields import jsonable
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.http.common import (
    BROKER,
    INFO,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    listing,
    not_found,
    vhost_of,
    visible_vhosts,
)

# The owner of queues declared through the API (never exclusive).
_API_OWNER = object()


def queue_json(request: web.Request, q: Queue) -> dict[str, Any]:
    ready = q.message_count
    unacked = q.unacked
    active = q.active_consumer
    broker = request.app[BROKER]
    return {
        "name": q.name,
        "vhost": q.vhost.name,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive,
        "arguments": jsonable(q.arguments),
        "type": str(q.arguments.get("x-queue-type", "classic")),
        "node": request.app[INFO]["node"],
        "state": "running",
        "consumers": q.consumer_count,
        "messages": ready + unacked,
        "messages_details": {"rate": 0.0},
        "messages_ready": ready,
        "messages_ready_details": {"rate": 0.0},
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": {"rate": 0.0},
        "message_bytes_ready": q.ready_bytes,
        "memory": q.memory_estimate(),
        "policy": None,
        "operator_policy": None,
        "exclusive_consumer_tag": None,
        "single_active_consumer_tag": (
            active.tag if active is not None and q.options.single_active_consumer else None
        ),
        "message_stats": broker.stats.message_stats(("queue", q.vhost.name, q.name)),
    }


def _queue(request: web.Request, vh: VirtualHost) -> Queue:
    q = vh.queues.get(request.match_info["name"])
    if q is None:
        not_found()
    return q


async def list_all(request: web.Request) -> web.Response:
    return listing(
        request,
        [queue_json(request, q) for vh in visible_vhosts(request) for q in vh.queues.values()],
    )


async def list_vhost(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    return listing(request, [queue_json(request, q) for q in vh.queues.values()])


async def show(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    data = queue_json(request, _queue(request, vh))
    data["consumer_details"] = []
    data["incoming"] = []
    data["deliveries"] = []
    return json_response(data)


async def put(request: web.Request) -> web.Response:
    vh = vhost_of(request, write=True)
    body = await json_body(request)
    name = request.match_info["name"]
    existed = name in vh.queues
    arguments = body.get("arguments") or {}
    vh.declare_queue(
        name,
        owner=_API_OWNER,
        durable=bool(body.get("durable", False)),
        auto_delete=bool(body.get("auto_delete", False)),
        arguments=dict(arguments) if isinstance(arguments, dict) else {},
    )
    await definitions_saved(broker_of(request))
    return web.Response(status=204 if existed else 201)


async def delete(request: web.Request) -> web.Response:
    vh = vhost_of(request, write=True)
    q = _queue(request, vh)
    if request.query.get("if-unused") == "true" and q.consumer_count:
        return json_response({"error": "bad_request", "reason": "in use"}, status=400)
    if request.query.get("if-empty") == "true" and q.message_count:
        return json_response({"error": "bad_request", "reason": "not empty"}, status=400)
    # An administrator may delete any queue, exclusive ones included, as
    # in RabbitMQ's management UI.
    vh.remove_queue(q)
    await definitions_saved(broker_of(request))
    return web.Response(status=204)


async def purge(request: web.Request) -> web.Response:
    vh = vhost_of(request, write=True)
    _queue(request, vh).purge()
    return web.Response(status=204)


def properties_key(b: Binding) -> str:
    """RabbitMQ's ``properties_key``, a binding's name within its source
    and destination: the routing key ("%" and "~" escaped; "~" when
    empty), then "~" and a short hash of the arguments when it has any
    (stable across restarts: a digest of the arguments, not ``hash``)."""
    key = b.routing_key.replace("%", "%25").replace("~", "%7E")
    if not b.arguments:
        return key or "~"
    digest = hashlib.sha1(args_key(b.arguments).encode()).digest()[:4]
    return f"{key}~{base64.urlsafe_b64encode(digest).decode().rstrip('=')}"


def binding_json(vhost: str, b: Binding) -> dict[str, Any]:
    props = properties_key(b)
    return {
        "source": b.source.name,
        "vhost": vhost,
        "destination": b.destination.name,
        "destination_type": b.destination.kind,
        "routing_key": b.routing_key,
        "arguments": jsonable(b.arguments),
        "properties_key": props,
    }


def _bindings(vh: VirtualHost) -> list[dict[str, Any]]:
    return [binding_json(vh.name, b) for ex in vh.exchanges.values() for b in ex.bindings.values()]


async def list_bindings(request: web.Request) -> web.Response:
    return json_response([b for vh in visible_vhosts(request) for b in _bindings(vh)])


async def list_vhost_bindings(request: web.Request) -> web.Response:
    return json_response(_bindings(vhost_of(request)))


def register(app: web.Application) -> None:
    app.router.add_get("/api/queues", list_all)
    app.router.add_get("/api/queues/{vhost}", list_vhost)
    app.router.add_get("/api/queues/{vhost}/{name}", show)
    app.router.add_put("/api/queues/{vhost}/{name}", put)
    app.router.add_delete("/api/queues/{vhost}/{name}", delete)
    app.router.add_delete("/api/queues/{vhost}/{name}/contents", purge)
    app.router.add_get("/api/bindings", list_bindings)
    app.router.add_get("/api/bindings/{vhost}", list_vhost_bindings)
