"""Property-based tests: the AMQP connection state machine against a model.

A real :class:`~roost.amqp.connection.AMQPConnection` over a real (transient)
:class:`~roost.broker.broker.Broker` is driven through a fake transport with
frames built by pamqp. A model of what the server should do (connection
state, channels, confirms, transactions, consumers, outstanding deliveries,
each queue's ready messages) predicts every reply; the server's output must
parse as frames and match the prediction exactly. Codes and class/method ids
are always checked; reply texts where roost words them as RabbitMQ 3.10 does
(docs/rabbitmq-reference.md).

Invariants after every step: ``conn.channels`` is the model's open plus
server-closing channels (with the same consumers, outstanding delivery tags,
confirm/tx mode, next delivery tag and publish sequence number); the
transport is closed iff the model says so; each declared queue holds the
model's ready, unacked and consumer counts, and routed == ready + unacked +
settled; a queue with a consumer has nothing ready.

Deliveries are the one thing the model does not decide by itself: which of a
queue's consumers gets a message is the server's choice. The model accepts a
delivery when it goes to a live consumer of the queue, carries the queue's
oldest ready message, the channel's next delivery tag and the right
redelivered flag, and then books it. Confirms are written when the
connection flushes, so they are checked as a set per step (``multiple``
allowed) rather than in order.

Rules send one client action per read, or several in one read (pipeline),
cut into arbitrary reads. Between rules the client behaves: it answers the
server's channel.close and connection.close after a few more frames, keeps a
channel open, and once a connection is gone (its close-ok, the client's own
connection.close, or the socket vanishing) checks it left no consumer and no
unacked message behind, then connects again to the same broker.

Where roost knowingly differs from RabbitMQ the model follows roost (see the
comments): channel.close-ok on an open channel is ignored; frames before
connection.open and out-of-order handshake methods get 503; a body frame
larger than its header declared gets 501 at once; the socket is closed
right after a client's connection.close is answered.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp.base import Frame

from roost.amqp.connection import AMQPConnection, ConnectionSettings
from roost.amqp.state import ConnectionState
from roost.amqp.wire import FRAME_END_BYTES, FRAME_HEARTBEAT, PROTOCOL_HEADER
from roost.broker.broker import Broker
from tests.amqp.test_decoder_properties import chunked

OPEN, CLOSING, CLOSED = "open", "closing", "closed"
QUEUES = ("q0", "q1", "q2")
MISSING_QUEUE = "nope"
MISSING_EXCHANGE = "nope-x"
TAGS = ("c1", "c2", "c3", "c4", "c5")
CAPABILITIES: dict[str, Any] = {
    "authentication_failure_close": True,
    "connection.blocked": True,
    "publisher_confirms": True,
}

# RabbitMQ's reply texts (docs/rabbitmq-reference.md).
EXPECTED_OPEN = "CHANNEL_ERROR - expected 'channel.open'"
SECOND_OPEN = "CHANNEL_ERROR - second 'channel.open' seen"
RUNNING = "CHANNEL_ERROR - unexpected method in connection state running"
NO_METHOD = "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
NO_HEADER = (
    "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
)
NO_BODY = "UNEXPECTED_FRAME - expected content body, got non content body frame instead"


def ids(method: Frame) -> tuple[int, int]:
    cls, meth = divmod(method.index, 1 << 16)
    return cls, meth


def marshal(frame: Any, channel: int) -> bytes:
    return bytes(pframe.marshal(frame, channel))


def reads(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` as the non-empty reads a socket might deliver."""
    return [c for c in chunked(data, cuts) if c]


# -- the server's side of the wire --------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what the server writes; close() reports connection_lost on
    the next loop iteration, as asyncio's transports do."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.closed = False
        self.protocol: AMQPConnection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "the server wrote to a closed transport"
        self.out += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 12345) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


@dataclass
class Out:
    """One method the server sent, with its content if it has some."""

    channel: int
    method: Any
    message_id: str | None = None
    body: bytes | None = None


CONTENT_METHODS = (C.Basic.Deliver, C.Basic.GetOk, C.Basic.Return)


def parse_output(data: bytes) -> list[Out]:
    """Every byte the server writes must parse as whole frames, and content
    must follow its method (header, then body frames adding up)."""
    frames: list[tuple[int, object]] = []
    pos = 0
    while pos < len(data):
        n, channel, value = pframe.unmarshal(data[pos:])
        frames.append((channel, value))
        pos += n
    outs: list[Out] = []
    it = iter(frames)
    for channel, fr in it:
        assert isinstance(fr, Frame), f"unexpected frame {fr!r} on channel {channel}"
        if not isinstance(fr, CONTENT_METHODS):
            outs.append(Out(channel, fr))
            continue
        hch, hdr = next(it, (None, None))
        assert hch == channel and isinstance(hdr, pheader.ContentHeader), (fr, hdr)
        body = b""
        while len(body) < hdr.body_size:
            bch, bf = next(it, (None, None))
            assert bch == channel and isinstance(bf, pbody.ContentBody), (fr, bf)
            body += bf.value
        assert len(body) == hdr.body_size
        outs.append(Out(channel, fr, hdr.properties.message_id, body))
    return outs


# -- the model ------------------------------------------------------------------


@dataclass
class Msg:
    id: int
    body: bytes
    seq: int = 0  # position in its queue (set when routed)
    redelivered: bool = False


@dataclass
class QueueModel:
    ready: list[Msg] = field(default_factory=list)
    routed: int = 0
    settled: int = 0  # acked, rejected, or delivered with no_ack
    next_seq: int = 0

    def enqueue(self, msg: Msg) -> None:
        self.next_seq += 1
        msg.seq = self.next_seq
        self.ready.append(msg)
        self.routed += 1

    def requeue(self, msgs: list[Msg]) -> None:
        # Back at their original position, as RabbitMQ does.
        for m in msgs:
            m.redelivered = True
            bisect.insort(self.ready, m, key=lambda e: e.seq)


Delivery = tuple[str, Msg]  # (queue, message)


@dataclass
class ChannelModel:
    closing: bool = False  # the server sent channel.close, awaiting close-ok
    confirm: bool = False
    tx: bool = False
    seq: int = 0  # publish sequence number (confirm mode)
    unconfirmed: set[int] = field(default_factory=set)
    consumers: dict[str, tuple[str, bool]] = field(default_factory=dict)  # tag: (queue, no_ack)
    unacked: dict[int, Delivery] = field(default_factory=dict)
    next_tag: int = 1
    tx_publishes: list[tuple[str, Msg, bool]] = field(default_factory=list)
    tx_settles: list[tuple[int, Delivery, bool, bool]] = field(default_factory=list)
    closing_steps: int = 0  # steps since the server closed it


@dataclass
class Expect:
    """The next method the server must send (content checked if given)."""

    channel: int
    method: type[Frame]
    fields: dict[str, object] = field(default_factory=dict)
    content: Msg | None = None


class Deliveries:
    """Any number of deliveries (each checked against the model) here."""


@dataclass
class Do:
    """A model change that happens at this point of the server's output."""

    fn: Callable[[], None]


DELIVERIES = Deliveries()
Item = Expect | Deliveries | Do


@dataclass
class Step:
    """Client bytes, and what the model predicts once they are processed
    (computed only when the steps before it were checked)."""

    data: bytes
    expect: Callable[[], list[Item]]


# -- strategies ---------------------------------------------------------------

# Channels are picked by a choice resolved against the model (see
# ConnectionMachine.channel): mostly an open channel, sometimes any of 1-4.
CHOICE = st.integers(0, 9)
QNAMES = st.sampled_from([*QUEUES, MISSING_QUEUE])
DECLARE_NAMES = st.sampled_from(QUEUES)
CTAGS = st.sampled_from(TAGS)
EXCHANGES = st.sampled_from([""] * 7 + [MISSING_EXCHANGE])
ROUTING_KEYS = st.sampled_from([*QUEUES, QUEUES[0], MISSING_QUEUE])
BODY_SIZES = st.integers(0, 300)
SPLITS = st.lists(st.integers(1, 120), max_size=3)
CUTS = st.lists(st.integers(min_value=0), max_size=4)
SETTLE_KINDS = st.sampled_from(["ack", "nack", "reject"])
PICKS = st.integers(0, 12)
MALFORMED = [
    "header without publish",
    "body without publish",
    "publish then body",
    "publish then method",
    "header then method",
    "body larger than header",
]
CONNECTION_METHODS: list[Frame] = [
    C.Connection.UpdateSecret(new_secret="s", reason="r"),
    C.Connection.Blocked(reason="x"),
    C.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0),
    C.Connection.Open(virtual_host="/"),
]
CHANNEL0_METHODS = [
    "channel.open",
    "queue.declare",
    "basic.qos",
    "connection.start-ok",
    "connection.tune-ok",
    "connection.open",
    "connection.update-secret",  # not a violation: answered
    "basic.publish",
]
VIOLATIONS = st.sampled_from(
    [
        *MALFORMED,
        "heartbeat",
        *(f"connection method {i}" for i in range(len(CONNECTION_METHODS))),
        *(f"channel 0 {name}" for name in CHANNEL0_METHODS),
        "connection.close-ok",  # while open
    ]
)
HANG_UPS = st.sampled_from(["connection.close", "socket vanishes"])
HANDSHAKE_FAULTS: list[tuple[str, str]] = [
    ("start", "connection.tune-ok"),
    ("start", "connection.open"),
    ("start", "queue.declare"),
    ("start", "channel frame"),
    ("tune", "connection.start-ok"),
    ("tune", "connection.open"),
    ("tune", "channel frame"),
    ("open", "connection.tune-ok"),
    ("open", "channel frame"),
    ("open", "connection.close"),
]


def action(
    name: str, *args: st.SearchStrategy[Any]
) -> st.SearchStrategy[tuple[str, tuple[Any, ...]]]:
    return st.tuples(st.just(name), st.tuples(*args))


# Client actions that may share one read (see ConnectionMachine.pipeline),
# mostly moving messages; now and then one that ends the connection.
FLOW_ACTIONS = [
    action("publish", CHOICE, EXCHANGES, ROUTING_KEYS, st.booleans(), BODY_SIZES, SPLITS),
    action("consume", CHOICE, QNAMES, CTAGS, st.booleans()),
    action("get", CHOICE, QNAMES, st.booleans()),
    action("settle", CHOICE, SETTLE_KINDS, PICKS, st.booleans(), st.booleans(), st.booleans()),
]
ACTIONS = st.one_of(
    *FLOW_ACTIONS,
    *FLOW_ACTIONS,
    action("channel_open", CHOICE),
    action("channel_close", CHOICE),
    action("channel_close_ok", CHOICE),
    action("queue_declare", CHOICE, DECLARE_NAMES, st.just(False)),
    action("cancel", CHOICE, CTAGS),
    action("confirm_select", CHOICE, st.booleans()),
    action("tx_commit", CHOICE),
    action("heartbeat", st.just(0)),
    st.one_of(action("violation", VIOLATIONS, st.integers(0, 4)), action("connection_close")),
)


def start_ok() -> C.Connection.StartOk:
    return C.Connection.StartOk(
        client_properties={"product": "model", "capabilities": CAPABILITIES},
        mechanism="PLAIN",
        response="\0guest\0guest",
        locale="en_US",
    )


def tune_ok() -> C.Connection.TuneOk:
    return C.Connection.TuneOk(channel_max=2047, frame_max=131072, heartbeat=0)


def channel0_method(name: str) -> Frame:
    return {
        "channel.open": C.Channel.Open(),
        "queue.declare": C.Queue.Declare(queue="q0"),
        "basic.qos": C.Basic.Qos(prefetch_count=1),
        "connection.start-ok": start_ok(),
        "connection.tune-ok": tune_ok(),
        "connection.open": C.Connection.Open(virtual_host="/"),
        "connection.update-secret": C.Connection.UpdateSecret(new_secret="s", reason="r"),
        "basic.publish": C.Basic.Publish(exchange="", routing_key="q0"),
    }[name]


def publish_frames(
    channel: int, exchange: str, routing_key: str, mandatory: bool, msg: Msg, splits: list[int]
) -> bytes:
    """basic.publish, its content header and the body cut into frames of
    the sizes in ``splits`` (the rest in one last frame)."""
    data = marshal(
        C.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory), channel
    )
    props = C.Basic.Properties(message_id=str(msg.id))
    data += marshal(pheader.ContentHeader(0, len(msg.body), props), channel)
    body = msg.body
    for size in splits:
        if not body:
            break
        data += marshal(pbody.ContentBody(body[:size]), channel)
        body = body[size:]
    if body:
        data += marshal(pbody.ContentBody(body), channel)
    return data


def content_header(channel: int, size: int) -> bytes:
    return marshal(pheader.ContentHeader(0, size, C.Basic.Properties()), channel)


def raw_heartbeat(channel: int) -> bytes:
    # pamqp writes every heartbeat on channel 0.
    return struct.pack(">BHI", FRAME_HEARTBEAT, channel, 0) + FRAME_END_BYTES


def close(cls: type[C.Connection.Close] | type[C.Channel.Close]) -> Frame:
    return cls(reply_code=200, reply_text="bye", class_id=0, method_id=0)


# -- the state machine ----------------------------------------------------------


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.broker = Broker()
        self.broker.set_scheduler(self.loop.call_later)
        self.registry: set[AMQPConnection] = set()
        # The model: the queues outlive connections.
        self.queues: dict[str, QueueModel] = {}
        self.next_msg = 0
        self.setup: tuple[int, list[bool], int] = (1, [], 0)
        self.connect()

    def connect(self) -> None:
        self.transport = FakeTransport(self.loop)
        self.conn = AMQPConnection(self.broker, ConnectionSettings(), registry=self.registry)
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)
        self.state = OPEN
        self.closing_steps = 0
        self.chans: dict[int, ChannelModel] = {}
        # The channels the decoder assembles publishes on: opened by the
        # client and not closed by it (a close-ok does not count).
        self.client_open: set[int] = set()

    def teardown(self) -> None:
        self.loop.close()
        asyncio.set_event_loop(None)

    # -- driving the server ------------------------------------------------

    def spin(self) -> None:
        """A few loop iterations: the connection writes its output on the
        next one (and a closed transport reports connection_lost)."""
        for _ in range(3):
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()

    def run(self, steps: list[Step], cuts: list[int] | None = None) -> None:
        data = b"".join(s.data for s in steps)
        for chunk in reads(data, cuts or []):
            if self.transport.closed:
                break  # a closed socket reads nothing more
            self.conn.data_received(chunk)
        self.spin()
        out = bytes(self.transport.out)
        self.transport.out.clear()
        self.check(parse_output(out), steps)

    def act(self, steps: list[Step], cuts: list[int] | None = None) -> None:
        """Run a rule's steps, then behave as a client does: answer the
        server's channel.close and connection.close after a few more frames,
        keep a channel open, and once the connection is gone, check that it
        left nothing behind and connect again (to the same broker: the
        queues and their messages stay)."""
        self.run(steps, cuts)
        for n, ch in sorted(self.chans.items()):
            if ch.closing:
                ch.closing_steps += 1
                if ch.closing_steps > 2 and self.state == OPEN:
                    self.run([self.s_channel_close_ok(n, exact=True)])
        if self.state == OPEN and all(ch.closing for ch in self.chans.values()):
            self.run([self.s_channel_open(0)])
        if self.state == CLOSING:
            self.closing_steps += 1
            if self.closing_steps > 3:
                self.run([self.s_connection_close_ok()])
        if self.state == CLOSED:
            self.connection_gone()
            self.connect()
            self.open_connection(None, *self.setup)

    def connection_gone(self) -> None:
        assert self.transport.closed and self.conn.state is ConnectionState.CLOSED
        assert self.conn not in self.registry and self.conn not in self.broker.connections
        assert not self.conn.channels
        for q in self.broker.vhosts["/"].queues.values():
            # No consumer left behind, every delivery back to ready.
            assert q.consumer_count == 0 and q.unacked == 0, q.name
        self.queues_match()

    def check(self, outs: list[Out], steps: list[Step]) -> None:
        # Confirms go out when the connection flushes its output, after the
        # replies written meanwhile: checked as a set (multiple allowed).
        acks = [o for o in outs if isinstance(o.method, C.Basic.Ack)]
        rest = [o for o in outs if not isinstance(o.method, C.Basic.Ack)]
        i = 0
        trace: list[Out] = []
        for step in steps:
            for item in step.expect():
                if isinstance(item, Do):
                    item.fn()
                elif isinstance(item, Deliveries):
                    # Those of messages ready now (a later step's go later).
                    while i < len(rest) and self.deliverable(rest[i]):
                        self.delivered(rest[i])
                        trace.append(rest[i])
                        i += 1
                else:
                    assert i < len(rest), f"expected {item}, got nothing more after {trace}"
                    self.match(item, rest[i], trace)
                    trace.append(rest[i])
                    i += 1
        assert i == len(rest), f"unexpected {rest[i:]} after {trace}"
        self.check_acks(acks)

    def match(self, item: Expect, out: Out, trace: list[Out]) -> None:
        where = f"expected {item}, got {out} after {trace}"
        assert out.channel == item.channel and type(out.method) is item.method, where
        for name, value in item.fields.items():
            assert getattr(out.method, name) == value, f"{name}: {where}"
        if item.content is not None:
            assert out.message_id == str(item.content.id), where
            assert out.body == item.content.body, where

    def deliverable(self, out: Out) -> bool:
        """A basic.deliver of the oldest ready message of a live consumer's
        queue (the message ids are unique)."""
        d = out.method
        if not isinstance(d, C.Basic.Deliver):
            return False
        ch = self.chans.get(out.channel)
        if ch is None or ch.closing or d.consumer_tag not in ch.consumers:
            return False
        ready = self.queues[ch.consumers[d.consumer_tag][0]].ready
        return bool(ready) and out.message_id == str(ready[0].id)

    def delivered(self, out: Out) -> None:
        """Book a deliverable basic.deliver, checking the rest of it."""
        d = out.method
        event("delivery")
        ch = self.chans[out.channel]
        qname, no_ack = ch.consumers[d.consumer_tag]
        msg = self.queues[qname].ready.pop(0)
        assert out.body == msg.body, out
        assert (d.exchange, d.routing_key) == ("", qname), out
        assert d.redelivered == msg.redelivered, out
        assert d.delivery_tag == ch.next_tag, out
        ch.next_tag += 1
        if no_ack:
            self.queues[qname].settled += 1
        else:
            ch.unacked[d.delivery_tag] = (qname, msg)

    def check_acks(self, acks: list[Out]) -> None:
        """Every publish confirmed on a live channel, each once."""
        for o in acks:
            ch = self.chans.get(o.channel)
            assert ch is not None and not ch.closing, f"confirm on a dead channel: {o}"
            tag = o.method.delivery_tag
            assert tag in ch.unconfirmed, f"confirm of {tag}, expected {ch.unconfirmed}"
            covered = {s for s in ch.unconfirmed if s <= tag} if o.method.multiple else {tag}
            event("confirm (multiple)" if len(covered) > 1 else "confirm")
            ch.unconfirmed -= covered
        owed = {(n, s) for n, ch in self.chans.items() for s in ch.unconfirmed}
        assert not owed, f"publishes not confirmed: {owed}"

    # -- model helpers -----------------------------------------------------

    def channel(self, choice: int) -> int:
        """Mostly one of the open channels; sometimes any number."""
        live = sorted(n for n, ch in self.chans.items() if not ch.closing)
        if live and choice < 9:
            return live[choice % len(live)]
        return choice % 4 + 1

    def new_msg(self, size: int) -> Msg:
        self.next_msg += 1
        mid = self.next_msg
        return Msg(mid, (f"{mid}:" * size).encode()[:size])

    def teardown_channel(self, ch: ChannelModel) -> None:
        """Consumers cancelled; outstanding deliveries (also those acked in
        an uncommitted transaction) back to their queues."""
        ch.closing = True
        ch.consumers.clear()
        back: dict[str, list[Msg]] = {}
        held = [d for _, d, _, _ in ch.tx_settles]
        for qname, msg in [*ch.unacked.values(), *held]:
            back.setdefault(qname, []).append(msg)
        for qname, msgs in back.items():
            self.queues[qname].requeue(msgs)
        ch.unacked.clear()
        ch.tx_settles.clear()
        ch.tx_publishes.clear()
        ch.unconfirmed.clear()

    def teardown_connection(self) -> None:
        if any(ch.unacked for ch in self.chans.values()) and any(
            ch.consumers for ch in self.chans.values()
        ):
            event("connection ends with deliveries outstanding and consumers")
        for ch in self.chans.values():
            self.teardown_channel(ch)
        self.chans.clear()

    def connection_error(
        self, code: int, text: str | None, cls_meth: tuple[int, int]
    ) -> list[Item]:
        # Every channel goes at once: nothing is delivered meanwhile.
        event(f"connection error {code} {cls_meth}")
        self.teardown_connection()
        self.state = CLOSING
        fields: dict[str, object] = {
            "reply_code": code,
            "class_id": cls_meth[0],
            "method_id": cls_meth[1],
        }
        if text is not None:
            fields["reply_text"] = text
        return [Expect(0, C.Connection.Close, fields)]

    def channel_error(self, n: int, code: int, text: str, cls_meth: tuple[int, int]) -> list[Item]:
        # Its messages go back first, and may go to other channels' consumers.
        event(f"channel error {code}")
        self.teardown_channel(self.chans[n])
        fields = {
            "reply_code": code,
            "reply_text": text,
            "class_id": cls_meth[0],
            "method_id": cls_meth[1],
        }
        return [DELIVERIES, Expect(n, C.Channel.Close, fields)]

    def on_channel(
        self, n: int, method: Frame, body: Callable[[ChannelModel], list[Item]]
    ) -> list[Item]:
        """A channel method: refused on an unopened channel, ignored while the
        connection or the channel is closing."""
        if self.state != OPEN:
            return []
        ch = self.chans.get(n)
        if ch is None:
            return self.connection_error(504, EXPECTED_OPEN, ids(method))
        if ch.closing:
            event("method on a server-closed channel")
            return []
        return body(ch)

    def route(self, n: int, routing_key: str, msg: Msg, mandatory: bool) -> list[Item]:
        if routing_key in self.queues:
            return [Do(lambda: self.queues[routing_key].enqueue(msg)), DELIVERIES]
        if mandatory:
            fields = {
                "reply_code": 312,
                "reply_text": "NO_ROUTE",
                "exchange": "",
                "routing_key": routing_key,
            }
            return [Expect(n, C.Basic.Return, fields, msg)]
        return []

    def apply_settle(self, taken: list[Delivery], ack: bool, requeue: bool) -> list[Item]:
        def apply() -> None:
            back: dict[str, list[Msg]] = {}
            for qname, msg in taken:
                if requeue and not ack:
                    back.setdefault(qname, []).append(msg)
                else:
                    self.queues[qname].settled += 1
            for qname, msgs in back.items():
                self.queues[qname].requeue(msgs)

        return [Do(apply), DELIVERIES]

    def consumer_count(self, qname: str) -> int:
        return sum(1 for ch in self.chans.values() for q, _ in ch.consumers.values() if q == qname)

    # -- steps: client frames and the model's prediction ---------------------

    def s_channel_open(self, choice: int) -> Step:
        free = [n for n in range(1, 5) if n not in self.chans]
        n = free[choice % len(free)] if free and choice < 9 else self.channel(choice)

        def expect() -> list[Item]:
            if self.state != OPEN:
                return []
            if n in self.chans:  # open or server-closing alike
                return self.connection_error(504, SECOND_OPEN, (20, 10))
            self.chans[n] = ChannelModel()
            self.client_open.add(n)
            return [Expect(n, C.Channel.OpenOk)]

        return Step(marshal(C.Channel.Open(), n), expect)

    def s_channel_close(self, choice: int) -> Step:
        n = self.channel(choice)

        def expect() -> list[Item]:
            if self.state != OPEN:
                return []
            ch = self.chans.get(n)
            if ch is None:
                return self.connection_error(504, EXPECTED_OPEN, (20, 40))
            self.client_open.discard(n)
            if ch.closing:  # both sides closing: answered, still awaiting close-ok
                event("channel.close crossing the server's")
                return [Expect(n, C.Channel.CloseOk)]
            self.teardown_channel(ch)
            del self.chans[n]
            return [DELIVERIES, Expect(n, C.Channel.CloseOk)]

        return Step(marshal(close(C.Channel.Close), n), expect)

    def s_channel_close_ok(self, choice: int, exact: bool = False) -> Step:
        # Mostly for a channel the server closed.
        closing = sorted(n for n, ch in self.chans.items() if ch.closing)
        if exact:
            n = choice
        elif closing and choice < 7:
            n = closing[choice % len(closing)]
        else:
            n = self.channel(choice)  # mostly an open one: ignored

        def expect() -> list[Item]:
            if self.state != OPEN:
                return []
            ch = self.chans.get(n)
            if ch is None:
                return self.connection_error(504, EXPECTED_OPEN, (20, 41))
            if ch.closing:
                del self.chans[n]  # the number is free again
            # On an open channel roost ignores it (RabbitMQ's rabbit_channel
            # would answer 503 "unimplemented method"; not probed live).
            return []

        return Step(marshal(C.Channel.CloseOk(), n), expect)

    def s_queue_declare(self, choice: int, name: str, passive: bool) -> Step:
        n = self.channel(choice)
        method = C.Queue.Declare(queue=name, passive=passive)

        def body(ch: ChannelModel) -> list[Item]:
            if name not in self.queues:
                if passive:
                    text = f"NOT_FOUND - no queue '{name}' in vhost '/'"
                    return self.channel_error(n, 404, text, (50, 10))
                self.queues[name] = QueueModel()
            fields = {
                "queue": name,
                "message_count": len(self.queues[name].ready),
                "consumer_count": self.consumer_count(name),
            }
            return [Expect(n, C.Queue.DeclareOk, fields)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_publish(
        self,
        choice: int,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        size: int,
        splits: list[int],
    ) -> Step:
        n = self.channel(choice)
        msg = self.new_msg(size)
        method = C.Basic.Publish(exchange=exchange, routing_key=routing_key)

        def body(ch: ChannelModel) -> list[Item]:
            if ch.confirm:
                ch.seq += 1
            if exchange:
                text = f"NOT_FOUND - no exchange '{exchange}' in vhost '/'"
                return self.channel_error(n, 404, text, (60, 40))
            if ch.tx:
                ch.tx_publishes.append((routing_key, msg, mandatory))
                return []
            if ch.confirm:
                ch.unconfirmed.add(ch.seq)
            return self.route(n, routing_key, msg, mandatory)

        data = publish_frames(n, exchange, routing_key, mandatory, msg, splits)
        return Step(data, lambda: self.on_channel(n, method, body))

    def s_consume(self, choice: int, qname: str, tag: str, no_ack: bool) -> Step:
        n = self.channel(choice)
        method = C.Basic.Consume(queue=qname, consumer_tag=tag, no_ack=no_ack)

        def body(ch: ChannelModel) -> list[Item]:
            if tag in ch.consumers:
                text = f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"
                return self.connection_error(530, text, (60, 20))
            if qname not in self.queues:
                text = f"NOT_FOUND - no queue '{qname}' in vhost '/'"
                return self.channel_error(n, 404, text, (60, 20))
            ch.consumers[tag] = (qname, no_ack)
            return [Expect(n, C.Basic.ConsumeOk, {"consumer_tag": tag}), DELIVERIES]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_cancel(self, choice: int, tag: str) -> Step:
        n = self.channel(choice)
        method = C.Basic.Cancel(consumer_tag=tag)

        def body(ch: ChannelModel) -> list[Item]:
            # Its outstanding deliveries stay outstanding on the channel.
            ch.consumers.pop(tag, None)
            return [Expect(n, C.Basic.CancelOk, {"consumer_tag": tag})]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_get(self, choice: int, qname: str, no_ack: bool) -> Step:
        n = self.channel(choice)
        method = C.Basic.Get(queue=qname, no_ack=no_ack)

        def body(ch: ChannelModel) -> list[Item]:
            q = self.queues.get(qname)
            if q is None:
                text = f"NOT_FOUND - no queue '{qname}' in vhost '/'"
                return self.channel_error(n, 404, text, (60, 70))
            if not q.ready:
                return [Expect(n, C.Basic.GetEmpty)]
            msg = q.ready.pop(0)
            tag = ch.next_tag
            ch.next_tag += 1
            if no_ack:
                q.settled += 1
            else:
                ch.unacked[tag] = (qname, msg)
            fields = {
                "delivery_tag": tag,
                "redelivered": msg.redelivered,
                "exchange": "",
                "routing_key": qname,
                "message_count": len(q.ready),
            }
            return [Expect(n, C.Basic.GetOk, fields, msg)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_settle(
        self, choice: int, kind: str, pick: int, multiple: bool, requeue: bool, known: bool
    ) -> Step:
        # Mostly a channel with deliveries outstanding, and one of its tags
        # (chosen now, from before this step), else any tag.
        holding = sorted(n for n, ch in self.chans.items() if ch.unacked and not ch.closing)
        n = holding[choice % len(holding)] if holding and choice < 6 else self.channel(choice)
        ch = self.chans.get(n)
        if known and ch is not None and ch.unacked:
            tags = sorted(ch.unacked)
            tag = tags[pick % len(tags)]
        elif known and kind != "reject":
            tag, multiple = 0, True  # "everything outstanding": nothing, here
        else:
            tag = pick
        method: Frame
        if kind == "ack":
            method = C.Basic.Ack(delivery_tag=tag, multiple=multiple)
        elif kind == "nack":
            method = C.Basic.Nack(delivery_tag=tag, multiple=multiple, requeue=requeue)
        else:
            multiple = False
            method = C.Basic.Reject(delivery_tag=tag, requeue=requeue)
        ack = kind == "ack"

        def body(ch: ChannelModel) -> list[Item]:
            if multiple and tag == 0:  # everything outstanding
                tags = sorted(ch.unacked)
            elif tag not in ch.unacked:
                text = f"PRECONDITION_FAILED - unknown delivery tag {tag}"
                return self.channel_error(n, 406, text, ids(method))
            elif multiple:
                tags = [t for t in sorted(ch.unacked) if t <= tag]
            else:
                tags = [tag]
            taken = [(t, ch.unacked.pop(t)) for t in tags]
            if ch.tx:
                ch.tx_settles += [(t, d, ack, requeue) for t, d in taken]
                return []
            return self.apply_settle([d for _, d in taken], ack, requeue)

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_confirm_select(self, choice: int, nowait: bool) -> Step:
        n = self.channel(choice)
        method = C.Confirm.Select(nowait=nowait)

        def body(ch: ChannelModel) -> list[Item]:
            if ch.tx:
                text = "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
                return self.channel_error(n, 406, text, (85, 10))
            ch.confirm = True
            return [] if nowait else [Expect(n, C.Confirm.SelectOk)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_tx_select(self, choice: int) -> Step:
        n = self.channel(choice)
        method = C.Tx.Select()

        def body(ch: ChannelModel) -> list[Item]:
            if ch.confirm:
                text = "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
                return self.channel_error(n, 406, text, (90, 10))
            ch.tx = True
            return [Expect(n, C.Tx.SelectOk)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_tx_commit(self, choice: int) -> Step:
        n = self.channel(choice)
        method = C.Tx.Commit()

        def body(ch: ChannelModel) -> list[Item]:
            if not ch.tx:
                text = "PRECONDITION_FAILED - channel is not transactional"
                return self.channel_error(n, 406, text, (90, 20))
            items: list[Item] = []
            publishes, ch.tx_publishes = ch.tx_publishes, []
            for routing_key, msg, mandatory in publishes:
                items += self.route(n, routing_key, msg, mandatory)
            settles, ch.tx_settles = ch.tx_settles, []
            for _, d, ack, requeue in settles:  # one at a time, in order
                items += self.apply_settle([d], ack, requeue)
            if publishes or settles:
                event("tx.commit with work")
            return [*items, Expect(n, C.Tx.CommitOk)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_tx_rollback(self, choice: int) -> Step:
        n = self.channel(choice)
        method = C.Tx.Rollback()

        def body(ch: ChannelModel) -> list[Item]:
            if not ch.tx:
                text = "PRECONDITION_FAILED - channel is not transactional"
                return self.channel_error(n, 406, text, (90, 30))
            ch.tx_publishes.clear()
            for tag, d, _, _ in ch.tx_settles:  # unacknowledged again
                ch.unacked[tag] = d
            ch.tx_settles.clear()
            return [Expect(n, C.Tx.RollbackOk)]

        return Step(marshal(method, n), lambda: self.on_channel(n, method, body))

    def s_heartbeat(self, n: int) -> Step:
        def expect() -> list[Item]:
            if n == 0 or self.state != OPEN:
                return []
            return self.connection_error(505, None, (0, 0))  # roost's own wording

        return Step(raw_heartbeat(n), expect)

    def s_malformed(self, n: int, kind: str) -> Step:
        publish = marshal(C.Basic.Publish(exchange="", routing_key="q0"), n)
        data, code, text, cls_meth = {
            "header without publish": (content_header(n, 0), 505, NO_METHOD, (0, 0)),
            "body without publish": (
                marshal(pbody.ContentBody(b"x"), n),
                505,
                NO_METHOD,
                (0, 0),
            ),
            "publish then body": (
                publish + marshal(pbody.ContentBody(b"x"), n),
                505,
                NO_HEADER,
                (60, 40),
            ),
            "publish then method": (
                publish + marshal(C.Basic.Qos(), n),
                505,
                NO_HEADER,
                (60, 40),
            ),
            "header then method": (
                publish + content_header(n, 3) + marshal(C.Basic.Qos(), n),
                505,
                NO_BODY,
                (60, 40),
            ),
            "body larger than header": (
                publish + content_header(n, 3) + marshal(pbody.ContentBody(b"12345"), n),
                501,
                None,  # roost's own wording
                (0, 0),
            ),
        }[kind]

        def expect() -> list[Item]:
            # The decoder refuses these whatever the channel's state.
            if self.state != OPEN:
                return []
            if n == 0 and data.startswith(publish):
                # basic.publish on channel 0 is refused at once (what
                # follows it is then ignored), as by RabbitMQ.
                return self.connection_error(504, RUNNING, (60, 40))
            if n == 0:
                # RabbitMQ: "type 2, all octets = ..."; same code and ids.
                return self.connection_error(code, None, cls_meth)
            if data.startswith(publish) and n not in self.client_open:
                # Refused at the publish frame, before its content is read
                # (RabbitMQ assembles the content first, then answers 504).
                return self.connection_error(504, EXPECTED_OPEN, (60, 40))
            return self.connection_error(code, text, cls_meth)

        return Step(data, expect)

    def s_connection_method_on_channel(self, n: int, which: int) -> Step:
        method = CONNECTION_METHODS[which]

        def expect() -> list[Item]:
            if self.state != OPEN:
                return []
            ch = self.chans.get(n)
            if ch is None:
                return self.connection_error(504, EXPECTED_OPEN, ids(method))
            if ch.closing:
                return []
            # RabbitMQ: 503 "COMMAND_INVALID - unimplemented method"; roost
            # names the method. Code and ids are the same.
            return self.connection_error(503, None, ids(method))

        return Step(marshal(method, n), expect)

    def s_channel0(self, name: str) -> Step:
        method = channel0_method(name)
        data = marshal(method, 0)
        if name == "basic.publish":
            data += content_header(0, 1) + marshal(pbody.ContentBody(b"x"), 0)

        def expect() -> list[Item]:
            if self.state != OPEN:
                return []
            if name == "connection.update-secret":
                return [Expect(0, C.Connection.UpdateSecretOk)]
            return self.connection_error(504, RUNNING, ids(method))

        return Step(data, expect)

    def s_violation(self, kind: str, n: int) -> Step:
        if kind in MALFORMED:
            return self.s_malformed(n, kind)
        if kind == "heartbeat":
            return self.s_heartbeat(n)
        if kind.startswith("connection method "):
            return self.s_connection_method_on_channel(n % 4 + 1, int(kind.split()[-1]))
        if kind == "connection.close-ok":
            return self.s_connection_close_ok()
        return self.s_channel0(kind.removeprefix("channel 0 "))

    def s_connection_close(self) -> Step:
        def expect() -> list[Item]:
            if self.state == OPEN:
                # close-ok, then roost closes the socket (RabbitMQ leaves
                # that to the client).
                self.teardown_connection()
                self.state = CLOSED
                return [Expect(0, C.Connection.CloseOk)]
            if self.state == CLOSING:
                event("connection.close crossing the server's")
                return [Expect(0, C.Connection.CloseOk)]
            return []

        return Step(marshal(close(C.Connection.Close), 0), expect)

    def s_connection_close_ok(self) -> Step:
        def expect() -> list[Item]:
            if self.state == OPEN:
                return self.connection_error(504, RUNNING, (10, 51))
            if self.state == CLOSING:
                self.state = CLOSED  # the server hangs up
            return []

        return Step(marshal(C.Connection.CloseOk(), 0), expect)

    def step(self, name: str, args: tuple[Any, ...]) -> Step:
        builder: Callable[..., Step] = getattr(self, f"s_{name}")
        return builder(*args)

    # -- the handshake -------------------------------------------------------

    @initialize(
        faulty=st.integers(0, 4),
        fault=st.sampled_from(HANDSHAKE_FAULTS),
        channels=st.integers(1, 3),
        queues=st.integers(0, len(QUEUES)),
        consumers=st.lists(st.booleans(), max_size=3),
        confirms=st.integers(0, 3),
    )
    def handshake(
        self,
        faulty: int,
        fault: tuple[str, str],
        channels: int,
        queues: int,
        consumers: list[bool],
        confirms: int,
    ) -> None:
        """The handshake, one time in five with a method out of order; then
        a few channels (the first ``confirms`` of them in confirm mode),
        queues declared, and consumers of the first queue (one per channel
        in turn, ``no_ack`` as given). A new connection after this one ends
        is set up the same way."""
        for name in QUEUES[:queues]:
            self.queues[name] = QueueModel()
            self.broker.vhosts["/"].declare_queue(name, owner=None)
        self.setup = (channels, consumers, confirms)
        self.open_connection(fault if faulty == 4 else None, *self.setup)
        self.act([])

    def open_connection(
        self, fault: tuple[str, str] | None, channels: int, consumers: list[bool], confirms: int
    ) -> None:
        """Handshake (with ``fault``: one method out of order), then open
        ``channels`` channels, ``confirms`` of them in confirm mode, and
        start ``consumers`` on them."""

        def exact(data: bytes, items: list[Item]) -> None:
            self.run([Step(data, lambda: items)])

        start = Expect(0, C.Connection.Start, {"mechanisms": "PLAIN AMQPLAIN"})
        exact(PROTOCOL_HEADER, [start])
        tune = Expect(
            0, C.Connection.Tune, {"channel_max": 2047, "frame_max": 131072, "heartbeat": 60}
        )
        stages: list[tuple[str, Frame, list[Item]]] = [
            ("start", start_ok(), [tune]),
            ("tune", tune_ok(), []),
            ("open", C.Connection.Open(virtual_host="/"), [Expect(0, C.Connection.OpenOk)]),
        ]
        for stage, good, replies in stages:
            if fault is None or fault[0] != stage:
                exact(marshal(good, 0), replies)
                if stage == "open":
                    for _ in range(channels):
                        self.run([self.s_channel_open(0)])
                    for i in range(min(confirms, channels)):
                        self.run([self.s_confirm_select(i, False)])
                    for i, no_ack in enumerate(consumers):
                        if QUEUES[0] in self.queues:
                            self.run([self.s_consume(i, QUEUES[0], TAGS[i], no_ack)])
                continue
            event(f"handshake fault: {fault[1]} in {stage}")
            wrong = fault[1]
            if wrong == "channel frame":
                # RabbitMQ: 505 UNEXPECTED_FRAME (or a silent close before
                # tune); roost answers 503 "channel method before
                # connection.open" (tests/e2e/test_protocol_errors.py).
                exact(marshal(C.Channel.Open(), 1), self.connection_error(503, None, (0, 0)))
            elif wrong == "connection.close":
                self.state = CLOSED
                exact(marshal(close(C.Connection.Close), 0), [Expect(0, C.Connection.CloseOk)])
            else:
                # Out of order: 503 naming the method expected (roost's text).
                method = channel0_method(wrong)
                exact(marshal(method, 0), self.connection_error(503, None, ids(method)))
            return

    # -- rules (valid in every state: the connection is open or closing) ----

    @rule(choice=CHOICE)
    def channel_open(self, choice: int) -> None:
        self.act([self.s_channel_open(choice)])

    @rule(choice=CHOICE)
    def channel_close(self, choice: int) -> None:
        self.act([self.s_channel_close(choice)])

    @rule(choice=CHOICE)
    def channel_close_ok(self, choice: int) -> None:
        self.act([self.s_channel_close_ok(choice)])

    @rule(choice=CHOICE, name=DECLARE_NAMES)
    def queue_declare(self, choice: int, name: str) -> None:
        self.act([self.s_queue_declare(choice, name, False)])

    @rule(choice=CHOICE, name=QNAMES)
    def queue_declare_passive(self, choice: int, name: str) -> None:
        self.act([self.s_queue_declare(choice, name, True)])

    @rule(
        choice=CHOICE,
        exchange=EXCHANGES,
        routing_key=ROUTING_KEYS,
        mandatory=st.booleans(),
        sizes=st.lists(BODY_SIZES, min_size=1, max_size=3),
        splits=SPLITS,
        cuts=CUTS,
    )
    def publish(
        self,
        choice: int,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        sizes: list[int],
        splits: list[int],
        cuts: list[int],
    ) -> None:
        """One to three messages, their frames in one read cut anywhere."""
        steps = [
            self.s_publish(choice, exchange, routing_key, mandatory, size, splits) for size in sizes
        ]
        self.act(steps, cuts)

    @rule(choice=CHOICE, qname=QNAMES, tag=CTAGS, no_ack=st.booleans())
    def consume(self, choice: int, qname: str, tag: str, no_ack: bool) -> None:
        self.act([self.s_consume(choice, qname, tag, no_ack)])

    @rule(choice=CHOICE, tag=CTAGS)
    def cancel(self, choice: int, tag: str) -> None:
        self.act([self.s_cancel(choice, tag)])

    @rule(choice=CHOICE, qname=QNAMES, no_ack=st.booleans())
    def get(self, choice: int, qname: str, no_ack: bool) -> None:
        self.act([self.s_get(choice, qname, no_ack)])

    @rule(
        choice=CHOICE,
        kind=SETTLE_KINDS,
        pick=PICKS,
        multiple=st.booleans(),
        requeue=st.booleans(),
        known=st.booleans(),
    )
    def settle(
        self, choice: int, kind: str, pick: int, multiple: bool, requeue: bool, known: bool
    ) -> None:
        self.act([self.s_settle(choice, kind, pick, multiple, requeue, known)])

    @rule(choice=CHOICE, nowait=st.booleans())
    def confirm_select(self, choice: int, nowait: bool) -> None:
        self.act([self.s_confirm_select(choice, nowait)])

    @rule(choice=CHOICE)
    def tx_select(self, choice: int) -> None:
        self.act([self.s_tx_select(choice)])

    @rule(choice=CHOICE)
    def tx_commit(self, choice: int) -> None:
        self.act([self.s_tx_commit(choice)])

    @rule(choice=CHOICE)
    def tx_rollback(self, choice: int) -> None:
        self.act([self.s_tx_rollback(choice)])

    @rule(kind=VIOLATIONS, n=st.integers(0, 4))
    def violation(self, kind: str, n: int) -> None:
        """A protocol error (or a method on channel 0)."""
        self.act([self.s_violation(kind, n)])

    @rule(actions=st.lists(ACTIONS, min_size=2, max_size=5), cuts=CUTS)
    def pipeline(self, actions: list[tuple[str, tuple[Any, ...]]], cuts: list[int]) -> None:
        """Several actions in one read: each still gets its own answer."""
        steps = []
        for name, args in actions:
            steps.append(self.step(name, args))
        self.act(steps, cuts)

    @rule(how=HANG_UPS)
    def hang_up(self, how: str) -> None:
        """The client closes the connection, or its socket just goes."""
        if how == "connection.close":
            self.act([self.s_connection_close()])
        elif self.state != CLOSED:
            self.transport.closed = True
            self.conn.connection_lost(None)
            self.teardown_connection()
            self.state = CLOSED
            self.act([])

    @rule()
    def idle(self) -> None:
        """Nothing arrives: the server has nothing to say either."""
        self.act([])

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def transport_closed_iff_model_closed(self) -> None:
        closed = self.state == CLOSED
        assert self.transport.closed == closed
        assert (self.conn.state is ConnectionState.CLOSED) == closed
        assert (self.conn in self.registry) != closed
        assert (self.conn in self.broker.connections) == (self.state == OPEN)

    @invariant()
    def channels_match(self) -> None:
        assert set(self.conn.channels) == set(self.chans)
        for n, m in self.chans.items():
            ch = self.conn.channels[n]
            assert ch.closing == m.closing, n
            if m.closing:
                continue
            assert (ch.confirm, ch.tx) == (m.confirm, m.tx), n
            assert set(ch.consumers) == set(m.consumers), n
            assert set(ch.unacked) == set(m.unacked), n
            assert ch.next_tag == m.next_tag, n
            assert ch.publish_seq == m.seq, n

    @invariant()
    def queues_match(self) -> None:
        vhost = self.broker.vhosts["/"]
        assert set(vhost.queues) == set(self.queues)
        held: dict[str, int] = {}
        for m in self.chans.values():
            for qname, _ in [*m.unacked.values(), *(d for _, d, _, _ in m.tx_settles)]:
                held[qname] = held.get(qname, 0) + 1
        for name, qm in self.queues.items():
            q = vhost.queues[name]
            assert q.message_count == len(qm.ready), name
            assert q.unacked == held.get(name, 0), name
            assert q.consumer_count == self.consumer_count(name), name
            assert q.published == qm.routed, name
            # Conservation: every routed message is ready, out, or settled.
            assert qm.routed == q.message_count + q.unacked + qm.settled, name
            if q.consumer_count:
                assert q.message_count == 0, f"{name} has consumers and ready messages"


# CI's size; ROOST_STATEFUL_EXAMPLES=5000 for a long run (docs/fuzzing.md).
ConnectionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("ROOST_STATEFUL_EXAMPLES", "250")),
    stateful_step_count=40,
    deadline=None,
)
TestConnectionStateMachine = ConnectionMachine.TestCase
