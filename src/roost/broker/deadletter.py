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

from roost import properties
from roost.broker.message import Message
from roost.broker.origins import DEAD_LETTER

if TYPE_CHECKING:
    from roost.broker.queue import Queue

REJECTED = "rejected"
EXPIRED = "expired"
MAXLEN = "maxlen"
DELIVERY_LIMIT = "delivery_limit"


def routing_keys(message: Message) -> list[str]:
    """The routing key plus any CC keys (what RabbitMQ records in x-death)."""
    keys = [message.routing_key]
    if properties.FLAG_HEADERS & _flags(message.properties):
        cc = message.headers.get("CC")
        if isinstance(cc, list):
            keys += [k if isinstance(k, str) else bytes(k).decode() for k in cc]
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
    old = headers.get("x-death")
    deaths: list[Any] = list(old) if isinstance(old, list) else []
    for i, d in enumerate(deaths):
        if isinstance(d, dict) and d.get("queue") == queue.name and d.get("reason") == reason:
            death = dict(d)
            death["count"] = int(d.get("count", 0)) + 1
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
    raw = properties.encode_properties(props)
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
