"""Management API: message rates, connections, channels and consumers,
against a real in-process broker with pika clients."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pika
import pika.exceptions
import pytest

from roost.testing import RoostBroker


def call(
    broker: RoostBroker,
    path: str,
    method: str = "GET",
    body: Any = None,
    auth: str = "guest:guest",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(broker.http_url + path, method=method, data=data)
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    return status, json.loads(raw) if raw else None, hdrs


def wait_for(check: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def connect(broker: RoostBroker, name: str = "test-conn") -> pika.BlockingConnection:
    params = pika.URLParameters(broker.url)
    params.client_properties = {"connection_name": name}
    return pika.BlockingConnection(params)


def sample(broker: RoostBroker) -> None:
    srv = broker.server
    assert srv is not None
    broker.call(srv.broker.stats.sample)


# -- message_stats -----------------------------------------------------------


def test_message_stats_counts_and_rates(roost_broker: RoostBroker) -> None:
    conn = connect(roost_broker)
    ch = conn.channel()
    ch.queue_declare("stats-q")
    ch.exchange_declare("stats-x", "fanout")
    ch.queue_bind("stats-q", "stats-x")
    sample(roost_broker)
    for _ in range(3):
        ch.basic_publish("stats-x", "", b"m")
    ch.basic_publish("", "stats-q", b"direct")
    wait_for(lambda: call(roost_broker, "/api/queues/%2F/stats-q")[1]["messages"] == 4)
    sample(roost_broker)

    _, queue, _ = call(roost_broker, "/api/queues/%2F/stats-q")
    assert queue["message_stats"]["publish"] == 4
    assert queue["message_stats"]["publish_details"]["rate"] > 0
    listed = [x for x in call(roost_broker, "/api/queues")[1] if x["name"] == "stats-q"]
    assert listed[0]["message_stats"]["publish"] == 4

    _, ex, _ = call(roost_broker, "/api/exchanges/%2F/stats-x")
    assert ex["message_stats"]["publish_in"] == 3
    assert ex["message_stats"]["publish_in_details"]["rate"] > 0
    # As RabbitMQ: no message_stats for an exchange nothing was published to.
    _, idle, _ = call(roost_broker, "/api/exchanges/%2F/amq.topic")
    assert "message_stats" not in idle

    _, vhost, _ = call(roost_broker, "/api/vhosts/%2F")
    assert vhost["message_stats"]["publish"] == 4
    assert vhost["message_stats"]["publish_details"]["rate"] > 0
    listed = call(roost_broker, "/api/vhosts")[1]
    assert listed[0]["message_stats"]["publish"] == 4

    method, _, body = ch.basic_get("stats-q", auto_ack=False)
    assert method is not None and body == b"m"
    ch.basic_ack(method.delivery_tag)
    _, overview, _ = call(roost_broker, "/api/overview")
    stats = overview["message_stats"]
    assert stats["publish"] == 4
    assert stats["publish_details"]["rate"] > 0
    wait_for(lambda: call(roost_broker, "/api/overview")[1]["message_stats"]["ack"] == 1)
    assert stats["deliver_get"] == 1
    conn.close()


# -- connections, channels, consumers ---------------------------------------


def _only(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, items
    return found[0]


def test_connections_channels_consumers(roost_broker: RoostBroker) -> None:
    conn = connect(roost_broker, "my-conn")
    ch = conn.channel()
    ch.basic_qos(prefetch_count=7)
    ch.confirm_delivery()
    ch.queue_declare("cq")
    ch.basic_consume("cq", lambda *a: None, consumer_tag="ctag1", arguments={"x-priority": 3})
    ch2 = conn.channel()
    ch2.tx_select()

    _, conns, _ = call(roost_broker, "/api/connections")
    c = _only(conns, user_provided_name="my-conn")
    local = f"127.0.0.1:{roost_broker.port}"
    peer_port = conn._impl.socket.getsockname()[1] if hasattr(conn._impl, "socket") else None
    assert c["name"].endswith(" -> " + local)
    assert c["name"] == f"{c['peer_host']}:{c['peer_port']} -> {local}"
    if peer_port is not None:
        assert c["peer_port"] == peer_port
    assert c["user"] == "guest"
    assert c["vhost"] == "/"
    assert c["channels"] == 2
    assert c["state"] == "running"
    assert c["peer_host"] == "127.0.0.1"
    assert c["client_properties"]["connection_name"] == "my-conn"
    assert c["protocol"] == "AMQP 0-9-1"

    status, one, _ = call(roost_broker, "/api/connections/" + q(c["name"]))
    assert status == 200 and one["name"] == c["name"]
    assert call(roost_broker, "/api/vhosts/%2F/connections")[1][0]["name"] == c["name"]
    assert call(roost_broker, "/api/connections/nope")[0] == 404

    _, chans, _ = call(roost_broker, "/api/channels")
    first = _only(chans, number=1)
    assert first["name"] == c["name"] + " (1)"
    assert first["consumer_count"] == 1
    assert first["prefetch_count"] == 7
    assert first["confirm"] is True
    assert first["transactional"] is False
    assert first["messages_unacknowledged"] == 0
    assert first["connection_details"]["name"] == c["name"]
    second = _only(chans, number=2)
    assert second["transactional"] is True and second["confirm"] is False
    _, shown, _ = call(roost_broker, "/api/channels/" + q(first["name"]))
    assert [x["consumer_tag"] for x in shown["consumer_details"]] == ["ctag1"]
    assert len(call(roost_broker, "/api/vhosts/%2F/channels")[1]) == 2
    per_conn = call(roost_broker, "/api/connections/" + q(c["name"]) + "/channels")[1]
    assert [x["number"] for x in per_conn] == [1, 2]

    _, consumers, _ = call(roost_broker, "/api/consumers")
    cons = _only(consumers, consumer_tag="ctag1")
    assert cons["queue"] == {"name": "cq", "vhost": "/"}
    assert cons["channel_details"]["name"] == first["name"]
    assert cons["channel_details"]["connection_name"] == c["name"]
    assert cons["ack_required"] is True
    assert cons["prefetch_count"] == 7
    assert cons["exclusive"] is False
    assert cons["arguments"] == {"x-priority": 3}
    assert call(roost_broker, "/api/consumers/%2F")[1] == consumers
    assert call(roost_broker, "/api/consumers/nope")[0] == 404
    conn.close()


def test_delete_connection_closes_it_with_reason(roost_broker: RoostBroker) -> None:
    conn = connect(roost_broker, "doomed")
    _, conns, _ = call(roost_broker, "/api/connections")
    name = _only(conns, user_provided_name="doomed")["name"]
    status, _, _ = call(
        roost_broker,
        "/api/connections/" + q(name),
        method="DELETE",
        headers={"X-Reason": "bye now"},
    )
    assert status == 204
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            conn.process_data_events(0.05)
    assert info.value.reply_code == 320
    assert info.value.reply_text == "CONNECTION_FORCED - bye now"
    wait_for(lambda: call(roost_broker, "/api/connections")[1] == [])
    assert call(roost_broker, "/api/connections/" + q(name))[0] == 404


def test_connections_of_other_users_hidden(roost_broker: RoostBroker) -> None:
    srv = roost_broker.server
    assert srv is not None
    broker = srv.broker
    roost_broker.call(lambda: broker.users.add("mgmt", "mgmt", ("management",)))
    roost_broker.call(lambda: broker.permissions.__setitem__(("mgmt", "/"), (".*", ".*", ".*")))
    conn = connect(roost_broker, "guest-conn")
    assert len(call(roost_broker, "/api/connections")[1]) == 1
    assert call(roost_broker, "/api/connections", auth="mgmt:mgmt")[1] == []
    assert call(roost_broker, "/api/channels", auth="mgmt:mgmt")[1] == []
    conn.close()


# -- bindings ------------------------------------------------------------------


def test_binding_create_show_delete(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/queues/%2F/bq", "PUT", {})[0] == 201
    base = "/api/bindings/%2F/e/amq.direct/q/bq"
    status, _, headers = call(roost_broker, base, "POST", {"routing_key": "a~b%c"})
    assert status == 201
    assert headers["Location"] == "bq/a%257Eb%2525c"
    status, _, headers = call(
        roost_broker, base, "POST", {"routing_key": "", "arguments": {"x": 1}}
    )
    assert status == 201
    _, listed, _ = call(roost_broker, base)
    by_key = {b["routing_key"]: b for b in listed}
    assert by_key["a~b%c"]["properties_key"] == "a%7Eb%25c"
    with_args = by_key[""]["properties_key"]
    assert with_args.startswith("~") and len(with_args) > 1
    assert headers["Location"] == "bq/" + with_args
    assert by_key[""]["arguments"] == {"x": 1}

    # The binding routes.
    conn = connect(roost_broker)
    ch = conn.channel()
    ch.basic_publish("amq.direct", "a~b%c", b"routed")
    wait_for(lambda: call(roost_broker, "/api/queues/%2F/bq")[1]["messages"] == 1)

    status, shown, _ = call(roost_broker, base + "/" + q("a%7Eb%25c"))
    assert status == 200 and shown["routing_key"] == "a~b%c"
    assert call(roost_broker, base + "/nope")[0] == 404
    assert call(roost_broker, base + "/" + q("a%7Eb%25c"), "DELETE")[0] == 204
    assert call(roost_broker, base + "/" + q("a%7Eb%25c"))[0] == 404
    assert call(roost_broker, base + "/" + q(with_args), "DELETE")[0] == 204
    assert call(roost_broker, base)[1] == []
    # A missing queue lists nothing but cannot be bound, as in RabbitMQ.
    assert call(roost_broker, "/api/bindings/%2F/e/amq.direct/q/nope")[:2] == (200, [])
    assert call(roost_broker, "/api/bindings/%2F/e/amq.direct/q/nope", "POST", {})[0] == 404
    conn.close()


def test_exchange_to_exchange_binding(roost_broker: RoostBroker) -> None:
    call(roost_broker, "/api/exchanges/%2F/src-x", "PUT", {"type": "fanout"})
    call(roost_broker, "/api/exchanges/%2F/dst-x", "PUT", {"type": "fanout"})
    call(roost_broker, "/api/queues/%2F/eq", "PUT", {})
    call(roost_broker, "/api/bindings/%2F/e/dst-x/q/eq", "POST", {})
    status, _, headers = call(roost_broker, "/api/bindings/%2F/e/src-x/e/dst-x", "POST", {})
    assert status == 201 and headers["Location"] == "dst-x/~"
    _, listed, _ = call(roost_broker, "/api/bindings/%2F/e/src-x/e/dst-x")
    assert [(b["destination_type"], b["properties_key"]) for b in listed] == [("exchange", "~")]
    src = call(roost_broker, "/api/exchanges/%2F/src-x/bindings/source")[1]
    assert [b["destination"] for b in src] == ["dst-x"]
    dst = call(roost_broker, "/api/exchanges/%2F/dst-x/bindings/destination")[1]
    assert [b["source"] for b in dst] == ["src-x"]
    qb = call(roost_broker, "/api/queues/%2F/eq/bindings")[1]
    assert [b["source"] for b in qb] == ["", "dst-x"]

    conn = connect(roost_broker)
    conn.channel().basic_publish("src-x", "", b"through")
    wait_for(lambda: call(roost_broker, "/api/queues/%2F/eq")[1]["messages"] == 1)
    assert call(roost_broker, "/api/bindings/%2F/e/src-x/e/dst-x/~", "DELETE")[0] == 204
    assert call(roost_broker, "/api/bindings/%2F/e/src-x/e/dst-x")[1] == []
    conn.close()


# -- users, vhosts, permissions ------------------------------------------------


def _saved_definitions(broker: RoostBroker) -> dict[str, Any]:
    assert broker.server is not None
    path = Path(broker.server.config.data_dir) / "definitions.json"
    return cast("dict[str, Any]", json.loads(path.read_text()))


def test_users_put_delete(roost_broker: RoostBroker) -> None:
    status, body, _ = call(roost_broker, "/api/users/alice", "PUT", {"password": "pw"})
    assert (status, body) == (400, {"error": "bad_request", "reason": "tags_not_present"})
    body = {"password": "pw", "tags": "management,monitoring"}
    assert call(roost_broker, "/api/users/alice", "PUT", body)[0] == 201
    _, user, _ = call(roost_broker, "/api/users/alice")
    assert user["tags"] == ["management", "monitoring"]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    saved = {u["name"]: u for u in _saved_definitions(roost_broker)["users"]}
    assert saved["alice"]["tags"] in (["management", "monitoring"], "management,monitoring")
    # alice can use the API (monitoring sees everything) with her password.
    assert call(roost_broker, "/api/overview", auth="alice:pw")[0] == 200
    assert call(roost_broker, "/api/overview", auth="alice:nope")[0] == 401

    # Replace her with a password_hash (taken from guest) and other tags.
    guest_hash = call(roost_broker, "/api/users/guest")[1]["password_hash"]
    body = {"password_hash": guest_hash, "tags": ["administrator"]}
    assert call(roost_broker, "/api/users/alice", "PUT", body)[0] == 204
    assert call(roost_broker, "/api/users", auth="alice:guest")[0] == 200
    bad = {"password_hash": "zzz", "tags": ""}
    assert call(roost_broker, "/api/users/alice", "PUT", bad)[0] == 400

    assert call(roost_broker, "/api/users/alice", "DELETE")[0] == 204
    assert call(roost_broker, "/api/users/alice", "DELETE")[0] == 404
    assert call(roost_broker, "/api/users/alice")[0] == 404
    assert "alice" not in {u["name"] for u in _saved_definitions(roost_broker)["users"]}


def test_users_need_administrator(roost_broker: RoostBroker) -> None:
    call(roost_broker, "/api/users/mon", "PUT", {"password": "mon", "tags": "monitoring"})
    status, body, _ = call(
        roost_broker, "/api/users/x", "PUT", {"password": "x", "tags": ""}, auth="mon:mon"
    )
    assert (status, body["reason"]) == (401, "Not administrator user")
    assert call(roost_broker, "/api/vhosts/v", "PUT", {}, auth="mon:mon")[0] == 401
    assert call(roost_broker, "/api/users/x")[0] == 404


def test_vhosts_and_permissions(roost_broker: RoostBroker) -> None:
    assert call(roost_broker, "/api/vhosts/dev", "PUT", {})[0] == 201
    assert call(roost_broker, "/api/vhosts/dev", "PUT", {})[0] == 204
    assert "dev" in {v["name"] for v in _saved_definitions(roost_broker)["vhosts"]}
    call(roost_broker, "/api/users/bob", "PUT", {"password": "bob", "tags": ""})

    perm = {"configure": ".*", "write": ".*", "read": ".*"}
    status, body, _ = call(roost_broker, "/api/permissions/dev/bob", "PUT", {"configure": ".*"})
    assert status == 400 and body["error"] == "bad_request"
    status, body, _ = call(roost_broker, "/api/permissions/nope/bob", "PUT", perm)
    assert (status, body["reason"]) == (400, "vhost_or_user_not_found")
    bad = {**perm, "read": "("}
    assert call(roost_broker, "/api/permissions/dev/bob", "PUT", bad)[0] == 400
    assert call(roost_broker, "/api/permissions/dev/bob", "PUT", perm)[0] == 201
    assert call(roost_broker, "/api/permissions/dev/bob", "PUT", perm)[0] == 204
    _, shown, _ = call(roost_broker, "/api/permissions/dev/bob")
    assert shown == {"user": "bob", "vhost": "dev", **perm}
    # guest, which created dev, was granted full permissions there (as RabbitMQ).
    guest = {"user": "guest", "vhost": "dev", **perm}
    assert call(roost_broker, "/api/vhosts/dev/permissions")[1] == [guest, shown]
    assert call(roost_broker, "/api/users/bob/permissions")[1] == [shown]
    saved = _saved_definitions(roost_broker)["permissions"]
    assert {"user": "bob", "vhost": "dev", **perm} in saved

    # bob can now open an AMQP connection to dev.
    params = pika.URLParameters(f"amqp://bob:bob@127.0.0.1:{roost_broker.port}/dev")
    conn = pika.BlockingConnection(params)
    assert conn.is_open
    conn.close()

    assert call(roost_broker, "/api/permissions/dev/bob", "DELETE")[0] == 204
    assert call(roost_broker, "/api/permissions/dev/bob", "DELETE")[0] == 404
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        pika.BlockingConnection(params)

    call(roost_broker, "/api/permissions/dev/bob", "PUT", perm)
    assert call(roost_broker, "/api/vhosts/dev", "DELETE")[0] == 204
    assert call(roost_broker, "/api/vhosts/dev", "DELETE")[0] == 404
    assert call(roost_broker, "/api/permissions/dev/bob")[0] == 404
    assert "dev" not in {v["name"] for v in _saved_definitions(roost_broker)["vhosts"]}


# -- publish and get -----------------------------------------------------------


def test_publish_and_get(roost_broker: RoostBroker) -> None:
    call(roost_broker, "/api/queues/%2F/gq", "PUT", {})
    publish = "/api/exchanges/%2F/amq.default/publish"
    first = {"routing_key": "gq", "payload": "hi", "payload_encoding": "string", "properties": {}}
    assert call(roost_broker, publish, "POST", first)[:2] == (200, {"routed": True})
    props = {"delivery_mode": 2, "headers": {"a": 1}, "timestamp": 1700000000, "type": "t"}
    second: dict[str, object] = {
        "routing_key": "gq",
        "payload": "/w==",
        "payload_encoding": "base64",
    }
    second["properties"] = props
    assert call(roost_broker, publish, "POST", second)[1] == {"routed": True}
    nowhere = {"routing_key": "nope", "payload": "x", "payload_encoding": "string"}
    assert call(roost_broker, publish, "POST", nowhere)[1] == {"routed": False}
    assert call(roost_broker, "/api/exchanges/%2F/missing/publish", "POST", first)[0] == 404

    get = "/api/queues/%2F/gq/get"
    status, got, _ = call(roost_broker, get, "POST", {"count": 5, "ackmode": "ack_requeue_true"})
    assert status == 200
    assert got == [
        {
            "payload_bytes": 2,
            "redelivered": False,
            "exchange": "",
            "routing_key": "gq",
            "message_count": 1,
            "properties": [],
            "payload": "hi",
            "payload_encoding": "string",
        },
        {
            "payload_bytes": 1,
            "redelivered": False,
            "exchange": "",
            "routing_key": "gq",
            "message_count": 0,
            "properties": props,
            "payload": "/w==",
            "payload_encoding": "base64",
        },
    ]
    # Requeued: still there, now redelivered; base64 on request; acked.
    body = {"count": 1, "ackmode": "ack_requeue_false", "encoding": "base64"}
    _, got, _ = call(roost_broker, get, "POST", body)
    assert [(m["payload"], m["redelivered"], m["message_count"]) for m in got] == [
        ("aGk=", True, 1)
    ]
    assert call(roost_broker, "/api/queues/%2F/gq")[1]["messages"] == 1
    body = {"count": 1, "ackmode": "reject_requeue_true"}
    assert len(call(roost_broker, get, "POST", body)[1]) == 1
    assert call(roost_broker, "/api/queues/%2F/gq")[1]["messages"] == 1
    body = {"count": 3, "ackmode": "reject_requeue_false"}
    assert len(call(roost_broker, get, "POST", body)[1]) == 1
    assert call(roost_broker, "/api/queues/%2F/gq")[1]["messages"] == 0
    assert call(roost_broker, get, "POST", {"count": 1, "ackmode": "ack_requeue_true"})[1] == []
    assert call(roost_broker, get, "POST", {"count": 1, "ackmode": "bogus"})[0] == 400

    # The message published over HTTP reaches an AMQP consumer intact.
    call(roost_broker, publish, "POST", second)
    conn = connect(roost_broker)
    method, properties, payload = conn.channel().basic_get("gq", auto_ack=True)
    assert method is not None
    assert payload == b"\xff"
    assert properties.delivery_mode == 2 and properties.headers == {"a": 1}
    assert properties.type == "t"
    conn.close()
