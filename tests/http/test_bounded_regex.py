"""Regular expressions from users run on RE2 (issue 12, item 4): a
``use_regex`` name filter or a permission pattern cannot backtrack
catastrophically, and what RE2 cannot run in linear time (backreferences,
lookaround) is refused wherever it is set: a 400 in RabbitMQ's JSON error
shape, not a frozen event loop. Real in-process broker, real HTTP."""

from __future__ import annotations

import logging
import time
import urllib.parse

import pika
import pika.exceptions
import pytest

from roost.testing import RoostBroker
from tests.e2e.security.helpers import add_user, broker_of, connect
from tests.http.test_management_live import call

# (a+)+$ against "aaa...a!" takes exponential time in a backtracking
# engine: about 8 s at 27 letters with Python's re, microseconds in RE2.
EVIL = "(a+)+$"
VICTIM = "a" * 27 + "!"


def query(**params: str) -> str:
    return "?" + urllib.parse.urlencode(params)


def test_regex_filter_cannot_backtrack_catastrophically(roost_broker: RoostBroker) -> None:
    for name in (VICTIM, "other"):
        assert call(roost_broker, f"/api/queues/%2F/{name}", "PUT", {})[0] == 201
    start = time.monotonic()
    status, body, _ = call(roost_broker, "/api/queues" + query(name=EVIL, use_regex="true"))
    assert time.monotonic() - start < 1.0
    assert status == 200 and body == []
    status, body, _ = call(roost_broker, "/api/queues" + query(name="^a+!$", use_regex="true"))
    assert status == 200 and [q["name"] for q in body] == [VICTIM]


@pytest.mark.parametrize("pattern", ["(?=a)", "(a)\\1", "(?<!x)a", "["])
def test_regex_filter_re2_cannot_run_is_a_400(roost_broker: RoostBroker, pattern: str) -> None:
    for path in ("/api/queues", "/api/exchanges/%2F"):
        status, body, _ = call(roost_broker, path + query(name=pattern, use_regex="true", page="1"))
        assert status == 400, (path, pattern)
        assert body["error"] == "bad_request"
        assert body["reason"].startswith(f"invalid regular expression: {pattern}")


def test_filtered_pages_are_still_right(roost_broker: RoostBroker) -> None:
    for i in range(30):
        call(roost_broker, f"/api/queues/%2F/page-{i:02d}", "PUT", {})
    status, body, _ = call(
        roost_broker,
        "/api/queues/%2F" + query(name="^page-[12]", use_regex="true", page="2", page_size="7"),
    )
    assert status == 200
    assert body["filtered_count"] == 20 and body["total_count"] == 30
    assert body["page_count"] == 3 and body["item_count"] == 7
    assert [q["name"] for q in body["items"]] == [f"page-1{i}" for i in range(7, 10)] + [
        f"page-2{i}" for i in range(4)
    ]
    # Rendered in full, as without a filter.
    assert {"name", "vhost", "messages", "consumers"} <= set(body["items"][0])
    status, body, _ = call(roost_broker, "/api/exchanges/%2F" + query(name="amq.t", page="1"))
    assert status == 200 and [x["name"] for x in body["items"]] == ["amq.topic"]


@pytest.mark.parametrize("pattern", ["(a)\\1", "(?=q)q", "(?<=a)b"])
def test_put_permission_refuses_what_re2_cannot_run(
    roost_broker: RoostBroker, pattern: str
) -> None:
    assert call(roost_broker, "/api/users/bob", "PUT", {"password": "pw", "tags": ""})[0] == 201
    status, body, _ = call(
        roost_broker,
        "/api/permissions/%2F/bob",
        "PUT",
        {"configure": ".*", "write": pattern, "read": ".*"},
    )
    assert status == 400
    assert body["error"] == "bad_request" and "invalid write pattern" in body["reason"]
    assert call(roost_broker, "/api/permissions/%2F/bob")[0] == 404


def test_definitions_import_refuses_what_re2_cannot_run(roost_broker: RoostBroker) -> None:
    definitions = {
        "users": [{"name": "carol", "password": "pw", "tags": ""}],
        "permissions": [
            {"user": "carol", "vhost": "/", "configure": "(?=c)c", "write": ".*", "read": ".*"}
        ],
    }
    status, body, _ = call(roost_broker, "/api/definitions", "POST", definitions)
    assert status == 400 and "(?=c)c" in body["reason"]
    assert call(roost_broker, "/api/permissions/%2F/carol")[0] == 404


def test_a_stored_pattern_re2_rejects_permits_nothing(
    roost_broker: RoostBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # As if read from a data directory written before patterns ran on
    # RE2 (Python's re accepts lookahead): refused, with a warning.
    add_user(roost_broker, "dave", ("(?=d)d.*", ".*", ".*"))
    conn = connect(roost_broker, "dave", "pw")
    with caplog.at_level(logging.WARNING, logger="roost.access"):
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.queue_declare("dq")
    assert err.value.reply_code == 403
    assert any("(?=d)d.*" in r.getMessage() for r in caplog.records)
    conn.close()


def test_a_permission_pattern_cannot_backtrack_catastrophically(
    roost_broker: RoostBroker,
) -> None:
    add_user(roost_broker, "erin", ("^" + EVIL, ".*", ".*"))
    assert broker_of(roost_broker).permissions[("erin", "/")][0] == "^" + EVIL
    conn = connect(roost_broker, "erin", "pw")
    ch = conn.channel()
    start = time.monotonic()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(VICTIM)
    assert time.monotonic() - start < 1.0
    assert err.value.reply_code == 403
    conn.close()
