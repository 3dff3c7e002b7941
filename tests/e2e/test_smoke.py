"""The simplest round trip, with each kind of fixture."""

from __future__ import annotations

from typing import cast

import pika

from roost.testing import RoostBroker, RoostProcess


def _round_trip(url: str) -> bytes:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"hello")
        method, _, body = ch.basic_get(q, auto_ack=True)
        assert method is not None
        return cast(bytes, body)
    finally:
        conn.close()


def test_in_process_broker(roost_broker: RoostBroker) -> None:
    assert _round_trip(roost_broker.url) == b"hello"


def test_subprocess_broker(roost_process: RoostProcess) -> None:
    assert _round_trip(roost_process.url) == b"hello"
    assert roost_process.terminate() == 0
