"""Compaction: a segment kept alive by a few messages gives the space of its
settled records back (hole punching), and what it still holds survives a
SIGKILL intact, in order; nothing settled comes back."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from roost.store import holes
from roost.testing import RoostProcess

SEGMENT = 1024 * 1024
BODY = 1024
N = 4000  # about four segments
KEEP_EVERY = 200  # runs of ~200 KiB settled records between kept ones


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data", "--http-port", "-1", "--segment-size", str(SEGMENT))
    try:
        yield p.start()
    finally:
        p.close()


def body(i: int) -> bytes:
    return str(i).encode().ljust(BODY, b"-")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def old_segments(proc: RoostProcess) -> list[Path]:
    """Every segment but the newest (the one being written is never compacted)."""
    return sorted((proc.data_dir / "messages").glob("*.seg"))[:-1]


def test_sparse_segments_are_compacted_and_survive_sigkill(proc: RoostProcess) -> None:
    probe = proc.data_dir / "probe"
    probe.write_bytes(b"x" * 3 * holes.BLOCK)
    with open(probe, "r+b") as f:
        if not holes.punch_hole(f.fileno(), holes.BLOCK, holes.BLOCK):
            pytest.skip("this filesystem cannot punch holes")
    probe.unlink()

    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    ch.queue_declare("keep", durable=True)
    ch.queue_declare("drain", durable=True)
    ch.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    for i in range(N):
        ch.basic_publish("", "keep" if i % KEEP_EVERY == 0 else "drain", body(i), persistent)
    segments = old_segments(proc)
    assert len(segments) >= 3
    before = sum(allocated(s) for s in segments)
    assert before >= 0.9 * len(segments) * SEGMENT

    ch.basic_qos(prefetch_count=500)
    to_drain = N - N // KEEP_EVERY
    for drained, (method, _props, _body) in enumerate(
        ch.consume("drain", inactivity_timeout=5), start=1
    ):
        assert method is not None, f"drained only {drained - 1}"
        if drained % 100 == 0 or drained == to_drain:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if drained == to_drain:
            break
    ch.cancel()
    # Acks are written asynchronously (a crash may bring an acked message
    # back, as with RabbitMQ); a confirmed persistent publish is written
    # after every ack sent before it, so once it is confirmed they are on disk.
    ch.queue_declare("marker", durable=True)
    ch.basic_publish("", "marker", b"m", persistent)
    conn.close()

    # About 2% of each old segment is still needed: compaction runs one
    # segment at a time after the batches that settle their records.
    deadline = time.monotonic() + 20
    while sum(allocated(s) for s in segments if s.exists()) > before / 4:
        assert time.monotonic() < deadline, [(s.name, allocated(s)) for s in segments]
        time.sleep(0.1)
    assert all(s.exists() for s in segments)  # kept alive, not deleted

    proc.restart()  # SIGKILL, then start on the same data directory
    conn = pika.BlockingConnection(pika.URLParameters(proc.url))
    ch = conn.channel()
    assert ch.queue_declare("drain", passive=True).method.message_count == 0
    kept = []
    while True:
        method, _props, got = ch.basic_get("keep", auto_ack=True)
        if method is None:
            break
        kept.append(got)
    conn.close()
    assert kept == [body(i) for i in range(0, N, KEEP_EVERY)]
