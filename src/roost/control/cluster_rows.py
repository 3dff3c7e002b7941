"""``roost ctl`` listings over a whole cluster: the rows a node's runtime
commands return for its own objects, completed with the other nodes'
published views (``roost.http.cluster_view``), each row naming its node.
"""

from __future__ import annotations

from typing import Any

from roost.broker.broker import Broker
from roost.control.commands import vhost_name_arg
from roost.http.cluster_view import ClusterSnapshot, merged_queue

# The commands whose rows this completes.
CLUSTER_LISTINGS = frozenset(
    {"list_queues", "list_connections", "list_channels", "list_consumers", "status"}
)


def _peer(d: dict[str, Any], host: str = "peer_host", port: str = "peer_port") -> str:
    return f"{d.get(host, '')}:{d.get(port, '')}"


def complete(
    broker: Broker,
    node: str,
    command: str,
    args: dict[str, Any],
    result: Any,
    snap: ClusterSnapshot,
) -> Any:
    """``result`` of ``command`` (this node's) with the cluster's figures
    and the other nodes' objects."""
    if command == "list_queues":
        vh = broker.vhosts[vhost_name_arg(broker, args)]
        for row in result:
            q = vh.queues.get(row["name"])
            if q is None:
                continue
            m = merged_queue(q, snap)
            row.update(
                messages=m.messages,
                ready=m.messages_ready,
                unacked=m.messages_unacknowledged,
                consumers=m.consumers,
                node=snap.homes.get((vh.name, q.name), node),
            )
        return result
    if command == "status":
        result["cluster_name"] = snap.cluster_name
        result["nodes"] = [node, *(p.node for p in snap.peers)]
        result["cluster_connections"] = result["connections"] + len(snap.connections())
        return result
    vhost = vhost_name_arg(broker, args) if "vhost" in args else None
    for row in result:
        row["node"] = node
    if command == "list_connections":
        result += [
            {
                "node": d.get("node", ""),
                "peer": _peer(d),
                "user": d.get("user", ""),
                "vhost": d.get("vhost", ""),
                "channels": d.get("channels", 0),
                "tls": d.get("ssl", False),
                "connected_s": None,
                "client": str((d.get("client_properties") or {}).get("product", "")),
            }
            for d in snap.connections()
            if vhost is None or d.get("vhost") == vhost
        ]
    elif command == "list_channels":
        result += [
            {
                "node": d.get("node", ""),
                "connection": _peer(d.get("connection_details") or {}),
                "number": d.get("number", 0),
                "user": d.get("user", ""),
                "consumers": d.get("consumer_count", 0),
                "unacked": d.get("messages_unacknowledged", 0),
                "prefetch": d.get("prefetch_count", 0),
                "confirm": d.get("confirm", False),
                "tx": d.get("transactional", False),
            }
            for d in snap.channels()
            if vhost is None or d.get("vhost") == vhost
        ]
    elif command == "list_consumers":
        want = vhost_name_arg(broker, args)
        for d in snap.consumers():
            queue = d.get("queue") or {}
            if queue.get("vhost") != want:
                continue
            details = d.get("channel_details") or {}
            result.append(
                {
                    "node": details.get("node", ""),
                    "queue": queue.get("name", ""),
                    "tag": d.get("consumer_tag", ""),
                    "connection": _peer(details),
                    "channel": details.get("number", 0),
                    "ack_required": d.get("ack_required", True),
                    "prefetch": d.get("prefetch_count", 0),
                    "exclusive": d.get("exclusive", False),
                }
            )
    return result
