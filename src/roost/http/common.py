"""What every management API handler shares: JSON replies and errors in
RabbitMQ's shape, basic-auth users and their tags, vhost lookup."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar, cast

from aiohttp import web

from roost import safe_regex
from roost.broker.access import Actor, loopback_allowed
from roost.broker.broker import Broker
from roost.broker.users import User
from roost.broker.vhost import VirtualHost
from roost.http.cluster_view import ClusterSnapshot, ClusterView

T = TypeVar("T")
log = logging.getLogger("roost.http")

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


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The user name and password of a basic-auth header, or None."""
    if not header or not header.startswith("Basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = raw.partition(":")
    if not sep:
        return None
    return name, password


def login(broker: Broker, header: str | None, peer: str) -> User:
    """The user a request's basic auth logs in from address ``peer``,
    decided as an AMQP login is: the same login throttle (per address and
    per user), loopback-only users only from a loopback address, every
    refusal logged (never the password). Raises a 401 HTTPError."""
    if not header:
        # A browser's first request carries no credentials: not a failure.
        raise HTTPError(401, "not_authorized", "Login failed")
    throttle = broker.login_throttle
    if throttle.blocked(peer):
        _login_refused(broker, peer, "", "too many failed logins from this address", False)
    credentials = basic_credentials(header)
    if credentials is None:
        _login_refused(broker, peer, "", "malformed basic-auth credentials")
    name, password = credentials
    if throttle.blocked(peer, name):
        _login_refused(broker, peer, name, "too many failed logins for this user", False)
    user = broker.users.authenticate(name, password)
    if user is None:
        _login_refused(broker, peer, name, "invalid credentials")
    if not loopback_allowed(name, peer, broker.loopback_users):
        # RabbitMQ's management plugin's words.
        _login_refused(
            broker,
            peer,
            name,
            f"user '{name}' can only connect via localhost",
            reply=HTTPError(401, "not_authorised", "User can only log in via localhost"),
        )
    throttle.succeeded(peer, name)
    return user


def _login_refused(
    broker: Broker,
    peer: str,
    user: str,
    reason: str,
    counts: bool = True,
    reply: HTTPError | None = None,
) -> NoReturn:
    log.warning(
        "%s: HTTP login refused for user '%s': %s",
        peer,
        user,
        reason,
        extra={"event": "login.refused", "peer": peer, "user": user},
    )
    blocked = broker.login_throttle.failed(peer, user) if counts else None
    if blocked is not None:
        log.warning(
            "%s: too many failed logins, refusing logins for %s for %gs",
            peer,
            blocked,
            broker.login_throttle.backoff,
        )
    # The client learns no more than from any failed login.
    raise reply or HTTPError(401, "not_authorized", "Login failed")


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


def vhost_of(request: web.Request) -> VirtualHost:
    """The vhost named in the URL (the default one is %2F); 404 when it
    does not exist, 401 when the user may not use it."""
    broker, user = broker_of(request), user_of(request)
    name = request.match_info["vhost"]
    vh = broker.vhosts.get(name)
    if vh is None:
        not_found()
    allowed = (user.name, name) in broker.permissions
    if not (allowed or sees_all(user)):
        raise HTTPError(401, "not_authorised", "Access refused.")
    return vh


def acting_in(request: web.Request) -> tuple[VirtualHost, Actor]:
    """The URL's vhost and the requesting user acting on its resources.
    As RabbitMQ's management plugin (which does these operations over an
    AMQP channel as the user), the user needs permissions on the vhost,
    administrators included, and then the same checks as AMQP."""
    broker, user = broker_of(request), user_of(request)
    vh = vhost_of(request)
    if (user.name, vh.name) not in broker.permissions:
        raise HTTPError(
            401, "not_authorised", f"access to vhost '{vh.name}' refused for user '{user.name}'"
        )
    return vh, Actor(user.name, vh.name, broker.permissions)


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


async def listing(
    request: web.Request,
    items: Sequence[T],
    render: Callable[[T], dict[str, Any]] | None = None,
    name_of: Callable[[T], str] | None = None,
) -> web.Response:
    """A list reply; with ``page`` in the query, one page of it in
    RabbitMQ's paginated shape (``name`` filters, ``use_regex`` too).

    ``items`` may be the objects themselves, with ``render`` making each
    one's JSON and ``name_of`` giving its name: then only the objects that
    pass the filter and fall on the page are rendered, so a filtered page
    of 20,000 queues costs a name comparison each, not a JSON object each.
    A long listing is rendered in chunks, letting AMQP clients in between."""
    as_json: Callable[[T], dict[str, Any]] = render or _as_dict
    named: Callable[[T], str] = name_of or _name_in_json
    total = len(items)
    selected: Sequence[T] = items
    name = request.query.get("name")
    if name:
        if request.query.get("use_regex") == "true":
            try:
                pattern = safe_regex.compile_pattern(name)
            except safe_regex.InvalidPattern as exc:
                bad_request(f"invalid regular expression: {name} ({exc})")
            selected = [i for i in items if pattern.search(named(i))]
        else:
            selected = [i for i in items if name in named(i)]
    if "page" not in request.query:
        body = await _json_array(selected, as_json)
        return web.Response(text=body, content_type="application/json")
    try:
        page = int(request.query["page"])
        page_size = int(request.query.get("page_size", "100"))
    except ValueError:
        bad_request("page and page_size must be integers")
    if page < 1 or not 1 <= page_size <= 500:
        bad_request("page must be positive and page_size between 1 and 500")
    page_count = max(1, -(-len(selected) // page_size))
    chunk = [as_json(i) for i in selected[(page - 1) * page_size : page * page_size]]
    return json_response(
        {
            "filtered_count": len(selected),
            "item_count": len(chunk),
            "items": chunk,
            "page": page,
            "page_count": page_count,
            "page_size": page_size,
            "total_count": total,
        }
    )


# Items rendered and encoded between two returns to the event loop: a few
# milliseconds of work, so a listing of 20,000 queues does not stall AMQP
# clients for the whole of it (objects deleted meanwhile still render from
# what they were).
_RENDER_CHUNK = 500


async def _json_array(items: Sequence[T], as_json: Callable[[T], dict[str, Any]]) -> str:
    parts: list[str] = []
    for start in range(0, len(items), _RENDER_CHUNK):
        if start:
            await asyncio.sleep(0)
        chunk = json.dumps([as_json(i) for i in items[start : start + _RENDER_CHUNK]], default=str)
        parts.append(chunk[1:-1])
    return "[" + ",".join(parts) + "]"


def _as_dict(item: Any) -> dict[str, Any]:
    return cast(dict[str, Any], item)


def _name_in_json(item: Any) -> str:
    return str(item.get("name", ""))


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


async def cluster_snapshot(request: web.Request) -> ClusterSnapshot | None:
    """The other nodes' published views in cluster mode, else None. While
    PostgreSQL is out of reach: no peers (this node knows only itself)."""
    view: ClusterView | None = request.app[INFO].get("cluster")
    if view is None:
        return None
    return await view.snapshot()
