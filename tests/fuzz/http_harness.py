"""A hypothesis-driven fuzzer for roost's management API (HTTP).

Each example is one request against a live broker's HTTP listener: a
method (the documented ones and others), a path from the OpenAPI table
(src/roost/http/openapi.py) with its parameters filled with hostile names,
random query parameters the handlers read (pagination, filters, regexes),
random headers and Authorization values (valid, garbage, not base64, no
colon, unknown user), and a body that is random JSON, a JSON object with
the keys the handlers read holding random values, or random bytes. The
invariant: a well-formed HTTP reply within the timeout, with a status
below 500 (503 only from the health checks), and RabbitMQ's JSON error
shape for errors under /api/. Afterwards a pika client must still publish
and consume, and nothing may have been logged as an unhandled exception.

The fuzzer authenticates as its own administrator and never names it (or
the vhost the final check uses) in a request, so that a random
``DELETE /api/users/...`` cannot lock it out. Run for long with::

    python -m tests.fuzz.http_harness --examples 20000 --seed 1
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import logging
import sys
import urllib.parse
from collections import Counter
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, seed, settings

from roost.control import commands
from roost.http.openapi import _PARAM, ENDPOINTS
from roost.testing import RoostBroker
from tests.fuzz.harness import ErrorLog

ADMIN = "fuzz-admin"
ADMIN_PASSWORD = "fuzz-secret"
CHECK_VHOST = "fuzz-check"


def _basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


GOOD_AUTH = _basic(f"{ADMIN}:{ADMIN_PASSWORD}".encode())

# -- strategies -----------------------------------------------------------

_interesting_names = st.sampled_from(
    [
        "/",
        "%2F",
        "amq.direct",
        "amq.topic",
        "amq.default",
        "",
        "guest",
        "q1",
        "x1",
        "..",
        "a/b",
        "~",
        "%",
        "%%",
        "%zz",
        "\u00e9\u00e8",
        "\U0001f600",
        "a" * 300,
        "a" * 9000,  # over aiohttp's 8190-byte request line
        "rabbit@localhost",
        "\x00",
        "\r\nX-Injected: 1",
    ]
)


def _safe(name: str) -> bool:
    # Never the fuzzer's own account or the final check's vhost.
    return "fuzz" not in urllib.parse.unquote(name).lower()


names = st.one_of(_interesting_names, st.text(max_size=40)).filter(_safe)


def json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=30)
        | _interesting_names,
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=15), inner, max_size=5)
        ),
        max_leaves=20,
    )


# Keys the handlers read from bodies.
_BODY_KEYS = [
    "durable",
    "auto_delete",
    "internal",
    "type",
    "arguments",
    "routing_key",
    "payload",
    "payload_encoding",
    "properties",
    "count",
    "ackmode",
    "encoding",
    "truncate",
    "requeue",
    "password",
    "password_hash",
    "hashing_algorithm",
    "tags",
    "configure",
    "write",
    "read",
    "vhost",
    "name",
    "description",
    "default_queue_type",
    "users",
    "vhosts",
    "permissions",
    "queues",
    "exchanges",
    "bindings",
    "policies",
    "source",
    "destination",
    "destination_type",
    "x-message-ttl",
]
structured_body = st.dictionaries(
    st.sampled_from(_BODY_KEYS).filter(lambda k: k not in ("users", "permissions"))
    | st.text(max_size=10),
    json_values(),
    max_size=8,
)

_QUERY_KEYS = [
    "page",
    "page_size",
    "name",
    "use_regex",
    "sort",
    "sort_reverse",
    "columns",
    "pagination",
    "if-unused",
    "if-empty",
    "lengths_age",
    "msg_rates_age",
    "disable_stats",
    "enable_queue_totals",
]
query = st.dictionaries(
    st.sampled_from(_QUERY_KEYS) | st.text(max_size=8),
    st.one_of(
        st.sampled_from(["true", "false", "1", "0", "-1", "99999999999999999999", "(a+)+$", "["]),
        st.text(max_size=20),
    ),
    max_size=4,
)

authorization = st.one_of(
    st.just(GOOD_AUTH),
    st.one_of(
        st.just(_basic(b"guest:guest")),
        st.just("Basic"),
        st.just("Basic !!!not-base64!!!"),
        st.just(_basic(b"no-colon")),
        st.just(_basic(b"\xff\xfe:\xff")),
        st.just(_basic(b"nobody:wrong")),
        st.just("Bearer abc"),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=50),
        st.none(),
    ),
)

extra_headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "X-Requested-With",
            "X-Reason",
            "Accept",
            "Accept-Encoding",
            "Connection",
            "If-None-Match",
            "Range",
        ]
    ),
    st.one_of(
        st.sampled_from(["application/json", "text/plain", "XMLHttpRequest", "gzip", "close"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
    max_size=3,
)

_methods = sorted({m for m, *_ in ENDPOINTS} | {"PATCH", "OPTIONS", "HEAD", "TRACE"})


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    documented, template, *_ = draw(st.sampled_from(ENDPOINTS))
    # Half the time the documented method, so that handlers are reached.
    method = draw(st.one_of(st.just(documented), st.sampled_from(_methods)))

    def fill(match: Any) -> str:
        value = draw(names)
        if draw(st.booleans()):
            return urllib.parse.quote(value, safe="")
        # Raw: only what http.client lets through in a request line.
        return urllib.parse.quote(value, safe="/%:@!$&'()*+,;=~")

    path = _PARAM.sub(fill, template)
    params = draw(query)
    if params:
        path += "?" + urllib.parse.urlencode(params)
    headers = draw(extra_headers)
    auth = draw(authorization)
    if auth is not None:
        headers["Authorization"] = auth
    body_kind = draw(st.sampled_from(["none", "json", "structured", "bytes"]))
    body: bytes | None
    if body_kind == "json":
        body = json.dumps(draw(json_values())).encode()
    elif body_kind == "structured":
        body = json.dumps(draw(structured_body)).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=200))
    else:
        body = None
    return method, path, headers, body


# -- running -----------------------------------------------------------------


_sources = itertools.count()


def _source(headers: dict[str, str]) -> str:
    """The loopback address a request comes from. The broker throttles
    failed logins per address (AMQP's and HTTP's alike), so requests that
    may fail to log in each come from an address of their own: otherwise
    127.0.0.1 would be blocked within a few examples and the fuzzer would
    hear nothing but 401s (and the closing AMQP check would be refused)."""
    if headers.get("Authorization") == GOOD_AUTH:
        return "127.0.0.1"
    n = next(_sources)
    return f"127.{1 + n // 62500 % 254}.{n // 250 % 250}.{1 + n % 250}"


def send(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None) -> int:
    """One request on a fresh connection; the status, after checking the
    reply's shape. Raises AssertionError on a broken invariant."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=15, source_address=(_source(headers), 0)
    )
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    status = resp.status
    where = f"{method} {path[:200]} -> {status}: {data[:300]!r}"
    assert status < 500 or (status == 503 and "/health" in path), where
    plain_path = path.split("?", 1)[0]
    if status >= 400 and plain_path.startswith("/api/") and method != "HEAD":
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            doc = json.loads(data)
            assert isinstance(doc, dict) and "error" in doc and "reason" in doc, where
        else:
            # Only aiohttp's own answers to a request it could not parse
            # (400) or an Expect it does not know (417) come before routing.
            assert status in (400, 417), where
    return status


def prepare(broker: RoostBroker) -> None:
    """The fuzzer's administrator and the check's vhost, made directly."""
    server = broker.server
    assert server is not None

    def setup() -> None:
        b = server.broker
        commands.add_user(b, {"name": ADMIN, "password": ADMIN_PASSWORD, "tags": "administrator"})
        commands.add_vhost(b, {"name": CHECK_VHOST})
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        commands.set_permissions(b, {"vhost": CHECK_VHOST, "user": ADMIN, **perms})
        commands.set_permissions(b, {"vhost": "/", "user": ADMIN, **perms})

    broker.call(setup)
    # Objects the name pool mentions, so that some requests find them.
    auth = {"Authorization": GOOD_AUTH, "Content-Type": "application/json"}
    for path in ("/api/queues/%2F/q1", "/api/exchanges/%2F/x1"):
        body = b'{"type": "topic"}' if "exchanges" in path else b"{}"
        assert send(broker.http_port, "PUT", path, auth, body) in (201, 204)
    bind = "/api/bindings/%2F/e/x1/q/q1"
    assert send(broker.http_port, "POST", bind, auth, b'{"routing_key": "k.#"}') == 201


def fuzz_http(broker: RoostBroker, examples: int, seed_: int) -> Counter[int]:
    """Run ``examples`` hypothesis examples against ``broker``'s API; how
    many replies had each status."""
    port = broker.http_port
    statuses: Counter[int] = Counter()

    @seed(seed_)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(req: tuple[str, str, dict[str, str], bytes | None]) -> None:
        statuses[send(port, *req)] += 1

    one()
    return statuses


def check_amqp(broker: RoostBroker) -> None:
    """A well-behaved AMQP client in the check's own vhost must still work."""
    import pika

    params = pika.ConnectionParameters(
        "127.0.0.1",
        broker.port,
        CHECK_VHOST,
        pika.PlainCredentials(ADMIN, ADMIN_PASSWORD),
        socket_timeout=5,
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"still alive")
        for _m, _p, got in ch.consume(q, auto_ack=True, inactivity_timeout=5):
            assert got == b"still alive", got
            break
        ch.cancel()
    finally:
        conn.close()


def error_log() -> ErrorLog:
    """Also aiohttp's: a handler's unhandled exception is logged there."""
    handler = ErrorLog(("asyncio", "roost", "aiohttp"))
    logging.getLogger().addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    errors = error_log()
    with RoostBroker() as broker:
        prepare(broker)
        statuses = fuzz_http(broker, args.examples, args.seed)
        check_amqp(broker)  # not guest on /: the fuzzer may have removed either
    crashes = errors.crashes()
    for c in crashes:
        print(c, file=sys.stderr)
    print(f"{args.examples} examples, seed {args.seed}: {len(crashes)} crash(es) logged")
    print("statuses:", dict(sorted(statuses.items())))
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
