"""Record a workload, then check crash images of it.

:func:`record` runs a scenario against an in-process broker whose disk
calls are recorded; :func:`check_points` builds the crash image for each
chosen crash point, starts a fresh broker on it, drains every queue and
checks the invariants:

- the broker starts on every image;
- a message whose publish was confirmed to a durable queue as persistent,
  and not settled there, is in that queue exactly once;
- nothing settled comes back, nothing transient or rolled back survives;
- nothing appears in a queue it was not routed to;
- a dead-lettered message is in its source queue or its dead-letter queue
  (or both) until the dead-lettering is durable, then in the latter;
- a deleted queue stays deleted once its delete is durable, and a queue
  that comes back holds everything confirmed to it.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from roost.store.message_store import MessageStore
from roost.testing import RoostBroker
from tests.store.powerloss.fsmodel import DIRSYNC, PUNCH, UNLINK, Recorder, crash_images
from tests.store.powerloss.workload import (
    CONFIG,
    MAY,
    MUST,
    NEVER,
    SCENARIOS,
    SEGMENT_SIZE,
    Model,
)

log = logging.getLogger("powerloss")


@dataclass
class Run:
    scenario: str
    seed: int
    recorder: Recorder
    model: Model
    seconds: float


@dataclass
class Result:
    scenario: str
    seed: int
    point: int
    torn: bool
    problems: list[str] = field(default_factory=list)
    trace: str = ""

    def __str__(self) -> str:
        mode = "torn" if self.torn else "strict"
        head = f"{self.scenario} seed={self.seed} crash before op #{self.point} ({mode})"
        if not self.problems:
            return head + ": ok"
        return "\n".join(
            [head + ":", *("  " + p for p in self.problems[:20]), "ops around it:", self.trace]
        )


def scratch_root() -> Path:
    """Where images go: memory (fsync costs nothing) when there is some."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def record(scenario: str, seed: int, workdir: Path) -> Run:
    data = workdir / "data"
    data.mkdir(parents=True)
    rec = Recorder(data)
    model = Model(lambda: rec.counter, lambda: rec.marked)
    started = time.monotonic()
    rec.install()
    committed = MessageStore._committed

    def mark_committed(store: MessageStore, batch: Any) -> None:
        rec.mark(f"batch {batch.number} committed")
        committed(store, batch)

    MessageStore._committed = mark_committed  # type: ignore[method-assign,assignment]
    try:
        broker = RoostBroker(
            data_dir=str(data),
            http_port=-1,
            segment_size=SEGMENT_SIZE,
            **CONFIG.get(scenario, {}),
        )
        broker.start()
        try:
            SCENARIOS[scenario](broker.port, model, random.Random(seed))
        finally:
            broker.stop()
    finally:
        MessageStore._committed = committed  # type: ignore[method-assign]
        rec.uninstall()
    return Run(scenario, seed, rec, model, time.monotonic() - started)


def choose_points(run: Run, count: int, rng: random.Random) -> list[int]:
    """A third just after replies the scenario singled out (purge-ok,
    delete-ok), a third right after the moments that matter most to the
    store (a segment or .acks unlinked, a hole punched by compaction and
    the padding write before it, a directory fsync'd), the rest at random."""
    ops = run.recorder.ops
    focus = sorted({f + d for f in run.model.focus for d in range(8) if f + d <= len(ops)})
    special = [i + 1 for i, op in enumerate(ops) if op[0] in (UNLINK, PUNCH, DIRSYNC)]
    special += [i for i, op in enumerate(ops) if op[0] == PUNCH]
    picked = set(rng.sample(focus, min(len(focus), count // 3)))
    special = sorted(set(special) - picked)
    picked |= set(rng.sample(special, min(len(special), count // 3)))
    while len(picked) < count and len(picked) < len(ops):
        picked.add(rng.randint(1, len(ops)))
    return sorted(picked)


def check_image(run: Run, n: int, image: Path) -> list[str]:
    problems: list[str] = []
    try:
        broker = RoostBroker(data_dir=str(image), http_port=-1, segment_size=SEGMENT_SIZE)
        broker.start()
    except Exception as exc:
        return [f"broker did not start: {type(exc).__name__}: {exc}"]
    try:
        found = _drain(broker.port, [*run.model.queues, *run.model.transient_queues])
    finally:
        broker.stop()
    model = run.model
    for q in model.transient_queues:
        if found.get(q) is not None:
            problems.append(f"non-durable queue {q} exists after the crash")
    for q, info in model.queues.items():
        got = found.get(q)
        if info.deleted is not None and info.deleted <= n:
            if got is not None:
                problems.append(f"queue {q} came back after its delete was durable")
            continue
        if got is None:
            if info.declared <= n and (info.deleted_sent is None or info.deleted_sent >= n):
                problems.append(f"durable queue {q} is missing")
            elif info.deleted_sent is not None and info.deleted_sent < n:
                continue  # deleted, not yet durably: gone is fine
        counts = Counter(got or [])
        for mid, c in counts.items():
            m = model.msgs.get(mid)
            if m is None or q not in m.where:
                problems.append(f"{q}: {mid} appeared in a queue it was not routed to")
                continue
            if c > 1:
                problems.append(f"{q}: {mid} present {c} times")
            if not m.persistent or m.rolled_back:
                why = "transient" if not m.persistent else "rolled back"
                problems.append(f"{q}: {mid} ({why}) survived")
            elif m.where[q].status(n) == NEVER:
                problems.append(f"{q}: {mid} came back after it was settled ({m.where[q]})")
        for mid, m in model.msgs.items():
            p = m.where.get(q)
            if p is None or not m.persistent or m.rolled_back or counts[mid]:
                continue
            if p.status(n) == MUST:
                where = " (the queue is gone)" if got is None else ""
                problems.append(f"{q}: confirmed {mid} lost{where} ({p})")
    for mid, m in model.msgs.items():
        if m.dead_lettered is None or not m.persistent:
            continue
        src, dlq, _at = m.dead_lettered
        before, after = m.where[src], m.where[dlq]
        promised = before.promised is not None and before.promised <= n
        # Until the dead-lettered copy is settled in its turn (its ack sent).
        live = after.settle_sent is None or after.settle_sent >= n
        if (
            promised
            and live
            and after.status(n) == MAY
            and mid not in (found.get(src) or [])
            and mid not in (found.get(dlq) or [])
        ):
            problems.append(f"{mid}: dead-lettered from {src} to {dlq}, in neither")
    return problems


def _drain(port: int, queues: list[str]) -> dict[str, list[str] | None]:
    """Every message id in each queue (None: no such queue), auto-ack."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, heartbeat=0)
    )
    out: dict[str, list[str] | None] = {}
    try:
        ch = conn.channel()
        for q in queues:
            try:
                ch.queue_declare(q, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                out[q] = None
                ch = conn.channel()
                continue
            ids: list[str] = []
            while True:
                method, _, body = ch.basic_get(q, auto_ack=True)
                if method is None:
                    break
                ids.append(body.split(b"|")[0].decode())
            out[q] = ids
    finally:
        conn.close()
    return out


def check_points(
    run: Run,
    points: list[int],
    torn: bool,
    workdir: Path,
    seed: int = 0,
    keep_failed: Path | None = None,
) -> Iterator[Result]:
    """Check the image of each crash point; with ``keep_failed``, the
    images that fail are copied there (before recovery touched them)."""

    def make_dir(n: int) -> Path:
        d = workdir / f"image-{n}-{'torn' if torn else 'strict'}"
        shutil.rmtree(d, ignore_errors=True)
        return d

    for n, image in crash_images(run.recorder, points, make_dir, torn=torn, seed=seed):
        pristine = image.with_name(image.name + "-pristine")
        if keep_failed is not None:
            shutil.copytree(image, pristine)
        problems = check_image(run, n, image)
        result = Result(run.scenario, run.seed, n, torn, problems)
        if problems:
            result.trace = run.recorder.trace(n)
            if keep_failed is not None:
                kept = keep_failed / f"{run.scenario}-{run.seed}-{image.name}"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(pristine, kept)
        shutil.rmtree(image, ignore_errors=True)
        shutil.rmtree(pristine, ignore_errors=True)
        yield result
