"""/api/exchanges: list, show, declare (PUT) and delete."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roost.broker import read_models
from roost.broker.access import CONFIGURE
from roost.broker.broker import Broker
from roost.broker.exchange import EXCHANGE_TYPES, Exchange
from roost.broker.fields import jsonable
from roost.broker.vhost import VirtualHost
from roost.http.common import (
    acting_in,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    listing,
    not_found,
    vhost_of,
    visible_vhosts,
)


def exchange_json(broker: Broker, vh: VirtualHost, ex: Exchange) -> dict[str, Any]:
    v = read_models.exchange_view(broker, vh, ex)
    data: dict[str, Any] = {
        "name": v.name,
        "vhost": v.vhost,
        "type": v.type,
        "durable": v.durable,
        "auto_delete": v.auto_delete,
        "internal": v.internal,
        "arguments": jsonable(v.arguments),
        "user_who_performed_action": "rmq-internal",
    }
    if v.message_stats is not None:
        data["message_stats"] = v.message_stats
    return data


def _name(request: web.Request) -> str:
    # The default exchange has no name; URLs call it amq.default.
    name = request.match_info["name"]
    return "" if name == "amq.default" else name


async def list_all(request: web.Request) -> web.Response:
    broker = broker_of(request)
    pairs = [(vh, ex) for vh in visible_vhosts(request) for ex in vh.exchanges.values()]
    return await listing(request, pairs, lambda p: exchange_json(broker, *p), lambda p: p[1].name)


async def list_vhost(request: web.Request) -> web.Response:
    vh, broker = vhost_of(request), broker_of(request)
    exchanges = list(vh.exchanges.values())
    return await listing(
        request, exchanges, lambda ex: exchange_json(broker, vh, ex), lambda ex: ex.name
    )


async def show(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    ex = vh.exchanges.get(_name(request))
    if ex is None:
        not_found()
    data = exchange_json(broker_of(request), vh, ex)
    data["incoming"] = []
    data["outgoing"] = []
    return json_response(data)


async def put(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    body = await json_body(request)
    name = _name(request)
    existed = name in vh.exchanges
    arguments = body.get("arguments") or {}
    args = dict(arguments) if isinstance(arguments, dict) else {}
    kind = str(body.get("type", "direct"))
    # Checked where exchange.declare checks it (after the type and the
    # default exchange, which declare_exchange refuses).
    if name and kind in EXCHANGE_TYPES:
        new = name not in vh.exchanges and not name.startswith("amq.")
        actor.may_declare_exchange(name, new, args)
    vh.declare_exchange(
        name,
        kind,
        durable=bool(body.get("durable", False)),
        auto_delete=bool(body.get("auto_delete", False)),
        internal=bool(body.get("internal", False)),
        arguments=args,
    )
    await definitions_saved(broker_of(request))
    return web.Response(status=204 if existed else 201)


async def delete(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    name = _name(request)
    if name and not name.startswith("amq."):
        actor.check(CONFIGURE, "exchange", name)
    if name not in vh.exchanges:
        not_found()
    vh.delete_exchange(name, if_unused=request.query.get("if-unused") == "true")
    await definitions_saved(broker_of(request))
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/exchanges", list_all)
    app.router.add_get("/api/exchanges/{vhost}", list_vhost)
    app.router.add_get("/api/exchanges/{vhost}/{name}", show)
    app.router.add_put("/api/exchanges/{vhost}/{name}", put)
    app.router.add_delete("/api/exchanges/{vhost}/{name}", delete)
