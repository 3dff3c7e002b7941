"""/api/overview, /api/whoami and the health checks."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roost import __version__
from roost.broker import read_models
from roost.broker.exchange import EXCHANGE_TYPES
from roost.broker.read_models import host_port
from roost.http.cluster_view import sum_stats
from roost.http.common import (
    INFO,
    broker_of,
    cluster_snapshot,
    json_response,
    user_of,
    vhost_of,
    visible_vhosts,
)

# The RabbitMQ version whose management API this one follows.
RABBITMQ_VERSION = "3.10.8"


def _rate(value: int) -> dict[str, Any]:
    return {"rate": 0.0}


async def overview(request: web.Request) -> web.Response:
    broker = broker_of(request)
    info = request.app[INFO]
    vhosts = visible_vhosts(request)
    totals = read_models.totals(vhosts)
    names = {vh.name for vh in vhosts}
    conns = [c for c in read_models.connections(broker) if c.vhost in names]
    channels = sum(len(c.channels) for c in conns)
    connections = len(conns)
    consumers, ready, unacked = (
        totals.consumers,
        totals.messages_ready,
        totals.messages_unacknowledged,
    )
    message_stats = broker.stats.message_stats(("overall",))
    cluster_name = info["node"]
    listeners = [{"node": info["node"], **listener} for listener in info["listeners"]]
    cluster = await cluster_snapshot(request)
    if cluster is not None:
        # The whole cluster: the other nodes' connections, channels and
        # shares of the queues, as each last published them.
        cluster_name = cluster.cluster_name or cluster_name
        connections += sum(1 for d in cluster.connections() if d.get("vhost") in names)
        channels += sum(1 for d in cluster.channels() if d.get("vhost") in names)
        for vh in vhosts:
            for q in vh.queues.values():
                f = cluster.queue(q)
                if q.peers is None:  # else consumer_count is the cluster's
                    consumers += f.consumers
                ready += f.buffered
                unacked += f.unacked
        message_stats = sum_stats([message_stats, *(p.stats for p in cluster.peers)])
        for peer in cluster.peers:
            host, port = host_port(peer.amqp_address)
            if port is not None:
                listeners.append(
                    {"node": peer.node, "protocol": "amqp", "ip_address": host, "port": port}
                )
    data: dict[str, Any] = {
        "management_version": RABBITMQ_VERSION,
        "rates_mode": "none",
        "exchange_types": [
            {"name": name, "description": f"AMQP {name} exchange", "enabled": True}
            for name in sorted(EXCHANGE_TYPES)
        ],
        "product_version": __version__,
        "product_name": "roost",
        "rabbitmq_version": RABBITMQ_VERSION,
        "cluster_name": cluster_name,
        "disable_stats": False,
        "enable_queue_totals": False,
        "message_stats": message_stats,
        "queue_totals": {
            "messages": ready + unacked,
            "messages_details": _rate(ready + unacked),
            "messages_ready": ready,
            "messages_ready_details": _rate(ready),
            "messages_unacknowledged": unacked,
            "messages_unacknowledged_details": _rate(unacked),
        },
        "object_totals": {
            "channels": channels,
            "connections": connections,
            "consumers": consumers,
            "exchanges": totals.exchanges,
            "queues": totals.queues,
        },
        "statistics_db_event_queue": 0,
        "node": info["node"],
        "listeners": listeners,
        "contexts": [],
    }
    return json_response(data)


async def whoami(request: web.Request) -> web.Response:
    user = user_of(request)
    return json_response({"name": user.name, "tags": list(user.tags)})


async def aliveness_test(request: web.Request) -> web.Response:
    # RabbitMQ declares a queue, publishes and consumes a message; roost's
    # broker runs on this very event loop, so answering at all shows it
    # is alive. The vhost must exist and be accessible.
    vhost_of(request)
    return json_response({"status": "ok"})


async def alarms(request: web.Request) -> web.Response:
    broker = broker_of(request)
    if broker.alarms:
        return json_response(
            {
                "status": "failed",
                "reason": "resource alarm(s) in effect in the cluster",
                "alarms": [
                    {"node": request.app[INFO]["node"], "resource": r}
                    for r in sorted(broker.alarms)
                ],
            },
            status=503,
        )
    return json_response({"status": "ok"})


async def node_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def register(app: web.Application) -> None:
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/whoami", whoami)
    app.router.add_get("/api/aliveness-test/{vhost}", aliveness_test)
    app.router.add_get("/api/health/checks/alarms", alarms)
    app.router.add_get("/api/healthchecks/node", node_health)
    app.router.add_get("/api/healthchecks/node/{node}", node_health)
