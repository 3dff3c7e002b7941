"""The management API's aiohttp application, served by the broker's own
event loop (handlers use the broker directly, as connections do)."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from roost.broker.broker import Broker
from roost.broker.errors import ACCESS_REFUSED, NOT_FOUND, BrokerError
from roost.http import (
    access,
    admin,
    bindings,
    connections,
    definitions,
    exchanges,
    messages,
    nodes,
    openapi,
    overview,
    queues,
)
from roost.http.common import (
    BROKER,
    CURRENT_USER,
    INFO,
    MANAGEMENT_TAGS,
    HTTPError,
    authenticate,
    error,
)
from roost.http.limits import bounded
from roost.http.metrics import MetricsOptions, register_metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_MAX_BODY = 20 * 1024 * 1024
_REALM = {"WWW-Authenticate": 'Basic realm="RabbitMQ Management"'}


@web.middleware
async def _api(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Basic auth for every /api/ request, and errors as RabbitMQ words
    them. Other routes (/metrics) are left to their handlers."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    broker = request.app[BROKER]
    user = authenticate(broker, request.headers.get("Authorization"))
    # No basic-auth challenge for the dashboard's own calls (it sends
    # X-Requested-With): the browser would pop up its login dialog (and a
    # headless one would hang) instead of letting the page show the error.
    realm = {} if request.headers.get("X-Requested-With") == "XMLHttpRequest" else _REALM
    if user is None:
        return error(401, "not_authorized", "Login failed", **realm)
    if not MANAGEMENT_TAGS.intersection(user.tags):
        return error(401, "not_authorised", "Not management user", **realm)
    CURRENT_USER.set(user)
    try:
        return await handler(request)
    except HTTPError as exc:
        return error(exc.status, exc.error, exc.reason)
    except BrokerError as exc:
        if exc.code == NOT_FOUND:
            return error(404, "Object Not Found", "Not Found")
        if exc.code == ACCESS_REFUSED:
            return error(401, "not_authorised", "Access refused.")
        return error(400, "bad_request", exc.text)
    except web.HTTPNotFound:
        return error(404, "Object Not Found", "Not Found")
    except web.HTTPMethodNotAllowed:
        return error(405, "Method Not Allowed", "Method Not Allowed")
    except web.HTTPRequestEntityTooLarge as exc:
        # Raised by request.read()/json() past client_max_size.
        return error(413, "request_entity_too_large", exc.text or "Request body too large")


def build_app(
    broker: Broker,
    listeners: list[dict[str, Any]] | None = None,
    data_dir: str | None = None,
    started: float | None = None,
    client_max_size: int = DEFAULT_MAX_BODY,
    metrics: MetricsOptions | None = None,
) -> web.Application:
    """The management API over ``broker``; ``listeners`` (protocol,
    ip_address, port) are reported by /api/overview, ``data_dir`` (whose
    file system's free space is reported) and ``started`` (a time.time())
    by /api/nodes; ``client_max_size`` bounds request bodies (0: no
    bound)."""
    app = web.Application(
        middlewares=[bounded, _api], client_max_size=client_max_size or sys.maxsize
    )
    app[BROKER] = broker
    app[INFO] = {
        "node": f"roost@{socket.gethostname()}",
        "listeners": listeners or [],
        "data_dir": data_dir or ".",
        "started": time.time() if started is None else started,
    }
    for module in (
        overview,
        nodes,
        access,
        admin,
        exchanges,
        queues,
        bindings,
        messages,
        connections,
        definitions,
        openapi,
    ):
        module.register(app)
    register_metrics(app, broker, metrics or MetricsOptions())
    # The web dashboard at / (static files; the browser calls the API).
    from roost.http import dashboard

    dashboard.register(app)
    return app
