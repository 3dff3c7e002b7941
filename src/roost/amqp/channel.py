"""An AMQP channel: turns channel-level methods into broker calls and the
broker's deliveries back into frames.

Implements :class:`roost.broker.consumer.DeliverySink` for its consumers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from pamqp import commands as C
from pamqp.base import Frame as MethodFrame

from roost import properties
from roost.amqp import encoder
from roost.amqp.state import ConnectionState
from roost.broker import access, errors, sender_selected
from roost.broker.access import CONFIGURE, READ, WRITE
from roost.broker.consumer import Consumer
from roost.broker.errors import BrokerError, precondition
from roost.broker.exchange import EXCHANGE_TYPES, Exchange
from roost.broker.journal import Journal, OutcomeUnknown, PartlyRefused
from roost.broker.message import Message, QueueEntry
from roost.broker.queue import Queue
from roost.broker.queue_args import parse_expiration
from roost.broker.read_models import ChannelView
from roost.broker.vhost import REPLY_TO_PREFIX, REPLY_TO_QUEUE, generate_name

if TYPE_CHECKING:
    from roost.amqp.connection import AMQPConnection
    from roost.amqp.decoder import PublishReceived

log = logging.getLogger(__name__)

_UNLIMITED = 1 << 30
_DEFINITION_METHODS = frozenset(
    {
        C.Exchange.Declare,
        C.Exchange.Delete,
        C.Exchange.Bind,
        C.Exchange.Unbind,
        C.Queue.Declare,
        C.Queue.Bind,
        C.Queue.Unbind,
        C.Queue.Delete,
    }
)
_scan_cache: dict[bytes, properties.Scanned] = {}
# Exchanges a channel remembers it may publish to (see _may_publish).
_WRITE_CACHE_SIZE = 64
_NO_PROPERTIES = properties.EMPTY


class Delivery:
    """A message delivered on this channel and not yet settled."""

    __slots__ = ("consumer", "due", "entry", "queue", "tag")

    def __init__(
        self,
        tag: int,
        queue: Queue,
        entry: QueueEntry,
        consumer: Consumer | None,
        due: float = 0.0,
    ) -> None:
        self.tag = tag
        self.queue = queue
        self.entry = entry
        self.consumer = consumer
        # Loop time by which it must be settled (consumer timeout; 0: never).
        self.due = due


def _table(value: Any) -> dict[str, Any]:
    return dict(value) if value else {}


class Channel:
    def __init__(self, conn: AMQPConnection, number: int) -> None:
        self.conn = conn
        self.number = number
        assert conn.vhost is not None
        self.vhost = conn.vhost
        # Permission checks read the broker's table on every operation, so a
        # change applies at once; publishes skip the regex through a cache
        # of exchanges found writable, valid while the entry is the same.
        self._permissions = conn.broker.permissions
        self._perm_key = (conn.username, conn.vhost.name)
        self._perms_seen: access.Permissions | None = None
        self.actor = access.Actor(conn.username, conn.vhost.name, self._permissions)
        self._writable: set[str] = set()
        self.consumers: dict[str, Consumer] = {}
        self._tag_bytes: dict[str, bytes] = {}
        self.next_tag = 1
        self.unacked: dict[int, Delivery] = {}
        self._unacked_order: deque[Delivery] = deque()
        self.prefetch_count = 0
        self.global_prefetch = 0
        self.flow_active = True
        self.closing = False
        self.confirm = False
        self.publish_seq = 0
        self._confirmed_upto = 0
        # Publishes waiting for the message store's fsync: (seq, batch).
        self._unconfirmed: deque[tuple[int, int, bool, Message]] = deque()
        self._awaited_batch = 0
        self._confirm_sent = 0
        self.tx = False
        self._tx_publishes: list[tuple[Exchange, Message, bool, str]] = []
        self._tx_settles: list[tuple[Delivery, bool, bool]] = []  # (delivery, ack, requeue)
        self._reply_key: str | None = None
        self._held: list[bytes] | None = None
        # basic.get waiting for a backing queue to fetch (cluster mode).
        self._gets: set[asyncio.Future[int]] = set()
        self.last_queue: str | None = None
        # Consumer timeout: the default in ms (0: none), and one timer for
        # the channel, armed for the earliest due delivery.
        self._default_timeout = conn.settings.consumer_timeout
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._timeout_due = 0.0

    # -- plumbing -------------------------------------------------------

    @property
    def owner(self) -> object:
        """Exclusive queues belong to the connection."""
        return self.conn

    def describe(self) -> ChannelView:
        """This channel for the management adapters (see
        ``AMQPConnection.describe``)."""
        return ChannelView(
            number=self.number,
            state="running" if self.flow_active else "flow",
            consumers=tuple(self.consumers.values()),
            messages_unacknowledged=len(self.unacked),
            messages_uncommitted=len(self._tx_publishes),
            acks_uncommitted=len(self._tx_settles),
            prefetch_count=self.prefetch_count,
            global_prefetch_count=self.global_prefetch,
            confirm=self.confirm,
            transactional=self.tx,
        )

    def send(self, frame: MethodFrame) -> None:
        self._reply(encoder.method(self.number, frame))

    def _reply(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            self.conn.write(data)

    def handle_method(self, method: MethodFrame) -> None:
        handler = _HANDLERS.get(type(method))
        if handler is None:
            raise BrokerError(
                errors.COMMAND_INVALID, f"method {method.name} is not allowed on a channel"
            )
        if type(method) not in _DEFINITION_METHODS:
            handler(self, method)
            return
        # declare-ok, delete-ok, bind-ok ... for a durable change go out only
        # once definitions.json holds it, as RabbitMQ's mean it is persisted.
        broker = self.conn.broker
        before = broker.definitions_generation
        held: list[bytes] = []
        self._held = held
        try:
            handler(self, method)
        finally:
            self._held = None
        if not held:
            return
        data = b"".join(held)
        if broker.definitions_generation == before:
            self.conn.write(data)
        else:
            broker.when_definitions_saved(lambda: self._late_reply(data))

    # -- permissions (where rabbit_channel checks them) ------------------

    def _check(self, which: int, kind: str, name: str) -> None:
        self.actor.check(which, kind, name)

    def _may_publish(self, exchange: str) -> None:
        perms = self._permissions.get(self._perm_key)
        if perms is not self._perms_seen:
            self._perms_seen = perms
            self._writable.clear()
        access.check(perms, WRITE, "exchange", exchange, self.vhost.name, self.conn.username)
        if len(self._writable) >= _WRITE_CACHE_SIZE:
            self._writable.clear()
        self._writable.add(exchange)

    def _check_binding(self, kind: str, destination: str, source: str) -> None:
        self.actor.may_bind(kind, destination, source)

    def _late_reply(self, data: bytes) -> None:
        if not self.closing and self.conn.state is ConnectionState.RUNNING:
            self.conn.write(data)

    # -- DeliverySink ---------------------------------------------------

    def credit(self) -> int:
        if not self.flow_active or not self.conn.writable or self.closing:
            return 0
        if self.global_prefetch:
            return self.global_prefetch - len(self.unacked)
        return _UNLIMITED

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        number = self.number
        ctag = self._tag_bytes[consumer.tag]
        frame_max = self.conn.frame_max
        tag = self.next_tag
        track = not consumer.no_ack
        queue = consumer.queue
        unacked = self.unacked
        order = self._unacked_order
        due = self._due(queue) if track else 0.0
        frames = []
        for entry in entries:
            if track:
                d = Delivery(tag, queue, entry, consumer, due)
                unacked[tag] = d
                order.append(d)
            frames.append(
                encoder.deliver_message(
                    number, ctag, tag, entry.redelivered, entry.message, frame_max
                )
            )
            tag += 1
        self.next_tag = tag
        self.conn.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def dispatch_soon(self, queue: Queue) -> None:
        self.conn.dispatch_soon(queue)

    def cancelled_by_server(self, consumer: Consumer) -> None:
        if self.consumers.pop(consumer.tag, None) is None:
            return
        self._tag_bytes.pop(consumer.tag, None)
        if self.conn.capabilities.get("consumer_cancel_notify") and not self.closing:
            self.send(C.Basic.Cancel(consumer_tag=consumer.tag, nowait=True))

    # -- publishing -----------------------------------------------------

    def handle_publish(self, ev: PublishReceived) -> None:
        if self.confirm:
            self.publish_seq += 1
        if ev.immediate:
            raise BrokerError(errors.NOT_IMPLEMENTED, "immediate=true")
        vhost = self.vhost
        # Write permission comes before the lookup (403 before 404).
        if ev.exchange not in self._writable or (
            self._permissions.get(self._perm_key) is not self._perms_seen
        ):
            self._may_publish(ev.exchange)
        ex = vhost.exchanges.get(ev.exchange)
        if ex is None:
            raise errors.not_found("exchange", ev.exchange, vhost.name)
        access.check_not_internal(ex.name, ex.internal, vhost.name)
        props = cast(bytes, ev.properties)  # always set once the event is emitted
        persistent = False
        priority = None
        cc: tuple[str, ...] = ()
        if props != _NO_PROPERTIES:
            scanned = _scan_cache.get(props)
            if scanned is None:
                try:
                    scanned = properties.scan(props)
                    if props[0] & 0x20:
                        # scan() skips the headers table by its length; decode
                        # it once here (cache misses only) so a malformed or
                        # absurdly nested table is refused at the door rather
                        # than raising later in headers routing or dead-lettering.
                        headers = properties.headers_of(props)
                        if properties.nesting_depth(headers) > properties.MAX_HEADER_NESTING:
                            raise properties.PropertyError(
                                "headers nested more than "
                                f"{properties.MAX_HEADER_NESTING} levels deep"
                            )
                except properties.PropertyError as exc:
                    raise BrokerError(
                        errors.FRAME_ERROR, f"malformed content header: {exc}"
                    ) from exc
                if scanned.expiration is not None:
                    parse_expiration(scanned.expiration)  # 406 for a bad value
                # Publishers tend to repeat the same few property lists.
                if len(props) <= 64:
                    if len(_scan_cache) >= 1024:
                        _scan_cache.clear()
                    _scan_cache[props] = scanned
            persistent = scanned.delivery_mode == 2
            priority = scanned.priority
            self.actor.may_publish_as(scanned.user_id)
            if scanned.reply_to == REPLY_TO_QUEUE:
                props = self._rewrite_reply_to(props)
            if props[0] & 0x20 and sender_selected.maybe_present(props):  # has headers
                try:
                    props, cc = sender_selected.extract(props)
                except properties.PropertyError as exc:
                    raise BrokerError(
                        errors.FRAME_ERROR, f"malformed content header: {exc}"
                    ) from exc
        msg = Message(ev.exchange, ev.routing_key, props, ev.body, persistent, priority, cc)
        if self.tx:
            self._tx_publishes.append((ex, msg, ev.mandatory, ev.routing_key))
            return
        refused, batch = self._publish(ex, msg, ev.mandatory)
        if self.confirm:
            if batch or self._unconfirmed:
                self._await_durable(self.publish_seq, batch, not refused, msg)
            else:
                self._resolve(self.publish_seq, not refused)

    def _await_durable(self, seq: int, batch: int, ok: bool, msg: Message) -> None:
        """Confirm ``seq`` once the message store has fsync'd ``batch``;
        confirms stay in publish order, so later ones wait behind it."""
        journal = self.vhost.journal
        self._unconfirmed.append((seq, batch, ok, msg))
        if journal is None:
            return
        # Batches only grow, so one wait for the newest covers all before it.
        if batch <= journal.durable_batch:
            self._durable_reached()
        elif batch > self._awaited_batch:
            self._awaited_batch = batch
            journal.wait_durable(batch, self._durable_reached)

    def _durable_reached(self) -> None:
        journal = self.vhost.journal
        assert journal is not None
        durable = journal.durable_batch
        pending = self._unconfirmed
        while pending and pending[0][1] <= durable:
            seq, batch, ok, msg = pending.popleft()
            exc = journal.failure(batch) if ok and batch else None
            if exc is not None:
                if isinstance(exc, OutcomeUnknown):
                    self._outcome_unknown(exc)
                    return
                # Not written, or (a cluster's length limit) refused: nacked.
                if not isinstance(exc, PartlyRefused) or exc.refuses(msg):
                    ok = False
            self._resolve(seq, ok)

    def _outcome_unknown(self, exc: Exception) -> None:
        """A write the confirm (or commit-ok) waited for may or may not have
        committed: neither an ack nor a nack would be true. Closing the
        connection makes the client publish its unconfirmed messages again."""
        self._unconfirmed.clear()
        self.conn.close(errors.INTERNAL_ERROR, f"INTERNAL_ERROR - message store: {exc}")

    def _resolve(self, seq: int, ok: bool) -> None:
        """Publish ``seq`` (every earlier one being resolved) is confirmed or,
        when a queue refused it, nacked."""
        if ok:
            self._confirm_upto(seq)
            return
        self.flush_confirms()  # acks for earlier publishes go first
        if not self.closing:
            self.conn.write(encoder.basic_nack(self.number, seq, False))
        self._confirmed_upto = self._confirm_sent = seq

    def _publish(self, ex: Exchange, msg: Message, mandatory: bool) -> tuple[bool, int]:
        """Hand ``msg`` to the vhost; returns (refused, journal batch to
        wait for before confirming)."""
        routed, refused, batch = self.vhost.publish(ex, msg, mandatory)
        if not routed and mandatory:
            # Also for a message a delayed exchange holds, as the plugin
            # does: its route is empty now, whatever happens when it is due.
            self.vhost.returned += 1
            self.conn.write(
                encoder.basic_return(
                    self.number, errors.NO_ROUTE, "NO_ROUTE", msg.exchange, msg.routing_key
                )
                + encoder.content(self.number, msg.properties, msg.body, self.conn.frame_max)
            )
        return refused, batch

    def _confirm_upto(self, seq: int) -> None:
        if self._confirmed_upto == self._confirm_sent:
            self.conn.confirm_pending(self)
        self._confirmed_upto = seq

    def flush_confirms(self) -> None:
        """Send one basic.ack covering every publish confirmed since the last."""
        upto = self._confirmed_upto
        if upto > self._confirm_sent and not self.closing:
            self.conn.write(encoder.basic_ack(self.number, upto, upto - self._confirm_sent > 1))
            self.vhost.confirmed += upto - self._confirm_sent
        self._confirm_sent = upto

    # -- direct reply-to ------------------------------------------------

    def _rewrite_reply_to(self, raw: bytes) -> bytes:
        if self._reply_key is None:
            raise precondition("fast reply consumer does not exist")
        # Splice the new reply-to into the raw bytes (scan() already
        # validated them), leaving every other property byte-exact.
        return properties.replace_reply_to(raw, REPLY_TO_PREFIX + self._reply_key)

    def _deliver_reply(self, consumer: Consumer, msg: Message) -> None:
        if self.closing or consumer.tag not in self.consumers:
            return
        self.deliver(consumer, [QueueEntry(0, msg)])

    # -- exchanges ------------------------------------------------------

    def _exchange_declare(self, m: C.Exchange.Declare) -> None:
        args = _table(m.arguments)
        name = m.exchange
        # A passive declare checks nothing. Otherwise configure (and more
        # for a new one), after the type and default-exchange checks
        # (which declare_exchange makes), as in rabbit_channel.
        if not m.passive and name and m.exchange_type in EXCHANGE_TYPES:
            new = name not in self.vhost.exchanges and not name.startswith("amq.")
            self.actor.may_declare_exchange(name, new, args)
        self.vhost.declare_exchange(
            name,
            m.exchange_type,
            passive=m.passive,
            durable=m.durable,
            auto_delete=m.auto_delete,
            internal=m.internal,
            arguments=args,
        )
        if not m.nowait:
            self.send(C.Exchange.DeclareOk())

    def _exchange_delete(self, m: C.Exchange.Delete) -> None:
        # Configure, after the default and amq.* refusals.
        if m.exchange and not m.exchange.startswith("amq."):
            self._check(CONFIGURE, "exchange", m.exchange)
        self.vhost.delete_exchange(m.exchange, if_unused=m.if_unused)
        if not m.nowait:
            self.send(C.Exchange.DeleteOk())

    def _exchange_bind(self, m: C.Exchange.Bind) -> None:
        self._check_binding("exchange", m.destination, m.source)
        dest = self.vhost.exchange(m.destination)
        self.vhost.bind(m.source, dest, m.routing_key, _table(m.arguments))
        if not m.nowait:
            self.send(C.Exchange.BindOk())

    def _exchange_unbind(self, m: C.Exchange.Unbind) -> None:
        self._check_binding("exchange", m.destination, m.source)
        dest = self.vhost.exchanges.get(m.destination)
        self.vhost.unbind(m.source, dest, m.routing_key, _table(m.arguments))
        if not m.nowait:
            self.send(C.Exchange.UnbindOk())

    # -- queues ---------------------------------------------------------

    def _queue_name(self, name: str) -> str:
        # An empty name means "the queue last declared on this channel".
        if not name:
            if self.last_queue is None:
                raise BrokerError(errors.NOT_FOUND, "no previously declared queue")
            return self.last_queue
        return name

    def _queue_declare(self, m: C.Queue.Declare) -> None:
        if m.queue == REPLY_TO_QUEUE:
            if not m.nowait:
                self._reply(encoder.queue_declare_ok(self.number, REPLY_TO_QUEUE, 0, 0))
            return
        args = _table(m.arguments)
        q = self.vhost.declare_queue(
            m.queue,
            owner=self.owner,
            passive=m.passive,
            durable=m.durable,
            exclusive=m.exclusive,
            auto_delete=m.auto_delete,
            arguments=args,
            max_queues=self.conn.broker.max_queues_per_vhost,
            authorize=lambda name, new: self.actor.may_declare_queue(name, new, args),
        )
        if q.exclusive:
            self.conn.exclusive_queues.add(q)
        self.last_queue = q.name
        if not m.nowait:
            self._reply(
                encoder.queue_declare_ok(self.number, q.name, q.message_count, q.consumer_count)
            )

    def _queue_bind(self, m: C.Queue.Bind) -> None:
        name = self._queue_name(m.queue)
        self._check_binding("queue", name, m.exchange)
        q = self.vhost.queue(name, self.owner)
        self.vhost.bind(m.exchange, q, m.routing_key, _table(m.arguments))
        if not m.nowait:
            self.send(C.Queue.BindOk())

    def _queue_unbind(self, m: C.Queue.Unbind) -> None:
        name = self._queue_name(m.queue)
        self._check_binding("queue", name, m.exchange)
        q = self.vhost.queues.get(name)
        self.vhost.unbind(m.exchange, q, m.routing_key, _table(m.arguments), self.owner)
        self.send(C.Queue.UnbindOk())

    def _queue_purge(self, m: C.Queue.Purge) -> None:
        name = self._queue_name(m.queue)
        self._check(READ, "queue", name)
        n = self.vhost.purge_queue(name, self.owner)
        if not m.nowait:
            # purge-ok only once the purge is on disk: purged messages
            # must not come back after a crash.
            self.conn.broker.when_durable(
                lambda: self._late_reply(
                    encoder.method(self.number, C.Queue.PurgeOk(message_count=n))
                )
            )

    def _queue_delete(self, m: C.Queue.Delete) -> None:
        name = self._queue_name(m.queue)
        self._check(CONFIGURE, "queue", name)
        n = self.vhost.delete_queue(
            name,
            owner=self.owner,
            if_unused=m.if_unused,
            if_empty=m.if_empty,
        )
        if not m.nowait:
            self.send(C.Queue.DeleteOk(message_count=n))

    # -- consuming ------------------------------------------------------

    def _basic_qos(self, m: C.Basic.Qos) -> None:
        if m.global_:
            self.global_prefetch = m.prefetch_count
        else:
            self.prefetch_count = m.prefetch_count
            # RabbitMQ applies a per-consumer limit only to consumers created
            # after it. roost also moves the channel's already *limited*
            # consumers to the new limit (unlimited ones stay unlimited, as
            # there): kombu sees a non-RabbitMQ server, so it sends
            # global=false where on RabbitMQ 3.x it sends global=true, and
            # Celery raises the prefetch by one for every ETA/countdown task
            # it holds; without this a worker holding prefetch-many such
            # tasks receives nothing else until their time comes.
            for consumer in self.consumers.values():
                if consumer.prefetch:
                    consumer.prefetch = m.prefetch_count
        self.send(C.Basic.QosOk())
        self._dispatch_all()

    def _basic_consume(self, m: C.Basic.Consume) -> None:
        tag = m.consumer_tag or generate_name("amq.ctag-")
        if tag in self.consumers:
            raise BrokerError(errors.NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'")
        if m.queue == REPLY_TO_QUEUE:
            self._consume_reply_to(tag, m)
            return
        name = self._queue_name(m.queue)
        self._check(READ, "queue", name)
        q = self.vhost.queue(name, self.owner)
        if (m.exclusive and q.consumer_count) or q.has_exclusive_consumer():
            raise errors.access_refused(
                f"queue '{q.name}' in vhost '{self.vhost.name}' in exclusive use"
            )
        args = _table(m.arguments)
        prio = args.get("x-priority", 0)
        if not isinstance(prio, int) or isinstance(prio, bool):
            raise precondition(f"invalid arg 'x-priority' for consumer '{tag}' on queue '{q.name}'")
        consumer = Consumer(
            tag,
            q,
            self,
            no_ack=m.no_ack,
            exclusive=m.exclusive,
            prefetch=self.prefetch_count,
            priority=prio,
            arguments=args,
        )
        self.consumers[tag] = consumer
        self._tag_bytes[tag] = encoder.shortstr(tag)
        if not m.nowait:
            self.send(C.Basic.ConsumeOk(consumer_tag=tag))
        q.add_consumer(consumer)

    def _consume_reply_to(self, tag: str, m: C.Basic.Consume) -> None:
        if not m.no_ack:
            raise precondition("reply consumer cannot acknowledge")
        if self._reply_key is not None:
            raise precondition("reply consumer already set")
        key = base64.urlsafe_b64encode(os.urandom(18)).decode()
        relay = self.vhost.reply_relay
        if relay is not None:
            key = relay.key_prefix() + key  # names this node to the others
        placeholder = Queue(self.vhost, REPLY_TO_QUEUE)
        consumer = Consumer(tag, placeholder, self, no_ack=True)
        self.consumers[tag] = consumer
        self._tag_bytes[tag] = encoder.shortstr(tag)
        self._reply_key = key
        self.vhost.reply_targets[key] = lambda msg: self._deliver_reply(consumer, msg)
        if not m.nowait:
            self.send(C.Basic.ConsumeOk(consumer_tag=tag))

    def _basic_cancel(self, m: C.Basic.Cancel) -> None:
        self._cancel(m.consumer_tag or "")
        if not m.nowait:
            self.send(C.Basic.CancelOk(consumer_tag=m.consumer_tag))

    def _cancel(self, tag: str) -> None:
        consumer = self.consumers.pop(tag, None)
        self._tag_bytes.pop(tag, None)
        if consumer is None:
            return
        if consumer.queue.name == REPLY_TO_QUEUE and self._reply_key is not None:
            self.vhost.reply_targets.pop(self._reply_key, None)
            self._reply_key = None
            return
        self.vhost.consumer_removed(consumer)

    def _basic_get(self, m: C.Basic.Get) -> None:
        name = self._queue_name(m.queue)
        self._check(READ, "queue", name)
        q = self.vhost.queue(name, self.owner)
        fill: Callable[[int], Awaitable[int]] | None = getattr(q.backing, "fill", None)
        if fill is not None and not q.backing.in_memory():
            # A backing queue that fetches from elsewhere (cluster mode)
            # holds nothing here without local consumers: a synchronous get
            # could only miss. Wait for one entry, then answer (the client
            # waits for get-ok or get-empty anyway).
            task = asyncio.ensure_future(fill(1))
            self._gets.add(task)
            task.add_done_callback(lambda t: self._filled(t, q, m.no_ack))
            return
        self._get_reply(q, m.no_ack)

    def _filled(self, task: asyncio.Future[int], q: Queue, no_ack: bool) -> None:
        self._gets.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("basic.get on %s: %s", q.name, task.exception())
        if self.closing or self.conn.state is not ConnectionState.RUNNING:
            return
        if q.deleted:
            self.vhost.get_empty += 1
            self.conn.write(encoder.get_empty(self.number))
            return
        self._get_reply(q, no_ack)

    def _get_reply(self, q: Queue, no_ack: bool) -> None:
        entry = q.get(no_ack)
        if entry is None:
            self.vhost.get_empty += 1
            self.conn.write(encoder.get_empty(self.number))
            return
        tag = self.next_tag
        self.next_tag = tag + 1
        if not no_ack:
            d = Delivery(tag, q, entry, None, self._due(q))
            self.unacked[tag] = d
            self._unacked_order.append(d)
        msg = entry.message
        self.conn.write(
            encoder.get_ok(
                self.number, tag, entry.redelivered, msg.exchange, msg.routing_key, q.message_count
            )
            + encoder.content(self.number, msg.properties, msg.body, self.conn.frame_max)
        )

    # -- settling -------------------------------------------------------

    def _take(self, tag: int, multiple: bool) -> list[Delivery]:
        """Remove and return the deliveries an ack/nack/reject refers to."""
        unacked = self.unacked
        if multiple:
            if tag == 0:
                taken = self._outstanding()
                unacked.clear()
                self._unacked_order.clear()
                return taken
            if tag not in unacked:
                raise precondition(f"unknown delivery tag {tag}")
            order = self._unacked_order
            taken = []
            while order and order[0].tag <= tag:
                d = order.popleft()
                if d.tag in unacked:
                    del unacked[d.tag]
                    taken.append(d)
            return taken
        found = unacked.pop(tag, None)
        if found is None:
            raise precondition(f"unknown delivery tag {tag}")
        order = self._unacked_order
        # Keep the order deque short: drop settled deliveries at its front.
        while order and order[0].tag not in unacked:
            order.popleft()
        return [found]

    def _outstanding(self) -> list[Delivery]:
        """Unsettled deliveries in tag order. ``_unacked_order`` may still hold
        deliveries settled singly (only its front is trimmed), so filter."""
        unacked = self.unacked
        return [d for d in self._unacked_order if unacked.get(d.tag) is d]

    def _settle(self, deliveries: list[Delivery], ack: bool, requeue: bool) -> None:
        if self.tx:
            for d in deliveries:
                self._tx_settles.append((d, ack, requeue))
            return
        self._apply_settle(deliveries, ack, requeue)

    def _apply_settle(self, deliveries: list[Delivery], ack: bool, requeue: bool) -> None:
        requeueing = requeue and not ack
        per_queue: dict[Queue, list[QueueEntry]] = {}
        for d in deliveries:
            c = d.consumer
            if c is not None:
                c.unacked -= 1
            entries = per_queue.get(d.queue)
            if entries is None:
                per_queue[d.queue] = [d.entry]
            else:
                entries.append(d.entry)
        for q, entries in per_queue.items():
            if requeueing:
                q.requeue(entries)
            elif ack:
                q.settle(entries)
            else:
                q.reject(entries)
        if self.global_prefetch:
            # Channel-wide credit freed up: any of this channel's queues may
            # now deliver, not only the ones these deliveries came from.
            self._dispatch_all()
        for q in per_queue:
            if not q.deleted:
                q.dispatch()

    def _basic_ack(self, m: C.Basic.Ack) -> None:
        self._settle(self._take(m.delivery_tag or 0, bool(m.multiple)), True, False)

    def _basic_nack(self, m: C.Basic.Nack) -> None:
        self._settle(self._take(m.delivery_tag or 0, bool(m.multiple)), False, bool(m.requeue))

    def _basic_reject(self, m: C.Basic.Reject) -> None:
        self._settle(self._take(m.delivery_tag or 0, False), False, bool(m.requeue))

    def _basic_recover(self, m: C.Basic.Recover) -> None:
        # RabbitMQ answers recover-ok before the redeliveries.
        self.send(C.Basic.RecoverOk())
        self._recover(m.requeue)

    def _basic_recover_async(self, m: C.Basic.RecoverAsync) -> None:
        self._recover(m.requeue)

    def _recover(self, requeue: bool) -> None:
        # RabbitMQ requeues in both cases: redelivering to the original
        # consumer (requeue=false) is not something it implements either.
        deliveries = self._outstanding()
        self.unacked.clear()
        self._unacked_order.clear()
        self._apply_settle(deliveries, False, True)

    # -- consumer timeout ----------------------------------------------

    def _due(self, queue: Queue) -> float:
        """When a delivery from ``queue`` made now times out (0: never);
        arms the channel's timer if it is the earliest."""
        limit = queue.options.consumer_timeout
        if limit is None:
            limit = self._default_timeout
        if not limit:
            return 0.0
        due = self.conn.loop.time() + limit / 1000
        if self._timeout_timer is None or due < self._timeout_due:
            self._arm_timeout(due)
        return due

    def _arm_timeout(self, due: float) -> None:
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
        self._timeout_due = due
        self._timeout_timer = self.conn.loop.call_at(due, self._check_timeouts)

    def _check_timeouts(self) -> None:
        """Close the channel when a delivery is overdue, as RabbitMQ does
        (406, class and method 0); otherwise wait for the next due one.

        Runs only when the timer fires, so walking every outstanding
        delivery costs nothing per message; it finds the earliest even when
        queues with different ``x-consumer-timeout`` share the channel.
        """
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
            self._timeout_timer = None
        if self.closing:
            return
        now = self.conn.loop.time()
        earliest = 0.0
        for d in self._outstanding():
            due = d.due
            if not due:
                continue
            if due <= now:
                limit = d.queue.options.consumer_timeout
                if limit is None:
                    limit = self._default_timeout
                self.conn.channel_error(
                    self,
                    precondition(
                        f"delivery acknowledgement on channel {self.number} timed out. "
                        f"Timeout value used: {limit} ms. This timeout value can be "
                        "configured, see consumers doc guide to learn more"
                    ),
                )
                return
            if not earliest or due < earliest:
                earliest = due
        if earliest:
            self._arm_timeout(earliest)

    # -- confirms and transactions -------------------------------------

    def _confirm_select(self, m: C.Confirm.Select) -> None:
        if self.tx:
            raise precondition("cannot switch from tx to confirm mode")
        self.confirm = True
        if not m.nowait:
            self.send(C.Confirm.SelectOk())

    def _tx_select(self, m: C.Tx.Select) -> None:
        if self.confirm:
            raise precondition("cannot switch from confirm to tx mode")
        self.tx = True
        self.send(C.Tx.SelectOk())

    def _tx_commit(self, m: C.Tx.Commit) -> None:
        if not self.tx:
            raise precondition("channel is not transactional")
        publishes, self._tx_publishes = self._tx_publishes, []
        settles, self._tx_settles = self._tx_settles, []
        for ex, msg, mandatory, _ in publishes:
            self._publish(ex, msg, mandatory)
        for d, ack, requeue in settles:
            self._apply_settle([d], ack, requeue)
        journal = self.vhost.journal
        if journal is None:
            self.send(C.Tx.CommitOk())
        else:
            # commit-ok only once what the transaction wrote is on disk.
            batch = journal.barrier()
            journal.wait_durable(batch, lambda: self._commit_ok(journal, batch))

    def _commit_ok(self, journal: Journal, batch: int) -> None:
        if self.closing:
            return
        exc = journal.failure(batch) if batch else None
        if exc is not None and not isinstance(exc, PartlyRefused):
            # Part of the transaction may be written, part not: it can be
            # neither committed whole nor rolled back, so no commit-ok.
            self._outcome_unknown(exc)
            return
        self.send(C.Tx.CommitOk())

    def _tx_rollback(self, m: C.Tx.Rollback) -> None:
        if not self.tx:
            raise precondition("channel is not transactional")
        self._tx_publishes = []
        settles, self._tx_settles = self._tx_settles, []
        if settles:
            # Rolled-back acks leave their messages unacknowledged again.
            for d, _, _ in settles:
                self.unacked[d.tag] = d
            self._unacked_order = deque(sorted(self.unacked.values(), key=lambda d: d.tag))
            self._check_timeouts()
        self.send(C.Tx.RollbackOk())

    # -- flow and teardown ---------------------------------------------

    def _flow(self, m: C.Channel.Flow) -> None:
        self.flow_active = bool(m.active)
        self.send(C.Channel.FlowOk(active=m.active))
        if m.active:
            self._dispatch_all()

    def _dispatch_all(self) -> None:
        queues = {id(c.queue): c.queue for c in self.consumers.values()}
        for q in queues.values():
            if not q.deleted:
                q.dispatch()

    def resume(self) -> None:
        """The socket drained: consumers may take messages again."""
        self._dispatch_all()

    def teardown(self) -> None:
        """The channel or its connection closed: cancel consumers, requeue unacked."""
        self.closing = True
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
            self._timeout_timer = None
        for tag in list(self.consumers):
            self._cancel(tag)
        deliveries = self._outstanding()
        if self._tx_settles:
            deliveries.extend(d for d, _, _ in self._tx_settles)
            self._tx_settles = []
        self.unacked.clear()
        self._unacked_order.clear()
        if deliveries:
            self._apply_settle(deliveries, False, True)


def _ignore(ch: Channel, m: Any) -> None:
    pass


# Method type -> handler, shared by every channel. A table of bound methods
# on each channel would be a reference cycle, so a closed connection would
# stay in memory until the cyclic collector ran (rarely: see cli.py).
_HANDLERS: dict[type[MethodFrame], Callable[[Channel, Any], None]] = {
    C.Channel.Flow: Channel._flow,
    C.Channel.FlowOk: _ignore,
    C.Exchange.Declare: Channel._exchange_declare,
    C.Exchange.Delete: Channel._exchange_delete,
    C.Exchange.Bind: Channel._exchange_bind,
    C.Exchange.Unbind: Channel._exchange_unbind,
    C.Queue.Declare: Channel._queue_declare,
    C.Queue.Bind: Channel._queue_bind,
    C.Queue.Unbind: Channel._queue_unbind,
    C.Queue.Purge: Channel._queue_purge,
    C.Queue.Delete: Channel._queue_delete,
    C.Basic.Qos: Channel._basic_qos,
    C.Basic.Consume: Channel._basic_consume,
    C.Basic.Cancel: Channel._basic_cancel,
    C.Basic.Get: Channel._basic_get,
    C.Basic.Ack: Channel._basic_ack,
    C.Basic.Nack: Channel._basic_nack,
    C.Basic.Reject: Channel._basic_reject,
    C.Basic.Recover: Channel._basic_recover,
    C.Basic.RecoverAsync: Channel._basic_recover_async,
    C.Confirm.Select: Channel._confirm_select,
    C.Tx.Select: Channel._tx_select,
    C.Tx.Commit: Channel._tx_commit,
    C.Tx.Rollback: Channel._tx_rollback,
}
