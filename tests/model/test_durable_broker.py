"""Stateful property-based test of the durable broker (issue 11).

A hypothesis ``RuleBasedStateMachine`` drives a real broker on a real
message store through the model tier (``tests/model/harness.py``: no
sockets, the event loop and time stepped by the test, crashes as
``kill -9``) and keeps a model of where every message may and must be.

Topology. Source queues ``q0 q1 q2`` and dead-letter sinks ``d0 d1``, each
declared durable or not with any mix of x-max-priority, x-message-ttl,
x-max-length, x-max-length-bytes, x-overflow (all three modes),
x-delivery-limit, x-message-deduplication and x-expires; sources may
dead-letter (x-dead-letter-exchange ``""`` with a routing key naming a
sink, or the fanout exchange ``dlx``, which binds sinks only). Exchanges
``fan`` (fanout), ``top`` (topic) and ``delay`` (x-delayed-message over
direct, fanout or topic), durable or not, bind any queue, so durable and
non-durable targets mix. The dead-letter graph has no cycle (sinks never
dead-letter), which keeps "nothing settled comes back" exact.

Rules: declare (and redeclare) queues and exchanges, bind, unbind, delete
exchanges; publish persistent or transient messages (priority,
expiration, x-delay, a dedup key, mandatory) to the default exchange,
``fan``, ``top`` or ``delay``; publish several and ack in one transaction
(``tx.commit`` semantics: one barrier); consume (no-ack or acked, with
prefetch), cancel, get, ack, nack and reject (requeue or not, one or
multiple), close a channel (requeues what it holds); purge, delete;
set and clear the memory alarm and page out; advance the clock; step the
event loop by a tick or until the store is idle; restart cleanly; crash.

Every message carries a unique message id (its body starts with it too);
a copy in a queue is known by (id, the queue that dead-lettered it, or
"" for a direct or delayed publish: ``x-last-death-queue``).

Checked after every step, and between timer callbacks:

- no copy appears in a queue it was not routed to (the model routes: the
  default exchange, fanout, topic patterns, the delayed exchange's type
  when a held message falls due, the dead-letter exchange of the queue it
  left), and none is ever twice in one queue;
- nothing that was settled (acked, rejected, delivered no-ack, purged,
  dropped by TTL, overflow or delivery limit, deleted with its queue)
  comes back;
- nothing leaves a queue without a reason: a ready copy vanishes only by
  TTL (once its TTL has passed), drop-head overflow, or the delivery
  limit (right after a requeue past it, which it must then not survive);
- admission: a queue without dedup or length limits takes every message
  routed to it; reject-publish queues refuse exactly when full (``refused``
  is reported), drop-head queues never exceed their limits and discard a
  message they could never hold; ``routed`` is true exactly when some
  queue matched;
- deliveries carry the right redelivered flag; a consumer never holds more
  than its prefetch; a queue with a consumer that has room has nothing
  ready; ready messages are in publish order (by priority first in a
  priority queue); a delayed exchange holds exactly the messages not yet
  due;
- per-queue conservation between restarts, on the broker's own counters:
  published + restored = ready + unacked + acked + purged + dropped, where
  dropped equals the drops the model saw (at least those, for drop-head
  queues: see below); ``message_count`` and ``unacked`` match;
- the store's live reference counts equal the references the broker holds.

After each restart (clean, or a crash at any point: with a batch being
written, or with everything pending dropped):

- definitions.json holds the definitions the broker had at some point
  from the last one known saved onwards (exactly the last ones after a
  clean restart), and the model takes them as they are;
- in every durable queue that came back, every persistent copy whose
  record reached the disk (its batch <= the batch the crash left on disk:
  this covers every confirmed one) and that was not settled is there
  exactly once; nothing whose settlement reached the disk (the batch
  ``store.barrier()`` named right after it) is; nothing transient is;
  anything else may or may not be there, and if it is, once and only
  where it was; nothing else is. Redelivered flags: false for a copy never
  delivered, true after a clean restart for one that was; the delivery
  counts of a delivery-limit queue carry over;
- a durable delayed exchange holds the same way what it held;
- the dedup cache of a durable queue holds no key that only a message lost
  in the crash carried (issue 11, defect 3), and holds the key of every
  persistent message present after the restart (unless the cache may have
  evicted or expired it).

Relaxations, each because the exact behaviour is intricate and not an
invariant:

- TTL timing: a copy may vanish once its TTL has passed, but need not
  (RabbitMQ expires only from the head, so a long-lived message shelters
  short-lived ones behind it). Dead-lettered copies keep their expiration
  unless it was the reason they died; the model allows either.
- Drop-head picks its victims itself; the model checks the limits hold,
  not which messages went. Within one publish, a message a full drop-head
  sink took can be pushed out again by its own dead-lettered copy (another
  target discarded it) before anything can see it: the model then accepts
  that the sink did not take it, and for drop-head queues the broker may
  count more drops than the model saw.
- Dedup caches are not modelled: a queue with dedup may drop a message
  that carries a dedup key as a duplicate, so such a message need not
  arrive. Messages without a dedup-key header are keyed by their unique
  message id and can never be duplicates (their dead-lettered copies come
  after them).
- Definitions after a crash: the model cannot know whether the batch being
  written carried the newest definitions, so any state from the last one
  known saved onwards is accepted.
- Delivery counts after a crash: the DELIVERED entries are written
  asynchronously, so a delivery-limit queue may count fewer deliveries
  than the model; the model then allows, but does not require, a drop.
  Redelivered flags of copies delivered before a crash may be either.
- At-least-once hand-offs: a dead-lettered copy or a delayed hand-off
  whose original comes back after a crash may be there twice. Under this
  crash model (the writer finishes its batch or never gets it, and a
  hand-off's copy and its original's ack share a batch) that cannot
  happen; should it, the copy is tracked loosely (present or not, any
  number of times) instead of failing.
- Not covered: exchange-to-exchange bindings, alternate exchanges,
  exchange-level dedup, CC/BCC, single active consumer, retry delays,
  consumer timeouts, partially written batches and power loss (the
  power-loss harness's domain).

CI runs a modest number of examples (about 30-60 s); long runs::

    ROOST_MODEL_EXAMPLES=2000 ROOST_MODEL_STEPS=100 \\
        pytest tests/model/test_durable_broker.py --hypothesis-seed=N

(docs/fuzzing.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from roost.broker.delayed import DelayedExchange
from roost.broker.message import Message
from roost.broker.queue import Queue
from tests.model.harness import (
    Delivery,
    ModelBroker,
    RecordingSink,
    delayed_contents,
    message_id,
    queue_contents,
)

SOURCES = ("q0", "q1", "q2")
SINKS = ("d0", "d1")
QUEUES = SOURCES + SINKS
KEYS = ("a.b", "a.c", "b.c")
PATTERNS = ("a.b", "a.*", "*.c", "#", "a.#")
DEDUP_KEYS = ("k0", "k1")
SIZES = (16, 300, 1500, 3500)
PLAIN_EXCHANGES = {"fan": "fanout", "top": "topic", "dlx": "fanout"}
DELAYED = "delay"
READY, UNACKED, GONE = "ready", "unacked", "gone"
DIRECT = ""  # the origin of a copy that was published, not dead-lettered

# Number of channels (RecordingSinks) the machine keeps open.
CHANNELS = 2
# Steps between two restarts at least (crashes and clean ones), so that
# state builds up in between.
RESTART_EVERY = 4


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching, written independently of roost.broker.topic."""
    p, k = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
        return j < len(k) and p[i] in ("*", k[j]) and match(i + 1, j + 1)

    return match(0, 0)


# -- the model ---------------------------------------------------------------


@dataclass
class Msg:
    id: str
    routing_key: str
    persistent: bool
    priority: int | None
    expiration: int | None
    dedup_key: str | None
    size: int


Key = tuple[str, str]  # (message id, origin)


@dataclass
class Copy:
    """A message's place in one queue incarnation."""

    msg: Msg
    origin: str
    window: int  # observation in which it entered (publish order, coarsely)
    entered: int  # clock (ms) when it entered
    # The batch carrying its record for this queue (0: none, transient or
    # non-durable); an upper bound for copies the model saw arrive.
    batch: int
    state: str = READY
    delivered_max: int = 0  # deliveries, as the model counts them
    delivered_min: int = 0  # as the store may count them (after a crash: 0)
    redelivered: bool = False  # the flag it carries (on its next delivery)
    settled_at: int | None = None  # barrier when it left (durable once on disk)
    # Its record is known to be on disk (it came back in a restart): batch
    # numbers start again with each store, so ``batch`` no longer says.
    on_disk: bool = False
    requeued: bool = False  # requeued by the step being checked
    loose: bool = False  # an at-least-once duplicate: tracked loosely

    @property
    def key(self) -> Key:
        return (self.msg.id, self.origin)


@dataclass
class QModel:
    name: str
    incarnation: int
    durable: bool
    args: dict[str, Any]
    queue: Queue
    store_id: int
    copies: dict[Key, Copy] = field(default_factory=dict)
    deleted: bool = False
    last_used: int = 0
    # Since the last restart (conservation against the broker's counters).
    restored: int = 0
    purged: int = 0
    dropped: int = 0
    inexact: bool = False  # drops the model could not tell apart (see check_drop)

    @property
    def max_priority(self) -> int:
        return int(self.args.get("x-max-priority", 0))

    @property
    def ttl(self) -> int | None:
        return self.args.get("x-message-ttl")

    @property
    def max_len(self) -> int | None:
        return self.args.get("x-max-length")

    @property
    def max_bytes(self) -> int | None:
        return self.args.get("x-max-length-bytes")

    @property
    def overflow(self) -> str:
        return str(self.args.get("x-overflow", "drop-head"))

    @property
    def limited(self) -> bool:
        return self.max_len is not None or self.max_bytes is not None

    @property
    def drop_head(self) -> bool:
        return self.limited and self.overflow == "drop-head"

    @property
    def dedup(self) -> bool:
        return bool(self.args.get("x-message-deduplication"))

    @property
    def delivery_limit(self) -> int | None:
        return self.args.get("x-delivery-limit")

    @property
    def expires(self) -> int | None:
        return self.args.get("x-expires")

    @property
    def dlx(self) -> str | None:
        return self.args.get("x-dead-letter-exchange")

    def ready(self) -> list[Copy]:
        return [c for c in self.copies.values() if c.state == READY and not c.loose]

    def priority_of(self, msg: Msg) -> int:
        mp = self.max_priority
        return min(msg.priority, mp) if mp and msg.priority else 0

    def ttl_of(self, msg: Msg) -> int | None:
        ttls = [t for t in (self.ttl, msg.expiration) if t is not None]
        return min(ttls) if ttls else None


@dataclass
class Held:
    msg: Msg
    due: int
    batch: int  # its persistent record's batch (0: none)
    settled_at: int | None = None  # released (handed off) or discarded
    on_disk: bool = False  # held again after a restart


@dataclass
class XModel:
    name: str
    kind: str  # fanout, topic, direct: how it routes (a delayed one: its type)
    durable: bool
    delayed: bool
    store_id: int = 0
    bindings: set[tuple[str, str]] = field(default_factory=set)  # (queue, key)
    held: dict[str, Held] = field(default_factory=dict)


Definitions = tuple[frozenset[Any], frozenset[Any], frozenset[Any]]


@dataclass
class Snapshot:
    generation: int
    definitions: Definitions
    saved: bool = False


class Mismatch(AssertionError):
    pass


def check(condition: bool, text: str) -> None:
    if not condition:
        raise Mismatch(text)


def origin_of(message: Message) -> str:
    origin = message.headers.get("x-last-death-queue")
    return origin if isinstance(origin, str) else DIRECT


def key_of(message: Message) -> Key:
    return (message_id(message), origin_of(message))


# -- strategies -----------------------------------------------------------------


def _sometimes(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 3)) == 0


@st.composite
def queue_arguments(draw: st.DrawFn, sink: bool) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if _sometimes(draw):
        args["x-max-priority"] = draw(st.integers(1, 3))
    if _sometimes(draw):
        args["x-message-ttl"] = draw(st.sampled_from([0, 100, 1000, 10_000]))
    if _sometimes(draw):
        args["x-max-length"] = draw(st.integers(0, 4))
    if _sometimes(draw):
        args["x-max-length-bytes"] = draw(st.sampled_from([0, 1000, 5000]))
    if _sometimes(draw):
        args["x-overflow"] = draw(
            st.sampled_from(["drop-head", "reject-publish", "reject-publish-dlx"])
        )
    if _sometimes(draw):
        args["x-delivery-limit"] = draw(st.integers(0, 2))
    if _sometimes(draw):
        args["x-message-deduplication"] = True
    if draw(st.integers(0, 7)) == 0:
        args["x-expires"] = draw(st.sampled_from([1000, 30_000]))
    if not sink:
        dlx = draw(st.sampled_from([None, None, "default", "dlx"]))
        if dlx == "default":
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = draw(st.sampled_from(SINKS))
        elif dlx == "dlx":
            args["x-dead-letter-exchange"] = "dlx"
    return args


@dataclass(frozen=True)
class MsgSpec:
    persistent: bool
    priority: int | None
    expiration: int | None
    dedup_key: str | None
    delay: int | None
    size: int


MESSAGES = st.builds(
    MsgSpec,
    persistent=st.sampled_from([True, True, True, False]),
    priority=st.none() | st.integers(0, 4),
    expiration=st.sampled_from([None, None, None, 0, 200, 2000]),
    dedup_key=st.sampled_from([None, None, *DEDUP_KEYS]),
    delay=st.sampled_from([None, 0, 150, 1000, 3000]),
    size=st.sampled_from(SIZES),
)
TARGETS = st.one_of(
    st.tuples(st.just(""), st.sampled_from(QUEUES)),
    st.tuples(st.sampled_from(["fan", "top", DELAYED]), st.sampled_from(KEYS)),
)
PICK = st.integers(0, 1 << 16)
CH = st.integers(0, CHANNELS - 1)


# -- the machine ------------------------------------------------------------------


class DurableBrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="roost-model-"))
        self.h: ModelBroker | None = None
        self.queues: dict[str, QModel] = {}  # live incarnations by name
        self.incarnations: list[QModel] = []  # every one ever declared
        self.exchanges: dict[str, XModel] = {}
        self.old_exchanges: list[XModel] = []  # deleted ones (may come back)
        self.channels: list[RecordingSink] = []
        self.next_msg = 0
        self.next_tag = 0
        self.window = 0
        self.snapshots: list[Snapshot] = []
        # Copies the step now running may make: by queue, the keys.
        self.expect: dict[int, set[Key]] = {}
        # Copies the step now running rejected (dead-lettered if the queue may).
        self.rejected: list[tuple[QModel, Copy]] = []
        # Ids whose hand-offs may be duplicated (their original came back).
        self.at_least_once: set[str] = set()
        self.since_restart = 0
        self.messages: dict[str, Msg] = {}

    # -- plumbing ------------------------------------------------------------

    @property
    def b(self) -> ModelBroker:
        assert self.h is not None
        return self.h

    def teardown(self) -> None:
        try:
            if self.h is not None:
                self.h.abandon()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(
        limit=st.sampled_from([1, 4096, 1 << 30]),
        segment=st.sampled_from([8192, 16384, 65536]),
        data=st.data(),
    )
    def start(self, limit: int, segment: int, data: st.DataObject) -> None:
        """A broker with most of the topology declared and bound already,
        so that steps go to messages rather than to declarations."""
        # A queue_memory_limit of 1 pages every message; 4096 a few; the
        # alarm drops every queue to 1024 bytes (the product's 1 MB would
        # never page these few messages). Small segments roll every few
        # messages, so segments are deleted whole and compacted.
        self.h = ModelBroker(
            self.tmp / "data",
            segment_size=segment,
            queue_memory_limit=limit,
            alarm_queue_memory_limit=1024,
        )
        self.h.after_timer = self.observe
        self.channels = [self.h.channel(f"c{i}") for i in range(CHANNELS)]
        self.snapshots = [Snapshot(self.b.broker.definitions_generation, self.definitions())]
        self.snapshots[0].saved = True
        event(f"queue_memory_limit {limit}")
        for name in QUEUES:
            if data.draw(st.integers(0, 4), label=f"declare {name}"):
                self.declare_queue(name, data.draw(st.booleans(), label="durable"), data)
        for name in PLAIN_EXCHANGES:
            self.declare_exchange(name, data.draw(st.booleans(), label=f"{name} durable"))
        self.declare_delayed(
            data.draw(st.booleans(), label="delay durable"),
            data.draw(st.sampled_from(["direct", "fanout", "topic"]), label="delay type"),
        )
        for exchange in self.exchanges:
            for queue in QUEUES:
                if data.draw(st.booleans(), label=f"bind {exchange} {queue}"):
                    key = data.draw(st.sampled_from(KEYS), label="key")
                    self.bind(exchange, queue, key, data.draw(st.sampled_from(PATTERNS)))

    def now(self) -> int:
        return self.b.clock.now

    def barrier(self) -> int:
        return self.b.settle_barrier()

    def qm_of(self, queue: Queue) -> QModel:
        for qm in reversed(self.incarnations):
            if qm.queue is queue:
                return qm
        raise Mismatch(f"a delivery from a queue the model never declared: {queue.name}")

    def new_msg(self, spec: MsgSpec, routing_key: str) -> Msg:
        self.next_msg += 1
        return Msg(
            f"m{self.next_msg}",
            routing_key,
            spec.persistent,
            spec.priority,
            spec.expiration,
            spec.dedup_key,
            spec.size,
        )

    # -- routing, as the model sees it -------------------------------------------

    def route(self, exchange: str, key: str) -> list[QModel]:
        if exchange == "":
            qm = self.queues.get(key)
            return [qm] if qm is not None else []
        xm = self.exchanges.get(exchange)
        if xm is None:
            return []
        return self.route_bindings(xm, key)

    def route_bindings(self, xm: XModel, key: str) -> list[QModel]:
        names: list[str] = []
        for qname, bkey in sorted(xm.bindings):
            if (
                xm.kind == "fanout"
                or (xm.kind == "direct" and bkey == key)
                or (xm.kind == "topic" and topic_matches(bkey, key))
            ) and qname not in names:
                names.append(qname)
        return [self.queues[n] for n in names]

    def dead_letter(self, qm: QModel, msg: Msg, into: dict[int, set[Key]]) -> None:
        """Where a copy dead-lettered from ``qm`` may go."""
        dlx = qm.dlx
        if dlx is None:
            return
        if dlx == "":
            targets = self.route("", qm.args["x-dead-letter-routing-key"])
        else:
            xm = self.exchanges.get(dlx)
            targets = self.route_bindings(xm, msg.routing_key) if xm is not None else []
        for t in targets:
            into.setdefault(id(t), set()).add((msg.id, qm.name))

    # -- observation --------------------------------------------------------------

    def contents(self, qm: QModel) -> list[tuple[Key, bool, Message]]:
        return [(key_of(m), r, m) for m, r in queue_contents(qm.queue)]

    def observe(self) -> None:
        """Compare the broker with the model after anything happened, and
        update the model with what it may not predict exactly (which
        queue took a message, what TTL and overflow dropped)."""
        b = self.b
        self.window += 1
        now = self.now()
        barrier = self.barrier()
        vh = b.vhost
        # Queues that went by themselves (x-expires).
        for name, qm in list(self.queues.items()):
            if vh.queues.get(name) is not qm.queue:
                expires = qm.expires
                check(
                    expires is not None and now >= qm.last_used + expires,
                    f"queue {name} disappeared (x-expires {expires}, last used {qm.last_used}, "
                    f"now {now})",
                )
                check(not self.consumers_of(qm), f"queue {name} expired with consumers")
                event("queue expired (x-expires)")
                self.forget_queue(qm, barrier)
        deliveries: list[tuple[int, Delivery]] = []
        for i, ch in enumerate(self.channels):
            deliveries.extend((i, d) for d in ch.log)
            ch.log.clear()
        delivered: dict[int, list[Delivery]] = {}
        for _, d in deliveries:
            delivered.setdefault(id(self.qm_of(d.queue)), []).append(d)
        seen: dict[int, list[tuple[Key, bool, Message]]] = {
            id(qm): self.contents(qm) for qm in self.queues.values()
        }
        # Delayed exchanges: what they released may arrive now.
        released: dict[int, set[Key]] = {}
        for xm in self.exchanges.values():
            if xm.delayed:
                self.observe_delayed(xm, now, barrier, released)
        # What left without the model's doing: dropped, so dead-lettered.
        dl: dict[int, set[Key]] = {}
        for qm, c in self.rejected:
            if not qm.deleted:
                self.dead_letter(qm, c.msg, dl)
        self.rejected.clear()
        for qm in self.queues.values():
            present = {k for k, _, _ in seen[id(qm)]}
            present |= {key_of(d.entry.message) for d in delivered.get(id(qm), [])}
            for c in qm.copies.values():
                if c.state != READY or c.loose or c.key in present:
                    continue
                self.check_drop(qm, c, now)
                c.state = GONE
                c.settled_at = barrier
                self.dead_letter(qm, c.msg, dl)
            offered = self.expect.get(id(qm), set()) | released.get(id(qm), set())
            for k in offered:
                if k not in present and k not in qm.copies:
                    # Not taken: a refused or discarded message may be
                    # dead-lettered at once.
                    self.dead_letter(qm, self.msg_of(k[0]), dl)
        # Arrivals.
        for qm in self.queues.values():
            counts = Counter(k for k, _, _ in seen[id(qm)])
            arrived = [k for k, _, _ in seen[id(qm)]]
            arrived += [key_of(d.entry.message) for d in delivered.get(id(qm), [])]
            for k in arrived:
                old = qm.copies.get(k)
                if old is not None and (old.state != GONE or old.loose):
                    continue
                handed = k in dl.get(id(qm), ()) or k in released.get(id(qm), ())
                # A hand-off made again because its original came back
                # after a crash (at least once) is a new copy.
                check(
                    old is None or (handed and k[0] in self.at_least_once),
                    f"{k} came back in {qm.name} after it was settled "
                    f"(settled at batch {old.settled_at if old else None})",
                )
                check(
                    handed or k in self.expect.get(id(qm), ()),
                    f"{k} appeared in {qm.name}, where it was not routed",
                )
                msg = self.msg_of(k[0])
                record = barrier if msg.persistent and qm.queue.store_id else 0
                qm.copies[k] = Copy(msg, k[1], self.window, now, record)
                if k[1] != DIRECT:
                    event("dead-lettered copy arrived")
                elif k in released.get(id(qm), ()):
                    event("delayed message arrived")
            for k, n in counts.items():
                if n > 1:
                    c = qm.copies[k]
                    check(
                        k[0] in self.at_least_once,
                        f"{k} is {n} times in {qm.name}",
                    )
                    c.loose = True
        # Deliveries (after arrivals: a message may arrive and go at once).
        for _, d in deliveries:
            qm = self.qm_of(d.queue)
            k = key_of(d.entry.message)
            c = qm.copies[k]
            if c.loose:
                continue
            check(c.state == READY, f"{k} delivered from {qm.name} while {c.state}")
            check(
                d.entry.redelivered == c.redelivered,
                f"{k} delivered from {qm.name} with redelivered={d.entry.redelivered}, "
                f"expected {c.redelivered}",
            )
            c.delivered_max += 1
            c.delivered_min += 1
            c.redelivered = True
            c.requeued = False
            if d.no_ack:
                c.state = GONE
                c.settled_at = barrier
            else:
                c.state = UNACKED
        for qm in self.queues.values():
            limit = qm.delivery_limit
            for c in qm.copies.values():
                check(
                    not (c.requeued and c.state == READY and not c.loose)
                    or limit is None
                    or c.delivered_min <= limit,
                    f"{c.key} requeued to {qm.name} after {c.delivered_min} deliveries, "
                    f"past its x-delivery-limit {limit}",
                )
            self.check_queue(qm, seen[id(qm)], now)
        self.check_unacked()
        for qm in self.incarnations:
            for c in qm.copies.values():
                c.requeued = False
        self.expect.clear()

    def msg_of(self, mid: str) -> Msg:
        msg = self.messages.get(mid)
        check(msg is not None, f"{mid} was never published")
        assert msg is not None
        return msg

    def check_drop(self, qm: QModel, c: Copy, now: int) -> None:
        """A ready copy left ``qm`` by itself: it must have had a reason."""
        # A dead-lettered copy keeps its expiration unless that is why it
        # died: counting it always is the lenient choice.
        ttl = qm.ttl_of(c.msg)
        limit = qm.delivery_limit
        if c.requeued and limit is not None and c.delivered_max > limit:
            event("dropped: delivery limit")
            if c.delivered_min <= limit:
                # The broker may have counted fewer deliveries (a crash lost
                # some marks) and dropped it for TTL or overflow instead.
                qm.inexact = True
            return  # counted as acked by the broker
        if ttl is not None and now >= c.entered + ttl:
            event("dropped: TTL")
        elif qm.drop_head:
            event("dropped: overflow")
        else:
            raise Mismatch(
                f"{c.key} left {qm.name} without a reason (entered {c.entered}, now {now}, "
                f"ttl {ttl}, args {qm.args}, delivered {c.delivered_max})"
            )
        qm.dropped += 1

    def observe_delayed(
        self, xm: XModel, now: int, barrier: int, released: dict[int, set[Key]]
    ) -> None:
        ex = self.b.vhost.exchanges.get(xm.name)
        assert isinstance(ex, DelayedExchange)
        actual = Counter(message_id(m) for _, m in delayed_contents(ex))
        for mid, held in xm.held.items():
            if held.settled_at is not None:
                continue
            if actual[mid]:
                continue
            check(
                held.due <= now,
                f"{xm.name} lost {mid} before it was due ({held.due}, now {now})",
            )
            held.settled_at = barrier
            targets = self.route_bindings(xm, held.msg.routing_key)
            event(f"delayed: released to {min(len(targets), 2)}+ queues")
            for qm in targets:
                released.setdefault(id(qm), set()).add((mid, DIRECT))
        for mid, n in actual.items():
            held_ = xm.held.get(mid)
            check(
                held_ is not None and held_.settled_at is None,
                f"{xm.name} holds {mid}, which it was never given or already released",
            )
            check(n == 1 or mid in self.at_least_once, f"{xm.name} holds {mid} {n} times")

    def check_queue(self, qm: QModel, seen: list[tuple[Key, bool, Message]], now: int) -> None:
        q = qm.queue
        check(
            q.message_count == len(seen),
            f"{qm.name}: message_count {q.message_count}, but {len(seen)} messages are there",
        )
        ready = {c.key: c for c in qm.copies.values() if c.state == READY}
        keys = {k for k, _, _ in seen}
        missing = [k for k, c in ready.items() if k not in keys and not c.loose]
        check(not missing, f"{qm.name}: the model has {missing} ready, the queue does not")
        stray = [(k, qm.copies[k].state if k in qm.copies else None) for k in keys - set(ready)]
        check(not stray, f"{qm.name}: holds (key, model state) {stray}")
        last: tuple[int, int] | None = None
        for k, redelivered, _ in seen:
            c = qm.copies[k]
            if c.loose:
                continue
            check(
                redelivered == c.redelivered,
                f"{qm.name}: {k} ready with redelivered={redelivered}, expected {c.redelivered}",
            )
            rank = (-qm.priority_of(c.msg), c.window)
            check(
                last is None or rank >= last,
                f"{qm.name}: out of order at {k}: {[kk for kk, _, _ in seen]}",
            )
            last = rank
        # Consumers with room leave nothing ready.
        if seen:
            for c_ in self.consumers_of(qm):
                room = c_.no_ack or not c_.prefetch or c_.unacked < c_.prefetch
                check(
                    not room,
                    f"{qm.name}: {len(seen)} ready while consumer {c_.tag} has room",
                )
        # Conservation, on the broker's own counters since the restart.
        unacked = sum(1 for c in qm.copies.values() if c.state == UNACKED and not c.loose)
        dropped = q.published + qm.restored - len(seen) - q.unacked - q.acked - qm.purged
        exact = not qm.drop_head and not qm.inexact
        ok = dropped == qm.dropped if exact else dropped >= qm.dropped
        check(
            ok and q.unacked == unacked,
            f"{qm.name}: published {q.published} + restored {qm.restored} != ready "
            f"{len(seen)} + unacked {q.unacked} (model {unacked}) + acked {q.acked} + "
            f"purged {qm.purged} + dropped {dropped} (model saw {qm.dropped})",
        )

    def check_unacked(self) -> None:
        held: dict[int, set[Key]] = {}
        for ch in self.channels:
            for d in ch.unacked.values():
                qm = self.qm_of(d.queue)
                k = key_of(d.entry.message)
                check(k not in held.setdefault(id(qm), set()), f"{k} delivered twice")
                held[id(qm)].add(k)
            for c_ in ch.consumers.values():
                if c_.prefetch and not c_.no_ack:
                    check(
                        c_.unacked <= c_.prefetch,
                        f"consumer {c_.tag} holds {c_.unacked} > prefetch {c_.prefetch}",
                    )
        for qm in self.incarnations:
            model = {c.key for c in qm.copies.values() if c.state == UNACKED and not c.loose}
            check(
                model == held.get(id(qm), set()),
                f"{qm.name}: unacked {sorted(held.get(id(qm), set()))}, model {sorted(model)}",
            )

    def consumers_of(self, qm: QModel) -> list[Any]:
        return [c for ch in self.channels for c in ch.consumers.values() if c.queue is qm.queue]

    def forget_queue(self, qm: QModel, barrier: int) -> None:
        """``qm`` was deleted: its ready copies are settled with it."""
        qm.deleted = True
        for c in qm.copies.values():
            if c.state == READY:
                c.state = GONE
                c.settled_at = barrier
        self.queues.pop(qm.name, None)
        for xm in self.exchanges.values():
            xm.bindings = {b for b in xm.bindings if b[0] != qm.name}

    # -- definitions -------------------------------------------------------------

    def definitions(self) -> Definitions:
        """What definitions.json must hold, from the model."""
        queues = frozenset((qm.name, qm.store_id) for qm in self.queues.values() if qm.durable)
        exchanges = frozenset(
            (xm.name, xm.kind, xm.delayed, xm.store_id)
            for xm in self.exchanges.values()
            if xm.durable
        )
        bindings = frozenset(
            (xm.name, q, k)
            for xm in self.exchanges.values()
            if xm.durable
            for q, k in xm.bindings
            if self.queues[q].durable
        )
        return queues, exchanges, bindings

    def recovered_definitions(self) -> Definitions:
        vh = self.b.vhost
        queues = frozenset((q.name, q.store_id) for q in vh.queues.values() if q.durable)
        exchanges = set()
        bindings = set()
        for name, ex in vh.exchanges.items():
            if name not in PLAIN_EXCHANGES and name != DELAYED:
                continue
            delayed = isinstance(ex, DelayedExchange)
            kind = ex.delayed_type if isinstance(ex, DelayedExchange) else ex.type_name
            store_id = ex.store_id if isinstance(ex, DelayedExchange) else 0
            if ex.durable:
                exchanges.add((name, kind, delayed, store_id))
            for bd in ex.bindings.values():
                bindings.add((name, bd.destination.name, bd.routing_key))
        return queues, frozenset(exchanges), frozenset(bindings)

    @invariant()
    def consistent(self) -> None:
        if self.h is None:
            return
        self.since_restart += 1
        b = self.b
        self.b.check_references()
        # The model and the broker agree on what exists.
        vh = b.vhost
        check(
            set(vh.queues) == set(self.queues),
            f"queues {sorted(vh.queues)}, model {sorted(self.queues)}",
        )
        for name, xm in self.exchanges.items():
            ex = vh.exchanges.get(name)
            check(ex is not None, f"exchange {name} is gone")
            assert ex is not None
            actual = {(bd.destination.name, bd.routing_key) for bd in ex.bindings.values()}
            check(actual == xm.bindings, f"{name} binds {actual}, model {xm.bindings}")
        gen = b.broker.definitions_generation
        if gen != self.snapshots[-1].generation:
            snap = Snapshot(gen, self.definitions())
            self.snapshots.append(snap)

            def saved(s: Snapshot = snap) -> None:
                s.saved = True

            b.broker.when_definitions_saved(saved)

    # -- rules: definitions --------------------------------------------------------

    @rule(name=st.sampled_from(QUEUES), durable=st.booleans(), data=st.data())
    def declare_queue(self, name: str, durable: bool, data: st.DataObject) -> None:
        if name in self.queues:
            # Redeclaring with the same arguments changes nothing (but
            # restarts x-expires).
            qm = self.queues[name]
            q = self.b.vhost.declare_queue(
                name, owner=None, durable=qm.durable, arguments=dict(qm.args)
            )
            check(q is qm.queue, f"redeclaring {name} made a new queue")
            qm.last_used = self.now()
            self.observe()
            return
        args = data.draw(queue_arguments(sink=name in SINKS), label="arguments")
        q = self.b.vhost.declare_queue(name, owner=None, durable=durable, arguments=args)
        qm = QModel(name, len(self.incarnations), durable, args, q, q.store_id)
        qm.last_used = self.now()
        self.incarnations.append(qm)
        self.queues[name] = qm
        self.observe()

    @rule(name=st.sampled_from(sorted(PLAIN_EXCHANGES)), durable=st.booleans())
    def declare_exchange(self, name: str, durable: bool) -> None:
        if name in self.exchanges:
            return
        kind = PLAIN_EXCHANGES[name]
        self.b.vhost.declare_exchange(name, kind, durable=durable)
        self.exchanges[name] = XModel(name, kind, durable, delayed=False)

    @rule(durable=st.booleans(), kind=st.sampled_from(["direct", "fanout", "topic"]))
    def declare_delayed(self, durable: bool, kind: str) -> None:
        if DELAYED in self.exchanges:
            return
        ex = self.b.vhost.declare_exchange(
            DELAYED, "x-delayed-message", durable=durable, arguments={"x-delayed-type": kind}
        )
        assert isinstance(ex, DelayedExchange)
        self.exchanges[DELAYED] = XModel(DELAYED, kind, durable, True, ex.store_id)

    @rule(name=st.sampled_from([*PLAIN_EXCHANGES, DELAYED]))
    def delete_exchange(self, name: str) -> None:
        xm = self.exchanges.pop(name, None)
        if xm is None:
            return
        self.b.vhost.delete_exchange(name)
        barrier = self.barrier()
        for held in xm.held.values():
            if held.settled_at is None:
                held.settled_at = barrier
        xm.bindings.clear()
        self.old_exchanges.append(xm)
        self.observe()

    @rule(
        exchange=st.sampled_from([*PLAIN_EXCHANGES, DELAYED]),
        queue=st.sampled_from(QUEUES),
        key=st.sampled_from(KEYS),
        pattern=st.sampled_from(PATTERNS),
    )
    def bind(self, exchange: str, queue: str, key: str, pattern: str) -> None:
        xm = self.exchanges.get(exchange)
        qm = self.queues.get(queue)
        if xm is None or qm is None or (exchange == "dlx" and queue not in SINKS):
            return
        bkey = {"fanout": "", "direct": key, "topic": pattern}[xm.kind]
        self.b.vhost.bind(exchange, qm.queue, bkey, None)
        xm.bindings.add((queue, bkey))

    @rule(exchange=st.sampled_from([*PLAIN_EXCHANGES, DELAYED]), pick=PICK)
    def unbind(self, exchange: str, pick: int) -> None:
        xm = self.exchanges.get(exchange)
        if xm is None or not xm.bindings:
            return
        queue, bkey = sorted(xm.bindings)[pick % len(xm.bindings)]
        self.b.vhost.unbind(exchange, self.queues[queue].queue, bkey, None)
        xm.bindings.discard((queue, bkey))

    @rule(name=st.sampled_from(QUEUES))
    def delete_queue(self, name: str) -> None:
        qm = self.queues.get(name)
        if qm is None:
            return
        ready = len(qm.ready())
        n = self.b.vhost.delete_queue(name, owner=None)
        check(n == ready, f"deleting {name} reported {n} messages, the model has {ready}")
        self.forget_queue(qm, self.barrier())
        self.observe()

    @rule(name=st.sampled_from(QUEUES))
    def purge(self, name: str) -> None:
        qm = self.queues.get(name)
        if qm is None:
            return
        ready = qm.ready()
        n = self.b.vhost.purge_queue(name, None)
        check(n == len(ready), f"purging {name} reported {n}, the model has {len(ready)}")
        barrier = self.barrier()
        for c in ready:
            c.state = GONE
            c.settled_at = barrier
        qm.purged += n
        self.observe()

    # -- rules: publishing -----------------------------------------------------------

    @rule(to=TARGETS, spec=MESSAGES, mandatory=st.booleans())
    def publish(self, to: tuple[str, str], spec: MsgSpec, mandatory: bool) -> None:
        self.publish_one(to, spec, mandatory)

    @rule(items=st.lists(st.tuples(TARGETS, MESSAGES), min_size=2, max_size=8))
    def publish_many(self, items: list[tuple[tuple[str, str], MsgSpec]]) -> None:
        for to, spec in items:
            self.publish_one(to, spec, False)

    def publish_one(self, target: tuple[str, str], spec: MsgSpec, mandatory: bool) -> Msg | None:
        exchange, key = target
        xm = self.exchanges.get(exchange) if exchange else None
        if exchange and xm is None:
            return None
        msg = self.new_msg(spec, key)
        self.messages[msg.id] = msg
        headers: dict[str, Any] = {}
        if spec.dedup_key is not None:
            headers["x-deduplication-header"] = spec.dedup_key
        if spec.delay is not None:
            headers["x-delay"] = spec.delay
        held = xm is not None and xm.delayed and (spec.delay or 0) > 0
        targets = [] if held else self.route(exchange, key)
        before = {id(qm): (len(qm.ready()), sum(c.msg.size for c in qm.ready())) for qm in targets}
        for qm in targets:
            self.expect.setdefault(id(qm), set()).add((msg.id, DIRECT))
        body = msg.id.encode().ljust(spec.size, b".")
        p = self.b.publish(
            exchange,
            key,
            body,
            message_id=msg.id,
            persistent=spec.persistent,
            priority=spec.priority,
            expiration=None if spec.expiration is None else str(spec.expiration),
            headers=headers or None,
            mandatory=mandatory,
        )
        if held:
            assert xm is not None
            check(not p.routed and not p.refused, f"held {msg.id}: {p}")
            record = p.batch if spec.persistent and xm.durable else 0
            xm.held[msg.id] = Held(msg, self.now() + (spec.delay or 0), record)
            event("publish: held by the delayed exchange")
        self.observe()
        if held:
            return msg
        check(
            p.routed == bool(targets),
            f"{msg.id} to {exchange!r}/{key}: routed={p.routed}, the model routes it to "
            f"{[qm.name for qm in targets]}",
        )
        refusing = False
        for qm in targets:
            n0, b0 = before[id(qm)]
            taken = (msg.id, DIRECT) in qm.copies
            if taken:
                record = p.batch if msg.persistent and qm.queue.store_id else 0
                qm.copies[(msg.id, DIRECT)].batch = record
            # Keyed by its unique message id, a message is never a duplicate:
            # its dead-lettered copies come after it.
            maybe_dup = qm.dedup and msg.dedup_key is not None
            if not taken and maybe_dup:
                # A duplicate is confirmed only once its original is on disk.
                for c in qm.copies.values():
                    if c.msg.dedup_key == msg.dedup_key and c.batch:
                        check(
                            p.batch >= c.batch,
                            f"duplicate {msg.id} confirmed at batch {p.batch}, before its "
                            f"original {c.key} in {qm.name} (batch {c.batch})",
                        )
            L, B = qm.max_len, qm.max_bytes
            full = (L is not None and n0 + 1 > L) or (B is not None and b0 + msg.size > B)
            if not qm.dedup and not qm.limited:
                check(taken, f"{qm.name} did not take {msg.id}")
            elif qm.limited and qm.overflow != "drop-head":
                if taken:
                    check(not full, f"{qm.name} took {msg.id} while full ({n0}, {b0} bytes)")
                elif not maybe_dup:
                    check(full, f"{qm.name} refused {msg.id} while not full ({n0}, {b0})")
                if not taken and full and not maybe_dup:
                    refusing = True
            elif qm.limited:
                never = L == 0 or (B is not None and msg.size > B)
                if never:
                    check(not taken, f"{qm.name} took {msg.id}, which can never fit")
                elif not maybe_dup:
                    # Taken, then perhaps pushed out by its own dead-lettered
                    # copy (another target discarded it) in this publish.
                    pushed = any(
                        k[0] == msg.id and c.window == self.window for k, c in qm.copies.items()
                    )
                    check(taken or pushed, f"{qm.name} did not take {msg.id}")
                ready = qm.ready()
                check(
                    (L is None or len(ready) <= L)
                    and (B is None or sum(c.msg.size for c in ready) <= B),
                    f"{qm.name} over its limits after taking {msg.id}",
                )
            if not taken:
                event("publish: not taken by a queue")
        if refusing:
            check(p.refused, f"{msg.id} was refused by a full queue, but not reported so")
        if p.refused:
            check(
                any(
                    qm.limited and qm.overflow != "drop-head" and (msg.id, DIRECT) not in qm.copies
                    for qm in targets
                ),
                f"{msg.id} reported refused, but no full reject-publish queue refused it",
            )
            event("publish: refused (nack)")
        return msg

    @rule(
        items=st.lists(st.tuples(TARGETS, MESSAGES), min_size=1, max_size=3),
        ch=CH,
        acks=st.integers(0, 3),
    )
    def transaction(self, items: list[tuple[tuple[str, str], MsgSpec]], ch: int, acks: int) -> None:
        """tx.commit: the publishes, then the acks, and commit-ok once the
        barrier after all of it is durable."""
        for target, spec in items:
            self.publish_one(target, spec, False)
        sink = self.channels[ch]
        tags = sorted(sink.unacked)[:acks]
        self.settle(ch, tags, ack=True, requeue=False)

    # -- rules: consuming ------------------------------------------------------------

    @rule(ch=CH, name=st.sampled_from(QUEUES), no_ack=st.booleans())
    def get(self, ch: int, name: str, no_ack: bool) -> None:
        qm = self.queues.get(name)
        if qm is None:
            return
        qm.last_used = self.now()
        d = self.channels[ch].get(qm.queue, no_ack)
        self.observe()
        if d is None:
            # (get expires the head first: the model has seen that by now.)
            check(not qm.ready(), f"get on {name} found nothing, the model has ready ones")

    @rule(
        ch=CH,
        name=st.sampled_from(QUEUES),
        no_ack=st.booleans(),
        prefetch=st.sampled_from([0, 1, 2]),
    )
    def consume(self, ch: int, name: str, no_ack: bool, prefetch: int) -> None:
        qm = self.queues.get(name)
        if qm is None:
            return
        self.next_tag += 1
        qm.last_used = self.now()
        self.channels[ch].consume(qm.queue, f"ct{self.next_tag}", no_ack=no_ack, prefetch=prefetch)
        self.observe()

    def with_consumers(self) -> list[RecordingSink]:
        return [ch for ch in self.channels if ch.consumers]

    def with_unacked(self) -> list[int]:
        return [i for i, ch in enumerate(self.channels) if ch.unacked]

    @precondition(lambda self: self.with_consumers())
    @rule(ch=CH, pick=PICK)
    def cancel(self, ch: int, pick: int) -> None:
        sinks = self.with_consumers()
        sink = sinks[ch % len(sinks)]
        tag = sorted(sink.consumers)[pick % len(sink.consumers)]
        qm = self.qm_of(sink.consumers[tag].queue)
        qm.last_used = self.now()
        sink.cancel(tag)
        self.observe()

    def settle(self, ch: int, tags: list[int], ack: bool, requeue: bool) -> None:
        sink = self.channels[ch]
        deliveries = sink.take(tags)
        copies = [
            (self.qm_of(d.queue), self.qm_of(d.queue).copies[key_of(d.entry.message)])
            for d in deliveries
        ]
        sink.settle(deliveries, ack, requeue)
        barrier = self.barrier()
        for qm, c in copies:
            if c.loose:
                continue
            if requeue and not ack and not qm.deleted:
                c.state = READY
                c.redelivered = True
                c.requeued = True
            else:
                c.state = GONE
                c.settled_at = barrier
                if not ack and not requeue:
                    self.rejected.append((qm, c))
        self.observe()

    def pick_tags(self, ch: int, pick: int, multiple: bool) -> tuple[int, list[int]]:
        """A channel with deliveries, and some of their tags (``multiple``:
        every one up to the one picked, as basic.ack multiple=true)."""
        channels = self.with_unacked()
        ch = channels[ch % len(channels)]
        tags = sorted(self.channels[ch].unacked)
        chosen = tags[pick % len(tags)]
        return ch, [t for t in tags if t <= chosen] if multiple else [chosen]

    @precondition(lambda self: self.with_unacked())
    @rule(ch=CH, pick=PICK, multiple=st.booleans())
    def ack(self, ch: int, pick: int, multiple: bool) -> None:
        ch, tags = self.pick_tags(ch, pick, multiple)
        self.settle(ch, tags, ack=True, requeue=False)

    @precondition(lambda self: self.with_unacked())
    @rule(ch=CH, pick=PICK, multiple=st.booleans(), requeue=st.booleans())
    def nack(self, ch: int, pick: int, multiple: bool, requeue: bool) -> None:
        ch, tags = self.pick_tags(ch, pick, multiple)
        self.settle(ch, tags, ack=False, requeue=requeue)

    @rule(ch=CH)
    def close_channel(self, ch: int) -> None:
        """The channel closes: its consumers go, its deliveries are requeued."""
        sink = self.channels[ch]
        outstanding = [
            (self.qm_of(d.queue), self.qm_of(d.queue).copies[key_of(d.entry.message)])
            for d in sink.unacked.values()
        ]
        for c_ in sink.consumers.values():
            self.qm_of(c_.queue).last_used = self.now()
        sink.close()
        barrier = self.barrier()
        for qm, c in outstanding:
            if c.loose:
                continue
            if qm.deleted:
                c.state = GONE
                c.settled_at = barrier
            else:
                c.state = READY
                c.redelivered = True
                c.requeued = True
        self.channels[ch] = self.b.channel(f"c{ch}")
        self.observe()

    # -- rules: resources and time --------------------------------------------------

    @rule(on=st.booleans())
    def memory_alarm(self, on: bool) -> None:
        if on:
            self.b.broker.set_alarm("memory")
        else:
            self.b.broker.clear_alarm("memory")
        self.observe()

    @rule()
    def page_out_step(self) -> None:
        self.b.broker.page_out_step()
        self.observe()

    @rule(ms=st.sampled_from([0, 50, 150, 600, 1200, 4000, 12_000]))
    def advance(self, ms: int) -> None:
        self.b.advance(ms)
        self.observe()

    @rule(n=st.integers(1, 3))
    def tick(self, n: int) -> None:
        for _ in range(n):
            self.b.tick()
            self.observe()

    @rule()
    def flush(self) -> None:
        self.b.flush()
        self.observe()

    # -- rules: restarts --------------------------------------------------------------

    @precondition(lambda self: self.since_restart >= RESTART_EVERY)
    @rule()
    def restart(self) -> None:
        """A clean shutdown: channels close (requeue), everything is flushed."""
        for ch in range(CHANNELS):
            self.close_channel(ch)
        self.b.restart()
        self.since_restart = 0
        self.recover(None)
        event("restart: clean")

    @precondition(lambda self: self.since_restart >= RESTART_EVERY)
    @rule()
    def crash(self) -> None:
        """kill -9: whatever the writer was handed reaches the disk, nothing else."""
        if not self.b.store.idle:
            event("crash: with something unwritten")
        segments = len(list(self.b.store.dir.glob("*.seg")))
        event(f"crash: {min(segments, 4)}+ segments on disk")
        on_disk = self.b.crash()
        self.since_restart = 0
        self.recover(on_disk)
        event("restart: crash")

    def recover(self, on_disk: int | None) -> None:
        """Check what came back against the model and carry the model over.
        ``on_disk``: the newest batch on disk (None: a clean restart)."""
        b = self.b
        self.channels = [b.channel(f"c{i}") for i in range(CHANNELS)]
        self.expect.clear()
        self.rejected.clear()

        def durable(batch: int | None) -> bool:
            return batch is not None and (on_disk is None or batch <= on_disk)

        got = self.recovered_definitions()
        if on_disk is None:
            want = self.definitions()
            check(got == want, f"definitions after a clean restart: {got}, want {want}")
        else:
            first = max(i for i, s in enumerate(self.snapshots) if s.saved)
            allowed = [s.definitions for s in self.snapshots[first:]]
            check(
                got in allowed,
                f"definitions after a crash: {got}, none of those saved since {allowed}",
            )
        # By name and id: an id whose queue never reached the disk may be
        # handed out again after a crash (nothing on disk carries it).
        recovered = {(q.name, q.store_id): q for q in b.vhost.queues.values() if q.durable}
        back: list[QModel] = []
        for qm in reversed(self.incarnations):
            found = qm.durable and (qm.name, qm.store_id) in recovered
            if found and all(other.name != qm.name for other in back):
                back.append(qm)
        for qm in self.incarnations:
            if qm in back:
                continue
            qm.deleted = True
            for c in qm.copies.values():
                c.state = GONE
                c.settled_at = 0
        self.queues = {}
        now = self.now()
        dl: dict[int, set[Key]] = {}
        # Sources first: what they drop at start-up (past the delivery
        # limit) may arrive in the sinks.
        back.sort(key=lambda qm: qm.name in SINKS)
        for qm in back:
            qm.queue = recovered[(qm.name, qm.store_id)]
            qm.deleted = False
            qm.purged = qm.dropped = 0
            qm.inexact = False
            qm.last_used = now
            self.queues[qm.name] = qm
            self.recover_queue(qm, on_disk, durable, dl)
        # Exchanges: durable ones come back as the definitions say.
        vh = b.vhost
        exchanges: dict[str, XModel] = {}
        # The newest incarnation that fits: a delayed exchange's id may be
        # handed out again after a crash lost its first declaration.
        for xm in [*self.exchanges.values(), *reversed(self.old_exchanges)]:
            ex = vh.exchanges.get(xm.name)
            if ex is None or not xm.durable or xm.name in exchanges:
                continue
            if isinstance(ex, DelayedExchange):
                if not xm.delayed or (ex.store_id, ex.delayed_type) != (xm.store_id, xm.kind):
                    continue
            elif xm.delayed or ex.type_name != xm.kind:
                continue
            exchanges[xm.name] = xm
        kept = list(exchanges.values())
        self.old_exchanges = [
            xm for xm in [*self.exchanges.values(), *self.old_exchanges] if xm not in kept
        ]
        self.exchanges = exchanges
        for xm in self.old_exchanges:
            for held in xm.held.values():
                held.settled_at = 0
        for name, xm in exchanges.items():
            ex = vh.exchanges[name]
            xm.bindings = {(bd.destination.name, bd.routing_key) for bd in ex.bindings.values()}
            if isinstance(ex, DelayedExchange):
                self.recover_delayed(xm, ex, durable)
        self.snapshots = [Snapshot(b.broker.definitions_generation, self.definitions(), True)]
        self.observe()

    def recover_queue(
        self,
        qm: QModel,
        on_disk: int | None,
        durable: Callable[[int | None], bool],
        dl: dict[int, set[Key]],
    ) -> None:
        now = self.now()
        seen = self.contents(qm)
        counts = Counter(k for k, _, _ in seen)
        flags = {k: r for k, r, _ in seen}
        qm.restored = len(seen)
        # Dedup keys a message that reached the disk (or a transient one)
        # may have left in the cache.
        justified: set[str] = set()
        present_keys: set[str] = set()
        how = "a crash" if on_disk is not None else "a clean restart"
        for k, c in qm.copies.items():
            n = counts.pop(k, 0)
            dedup_key = c.msg.dedup_key or c.msg.id
            record = c.msg.persistent and (c.on_disk or (c.batch > 0 and durable(c.batch)))
            # Batch numbers start again with the new store: from now on
            # only whether the record ever reached the disk counts.
            c.on_disk = record or (c.msg.persistent and n > 0)
            c.batch = 0
            if c.on_disk or not c.msg.persistent:
                justified.add(dedup_key)
            if c.loose:
                c.state = READY if n else GONE
                continue
            settled = c.state == GONE
            where = f"{k} in {qm.name} after {how}"
            if not c.msg.persistent:
                check(n == 0, f"transient {where}")
            elif settled and durable(c.settled_at):
                check(n == 0, f"settled {where} (at batch {c.settled_at}, disk {on_disk})")
            elif not settled and record:
                limit = qm.delivery_limit
                if n == 0 and limit is not None and c.delivered_max > limit:
                    event("recovery: dropped past the delivery limit")
                    self.dead_letter(qm, c.msg, dl)
                    c.state = GONE
                    c.settled_at = 0
                    continue
                check(n == 1, f"{n} copies of {where} (batch {c.batch}, disk {on_disk})")
            check(n <= 1, f"{n} copies of {where}")
            if n == 0:
                c.state = GONE
                c.settled_at = 0
                continue
            if settled:
                event("recovery: settled but not durable, back")
                self.at_least_once.add(k[0])
            c.state = READY
            c.settled_at = None
            present_keys.add(dedup_key)
            if c.delivered_max == 0:
                check(not flags[k], f"{where}: redelivered, never delivered")
            elif on_disk is None:
                # What the broker knew before (a delivery whose mark a
                # crash lost is not known any more).
                check(
                    flags[k] == c.redelivered,
                    f"{where}: redelivered={flags[k]}, expected {c.redelivered}",
                )
            else:
                # The mark of a delivery is written asynchronously: either
                # is right, and the broker knows what it found.
                c.delivered_min = 0
            c.redelivered = flags[k]
        for k, n in counts.items():
            check(
                k in dl.get(id(qm), set()),
                f"{k} is in {qm.name} after a restart, where it never was",
            )
            check(n == 1, f"{n} copies of {k} in {qm.name} after a restart")
            msg = self.msg_of(k[0])
            batch = self.barrier() if msg.persistent else 0
            qm.copies[k] = Copy(msg, k[1], self.window, now, batch)
            qm.restored -= 1  # arrived after the restore (counted as published)
        deduper = qm.queue.deduper
        if deduper is not None:
            cached = {str(key) for key, _ in deduper.cache.items()}
            lost = cached - justified
            check(
                not lost,
                f"{qm.name}: the dedup cache kept {sorted(lost)} after {how}, but no "
                "message with that key reached the disk (a re-send would be dropped)",
            )
            if len(qm.copies) < 100:  # the default cache holds 128 keys
                forgotten = present_keys - cached
                check(
                    not forgotten,
                    f"{qm.name}: {sorted(forgotten)} are back after {how}, "
                    "but their dedup keys are not",
                )

    def recover_delayed(
        self, xm: XModel, ex: DelayedExchange, durable: Callable[[int | None], bool]
    ) -> None:
        counts = Counter(message_id(m) for _, m in delayed_contents(ex))
        for mid, held in xm.held.items():
            n = counts.pop(mid, 0)
            settled = held.settled_at is not None
            on = held.on_disk or (held.batch > 0 and durable(held.batch))
            record = held.msg.persistent and on
            held.on_disk = record or n > 0
            held.batch = 0
            if not held.msg.persistent or not xm.durable or (settled and durable(held.settled_at)):
                check(n == 0, f"{xm.name} holds {mid} again after a restart")
            elif not settled and record:
                check(n == 1, f"{xm.name} lost {mid} in a restart")
            check(n <= 1, f"{xm.name} holds {mid} {n} times after a restart")
            if n:
                if settled:
                    self.at_least_once.add(mid)
                    event("recovery: delayed hand-off not durable, held again")
                held.settled_at = None
            else:
                held.settled_at = 0
        check(not counts, f"{xm.name} holds {sorted(counts)}, never given to it")


# CI's size (about 30-40 s); ROOST_MODEL_EXAMPLES and ROOST_MODEL_STEPS for
# long runs (docs/fuzzing.md).
EXAMPLES = int(os.environ.get("ROOST_MODEL_EXAMPLES", "400"))
DurableBrokerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=int(os.environ.get("ROOST_MODEL_STEPS", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Shrinking a failure can take minutes; a long run takes as long as it takes.
TestDurableBroker = pytest.mark.timeout(0 if "ROOST_MODEL_EXAMPLES" in os.environ else 900)(
    DurableBrokerMachine.TestCase
)
