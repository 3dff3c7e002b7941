"""A cluster node's own Prometheus series, appended to its ``/metrics``
(which stays per node: Prometheus scrapes every node).

``rabbitmq_identity_info`` names the node and the cluster, as RabbitMQ's
plugin does, so that a dashboard can tell the scraped nodes apart; the
``roost_cluster_*`` series show the node's view of the cluster and the
work of its message layer (the group-commit writer and the claims).
"""

from __future__ import annotations

from collections.abc import Iterable

from roost.broker.stats import Histogram
from roost.cluster.node_messages import NodeMessages
from roost.cluster.node_views import NodeViews
from roost.cluster.nodes import NodeRegistry


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value}" for labels, value in samples]
    return lines


def _histogram(name: str, help_: str, h: Histogram) -> list[str]:
    buckets, total, count = h.snapshot()
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for bound, n in buckets:
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        lines.append(f'{name}_bucket{{le="{le}"}} {n}')
    lines += [f"{name}_sum {total!r}", f"{name}_count {count}"]
    return lines


async def render(
    registry: NodeRegistry, views: NodeViews | None, messages: NodeMessages | None
) -> str:
    snap = await views.snapshot() if views is not None else None
    cluster = snap.cluster_name if snap is not None else ""
    node, name = _escape(registry.name), _escape(cluster)
    identity = f'{{rabbitmq_node="{node}",rabbitmq_cluster="{name}"}}'
    lines = _family(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
        [(identity, 1)],
    )
    lines += _family(
        "roost_cluster_nodes",
        "gauge",
        "Live nodes of the cluster, as this node last read them",
        [("", 1 + (len(snap.peers) if snap is not None else 0))],
    )
    lines += _family(
        "roost_cluster_epoch", "gauge", "This node's current incarnation", [("", registry.epoch)]
    )
    if messages is not None:
        w, c = messages.writer, messages.claimer
        lines += _family(
            "roost_cluster_writer_batches_total",
            "counter",
            "Transactions committed by the node's group-commit writer",
            [("", w.transactions)],
        )
        lines += _family(
            "roost_cluster_writer_rows_total",
            "counter",
            "Message rows written by the node's group-commit writer",
            [("", w.rows_written)],
        )
        lines += _family(
            "roost_cluster_writer_pending_rows",
            "gauge",
            "Message rows enqueued on the writer and not yet committed",
            [("", w.pending_rows)],
        )
        lines += _histogram(
            "roost_cluster_writer_commit_seconds",
            "Round trip of each batch the writer committed (one transaction)",
            w.commit_seconds,
        )
        lines += _family(
            "roost_cluster_claims_total",
            "counter",
            "Claim statements run for this node's consumers",
            [("", c.claims)],
        )
        lines += _family(
            "roost_cluster_claimed_rows_total",
            "counter",
            "Message rows claimed for this node's consumers",
            [("", c.claimed_rows)],
        )
    return "".join(line + "\n" for line in lines)
