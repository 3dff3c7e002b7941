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

import asyncio
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
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
    """Accumulates lines; ``take`` hands over what has been written so far,
    so that a renderer can yield to the event loop between families."""

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
        self.family_samples(name, samples)

    def family_samples(self, name: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
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

    def take(self) -> str:
        text = "".join(line + "\n" for line in self.lines)
        self.lines = []
        return text


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


def render(broker: Broker, per_object: bool = True) -> str:
    """Every metric, in the Prometheus text format (with ``per_object``,
    RabbitMQ's /metrics/per-object; without, its aggregated /metrics). Call
    it on the broker's event loop (it reads the broker's live state)."""
    return "".join(_chunks(broker, per_object))


# Samples rendered between two yields to the event loop.
_CHUNK = 2000


def _chunks(broker: Broker, per_object: bool) -> Iterator[str]:
    """The page in pieces of about ``_CHUNK`` samples. The broker may change
    between two pieces (a caller awaits in between): everything iterated is
    a snapshot taken up front, and a queue deleted meanwhile is still
    reported with its last values."""
    w = _Writer()
    vhosts = list(broker.vhosts.items())
    queues = [(vname, q) for vname, vh in vhosts for q in list(vh.queues.values())]
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

    yield w.take()

    # -- per queue (RabbitMQ's /metrics/per-object; summed in /metrics) --------
    def per_queue(name: str, kind: str, help_: str, value: Any) -> Iterator[str]:
        if not per_object:
            w.one(name, kind, help_, sum(value(q) for _, q in queues))
            return
        w.lines.append(f"# HELP {name} {help_}")
        w.lines.append(f"# TYPE {name} {kind}")
        for i in range(0, len(queues), _CHUNK):
            w.family_samples(
                name,
                [({"vhost": vn, "queue": q.name}, value(q)) for vn, q in queues[i : i + _CHUNK]],
            )
            yield w.take()

    yield from per_queue(
        "rabbitmq_queue_messages_ready",
        "gauge",
        "Messages ready to be delivered to consumers",
        lambda q: q.message_count,
    )
    yield from per_queue(
        "rabbitmq_queue_messages_unacked",
        "gauge",
        "Messages delivered to consumers but not yet acknowledged",
        lambda q: q.unacked,
    )
    yield from per_queue(
        "rabbitmq_queue_messages",
        "gauge",
        "Sum of ready and unacknowledged messages - total queue depth",
        lambda q: q.message_count + q.unacked,
    )
    yield from per_queue(
        "rabbitmq_queue_messages_ready_bytes",
        "gauge",
        "Size in bytes of ready messages",
        lambda q: q.ready_bytes,
    )
    yield from per_queue(
        "rabbitmq_queue_consumers",
        "gauge",
        "Consumers on a queue",
        lambda q: q.consumer_count,
    )
    yield from per_queue(
        "rabbitmq_queue_messages_published_total",
        "counter",
        "Total number of messages published to queues",
        lambda q: q.published,
    )
    yield from per_queue(
        "roost_queue_messages_delivered_total",
        "counter",
        "Total number of messages delivered from a queue (basic.deliver and basic.get)",
        lambda q: q.delivered,
    )
    yield from per_queue(
        "roost_queue_messages_acknowledged_total",
        "counter",
        "Total number of messages of a queue acknowledged",
        lambda q: q.acked,
    )
    yield from per_queue(
        "roost_queue_messages_redelivered_total",
        "counter",
        "Total number of messages of a queue redelivered",
        lambda q: q.redelivered,
    )
    yield from per_queue(
        "roost_queue_messages_dead_lettered_total",
        "counter",
        "Total number of messages dead-lettered (or dropped) from a queue",
        lambda q: q.dead_lettered,
    )

    # -- per exchange and vhost (per-object only) ----------------------------
    if per_object:
        exchanges = [(vname, ex) for vname, vh in vhosts for ex in list(vh.exchanges.values())]
        name = "roost_exchange_messages_published_in_total"
        w.lines.append(f"# HELP {name} Total number of messages published to an exchange")
        w.lines.append(f"# TYPE {name} counter")
        for i in range(0, len(exchanges), _CHUNK):
            w.family_samples(
                name,
                [
                    ({"vhost": vname, "exchange": ex.name}, ex.published)
                    for vname, ex in exchanges[i : i + _CHUNK]
                ],
            )
            yield w.take()
        vhost_counts = {vname: stats.vhost_counts(vh) for vname, vh in vhosts}
        for i, key in enumerate(stats.VHOST_KEYS):
            w.family(
                f"roost_vhost_messages_{key}_total",
                "counter",
                f"Total number of messages by vhost: {key} (as in management message_stats)",
                [({"vhost": vname}, counts[i]) for vname, counts in vhost_counts.items()],
            )
        yield w.take()

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
    yield w.take()


@dataclass(frozen=True)
class MetricsOptions:
    per_object: bool = False  # /metrics as /metrics/per-object
    auth: bool = False  # /metrics and /metrics/per-object need a management user
    cache_seconds: float = 5.0


class _Page:
    """One endpoint's rendered page, reused for ``cache_seconds``; scrapes
    arriving while it renders share that render."""

    def __init__(
        self,
        broker: Broker,
        per_object: bool,
        cache_seconds: float,
        extra: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self._broker = broker
        self._extra = extra
        self._per_object = per_object
        self._cache_seconds = cache_seconds
        self._body = b""
        self._rendered_at = -math.inf
        self._rendering: asyncio.Task[bytes] | None = None

    async def get(self) -> bytes:
        loop = asyncio.get_running_loop()
        if loop.time() - self._rendered_at < self._cache_seconds:
            return self._body
        if self._rendering is None:
            self._rendering = loop.create_task(self._render())
        # Shielded: a scraper that hangs up does not cancel the others' render.
        return await asyncio.shield(self._rendering)

    async def _render(self) -> bytes:
        try:
            parts: list[bytes] = []
            for chunk in _chunks(self._broker, self._per_object):
                parts.append(chunk.encode())
                await asyncio.sleep(0)  # let AMQP connections run between chunks
            if self._extra is not None:
                parts.append((await self._extra()).encode())
            self._body = b"".join(parts)
            self._rendered_at = asyncio.get_running_loop().time()
            return self._body
        finally:
            self._rendering = None


def register_metrics(
    app: Any,
    broker: Broker,
    options: MetricsOptions,
    extra: Callable[[], Awaitable[str]] | None = None,
) -> None:
    """Serve RabbitMQ's aggregated metrics at GET /metrics (or per-object
    ones with ``options.per_object``) and per-object ones at GET
    /metrics/per-object of an aiohttp application; ``extra`` renders more
    series appended to both (a cluster node's)."""
    from aiohttp import web

    from roost.http.common import MANAGEMENT_TAGS, HTTPError, error, login

    def handler(page: _Page) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def metrics(request: web.Request) -> web.Response:
            if options.auth:
                # The same login as the API's: throttled, loopback_users
                # honoured, failures logged.
                realm = {"WWW-Authenticate": 'Basic realm="RabbitMQ Management"'}
                try:
                    user = login(broker, request.headers.get("Authorization"), request.remote or "")
                except HTTPError as exc:
                    return error(exc.status, exc.error, exc.reason, **realm)
                if not MANAGEMENT_TAGS.intersection(user.tags):
                    return error(401, "not_authorized", "Login failed", **realm)
            return web.Response(body=await page.get(), headers={"Content-Type": CONTENT_TYPE})

        return metrics

    per_object = _Page(broker, True, options.cache_seconds, extra)
    main = per_object if options.per_object else _Page(broker, False, options.cache_seconds, extra)
    app.router.add_get("/metrics", handler(main))
    app.router.add_get("/metrics/per-object", handler(per_object))
