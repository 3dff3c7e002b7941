"""Recovery from torn and corrupt writes: a crash (or power loss) can cut
the log at any byte, and a disk can flip bytes. Recovery keeps every intact
record, drops a torn tail, skips a corrupt record in the middle, and says
what it did."""

from __future__ import annotations

import shutil
from pathlib import Path

import pika
import pytest

from roost.broker.message import Message
from roost.properties import EMPTY
from roost.store.message_store import MessageStore, RecoveryReport, ref_offset, ref_segment
from roost.store.records import (
    ACK,
    ACK_ENTRY_SIZE,
    ACKS_HEADER_SIZE,
    DELIVERED,
    HEADER,
    HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    encode_ack,
)
from roost.testing import RoostProcess
from tests.store.helpers import connect, drain

QID = 7
N = 6


def _write_log(directory: Path, n: int = N) -> list[int]:
    """A store with ``n`` persistent messages for queue QID; returns refs."""
    store = MessageStore(directory)
    store.recover({QID})
    refs = [
        store.append(Message("ex", "rk", EMPTY, f"body-{i}".encode(), True, None), [QID])
        for i in range(n)
    ]
    store.close()
    return refs


def _recover(directory: Path) -> tuple[list[str], RecoveryReport, set[str]]:
    """Bodies recovered for QID in order, the report, and delivered bodies."""
    store = MessageStore(directory)
    try:
        queues, report = store.recover({QID})
        rq = queues.get(QID)
        if rq is None:
            return [], report, set()
        bodies = [store.read(ref).body.decode() for ref in rq.refs]
        delivered = {store.read(ref).body.decode() for ref in rq.delivered}
        return bodies, report, delivered
    finally:
        store.close()


def _seg_path(directory: Path, ref: int) -> Path:
    return directory / f"{ref_segment(ref):08d}.seg"


def _record_bounds(directory: Path, refs: list[int]) -> list[tuple[int, int]]:
    data = _seg_path(directory, refs[0]).read_bytes()
    out = []
    for ref in refs:
        start = ref_offset(ref)
        (length, _) = HEADER.unpack_from(data, start)
        out.append((start, start + HEADER_SIZE + length))
    assert out[-1][1] == len(data)
    return out


@pytest.fixture
def pristine(tmp_path: Path) -> tuple[Path, list[int]]:
    d = tmp_path / "pristine"
    return d, _write_log(d)


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_intact_log_recovers_everything(pristine: tuple[Path, list[int]], tmp_path: Path) -> None:
    src, _ = pristine
    bodies, report, _ = _recover(_copy(src, tmp_path / "w"))
    assert bodies == [f"body-{i}" for i in range(N)]
    assert report.truncated == [] and report.skipped == []
    assert report.records == N and report.messages == N


def test_truncation_at_every_byte_of_the_last_record(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    src, refs = pristine
    bounds = _record_bounds(src, refs)
    last_start, last_end = bounds[-1]
    for cut in range(last_start, last_end):
        d = _copy(src, tmp_path / "w")
        seg = _seg_path(d, refs[0])
        with open(seg, "r+b") as fh:
            fh.truncate(cut)
        bodies, report, _ = _recover(d)
        assert bodies == [f"body-{i}" for i in range(N - 1)], f"cut at {cut}"
        if cut == last_start:
            assert report.truncated == []  # a clean record boundary: nothing torn
        else:
            assert len(report.truncated) == 1, f"cut at {cut}: {report.truncated}"
            assert f"offset {last_start}" in report.truncated[0]
        # The torn tail is cut off the file, so a second start is clean.
        assert seg.stat().st_size == last_start
        again, report2, _ = _recover(d)
        assert again == bodies
        assert report2.truncated == [] and report2.skipped == []


def test_truncation_in_the_middle_of_the_file(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    src, refs = pristine
    bounds = _record_bounds(src, refs)
    for k in (1, 2, 3):
        start, end = bounds[k]
        for cut in (start + 1, start + HEADER_SIZE - 1, start + HEADER_SIZE, end - 1):
            d = _copy(src, tmp_path / "w")
            with open(_seg_path(d, refs[0]), "r+b") as fh:
                fh.truncate(cut)
            bodies, report, _ = _recover(d)
            assert bodies == [f"body-{i}" for i in range(k)], f"record {k}, cut at {cut}"
            assert len(report.truncated) == 1


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


def test_corrupt_middle_record_is_skipped_and_later_ones_kept(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    src, refs = pristine
    bounds = _record_bounds(src, refs)
    start, end = bounds[2]
    # A byte of the CRC, the first payload byte, one in the body, the last.
    for offset in (start + 5, start + HEADER_SIZE, (start + end) // 2, end - 1):
        d = _copy(src, tmp_path / "w")
        _flip(_seg_path(d, refs[0]), offset)
        bodies, report, _ = _recover(d)
        assert bodies == [f"body-{i}" for i in range(N) if i != 2], f"flip at {offset}"
        assert len(report.skipped) == 1 and f"offset {start}" in report.skipped[0]
        assert report.truncated == []
        # The records after it are still readable after another restart.
        again, _, _ = _recover(d)
        assert again == bodies


def test_corrupt_final_record_drops_the_tail(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    src, refs = pristine
    bounds = _record_bounds(src, refs)
    start, end = bounds[-1]
    for offset in (start + 4, start + HEADER_SIZE + 1, end - 1):
        d = _copy(src, tmp_path / "w")
        seg = _seg_path(d, refs[0])
        _flip(seg, offset)
        bodies, report, _ = _recover(d)
        assert bodies == [f"body-{i}" for i in range(N - 1)], f"flip at {offset}"
        assert len(report.truncated) == 1 and f"offset {start}" in report.truncated[0]
        assert seg.stat().st_size == start


def test_torn_acks_entry_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "acks"
    refs = _write_log(d)
    store = MessageStore(d)
    store.recover({QID})
    store.ack(QID, refs[0])
    store.delivered(QID, refs[1])
    store.ack(QID, refs[2])
    store.close()
    acks = d / f"{ref_segment(refs[0]):08d}.acks"
    whole = ACKS_HEADER_SIZE + 3 * ACK_ENTRY_SIZE
    assert acks.stat().st_size == whole
    # A crash in the middle of writing the next two entries.
    with open(acks, "ab") as fh:
        fh.write(encode_ack(ACK, QID, ref_offset(refs[3]), 0)[:5])
    bodies, _, delivered = _recover(d)
    assert bodies == ["body-1", "body-3", "body-4", "body-5"]
    assert delivered == {"body-1"}
    assert acks.stat().st_size == whole
    # Later entries go after the whole ones and are read back.
    store = MessageStore(d)
    store.recover({QID})
    store.ack(QID, refs[4])
    store.delivered(QID, refs[5])
    store.close()
    bodies, report, delivered = _recover(d)
    assert bodies == ["body-1", "body-3", "body-5"]
    assert delivered == {"body-1", "body-5"}
    assert report.truncated == [] and report.skipped == []
    assert ACK != DELIVERED


def test_new_messages_after_a_torn_tail_are_kept(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    src, refs = pristine
    d = _copy(src, tmp_path / "w")
    start, _ = _record_bounds(d, refs)[-1]
    with open(_seg_path(d, refs[0]), "r+b") as fh:
        fh.truncate(start + 3)
    store = MessageStore(d)
    _, report = store.recover({QID})
    assert len(report.truncated) == 1
    store.append(Message("ex", "rk", EMPTY, b"after", True, None), [QID])
    store.close()
    bodies, report, _ = _recover(d)
    assert bodies == [f"body-{i}" for i in range(N - 1)] + ["after"]
    assert report.truncated == [] and report.skipped == []


def test_broker_recovers_a_torn_log_and_logs_it(tmp_path: Path) -> None:
    """End to end: a stopped broker's last segment loses half its last
    record; the restarted broker serves the rest and logs the truncation."""
    proc = RoostProcess(tmp_path / "data")
    try:
        proc.start()
        conn = connect(proc.port)
        ch = conn.channel()
        ch.queue_declare("torn", durable=True)
        ch.confirm_delivery()
        for i in range(10):
            ch.basic_publish("", "torn", f"t{i}".encode(), pika.BasicProperties(delivery_mode=2))
        conn.close()
        assert proc.terminate() == 0
        segs = sorted(p for p in (proc.data_dir / "messages").glob("*.seg") if p.stat().st_size)
        assert len(segs) == 1
        data = segs[0].read_bytes()
        pos = last = SEGMENT_HEADER_SIZE
        while pos < len(data):
            last = pos
            pos += HEADER_SIZE + HEADER.unpack_from(data, pos)[0]
        with open(segs[0], "r+b") as fh:
            fh.truncate(last + (len(data) - last) // 2)
        proc.output.clear()
        proc.start()
        assert drain(proc.port, "torn") == [(f"t{i}", False) for i in range(9)]
        log = "".join(proc.output)
        assert f"torn or corrupt record at offset {last}" in log
        assert "recovered 9 messages in 1 queues" in log
    finally:
        proc.close()


def test_zero_filled_tail_is_dropped(pristine: tuple[Path, list[int]], tmp_path: Path) -> None:
    """After a power loss a file can end in zeros (its size reached the disk,
    its data did not): both a zeroed last record and zeros after the last
    record are cut off, every intact record kept."""
    src, refs = pristine
    start, end = _record_bounds(src, refs)[-1]
    d = _copy(src, tmp_path / "w")
    seg = _seg_path(d, refs[0])
    with open(seg, "ab") as fh:
        fh.write(bytes(4096))
    bodies, report, _ = _recover(d)
    assert bodies == [f"body-{i}" for i in range(N)]
    assert len(report.truncated) == 1 and f"offset {end}" in report.truncated[0]
    assert seg.stat().st_size == end

    d = _copy(src, tmp_path / "w")
    seg = _seg_path(d, refs[0])
    with open(seg, "r+b") as fh:
        fh.seek(start + HEADER_SIZE)
        fh.write(bytes(end - start - HEADER_SIZE))
    bodies, report, _ = _recover(d)
    assert bodies == [f"body-{i}" for i in range(N - 1)]
    assert len(report.truncated) == 1 and f"offset {start}" in report.truncated[0]


@pytest.mark.parametrize("value", [0, 1, 0xFFFFFFFF, 1 << 31])
def test_corrupt_length_field_in_the_middle_loses_only_that_record(
    pristine: tuple[Path, list[int]], tmp_path: Path, value: int
) -> None:
    src, refs = pristine
    d = _copy(src, tmp_path / f"len-{value}")
    start, _ = _record_bounds(d, refs)[2]
    path = _seg_path(d, refs[0])
    data = bytearray(path.read_bytes())
    data[start : start + 4] = value.to_bytes(4, "big")
    path.write_bytes(bytes(data))
    bodies, report, _ = _recover(d)
    assert bodies == [f"body-{i}" for i in range(N) if i != 2]
    assert report.skipped and not report.truncated


def test_corrupt_length_that_claims_past_the_end_drops_the_tail(
    pristine: tuple[Path, list[int]], tmp_path: Path
) -> None:
    """A length that could be a record's but runs past the end of the file
    is read as a torn tail: the bytes it claims (perhaps a client's body)
    are never searched for records. Media damage of this kind loses the
    rest of the segment, and says so."""
    src, refs = pristine
    d = _copy(src, tmp_path / "w")
    start, _ = _record_bounds(d, refs)[2]
    path = _seg_path(d, refs[0])
    data = bytearray(path.read_bytes())
    data[start : start + 4] = (12345).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    bodies, report, _ = _recover(d)
    assert bodies == ["body-0", "body-1"]
    assert len(report.truncated) == 1 and f"offset {start}" in report.truncated[0]
