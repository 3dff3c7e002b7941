"""A Celery application on quorum queues, which makes Celery (5.5+) use
RabbitMQ's "native delayed delivery" for countdown/ETA tasks: the worker
declares 28 topic exchanges ``celery_delayed_27`` … ``celery_delayed_0`` and
as many quorum queues with ``x-message-ttl`` 2^level s and
``x-dead-letter-exchange`` pointing at the next level, and a task published
with a countdown walks that chain (routing key = the countdown in binary)
until ``celery_delayed_delivery`` routes it to its real queue.

Only the broker URL (``ROOST_CELERY_BROKER_URL``) is roost-specific.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

BROKER_URL = os.environ.get("ROOST_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("roost_celery_quorum_test", broker=BROKER_URL, backend="rpc://")
app.conf.update(
    # Native delayed delivery needs a topic (or fanout) exchange in front of
    # the task queue; a direct exchange makes Celery fall back to holding ETA
    # tasks in the worker.
    task_queues=[
        Queue(
            "qcelery",
            Exchange("qcelery", type="topic"),
            routing_key="qcelery",
            queue_arguments={"x-queue-type": "quorum"},
        ),
    ],
    task_default_queue="qcelery",
    task_default_exchange="qcelery",
    task_default_exchange_type="topic",
    task_default_routing_key="qcelery",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=5,
    result_expires=60,
)


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def add(x: int, y: int) -> int:
    return x + y


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def delivery() -> dict[str, Any]:
    """How the task's message reached the worker."""
    request = delivery.request
    info = dict(request.delivery_info or {})
    return {
        "time": time.time(),
        "routing_key": info.get("routing_key"),
        "exchange": info.get("exchange"),
        # The dead-lettering history the broker added on the way.
        "x-death": [
            {key: death.get(key) for key in ("queue", "exchange", "reason", "count")}
            for death in request.get("x-death") or []
        ],
    }
