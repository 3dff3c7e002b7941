"""Cross-site request forgery and framing: what another site's page could
make a logged-in browser send is refused, and every response forbids
framing. Real broker, real HTTP requests."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from roost.testing import RoostBroker
from tests.http.test_management_api import call

_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def _send(
    rb: RoostBroker, path: str, method: str, data: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(rb.http_url + path, method=method, data=data)
    req.add_header("Authorization", _AUTH)
    for name, value in headers.items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def _queue_length(rb: RoostBroker, name: str) -> int:
    status, data = call(rb, f"/api/queues/%2F/{name}")
    assert status == 200
    return int(data["messages"])


PUBLISH = json.dumps({"routing_key": "q", "payload": "x", "properties": {}}).encode()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_form_or_text_post_is_refused_and_has_no_effect(
    roost_broker: RoostBroker, content_type: str
) -> None:
    assert call(roost_broker, "/api/queues/%2F/q", "PUT", {})[0] == 201
    status, _ = _send(
        roost_broker,
        "/api/exchanges/%2F/amq.default/publish",
        "POST",
        PUBLISH,
        {"Content-Type": content_type},
    )
    assert status == 415
    assert _queue_length(roost_broker, "q") == 0


def test_post_without_content_type_or_body_is_refused(roost_broker: RoostBroker) -> None:
    # fetch(url, {method: "POST", mode: "no-cors"}) from another site.
    assert call(roost_broker, "/api/queues/%2F/q", "PUT", {})[0] == 201
    assert _send(roost_broker, "/api/queues/%2F/q/get", "POST", None, {})[0] == 415


def test_json_or_x_requested_with_is_accepted(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/queues/%2F/q", "PUT", {})[0] == 201
    path = "/api/exchanges/%2F/amq.default/publish"
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    assert _send(roost_broker, path, "POST", PUBLISH, json_type)[0] == 200
    xrw = {"X-Requested-With": "XMLHttpRequest", "Content-Type": "text/plain"}
    assert _send(roost_broker, path, "POST", PUBLISH, xrw)[0] == 200
    assert _queue_length(roost_broker, "q") == 2


def test_bodiless_put_and_delete_need_no_content_type(roost_broker: RoostBroker) -> None:
    # No other site can send a PUT or DELETE without a CORS preflight.
    assert _send(roost_broker, "/api/queues/%2F/q2", "PUT", None, {})[0] == 201
    assert _send(roost_broker, "/api/queues/%2F/q2", "DELETE", None, {})[0] == 204


@pytest.mark.parametrize("path", ["/", "/dashboard/app.js", "/api/overview", "/api/nosuch"])
def test_every_response_forbids_framing(roost_broker: RoostBroker, path: str) -> None:
    _, headers = _send(roost_broker, path, "GET", None, {})
    assert headers["X-Frame-Options"] == "DENY"
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp
