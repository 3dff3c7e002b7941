"""x-delivery-limit across a broker crash: a durable queue's delivery counts
are in the log, so a restart neither resets ``x-delivery-count`` nor gives a
poison message fresh attempts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostProcess

PERSISTENT = pika.BasicProperties(delivery_mode=2)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data")
    try:
        yield p.start()
    finally:
        p.close()
        print("".join(p.output))  # shown when a test fails


def connect(proc: RoostProcess) -> tuple[pika.BlockingConnection, BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def setup(ch: BlockingChannel, q: str, arguments: dict[str, Any]) -> None:
    ch.exchange_declare("dlx", "fanout", durable=True)
    ch.queue_declare("dlq", durable=True)
    ch.queue_bind("dlq", "dlx")
    ch.queue_declare("sync", durable=True)
    ch.queue_declare(q, durable=True, arguments={"x-dead-letter-exchange": "dlx", **arguments})
    ch.basic_publish("", q, b"poison", PERSISTENT)


def get_unsettled(ch: BlockingChannel, q: str) -> tuple[int, bool, object]:
    """basic.get without ack, polling: (tag, redelivered, x-delivery-count)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m, p, _ = ch.basic_get(q, auto_ack=False)
        if m is not None:
            return m.delivery_tag, m.redelivered, (p.headers or {}).get("x-delivery-count")
        time.sleep(0.01)
    raise AssertionError(f"nothing in {q}")


def bounce(ch: BlockingChannel, q: str, times: int) -> list[object]:
    counts = []
    for _ in range(times):
        tag, _, c = get_unsettled(ch, q)
        counts.append(c)
        ch.basic_nack(tag, requeue=True)
    return counts


def crash_after_sync(proc: RoostProcess, ch: BlockingChannel) -> None:
    """A confirmed persistent publish: its fsync covers every log entry
    made before it (deliveries included). Then SIGKILL and restart."""
    ch.basic_publish("", "sync", b"sync", PERSISTENT)
    proc.kill()
    proc.start()


def test_delivery_count_continues_after_sigkill(proc: RoostProcess) -> None:
    conn, ch = connect(proc)
    setup(ch, "poison-q", {"x-delivery-limit": 4})
    assert bounce(ch, "poison-q", 3) == [None, 1, 2]
    get_unsettled(ch, "poison-q")  # 4th delivery, in flight at the crash
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    try:
        _, redelivered, c = get_unsettled(ch, "poison-q")
        assert (redelivered, c) == (True, 4)
        ch.basic_nack(_, requeue=True)  # 5 deliveries > limit 4: dead-lettered
        assert ch.basic_get("poison-q")[0] is None
        _, p, body = ch.basic_get("dlq", auto_ack=True)
        assert body == b"poison"
        assert p.headers["x-death"][0]["reason"] == "delivery_limit"
    finally:
        conn.close()


def test_message_past_the_limit_at_the_crash_is_dead_lettered(proc: RoostProcess) -> None:
    conn, ch = connect(proc)
    setup(ch, "poison-q", {"x-delivery-limit": 1})
    assert bounce(ch, "poison-q", 1) == [None]
    _, _, c = get_unsettled(ch, "poison-q")  # the last allowed delivery
    assert c == 1
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    # Not a fresh attempt: it goes where a nack would have sent it.
    assert ch.basic_get("poison-q", auto_ack=True)[0] is None
    _, p, body = ch.basic_get("dlq", auto_ack=True)
    assert body == b"poison"
    assert p.headers["x-death"][0]["reason"] == "delivery_limit"
    # And it stays settled through another crash.
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    try:
        assert ch.basic_get("poison-q", auto_ack=True)[0] is None
        assert ch.basic_get("dlq", auto_ack=True)[0] is None
    finally:
        conn.close()


def test_quorum_queue_count_survives_two_crashes(proc: RoostProcess) -> None:
    conn, ch = connect(proc)
    setup(ch, "qq", {"x-queue-type": "quorum"})
    assert bounce(ch, "qq", 2) == [None, 1]
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    assert bounce(ch, "qq", 1) == [2]
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    try:
        tag, redelivered, c = get_unsettled(ch, "qq")
        assert (redelivered, c) == (True, 3)
        ch.basic_ack(tag)
    finally:
        conn.close()


def test_queue_without_limit_is_only_marked_redelivered(proc: RoostProcess) -> None:
    conn, ch = connect(proc)
    setup(ch, "plain", {})
    bounce(ch, "plain", 2)
    crash_after_sync(proc, ch)
    conn, ch = connect(proc)
    try:
        _, redelivered, c = get_unsettled(ch, "plain")
        assert (redelivered, c) == (True, None)
    finally:
        conn.close()
