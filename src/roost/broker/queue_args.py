"""Queue arguments: validated as RabbitMQ validates them, turned into options.

Texts follow RabbitMQ 3.10 (``rabbit_amqqueue:declare_args`` and friends),
e.g. ``invalid arg 'x-message-ttl' for queue 'q' in vhost '/':
{value_negative,-5}``. roost's own arguments (``x-retry-*``,
``x-deduplication-*``) are documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from roost.broker import fields
from roost.broker.errors import BrokerError, precondition

OVERFLOWS = ("drop-head", "reject-publish", "reject-publish-dlx")
QUEUE_TYPES = ("classic", "quorum", "stream")
QUEUE_MODES = ("default", "lazy")
BACKOFFS = ("fixed", "exponential")
QUORUM_DELIVERY_LIMIT = 20  # RabbitMQ 4's default for quorum queues


@dataclass(slots=True)
class QueueOptions:
    queue_type: str = "classic"
    max_priority: int = 0
    message_ttl: int | None = None
    expires: int | None = None
    max_length: int | None = None
    max_length_bytes: int | None = None
    overflow: str = "drop-head"
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    single_active_consumer: bool = False
    consumer_timeout: int | None = None
    retry_delay: int | None = None
    retry_backoff: str = "fixed"
    retry_max_delay: int | None = None
    dedup: bool = False
    dedup_cache_size: int | None = None
    dedup_cache_ttl: int | None = None
    dedup_header: str | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    def __init__(self, queue: str, vhost: str, args: dict[str, Any]) -> None:
        self.queue = queue
        self.vhost = vhost
        self.args = args

    def fail(self, key: str, detail: str) -> BrokerError:
        return precondition(
            f"invalid arg '{key}' for queue '{self.queue}' in vhost '{self.vhost}': {detail}"
        )

    def integer(self, key: str, *, positive: bool = False, limit: int | None = None) -> int | None:
        v = self.args.get(key)
        if v is None:
            return None
        if not _is_int(v):
            raise self.fail(key, f'"expected integer, got {fields.type_name(v)}"')
        if v < 0:
            raise self.fail(key, f"{{value_negative,{v}}}")
        if positive and v == 0:
            raise self.fail(key, "{value_zero,0}")
        if limit is not None and v > limit:
            raise self.fail(key, f"{{max_value_exceeded,{v}}}")
        return int(v)

    def string(self, key: str) -> str | None:
        v = self.args.get(key)
        if v is None:
            return None
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if not isinstance(v, str):
            raise precondition(
                f"invalid type '{fields.type_name(v)}' for arg '{key}' in queue "
                f"'{self.queue}' in vhost '{self.vhost}'"
            )
        return v

    def text(self, key: str) -> str | None:
        """A string argument checked inside ``declare_args`` (RabbitMQ reports
        a wrong type there as ``{unacceptable_type,T}``)."""
        v = self.args.get(key)
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        raise self.fail(key, f"{{unacceptable_type,{fields.type_name(v)}}}")

    def choice(self, key: str, allowed: tuple[str, ...], detail: str) -> str | None:
        v = self.text(key)
        if v is not None and v not in allowed:
            raise self.fail(key, detail.format(v))
        return v

    def boolean(self, key: str) -> bool | None:
        v = self.args.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self.fail(key, f"{{unacceptable_type,{fields.type_name(v)}}}")
        return v


def parse_queue_args(
    queue: str, vhost: str, args: dict[str, Any], *, durable: bool, exclusive: bool
) -> QueueOptions:
    """Validate ``args`` for a new queue; raises BrokerError (406) as RabbitMQ does."""
    c = _Checker(queue, vhost, args)
    o = QueueOptions()
    # RabbitMQ's order: rabbit_channel reads the DLX name and the queue type
    # first, then rabbit_amqqueue:declare_args/0 checks the rest in its
    # fixed order, then the queue type checks the durable/exclusive flags.
    o.dead_letter_exchange = c.string("x-dead-letter-exchange")
    qtype = c.choice("x-queue-type", QUEUE_TYPES, "\"unsupported queue type '{}'\"")
    o.queue_type = qtype or "classic"
    o.expires = c.integer("x-expires", positive=True)
    o.message_ttl = c.integer("x-message-ttl")
    o.dead_letter_routing_key = c.text("x-dead-letter-routing-key")
    if o.dead_letter_routing_key is not None and o.dead_letter_exchange is None:
        raise c.fail("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined")
    o.max_length = c.integer("x-max-length")
    o.max_length_bytes = c.integer("x-max-length-bytes")
    o.max_priority = c.integer("x-max-priority", limit=255) or 0
    o.overflow = c.choice("x-overflow", OVERFLOWS, "invalid_overflow") or "drop-head"
    c.choice("x-queue-mode", QUEUE_MODES, "\"unsupported queue mode '{}'\"")
    version = c.integer("x-queue-version")
    if version is not None and version not in (1, 2):
        raise c.fail("x-queue-version", f"\"unsupported queue version '{version}'\"")
    o.single_active_consumer = bool(c.boolean("x-single-active-consumer"))
    if o.queue_type != "classic" and (not durable or exclusive):
        raise precondition(
            f"invalid property '{'exclusive-owner' if exclusive else 'non-durable'}' for queue "
            f"'{queue}' in vhost '{vhost}'"
        )
    if o.queue_type == "stream":
        raise precondition(
            f"invalid arg 'x-queue-type' for queue '{queue}' in vhost '{vhost}': "
            '"stream queues are not supported by roost"'
        )
    o.consumer_timeout = c.integer("x-consumer-timeout", positive=True)
    limit = args.get("x-delivery-limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 0:
        o.delivery_limit = None  # negative: unlimited, as quorum queues treat it
    else:
        o.delivery_limit = c.integer("x-delivery-limit")
    if o.queue_type == "quorum" and "x-delivery-limit" not in args:
        o.delivery_limit = QUORUM_DELIVERY_LIMIT
    o.retry_delay = c.integer("x-retry-delay")
    o.retry_backoff = (
        c.choice("x-retry-backoff", BACKOFFS, '"expected fixed or exponential"') or "fixed"
    )
    o.retry_max_delay = c.integer("x-retry-max-delay")
    o.dedup = bool(c.boolean("x-message-deduplication"))
    o.dedup_cache_size = c.integer("x-cache-size", positive=True)
    o.dedup_cache_ttl = c.integer("x-cache-ttl", positive=True)
    o.dedup_header = c.string("x-deduplication-header")
    return o


def parse_expiration(value: str) -> int:
    """A message's ``expiration`` property in ms; raises 406 as RabbitMQ does."""
    # Erlang's string:to_integer/1: an optional sign, then ASCII digits.
    text = value
    digits = ""
    for ch in text:
        if ch in "0123456789" or (ch in "+-" and not digits):
            digits += ch
        else:
            break
    if not digits or digits in "+-":
        raise precondition(f"invalid expiration '{value}': no_integer")
    if len(digits) < len(text):
        raise precondition(
            f"invalid expiration '{value}': {{leftover_string,\"{text[len(digits) :]}\"}}"
        )
    n = int(digits)
    if n < 0:
        raise precondition(f"invalid expiration '{value}': {{value_negative,{n}}}")
    return n
