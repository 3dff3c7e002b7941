"""A Celery application (tests/celery/app.py), unchanged except for its broker
URL, and a real ``celery worker`` subprocess, on roost: tasks with the rpc://
result backend, retries, countdown/ETA tasks held by the worker, priority
queues, remote control (ping, inspect, add/cancel consumer) and events."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.celery import app as celery_app
from tests.celery.worker import CeleryWorker, roost_and_worker, wait_for

app = celery_app.app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def worker() -> Iterator[CeleryWorker]:
    with roost_and_worker("tests.celery.app", "-E") as (broker, worker):
        # The test process is the client: same app, same broker URL.
        app.conf.broker_url = broker.url
        try:
            yield worker
        finally:
            app.close()
            if worker.proc is not None and worker.proc.poll() is not None:
                print(worker.log)


def test_task_round_trip_with_rpc_backend(worker: CeleryWorker) -> None:
    results = [celery_app.add.delay(i, 10 * i) for i in range(5)]
    assert [r.get(timeout=10) for r in results] == [11 * i for i in range(5)]
    assert all(r.state == "SUCCESS" for r in results)


def test_task_failure_comes_back_through_rpc_backend(worker: CeleryWorker) -> None:
    result = celery_app.boom.delay("no such thing")
    with pytest.raises(ValueError, match="no such thing"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert "ValueError" in (result.traceback or "")


def test_retry_with_countdown_until_success(worker: CeleryWorker) -> None:
    sent = time.time()
    result = celery_app.flaky.delay("twice", 2)
    assert result.get(timeout=15) == {"attempts": 3, "retries": 2}
    # Two retries, each one second later than the attempt before.
    assert time.time() - sent >= 1.9


def test_countdown_and_eta_tasks_run_after_their_time(worker: CeleryWorker) -> None:
    sent = time.time()
    by_countdown = celery_app.stamp.apply_async(countdown=3)
    by_eta = celery_app.stamp.apply_async(eta=datetime.now(UTC) + timedelta(seconds=3))
    # Meanwhile both wait in the worker (unacknowledged, as Celery does with
    # classic queues), and the worker still answers control commands.
    inspector = app.control.inspect(destination=[worker.hostname], timeout=1, limit=1)

    def scheduled_ids() -> set[str]:
        scheduled = inspector.scheduled() or {}
        return {entry["request"]["id"] for entry in scheduled.get(worker.hostname, [])}

    # (Celery raises the prefetch count by one per ETA task it holds, so the
    # second one is delivered only after that basic.qos.)
    both = {by_countdown.id, by_eta.id}
    wait_for("both tasks to be scheduled", lambda: scheduled_ids() == both, timeout=2.5)
    # Holding them does not stop the worker from taking other tasks.
    assert celery_app.add.delay(1, 2).get(timeout=2) == 3
    assert scheduled_ids() == both
    ran_countdown = by_countdown.get(timeout=10)
    ran_eta = by_eta.get(timeout=10)
    assert ran_countdown >= sent + 2.9
    assert ran_eta >= sent + 2.9


def test_higher_priority_tasks_run_first(worker: CeleryWorker) -> None:
    # Stop the worker consuming from "prio" (how many messages a busy worker
    # would still prefetch depends on Celery's lazy prefetch bookkeeping, so
    # "while it is busy" is made exact this way), queue tasks of mixed
    # priorities, then let it consume again: it must get them by priority.
    reply = app.control.cancel_consumer("prio", destination=[worker.hostname], reply=True)
    assert reply == [{worker.hostname: {"ok": "no longer consuming from prio"}}]
    results = {
        p: celery_app.record.apply_async(("prio-order", f"p{p}"), queue="prio", priority=p)
        for p in (1, 5, 0, 9, 3)
    }
    with app.connection_for_write() as conn:
        channel = conn.channel()
        ok = channel.queue_declare("prio", passive=True)
        assert (ok.message_count, ok.consumer_count) == (5, 0)
    reply = app.control.add_consumer("prio", destination=[worker.hostname], reply=True)
    assert reply == [{worker.hostname: {"ok": "add consumer prio"}}]
    orders = [r.get(timeout=10) for r in results.values()]
    assert max(orders, key=len) == ["p9", "p5", "p3", "p1", "p0"]
    assert results[9].get() == ["p9"]


def test_celery_inspect_ping_cli(worker: CeleryWorker) -> None:
    done = worker.celery_cli("inspect", "ping", "-d", worker.hostname, "-t", "5", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {worker.hostname: {"ok": "pong"}}


def test_control_ping_and_inspect_from_the_app(worker: CeleryWorker) -> None:
    replies = app.control.ping(destination=[worker.hostname], timeout=5, limit=1)
    assert replies == [{worker.hostname: {"ok": "pong"}}]
    inspector = app.control.inspect(destination=[worker.hostname], timeout=5, limit=1)
    queues = inspector.active_queues()
    assert queues is not None
    assert sorted(q["name"] for q in queues[worker.hostname]) == ["celery", "prio"]
    prio = next(q for q in queues[worker.hostname] if q["name"] == "prio")
    assert prio["queue_arguments"] == {"x-max-priority": 10}
    stats = inspector.stats()
    assert stats is not None
    assert stats[worker.hostname]["broker"]["transport"] == "amqp"


def test_add_and_cancel_consumer_control_commands(worker: CeleryWorker) -> None:
    reply = app.control.add_consumer(
        "extra", exchange="extra", routing_key="extra", destination=[worker.hostname], reply=True
    )
    assert reply == [{worker.hostname: {"ok": "add consumer extra"}}]
    assert celery_app.add.apply_async((20, 22), queue="extra").get(timeout=10) == 42

    reply = app.control.cancel_consumer("extra", destination=[worker.hostname], reply=True)
    assert reply == [{worker.hostname: {"ok": "no longer consuming from extra"}}]
    inspector = app.control.inspect(destination=[worker.hostname], timeout=5, limit=1)
    queues = inspector.active_queues()
    assert queues is not None
    assert "extra" not in {q["name"] for q in queues[worker.hostname]}
    # No consumer any more: a task sent there now stays in the queue.
    pending = celery_app.add.apply_async((1, 1), queue="extra")
    with app.connection_for_write() as conn:
        channel = conn.channel()

        def queued() -> int:
            return int(channel.queue_declare("extra", passive=True).message_count)

        assert wait_for("the task to be queued", queued) == 1
        assert pending.state == "PENDING"
        channel.queue_purge("extra")


def test_worker_events(worker: CeleryWorker) -> None:
    events: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": events.append})
        capture = threading.Thread(
            target=receiver.capture,
            kwargs={"limit": None, "timeout": None, "wakeup": False},
            daemon=True,
        )
        capture.start()
        try:
            # The worker sends a heartbeat every 2 s; seeing one means the
            # receiver's queue is bound, so no task event can be missed.
            wait_for(
                "a worker-heartbeat",
                lambda: any(
                    e["type"] == "worker-heartbeat" and e["hostname"] == worker.hostname
                    for e in list(events)
                ),
            )
            result = celery_app.add.delay(3, 4)
            assert result.get(timeout=10) == 7

            def task_events() -> list[str]:
                seen = [e["type"] for e in list(events) if e.get("uuid") == result.id]
                return seen if "task-succeeded" in seen else []

            seen = wait_for("task-succeeded", task_events)
        finally:
            receiver.should_stop = True
            capture.join(5)
    # task-sent comes from this process, the rest from the worker, over two
    # connections: only the worker's own events have an order.
    assert sorted(seen) == ["task-received", "task-sent", "task-started", "task-succeeded"]
    worker_events = [t for t in seen if t != "task-sent"]
    assert worker_events == ["task-received", "task-started", "task-succeeded"]
    succeeded = next(e for e in events if e["type"] == "task-succeeded" and e["uuid"] == result.id)
    assert succeeded["result"] == "7"
    assert succeeded["hostname"] == worker.hostname
