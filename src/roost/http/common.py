"""What every management API handler shares: JSON replies and errors in
RabbitMQ's shape, basic-auth users and their tags, vhost lookup."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NoReturn

from aiohttp import web

from roost.broker.broker import Broker
from roost.broker.users import User
from roost.broker.vhost import VirtualHost

BROKER: web.AppKey[Broker] = web.AppKey("broker", Broker)
INFO: web.AppKey[dict[str, Any]] = web.AppKey("info", dict)
# The authenticated user of the request being handled (set by the
# middleware; a handler runs in the middleware's task).
CURRENT_USER: ContextVar[User] = ContextVar("roost_http_user")

# Tags that let a user use the management API at all, as in RabbitMQ.
MANAGEMENT_TAGS = frozenset({"administrator", "monitoring", "policymaker", "management"})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str), status=status, content_type="application/json"
    )


def error(status: int, error: str, reason: str, **headers: str) -> web.Response:
    return web.Response(
        text=json.dumps({"error": error, "reason": reason}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class HTTPError(Exception):
    """Raised by handlers; the middleware turns it into a JSON error."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


def not_found() -> NoReturn:
    raise HTTPError(404, "Object Not Found", "Not Found")


def bad_request(reason: str) -> NoReturn:
    raise HTTPError(400, "bad_request", reason)


def broker_of(request: web.Request) -> Broker:
    return request.app[BROKER]


def user_of(request: web.Request) -> User:
    return CURRENT_USER.get()


def authenticate(broker: Broker, header: str | None) -> User | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = raw.partition(":")
    if not sep:
        return None
    return broker.users.authenticate(name, password)


def is_admin(user: User) -> bool:
    return "administrator" in user.tags


def sees_all(user: User) -> bool:
    """Administrators and monitoring users read every vhost."""
    return is_admin(user) or "monitoring" in user.tags


def require_admin(request: web.Request) -> None:
    if not is_admin(user_of(request)):
        raise HTTPError(401, "not_authorised", "Not administrator user")


def visible_vhosts(request: web.Request) -> list[VirtualHost]:
    """The vhosts the user may read: all of them for administrators and
    monitoring users, otherwise those it has permissions on."""
    broker, user = broker_of(request), user_of(request)
    if sees_all(user):
        return list(broker.vhosts.values())
    return [vh for name, vh in broker.vhosts.items() if (user.name, name) in broker.permissions]


def vhost_of(request: web.Request, write: bool = False) -> VirtualHost:
    """The vhost named in the URL (the default one is %2F); 404 when it
    does not exist, 401 when the user may not use it."""
    broker, user = broker_of(request), user_of(request)
    name = request.match_info["vhost"]
    vh = broker.vhosts.get(name)
    if vh is None:
        not_found()
    allowed = (user.name, name) in broker.permissions
    if not (is_admin(user) or allowed or (not write and sees_all(user))):
        raise HTTPError(401, "not_authorised", "Access refused.")
    return vh


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; an empty body is an empty object."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        # json.loads detects UTF-8/16/32; invalid bytes raise a ValueError.
        data = json.loads(raw)
    except ValueError:
        bad_request("not_json")
    if not isinstance(data, dict):
        bad_request("not_json")
    return data


def listing(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """A list reply; with ``page`` in the query, one page of it in
    RabbitMQ's paginated shape (``name`` filters, ``use_regex`` too)."""
    total = len(items)
    name = request.query.get("name")
    if name:
        if request.query.get("use_regex") == "true":
            try:
                pattern = re.compile(name)
            except re.error:
                bad_request(f"invalid regular expression: {name}")
            items = [i for i in items if pattern.search(str(i.get("name", "")))]
        else:
            items = [i for i in items if name in str(i.get("name", ""))]
    if "page" not in request.query:
        return json_response(items)
    try:
        page = int(request.query["page"])
        page_size = int(request.query.get("page_size", "100"))
    except ValueError:
        bad_request("page and page_size must be integers")
    if page < 1 or not 1 <= page_size <= 500:
        bad_request("page must be positive and page_size between 1 and 500")
    page_count = max(1, -(-len(items) // page_size))
    chunk = items[(page - 1) * page_size : page * page_size]
    return json_response(
        {
            "filtered_count": len(items),
            "item_count": len(chunk),
            "items": chunk,
            "page": page,
            "page_count": page_count,
            "page_size": page_size,
            "total_count": total,
        }
    )


async def durable(broker: Broker) -> None:
    """Wait until everything written to the message log so far is on disk
    (a purge's settlements, a persistent publish), as purge-ok and
    publisher confirms wait over AMQP."""
    await _called_back(broker.when_durable)


async def definitions_saved(broker: Broker) -> None:
    """Wait until every definition change so far is on disk, so a 2xx from
    the API means as much as declare-ok does over AMQP."""
    await _called_back(broker.when_definitions_saved)


async def _called_back(register: Callable[[Callable[[], None]], None]) -> None:
    done = asyncio.get_running_loop().create_future()

    def called() -> None:
        if not done.done():
            done.set_result(None)

    register(called)
    await done
