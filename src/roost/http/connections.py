"""/api/connections, /api/channels and /api/consumers, from the core's read
models, with RabbitMQ's names: a connection is "peer -> local"
("127.0.0.1:54321 -> 127.0.0.1:5672"), its channels that name followed by
" (number)"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from roost.broker import read_models
from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED
from roost.broker.fields import jsonable
from roost.broker.read_models import ChannelView, ConnectionView, ConsumerView, host_port
from roost.http.cluster_view import ClusterView
from roost.http.common import (
    INFO,
    broker_of,
    cluster_snapshot,
    is_admin,
    json_response,
    listing,
    not_found,
    sees_all,
    user_of,
    vhost_of,
)


def _connections(request: web.Request, vhost: str | None = None) -> list[ConnectionView]:
    """Open connections the user may see: all of them for administrators
    and monitoring users, otherwise its own (as RabbitMQ)."""
    user = user_of(request)
    return [
        c
        for c in read_models.connections(broker_of(request), vhost)
        if sees_all(user) or c.user == user.name
    ]


def connection_json(request: web.Request, c: ConnectionView) -> dict[str, Any]:
    return connection_dict(request.app[INFO]["node"], c)


def connection_dict(node: str, c: ConnectionView) -> dict[str, Any]:
    host, port = host_port(c.local)
    peer_host, peer_port = host_port(c.peer)
    props = jsonable(c.client_properties)
    return {
        "name": c.name,
        "node": node,
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "user": c.user,
        "vhost": c.vhost,
        "state": c.state,
        "channels": len(c.channels),
        "channel_max": c.channel_max,
        "frame_max": c.frame_max,
        "timeout": c.heartbeat,
        "client_properties": props,
        "user_provided_name": props.get("connection_name"),
        "host": host,
        "port": port,
        "peer_host": c.peer_host or peer_host,
        "peer_port": peer_port,
        "ssl": c.tls,
        "auth_mechanism": c.auth_mechanism,
    }


def channel_json(request: web.Request, conn: ConnectionView, ch: ChannelView) -> dict[str, Any]:
    return channel_dict(request.app[INFO]["node"], conn, ch)


def channel_dict(node: str, conn: ConnectionView, ch: ChannelView) -> dict[str, Any]:
    peer_host, peer_port = host_port(conn.peer)
    return {
        "name": conn.channel_name(ch),
        "node": node,
        "number": ch.number,
        "user": conn.user,
        "vhost": conn.vhost,
        "state": ch.state,
        "consumer_count": len(ch.consumers),
        "messages_unacknowledged": ch.messages_unacknowledged,
        "messages_unconfirmed": 0,
        "messages_uncommitted": ch.messages_uncommitted,
        "acks_uncommitted": ch.acks_uncommitted,
        "prefetch_count": ch.prefetch_count,
        "global_prefetch_count": ch.global_prefetch_count,
        "confirm": ch.confirm,
        "transactional": ch.transactional,
        "connection_details": {
            "name": conn.name,
            "peer_host": conn.peer_host or peer_host,
            "peer_port": peer_port,
        },
    }


def consumer_json(request: web.Request, c: ConsumerView) -> dict[str, Any]:
    return consumer_dict(request.app[INFO]["node"], c)


def consumer_dict(node: str, c: ConsumerView) -> dict[str, Any]:
    # Listed from its connection's channels, so it always has both.
    conn, ch = c.connection, c.channel
    assert conn is not None and ch is not None
    peer_host, peer_port = host_port(conn.peer)
    return {
        "consumer_tag": c.tag,
        "queue": {"name": c.queue, "vhost": c.vhost},
        "channel_details": {
            "name": conn.channel_name(ch),
            "connection_name": conn.name,
            "node": node,
            "number": ch.number,
            "peer_host": conn.peer_host or peer_host,
            "peer_port": peer_port,
            "user": conn.user,
        },
        "ack_required": c.ack_required,
        # A consumer without a limit of its own shows its channel's.
        "prefetch_count": c.prefetch_count or ch.prefetch_count,
        "exclusive": c.exclusive,
        "arguments": jsonable(c.arguments),
        "active": c.active,
        "activity_status": "up" if c.active else "waiting",
    }


# In cluster mode a listing holds this node's live objects (views) and the
# other nodes' published ones (already rendered: dicts).
Conn = ConnectionView | dict[str, Any]
Chan = tuple[ConnectionView, ChannelView] | dict[str, Any]


def _peer_visible(request: web.Request, user: str, vhost: str | None, want: str | None) -> bool:
    me = user_of(request)
    return (sees_all(me) or user == me.name) and (want is None or vhost == want)


async def _all_connections(request: web.Request, vhost: str | None = None) -> list[Conn]:
    out: list[Conn] = list(_connections(request, vhost))
    snap = await cluster_snapshot(request)
    if snap is not None:
        out.extend(
            d
            for d in snap.connections()
            if _peer_visible(request, d.get("user", ""), d.get("vhost"), vhost)
        )
        out.sort(key=_name)
    return out


def _channels(conns: list[ConnectionView]) -> list[tuple[ConnectionView, ChannelView]]:
    return [(conn, ch) for conn in conns for ch in conn.channels]


async def _all_channels(request: web.Request, vhost: str | None = None) -> list[Chan]:
    out: list[Chan] = list(_channels(_connections(request, vhost)))
    snap = await cluster_snapshot(request)
    if snap is not None:
        out.extend(
            d
            for d in snap.channels()
            if _peer_visible(request, d.get("user", ""), d.get("vhost"), vhost)
        )
        out.sort(key=_channel_name)
    return out


# Listings render only what passes the filter and falls on the page.
def _name(c: Conn) -> str:
    return str(c["name"]) if isinstance(c, dict) else c.name


def _channel_name(item: Chan) -> str:
    if isinstance(item, dict):
        return str(item["name"])
    return item[0].channel_name(item[1])


def _connection_renderer(request: web.Request) -> Callable[[Conn], dict[str, Any]]:
    node = request.app[INFO]["node"]
    return lambda c: c if isinstance(c, dict) else connection_dict(node, c)


def _channel_renderer(request: web.Request) -> Callable[[Chan], dict[str, Any]]:
    node = request.app[INFO]["node"]
    return lambda item: item if isinstance(item, dict) else channel_dict(node, *item)


async def list_connections(request: web.Request) -> web.Response:
    conns = await _all_connections(request)
    return await listing(request, conns, _connection_renderer(request), _name)


async def list_vhost_connections(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    conns = await _all_connections(request, vh.name)
    return await listing(request, conns, _connection_renderer(request), _name)


async def _connection(request: web.Request) -> Conn:
    name = request.match_info["name"]
    for conn in _connections(request):
        if conn.name == name:
            return conn
    snap = await cluster_snapshot(request)
    if snap is not None:
        for d in snap.connections():
            if d.get("name") == name and _peer_visible(request, d.get("user", ""), None, None):
                return d
    not_found()


async def show_connection(request: web.Request) -> web.Response:
    return json_response(_connection_renderer(request)(await _connection(request)))


async def close_connection(request: web.Request) -> web.Response:
    view = await _connection(request)
    user = user_of(request)
    owner = view.get("user") if isinstance(view, dict) else view.user
    # As RabbitMQ: administrators close any connection, others their own.
    if not (is_admin(user) or owner == user.name):
        not_found()
    reason = request.headers.get("X-Reason", "Closed via management plugin")
    if not isinstance(view, dict):
        close_local(broker_of(request), view.name, reason)
        return web.Response(status=204)
    # Another node's: it closes it when told (and it is gone from the
    # listings once that node publishes again).
    cluster: ClusterView | None = request.app[INFO].get("cluster")
    snap = await cluster_snapshot(request)
    if cluster is not None and snap is not None:
        for peer in snap.peers:
            if any(d.get("name") == view["name"] for d in peer.connections):
                await cluster.close_connection(peer.epoch, str(view["name"]), reason)
    return web.Response(status=204)


def close_local(broker: Broker, name: str, reason: str) -> int:
    """Close this node's connection ``name`` (RabbitMQ's name) with 320;
    returns how many were closed."""
    closed = 0
    for conn in list(broker.connections):
        if conn.vhost is not None and conn.describe().name == name:
            conn.close(CONNECTION_FORCED, reason)
            closed += 1
    return closed


async def connection_channels(request: web.Request) -> web.Response:
    conn = await _connection(request)
    if isinstance(conn, dict):
        snap = await cluster_snapshot(request)
        peers = snap.channels() if snap is not None else []
        name = conn["name"]
        return json_response(
            [d for d in peers if d.get("connection_details", {}).get("name") == name]
        )
    return json_response([channel_json(request, conn, ch) for ch in conn.channels])


async def list_channels(request: web.Request) -> web.Response:
    chans = await _all_channels(request)
    return await listing(request, chans, _channel_renderer(request), _channel_name)


async def list_vhost_channels(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    chans = await _all_channels(request, vh.name)
    return await listing(request, chans, _channel_renderer(request), _channel_name)


async def show_channel(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    for conn, ch in _channels(_connections(request)):
        if conn.channel_name(ch) == name:
            data = channel_json(request, conn, ch)
            data["consumer_details"] = [
                consumer_json(request, read_models.consumer_view(c, conn, ch)) for c in ch.consumers
            ]
            return json_response(data)
    snap = await cluster_snapshot(request)
    if snap is not None:
        for d in snap.channels():
            if d.get("name") == name and _peer_visible(request, d.get("user", ""), None, None):
                data = dict(d)
                data["consumer_details"] = [
                    c for c in snap.consumers() if c.get("channel_details", {}).get("name") == name
                ]
                return json_response(data)
    not_found()


async def _consumers(request: web.Request, vhost: str | None = None) -> list[dict[str, Any]]:
    out = [
        consumer_json(request, c)
        for c in read_models.channel_consumers(_connections(request, vhost))
    ]
    snap = await cluster_snapshot(request)
    if snap is not None:
        for d in snap.consumers():
            details = d.get("channel_details", {})
            if _peer_visible(
                request, details.get("user", ""), d.get("queue", {}).get("vhost"), vhost
            ):
                out.append(d)
    return out


async def list_consumers(request: web.Request) -> web.Response:
    return json_response(await _consumers(request))


async def list_vhost_consumers(request: web.Request) -> web.Response:
    return json_response(await _consumers(request, vhost_of(request).name))


def register(app: web.Application) -> None:
    app.router.add_get("/api/connections", list_connections)
    app.router.add_get("/api/connections/{name}", show_connection)
    app.router.add_delete("/api/connections/{name}", close_connection)
    app.router.add_get("/api/connections/{name}/channels", connection_channels)
    app.router.add_get("/api/vhosts/{vhost}/connections", list_vhost_connections)
    app.router.add_get("/api/vhosts/{vhost}/channels", list_vhost_channels)
    app.router.add_get("/api/channels", list_channels)
    app.router.add_get("/api/channels/{name}", show_channel)
    app.router.add_get("/api/consumers", list_consumers)
    app.router.add_get("/api/consumers/{vhost}", list_vhost_consumers)
