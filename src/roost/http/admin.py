"""Users, vhosts and permissions: show, create (PUT) and delete, for
administrators. The changes go through the same functions as ``roost
ctl`` (roost.control.commands), and a reply is sent once they are saved
to the data directory's definitions."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roost.broker.broker import Broker
from roost.control import commands
from roost.control.commands import ControlError
from roost.http.common import (
    bad_request,
    broker_of,
    definitions_saved,
    json_body,
    json_response,
    not_found,
    require_admin,
    user_of,
)


def _run(broker: Broker, command: commands.Command, args: dict[str, Any]) -> Any:
    try:
        return command(broker, args)
    except ControlError as exc:
        bad_request(str(exc))


def user_json(broker: Broker, name: str) -> dict[str, Any]:
    u = broker.users.users.get(name)
    if u is None:
        not_found()
    return {
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": u.algorithm,
        "tags": list(u.tags),
        "limits": {},
    }


def _permission_json(user: str, vhost: str, perms: tuple[str, str, str]) -> dict[str, Any]:
    c, w, r = perms
    return {"user": user, "vhost": vhost, "configure": c, "write": w, "read": r}


async def get_user(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(user_json(broker_of(request), request.match_info["user"]))


async def put_user(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    body = await json_body(request)
    # As RabbitMQ 3.10: "tags" is required (it may be empty).
    if "tags" not in body:
        bad_request("tags_not_present")
    args: dict[str, Any] = {
        k: body[k] for k in ("password", "password_hash", "hashing_algorithm") if k in body
    }
    args["name"] = request.match_info["user"]
    args["tags"] = body["tags"]
    result = _run(broker, commands.put_user, args)
    await definitions_saved(broker)
    return web.Response(status=201 if result["created"] else 204)


async def delete_user(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    name = request.match_info["user"]
    if name not in broker.users.users:
        not_found()
    _run(broker, commands.delete_user, {"name": name})
    await definitions_saved(broker)
    return web.Response(status=204)


async def user_permissions(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    name = request.match_info["user"]
    user_json(broker, name)
    return json_response(
        [_permission_json(u, v, p) for (u, v), p in broker.permissions.items() if u == name]
    )


async def put_vhost(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    await json_body(request)  # description, tags...: accepted, not kept
    name = request.match_info["vhost"]
    if name in broker.vhosts:
        return web.Response(status=204)
    _run(broker, commands.add_vhost, {"name": name})
    # As RabbitMQ (rabbit_vhost:maybe_grant_full_permissions): the creator
    # may use the new vhost, since resource operations need permissions
    # there, administrators' included.
    _run(
        broker,
        commands.set_permissions,
        {
            "vhost": name,
            "user": user_of(request).name,
            "configure": ".*",
            "write": ".*",
            "read": ".*",
        },
    )
    await definitions_saved(broker)
    return web.Response(status=201)


async def delete_vhost(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    name = request.match_info["vhost"]
    if name not in broker.vhosts:
        not_found()
    _run(broker, commands.delete_vhost, {"name": name})
    await definitions_saved(broker)
    return web.Response(status=204)


async def vhost_permissions(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    name = request.match_info["vhost"]
    if name not in broker.vhosts:
        not_found()
    return json_response(
        [_permission_json(u, v, p) for (u, v), p in broker.permissions.items() if v == name]
    )


def _permission_key(request: web.Request) -> tuple[str, str]:
    return request.match_info["user"], request.match_info["vhost"]


async def get_permission(request: web.Request) -> web.Response:
    require_admin(request)
    user, vhost = _permission_key(request)
    perms = broker_of(request).permissions.get((user, vhost))
    if perms is None:
        not_found()
    return json_response(_permission_json(user, vhost, perms))


async def put_permission(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    body = await json_body(request)
    user, vhost = _permission_key(request)
    missing = [k for k in ("configure", "write", "read") if k not in body]
    if missing:
        bad_request(", ".join(f"{k} missing" for k in missing))
    if user not in broker.users.users or vhost not in broker.vhosts:
        bad_request("vhost_or_user_not_found")
    existed = (user, vhost) in broker.permissions
    args = {"user": user, "vhost": vhost, **{k: body[k] for k in ("configure", "write", "read")}}
    _run(broker, commands.set_permissions, args)
    await definitions_saved(broker)
    return web.Response(status=204 if existed else 201)


async def delete_permission(request: web.Request) -> web.Response:
    require_admin(request)
    broker = broker_of(request)
    user, vhost = _permission_key(request)
    if (user, vhost) not in broker.permissions:
        not_found()
    _run(broker, commands.clear_permissions, {"user": user, "vhost": vhost})
    await definitions_saved(broker)
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/users/{user}", get_user)
    app.router.add_put("/api/users/{user}", put_user)
    app.router.add_delete("/api/users/{user}", delete_user)
    app.router.add_get("/api/users/{user}/permissions", user_permissions)
    app.router.add_put("/api/vhosts/{vhost}", put_vhost)
    app.router.add_delete("/api/vhosts/{vhost}", delete_vhost)
    app.router.add_get("/api/vhosts/{vhost}/permissions", vhost_permissions)
    app.router.add_get("/api/permissions/{vhost}/{user}", get_permission)
    app.router.add_put("/api/permissions/{vhost}/{user}", put_permission)
    app.router.add_delete("/api/permissions/{vhost}/{user}", delete_permission)
