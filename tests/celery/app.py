"""A plain Celery application, configured as a Celery user would configure it
for RabbitMQ; only the broker URL (``ROOST_CELERY_BROKER_URL``) points at roost.

Run a worker for it with::

    ROOST_CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:PORT// \\
        python -m celery -A tests.celery.app worker --pool=solo -E -l info

Queues: ``celery`` (the default, classic) and ``prio`` (classic with
``x-max-priority`` 10). Results go back over the ``rpc://`` backend.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

BROKER_URL = os.environ.get("ROOST_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("roost_celery_test", broker=BROKER_URL, backend="rpc://")
app.conf.update(
    task_queues=[
        Queue("celery", Exchange("celery", type="direct"), routing_key="celery"),
        Queue(
            "prio",
            Exchange("prio", type="direct"),
            routing_key="prio",
            queue_arguments={"x-max-priority": 10},
        ),
    ],
    task_default_queue="celery",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # One task at a time, acknowledged after it ran. Celery raises this
    # prefetch by one per ETA task it holds (basic.qos while consuming).
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=5,
    result_expires=60,
    worker_send_task_events=True,
    task_send_sent_event=True,
)

# Attempts per retry-task key, kept in the worker process (one, pool=solo).
_attempts: dict[str, int] = {}
# Order in which ``record`` tasks ran, per label prefix.
_order: dict[str, list[str]] = {}


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def add(x: int, y: int) -> int:
    return x + y


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def stamp() -> float:
    """The worker's wall-clock time when the task ran."""
    return time.time()


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def delivery() -> dict[str, Any]:
    """How the task's message reached the worker."""
    info = dict(delivery.request.delivery_info or {})
    return {
        "time": time.time(),
        "routing_key": info.get("routing_key"),
        "exchange": info.get("exchange"),
        "priority": info.get("priority"),
    }


@app.task(bind=True, max_retries=5)  # type: ignore[untyped-decorator]  # celery is untyped
def flaky(self: Any, key: str, failures: int) -> dict[str, Any]:
    """Fail ``failures`` times (retrying after 1 s each time), then succeed."""
    n = _attempts.get(key, 0) + 1
    _attempts[key] = n
    if n <= failures:
        raise self.retry(exc=RuntimeError(f"attempt {n} fails"), countdown=1)
    return {"attempts": n, "retries": self.request.retries}


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def record(group: str, label: str) -> list[str]:
    """Append ``label`` to ``group``'s run order and return the order so far."""
    order = _order.setdefault(group, [])
    order.append(label)
    return list(order)


@app.task  # type: ignore[untyped-decorator]  # celery is untyped
def boom(message: str) -> None:
    raise ValueError(message)
