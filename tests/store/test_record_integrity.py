"""Integrity of what the store reads back: records cannot be forged from
client bytes, `.acks` entries are checked, files are created and removed
durably (directory fsyncs), and data directories written before these
formats still work (issue 11, defects 6, 8 and 10)."""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from roost.broker.message import Message
from roost.properties import EMPTY
from roost.store import dedup_state, encryption, records
from roost.store.datadir import DataDirLock
from roost.store.message_store import (
    MessageStore,
    RecoveryReport,
    StoreError,
    ref_offset,
    ref_segment,
)
from roost.testing import RoostBroker

PUBLIC = 1
SECRET = 2
LEGACY_DIR = Path(__file__).parent / "data" / "legacy-v0"


def _msg(body: bytes) -> Message:
    return Message("", "public", EMPTY, body, True, None)


def _recover(d: Path, known: set[int]) -> tuple[dict[int, list[bytes]], RecoveryReport]:
    store = MessageStore(d)
    try:
        queues, report = store.recover(known)
        return {q: [store.read(r).body for r in rq.refs] for q, rq in queues.items()}, report
    finally:
        store.close()


def _forging_body() -> tuple[bytes, int]:
    """A body holding a well-formed record (with the plain CRC anyone can
    compute) for queue SECRET; and where that record ends in the body."""
    forged = records.encode_message(records.PERSISTENT, [SECRET], "", "secret", EMPTY, b"FORGED")
    body = b"x" * 100 + forged
    return body + b"y" * 4000, len(body)


def _write_attack(d: Path) -> tuple[Path, int, int]:
    """A log holding one honest message and the attacker's, both for
    PUBLIC; returns the segment, where the attacker's record starts and
    where the forged record inside it ends."""
    store = MessageStore(d)
    store.recover({PUBLIC, SECRET})
    store.append(_msg(b"honest"), [PUBLIC])
    body, forged_end = _forging_body()
    ref = store.append(_msg(body), [PUBLIC])
    store.close()
    seg = d / f"{ref_segment(ref):08d}.seg"
    data = seg.read_bytes()
    # Where the body sits in the record: find it rather than assume a layout.
    at = data.index(body[:100], ref_offset(ref))
    return seg, ref_offset(ref), at + forged_end


def test_forged_record_in_a_torn_body_is_not_delivered(tmp_path: Path) -> None:
    """The attacker's own record is torn by a crash just after the forged
    record in its body: recovery must not resync into the body."""
    d = tmp_path / "m"
    seg, _start, forged_end = _write_attack(d)
    with open(seg, "r+b") as fh:
        fh.truncate(forged_end + 10)
    queues, report = _recover(d, {PUBLIC, SECRET})
    assert queues.get(SECRET, []) == []
    assert queues[PUBLIC] == [b"honest"]
    assert report.truncated


def test_forged_record_after_a_torn_header_is_not_delivered(tmp_path: Path) -> None:
    """Torn differently: the attacker's record header never reached the
    disk (zeros), its body did. The search for the next record after an
    impossible length finds the forged one, whose CRC lacks the salt."""
    d = tmp_path / "m"
    seg, start, _ = _write_attack(d)
    with open(seg, "r+b") as fh:
        fh.seek(start)
        fh.write(bytes(records.HEADER_SIZE))
    queues, _ = _recover(d, {PUBLIC, SECRET})
    assert queues.get(SECRET, []) == []
    assert queues[PUBLIC] == [b"honest"]


def test_segments_have_distinct_salts(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "m", segment_size=64 * 1024)
    store.recover(set())
    for _ in range(40):
        store.append(_msg(bytes(4000)), [PUBLIC])
    store.close()
    heads = {p.read_bytes()[: records.SEGMENT_HEADER_SIZE] for p in (tmp_path / "m").glob("*.seg")}
    assert len(heads) >= 3
    assert all(records.parse_segment_header(h) is not None for h in heads)


def test_flipped_byte_in_acks_entry_is_detected_and_logged(tmp_path: Path) -> None:
    """A flipped byte turns an ack of message 0 into one of message 1: the
    acked message would come back and a live one vanish, silently. The
    entry's checksum catches it: the entry is skipped and reported."""
    d = tmp_path / "m"
    store = MessageStore(d)
    store.recover({PUBLIC})
    refs = [store.append(_msg(f"m{i}".encode()), [PUBLIC]) for i in range(3)]
    store.ack(PUBLIC, refs[0])
    store.close()
    acks = d / f"{ref_segment(refs[0]):08d}.acks"
    raw = bytearray(acks.read_bytes())
    at = raw.index(struct.pack(">I", ref_offset(refs[0])))
    raw[at + 3] = ref_offset(refs[1]) & 0xFF  # one byte changed
    assert raw[at : at + 4] == struct.pack(">I", ref_offset(refs[1]))
    acks.write_bytes(bytes(raw))
    queues, report = _recover(d, {PUBLIC})
    assert b"m1" in queues[PUBLIC]  # never lost
    assert [line for line in report.skipped if acks.name in line and f"offset {at - 8}" in line]


def test_corrupt_acks_entry_is_logged_by_the_broker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    with RoostBroker(data_dir=str(data), http_port=-1) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.queue_declare("q", durable=True)
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("", "q", f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
        method, _, _ = ch.basic_get("q")
        assert method is not None
        ch.basic_ack(method.delivery_tag)
        conn.close()
    (acks,) = (data / "messages").glob("*.acks")
    raw = bytearray(acks.read_bytes())
    # The first entry (after the header; legacy files had none).
    entry: int = getattr(records, "ACKS_HEADER_SIZE", 0)
    raw[entry + 4] ^= 0x01  # a byte of the queue id
    acks.write_bytes(bytes(raw))
    with (
        caplog.at_level(logging.ERROR, logger="roost.store"),
        RoostBroker(data_dir=str(data), http_port=-1),
    ):
        pass
    assert any(
        r.levelno == logging.ERROR
        and acks.name in r.getMessage()
        and f"offset {entry}" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_legacy_data_directory_still_works(tmp_path: Path) -> None:
    """A data directory written before segment headers and checked `.acks`
    entries (tests/store/data/legacy-v0: six messages, two acked, one
    delivered) starts, serves what it held, and takes new messages."""
    data = tmp_path / "data"
    shutil.copytree(LEGACY_DIR, data)
    props = pika.BasicProperties(delivery_mode=2)
    with RoostBroker(data_dir=str(data), http_port=-1) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        assert ch.queue_declare("legacy", passive=True).method.message_count == 4
        method, _, body = ch.basic_get("legacy")
        assert method is not None and body == b"legacy-2" and method.redelivered
        ch.basic_ack(method.delivery_tag)
        ch.confirm_delivery()
        ch.basic_publish("", "legacy", b"new-0", props)
        conn.close()
    acks = (data / "messages" / "00000001.acks").read_bytes()
    assert acks.startswith(records.ACKS_MAGIC)  # rewritten in today's format
    with RoostBroker(data_dir=str(data), http_port=-1) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        got = []
        while True:
            method, _, body = ch.basic_get("legacy", auto_ack=True)
            if method is None:
                break
            got.append((body, method.redelivered))
        conn.close()
    assert got == [
        (b"legacy-3", False),
        (b"legacy-4", False),
        (b"legacy-5", False),
        (b"new-0", False),
    ]


def test_legacy_segment_torn_tail_and_corrupt_record(tmp_path: Path) -> None:
    """Recovery of a legacy segment (no header, unsalted CRCs) keeps its
    rules: a corrupt record in the middle is skipped, a torn tail cut."""
    d = tmp_path / "m"
    d.mkdir()
    recs = [
        records.encode_message(records.PERSISTENT, [PUBLIC], "", "q", EMPTY, f"b{i}".encode())
        for i in range(4)
    ]
    blob = bytearray(b"".join(recs))
    blob[len(recs[0]) + 10] ^= 0xFF  # inside record 1
    (d / "00000001.seg").write_bytes(bytes(blob[:-3]))  # record 3 torn
    queues, report = _recover(d, {PUBLIC})
    assert queues[PUBLIC] == [b"b0", b"b2"]
    assert len(report.skipped) == 1 and len(report.truncated) == 1


# -- directory fsyncs --------------------------------------------------------


class _Trace:
    """Records unlink/mkdir/rename and which directories are fsync'd, in
    order, through both ``os`` and the store's file-system seam."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._dirs: dict[int, str] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = {n: getattr(os, n) for n in ("open", "close", "fsync", "unlink", "mkdir", "replace")}

        def open_(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            fd: int = real["open"](path, flags, mode, **kw)
            if os.path.isdir(path):
                self._dirs[fd] = os.fspath(path)
            return fd

        def close(fd: int) -> None:
            self._dirs.pop(fd, None)
            real["close"](fd)

        def fsync(fd: int) -> None:
            if fd in self._dirs:
                self.events.append(("fsync_dir", self._dirs[fd]))
            real["fsync"](fd)

        def unlink(path: Any, **kw: Any) -> None:
            real["unlink"](path, **kw)
            self.events.append(("unlink", os.fspath(path)))

        def mkdir(path: Any, mode: int = 0o777, **kw: Any) -> None:
            real["mkdir"](path, mode, **kw)
            self.events.append(("mkdir", os.fspath(path)))

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real["replace"](src, dst, **kw)
            self.events.append(("replace", os.fspath(dst)))

        wrappers: dict[str, Callable[..., Any]] = {
            "open": open_,
            "close": close,
            "fsync": fsync,
            "unlink": unlink,
            "mkdir": mkdir,
            "replace": replace,
        }
        try:
            from roost.store import fsio  # the seam, where there is one
        except ImportError:
            fsio = None  # type: ignore[assignment]
        for name, fn in wrappers.items():
            monkeypatch.setattr(os, name, fn)
            if fsio is not None and hasattr(fsio, name):
                monkeypatch.setattr(fsio, name, fn)

    def index(self, event: tuple[str, str], after: int = -1) -> int:
        for i, e in enumerate(self.events):
            if i > after and e == event:
                return i
        raise AssertionError(f"{event} not after #{after} in {self.events}")


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Trace]:
    t = _Trace()
    t.install(monkeypatch)
    yield t


def test_segment_unlink_is_durable_before_its_acks_go(tmp_path: Path, trace: _Trace) -> None:
    d = tmp_path / "m"
    store = MessageStore(d, segment_size=64 * 1024)
    store.recover({PUBLIC})
    refs = [store.append(_msg(bytes(4000)), [PUBLIC]) for i in range(20)]
    first = ref_segment(refs[0])
    assert ref_segment(refs[-1]) > first
    store.flush_sync()
    for ref in refs:
        if ref_segment(ref) == first:
            store.ack(PUBLIC, ref)
    store.flush_sync()  # the acks, then the segment goes
    store.close()
    seg, acks = str(d / f"{first:08d}.seg"), str(d / f"{first:08d}.acks")
    i = trace.index(("unlink", seg))
    j = trace.index(("fsync_dir", str(d)), after=i)
    trace.index(("unlink", acks), after=j)
    assert not os.path.exists(seg) and not os.path.exists(acks)


def test_new_data_directory_entries_are_fsynced(tmp_path: Path, trace: _Trace) -> None:
    lock = DataDirLock(tmp_path / "a" / "data")
    lock.acquire()
    lock.release()
    i = trace.index(("mkdir", str(tmp_path / "a")))
    i = trace.index(("fsync_dir", str(tmp_path)), after=i)
    i = trace.index(("mkdir", str(tmp_path / "a" / "data")), after=i)
    trace.index(("fsync_dir", str(tmp_path / "a")), after=i)
    MessageStore(tmp_path / "a" / "data" / "messages").close()
    i = trace.index(("mkdir", str(tmp_path / "a" / "data" / "messages")))
    trace.index(("fsync_dir", str(tmp_path / "a" / "data")), after=i)


def test_new_dedup_directories_are_fsynced(tmp_path: Path, trace: _Trace) -> None:
    path = tmp_path / "dedup" / "2f" / "q-71.json"
    dedup_state._write(path, b'{"keys":[]}')
    i = trace.index(("mkdir", str(tmp_path / "dedup")))
    i = trace.index(("fsync_dir", str(tmp_path)), after=i)
    i = trace.index(("mkdir", str(tmp_path / "dedup" / "2f")), after=i)
    i = trace.index(("fsync_dir", str(tmp_path / "dedup")), after=i)
    i = trace.index(("replace", str(path)), after=i)
    trace.index(("fsync_dir", str(tmp_path / "dedup" / "2f")), after=i)


def test_new_key_file_is_fsynced_into_its_directory(tmp_path: Path, trace: _Trace) -> None:
    encryption.generate_key_file(tmp_path / "roost.key")
    trace.index(("fsync_dir", str(tmp_path)))


def test_orphan_acks_file_is_removed_and_its_number_not_reused(tmp_path: Path) -> None:
    """A crash after a segment was unlinked but before its `.acks` was
    leaves the `.acks` alone. If it had the highest number, the next start
    must not pair it with a new segment of that number: its entries would
    settle the new segment's records."""
    d = tmp_path / "m"
    store = MessageStore(d)
    store.recover({PUBLIC})
    store.append(_msg(b"m0"), [PUBLIC])
    store.close()
    segs = sorted(d.glob("*.seg"))
    last = int(segs[-1].name[:-4])
    orphan = d / f"{last + 1:08d}.acks"
    # Acks for every plausible first-record offset of a segment.
    orphan.write_bytes(b"".join(struct.pack(">BII", 1, PUBLIC, off) for off in (0, 32)))
    store = MessageStore(d)
    store.recover({PUBLIC})
    store.append(_msg(b"m1"), [PUBLIC])
    store.close()
    queues, _ = _recover(d, {PUBLIC})
    assert queues[PUBLIC] == [b"m0", b"m1"]
    assert not orphan.exists() or orphan.stat().st_size == 0


def test_a_segment_with_a_damaged_header_stops_recovery_and_is_kept(tmp_path: Path) -> None:
    """Its records cannot be checked (the salt is unreadable): serving the
    other segments without its confirmed messages would lose them silently."""
    d = tmp_path / "m"
    store = MessageStore(d, segment_size=64 * 1024)
    store.recover({PUBLIC})
    for _ in range(40):
        store.append(_msg(bytes(4000)), [PUBLIC])
    store.close()
    first = sorted(d.glob("*.seg"))[0]
    raw = bytearray(first.read_bytes())
    raw[12] ^= 0xFF  # inside the salt: the header's CRC fails
    first.write_bytes(bytes(raw))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(StoreError, match=f"{first.name}.*refuses to start"):
        MessageStore(d).recover({PUBLIC})
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
