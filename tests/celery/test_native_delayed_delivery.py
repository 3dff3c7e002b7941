"""Celery's native delayed delivery (Celery 5.5+, used with quorum queues) on
roost: the worker builds 28 levels of topic exchanges and quorum queues with
``x-message-ttl`` + ``x-dead-letter-exchange``; a countdown/ETA task is
published to ``celery_delayed_27`` with its delay in binary as the routing
key, is parked in the queue of each set bit for 2^level seconds, and is
dead-lettered down the chain to ``celery_delayed_delivery`` and on to its
real queue (tests/celery/quorum_app.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kombu.transport.native_delayed_delivery import level_name

from tests.celery import quorum_app
from tests.celery.worker import CeleryWorker, roost_and_worker, wait_for

app = quorum_app.app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def worker() -> Iterator[CeleryWorker]:
    with roost_and_worker("tests.celery.quorum_app") as (broker, worker):
        app.conf.broker_url = broker.url
        try:
            yield worker
        finally:
            app.close()


def _message_counts(*names: str) -> dict[str, int]:
    with app.connection_for_write() as conn:
        channel = conn.channel()
        return {n: int(channel.queue_declare(n, passive=True).message_count) for n in names}


def _delayed_key(seconds: int, routing_key: str) -> str:
    return ".".join(f"{seconds:028b}") + "." + routing_key


def test_worker_declares_the_delay_chain(worker: CeleryWorker) -> None:
    assert "Failed to setup delayed delivery" not in worker.log
    with app.connection_for_write() as conn:
        channel = conn.channel()
        for level in range(28):
            ok = channel.queue_declare(level_name(level), passive=True)
            assert (ok.message_count, ok.consumer_count) == (0, 0)
            channel.exchange_declare(level_name(level), "topic", passive=True)
        channel.exchange_declare("celery_delayed_delivery", "topic", passive=True)
        # Declaring a level again with Celery's own arguments is accepted:
        # the queue really has them (an inequivalent one would be a 406).
        channel.queue_declare(
            level_name(3),
            durable=True,
            auto_delete=False,
            arguments={
                "x-queue-type": "quorum",
                "x-overflow": "reject-publish",
                "x-message-ttl": 8000,
                "x-dead-letter-exchange": level_name(2),
                "x-dead-letter-strategy": "at-least-once",
            },
        )
    assert quorum_app.add.delay(2, 3).get(timeout=10) == 5


def test_countdown_task_walks_the_delay_chain(worker: CeleryWorker) -> None:
    sent = time.time()
    two = quorum_app.delivery.apply_async(countdown=2)  # bit 1: 2 s in level 1
    three = quorum_app.delivery.apply_async(countdown=3)  # bits 1, 0: 2 s + 1 s
    # Not held by the worker: both wait in the level-1 queue.
    assert wait_for(
        "both tasks parked in celery_delayed_1",
        lambda: _message_counts(level_name(1)) == {level_name(1): 2},
        timeout=1.5,
    )

    ran_two = two.get(timeout=10)
    assert ran_two["time"] >= sent + 1.9
    assert ran_two["routing_key"] == _delayed_key(2, "qcelery")
    assert ran_two["exchange"] == level_name(0)
    assert ran_two["x-death"] == [
        {"queue": level_name(1), "exchange": level_name(27), "reason": "expired", "count": 1}
    ]

    ran_three = three.get(timeout=10)
    assert ran_three["time"] >= sent + 2.9
    assert ran_three["routing_key"] == _delayed_key(3, "qcelery")
    assert ran_three["exchange"] == "celery_delayed_delivery"
    # Newest death first, as RabbitMQ orders x-death.
    assert ran_three["x-death"] == [
        {"queue": level_name(0), "exchange": level_name(0), "reason": "expired", "count": 1},
        {"queue": level_name(1), "exchange": level_name(27), "reason": "expired", "count": 1},
    ]
    counts = _message_counts(*(level_name(n) for n in range(28)))
    assert set(counts.values()) == {0}


def test_eta_task_uses_native_delayed_delivery(worker: CeleryWorker) -> None:
    sent = time.time()
    result = quorum_app.delivery.apply_async(eta=datetime.now(UTC) + timedelta(seconds=2))
    ran = result.get(timeout=10)
    assert ran["time"] >= sent + 1.0
    # The countdown Celery computed from the ETA (1 s or 2 s, rounded down)
    # is in the routing key: the task went through the delay chain.
    prefix, _, rest = ran["routing_key"].rpartition(".qcelery")
    assert rest == ""
    delay = int(prefix.replace(".", ""), 2)
    assert delay in (1, 2)
    assert ran["x-death"][0]["reason"] == "expired"
