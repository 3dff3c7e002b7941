"""/api/connections, /api/channels and /api/consumers, with RabbitMQ's
names: a connection is "peer -> local" ("127.0.0.1:54321 ->
127.0.0.1:5672"), its channels that name followed by " (number)"."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roost.amqp.channel import Channel
from roost.amqp.connection import AMQPConnection
from roost.broker.consumer import Consumer
from roost.broker.errors import CONNECTION_FORCED
from roost.broker.fields import jsonable
from roost.http.common import (
    INFO,
    broker_of,
    is_admin,
    json_response,
    listing,
    not_found,
    sees_all,
    user_of,
    vhost_of,
)


def _conn_name(conn: AMQPConnection) -> str:
    local = ""
    if conn.transport is not None:
        sock = conn.transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            local = f"{sock[0]}:{sock[1]}"
        elif sock:
            local = str(sock)
    return f"{conn.peer} -> {local}"


def _host_port(address: str) -> tuple[str, int | None]:
    host, _, port = address.rpartition(":")
    return (host, int(port)) if port.isdigit() else (address, None)


def _connections(request: web.Request, vhost: str | None = None) -> list[AMQPConnection]:
    """Open AMQP connections the user may see: all of them for
    administrators and monitoring users, otherwise its own (as RabbitMQ)."""
    user = user_of(request)
    out = []
    for conn in broker_of(request).connections:
        if not isinstance(conn, AMQPConnection) or conn.vhost is None:
            continue
        if vhost is not None and conn.vhost.name != vhost:
            continue
        if sees_all(user) or conn.username == user.name:
            out.append(conn)
    return sorted(out, key=_conn_name)


def connection_json(request: web.Request, conn: AMQPConnection) -> dict[str, Any]:
    name = _conn_name(conn)
    host, port = _host_port(name.partition(" -> ")[2])
    peer_host, peer_port = _host_port(conn.peer)
    props = jsonable(conn.client_properties)
    ssl = conn.transport is not None and conn.transport.get_extra_info("ssl_object") is not None
    return {
        "name": name,
        "node": request.app[INFO]["node"],
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "user": conn.username,
        "vhost": conn.vhost.name if conn.vhost is not None else None,
        "state": "running" if conn.state == "open" else conn.state,
        "channels": len(conn.channels),
        "channel_max": conn.channel_max,
        "frame_max": conn.frame_max,
        "timeout": conn.heartbeat,
        "client_properties": props,
        "user_provided_name": props.get("connection_name") if isinstance(props, dict) else None,
        "host": host,
        "port": port,
        "peer_host": conn.peer_host or peer_host,
        "peer_port": peer_port,
        "ssl": ssl,
        "auth_mechanism": "EXTERNAL" if conn.cert_name else "PLAIN",
    }


def _channel_name(ch: Channel) -> str:
    return f"{_conn_name(ch.conn)} ({ch.number})"


def channel_json(request: web.Request, ch: Channel) -> dict[str, Any]:
    conn = ch.conn
    peer_host, peer_port = _host_port(conn.peer)
    return {
        "name": _channel_name(ch),
        "node": request.app[INFO]["node"],
        "number": ch.number,
        "user": conn.username,
        "vhost": ch.vhost.name,
        "state": "running" if ch.flow_active else "flow",
        "consumer_count": len(ch.consumers),
        "messages_unacknowledged": len(ch.unacked),
        "messages_unconfirmed": 0,
        "messages_uncommitted": len(ch._tx_publishes),
        "acks_uncommitted": len(ch._tx_settles),
        "prefetch_count": ch.prefetch_count,
        "global_prefetch_count": ch.global_prefetch,
        "confirm": ch.confirm,
        "transactional": ch.tx,
        "connection_details": {
            "name": _conn_name(conn),
            "peer_host": conn.peer_host or peer_host,
            "peer_port": peer_port,
        },
    }


def consumer_json(request: web.Request, ch: Channel, c: Consumer) -> dict[str, Any]:
    conn = ch.conn
    peer_host, peer_port = _host_port(conn.peer)
    active = c.queue.active_consumer
    return {
        "consumer_tag": c.tag,
        "queue": {"name": c.queue.name, "vhost": c.queue.vhost.name},
        "channel_details": {
            "name": _channel_name(ch),
            "connection_name": _conn_name(conn),
            "node": request.app[INFO]["node"],
            "number": ch.number,
            "peer_host": conn.peer_host or peer_host,
            "peer_port": peer_port,
            "user": conn.username,
        },
        "ack_required": not c.no_ack,
        "prefetch_count": c.prefetch or ch.prefetch_count,
        "exclusive": c.exclusive,
        "arguments": jsonable(c.arguments),
        "active": active is None or active is c,
        "activity_status": "up" if active is None or active is c else "waiting",
    }


def _channels(conns: list[AMQPConnection]) -> list[Channel]:
    return [ch for conn in conns for _, ch in sorted(conn.channels.items())]


async def list_connections(request: web.Request) -> web.Response:
    return listing(request, [connection_json(request, c) for c in _connections(request)])


async def list_vhost_connections(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    conns = _connections(request, vh.name)
    return listing(request, [connection_json(request, c) for c in conns])


def _connection(request: web.Request) -> AMQPConnection:
    name = request.match_info["name"]
    for conn in _connections(request):
        if _conn_name(conn) == name:
            return conn
    not_found()


async def show_connection(request: web.Request) -> web.Response:
    return json_response(connection_json(request, _connection(request)))


async def close_connection(request: web.Request) -> web.Response:
    conn = _connection(request)
    user = user_of(request)
    # As RabbitMQ: administrators close any connection, others their own.
    if not (is_admin(user) or conn.username == user.name):
        not_found()
    reason = request.headers.get("X-Reason", "Closed via management plugin")
    conn.close(CONNECTION_FORCED, reason)
    return web.Response(status=204)


async def connection_channels(request: web.Request) -> web.Response:
    conn = _connection(request)
    return json_response([channel_json(request, ch) for ch in _channels([conn])])


async def list_channels(request: web.Request) -> web.Response:
    chans = _channels(_connections(request))
    return listing(request, [channel_json(request, ch) for ch in chans])


async def list_vhost_channels(request: web.Request) -> web.Response:
    vh = vhost_of(request)
    chans = _channels(_connections(request, vh.name))
    return listing(request, [channel_json(request, ch) for ch in chans])


async def show_channel(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    for ch in _channels(_connections(request)):
        if _channel_name(ch) == name:
            data = channel_json(request, ch)
            data["consumer_details"] = [
                consumer_json(request, ch, c) for c in ch.consumers.values()
            ]
            return json_response(data)
    not_found()


def _consumers(request: web.Request, vhost: str | None = None) -> list[dict[str, Any]]:
    return [
        consumer_json(request, ch, c)
        for ch in _channels(_connections(request, vhost))
        for c in ch.consumers.values()
    ]


async def list_consumers(request: web.Request) -> web.Response:
    return json_response(_consumers(request))


async def list_vhost_consumers(request: web.Request) -> web.Response:
    return json_response(_consumers(request, vhost_of(request).name))


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
