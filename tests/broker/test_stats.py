"""Message counters and rates (roost.broker.stats), driven on the broker
model with a fake clock: queue counters, vhost and overall totals (kept
when queues and vhosts are deleted), the fsync histogram, and rates over
the sampler's window as the management plugin's ``*_details.rate``."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from roost import properties
from roost.broker.broker import Broker
from roost.broker.message import Message
from roost.broker.queue import Queue
from roost.broker.stats import (
    QUEUE_KEYS,
    VHOST_KEYS,
    Histogram,
    Sampler,
    overall_counts,
    queue_counts,
    vhost_counts,
)
from roost.broker.vhost import VirtualHost

OWNER = object()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish(vh: VirtualHost, q: Queue, n: int = 1) -> None:
    for i in range(n):
        msg = Message("", q.name, properties.EMPTY, b"m%d" % i)
        vh.publish(vh.default_exchange, msg)


def counts(q: Queue) -> dict[str, int]:
    return dict(zip(QUEUE_KEYS, queue_counts(q), strict=True))


def totals(values: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(VHOST_KEYS, values, strict=True))


@pytest.fixture
def broker() -> Broker:
    return Broker()


def test_queue_counters(broker: Broker) -> None:
    vh = broker.vhosts["/"]
    q = vh.declare_queue("q", owner=OWNER)
    publish(vh, q, 3)
    a = q.get(no_ack=False)
    b = q.get(no_ack=True)
    assert a is not None and b is not None
    q.requeue([a])
    again = q.get(no_ack=False)
    assert again is not None and again.redelivered
    q.settle([again])
    assert counts(q) == {
        "publish": 3,
        "deliver_get": 3,
        "ack": 2,  # the no-ack get and the settled one
        "redeliver": 1,
        "dead_lettered": 0,
    }


def test_dead_lettered_counted_by_reason(broker: Broker) -> None:
    vh = broker.vhosts["/"]
    vh.declare_queue("dlq", owner=OWNER)
    q = vh.declare_queue(
        "q",
        owner=OWNER,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq"},
    )
    publish(vh, q, 2)
    e = q.get(no_ack=False)
    assert e is not None
    q.reject([e])
    assert counts(q)["dead_lettered"] == 1
    assert vh.queues["dlq"].message_count == 1
    assert vh.dead_lettered_by == {("rejected", "at_most_once"): 1}


def test_vhost_and_overall_totals_survive_deletion(broker: Broker) -> None:
    vh = broker.vhosts["/"]
    other = broker.add_vhost("other")
    q = vh.declare_queue("q", owner=OWNER)
    r = other.declare_queue("r", owner=OWNER)
    publish(vh, q, 4)
    publish(other, r, 2)
    for _ in range(4):
        assert q.get(no_ack=True) is not None
    assert r.get(no_ack=True) is not None
    other.confirmed += 2
    before = totals(overall_counts(broker))
    assert before["publish"] == 6
    assert before["deliver_get"] == 5
    assert before["ack"] == 5
    assert before["confirm"] == 2

    vh.delete_queue("q", owner=OWNER)
    assert totals(vhost_counts(vh))["deliver_get"] == 4  # kept after the queue went
    assert broker.delete_vhost("other")
    assert totals(overall_counts(broker)) == before


def test_rates_over_the_window(broker: Broker) -> None:
    clock = FakeClock()
    sampler = Sampler(broker, interval=5.0, window=20.0, clock=clock)
    vh = broker.vhosts["/"]
    q = vh.declare_queue("q", owner=OWNER)
    assert sampler.rates(("overall",)) is None  # no samples yet
    sampler.sample()
    publish(vh, q, 50)
    clock.now += 5
    sampler.sample()
    stats = sampler.message_stats(("queue", "/", "q"))
    assert stats["publish"] == 50
    assert stats["publish_details"] == {"rate": 10.0}
    assert stats["deliver_get_details"] == {"rate": 0.0}
    assert sampler.message_stats(("vhost", "/"))["publish_details"] == {"rate": 10.0}
    assert sampler.message_stats(("overall",))["publish_details"] == {"rate": 10.0}

    # Nothing more for a whole window: the rate falls back to zero.
    for _ in range(5):
        clock.now += 5
        sampler.sample()
    assert sampler.message_stats(("queue", "/", "q"))["publish_details"] == {"rate": 0.0}

    # Counts show at once; rates once sampled.
    publish(vh, q, 40)
    assert sampler.message_stats(("queue", "/", "q"))["publish"] == 90
    clock.now += 5
    sampler.sample()
    # 40 over the 20 s window.
    assert sampler.message_stats(("queue", "/", "q"))["publish_details"] == {"rate": 2.0}


def test_rate_never_negative_after_redeclare(broker: Broker) -> None:
    clock = FakeClock()
    sampler = Sampler(broker, interval=5.0, window=10.0, clock=clock)
    vh = broker.vhosts["/"]
    q = vh.declare_queue("q", owner=OWNER)
    publish(vh, q, 10)
    sampler.sample()
    vh.delete_queue("q", owner=OWNER)
    q = vh.declare_queue("q", owner=OWNER)
    publish(vh, q, 1)
    clock.now += 5
    sampler.sample()
    stats = sampler.message_stats(("queue", "/", "q"))
    assert stats["publish"] == 1
    assert stats["publish_details"] == {"rate": 0.0}


def test_unknown_objects_have_no_stats(broker: Broker) -> None:
    sampler = Sampler(broker, clock=FakeClock())
    assert sampler.message_stats(("queue", "/", "nope")) == {}
    assert sampler.message_stats(("vhost", "nope")) == {}
    ex = sampler.message_stats(("exchange", "/", "amq.direct"))
    assert ex == {"publish_in": 0, "publish_in_details": {"rate": 0.0}}


def test_sampler_runs_on_the_scheduler(broker: Broker) -> None:
    clock = FakeClock()
    timers: list[tuple[float, Callable[[], None]]] = []

    def scheduler(delay: float, fn: Callable[[], None]) -> None:
        timers.append((clock.now + delay, fn))

    sampler = Sampler(broker, interval=5.0, clock=clock)
    sampler.start(scheduler)
    sampler.start(scheduler)  # once only
    assert len(timers) == 2
    vh = broker.vhosts["/"]
    publish(vh, vh.declare_queue("q", owner=OWNER), 25)

    # The loop runs the lag timer 0.5 s late and the sampling one on time.
    timers.sort(key=lambda t: t[0])
    due, lag = timers.pop(0)
    clock.now = due + 0.5
    lag()
    assert sampler.loop_lag == pytest.approx(0.5)
    due, tick = next(t for t in timers if t[0] == 1005.0)
    clock.now = due
    tick()
    assert sampler.message_stats(("overall",))["publish_details"] == {"rate": 5.0}


def test_histogram_from_many_threads() -> None:
    h = Histogram((0.001, 0.01, 0.1))

    def work() -> None:
        for v in (0.0005, 0.005, 0.05, 0.5):
            for _ in range(250):
                h.observe(v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buckets, total, count = h.snapshot()
    assert buckets == [(0.001, 1000), (0.01, 2000), (0.1, 3000), (float("inf"), 4000)]
    assert count == 4000
    assert total == pytest.approx(1000 * (0.0005 + 0.005 + 0.05 + 0.5))
