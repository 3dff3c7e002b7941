"""Power loss at random points of a mixed workload (the short CI run of the
harness in tests/store/powerloss; long runs: docs/powerloss.md)."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.store import fsio
from tests.store.powerloss.fsmodel import Recorder, crash_images
from tests.store.powerloss.harness import check_points, choose_points, record, scratch_root
from tests.store.powerloss.workload import SCENARIOS

# Crash points per mode (strict and torn) for each scenario in CI.
POINTS = 10


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="powerloss-", dir=scratch_root()) as td:
        yield Path(td)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    # Recovery logs every torn tail it cuts: hundreds of lines per run.
    caplog.set_level(logging.CRITICAL, logger="roost")
    caplog.set_level(logging.CRITICAL, logger="pika")


def _run(scenario: str, seed: int, workdir: Path, points: int) -> list[str]:
    run = record(scenario, seed, workdir)
    picked = choose_points(run, points, random.Random(seed))
    failures = []
    for torn in (False, True):
        for result in check_points(run, picked, torn, workdir, seed):
            if result.problems:
                failures.append(str(result))
    return failures


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_invariant_breaks_at_random_crash_points(scenario: str, workdir: Path) -> None:
    """queue-delete, purge and paging reproduced defects 7, 9 and 1 of
    issue 11 until the broker-core redesign fixed them."""
    failures = _run(scenario, 11, workdir, POINTS)
    assert not failures, "\n\n".join(failures[:3])


# -- the crash model itself ---------------------------------------------------


def _images(rec: Recorder, tmp: Path, torn: bool = False) -> dict[int, dict[str, bytes]]:
    out = {}
    points = range(1, len(rec.ops) + 1)
    for n, image in crash_images(rec, points, lambda n: tmp / f"img{n}", torn=torn):
        out[n] = {
            str(p.relative_to(image)): p.read_bytes() for p in image.rglob("*") if p.is_file()
        }
    return out


def test_crash_model_keeps_only_what_was_made_durable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_bytes(b"before")
    rec = Recorder(root)
    rec.install()
    try:
        fd = fsio.open(root / "f", os.O_RDWR | os.O_CREAT, 0o600)
        fsio.pwrite_all(fd, b"hello", 0)  # 2: not durable yet
        fsio.fdatasync(fd)  # 3: content durable, but not the name
        fsio.fsync_dir(root)  # 4: now the name too
        fsio.pwrite_all(fd, b"world", 5)  # 5: lost on a crash
        fsio.close(fd)
        fsio.write_atomic(root / "old", b"after")
        fsio.unlink(root / "f")  # not durable: the file stays
    finally:
        rec.uninstall()
    kinds = [op[0] for op in rec.ops]
    images = _images(rec, tmp_path)
    at = {kind: kinds.index(kind) for kind in ("write", "dirsync", "rename", "unlink")}
    assert images[at["write"] + 1] == {"old": b"before"}  # created, not durable
    assert images[at["dirsync"] + 1] == {"old": b"before", "f": b"hello"}
    renamed = kinds.index("dirsync", at["rename"]) + 1
    assert images[at["rename"] + 1]["old"] == b"before"  # rename not durable
    assert images[renamed]["old"] == b"after"
    assert images[len(rec.ops)] == {"old": b"after", "f": b"hello"}  # unlink not durable
    assert not (tmp_path / "root" / "f").exists()  # but it happened for real


def test_torn_images_mix_blocks_of_unsynced_writes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rec = Recorder(root)
    rec.install()
    try:
        fd = fsio.open(root / "f", os.O_RDWR | os.O_CREAT, 0o600)
        fsio.fsync_dir(root)
        fsio.pwrite_all(fd, b"a" * 8192, 0)
        fsio.fdatasync(fd)
        fsio.pwrite_all(fd, b"b" * 4096, 0)
        fsio.pwrite_all(fd, b"c" * 8192, 8192)
        fsio.close(fd)
    finally:
        rec.uninstall()
    seen = set()
    for seed in range(40):

        def target(n: int, seed: int = seed) -> Path:
            return tmp_path / f"i{seed}"

        for _, image in crash_images(rec, [len(rec.ops)], target, torn=True, seed=seed):
            data = (image / "f").read_bytes()
            blocks = tuple(data[i : i + 4096][:1] for i in range(0, len(data), 4096))
            seen.add(blocks)
    assert (b"a", b"a") in seen  # nothing after the fsync made it
    assert (b"b", b"a", b"c", b"c") in seen  # everything did
    assert any(len(b) == 4 and b[2:] in ((b"\0", b"c"), (b"c", b"\0")) for b in seen)  # torn
