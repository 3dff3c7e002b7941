"""The data directory as an operator sees it: one broker per directory,
a clean SIGTERM shutdown, and disk space given back as messages are acked."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from pamqp import commands as C

from roost.testing import RoostProcess
from tests.conftest import RawClient
from tests.store.helpers import ConfirmingPublisher, connect, drain, publish_frames


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(tmp_path / "data", "--segment-size", "65536")
    try:
        yield p.start()
    finally:
        p.close()


def _segments(proc: RoostProcess) -> list[Path]:
    return sorted((proc.data_dir / "messages").glob("*.seg"))


def _acks_files(proc: RoostProcess) -> list[Path]:
    return sorted((proc.data_dir / "messages").glob("*.acks"))


def _wait_for(cond: object, timeout: float = 5.0) -> bool:
    assert callable(cond)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def test_second_broker_on_same_data_dir_exits_1(proc: RoostProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "roost", "serve", "--port", "0", "--data-dir", str(proc.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert str(proc.data_dir) in result.stderr
    assert proc.proc is not None and f"pid {proc.proc.pid}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # The first broker is unaffected.
    connect(proc.port).close()


def test_broker_prints_its_data_directory(proc: RoostProcess) -> None:
    assert any(f"data directory {proc.data_dir}" in line for line in proc.output)


def test_sigterm_closes_connections_with_320_and_exits_0(proc: RoostProcess) -> None:
    raw = RawClient(proc.port)
    raw.handshake()
    raw.open_channel(1)
    conn = connect(proc.port)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    close = raw.expect(C.Connection.Close)
    assert isinstance(close, C.Connection.Close)
    assert close.reply_code == 320
    assert (
        close.reply_text
        == "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    )
    raw.send_frame(C.Connection.CloseOk())
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as exc:
        conn.process_data_events(time_limit=5)
        conn.channel()
    assert exc.value.reply_code == 320
    assert proc.proc.wait(15) == 0
    assert raw.closed()
    raw.close()


def test_confirmed_messages_survive_sigterm(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    conn.channel().queue_declare("graceful", durable=True)
    conn.close()
    pub = ConfirmingPublisher(proc.port)
    pub.run([("", "graceful")], "g", count=1000)
    assert len(pub.confirmed) == 1000
    # More, not waited for: the shutdown may cut them off, but whatever it
    # took in is flushed.
    extra = b"".join(
        publish_frames("", "graceful", f"x-{i}".encode(), f"x-{i}") for i in range(300)
    )
    pub.client.send(extra)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    while True:  # confirms for some of the extra ones, then the close
        _, frame = pub.client.recv_frame()
        if isinstance(frame, C.Connection.Close):
            assert frame.reply_code == 320
            break
    pub.client.send_frame(C.Connection.CloseOk())
    assert proc.proc.wait(15) == 0
    pub.close()
    proc.start()
    got = [body for body, _ in drain(proc.port, "graceful")]
    assert got[:1000] == [f"g-{i}" for i in range(1000)]
    assert got[1000:] == [f"x-{i}" for i in range(len(got) - 1000)]


def test_segments_deleted_once_all_their_messages_are_acked(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("segs", durable=True)
    ch.queue_declare("segs2", durable=True)
    conn.close()
    pub = ConfirmingPublisher(proc.port)
    pub.run([("", "segs"), ("", "segs2")], "s", count=4000, pad=100)
    pub.close()
    assert len(pub.confirmed) == 4000
    assert len(_segments(proc)) >= 4
    # Draining one of two queues frees nothing: every record is shared.
    first = len(_segments(proc))
    assert len(drain(proc.port, "segs")) == 2000
    assert len(_segments(proc)) == first
    assert len(drain(proc.port, "segs2")) == 2000
    assert _wait_for(lambda: len(_segments(proc)) <= 1), _segments(proc)
    seg_numbers = {p.stem for p in _segments(proc)}
    assert {p.stem for p in _acks_files(proc)} <= seg_numbers
    # Still empty, and still small, after a crash.
    proc.kill()
    proc.start()
    assert drain(proc.port, "segs") == [] and drain(proc.port, "segs2") == []
    assert len(_segments(proc)) <= 2


def test_segment_count_stays_bounded_under_steady_traffic(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("steady", durable=True)
    ch.basic_qos(prefetch_count=200)
    pub = ConfirmingPublisher(proc.port)
    peak = 0
    try:
        for r in range(12):
            pub.run([("", "steady")], f"r{r}", count=600, pad=100)
            for got, (method, _, _) in enumerate(
                ch.consume("steady", inactivity_timeout=5), start=1
            ):
                assert method is not None
                if got % 100 == 0:
                    ch.basic_ack(method.delivery_tag, multiple=True)
                if got == 600:
                    break
            # Bounded: at most the segment being written and one on its way out.
            assert _wait_for(lambda: len(_segments(proc)) <= 2), (r, _segments(proc))
            peak = max(peak, len(_segments(proc)))
        ch.cancel()
    finally:
        pub.close()
        conn.close()
    assert len(pub.confirmed) == 12 * 600
    # The log did roll over many times while staying that small.
    newest = int(_segments(proc)[-1].stem)
    assert newest >= 8, newest
    assert peak <= 2
