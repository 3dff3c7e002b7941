"""The management HTTP API against a real in-process broker, with urllib
(exact status codes and JSON) and amqpstorm's management client."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import pika
import pytest

from roost.cli import main
from roost.testing import RoostBroker

pytest.importorskip("requests")  # amqpstorm.management needs it
from amqpstorm.management.api import ManagementApi
from amqpstorm.management.exception import ApiError


def call(
    broker: RoostBroker,
    path: str,
    method: str = "GET",
    body: Any = None,
    auth: str | None = "guest:guest",
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(broker.http_url + path, method=method, data=data)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    return status, json.loads(raw) if raw else None


def saved_definitions(broker: RoostBroker) -> dict[str, Any]:
    """The data directory's definitions.json, as the store last wrote it."""
    assert broker.server is not None
    path = Path(broker.server.config.data_dir) / "definitions.json"
    return cast("dict[str, Any]", json.loads(path.read_text()))


def add_user(broker: RoostBroker, name: str, tags: tuple[str, ...]) -> None:
    srv = broker.server
    assert srv is not None
    broker.call(lambda: srv.broker.users.add(name, name, tags))
    broker.call(lambda: srv.broker.permissions.__setitem__((name, "/"), (".*", ".*", ".*")))


def test_overview(roost_broker: RoostBroker) -> None:
    status, data = call(roost_broker, "/api/overview")
    assert status == 200
    assert data["product_name"] == "roost"
    assert data["management_version"] == data["rabbitmq_version"]
    assert data["object_totals"]["queues"] == 0
    exchanges = call(roost_broker, "/api/exchanges")[1]
    assert data["object_totals"]["exchanges"] == len(exchanges) > 0
    assert data["queue_totals"]["messages"] == 0
    protocols = {(lst["protocol"], lst["port"]) for lst in data["listeners"]}
    assert ("amqp", roost_broker.port) in protocols
    assert ("http", roost_broker.http_port) in protocols
    assert data["node"].startswith("roost@")


def test_login_failed_and_missing_auth(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/overview", auth="guest:wrong") == (
        401,
        {"error": "not_authorized", "reason": "Login failed"},
    )
    assert call(roost_broker, "/api/overview", auth=None)[0] == 401


def test_user_without_management_tag_is_refused(roost_broker: RoostBroker) -> None:
    add_user(roost_broker, "plain", ())
    assert call(roost_broker, "/api/queues", auth="plain:plain") == (
        401,
        {"error": "not_authorised", "reason": "Not management user"},
    )


def test_management_user_cannot_list_users(roost_broker: RoostBroker) -> None:
    add_user(roost_broker, "mgr", ("management",))
    status, me = call(roost_broker, "/api/whoami", auth="mgr:mgr")
    assert (status, me) == (200, {"name": "mgr", "tags": ["management"]})
    assert call(roost_broker, "/api/users", auth="mgr:mgr")[0] == 401
    assert call(roost_broker, "/api/queues", auth="mgr:mgr") == (200, [])


def test_whoami_users_permissions_vhosts(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/whoami") == (200, {"name": "guest", "tags": ["administrator"]})
    status, users = call(roost_broker, "/api/users")
    assert status == 200
    assert [(u["name"], u["tags"]) for u in users] == [("guest", ["administrator"])]
    assert users[0]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert call(roost_broker, "/api/permissions") == (
        200,
        [{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
    )
    status, vhosts = call(roost_broker, "/api/vhosts")
    assert status == 200 and [v["name"] for v in vhosts] == ["/"]


def test_queue_put_get_delete(roost_broker: RoostBroker) -> None:
    path = "/api/queues/%2F/hq"
    assert call(roost_broker, path, "PUT", {"durable": True, "arguments": {"x-max-length": 5}}) == (
        201,
        None,
    )
    assert call(roost_broker, path, "PUT", {"durable": True, "arguments": {"x-max-length": 5}}) == (
        204,
        None,
    )
    status, q = call(roost_broker, path)
    assert status == 200
    assert (q["name"], q["vhost"], q["durable"], q["auto_delete"], q["exclusive"]) == (
        "hq",
        "/",
        True,
        False,
        False,
    )
    assert q["arguments"] == {"x-max-length": 5}
    assert (q["messages"], q["consumers"], q["state"]) == (0, 0, "running")
    assert call(roost_broker, path, "DELETE") == (204, None)
    assert call(roost_broker, path) == (404, {"error": "Object Not Found", "reason": "Not Found"})
    assert call(roost_broker, path, "DELETE")[0] == 404


def test_queue_put_inequivalent_is_bad_request(roost_broker: RoostBroker) -> None:
    call(roost_broker, "/api/queues/%2F/iq", "PUT", {"durable": False})
    assert call(roost_broker, "/api/queues/%2F/iq", "PUT", {"durable": True}) == (
        400,
        {
            "error": "bad_request",
            "reason": "inequivalent arg 'durable' for queue 'iq' in vhost '/': "
            "received 'true' but current is 'false'",
        },
    )


def test_bad_json_and_unknown_vhost(roost_broker: RoostBroker) -> None:
    req = urllib.request.Request(
        roost_broker.http_url + "/api/exchanges/%2F/x", method="PUT", data=b"notjson"
    )
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400
    assert json.loads(err.value.read()) == {"error": "bad_request", "reason": "not_json"}
    assert call(roost_broker, "/api/queues/nosuch")[0] == 404


def test_exchanges(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/exchanges/%2F/hx", "PUT", {"type": "topic"})[0] == 201
    status, ex = call(roost_broker, "/api/exchanges/%2F/hx")
    assert status == 200
    assert (ex["type"], ex["durable"], ex["internal"], ex["vhost"]) == ("topic", False, False, "/")
    status, listed = call(roost_broker, "/api/exchanges/%2F")
    assert "" in [e["name"] for e in listed] and "hx" in [e["name"] for e in listed]
    assert call(roost_broker, "/api/exchanges/%2F/amq.default")[1]["name"] == ""
    assert call(roost_broker, "/api/exchanges/%2F/hx", "PUT", {"type": "bogus"}) == (
        400,
        {"error": "bad_request", "reason": "unknown exchange type 'bogus'"},
    )
    assert call(roost_broker, "/api/exchanges/%2F/amq.direct", "DELETE") == (
        401,
        {"error": "not_authorised", "reason": "Access refused."},
    )
    assert call(roost_broker, "/api/exchanges/%2F/hx", "DELETE") == (204, None)
    assert call(roost_broker, "/api/exchanges/%2F/hx", "DELETE")[0] == 404


def test_bindings_and_purge(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        ch.queue_declare("bq")
        ch.queue_bind("bq", "amq.topic", "a.#")
        for i in range(3):
            ch.basic_publish("", "bq", str(i).encode())
        ch.queue_declare("bq", passive=True)  # a round trip: publishes are in
        status, bindings = call(roost_broker, "/api/bindings")
        assert status == 200
        assert {(b["source"], b["destination"], b["routing_key"]) for b in bindings} == {
            ("", "bq", "bq"),
            ("amq.topic", "bq", "a.#"),
        }
        assert all(b["destination_type"] == "queue" and b["vhost"] == "/" for b in bindings)
        assert call(roost_broker, "/api/queues/%2F/bq")[1]["messages_ready"] == 3
        assert call(roost_broker, "/api/queues/%2F/bq/contents", "DELETE") == (204, None)
        assert ch.queue_declare("bq", passive=True).method.message_count == 0
    finally:
        conn.close()


def test_health_checks(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/aliveness-test/%2F") == (200, {"status": "ok"})
    assert call(roost_broker, "/api/aliveness-test/nosuch")[0] == 404
    assert call(roost_broker, "/api/healthchecks/node") == (200, {"status": "ok"})
    assert call(roost_broker, "/api/health/checks/alarms") == (200, {"status": "ok"})
    srv = roost_broker.server
    assert srv is not None
    roost_broker.call(lambda: srv.broker.set_alarm("memory"))
    status, data = call(roost_broker, "/api/health/checks/alarms")
    assert status == 503 and data["status"] == "failed"
    assert [a["resource"] for a in data["alarms"]] == ["memory"]


def test_definitions_export_and_import(roost_broker: RoostBroker) -> None:
    call(roost_broker, "/api/queues/%2F/dq", "PUT", {"durable": True})
    status, defs = call(roost_broker, "/api/definitions")
    assert status == 200
    assert [q["name"] for q in defs["queues"]] == ["dq"]
    defs["queues"].append(
        {"name": "imported", "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}
    )
    assert call(roost_broker, "/api/definitions", "POST", defs) == (204, None)
    assert call(roost_broker, "/api/queues/%2F/imported")[1]["durable"] is True


# Bodies `roost definitions import` refuses; each has a good entry before the
# bad one, which an import that does not check everything first applies.
REFUSED_DEFINITIONS = [
    {
        "users": [{"name": "mallory", "password": "x", "tags": "administrator"}],
        "queues": "nope",
    },
    {
        "queues": [
            {"name": "first-q", "vhost": "/", "durable": True},
            {"name": "second-q", "vhost": "/", "durable": "yes"},
        ]
    },
    {"vhosts": [{"name": "v-ok"}, {"nom": "v-bad"}]},
    {
        "exchanges": [{"name": "x-ok", "vhost": "/", "type": "fanout"}],
        "bindings": [{"source": "x-ok", "destination": 5}],
    },
    {"hello": 1},
]


@pytest.mark.parametrize("body", REFUSED_DEFINITIONS)
def test_definitions_import_refuses_what_the_cli_refuses_and_changes_nothing(
    roost_broker: RoostBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: dict[str, Any],
) -> None:
    path = tmp_path / "defs.json"
    path.write_text(json.dumps(body))
    assert main(["definitions", "import", "--data-dir", str(tmp_path / "data"), str(path)]) == 2
    cli_message = capsys.readouterr().err
    before = call(roost_broker, "/api/definitions")[1]

    status, reply = call(roost_broker, "/api/definitions", "POST", body)
    assert status == 400
    assert reply["error"] == "bad_request"
    assert reply["reason"].startswith("not a definitions file: ")
    assert cli_message == f"roost: {path} is {reply['reason']}\n"
    assert call(roost_broker, "/api/definitions")[1] == before
    assert call(roost_broker, "/api/queues/%2F/first-q")[0] == 404
    assert call(roost_broker, "/api/exchanges/%2F/x-ok")[0] == 404


def test_definitions_import_problems_are_a_400_and_the_rest_is_imported(
    roost_broker: RoostBroker,
) -> None:
    # As `roost definitions import` (which exits 1): what only applying
    # finds is reported, and the rest is imported and saved.
    ttl = {"durable": True, "arguments": {"x-message-ttl": 1000}}
    assert call(roost_broker, "/api/queues/%2F/clash-q", "PUT", ttl)[0] == 201
    body = {
        "queues": [
            {"name": "clash-q", "vhost": "/", "durable": True, "arguments": {}},
            {"name": "after-clash", "vhost": "/", "durable": True},
        ]
    }
    status, reply = call(roost_broker, "/api/definitions", "POST", body)
    assert status == 400
    assert reply["error"] == "bad_request"
    assert "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl'" in reply["reason"]
    assert call(roost_broker, "/api/queues/%2F/after-clash")[1]["durable"] is True
    assert "after-clash" in [q["name"] for q in saved_definitions(roost_broker)["queues"]]


def test_definitions_import_is_saved_and_ignores_another_data_dirs_queue_ids(
    roost_broker: RoostBroker,
) -> None:
    body = {
        "users": [{"name": "imported-user", "password": "pw", "tags": "management"}],
        "queues": [{"name": "ids-q", "vhost": "/", "durable": True}],
        # A data directory's own file: its log ids belong to that directory.
        "roost": {"next_queue_id": 1_000_000, "queue_ids": [["/", "ids-q", 4242]]},
    }
    assert call(roost_broker, "/api/definitions", "POST", body) == (204, None)
    # Saved before the reply, as the other writes of the API are.
    saved = saved_definitions(roost_broker)
    assert "imported-user" in [u["name"] for u in saved["users"]]
    assert "ids-q" in [q["name"] for q in saved["queues"]]
    srv = roost_broker.server
    assert srv is not None
    store_id, next_id = roost_broker.call(
        lambda: (srv.broker.vhosts["/"].queues["ids-q"].store_id, srv.broker.next_queue_id)
    )
    assert store_id != 4242
    assert next_id < 1_000_000


def test_http_port_off() -> None:
    with RoostBroker(http_port=-1) as broker:
        assert broker.http_port == 0


def test_amqpstorm_management_client(roost_broker: RoostBroker) -> None:
    api = ManagementApi(roost_broker.http_url, "guest", "guest", timeout=5)
    assert api.overview()["product_name"] == "roost"
    api.queue.declare("stormq", durable=True)
    assert [q["name"] for q in api.queue.list()] == ["stormq"]
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", "stormq", b"one")
        ch.basic_publish("", "stormq", b"two")
    finally:
        conn.close()
    deadline = time.monotonic() + 2
    while api.queue.get("stormq")["messages"] != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.queue.get("stormq")["messages"] == 2
    api.queue.delete("stormq")
    with pytest.raises(ApiError) as err:
        api.queue.get("stormq")
    assert err.value.error_code == 404


def test_queue_list_pagination_and_name_filter(roost_broker: RoostBroker) -> None:
    for name in ("pa", "pb", "pc", "other"):
        call(roost_broker, f"/api/queues/%2F/{name}", "PUT", {})
    status, page = call(roost_broker, "/api/queues/%2F?page=2&page_size=1&name=p")
    assert status == 200
    assert (page["page"], page["page_count"], page["page_size"]) == (2, 3, 1)
    assert (page["total_count"], page["filtered_count"], page["item_count"]) == (4, 3, 1)
    assert [q["name"] for q in page["items"]] == ["pb"]
    status, found = call(roost_broker, "/api/queues?name=^p[ab]$&use_regex=true")
    assert [q["name"] for q in found] == ["pa", "pb"]


def test_queue_memory_grows_with_its_messages(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    ch.queue_declare("memq")
    status, before = call(roost_broker, "/api/queues/%2F/memq")
    assert status == 200 and before["memory"] == 0
    for _ in range(10):
        ch.basic_publish("", "memq", b"x" * 1000)
    ch.queue_declare("memq", passive=True)  # a round trip: the publishes are in
    _, after = call(roost_broker, "/api/queues/%2F/memq")
    assert after["messages_ready"] == 10
    assert after["memory"] >= 10 * 1000
    conn.close()
