"""Listing bindings (/api/bindings, per vhost, per exchange, per queue) and
creating, showing and deleting them, as RabbitMQ's
/api/bindings/{vhost}/e/{source}/q/{queue} (and .../e/{destination})
with a binding named by its ``properties_key``."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from roost.broker import read_models
from roost.broker.binding import Binding
from roost.broker.exchange import Exchange
from roost.broker.fields import jsonable
from roost.broker.queue import Queue
from roost.broker.read_models import BindingView
from roost.broker.vhost import VirtualHost
from roost.http.common import (
    acting_in,
    bad_request,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    listing,
    not_found,
    vhost_of,
    visible_vhosts,
)


def binding_json(b: BindingView) -> dict[str, Any]:
    return {
        "source": b.source,
        "vhost": b.vhost,
        "destination": b.destination,
        "destination_type": b.destination_type,
        "routing_key": b.routing_key,
        "arguments": jsonable(b.arguments),
        "properties_key": b.properties_key,
    }


def _json(vh: VirtualHost, bindings: Iterable[Binding]) -> list[dict[str, Any]]:
    return [binding_json(read_models.binding_view(vh.name, b)) for b in bindings]


def _bindings(vhosts: Iterable[VirtualHost]) -> list[tuple[str, Binding]]:
    return [
        (vh.name, b) for vh in vhosts for ex in vh.exchanges.values() for b in ex.bindings.values()
    ]


def _render(pair: tuple[str, Binding]) -> dict[str, Any]:
    return binding_json(read_models.binding_view(*pair))


def _destination(pair: tuple[str, Binding]) -> str:
    return pair[1].destination.name


def _source(pair: tuple[str, Binding]) -> str:
    return pair[1].source.name


# Tens of thousands of bindings: rendered in chunks, and with ``page`` only
# the page's (``name`` filters on the destination).
async def list_all(request: web.Request) -> web.Response:
    return await listing(request, _bindings(visible_vhosts(request)), _render, _destination)


async def list_vhost(request: web.Request) -> web.Response:
    return await listing(request, _bindings([vhost_of(request)]), _render, _destination)


# Who the API acts as on queues: never the owner of an exclusive one.
_API_OWNER = object()


def _exchange_name(name: str) -> str:
    return "" if name == "amq.default" else name


def _to_queue(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and "/q/" in resource.canonical


def _ends(request: web.Request, vh: VirtualHost) -> tuple[Exchange | None, Queue | Exchange | None]:
    source = vh.exchanges.get(_exchange_name(request.match_info["source"]))
    dest_name = request.match_info["destination"]
    dest: Queue | Exchange | None
    if _to_queue(request):
        dest = vh.queues.get(dest_name)
    else:
        dest = vh.exchanges.get(_exchange_name(dest_name))
    return source, dest


def _may_bind(request: web.Request, vh: VirtualHost) -> None:
    """queue.bind's / exchange.bind's checks, as the requesting user; then
    another connection's exclusive queue is RESOURCE_LOCKED."""
    _, actor = acting_in(request)
    kind = "queue" if _to_queue(request) else "exchange"
    dest = request.match_info["destination"]
    if kind == "exchange":
        dest = _exchange_name(dest)
    actor.may_bind(kind, dest, _exchange_name(request.match_info["source"]))
    q = vh.queues.get(dest) if kind == "queue" else None
    if q is not None and q.exclusive_owner is not None:
        vh.queue(q.name, _API_OWNER)


def _between(source: Exchange, dest: Queue | Exchange) -> list[Binding]:
    return [b for b in source.bindings.values() if b.destination is dest]


async def list_between(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    source, dest = _ends(request, vh)
    # As RabbitMQ: a missing source or destination lists nothing.
    if source is None or dest is None:
        return json_response([])
    return json_response(_json(vh, _between(source, dest)))


async def create(request: web.Request) -> web.Response:
    vh, _ = acting_in(request)
    body = await json_body(request)
    _may_bind(request, vh)
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
    props = (
        read_models.properties_key(routing_key, made[0].arguments) if made else routing_key or "~"
    )
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
        if read_models.properties_key(b.routing_key, b.arguments) == props:
            return b
    not_found()


async def show(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    return json_response(binding_json(read_models.binding_view(vh.name, _binding(request, vh))))


async def delete(request: web.Request) -> web.Response:
    vh, _ = acting_in(request)
    _may_bind(request, vh)
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
    pairs = [(vh.name, b) for b in ex.bindings.values()]
    return await listing(request, pairs, _render, _destination)


async def exchange_destination(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    ex = _exchange(request, vh)
    return await listing(request, [(vh.name, b) for b in ex.inbound], _render, _source)


async def queue_bindings(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    q = vh.queues.get(request.match_info["name"])
    if q is None:
        not_found()
    # The default exchange's implicit binding first, as RabbitMQ lists it.
    implicit = binding_json(read_models.default_binding(q))
    return json_response([implicit, *_json(vh, (b for b in q.bindings if b.source.name))])


def register(app: web.Application) -> None:
    app.router.add_get("/api/bindings", list_all)
    app.router.add_get("/api/bindings/{vhost}", list_vhost)
    for kind in ("q", "e"):
        base = "/api/bindings/{vhost}/e/{source}/" + kind + "/{destination}"
        app.router.add_get(base, list_between)
        app.router.add_post(base, create)
        app.router.add_get(base + "/{props}", show)
        app.router.add_delete(base + "/{props}", delete)
    app.router.add_get("/api/exchanges/{vhost}/{name}/bindings/source", exchange_source)
    app.router.add_get("/api/exchanges/{vhost}/{name}/bindings/destination", exchange_destination)
    app.router.add_get("/api/queues/{vhost}/{name}/bindings", queue_bindings)
