"""A virtual host: its exchanges, queues and bindings, and routing."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from roost.broker import errors
from roost.broker.binding import Binding
from roost.broker.errors import BrokerError, not_found, precondition
from roost.broker.exchange import EXCHANGE_TYPES, DirectExchange, Exchange
from roost.broker.queue import Queue

if TYPE_CHECKING:
    from roost.broker.binding import Destination
    from roost.broker.consumer import Consumer
    from roost.broker.message import Message

DEFAULT_EXCHANGE = ""
PREDECLARED = (
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
)
# Queue arguments RabbitMQ compares on redeclaration; others are ignored.
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
    "x-queue-type",
    "x-single-active-consumer",
)
REPLY_TO_QUEUE = "amq.rabbitmq.reply-to"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def generate_name(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


class VirtualHost:
    def __init__(self, name: str) -> None:
        self.name = name
        self.exchanges: dict[str, Exchange] = {}
        self.queues: dict[str, Queue] = {}
        self.default_exchange = DirectExchange(DEFAULT_EXCHANGE, durable=True)
        self.exchanges[DEFAULT_EXCHANGE] = self.default_exchange
        for name_, type_ in PREDECLARED:
            self.exchanges[name_] = EXCHANGE_TYPES[type_](name_, durable=True)
        # Direct reply-to: routing key suffix -> delivery callback.
        self.reply_targets: dict[str, Callable[[Message], None]] = {}
        self.on_queue_deleted: list[Callable[[Queue], None]] = []

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
        if name == DEFAULT_EXCHANGE:
            raise errors.access_refused("operation not permitted on the default exchange")
        if passive:
            return self.exchange(name)
        if name.startswith("amq."):
            raise errors.access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
        cls = EXCHANGE_TYPES.get(type_)
        if cls is None:
            raise BrokerError(errors.COMMAND_INVALID, f"unknown exchange type '{type_}'")
        existing = self.exchanges.get(name)
        if existing is not None:
            self._check_exchange_equivalent(existing, type_, durable, auto_delete, internal)
            return existing
        ae = (arguments or {}).get("alternate-exchange")
        if ae is not None and not isinstance(ae, str):
            raise precondition(
                f"invalid arg 'alternate-exchange' for exchange '{name}' in vhost "
                f"'{self.name}': not a string"
            )
        ex = cls(
            name, durable=durable, auto_delete=auto_delete, internal=internal, arguments=arguments
        )
        self.exchanges[name] = ex
        return ex

    def _check_exchange_equivalent(
        self, ex: Exchange, type_: str, durable: bool, auto_delete: bool, internal: bool
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

    def delete_exchange(self, name: str, if_unused: bool = False) -> None:
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise errors.access_refused(
                "operation not permitted on the default exchange"
                if name == DEFAULT_EXCHANGE
                else f"exchange name '{name}' contains reserved prefix 'amq.*'"
            )
        ex = self.exchanges.get(name)
        if ex is None:
            return  # RabbitMQ treats deleting a missing exchange as success
        if if_unused and (ex.bindings or ex.inbound):
            raise precondition(f"exchange '{name}' in vhost '{self.name}' in use")
        self._remove_exchange(ex)

    def _remove_exchange(self, ex: Exchange) -> None:
        for b in list(ex.bindings.values()):
            self._drop_binding(b, cascade=False)
        for b in list(ex.inbound):
            self._drop_binding(b, cascade=True)
        self.exchanges.pop(ex.name, None)

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
    ) -> Queue:
        if passive:
            return self.queue(name, owner)
        if not name:
            name = generate_name("amq.gen-")
        elif name.startswith("amq.") and name != REPLY_TO_QUEUE:
            raise errors.access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
        args = dict(arguments or {})
        existing = self.queues.get(name)
        if existing is not None:
            if existing.exclusive_owner is not None and existing.exclusive_owner is not owner:
                raise self._locked(existing)
            self._check_queue_equivalent(existing, durable, exclusive, auto_delete, args)
            return existing
        q = Queue(
            self,
            name,
            durable=durable,
            exclusive_owner=owner if exclusive else None,
            auto_delete=auto_delete,
            arguments=args,
        )
        self.queues[name] = q
        self.default_exchange.add_binding(Binding(self.default_exchange, q, name, None))
        return q

    def _check_queue_equivalent(
        self, q: Queue, durable: bool, exclusive: bool, auto_delete: bool, args: dict[str, Any]
    ) -> None:
        for field, have, want in (
            ("durable", q.durable, durable),
            ("exclusive", q.exclusive, exclusive),
            ("auto_delete", q.auto_delete, auto_delete),
        ):
            if have != want:
                raise precondition(
                    f"inequivalent arg '{field}' for queue '{q.name}' in vhost "
                    f"'{self.name}': received '{_flag(want)}' but current is '{_flag(have)}'"
                )
        for key in EQUIVALENCE_ARGS:
            have_v, want_v = q.arguments.get(key), args.get(key)
            if have_v != want_v:
                raise precondition(
                    f"inequivalent arg '{key}' for queue '{q.name}' in vhost '{self.name}': "
                    f"received {_describe(want_v)} but current is {_describe(have_v)}"
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
        q.deleted = True
        count = q.message_count
        self.queues.pop(q.name, None)
        for b in list(q.bindings):
            self._drop_binding(b, cascade=True)
        for c in q.detach_all_consumers():
            c.sink.cancelled_by_server(c)
        q.purge()
        for hook in self.on_queue_deleted:
            hook(q)
        return count

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
        if source == DEFAULT_EXCHANGE:
            raise errors.access_refused("operation not permitted on the default exchange")
        src = self.exchange(source)
        b = Binding(src, destination, routing_key, arguments)
        if src.add_binding(b):
            if isinstance(destination, Queue):
                destination.bindings.add(b)
            else:
                destination.inbound.add(b)

    def unbind(
        self,
        source: str,
        destination: Destination,
        routing_key: str,
        arguments: dict[str, Any] | None,
    ) -> None:
        if source == DEFAULT_EXCHANGE:
            raise errors.access_refused("operation not permitted on the default exchange")
        src = self.exchange(source)
        b = Binding(src, destination, routing_key, arguments)
        existing = src.bindings.get(b.key)
        if existing is not None:
            self._drop_binding(existing, cascade=True)

    def _drop_binding(self, b: Binding, cascade: bool) -> None:
        src = b.source
        src.remove_binding(b)
        dest = b.destination
        if isinstance(dest, Queue):
            dest.bindings.discard(b)
        else:
            dest.inbound.discard(b)
        # An auto-delete exchange goes once its last outgoing binding does.
        if cascade and src.auto_delete and not src.bindings and self.exchanges.get(src.name) is src:
            self._remove_exchange(src)

    # -- routing --------------------------------------------------------

    def route(self, exchange: Exchange, message: Message) -> list[Queue]:
        """Queues ``message`` goes to: through exchange-to-exchange bindings
        and alternate exchanges, each queue once."""
        dests = exchange.route(message)
        if not dests and exchange.alternate_exchange is None:
            return []
        simple = True
        for d in dests:
            if not isinstance(d, Queue):
                simple = False
                break
        if simple and dests:
            return dests  # type: ignore[return-value]
        queues: list[Queue] = []
        seen_q: set[int] = set()
        seen_x: set[int] = {id(exchange)}
        work: list[tuple[Exchange, list[Destination]]] = [(exchange, dests)]
        while work:
            ex, ds = work.pop()
            found = False
            for d in ds:
                if isinstance(d, Queue):
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


def _describe(value: object) -> str:
    if value is None:
        return "none"
    kind = {bool: "bool", int: "long", float: "double", str: "longstr"}.get(type(value), "table")
    return f"the value '{value}' of type '{kind}'"
