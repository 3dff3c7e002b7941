"""/api/definitions: export (GET) and import (POST), administrators only.

An import is checked as ``roost definitions import`` checks it
(``definitions_import``): a body that is not definitions is refused with
400 before anything of it is applied."""

from __future__ import annotations

from aiohttp import web

from roost.http.common import (
    bad_request,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    require_admin,
)
from roost.store import definitions, definitions_import


async def get(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(definitions.export(broker_of(request)))


async def post(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    data = await json_body(request)
    try:
        problems = definitions_import.import_into(broker, data)
    except definitions.DefinitionsError as exc:
        bad_request(str(exc))
    await definitions_saved(broker)
    if problems:
        # As `roost definitions import` exits 1: the rest is imported.
        bad_request("; ".join(problems))
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/definitions", get)
    app.router.add_post("/api/definitions", post)
