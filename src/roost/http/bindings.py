"""Creating, showing and deleting bindings, as RabbitMQ's
/api/bindings/{vhost}/e/{source}/q/{queue} (and .../e/{destination})
with a binding named by its ``properties_key``, and the per-exchange and
per-queue binding lists."""

from __future__ import annotations

import urllib.parse
from typing import Any

from aiohttp import web

from roost.broker.binding import Binding
from roost.broker.exchange import Exchange
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.http.common import (
    bad_request,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    not_found,
    vhost_of,
)
from roost.http.queues import binding_json, properties_key


def _exchange_name(name: str) -> str:
    return "" if name == "amq.default" else name


def _ends(request: web.Request, vh: VirtualHost) -> tuple[Exchange | None, Queue | Exchange | None]:
    source = vh.exchanges.get(_exchange_name(request.match_info["source"]))
    dest_name = request.match_info["destination"]
    dest: Queue | Exchange | None
    resource = request.match_info.route.resource
    if resource is not None and "/q/" in resource.canonical:
        dest = vh.queues.get(dest_name)
    else:
        dest = vh.exchanges.get(_exchange_name(dest_name))
    return source, dest


def _between(source: Exchange, dest: Queue | Exchange) -> list[Binding]:
    return [b for b in source.bindings.values() if b.destination is dest]


async def list_between(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    source, dest = _ends(request, vh)
    # As RabbitMQ: a missing source or destination lists nothing.
    if source is None or dest is None:
        return json_response([])
    return json_response([binding_json(vh.name, b) for b in _between(source, dest)])


async def create(request: web.Request) -> web.Response:
    vh = vhost_of(request, write=True)
    body = await json_body(request)
    source, dest = _ends(request, vh)
    if source is None or dest is None:
        not_found()
    routing_key = body.get("routing_key", "")
    arguments = body.get("arguments") or {}
    if not isinstance(routing_key, str) or not isinstance(arguments, dict):
        bad_request("routing_key must be a string and arguments an object")
    vh.bind(source.name, dest, routing_key, dict(arguments))
    made = [
        b
        for b in _between(source, dest)
        if b.routing_key == routing_key and b.arguments == dict(arguments)
    ]
    props = properties_key(made[0]) if made else routing_key or "~"
    # RabbitMQ's Location: the new binding, relative to the request's URL.
    location = urllib.parse.quote(dest.name, safe="") + "/" + urllib.parse.quote(props, safe="~")
    await definitions_saved(broker_of(request))
    return web.Response(status=201, headers={"Location": location})


def _binding(request: web.Request, vh: VirtualHost) -> Binding:
    source, dest = _ends(request, vh)
    if source is None or dest is None:
        not_found()
    props = request.match_info["props"]
    for b in _between(source, dest):
        if properties_key(b) == props:
            return b
    not_found()


async def show(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    return json_response(binding_json(vh.name, _binding(request, vh)))


async def delete(request: web.Request) -> web.Response:
    vh = vhost_of(request, write=True)
    b = _binding(request, vh)
    vh.unbind(b.source.name, b.destination, b.routing_key, b.arguments)
    await definitions_saved(broker_of(request))
    return web.Response(status=204)


def _exchange(request: web.Request, vh: VirtualHost) -> Exchange:
    ex = vh.exchanges.get(_exchange_name(request.match_info["name"]))
    if ex is None:
        not_found()
    return ex


async def exchange_source(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    ex = _exchange(request, vh)
    return json_response([binding_json(vh.name, b) for b in ex.bindings.values()])


async def exchange_destination(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    ex = _exchange(request, vh)
    return json_response([binding_json(vh.name, b) for b in ex.inbound])


async def queue_bindings(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    q = vh.queues.get(request.match_info["name"])
    if q is None:
        not_found()
    # The default exchange's implicit binding first, as RabbitMQ lists it.
    implicit: dict[str, Any] = {
        "source": "",
        "vhost": vh.name,
        "destination": q.name,
        "destination_type": "queue",
        "routing_key": q.name,
        "arguments": {},
        "properties_key": q.name.replace("%", "%25").replace("~", "%7E") or "~",
    }
    explicit = [binding_json(vh.name, b) for b in q.bindings if b.source.name]
    return json_response([implicit, *explicit])


def register(app: web.Application) -> None:
    for kind in ("q", "e"):
        base = "/api/bindings/{vhost}/e/{source}/" + kind + "/{destination}"
        app.router.add_get(base, list_between)
        app.router.add_post(base, create)
        app.router.add_get(base + "/{props}", show)
        app.router.add_delete(base + "/{props}", delete)
    app.router.add_get("/api/exchanges/{vhost}/{name}/bindings/source", exchange_source)
    app.router.add_get("/api/exchanges/{vhost}/{name}/bindings/destination", exchange_destination)
    app.router.add_get("/api/queues/{vhost}/{name}/bindings", queue_bindings)
