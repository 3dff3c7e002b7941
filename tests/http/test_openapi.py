"""GET /api/openapi.json describes every endpoint roost serves."""

from __future__ import annotations

import base64
import json
import urllib.request

from roost.broker.broker import Broker
from roost.http.app import build_app
from roost.testing import RoostBroker


def _routes() -> set[tuple[str, str]]:
    app = build_app(Broker())
    out = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        # The API and the metrics; the dashboard's pages are not API.
        if route.method != "HEAD" and path.startswith(("/api/", "/metrics")):
            out.add((route.method.lower(), path))
    return out


def _fetch(broker: RoostBroker) -> dict[str, object]:
    req = urllib.request.Request(broker.http_url + "/api/openapi.json")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        data: dict[str, object] = json.loads(resp.read())
    return data


def test_openapi_lists_every_route(roost_broker: RoostBroker) -> None:
    doc = _fetch(roost_broker)
    assert doc["openapi"] == "3.0.3"
    paths = doc["paths"]
    assert isinstance(paths, dict)
    documented = {(m, p) for p, ops in paths.items() for m in ops}
    routes = _routes()
    assert routes - documented == set(), "routes missing from the OpenAPI description"
    assert documented - routes == set(), "documented endpoints that are not served"


def test_openapi_path_parameters(roost_broker: RoostBroker) -> None:
    paths = _fetch(roost_broker)["paths"]
    assert isinstance(paths, dict)
    op = paths["/api/permissions/{vhost}/{user}"]["put"]
    assert [p["name"] for p in op["parameters"]] == ["vhost", "user"]
    assert op["security"] == [{"basic": []}]
    assert "security" not in paths["/metrics"]["get"]
