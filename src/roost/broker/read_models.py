"""Read models: what the management adapters show of the broker.

The HTTP API and ``roost ctl`` both describe queues, exchanges, bindings,
consumers, connections and channels through these, so they report the
same numbers, each under its own names (RabbitMQ's JSON for the one,
rabbitmqctl-like rows for the other). Connections and channels belong to
a wire adapter: they describe themselves through
``ClientConnection.describe``, so neither management adapter needs to know
the wire adapter's objects.

Arguments and client properties are kept as the broker holds them (field
tables); ``fields.jsonable`` turns them into JSON.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from roost.broker.binding import args_key

if TYPE_CHECKING:
    from roost.broker.binding import Binding
    from roost.broker.broker import Broker
    from roost.broker.consumer import Consumer
    from roost.broker.exchange import Exchange
    from roost.broker.queue import Queue
    from roost.broker.vhost import VirtualHost


# -- queues, exchanges, bindings ------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueView:
    name: str
    vhost: str
    durable: bool
    auto_delete: bool
    exclusive: bool
    arguments: Mapping[str, Any]
    type: str  # x-queue-type: "classic" unless declared otherwise
    state: str
    messages_ready: int
    messages_unacknowledged: int
    message_bytes_ready: int
    memory: int
    consumers: int
    single_active_consumer_tag: str | None
    message_stats: dict[str, Any]

    @property
    def messages(self) -> int:
        return self.messages_ready + self.messages_unacknowledged


def queue_view(broker: Broker, q: Queue) -> QueueView:
    active = q.active_consumer
    return QueueView(
        name=q.name,
        vhost=q.vhost.name,
        durable=q.durable,
        auto_delete=q.auto_delete,
        exclusive=q.exclusive,
        arguments=q.arguments,
        type=str(q.arguments.get("x-queue-type", "classic")),
        state="running",
        messages_ready=q.message_count,
        messages_unacknowledged=q.unacked,
        message_bytes_ready=q.ready_bytes,
        memory=q.memory_estimate(),
        consumers=q.consumer_count,
        single_active_consumer_tag=(
            active.tag if active is not None and q.options.single_active_consumer else None
        ),
        message_stats=broker.stats.message_stats(("queue", q.vhost.name, q.name)),
    )


@dataclass(frozen=True, slots=True)
class ExchangeView:
    name: str
    vhost: str
    type: str
    durable: bool
    auto_delete: bool
    internal: bool
    arguments: Mapping[str, Any]
    # As RabbitMQ: None until something was published to it.
    message_stats: dict[str, Any] | None


def exchange_view(broker: Broker, vh: VirtualHost, ex: Exchange) -> ExchangeView:
    stats = broker.stats.message_stats(("exchange", vh.name, ex.name)) if ex.published else None
    return ExchangeView(
        name=ex.name,
        vhost=vh.name,
        type=ex.type_name,
        durable=ex.durable,
        auto_delete=ex.auto_delete,
        internal=ex.internal,
        arguments=ex.arguments,
        message_stats=stats,
    )


def properties_key(routing_key: str, arguments: Mapping[str, Any]) -> str:
    """RabbitMQ's ``properties_key``, a binding's name within its source
    and destination: the routing key ("%" and "~" escaped; "~" when
    empty), then "~" and a short hash of the arguments when it has any
    (stable across restarts: a digest of the arguments, not ``hash``)."""
    key = routing_key.replace("%", "%25").replace("~", "%7E")
    if not arguments:
        return key or "~"
    digest = hashlib.sha1(args_key(dict(arguments)).encode()).digest()[:4]
    return f"{key}~{base64.urlsafe_b64encode(digest).decode().rstrip('=')}"


@dataclass(frozen=True, slots=True)
class BindingView:
    source: str
    vhost: str
    destination: str
    destination_type: str  # "queue" or "exchange"
    routing_key: str
    arguments: Mapping[str, Any]

    @property
    def properties_key(self) -> str:
        return properties_key(self.routing_key, self.arguments)


def binding_view(vhost: str, b: Binding) -> BindingView:
    return BindingView(
        source=b.source.name,
        vhost=vhost,
        destination=b.destination.name,
        destination_type=b.destination.kind,
        routing_key=b.routing_key,
        arguments=b.arguments,
    )


def default_binding(q: Queue) -> BindingView:
    """The default exchange's binding of ``q``, which every queue has and
    RabbitMQ lists first among a queue's bindings."""
    return BindingView("", q.vhost.name, q.name, "queue", q.name, {})


def bindings(vh: VirtualHost) -> list[BindingView]:
    """Every binding in ``vh``, the default exchange's included."""
    return [binding_view(vh.name, b) for ex in vh.exchanges.values() for b in ex.bindings.values()]


@dataclass(frozen=True, slots=True)
class Totals:
    queues: int
    exchanges: int
    consumers: int
    messages_ready: int
    messages_unacknowledged: int

    @property
    def messages(self) -> int:
        return self.messages_ready + self.messages_unacknowledged


def totals(vhosts: Iterable[VirtualHost]) -> Totals:
    queues = exchanges = consumers = ready = unacked = 0
    for vh in vhosts:
        exchanges += len(vh.exchanges)
        for q in vh.queues.values():
            queues += 1
            consumers += q.consumer_count
            ready += q.message_count
            unacked += q.unacked
    return Totals(queues, exchanges, consumers, ready, unacked)


# -- connections, channels, consumers ---------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelView:
    number: int
    state: str  # "running", or "flow" while the client stopped it with channel.flow
    consumers: tuple[Consumer, ...]
    messages_unacknowledged: int
    # Inside a transaction: publishes and acks waiting for tx.commit.
    messages_uncommitted: int
    acks_uncommitted: int
    prefetch_count: int
    global_prefetch_count: int
    confirm: bool
    transactional: bool


@dataclass(frozen=True, slots=True)
class ConnectionView:
    peer: str  # the client's address, "host:port"
    peer_host: str  # the client's IP address ("" when not on IP)
    local: str  # the broker's end, "host:port" ("" when unknown)
    user: str
    vhost: str | None  # None until connection.open
    state: str  # "running" once open
    channel_max: int
    frame_max: int
    heartbeat: int
    client_properties: Mapping[str, Any]
    tls: bool
    auth_mechanism: str
    connected_for: float  # seconds
    channels: tuple[ChannelView, ...]  # by number

    @property
    def name(self) -> str:
        """RabbitMQ's name for it: "127.0.0.1:54321 -> 127.0.0.1:5672"."""
        return f"{self.peer} -> {self.local}"

    def channel_name(self, ch: ChannelView) -> str:
        """RabbitMQ's name for one of its channels: "<connection> (1)"."""
        return f"{self.name} ({ch.number})"


def host_port(address: str) -> tuple[str, int | None]:
    """ "host:port" split; the port None when there is none."""
    host, _, port = address.rpartition(":")
    return (host, int(port)) if port.isdigit() else (address, None)


def connections(broker: Broker, vhost: str | None = None) -> list[ConnectionView]:
    """The open connections (of ``vhost``, or all), by name."""
    views = [c.describe() for c in broker.connections if c.vhost is not None]
    if vhost is not None:
        views = [v for v in views if v.vhost == vhost]
    return sorted(views, key=lambda v: v.name)


@dataclass(frozen=True, slots=True)
class ConsumerView:
    tag: str
    queue: str
    vhost: str  # the queue's
    ack_required: bool
    prefetch_count: int  # its own limit, 0 for none
    exclusive: bool
    arguments: Mapping[str, Any]
    active: bool  # False while another single active consumer gets the messages
    # Where it consumes; None for a consumer of no open connection's channel.
    connection: ConnectionView | None
    channel: ChannelView | None


def consumer_view(
    c: Consumer, connection: ConnectionView | None = None, channel: ChannelView | None = None
) -> ConsumerView:
    active = c.queue.active_consumer
    return ConsumerView(
        tag=c.tag,
        queue=c.queue.name,
        vhost=c.queue.vhost.name,
        ack_required=not c.no_ack,
        prefetch_count=c.prefetch,
        exclusive=c.exclusive,
        arguments=c.arguments,
        active=active is None or active is c,
        connection=connection,
        channel=channel,
    )


def channel_consumers(conns: Iterable[ConnectionView]) -> list[ConsumerView]:
    """The consumers of ``conns``, connection by connection, channel by channel."""
    return [
        consumer_view(c, conn, ch) for conn in conns for ch in conn.channels for c in ch.consumers
    ]


def queue_consumers(broker: Broker, vh: VirtualHost) -> list[ConsumerView]:
    """The consumers of ``vh``'s queues, queue by queue (by name)."""
    where: dict[Consumer, tuple[ConnectionView, ChannelView]] = {
        c: (conn, ch) for conn in connections(broker) for ch in conn.channels for c in ch.consumers
    }
    out = []
    for q in sorted(vh.queues.values(), key=lambda q: q.name):
        for c in q.consumers():
            conn, ch = where.get(c, (None, None))
            out.append(consumer_view(c, conn, ch))
    return out
