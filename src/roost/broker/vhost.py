"""A virtual host: its exchanges, queues and bindings, and routing."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from roost.broker import errors, fields, stats
from roost.broker.binding import Binding
from roost.broker.dedup import DedupHook, exchange_deduplicator
from roost.broker.delayed import DelayedExchange, DelayStore, delay_of
from roost.broker.errors import BrokerError, not_found, precondition
from roost.broker.exchange import EXCHANGE_TYPES, DirectExchange, Exchange
from roost.broker.message import Message
from roost.broker.origins import CLIENT, DELAYED
from roost.broker.queue import ACCEPT, DUPLICATE, REFUSE, Queue
from roost.broker.queue_args import parse_queue_args

if TYPE_CHECKING:
    from roost.broker.binding import Destination
    from roost.broker.consumer import Consumer
    from roost.broker.journal import Journal

DEFAULT_EXCHANGE = ""
PREDECLARED = (
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
)
# Queue arguments RabbitMQ compares on redeclaration, in the order it checks
# them (rabbit_classic_queue's queue_arguments); others are ignored.
EQUIVALENCE_ARGS = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-master-locator",
)
REPLY_TO_QUEUE = "amq.rabbitmq.reply-to"
REPLY_TO_PREFIX = REPLY_TO_QUEUE + "."


def _nothing() -> None:
    pass


def _ignore_id(_: int) -> None:
    pass


def _flag(value: bool) -> str:
    return "true" if value else "false"


def generate_name(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


class ReplyRelay(Protocol):
    """Direct reply-to beyond this process (a cluster's other nodes)."""

    def key_prefix(self) -> str:
        """Starts every reply-to key made here: says where the requester is."""
        ...

    def relay(self, vhost: str, key: str, message: Message) -> bool:
        """A reply to ``key``, which has no requester here: send it on to
        its node (True), or say it has nowhere to go (False)."""
        ...


class VirtualHost:
    def __init__(
        self,
        name: str,
        journal: Journal | None = None,
        on_definitions_changed: Callable[[], None] | None = None,
        allocate_queue_id: Callable[[], int] | None = None,
        retire_store_id: Callable[[int], None] | None = None,
        store_id_settled: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.journal = journal
        self._changed = on_definitions_changed or _nothing
        # Set (by Broker.add_vhost) when the vhost is shared by the nodes of
        # a cluster. Every node must route to every queue, so transient
        # queues, exchanges and bindings are shared definitions too: their
        # changes are reported like durable ones.
        self.clustered = False
        # Cluster mode: where delayed exchanges keep what they hold.
        self.delay_store: DelayStore | None = None
        self._allocate_queue_id = allocate_queue_id
        # A deleted queue's (or delayed exchange's) log id: remembered as
        # deleted until everything logged under it is settled on disk.
        self._retire_store_id = retire_store_id or _ignore_id
        self.store_id_settled = store_id_settled or _ignore_id
        self.exchanges: dict[str, Exchange] = {}
        self.queues: dict[str, Queue] = {}
        self.default_exchange = DirectExchange(DEFAULT_EXCHANGE, durable=True)
        self.exchanges[DEFAULT_EXCHANGE] = self.default_exchange
        for name_, type_ in PREDECLARED:
            self.exchanges[name_] = EXCHANGE_TYPES[type_](name_, durable=True)
        # Direct reply-to: routing key suffix -> delivery callback.
        self.reply_targets: dict[str, Callable[[Message], None]] = {}
        # Set in a cluster: replies to requesters on other nodes.
        self.reply_relay: ReplyRelay | None = None
        # call_later(seconds, fn) for TTL, retry and expiry timers; None in a
        # broker model running without an event loop (timers then do nothing).
        self.scheduler: Callable[[float, Callable[[], None]], Any] | None = None
        # Keeps the dedup caches of durable queues and exchanges on disk:
        # called with (vhost, "q" or "x", name, deduper), deduper None when
        # the queue or exchange is deleted (Broker.set_dedup_persistence).
        self.persist_dedup: DedupHook | None = None
        # Estimated bytes a queue may hold in memory before paging to the log.
        self.queue_memory_limit = 128 * 1024 * 1024
        self.on_queue_deleted: list[Callable[[Queue], None]] = []
        # Message counters only a channel sees (stats.py; queues keep their
        # own): publishes received, confirms sent, unroutable messages
        # returned or dropped, empty basic.gets.
        self.published = 0
        self.confirmed = 0
        self.returned = 0
        self.dropped = 0
        self.get_empty = 0
        # (reason, dead-letter strategy) -> messages dead-lettered.
        self.dead_lettered_by: dict[tuple[str, str], int] = {}
        # deliver_get, ack, redeliver, dead_lettered of deleted queues.
        self.retired = [0, 0, 0, 0]

    # -- lookup ---------------------------------------------------------

    def exchange(self, name: str) -> Exchange:
        ex = self.exchanges.get(name)
        if ex is None:
            raise not_found("exchange", name, self.name)
        return ex

    def queue(self, name: str, owner: object | None = None) -> Queue:
        q = self.queues.get(name)
        if q is None:
            raise not_found("queue", name, self.name)
        if q.exclusive_owner is not None and q.exclusive_owner is not owner:
            raise self._locked(q)
        return q

    def _locked(self, q: Queue) -> BrokerError:
        return BrokerError(
            errors.RESOURCE_LOCKED,
            f"cannot obtain exclusive access to locked queue '{q.name}' in vhost "
            f"'{self.name}'. It could be originally declared on another connection "
            "or the exclusive property value does not match that of the original "
            "declaration.",
        )

    # -- exchanges ------------------------------------------------------

    def declare_exchange(
        self,
        name: str,
        type_: str,
        *,
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Exchange:
        # The order of checks is rabbit_channel's: type, default exchange,
        # then (only for a new exchange) the name and the alternate
        # exchange's type, then equivalence with an existing one.
        if passive:
            if name == DEFAULT_EXCHANGE:
                raise errors.access_refused("operation not permitted on the default exchange")
            return self.exchange(name)
        cls = EXCHANGE_TYPES.get(type_)
        if cls is None:
            raise BrokerError(errors.COMMAND_INVALID, f"unknown exchange type '{type_}'")
        if name == DEFAULT_EXCHANGE:
            raise errors.access_refused("operation not permitted on the default exchange")
        args = dict(arguments or {})
        existing = self.exchanges.get(name)
        if existing is not None:
            self._check_exchange_equivalent(existing, type_, durable, auto_delete, internal, args)
            return existing
        if name.startswith("amq."):
            raise errors.access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
        ae = args.get("alternate-exchange")
        if ae is not None and not isinstance(ae, str):
            raise precondition(
                f"invalid type '{fields.type_name(ae)}' for arg 'alternate-exchange' in "
                f"exchange '{name}' in vhost '{self.name}'"
            )
        deduper = exchange_deduplicator(name, self.name, args)
        ex = cls(name, durable=durable, auto_delete=auto_delete, internal=internal, arguments=args)
        ex.deduper = deduper
        if deduper is not None and self.clustered:
            # One cache for the cluster, in PostgreSQL, named by the exchange.
            deduper.share(f"x{len(self.name)}:{self.name}{name}")
        if isinstance(ex, DelayedExchange):
            # Its persistent held messages are logged under an id of its own.
            alloc = self._allocate_queue_id
            logged = durable and self.journal is not None and alloc is not None
            ex.attach(self, alloc() if logged and alloc is not None else 0)
        self.exchanges[name] = ex
        if durable and deduper is not None and self.persist_dedup is not None:
            self.persist_dedup(self.name, "x", name, deduper)
        if durable or self.clustered:
            self._changed()
        return ex

    def _check_exchange_equivalent(
        self,
        ex: Exchange,
        type_: str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        args: dict[str, Any],
    ) -> None:
        for field, have, want in (
            ("type", ex.type_name, type_),
            ("durable", _flag(ex.durable), _flag(durable)),
            ("auto_delete", _flag(ex.auto_delete), _flag(auto_delete)),
            ("internal", _flag(ex.internal), _flag(internal)),
        ):
            if have != want:
                raise precondition(
                    f"inequivalent arg '{field}' for exchange '{ex.name}' in vhost "
                    f"'{self.name}': received '{want}' but current is '{have}'"
                )
        # Of the arguments, RabbitMQ compares only the alternate exchange.
        diff = fields.inequivalence(ex.arguments, args, "alternate-exchange")
        if diff is not None:
            raise precondition(
                f"inequivalent arg 'alternate-exchange' for exchange '{ex.name}' in vhost "
                f"'{self.name}': {diff}"
            )

    def delete_exchange(self, name: str, if_unused: bool = False) -> None:
        if name == DEFAULT_EXCHANGE:
            raise errors.access_refused("operation not permitted on the default exchange")
        if name.startswith("amq."):
            raise errors.access_refused(
                f"deletion of system exchange '{name}' in vhost '{self.name}' not allowed"
            )
        ex = self.exchanges.get(name)
        if ex is None:
            return  # RabbitMQ treats deleting a missing exchange as success
        # "Unused" means no bindings out of it; bindings into it (exchange
        # to exchange) do not count, as in rabbit_exchange:delete/3.
        if if_unused and ex.bindings:
            raise precondition(f"exchange '{name}' in vhost '{self.name}' in use")
        self._remove_exchange(ex)

    def _remove_exchange(self, ex: Exchange) -> None:
        for b in list(ex.bindings.values()):
            self._drop_binding(b, cascade=False)
        for b in list(ex.inbound):
            self._drop_binding(b, cascade=True)
        self.exchanges.pop(ex.name, None)
        if isinstance(ex, DelayedExchange):
            if ex.store_id:
                self._retire_store_id(ex.store_id)
            ex.discard()
            if ex.store_id:
                self.store_id_settled(ex.store_id)
        if ex.durable and ex.deduper is not None and self.persist_dedup is not None:
            self.persist_dedup(self.name, "x", ex.name, None)
        if ex.durable or self.clustered:
            self._changed()

    # -- queues ---------------------------------------------------------

    def declare_queue(
        self,
        name: str,
        *,
        owner: object,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        max_queues: int = 0,
        authorize: Callable[[str, bool], None] | None = None,
        replicated: bool = False,
    ) -> Queue:
        """Declare a queue. ``max_queues`` (0: no limit) is the vhost's
        queue limit, which a client's declaration of a new queue must
        respect (recovery and definitions import pass none). ``authorize``
        is called with the actual name (generated for a server-named queue)
        and whether the queue is new, before anything else happens to it:
        it raises to refuse the declaration. ``replicated``: the queue
        exists already, declared on another cluster node, and may have a
        name the server generated there (``amq.gen-...``)."""
        if passive:
            return self.queue(name, owner)
        if not name:
            name = generate_name("amq.gen-")
        elif name.startswith("amq.") and name != REPLY_TO_QUEUE and not replicated:
            # Checked before the lookup: redeclaring even an existing
            # server-named queue by name is refused, as in RabbitMQ.
            raise errors.access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
        if authorize is not None:
            authorize(name, name not in self.queues)
        # RabbitMQ never makes an exclusive queue durable, so the durable
        # flag of an exclusive declaration is neither kept nor compared.
        durable = durable and not exclusive
        args = dict(arguments or {})
        existing = self.queues.get(name)
        if existing is not None:
            self._check_queue_equivalent(
                existing, owner if exclusive else None, durable, auto_delete, args
            )
            existing.touch()
            return existing
        options = parse_queue_args(name, self.name, args, durable=durable, exclusive=exclusive)
        if max_queues and len(self.queues) >= max_queues:
            raise precondition(
                f"cannot declare queue '{name}': queue limit in vhost '{self.name}' "
                f"({max_queues}) is reached"
            )
        q = Queue(
            self,
            name,
            durable=durable,
            exclusive_owner=owner if exclusive else None,
            auto_delete=auto_delete,
            arguments=args,
            options=options,
        )
        self.queues[name] = q
        self.default_exchange.add_binding(Binding(self.default_exchange, q, name, None))
        if durable:
            if self.journal is not None and self._allocate_queue_id is not None:
                q.store_id = self._allocate_queue_id()
            if q.deduper is not None and self.persist_dedup is not None:
                self.persist_dedup(self.name, "q", name, q.deduper)
        if durable or self.clustered:
            self._changed()
        return q

    def _check_queue_equivalent(
        self,
        q: Queue,
        owner: object | None,
        durable: bool,
        auto_delete: bool,
        args: dict[str, Any],
    ) -> None:
        # rabbit_amqqueue:assert_equivalence/5: the exclusive owner must be
        # exactly the same (none for a non-exclusive queue), then the flags,
        # then the arguments.
        if q.exclusive_owner is not owner:
            raise self._locked(q)
        for field, have, want in (
            ("durable", q.durable, durable),
            ("auto_delete", q.auto_delete, auto_delete),
        ):
            if have != want:
                raise precondition(
                    f"inequivalent arg '{field}' for queue '{q.name}' in vhost "
                    f"'{self.name}': received '{_flag(want)}' but current is '{_flag(have)}'"
                )
        for key in EQUIVALENCE_ARGS:
            have_args, want_args = q.arguments, args
            # A missing queue type is the default, classic, on either side.
            if (
                key == "x-queue-type"
                and (key not in have_args or key not in want_args)
                and have_args.get(key, "classic") == want_args.get(key, "classic")
            ):
                continue
            diff = fields.inequivalence(have_args, want_args, key)
            if diff is not None:
                raise precondition(
                    f"inequivalent arg '{key}' for queue '{q.name}' in vhost '{self.name}': {diff}"
                )

    def delete_queue(
        self, name: str, *, owner: object, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        q = self.queues.get(name)
        if q is None:
            return 0
        if q.exclusive_owner is not None and q.exclusive_owner is not owner:
            raise self._locked(q)
        if if_unused and q.consumer_count:
            raise precondition(f"queue '{name}' in vhost '{self.name}' in use")
        if if_empty and q.message_count:
            raise precondition(f"queue '{name}' in vhost '{self.name}' not empty")
        return self.remove_queue(q)

    def remove_queue(self, q: Queue) -> int:
        """Delete a queue, cancelling its consumers; returns the messages dropped."""
        if q.deleted:
            return 0
        q.mark_deleted()
        count = q.message_count
        self.queues.pop(q.name, None)
        # The implicit default-exchange binding is not in q.bindings: left
        # behind, a queue redeclared with this name would never get its
        # binding and publishes to it would go to the deleted queue.
        self.default_exchange.remove_binding(Binding(self.default_exchange, q, q.name, None))
        for b in list(q.bindings):
            self._drop_binding(b, cascade=True)
        for c in q.detach_all_consumers():
            c.sink.cancelled_by_server(c)
        if q.store_id:
            self._retire_store_id(q.store_id)
        q.purge()
        q.stop_timers()
        if q.store_id and not q.unacked:
            self.store_id_settled(q.store_id)
        stats.retire_queue(self, q)
        for hook in self.on_queue_deleted:
            hook(q)
        if q.durable and q.deduper is not None and self.persist_dedup is not None:
            self.persist_dedup(self.name, "q", q.name, None)
        if q.durable or self.clustered:
            self._changed()
        return count

    def clear(self) -> None:
        """Delete every queue (dropping its messages, stored ones too) and
        every exchange but the default one: the vhost is being deleted."""
        for q in list(self.queues.values()):
            self.remove_queue(q)
        for ex in list(self.exchanges.values()):
            if ex is not self.default_exchange and self.exchanges.get(ex.name) is ex:
                self._remove_exchange(ex)

    def purge_queue(self, name: str, owner: object) -> int:
        return self.queue(name, owner).purge()

    def consumer_removed(self, consumer: Consumer) -> None:
        q = consumer.queue
        if q.remove_consumer(consumer) and not q.deleted:
            self.remove_queue(q)

    # -- bindings -------------------------------------------------------

    def bind(
        self,
        source: str,
        destination: Destination,
        routing_key: str,
        arguments: dict[str, Any] | None,
    ) -> None:
        if source == DEFAULT_EXCHANGE or destination is self.default_exchange:
            raise errors.access_refused("operation not permitted on the default exchange")
        src = self.exchange(source)
        args = dict(arguments or {})
        src.validate_binding(args)
        b = Binding(src, destination, routing_key, args)
        if src.add_binding(b):
            if isinstance(destination, Queue):
                destination.bindings.add(b)
            else:
                destination.inbound.add(b)
            if (src.durable and destination.durable) or self.clustered:
                self._changed()

    def unbind(
        self,
        source: str,
        destination: Destination | None,
        routing_key: str,
        arguments: dict[str, Any] | None,
        owner: object | None = None,
    ) -> None:
        """Remove a binding; like RabbitMQ, removing one that does not exist
        (or whose source or destination does not) succeeds."""
        if source == DEFAULT_EXCHANGE or destination is self.default_exchange:
            raise errors.access_refused("operation not permitted on the default exchange")
        src = self.exchanges.get(source)
        if src is None or destination is None:
            return
        b = Binding(src, destination, routing_key, arguments)
        existing = src.bindings.get(b.key)
        if existing is None:
            return
        if (
            isinstance(destination, Queue)
            and destination.exclusive_owner is not None
            and destination.exclusive_owner is not owner
        ):
            raise self._locked(destination)
        self._drop_binding(existing, cascade=True)

    def _drop_binding(self, b: Binding, cascade: bool) -> None:
        src = b.source
        src.remove_binding(b)
        if ((src.durable and b.destination.durable) or self.clustered) and src.name:
            self._changed()
        dest = b.destination
        if isinstance(dest, Queue):
            dest.bindings.discard(b)
        else:
            dest.inbound.discard(b)
        # An auto-delete exchange goes once its last outgoing binding does.
        if cascade and src.auto_delete and not src.bindings and self.exchanges.get(src.name) is src:
            self._remove_exchange(src)

    # -- publishing -----------------------------------------------------

    def publish(
        self,
        exchange: Exchange,
        message: Message,
        mandatory: bool = False,
        *,
        origin: int = CLIENT,
        exclude: Callable[[Queue], bool] | None = None,
    ) -> tuple[bool, bool, int]:
        """The one way a message enters the vhost, whoever sends it (an AMQP
        channel, the HTTP API, ``roost ctl``, a delayed exchange whose
        message fell due, dead-lettering).

        Routes ``message``, asks every target queue whether it takes it
        (deduplication, overflow, length limits) *before* anything is
        written, writes one persistent record for the durable queues that
        do, then enqueues and counts. ``exclude`` drops target queues
        (dead-lettering's cycle check).

        Returns ``(routed, refused, batch)``: whether some queue matched
        (otherwise it is unroutable, and a ``mandatory`` publish goes back
        to its publisher; held by a delayed exchange counts as unroutable,
        as with the plugin); whether a queue refused it (``x-overflow:
        reject-publish``: a confirm is a nack); and the journal batch that
        must be on disk before the publish may be confirmed (0: none).
        """
        client = origin == CLIENT
        if client:
            self.published += 1  # stats.py
            exchange.published += 1
        journal = self.journal
        deduper = exchange.deduper
        if deduper is not None and origin != DELAYED and deduper.check_and_add(message):
            # A duplicate goes nowhere (a mandatory one is returned, as with
            # LavinMQ and the plugin), and is confirmed only once whatever
            # carried the original is durable.
            return False, False, journal.barrier() if journal is not None else 0
        if (
            exchange is self.default_exchange
            and client
            and message.routing_key.startswith(REPLY_TO_PREFIX)
        ):
            key = message.routing_key[len(REPLY_TO_PREFIX) :]
            target = self.reply_targets.get(key)
            if target is not None:
                target(message)
                return True, False, 0
            relay = self.reply_relay
            if relay is not None and relay.relay(self.name, key, message):
                return True, False, 0
            targets: list[Destination] = []
        else:
            targets = self.route(exchange, message)
        if exclude is not None:
            targets = [d for d in targets if not (isinstance(d, Queue) and exclude(d))]
        queues: list[Queue] = targets  # type: ignore[assignment]
        holders: Sequence[DelayedExchange] = ()
        turned_away: Sequence[tuple[Queue, int]] = ()
        refused = dropped = False
        routed = bool(targets)
        wait = 0
        for d in targets:
            if type(d) is not Queue or not d.admits_all:
                queues, holders, turned_away, dropped = self._admit(message, targets)
                routed = any(isinstance(t, Queue) for t in targets)
                refused = any(verdict == REFUSE for _, verdict in turned_away)
                break
        if queues:
            ref = 0
            if message.persistent and journal is not None:
                # (backing.store_id, not the Queue property: the hot path.)
                ids = [q.backing.store_id for q in queues if q.backing.store_id]
                if ids:
                    ref = journal.append(message, ids)
                    wait = journal.barrier()
            if ref:
                for q in queues:
                    q.enqueue(message, ref if q.backing.store_id else 0)
            else:
                for q in queues:
                    q.enqueue(message)
        if holders:
            for h in holders:
                wait = max(wait, h.hold(message))
        if turned_away:
            # Dead-lettered only now, as RabbitMQ does after delivering to
            # the queues that take it: a copy must not take the place (or
            # the dedup key) of the original in another queue of this publish.
            for q, verdict in turned_away:
                if verdict == REFUSE:
                    q.refuse(message)
                else:
                    q.discard(message)
        if dropped and journal is not None:
            # Confirmed once what carried the original (a duplicate's) or
            # the dead-lettered copy (a discarded one's) is durable.
            wait = journal.barrier()
        if not routed and client and not holders and not mandatory:
            self.dropped += 1
        return routed, refused, wait

    def _admit(
        self, message: Message, targets: list[Destination]
    ) -> tuple[list[Queue], list[DelayedExchange], list[tuple[Queue, int]], bool]:
        """Split routing targets into the queues that take ``message``, the
        delayed exchanges that hold it, the queues that refused or
        discarded it (with the verdict: the caller dead-letters it from
        them once the others have it) and whether one dropped it (a
        duplicate, or discarded). Decided before anything is logged."""
        queues: list[Queue] = []
        holders: list[DelayedExchange] = []
        turned_away: list[tuple[Queue, int]] = []
        dropped = False
        for d in targets:
            if isinstance(d, DelayedExchange):
                # (Not when it routed to itself through a binding to itself.)
                if delay_of(message) > 0:
                    holders.append(d)
                continue
            assert isinstance(d, Queue)
            verdict = ACCEPT if d.admits_all else d.admit(message)
            if verdict == ACCEPT:
                queues.append(d)
            else:
                if verdict != REFUSE:
                    dropped = True
                if verdict != DUPLICATE:
                    turned_away.append((d, verdict))
        return queues, holders, turned_away, dropped

    def route(self, exchange: Exchange, message: Message) -> list[Destination]:
        """Where ``message`` goes: queues, through exchange-to-exchange
        bindings and alternate exchanges, each once; a delayed exchange
        that holds the message appears as itself.

        A message with CC/BCC keys is routed with all its keys.
        """
        if message.cc:
            return self._route_keys(exchange, message)
        return self._route(exchange, message)

    def _route_keys(self, exchange: Exchange, message: Message) -> list[Destination]:
        """Sender-selected distribution: every exchange on the way matches
        the routing key and each CC/BCC key, and its alternate exchange is
        used only when none matched, as RabbitMQ routes a message's list of
        routing keys."""
        probes = [message]
        for key in message.cc:
            probe = Message(message.exchange, key, message.properties, message.body)
            probes.append(probe)

        def hop(ex: Exchange) -> list[Destination]:
            out = list(ex.route(message))
            if ex in out:
                # The exchange kept the message (a delayed exchange holds it
                # and routes it, CC keys included, when it is due): the
                # other keys must not make it hold copies.
                return out
            if len(probes) == 1:
                return out
            seen = set(out)
            for p in probes[1:]:
                for d in ex.route(p):
                    if d not in seen:
                        seen.add(d)
                        out.append(d)
            return out

        queues: list[Destination] = []
        seen_q: set[int] = set()
        seen_x: set[int] = {id(exchange)}
        work: list[tuple[Exchange, list[Destination]]] = [(exchange, hop(exchange))]
        while work:
            ex, ds = work.pop()
            for d in ds:
                if isinstance(d, Queue) or (d is ex and isinstance(d, DelayedExchange)):
                    if id(d) not in seen_q:
                        seen_q.add(id(d))
                        queues.append(d)
                elif id(d) not in seen_x:
                    seen_x.add(id(d))
                    work.append((d, hop(d)))
            if not ds and ex.alternate_exchange is not None:
                ae = self.exchanges.get(ex.alternate_exchange)
                if ae is not None and id(ae) not in seen_x:
                    seen_x.add(id(ae))
                    work.append((ae, hop(ae)))
        return queues

    def _route(self, exchange: Exchange, message: Message) -> list[Destination]:
        dests = exchange.route(message)
        if not dests and exchange.alternate_exchange is None:
            return []
        simple = True
        for d in dests:
            if not isinstance(d, Queue):
                simple = False
                break
        if simple and dests:
            return dests
        queues: list[Destination] = []
        seen_q: set[int] = set()
        seen_x: set[int] = {id(exchange)}
        work: list[tuple[Exchange, list[Destination]]] = [(exchange, dests)]
        while work:
            ex, ds = work.pop()
            found = False
            for d in ds:
                # A delayed exchange routing to itself holds the message.
                if isinstance(d, Queue) or (d is ex and isinstance(d, DelayedExchange)):
                    found = True
                    if id(d) not in seen_q:
                        seen_q.add(id(d))
                        queues.append(d)
                elif id(d) not in seen_x:
                    found = True
                    seen_x.add(id(d))
                    work.append((d, d.route(message)))
                else:
                    found = True
            if not found and ex.alternate_exchange is not None:
                ae = self.exchanges.get(ex.alternate_exchange)
                if ae is not None and id(ae) not in seen_x:
                    seen_x.add(id(ae))
                    work.append((ae, ae.route(message)))
        return queues
