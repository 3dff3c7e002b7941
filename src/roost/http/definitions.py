"""/api/definitions: export (GET) and import (POST), administrators only."""

from __future__ import annotations

from aiohttp import web

from roost.http.common import bad_request, broker_of, json_body, json_response, require_admin
from roost.store import definitions


async def get(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(definitions.export(broker_of(request)))


async def post(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    data = await json_body(request)
    try:
        problems = definitions.apply(broker, data)
    except definitions.DefinitionsError as exc:
        bad_request(str(exc))
    # Users and permissions are not vhost definitions: make sure the store
    # saves them too.
    broker.definitions_changed()
    if problems:
        bad_request("; ".join(problems))
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/definitions", get)
    app.router.add_post("/api/definitions", post)
