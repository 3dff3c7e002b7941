"""Publishing to an exchange and getting messages from a queue over HTTP,
as rabbitmqadmin's ``publish`` and ``get`` use them (meant for tests and
debugging, as in RabbitMQ, not for moving messages)."""

from __future__ import annotations

import base64
import binascii
import datetime
from typing import Any

from aiohttp import web
from pamqp import commands as C

from roost.broker.access import READ, WRITE, check_not_internal
from roost.broker.fields import jsonable
from roost.broker.message import Message, QueueEntry
from roost.broker.queue import Queue
from roost.http.common import (
    acting_in,
    bad_request,
    broker_of,
    durable,
    json_body,
    json_response,
    not_found,
)
from roost.properties import decode_properties, encode_properties

_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
)
# JSON names that differ from pamqp's.
_JSON_NAMES = {"message_type": "type"}


def _properties(raw: Any) -> bytes:
    if not isinstance(raw, dict):
        bad_request("properties must be an object")
    kwargs: dict[str, Any] = {}
    for name in _PROPERTY_NAMES:
        value = raw.get(_JSON_NAMES.get(name, name))
        if value is None:
            continue
        if name == "timestamp" and isinstance(value, int):
            value = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
        kwargs[name] = value
    try:
        return encode_properties(C.Basic.Properties(**kwargs))
    except (TypeError, ValueError) as exc:
        bad_request(f"invalid properties: {exc}")


def _properties_json(raw: bytes) -> dict[str, Any] | list[Any]:
    props = decode_properties(raw)
    out: dict[str, Any] = {}
    for name in _PROPERTY_NAMES:
        value = getattr(props, name, None)
        if value is None:
            continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:  # pamqp decodes AMQP timestamps as UTC
                value = value.replace(tzinfo=datetime.UTC)
            value = int(value.timestamp())
        elif isinstance(value, dict):
            value = jsonable(value)
        out[_JSON_NAMES.get(name, name)] = value
    # RabbitMQ shows no properties as an empty list (an empty proplist).
    return out or []


async def publish(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    body = await json_body(request)
    name = request.match_info["name"]
    # As basic.publish: write before the lookup (403 before 404), then no
    # internal exchange, then the user_id rule.
    actor.check(WRITE, "exchange", "" if name == "amq.default" else name)
    ex = vh.exchanges.get("" if name == "amq.default" else name)
    if ex is None:
        not_found()
    check_not_internal(ex.name, ex.internal, vh.name)
    routing_key = body.get("routing_key", "")
    payload = body.get("payload", "")
    encoding = body.get("payload_encoding", "string")
    if not isinstance(routing_key, str) or not isinstance(payload, str):
        bad_request("routing_key and payload must be strings")
    if encoding == "string":
        data = payload.encode("utf-8")
    elif encoding == "base64":
        try:
            data = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            bad_request("payload is not valid base64")
    else:
        bad_request(f"unknown payload_encoding '{encoding}'")
    raw = _properties(body.get("properties") or {})
    scanned = decode_properties(raw)
    actor.may_publish_as(scanned.user_id)
    msg = Message(
        ex.name,
        routing_key,
        raw,
        data,
        persistent=scanned.delivery_mode == 2,
        priority=scanned.priority,
    )
    routed, _, _ = vh.publish(ex, msg)
    await durable(broker_of(request))
    return json_response({"routed": routed})


# Who the API acts as on queues: never the owner of an exclusive one.
_API_OWNER = object()

_ACKMODES = ("ack_requeue_true", "ack_requeue_false", "reject_requeue_true", "reject_requeue_false")


def _entry_json(q: Queue, entry: QueueEntry, encoding: str, left: int) -> dict[str, Any]:
    msg = entry.message
    payload: str
    used = "base64"
    if encoding == "auto":
        try:
            payload, used = msg.body.decode("utf-8"), "string"
        except UnicodeDecodeError:
            payload = base64.b64encode(msg.body).decode("ascii")
    else:
        payload = base64.b64encode(msg.body).decode("ascii")
    return {
        "payload_bytes": len(msg.body),
        "redelivered": entry.redelivered,
        "exchange": msg.exchange,
        "routing_key": msg.routing_key,
        "message_count": left,
        "properties": _properties_json(msg.properties),
        "payload": payload,
        "payload_encoding": used,
    }


async def get(request: web.Request) -> web.Response:
    vh, actor = acting_in(request)
    body = await json_body(request)
    actor.check(READ, "queue", request.match_info["name"])
    q = vh.queues.get(request.match_info["name"])
    if q is None:
        not_found()
    if q.exclusive_owner is not None:
        # Another connection's exclusive queue: RESOURCE_LOCKED, as basic.get.
        vh.queue(q.name, _API_OWNER)
    count = body.get("count", 1)
    ackmode = body.get("ackmode", "ack_requeue_true")
    encoding = body.get("encoding", "auto")
    truncate = body.get("truncate")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        bad_request("count must be a positive integer")
    # rabbitmqadmin 3.x sends "requeue": "true"/"false" instead of ackmode.
    if "ackmode" not in body and "requeue" in body:
        ackmode = "ack_requeue_false" if str(body["requeue"]) == "false" else "ack_requeue_true"
    if ackmode not in _ACKMODES:
        bad_request(f"unknown ackmode '{ackmode}'")
    if encoding not in ("auto", "base64"):
        bad_request(f"unknown encoding '{encoding}'")
    taken: list[QueueEntry] = []
    out = []
    for _ in range(count):
        entry = q.get(no_ack=False)
        if entry is None:
            break
        taken.append(entry)
        item = _entry_json(q, entry, encoding, q.message_count)
        if isinstance(truncate, int) and truncate >= 0:
            item["payload"] = item["payload"][:truncate]
        out.append(item)
    # As RabbitMQ: every message is fetched first, then all are settled, so
    # requeued ones are not fetched again by the same call.
    if taken:
        if ackmode.endswith("requeue_true"):
            q.requeue(taken)
        elif ackmode == "reject_requeue_false":
            q.reject(taken)
        else:
            q.settle(taken)
    return json_response(out)


def register(app: web.Application) -> None:
    app.router.add_post("/api/exchanges/{vhost}/{name}/publish", publish)
    app.router.add_post("/api/queues/{vhost}/{name}/get", get)
