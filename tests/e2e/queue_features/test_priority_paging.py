"""Priority queues longer than memory: each priority level is paged to the
message log behind its head, and messages still come out highest priority
first, FIFO within a priority, across paging, the memory alarm and a
restart after SIGKILL."""

from __future__ import annotations

import random
from pathlib import Path

import pika
import pytest

from roost.broker.queue import Queue
from roost.resources import MEMORY_ALARM
from roost.testing import RoostBroker, RoostProcess

LIMIT = 256 * 1024  # queue_memory_limit: a few hundred 1 KiB messages
BODY = 1024
MAX_PRIORITY = 9


def body(i: int, size: int = BODY) -> bytes:
    return str(i).encode().ljust(size, b".")


def number(raw: bytes) -> int:
    return int(raw.rstrip(b"."))


class Model:
    """What a priority queue must hand out next: highest priority, then
    oldest."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []  # (priority, number)

    def add(self, priority: int, i: int) -> None:
        self.items.append((priority, i))

    def take(self) -> int:
        best = max(self.items, key=lambda pi: (pi[0], -pi[1]))
        self.items.remove(best)
        return best[1]


def paged(b: RoostBroker, name: str) -> int:
    assert b.server is not None
    q: Queue = b.server.broker.vhosts["/"].queues[name]
    return b.call(lambda: q.message_count - q.backing.in_memory())


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_interleaved_publish_and_get_follow_priority_order(persistent: bool) -> None:
    rnd = random.Random(7)
    with RoostBroker(http_port=-1, queue_memory_limit=LIMIT) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.queue_declare("pq", durable=persistent, arguments={"x-max-priority": MAX_PRIORITY})
        model = Model()
        most_paged = 0
        i = 0
        for _round in range(6):
            for _ in range(rnd.randrange(300, 900)):
                # Priorities above x-max-priority count as the maximum; no
                # priority as 0.
                p = rnd.choice([None, 0, 1, 3, 5, 9, 12])
                props = pika.BasicProperties(priority=p, delivery_mode=2 if persistent else 1)
                ch.basic_publish("", "pq", body(i), props)
                model.add(min(p or 0, MAX_PRIORITY), i)
                i += 1
            most_paged = max(most_paged, paged(b, "pq"))
            for _ in range(rnd.randrange(100, 600)):
                method, _props, got = ch.basic_get("pq", auto_ack=True)
                assert method is not None
                assert number(got) == model.take()
        assert most_paged > 1000  # most of it was in the log, not in memory
        while model.items:
            method, _props, got = ch.basic_get("pq", auto_ack=True)
            assert method is not None
            assert number(got) == model.take()
        assert ch.basic_get("pq", auto_ack=True)[0] is None
        conn.close()


def test_consumer_and_requeue_keep_priority_order() -> None:
    with RoostBroker(http_port=-1, queue_memory_limit=LIMIT) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.queue_declare("pq2", arguments={"x-max-priority": MAX_PRIORITY})
        model = Model()
        for i in range(2000):
            p = (i * 7) % 10
            ch.basic_publish("", "pq2", body(i), pika.BasicProperties(priority=p))
            model.add(p, i)
        assert paged(b, "pq2") > 1000
        # Take three without acking and give them back: they return to
        # their places at the head of their levels.
        tags = []
        for _ in range(3):
            method, _props, _got = ch.basic_get("pq2")
            assert method is not None
            tags.append(method.delivery_tag)
        ch.basic_nack(tags[-1], multiple=True, requeue=True)
        ch.basic_qos(prefetch_count=50)
        got: list[int] = []
        for method, _props, raw in ch.consume("pq2", inactivity_timeout=5):
            assert method is not None, f"stalled after {len(got)}"
            got.append(number(raw))
            ch.basic_ack(method.delivery_tag)
            if len(got) == 2000:
                break
        ch.cancel()
        conn.close()
        assert got == [model.take() for _ in range(2000)]


def test_memory_alarm_pages_priority_levels_out() -> None:
    n = 300
    with RoostBroker(http_port=-1) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.queue_declare("pq3", arguments={"x-max-priority": 5})
        model = Model()
        for i in range(n):
            ch.basic_publish(
                "", "pq3", body(10 * i, 10 * BODY), pika.BasicProperties(priority=i % 5)
            )
            model.add(i % 5, 10 * i)
        assert paged(b, "pq3") == 0  # under the default 128 MB limit
        assert b.server is not None
        broker = b.server.broker
        b.call(lambda: broker.set_alarm(MEMORY_ALARM))
        # Down to ~1 MiB (about 100 of these), the head of each level kept.
        assert paged(b, "pq3") >= n - 1024 * 1024 // (10 * BODY)
        b.call(lambda: broker.clear_alarm(MEMORY_ALARM))
        for _ in range(n):
            method, _props, got = ch.basic_get("pq3", auto_ack=True)
            assert method is not None
            assert number(got) == model.take()
        conn.close()


def test_priority_order_survives_sigkill_of_a_deep_queue(tmp_path: Path) -> None:
    """Restored messages come back in log order; a deep priority queue must
    still serve the newest high-priority messages first."""
    roost = RoostProcess(
        tmp_path / "data", "--http-port", "-1", "--queue-memory-limit", str(LIMIT)
    ).start()
    try:
        conn = pika.BlockingConnection(pika.URLParameters(roost.url))
        ch = conn.channel()
        ch.queue_declare("pq4", durable=True, arguments={"x-max-priority": MAX_PRIORITY})
        ch.confirm_delivery()
        model = Model()
        for i in range(5000):
            p = 9 if i >= 4990 else i % 3
            ch.basic_publish("", "pq4", body(i), pika.BasicProperties(priority=p, delivery_mode=2))
            model.add(p, i)
        conn.close()
        roost.restart()  # SIGKILL, start again
        conn = pika.BlockingConnection(pika.URLParameters(roost.url))
        ch = conn.channel()
        for _ in range(5000):
            method, _props, got = ch.basic_get("pq4", auto_ack=True)
            assert method is not None
            assert number(got) == model.take()
        conn.close()
    finally:
        roost.close()
