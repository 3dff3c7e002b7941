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
from roost.http.cluster_view import ClusterView
from roost.http.common import (
    BROKER,
    CURRENT_USER,
    INFO,
    MANAGEMENT_TAGS,
    HTTPError,
    error,
    login,
)
from roost.http.limits import bounded
from roost.http.metrics import MetricsOptions, register_metrics
from roost.http.nodes import ClusterNodes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_MAX_BODY = 20 * 1024 * 1024
_REALM = {"WWW-Authenticate": 'Basic realm="RabbitMQ Management"'}
# Sent with every response: no page of ours in another site's frame
# (clickjacking), and the dashboard runs only its own script and styles.
_SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _cross_site_proof(request: web.Request) -> bool:
    """Whether a request that changes state cannot have been sent by
    another site's form or script on behalf of a logged-in browser: those
    can send only GET and POST with a form or text/plain body and no custom
    headers (anything else needs a CORS preflight, which is never granted).
    So a JSON body or an X-Requested-With header is required, except for a
    PUT or DELETE without a body."""
    if request.method in _SAFE_METHODS or "X-Requested-With" in request.headers:
        return True
    if request.content_type == "application/json":
        return True
    return request.method in ("PUT", "DELETE") and not request.body_exists


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def _api(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Basic auth for every /api/ request, and errors as RabbitMQ words
    them. Other routes (/metrics) are left to their handlers."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    broker = request.app[BROKER]
    # No basic-auth challenge for the dashboard's own calls (it sends
    # X-Requested-With): the browser would pop up its login dialog (and a
    # headless one would hang) instead of letting the page show the error.
    realm = {} if request.headers.get("X-Requested-With") == "XMLHttpRequest" else _REALM
    try:
        user = login(broker, request.headers.get("Authorization"), request.remote or "")
    except HTTPError as exc:
        return error(exc.status, exc.error, exc.reason, **realm)
    if not MANAGEMENT_TAGS.intersection(user.tags):
        return error(401, "not_authorised", "Not management user", **realm)
    if not _cross_site_proof(request):
        return error(
            415,
            "unsupported_media_type",
            "a request that changes state needs Content-Type: application/json "
            "(or an X-Requested-With header)",
        )
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
    node_name: str | None = None,
    cluster_nodes: ClusterNodes | None = None,
    cluster_view: ClusterView | None = None,
    cluster_metrics: Callable[[], Awaitable[str]] | None = None,
) -> web.Application:
    """The management API over ``broker``; ``listeners`` (protocol,
    ip_address, port) are reported by /api/overview, ``data_dir`` (whose
    file system's free space is reported) and ``started`` (a time.time())
    by /api/nodes; ``client_max_size`` bounds request bodies (0: no
    bound). In cluster mode ``node_name`` is this node's name and
    ``cluster_nodes`` lists the live nodes for /api/nodes, ``cluster_view``
    the other nodes' connections, channels, consumers and queue figures,
    ``cluster_metrics`` the node's cluster series for /metrics."""
    app = web.Application(
        middlewares=[bounded, _api], client_max_size=client_max_size or sys.maxsize
    )
    app.on_response_prepare.append(_security_headers)
    app[BROKER] = broker
    app[INFO] = {
        "node": node_name or f"roost@{socket.gethostname()}",
        "cluster_nodes": cluster_nodes,
        "cluster": cluster_view,
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
    register_metrics(app, broker, metrics or MetricsOptions(), cluster_metrics)
    # The web dashboard at / (static files; the browser calls the API).
    from roost.http import dashboard

    dashboard.register(app)
    return app
