"""Prometheus metrics in the text exposition format (version 0.0.4).

Names follow RabbitMQ's rabbitmq_prometheus plugin where it has one: the
aggregated node-wide ``rabbitmq_global_*`` counters, the totals
(``rabbitmq_connections``, ``rabbitmq_queues``...) and the per-object queue
metrics of its ``/metrics/per-object`` endpoint, labelled by ``vhost`` and
``queue``. Roost's own are prefixed ``roost_``: the message store's fsync
latency and disk usage, the event loop's lag and the resource alarms.

Rendered by hand rather than through prometheus_client's registry: the
values are all read from the broker at scrape time (no state to keep in
a registry), and the broker keeps no runtime dependency for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from roost.broker import read_models, stats
from roost.store.message_store import MessageStore

if TYPE_CHECKING:
    from roost.broker.broker import Broker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# rabbitmq_global_* counters: (name, help, key in stats.VHOST_KEYS).
_GLOBAL = (
    ("messages_received_total", "Total number of messages received from publishers", "publish"),
    (
        "messages_confirmed_total",
        "Total number of messages confirmed to publishers",
        "confirm",
    ),
    (
        "messages_unroutable_returned_total",
        "Total number of messages published as mandatory into an exchange and returned "
        "to the publisher as unroutable",
        "return_unroutable",
    ),
    (
        "messages_unroutable_dropped_total",
        "Total number of messages published as non-mandatory into an exchange and "
        "dropped as unroutable",
        "drop_unroutable",
    ),
    (
        "messages_delivered_total",
        "Total number of messages delivered to consumers (basic.deliver and basic.get)",
        "deliver_get",
    ),
    (
        "messages_redelivered_total",
        "Total number of messages redelivered to consumers",
        "redeliver",
    ),
    (
        "messages_acknowledged_total",
        "Total number of messages acknowledged by consumers",
        "ack",
    ),
    (
        "messages_get_empty_total",
        "Total number of times basic.get operations fetched no message",
        "get_empty",
    ),
)

_DEAD_LETTER_HELP = {
    "expired": "Total number of messages dead-lettered due to message TTL exceeded",
    "rejected": "Total number of messages dead-lettered due to basic.reject or basic.nack",
    "maxlen": "Total number of messages dead-lettered due to overflow drop-head or "
    "reject-publish-dlx",
    "delivery_limit": "Total number of messages dead-lettered due to delivery-limit exceeded",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def one(self, name: str, kind: str, help_: str, value: float) -> None:
        self.family(name, kind, help_, [({}, value)])

    def histogram(self, name: str, help_: str, h: stats.Histogram) -> None:
        buckets, total, count = h.snapshot()
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, n in buckets:
            self.lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {n}')
        self.lines.append(f"{name}_sum {_num(total)}")
        self.lines.append(f"{name}_count {count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _store_bytes(store: MessageStore) -> int:
    """Bytes of the message log's files (segments and their .acks)."""
    total = 0
    try:
        with os.scandir(store.dir) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue  # deleted while scanning (compaction)
    except OSError:
        pass
    return total


def render(broker: Broker) -> str:
    """Every metric, in the Prometheus text format. Call it on the broker's
    event loop (it reads the broker's live state)."""
    w = _Writer()
    queues = [(vname, q) for vname, vh in broker.vhosts.items() for q in vh.queues.values()]
    channels = sum(len(c.channels) for c in read_models.connections(broker))
    consumers = read_models.totals(broker.vhosts.values()).consumers

    # -- totals ------------------------------------------------------------
    w.one("rabbitmq_connections", "gauge", "Connections currently open", len(broker.connections))
    w.one("rabbitmq_channels", "gauge", "Channels currently open", channels)
    w.one("rabbitmq_queues", "gauge", "Queues available", len(queues))
    w.one("rabbitmq_consumers", "gauge", "Consumers currently connected", consumers)

    # -- global message counters -------------------------------------------
    overall = dict(zip(stats.VHOST_KEYS, stats.overall_counts(broker), strict=True))
    for name, help_, key in _GLOBAL:
        w.one("rabbitmq_global_" + name, "counter", help_, overall[key])
    by_reason = stats.dead_lettered_by(broker)
    for reason, help_ in _DEAD_LETTER_HELP.items():
        w.family(
            f"rabbitmq_global_messages_dead_lettered_{reason}_total",
            "counter",
            help_,
            [
                (
                    {"queue_type": "rabbit_classic_queue", "dead_letter_strategy": strategy},
                    by_reason.get((reason, strategy), 0),
                )
                for strategy in ("at_most_once", "disabled")
            ],
        )

    # -- per queue (RabbitMQ's /metrics/per-object) ---------------------------
    def per_queue(name: str, kind: str, help_: str, value: Any) -> None:
        w.family(
            name,
            kind,
            help_,
            [({"vhost": vname, "queue": q.name}, value(q)) for vname, q in queues],
        )

    per_queue(
        "rabbitmq_queue_messages_ready",
        "gauge",
        "Messages ready to be delivered to consumers",
        lambda q: q.message_count,
    )
    per_queue(
        "rabbitmq_queue_messages_unacked",
        "gauge",
        "Messages delivered to consumers but not yet acknowledged",
        lambda q: q.unacked,
    )
    per_queue(
        "rabbitmq_queue_messages",
        "gauge",
        "Sum of ready and unacknowledged messages - total queue depth",
        lambda q: q.message_count + q.unacked,
    )
    per_queue(
        "rabbitmq_queue_messages_ready_bytes",
        "gauge",
        "Size in bytes of ready messages",
        lambda q: q.ready_bytes,
    )
    per_queue(
        "rabbitmq_queue_consumers",
        "gauge",
        "Consumers on a queue",
        lambda q: q.consumer_count,
    )
    per_queue(
        "rabbitmq_queue_messages_published_total",
        "counter",
        "Total number of messages published to queues",
        lambda q: q.published,
    )
    per_queue(
        "roost_queue_messages_delivered_total",
        "counter",
        "Total number of messages delivered from a queue (basic.deliver and basic.get)",
        lambda q: q.delivered,
    )
    per_queue(
        "roost_queue_messages_acknowledged_total",
        "counter",
        "Total number of messages of a queue acknowledged",
        lambda q: q.acked,
    )
    per_queue(
        "roost_queue_messages_redelivered_total",
        "counter",
        "Total number of messages of a queue redelivered",
        lambda q: q.redelivered,
    )
    per_queue(
        "roost_queue_messages_dead_lettered_total",
        "counter",
        "Total number of messages dead-lettered (or dropped) from a queue",
        lambda q: q.dead_lettered,
    )

    # -- per exchange and vhost ---------------------------------------------
    w.family(
        "roost_exchange_messages_published_in_total",
        "counter",
        "Total number of messages published to an exchange",
        [
            ({"vhost": vname, "exchange": ex.name}, ex.published)
            for vname, vh in broker.vhosts.items()
            for ex in vh.exchanges.values()
        ],
    )
    vhost_counts = {vname: stats.vhost_counts(vh) for vname, vh in broker.vhosts.items()}
    for i, key in enumerate(stats.VHOST_KEYS):
        w.family(
            f"roost_vhost_messages_{key}_total",
            "counter",
            f"Total number of messages by vhost: {key} (as in management message_stats)",
            [({"vhost": vname}, counts[i]) for vname, counts in vhost_counts.items()],
        )

    # -- roost's own -------------------------------------------------------
    store = broker.journal
    if isinstance(store, MessageStore):
        w.histogram(
            "roost_store_fsync_seconds",
            "Duration of the message store's fdatasync calls",
            store.fsync_seconds,
        )
        w.one(
            "roost_store_bytes",
            "gauge",
            "Disk space used by the message store's files",
            _store_bytes(store),
        )
    w.one(
        "roost_event_loop_lag_seconds",
        "gauge",
        "How late the broker's event loop ran its last periodic timer",
        broker.stats.loop_lag,
    )
    w.family(
        "roost_alarms",
        "gauge",
        "Resource alarms in effect (1: publishers are blocked)",
        [
            ({"alarm": a}, int(a in broker.alarms))
            for a in sorted(broker.alarms | {"disk", "memory"})
        ],
    )
    for name, alarm, help_ in (
        ("rabbitmq_alarms_free_disk_space_watermark", "disk", "disk alarm"),
        ("rabbitmq_alarms_memory_used_watermark", "memory", "memory alarm"),
    ):
        w.one(name, "gauge", f"is 1 if the {help_} is in effect", int(alarm in broker.alarms))
    return w.text()


def register_metrics(app: Any, broker: Broker) -> None:
    """Serve ``render(broker)`` at GET /metrics of an aiohttp application."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=render(broker).encode(),
            headers={"Content-Type": CONTENT_TYPE},
        )

    app.router.add_get("/metrics", metrics)
