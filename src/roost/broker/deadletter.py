"""Dead-lettering, as RabbitMQ's ``rabbit_dead_letter`` does it.

A dead-lettered message is republished to the queue's dead-letter exchange
with an ``x-death`` header recording why (``rejected``, ``expired``,
``maxlen``, ``delivery_limit``), from which queue, exchange and routing
keys, and how often; ``x-first-death-*`` are set once and
``x-last-death-*`` every time (as RabbitMQ 3.13+ writes them). A message
that would go round a cycle of queues with no explicit rejection in it is
dropped, as RabbitMQ drops it.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from pamqp import encode

from roost import properties
from roost.amqp.wire import FRAME_MIN_SIZE
from roost.broker.message import Message
from roost.broker.origins import DEAD_LETTER

if TYPE_CHECKING:
    from roost.broker.queue import Queue

REJECTED = "rejected"
EXPIRED = "expired"
MAXLEN = "maxlen"
DELIVERY_LIMIT = "delivery_limit"

# x-death is the client's to write as well: at most this many entries are
# carried over (the newest; RabbitMQ keeps one per queue and reason, so a
# real message rarely has more than a few)...
MAX_DEATHS = 32
# ...and dropped oldest first while the properties would not fit a content
# header frame at the smallest frame_max (FRAME_MIN_SIZE, less the frame's
# 8 bytes and the header's 12), unless the message's own properties were
# already larger: dead-lettering never makes a message undeliverable to a
# consumer that negotiated a small frame_max.
PROPERTIES_BUDGET = FRAME_MIN_SIZE - 8 - 12


def routing_keys(message: Message) -> list[str]:
    """The routing key plus any CC keys (what RabbitMQ records in x-death)."""
    keys = [message.routing_key]
    if properties.FLAG_HEADERS & _flags(message.properties):
        cc = message.headers.get("CC")
        if isinstance(cc, list):
            # Only strings, as routing takes them (sender_selected): any
            # other element (an integer is not a length to allocate) is
            # ignored, as by RabbitMQ's header_routes.
            keys += [k for k in cc if isinstance(k, str)]
    return keys


def _flags(raw: bytes) -> int:
    return (raw[0] << 8) | raw[1] if len(raw) >= 2 else 0


def dead_letter(queue: Queue, message: Message, reason: str) -> None:
    """Republish ``message`` from ``queue`` to the queue's dead-letter exchange."""
    opts = queue.options
    vhost = queue.vhost
    # Counted as RabbitMQ's rabbitmq_global_messages_dead_lettered_*_total:
    # strategy "disabled" when the queue has no dead-letter exchange.
    counter = (reason, "disabled" if opts.dead_letter_exchange is None else "at_most_once")
    vhost.dead_lettered_by[counter] = vhost.dead_lettered_by.get(counter, 0) + 1
    if opts.dead_letter_exchange is None:
        return
    dlx = vhost.exchanges.get(opts.dead_letter_exchange)
    if dlx is None:
        return  # as RabbitMQ: a missing DLX drops the message
    keys = routing_keys(message)
    dlrk = opts.dead_letter_routing_key
    new = _dead_lettered(message, queue, reason, keys, dlx.name, dlrk)
    exclude = None
    if reason != REJECTED:
        deaths = new.headers.get("x-death")
        if isinstance(deaths, list):

            def exclude(q: Queue) -> bool:
                return _is_cycle(q.name, deaths)

    vhost.publish(dlx, new, origin=DEAD_LETTER, exclude=exclude)


def _is_cycle(queue_name: str, deaths: list[Any]) -> bool:
    # rabbit_dead_letter:is_cycle/2: the queue appears in the deaths, and no
    # death from the newest back to that one was an explicit rejection.
    for d in deaths:
        if not isinstance(d, dict):
            return False
        if d.get("reason") == REJECTED:
            return False
        if d.get("queue") == queue_name:
            return True
    return False


def _dead_lettered(
    message: Message,
    queue: Queue,
    reason: str,
    keys: list[str],
    dlx: str,
    dlrk: str | None,
) -> Message:
    props = properties.decode_properties(message.properties)
    headers: dict[str, Any] = dict(props.headers or {})
    death: dict[str, Any] = {
        "count": 1,
        "reason": reason,
        "queue": queue.name,
        "time": datetime.datetime.now(datetime.UTC).replace(microsecond=0),
        "exchange": message.exchange,
        "routing-keys": keys,
    }
    if reason == EXPIRED and props.expiration:
        death["original-expiration"] = props.expiration
        props.expiration = None
    deaths = _well_formed_deaths(headers.get("x-death"))
    for i, d in enumerate(deaths):
        if d.get("queue") == queue.name and d.get("reason") == reason:
            count = d.get("count")
            death = dict(d)
            death["count"] = (count if isinstance(count, int) and _is_count(count) else 0) + 1
            death["time"] = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            del deaths[i]
            break
    deaths.insert(0, death)
    headers["x-death"] = deaths
    # The queue adds x-delivery-count per delivery; RabbitMQ dead-letters
    # the message without it.
    headers.pop("x-delivery-count", None)
    headers.setdefault("x-first-death-reason", reason)
    headers.setdefault("x-first-death-queue", queue.name)
    headers.setdefault("x-first-death-exchange", message.exchange)
    headers["x-last-death-reason"] = reason
    headers["x-last-death-queue"] = queue.name
    headers["x-last-death-exchange"] = message.exchange
    props.headers = headers
    raw = _fitted(props, deaths, max(PROPERTIES_BUDGET, len(message.properties)))
    # Routed with the routing key and the CC keys, or with the dead-letter
    # routing key alone (rabbit_dead_letter's routing keys).
    return Message(
        dlx,
        dlrk if dlrk else keys[0],
        raw,
        message.body,
        message.persistent,
        message.priority,
        () if dlrk else tuple(keys[1:]),
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _well_formed_deaths(value: object) -> list[dict[str, Any]]:
    """The newest MAX_DEATHS entries of a client-supplied ``x-death`` that
    are tables naming a queue and a reason; the rest are dropped (the
    header is the client's to write, and nothing here may cost in
    proportion to it)."""
    if not isinstance(value, list):
        return []
    deaths: list[dict[str, Any]] = []
    for d in value[:MAX_DEATHS]:
        if (
            isinstance(d, dict)
            and isinstance(d.get("queue"), str)
            and isinstance(d.get("reason"), str)
        ):
            deaths.append(d)
    return deaths


def _fitted(props: Any, deaths: list[dict[str, Any]], budget: int) -> bytes:
    """``props`` encoded, dropping the oldest x-death entries (never the
    newest) while they are larger than ``budget``: each entry's size is
    measured once, so this costs one pass over them."""
    raw = properties.encode_properties(props)
    excess = len(raw) - budget
    if excess <= 0 or len(deaths) <= 1:
        return raw
    keep = len(deaths)
    while keep > 1 and excess > 0:
        keep -= 1
        # A field-array element: its type byte and the encoded table.
        excess -= 1 + len(encode.field_table(deaths[keep]))
    props.headers["x-death"] = deaths[:keep]
    return properties.encode_properties(props)
