"""Workloads for the power-loss harness, and the model of what each crash
image must, may and must not hold.

A workload drives a broker running in-process (its file-system calls
recorded, see :mod:`fsmodel`) with real AMQP clients and notes, for every
client-observed promise, the recorder's op counter at that moment: a crash
before op ``N`` keeps every promise noted at a counter ``<= N``.

- A persistent message confirmed (publisher confirms, or ``tx.commit-ok``)
  to a durable queue is promised there from its confirm on.
- Acks (and rejects, purges) are written asynchronously, as in RabbitMQ:
  one counts as settled once a confirmed persistent publish *after* it on
  the same channel (a barrier) was confirmed, because a batch writes its
  records and then its acks, and a later confirm means the earlier batch
  is on disk. Until then the message may or may not come back; from the
  moment the ack is sent (counter ``>= N``: not yet) it must still be there.
- A message dead-lettered by a reject is promised in the dead-letter queue
  from the barrier on; in between, it is in the source queue, the
  dead-letter queue or both (at least once: never lost).
- Transient messages, and publishes rolled back, never come back.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from tests.store.helpers import ConfirmingPublisher, publish_frames

MUST, MAY, NEVER = "must", "may", "never"
BODY_SIZE = 1000


@dataclass
class Placement:
    """One message in one durable queue."""

    promised: int | None = None  # counter from which it must be there
    settle_sent: int | None = None  # counter when its ack/reject/purge was sent
    settled: int | None = None  # counter from which that settle is durable

    def status(self, n: int) -> str:
        if self.settled is not None and self.settled <= n:
            return NEVER
        if (
            self.promised is not None
            and self.promised <= n
            and (self.settle_sent is None or self.settle_sent >= n)
        ):
            return MUST
        return MAY


@dataclass
class Msg:
    mid: str
    persistent: bool
    rolled_back: bool = False
    where: dict[str, Placement] = field(default_factory=dict)
    # Dead-lettered: (source queue, dead-letter queue, reject sent at).
    dead_lettered: tuple[str, str, int] | None = None


@dataclass
class QueueInfo:
    name: str
    declared: int  # counter at declare-ok
    deleted_sent: int | None = None  # counter when queue.delete was sent
    deleted: int | None = None  # counter from which the delete is durable


class Model:
    def __init__(self, clock: Callable[[], int], durable_clock: Callable[[], int]) -> None:
        # The recorder's op counter now: when a client sends something,
        # nothing it causes has touched the disk yet.
        self.clock = clock
        # The counter just after the latest batch the store committed: a
        # confirm received now was made durable by then.
        self.durable_clock = durable_clock
        self.msgs: dict[str, Msg] = {}
        self.queues: dict[str, QueueInfo] = {}
        self.transient_queues: list[str] = []
        self._n = 0
        # Counters worth crashing just after (a reply that promises something).
        self.focus: list[int] = []
        # Settles waiting for the next barrier on their channel.
        self.unsettled: dict[int, list[Placement]] = {}

    def new_id(self, tag: str) -> str:
        self._n += 1
        return f"{tag}{self._n}"

    def body(self, mid: str, size: int = BODY_SIZE) -> bytes:
        return (mid + "|").encode().ljust(size, b".")

    def sent(self, mid: str, persistent: bool, queues: list[str]) -> Msg:
        m = Msg(mid, persistent)
        for q in queues:
            m.where[q] = Placement()
        self.msgs[mid] = m
        return m

    def confirmed(self, mid: str, at: int) -> None:
        for p in self.msgs[mid].where.values():
            if p.promised is None:
                p.promised = at

    def settle(self, channel: int, mid: str, queue: str) -> None:
        p = self.msgs[mid].where[queue]
        if p.settle_sent is None:
            p.settle_sent = self.clock()
            self.unsettled.setdefault(channel, []).append(p)

    def barrier_confirmed(self, channel: int, at: int) -> None:
        for p in self.unsettled.pop(channel, []):
            p.settled = at


class StampedPublisher(ConfirmingPublisher):
    """Publishes over a bare socket in confirm mode with many in flight (so
    batches group-commit), noting the counter at which each confirm came."""

    def __init__(self, port: int, model: Model) -> None:
        super().__init__(port)
        self.model = model

    def _settle(self, tag: int, multiple: bool, ok: bool) -> None:
        before = len(self.confirmed)
        newly = set(self.confirmed)
        super()._settle(tag, multiple, ok)
        if len(self.confirmed) != before:
            at = self.model.durable_clock()
            for mid in self.confirmed - newly:
                self.model.confirmed(mid, at)

    def publish(
        self, items: list[tuple[str, str, str, bool]], window: int = 300, deadline: float = 20
    ) -> None:
        """(exchange, routing key, message id, persistent) each; returns
        once every one is confirmed."""
        end = time.monotonic() + deadline
        i = 0
        while True:
            assert time.monotonic() < end, "publishes not confirmed in time"
            outstanding = len(self.sent) - len(self.confirmed) - len(self.nacked)
            if i < len(items) and outstanding < window:
                chunk = b""
                for ex, rk, mid, persistent in items[i : i + 40]:
                    chunk += publish_frames(ex, rk, self.model.body(mid), mid, persistent)
                    self.sent.append(mid)
                i += len(items[i : i + 40])
                self.client.send(chunk)
                self._read_available(block=False)
            elif outstanding:
                self._read_available(block=True)
            else:
                assert not self.nacked, f"nacked: {sorted(self.nacked)[:5]}"
                return


class Session:
    """A pika connection with one confirm-mode channel: declares, gets,
    acks, barriers."""

    def __init__(self, port: int, model: Model) -> None:
        self.model = model
        self.conn = pika.BlockingConnection(
            pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, heartbeat=0)
        )
        self.ch: BlockingChannel = self.conn.channel()
        self.ch.confirm_delivery()
        self.id = id(self.ch)
        # Dead-lettered copies promised at the next barrier.
        self.dl_pending: list[Placement] = []

    def declare(self, name: str, durable: bool = True, args: dict[str, Any] | None = None) -> None:
        self.ch.queue_declare(name, durable=durable, arguments=args)
        if durable:
            self.model.queues[name] = QueueInfo(name, self.model.clock())
        else:
            self.model.transient_queues.append(name)

    def publish(self, queue: str, persistent: bool = True, tag: str = "p") -> str:
        """One message, confirmed (synchronously)."""
        mid = self.model.new_id(tag)
        durable = queue in self.model.queues
        self.model.sent(mid, persistent, [queue] if durable else [])
        props = pika.BasicProperties(delivery_mode=2 if persistent else 1, message_id=mid)
        self.ch.basic_publish("", queue, self.model.body(mid), props)
        self.model.confirmed(mid, self.model.durable_clock())
        return mid

    def barrier(self) -> None:
        """A confirmed persistent publish after the settles before it on
        this channel: they (and dead-lettered copies) are durable from now on."""
        self.publish("barrier", tag="b")
        at = self.model.durable_clock()
        self.model.barrier_confirmed(self.id, at)
        for p in self.dl_pending:
            p.promised = at
        self.dl_pending = []

    def get(self, queue: str, n: int) -> list[tuple[int, str]]:
        out = []
        for _ in range(n):
            method, _, body = self.ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            assert method.delivery_tag is not None
            out.append((method.delivery_tag, body.split(b"|")[0].decode()))
        return out

    def ack(self, queue: str, got: list[tuple[int, str]]) -> None:
        for tag, mid in got:
            self.model.settle(self.id, mid, queue)
            self.ch.basic_ack(tag)

    def reject(self, queue: str, got: list[tuple[int, str]], dlq: str | None) -> None:
        for tag, mid in got:
            self.model.settle(self.id, mid, queue)
            m = self.model.msgs[mid]
            if dlq is not None:
                m.dead_lettered = (queue, dlq, self.model.clock())
                m.where[dlq] = Placement()
                self.dl_pending.append(m.where[dlq])
            self.ch.basic_reject(tag, requeue=False)

    def requeue(self, got: list[tuple[int, str]]) -> None:
        for tag, _ in got:
            self.ch.basic_nack(tag, requeue=True)

    def purge(self, queue: str) -> None:
        present = [m for m in self.model.msgs.values() if queue in m.where and not m.rolled_back]
        sent = self.model.clock()
        self.ch.queue_purge(queue)
        for m in present:
            p = m.where[queue]
            if p.settle_sent is None:
                p.settle_sent = sent
                self.model.unsettled.setdefault(self.id, []).append(p)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the broker may already be gone
            self.conn.close()


# -- scenarios --------------------------------------------------------------

SEGMENT_SIZE = 64 * 1024


def mixed(port: int, model: Model, rng: random.Random, rounds: int = 6) -> None:
    """Fanout to durable and non-durable queues, persistent and transient
    messages, group-committed publishes, acks, nacks with requeue,
    dead-lettering, purge, tx commit and rollback; segments roll (64 KiB),
    are unlinked once drained, and sparse ones are compacted."""
    s = Session(port, model)
    for q in ("barrier", "bulk", "keep", "fan-a", "fan-b", "dlq", "purgeq", "txq"):
        s.declare(q)
    s.declare("dlsrc", args={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq"})
    s.declare("fan-t", durable=False)
    s.ch.exchange_declare("fan", "fanout", durable=True)
    for q in ("fan-a", "fan-b", "fan-t"):
        s.ch.queue_bind(q, "fan")
    pub = StampedPublisher(port, model)
    try:
        for r in range(rounds):
            items: list[tuple[str, str, str, bool]] = []
            for _ in range(rng.randint(120, 200)):
                persistent = rng.random() < 0.85
                x = rng.random()
                if x < 0.6:
                    ex, rk, qs = "", "bulk", ["bulk"]
                elif x < 0.7:
                    ex, rk, qs = "", "keep", ["keep"]
                elif x < 0.85:
                    ex, rk, qs = "fan", "", ["fan-a", "fan-b"]
                else:
                    ex, rk, qs = "", "dlsrc", ["dlsrc"]
                mid = model.new_id("m")
                model.sent(mid, persistent, qs)
                items.append((ex, rk, mid, persistent))
            pub.publish(items)

            # Consume most of bulk: ack, some requeued.
            got = s.get("bulk", rng.randint(80, 140))
            rng.shuffle(got)
            cut = len(got) // 10
            s.requeue(got[:cut])
            s.ack("bulk", got[cut:])
            s.barrier()

            # Dead-letter a few.
            got = s.get("dlsrc", rng.randint(3, 10))
            s.reject("dlsrc", got[: len(got) // 2 + 1], "dlq")
            s.requeue(got[len(got) // 2 + 1 :])
            s.barrier()

            # Purge.
            for _ in range(rng.randint(2, 6)):
                s.publish("purgeq", persistent=rng.random() < 0.8)
            s.purge("purgeq")
            if rng.random() < 0.5:
                s.barrier()

            # A transaction committed, one rolled back.
            tx = s.conn.channel()
            tx.tx_select()
            ids = []
            for _ in range(3):
                mid = model.new_id("t")
                model.sent(mid, True, ["txq"])
                props = pika.BasicProperties(delivery_mode=2, message_id=mid)
                tx.basic_publish("", "txq", model.body(mid), props)
                ids.append(mid)
            tx.tx_commit()
            for mid in ids:
                model.confirmed(mid, model.durable_clock())
            for _ in range(2):
                mid = model.new_id("r")
                model.sent(mid, True, ["txq"]).rolled_back = True
                props = pika.BasicProperties(delivery_mode=2, message_id=mid)
                tx.basic_publish("", "txq", model.body(mid), props)
            tx.tx_rollback()
            tx.close()

            # Drain the rest now and then, so that whole segments go; what
            # "keep" holds keeps a few alive, sparse: they get compacted.
            if r % 2 == 1:
                for q in ("fan-a", "fan-b", "dlq", "txq", "barrier", "bulk"):
                    s.ack(q, s.get(q, 1000))
                got = s.get("keep", 1000)
                cut = rng.randint(0, 3) if r % 4 == 1 else 0
                s.ack("keep", got[cut:])
                s.requeue(got[:cut])
                s.barrier()
        # Let compaction of the last sparse segments run.
        s.ack("bulk", s.get("bulk", 1000))
        s.barrier()
        time.sleep(0.3)
        s.barrier()
    finally:
        pub.close()
        s.close()


def churn(port: int, model: Model, rng: random.Random, rounds: int = 10) -> None:
    """A work queue drained as fast as it fills: segments roll and are
    unlinked all the time; now and then a kept message leaves a segment
    sparse (compaction) until it too is acked."""
    s = Session(port, model)
    for q in ("barrier", "work", "keep"):
        s.declare(q)
    pub = StampedPublisher(port, model)
    try:
        for r in range(rounds):
            items = []
            for i in range(rng.randint(100, 180)):
                q = "keep" if i % 40 == 0 else "work"
                mid = model.new_id("m")
                persistent = rng.random() < 0.9
                model.sent(mid, persistent, [q])
                items.append(("", q, mid, persistent))
            pub.publish(items)
            got = s.get("work", 1000)
            cut = len(got) // 20
            s.requeue(got[:cut])
            s.ack("work", got[cut:])
            if r % 3 == 2:
                s.ack("keep", s.get("keep", 1000))
                s.ack("barrier", s.get("barrier", 1000))
            s.barrier()
        time.sleep(0.2)
        s.barrier()
    finally:
        pub.close()
        s.close()


def queue_delete(port: int, model: Model, rng: random.Random) -> None:
    """A durable queue with confirmed messages is deleted. After a crash
    it may still exist only if the delete was not yet durable, and then
    with everything it held (issue 11, defect 7: segments were unlinked
    before definitions.json dropped the queue)."""
    s = Session(port, model)
    for q in ("barrier", "victim", "other"):
        s.declare(q)
    pub = StampedPublisher(port, model)
    try:
        # Whole segments of the victim's, then some of another queue's.
        items = []
        for i in range(rng.randint(200, 300)):
            q = "victim" if i < 180 else "other"
            mid = model.new_id("m")
            model.sent(mid, True, [q])
            items.append(("", q, mid, True))
        pub.publish(items)
        info = model.queues["victim"]
        info.deleted_sent = model.clock()
        model.focus.append(info.deleted_sent)
        s.ch.queue_delete("victim")
        s.barrier()
        info.deleted = model.durable_clock()
        s.barrier()
    finally:
        pub.close()
        s.close()


def purge(port: int, model: Model, rng: random.Random) -> None:
    """queue.purge-ok taken as the promise RabbitMQ makes: purged messages
    never come back once it is received (issue 11, defect 9: purge-ok was
    sent before the purge was durable)."""
    s = Session(port, model)
    for q in ("barrier", "purged"):
        s.declare(q)
    pub = StampedPublisher(port, model)
    try:
        for _ in range(12):
            items = []
            for _ in range(rng.randint(20, 60)):
                mid = model.new_id("m")
                model.sent(mid, True, ["purged"])
                items.append(("", "purged", mid, True))
            pub.publish(items)
            present = [m for m in model.msgs.values() if "purged" in m.where]
            sent = model.clock()
            s.ch.queue_purge("purged")
            ok = model.clock()
            model.focus.append(ok)
            for m in present:
                p = m.where["purged"]
                if p.settle_sent is None:
                    p.settle_sent, p.settled = sent, ok
        s.barrier()
    finally:
        pub.close()
        s.close()


def paging(port: int, model: Model, rng: random.Random) -> None:
    """Persistent messages fanned out to durable queues and a non-durable
    one, with a queue memory limit so small that every queue pages (issue
    11, defect 1: the non-durable copy's page-out overwrote the shared
    storage reference)."""
    s = Session(port, model)
    for q in ("barrier", "pa", "pb"):
        s.declare(q)
    s.declare("pt", durable=False)
    s.ch.exchange_declare("pfan", "fanout", durable=True)
    for q in ("pa", "pb", "pt"):
        s.ch.queue_bind(q, "pfan")
    pub = StampedPublisher(port, model)
    try:
        for _ in range(3):
            items = []
            for _ in range(rng.randint(100, 160)):
                mid = model.new_id("m")
                model.sent(mid, True, ["pa", "pb"])
                items.append(("pfan", "", mid, True))
            pub.publish(items)
            for q in ("pa", "pt", "pb"):
                got = s.get(q, rng.randint(40, 120))
                if q in model.queues:
                    s.ack(q, got)
                else:
                    for tag, _ in got:
                        s.ch.basic_ack(tag)
            s.barrier()
    finally:
        pub.close()
        s.close()


SCENARIOS: dict[str, Callable[[int, Model, random.Random], None]] = {
    "mixed": mixed,
    "churn": churn,
    "queue-delete": queue_delete,
    "purge": purge,
    "paging": paging,
}
# Broker settings a scenario needs beyond the defaults (and SEGMENT_SIZE).
CONFIG: dict[str, dict[str, int]] = {"paging": {"queue_memory_limit": 16 * 1024}}
