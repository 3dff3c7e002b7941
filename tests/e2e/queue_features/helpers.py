"""Helpers shared by the queue-feature end-to-end tests (pika based)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

Got = tuple[Any, pika.BasicProperties, bytes]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def get(ch: BlockingChannel, queue: str, timeout: float = 5.0, auto_ack: bool = True) -> Got:
    """basic.get, polling until a message arrives (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=auto_ack)
        if m is not None:
            return m, p, b
        if time.monotonic() > deadline:
            raise AssertionError(f"no message on {queue} within {timeout}s")
        time.sleep(0.01)


def drain(ch: BlockingChannel, queue: str) -> list[bytes]:
    """Every ready message's body, in delivery order (auto-acked)."""
    out: list[bytes] = []
    while True:
        m, _, b = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append(b)


def count(ch: BlockingChannel, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).method.message_count)


def declare_error(
    conn: pika.BlockingConnection, name: str, arguments: dict[str, Any], durable: bool = False
) -> str:
    """Declare a queue expecting a channel error; return "code text"."""
    c = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as err:
        c.queue_declare(name, durable=durable, arguments=arguments)
    assert conn.is_open
    return f"{err.value.reply_code} {err.value.reply_text}"


def dlq_setup(ch: BlockingChannel) -> tuple[str, str]:
    """A fanout dead-letter exchange bound to a fresh queue: (exchange, queue)."""
    dlx = unique("dlx")
    ch.exchange_declare(dlx, "fanout", auto_delete=True)
    dlq = ch.queue_declare(unique("dlq"), exclusive=True).method.queue
    ch.queue_bind(dlq, dlx)
    return dlx, dlq
