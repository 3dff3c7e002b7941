"""The web dashboard: static HTML, JS and CSS shipped in the package
(no build step, no CDN), talking to the management API from the browser.
Served at ``/`` and ``/dashboard/<file>`` without authentication: the page
itself holds no data, the API calls it makes carry the user's basic auth."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("dashboard")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


async def index(request: web.Request) -> web.StreamResponse:
    return _file("index.html")


async def asset(request: web.Request) -> web.StreamResponse:
    return _file(request.match_info["file"])


def _file(name: str) -> web.StreamResponse:
    path = STATIC / name
    # Only the files shipped in the directory itself: no "..", no subpaths.
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


def register(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/dashboard/{file}", asset)
