"""A full disk: publishers are blocked and unconfirmed, nothing confirmed is
lost, and the broker carries on by itself once space returns.

Runs the broker on a small tmpfs mounted for the test (needs root, as in CI;
skipped where mounting is not allowed).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as H
from pamqp.body import ContentBody

from roost.testing import RoostProcess
from tests.conftest import RawClient

BODY = 64 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _publish(raw: RawClient, body: bytes) -> None:
    props = C.Basic.Properties(delivery_mode=2)
    raw.send(
        pframe.marshal(C.Basic.Publish(exchange="", routing_key="q"), 1)
        + pframe.marshal(H.ContentHeader(0, len(body), props), 1)
        + pframe.marshal(ContentBody(body), 1)
    )


def _frames_until(
    raw: RawClient, deadline: float, done: Callable[[list[object]], bool] | None = None
) -> list[object]:
    """Frames that arrive before ``deadline``, or until ``done(frames)``."""
    out: list[object] = []
    while done is None or not done(out):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        raw.sock.settimeout(left)
        try:
            _, fr = raw.recv_frame()
        except TimeoutError:
            break
        out.append(fr)
    return out


def _acked(frames: list[object], tag: int) -> bool:
    return any(isinstance(f, C.Basic.Ack) and f.delivery_tag >= tag for f in frames)


def test_full_disk_blocks_publishers_and_recovers_without_loss(small_disk: Path) -> None:
    ballast = small_disk / "ballast"
    data_dir = small_disk / "data"
    # --disk-free-limit 0: this is about failing writes, not the free-space check.
    with RoostProcess(data_dir, "--segment-size", "262144", "--disk-free-limit", "0") as proc:
        setup = pika.BlockingConnection(pika.URLParameters(proc.url))
        setup.channel().queue_declare("q", durable=True)
        setup.close()
        # Leave room for about 16 messages.
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        ballast.write_bytes(b"\0" * max(0, free - 16 * BODY))

        raw = RawClient(proc.port)
        raw.handshake()
        raw.open_channel(1)
        raw.send_frame(C.Confirm.Select(), 1)
        raw.expect(C.Confirm.SelectOk)
        confirmed = 0
        blocked = False
        sent = 0
        for i in range(60):
            _publish(raw, bytes([i % 256]) * BODY)
            sent += 1
            frames = _frames_until(
                raw,
                time.monotonic() + 3,
                lambda fs, n=sent: (
                    _acked(fs, n)  # type: ignore[misc]
                    or any(isinstance(f, C.Connection.Blocked) for f in fs)
                ),
            )
            acks = [f for f in frames if isinstance(f, C.Basic.Ack)]
            assert not [f for f in frames if isinstance(f, C.Basic.Nack)]
            if acks:
                confirmed = max(a.delivery_tag for a in acks)
            if any(isinstance(f, C.Connection.Blocked) for f in frames):
                blocked = True
                break
        assert blocked, "the broker should block publishers when writes fail"
        assert confirmed < sent, "the message that hit the full disk is not confirmed"
        assert proc.proc is not None and proc.proc.poll() is None, "the broker stays up"

        ballast.unlink()  # space returns
        frames = _frames_until(
            raw,
            time.monotonic() + 10,
            lambda fs: _acked(fs, sent) and any(isinstance(f, C.Connection.Unblocked) for f in fs),
        )
        assert any(isinstance(f, C.Connection.Unblocked) for f in frames)
        acks = [f for f in frames if isinstance(f, C.Basic.Ack)]
        assert acks and max(a.delivery_tag for a in acks) == sent
        raw.close()

        proc.kill()
        proc.start()
        conn = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = conn.channel()
        bodies = []
        while True:
            method, _, body = ch.basic_get("q", auto_ack=True)
            if method is None:
                break
            bodies.append(body)
        assert bodies == [bytes([i % 256]) * BODY for i in range(sent)]
        conn.close()
