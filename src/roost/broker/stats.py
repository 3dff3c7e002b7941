"""Message counters and rates, as RabbitMQ's ``message_stats``.

The hot paths only bump plain integer attributes: queues count what they
take in and hand out (``Queue.published``, ``delivered``, ``acked``,
``redelivered``, ``dead_lettered``), exchanges what is published to them
(``Exchange.published``), and a virtual host what only a channel sees
(publishes received, confirms, unroutable messages returned or dropped,
empty basic.gets). Totals per vhost and overall are summed from those
when asked; a deleted queue's (or vhost's) counts are folded into its
vhost's (or the broker's) ``retired`` totals first, so totals never go
backwards.

Rates come from a :class:`Sampler` that snapshots every counter each
``interval`` seconds into a small ring; a rate is the increase over the
samples in the window divided by the time between them, as the management
plugin's ``publish_details: {rate: ...}``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from roost.broker.broker import Broker
    from roost.broker.exchange import Exchange
    from roost.broker.queue import Queue
    from roost.broker.vhost import VirtualHost

Scheduler = Callable[[float, Callable[[], None]], Any]

# Per-queue counters, in the order of queue_counts().
QUEUE_KEYS = ("publish", "deliver_get", "ack", "redeliver", "dead_lettered")
# Per-vhost and overall counters, in the order of vhost_counts().
VHOST_KEYS = (
    "publish",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "get_empty",
    "deliver_get",
    "ack",
    "redeliver",
    "dead_lettered",
)
EXCHANGE_KEYS = ("publish_in",)

Key = tuple[str, ...]


def queue_counts(q: Queue) -> tuple[int, ...]:
    return (q.published, q.delivered, q.acked, q.redelivered, q.dead_lettered)


def exchange_counts(ex: Exchange) -> tuple[int, ...]:
    return (ex.published,)


def retire_queue(vhost: VirtualHost, q: Queue) -> None:
    """``q`` is being deleted: keep what it delivered, acked... in its
    vhost's totals (its publishes are counted by the vhost itself)."""
    r = vhost.retired
    _, dg, ak, rd, dl = queue_counts(q)
    r[0] += dg
    r[1] += ak
    r[2] += rd
    r[3] += dl


def vhost_counts(vh: VirtualHost) -> tuple[int, ...]:
    dg, ak, rd, dl = vh.retired
    for q in vh.queues.values():
        dg += q.delivered
        ak += q.acked
        rd += q.redelivered
        dl += q.dead_lettered
    return (vh.published, vh.confirmed, vh.returned, vh.dropped, vh.get_empty, dg, ak, rd, dl)


def retire_vhost(broker: Broker, vh: VirtualHost) -> None:
    """``vh`` is being deleted: keep its counts in the broker's totals."""
    broker.retired_counts = _add(broker.retired_counts, vhost_counts(vh))
    merged = broker.retired_dead_lettered
    for k, n in vh.dead_lettered_by.items():
        merged[k] = merged.get(k, 0) + n


def overall_counts(broker: Broker) -> tuple[int, ...]:
    total = broker.retired_counts
    for vh in broker.vhosts.values():
        total = _add(total, vhost_counts(vh))
    return total


def dead_lettered_by(broker: Broker) -> dict[tuple[str, str], int]:
    """Dead-lettered messages by (reason, strategy), over every vhost."""
    merged = dict(broker.retired_dead_lettered)
    for vh in broker.vhosts.values():
        for k, n in vh.dead_lettered_by.items():
            merged[k] = merged.get(k, 0) + n
    return merged


def _add(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class Histogram:
    """A Prometheus-style histogram that any thread may observe into (the
    store's writer thread times its fsyncs; the loop thread renders)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = 0
        for bound in self.buckets:
            if value <= bound:
                break
            i += 1
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """(cumulative count per upper bound, +Inf last), sum, count."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total, running


class Sampler:
    """Snapshots every counter each ``interval`` seconds; rates over the
    last ``window`` seconds of samples."""

    def __init__(
        self,
        broker: Broker,
        interval: float = 5.0,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.interval = interval
        self.window = window
        self.clock = clock
        self._ring: deque[tuple[float, dict[Key, tuple[int, ...]]]] = deque(
            maxlen=max(2, int(window / interval) + 1)
        )
        self._started = False
        # Event-loop lag: how late the last periodic timer fired.
        self.loop_lag = 0.0
        self.lag_interval = 1.0
        self._lag_due = 0.0

    # -- sampling -------------------------------------------------------

    def snapshot(self) -> dict[Key, tuple[int, ...]]:
        broker = self.broker
        snap: dict[Key, tuple[int, ...]] = {}
        total = broker.retired_counts
        for vname, vh in broker.vhosts.items():
            counts = vhost_counts(vh)
            snap[("vhost", vname)] = counts
            total = _add(total, counts)
            for qname, q in vh.queues.items():
                snap[("queue", vname, qname)] = queue_counts(q)
            for xname, ex in vh.exchanges.items():
                if ex.published:
                    snap[("exchange", vname, xname)] = (ex.published,)
        snap[("overall",)] = total
        return snap

    def sample(self) -> None:
        self._ring.append((self.clock(), self.snapshot()))

    def start(self, scheduler: Scheduler) -> None:
        """Sample every ``interval`` and measure the loop lag every
        ``lag_interval`` seconds on the broker's event loop."""
        if self._started:
            return
        self._started = True
        self.sample()

        def tick() -> None:
            self.sample()
            scheduler(self.interval, tick)

        def lag() -> None:
            self.loop_lag = max(0.0, self.clock() - self._lag_due)
            self._lag_due = self.clock() + self.lag_interval
            scheduler(self.lag_interval, lag)

        scheduler(self.interval, tick)
        self._lag_due = self.clock() + self.lag_interval
        scheduler(self.lag_interval, lag)

    # -- rates ----------------------------------------------------------

    def rates(self, key: Key) -> tuple[float, ...] | None:
        """Per-second increase of each counter of ``key`` over the window,
        or None with fewer than two samples of it."""
        ring = self._ring
        if len(ring) < 2:
            return None
        t1, last = ring[-1]
        newest = last.get(key)
        if newest is None:
            return None
        for t0, snap in ring:
            if t1 - t0 <= self.window + 1e-9 and t0 < t1:
                oldest = snap.get(key)
                if oldest is None and key[0] == "exchange":
                    # Snapshots skip exchanges nothing was published to
                    # yet: absent means zero, not unknown.
                    oldest = (0,) * len(newest)
                if oldest is not None:
                    dt = t1 - t0
                    # Never negative: a queue deleted and declared again
                    # starts from zero.
                    return tuple(max(0, b - a) / dt for a, b in zip(oldest, newest, strict=True))
        return None

    def message_stats(self, key: Key) -> dict[str, Any]:
        """``{publish: n, publish_details: {rate: r}, ...}`` for ``("overall",)``,
        ``("vhost", name)``, ``("queue", vhost, name)`` or
        ``("exchange", vhost, name)``; counts are current, rates sampled."""
        counts, names = self._current(key)
        if counts is None:
            return {}
        rates = self.rates(key) or (0.0,) * len(names)
        out: dict[str, Any] = {}
        for name, n, r in zip(names, counts, rates, strict=True):
            out[name] = n
            out[name + "_details"] = {"rate": round(r, 1)}
        return out

    def _current(self, key: Key) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
        broker = self.broker
        kind = key[0]
        if kind == "overall":
            return overall_counts(broker), VHOST_KEYS
        vh = broker.vhosts.get(key[1])
        if vh is None:
            return None, ()
        if kind == "vhost":
            return vhost_counts(vh), VHOST_KEYS
        if kind == "queue":
            q = vh.queues.get(key[2])
            return (queue_counts(q) if q is not None else None), QUEUE_KEYS
        if kind == "exchange":
            ex = vh.exchanges.get(key[2])
            return (exchange_counts(ex) if ex is not None else None), EXCHANGE_KEYS
        raise ValueError(f"unknown stats key {key!r}")
