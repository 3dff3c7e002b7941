"""/api/queues: list, show, declare (PUT), delete and purge."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from aiohttp import web

from roost.broker import read_models
from roost.broker.access import CONFIGURE, READ
from roost.broker.fields import jsonable
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.http.cluster_view import ClusterSnapshot, merged_queue
from roost.http.common import (
    INFO,
    acting_in,
    broker_of,
    cluster_snapshot,
    definitions_saved,
    durable,
    json_body,
    json_response,
    listing,
    not_found,
    vhost_of,
    visible_vhosts,
)

# The owner of queues declared through the API (never exclusive).
_API_OWNER = object()


def queue_json(
    request: web.Request, q: Queue, cluster: ClusterSnapshot | None = None
) -> dict[str, Any]:
    v = read_models.queue_view(broker_of(request), q)
    node = request.app[INFO]["node"]
    if cluster is not None:
        # The whole cluster's figures; a queue with a home (exclusive,
        # non-durable) is on that node, any other is served by every node.
        merged = merged_queue(q, cluster)
        node = cluster.homes.get((v.vhost, v.name), node)
        v = replace(
            v,
            messages_ready=merged.messages_ready,
            messages_unacknowledged=merged.messages_unacknowledged,
            consumers=merged.consumers,
        )
    return {
        "name": v.name,
        "vhost": v.vhost,
        "durable": v.durable,
        "auto_delete": v.auto_delete,
        "exclusive": v.exclusive,
        "arguments": jsonable(v.arguments),
        "type": v.type,
        "node": node,
        "state": v.state,
        "consumers": v.consumers,
        "messages": v.messages,
        "messages_details": {"rate": 0.0},
        "messages_ready": v.messages_ready,
        "messages_ready_details": {"rate": 0.0},
        "messages_unacknowledged": v.messages_unacknowledged,
        "messages_unacknowledged_details": {"rate": 0.0},
        "message_bytes_ready": v.message_bytes_ready,
        "memory": v.memory,
        "policy": None,
        "operator_policy": None,
        "exclusive_consumer_tag": None,
        "single_active_consumer_tag": v.single_active_consumer_tag,
        "message_stats": v.message_stats,
    }


def _queue(request: web.Request, vh: VirtualHost) -> Queue:
    q = vh.queues.get(request.match_info["name"])
    if q is None:
        not_found()
    return q


async def list_all(request: web.Request) -> web.Response:
    queues = [q for vh in visible_vhosts(request) for q in vh.queues.values()]
    render = functools.partial(queue_json, request, cluster=await cluster_snapshot(request))
    return await listing(request, queues, render, _queue_name)


async def list_vhost(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    queues = list(vh.queues.values())
    render = functools.partial(queue_json, request, cluster=await cluster_snapshot(request))
    return await listing(request, queues, render, _queue_name)


def _queue_name(q: Queue) -> str:
    return q.name


async def show(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    q = _queue(request, vh)
    data = queue_json(request, q, await cluster_snapshot(request))
    data["consumer_details"] = []
    data["incoming"] = []
    data["deliveries"] = []
    return json_response(data)


async def put(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    body = await json_body(request)
    name = request.match_info["name"]
    existed = name in vh.queues
    arguments = body.get("arguments") or {}
    args = dict(arguments) if isinstance(arguments, dict) else {}
    vh.declare_queue(
        name,
        owner=_API_OWNER,
        durable=bool(body.get("durable", False)),
        auto_delete=bool(body.get("auto_delete", False)),
        arguments=args,
        max_queues=broker_of(request).max_queues_per_vhost,
        authorize=lambda actual, new: actor.may_declare_queue(actual, new, args),
    )
    await definitions_saved(broker_of(request))
    return web.Response(status=204 if existed else 201)


async def delete(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    actor.check(CONFIGURE, "queue", request.match_info["name"])
    q = _queue(request, vh)
    if q.exclusive_owner is not None:
        # Another connection's exclusive queue: RESOURCE_LOCKED, as the
        # management plugin's AMQP queue.delete gets it.
        vh.queue(q.name, _API_OWNER)
    # In a cluster: the consumers and messages of every node.
    figures = merged_queue(q, await cluster_snapshot(request))
    if request.query.get("if-unused") == "true" and figures.consumers:
        return json_response({"error": "bad_request", "reason": "in use"}, status=400)
    if request.query.get("if-empty") == "true" and figures.messages_ready:
        return json_response({"error": "bad_request", "reason": "not empty"}, status=400)
    vh.remove_queue(q)
    await definitions_saved(broker_of(request))
    return web.Response(status=204)


async def purge(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    actor.check(READ, "queue", request.match_info["name"])
    _queue(request, vh)
    vh.purge_queue(request.match_info["name"], _API_OWNER)
    await durable(broker_of(request))
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/queues", list_all)
    app.router.add_get("/api/queues/{vhost}", list_vhost)
    app.router.add_get("/api/queues/{vhost}/{name}", show)
    app.router.add_put("/api/queues/{vhost}/{name}", put)
    app.router.add_delete("/api/queues/{vhost}/{name}", delete)
    app.router.add_delete("/api/queues/{vhost}/{name}/contents", purge)
