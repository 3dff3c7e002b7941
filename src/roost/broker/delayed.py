"""Delayed delivery: the ``x-delayed-message`` exchange type.

Compatible with RabbitMQ's rabbitmq-delayed-message-exchange plugin: an
exchange declared with type ``x-delayed-message`` and the argument
``x-delayed-type`` (direct, fanout, topic, headers) routes like that type,
except that a message with a positive ``x-delay`` header (milliseconds) is
held and routed only once it is due. When it is, ``x-delay`` is set to
minus the delay (as the plugin does), so the message passes through the
exchange and any exchange after it without being held again, and
consumers can still tell it was delayed.

Unlike the plugin, which keeps every held message as an Erlang term in a
Mnesia table and has trouble past a few hundred thousand of them, a held
message costs two machine words in memory: its due time and its location
in the message log, in compact arrays bucketed by second (a dict of
buckets and a heap of their keys). Its body is written to the log: a
persistent record under the exchange's own store id when the message is
persistent and the exchange durable (it then survives a crash and is
rebuilt from the record's write time plus its ``x-delay``), a paging
record otherwise. One timer is armed, for the earliest due message.
"""

from __future__ import annotations

import heapq
import logging
import math
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from roost import properties
from roost.broker import clock, errors, sender_selected
from roost.broker.errors import BrokerError, precondition
from roost.broker.exchange import EXCHANGE_TYPES, Exchange
from roost.broker.message import Message
from roost.broker.origins import DELAYED

if TYPE_CHECKING:
    from roost.broker.binding import Binding, Destination
    from roost.broker.vhost import VirtualHost

log = logging.getLogger("roost.delayed")

DELAYED_TYPE = "x-delayed-message"
DELAY_HEADER = "x-delay"
BUCKET_MS = 1000
# Messages routed per timer callback: a backlog that fell due while the
# broker was down goes out in slices, so connections keep being served.
DELIVER_BATCH = 1000
# Flag bit in a scheduled word: the record is persistent under the
# exchange's store id (settle with an ack), not a paging record.
DURABLE_RECORD = 1 << 63
REF_MASK = DURABLE_RECORD - 1
# Due times are kept as signed 64-bit milliseconds.
_MAX_DUE = 2**62


def now_ms() -> int:
    return clock.wall_ms()


def delay_of(message: Message) -> int:
    """The message's delay in ms, as the plugin reads ``x-delay``
    (``rabbit_delayed_message_utils:get_delay/1``): integers as they are,
    strings parsed as integers, floats and decimals truncated; anything
    else, or no header, is no delay (0)."""
    raw = message.properties
    if len(raw) < 2 or not raw[0] & 0x20:  # FLAG_HEADERS is 0x2000
        return 0
    value = message.headers.get(DELAY_HEADER)
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return 0
    if isinstance(value, float | Decimal):
        return int(value) if math.isfinite(value) else 0
    return 0


class DelayStore(Protocol):
    """Where a cluster node's delayed exchanges keep their held messages
    (PostgreSQL, shared by the nodes: :mod:`roost.cluster.delay_store`),
    instead of the exchange's own schedule and the message log."""

    def hold(self, exchange: DelayedExchange, message: Message, delay: int) -> int:
        """Keep ``message`` for ``delay`` ms; returns the batch that must be
        resolved before its publish is confirmed."""
        ...


class DelaySchedule:
    """(due ms, word) pairs, taken out in due order (publish order among
    equal due times), at 16 bytes a pair plus a little per second bucket.

    Pairs wait unsorted in per-second buckets; the earliest bucket becomes
    the *head*, sorted once, from which pairs are taken in order. A pair
    due within the head's second is inserted into it in place; one due
    before it sends the head back to the buckets first.
    """

    __slots__ = ("_buckets", "_head_dues", "_head_key", "_head_pos", "_head_words", "_keys", "_len")

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[array[int], array[int]]] = {}
        self._keys: list[int] = []  # heap of bucket keys
        self._head_key = -1
        self._head_dues: array[int] = array("q")
        self._head_words: array[int] = array("Q")
        self._head_pos = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, due: int, word: int) -> None:
        key = due // BUCKET_MS
        self._len += 1
        if self._head_pos < len(self._head_dues):
            if key == self._head_key:
                i = bisect_right(self._head_dues, due, self._head_pos)
                self._head_dues.insert(i, due)
                self._head_words.insert(i, word)
                return
            if key < self._head_key:
                self._unload_head()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = (array("q"), array("Q"))
            heapq.heappush(self._keys, key)
        bucket[0].append(due)
        bucket[1].append(word)

    def next_due(self) -> int | None:
        if self._head_pos >= len(self._head_dues) and not self._load_head():
            return None
        return self._head_dues[self._head_pos]

    def pop(self) -> tuple[int, int]:
        if self._head_pos >= len(self._head_dues) and not self._load_head():
            raise IndexError("pop from an empty DelaySchedule")
        i = self._head_pos
        self._head_pos = i + 1
        self._len -= 1
        return self._head_dues[i], self._head_words[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Every pair, in no particular order."""
        for i in range(self._head_pos, len(self._head_dues)):
            yield self._head_dues[i], self._head_words[i]
        for dues, words in self._buckets.values():
            yield from zip(dues, words, strict=True)

    def clear(self) -> None:
        self._buckets.clear()
        self._keys.clear()
        self._head_key = -1
        self._head_dues = array("q")
        self._head_words = array("Q")
        self._head_pos = 0
        self._len = 0

    def memory(self) -> int:
        """Bytes held by the arrays (for tests and metrics)."""
        n = (len(self._head_dues) + len(self._head_words)) * 8
        return n + sum((len(d) + len(w)) * 8 for d, w in self._buckets.values())

    def _load_head(self) -> bool:
        while self._keys:
            key = heapq.heappop(self._keys)
            dues, words = self._buckets.pop(key)
            # A stable sort: equal due times stay in publish order.
            order = sorted(range(len(dues)), key=dues.__getitem__)
            self._head_key = key
            self._head_dues = array("q", [dues[i] for i in order])
            self._head_words = array("Q", [words[i] for i in order])
            self._head_pos = 0
            if order:
                return True
        self._head_key = -1
        self._head_dues = array("q")
        self._head_words = array("Q")
        self._head_pos = 0
        return False

    def _unload_head(self) -> None:
        pos = self._head_pos
        self._buckets[self._head_key] = (self._head_dues[pos:], self._head_words[pos:])
        heapq.heappush(self._keys, self._head_key)
        self._head_key = -1
        self._head_dues = array("q")
        self._head_words = array("Q")
        self._head_pos = 0


class DelayedExchange(Exchange):
    """Routes like its ``x-delayed-type``, holding messages with a positive
    ``x-delay`` until they are due."""

    type_name = DELAYED_TYPE

    def __init__(
        self,
        name: str,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name, durable, auto_delete, internal, arguments)
        # rabbit_exchange_type_delayed_message:validate/1, texts included;
        # run only for a new exchange, as RabbitMQ validates on creation.
        kind = self.arguments.get("x-delayed-type")
        if isinstance(kind, bytes | bytearray):
            kind = bytes(kind).decode("utf-8", "replace")
        if kind == DELAYED_TYPE:
            raise precondition(
                "Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'"
            )
        if not isinstance(kind, str):
            raise precondition(
                "Invalid argument, 'x-delayed-type' must be an existing exchange type"
            )
        cls = EXCHANGE_TYPES.get(kind)
        if cls is None:
            raise BrokerError(errors.COMMAND_INVALID, f"unknown exchange type '{kind}'")
        self.delayed_type = kind
        # The routing of the underlying type, fed the same bindings.
        self._inner = cls(name, durable, auto_delete, internal, self.arguments)
        self.vhost: VirtualHost | None = None
        # Id of the exchange's persistent records in the message log (0: none).
        self.store_id = 0
        self.schedule = DelaySchedule()
        # Held messages when there is no message log: word -> message.
        self._in_memory: dict[int, Message] = {}
        self._next_token = 1
        # CC/BCC routing keys of held messages that have them, by word: a
        # message read back from the log has lost them (BCC is not even in
        # its headers). After a restart only the CC header is left to
        # re-derive keys from, so BCC keys of a message held across a
        # restart are lost.
        self._cc: dict[int, tuple[str, ...]] = {}
        self._timer: Any = None
        self._timer_due = 0

    def attach(self, vhost: VirtualHost, store_id: int) -> None:
        self.vhost = vhost
        self.store_id = store_id

    @property
    def messages_delayed(self) -> int:
        return len(self.schedule)

    # -- routing --------------------------------------------------------

    def _index(self, binding: Binding) -> None:
        self._inner.add_binding(binding)

    def _unindex(self, binding: Binding) -> None:
        self._inner.remove_binding(binding)

    def validate_binding(self, arguments: dict[str, Any]) -> None:
        self._inner.validate_binding(arguments)

    def route(self, message: Message) -> list[Destination]:
        if self.vhost is None or delay_of(message) <= 0:
            return self._inner.route(message)
        # "Routed to itself": VirtualHost.publish then calls hold(). An
        # exchange with a destination does not fall back to its alternate
        # exchange, so a held message goes nowhere now (and a mandatory
        # one comes back, as with the plugin).
        return [self]

    def hold(self, message: Message, delay: int | None = None, now: int | None = None) -> int:
        """Keep ``message`` until ``delay`` ms (default: its ``x-delay``)
        after ``now``; returns the journal batch that must be on disk before
        its publish is confirmed (0: none). A persistent message on a durable exchange gets a
        persistent record under the exchange's id (it survives a crash and
        is rebuilt from the record's write time plus its delay); any other
        a paging record, so its body need not stay in memory."""
        vhost = self.vhost
        assert vhost is not None
        if delay is None:
            delay = delay_of(message)
        if vhost.delay_store is not None:
            return vhost.delay_store.hold(self, message, max(delay, 0))
        due = min((now_ms() if now is None else now) + max(delay, 0), _MAX_DUE)
        journal = vhost.journal
        batch = 0
        if journal is None:
            word = self._next_token
            self._next_token += 1
            self._in_memory[word] = message
        elif self.store_id and message.persistent:
            word = journal.append(message, [self.store_id]) | DURABLE_RECORD
            batch = journal.barrier()
        else:
            word = journal.page_out(message)
        if message.cc:
            self._cc[word] = message.cc
        self.schedule.add(due, word)
        if self._timer is None or due < self._timer_due:
            self._arm()
        return batch

    def restore(self, refs: list[int]) -> None:
        """Rebuild the schedule from this exchange's persistent records after
        a restart: due at the record's write time plus its ``x-delay``."""
        vhost = self.vhost
        assert vhost is not None and vhost.journal is not None
        journal = vhost.journal
        for ref in refs:
            try:
                msg = journal.read(ref)
            except Exception as exc:  # a record recovery kept but cannot be read
                log.error("delayed exchange '%s': dropping unreadable record: %s", self.name, exc)
                journal.release(ref)
                continue
            self.schedule.add(msg.written_ms + max(delay_of(msg), 0), ref | DURABLE_RECORD)

    # -- timer ----------------------------------------------------------

    def start_timer(self) -> None:
        """Arm the timer once a scheduler exists (after recovery)."""
        if self._timer is None:
            self._arm()

    def _arm(self, at_once: bool = False) -> None:
        vhost = self.vhost
        sched = vhost.scheduler if vhost is not None else None
        if sched is None:
            return
        due = self.schedule.next_due()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is None:
            return
        wait = 0.0 if at_once else max(0, due - now_ms()) / 1000
        self._timer_due = due
        self._timer = sched(wait, self._fire)

    def _fire(self) -> None:
        self._timer = None
        schedule = self.schedule
        now = now_ms()
        for _ in range(DELIVER_BATCH):
            due = schedule.next_due()
            if due is None or due > now:
                break
            _, word = schedule.pop()
            self._deliver(word)
        else:
            self._arm(at_once=True)
            return
        self._arm()

    def _deliver(self, word: int) -> None:
        vhost = self.vhost
        assert vhost is not None
        journal = vhost.journal
        if journal is None:
            held = self._in_memory.pop(word)
        else:
            ref = word & REF_MASK
            try:
                held = journal.read(ref)
            except Exception as exc:
                log.error("delayed exchange '%s': dropping unreadable message: %s", self.name, exc)
                journal.release(ref)
                return
            if word & DURABLE_RECORD:
                # Written after the copies the queues make below, in the
                # same commit batch, so a crash never loses the message.
                journal.ack(self.store_id, ref)
            else:
                journal.release(ref)
        cc = self._cc.pop(word, None) if self._cc else None
        if cc is None and journal is not None and sender_selected.maybe_present(held.properties):
            # Held across a restart: the CC header is still there.
            try:
                cc = sender_selected.extract(held.properties)[1]
            except BrokerError:
                cc = None
        vhost.publish(self, released(held, cc or ()), origin=DELAYED)

    def discard(self) -> None:
        """The exchange is deleted: drop what it holds, as the plugin does
        (it routes them later through bindings that no longer exist)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        vhost = self.vhost
        journal = vhost.journal if vhost is not None else None
        if journal is not None:
            for _, word in self.schedule:
                if word & DURABLE_RECORD:
                    journal.ack(self.store_id, word & REF_MASK)
                else:
                    journal.release(word)
        self._in_memory.clear()
        self._cc.clear()
        self.schedule.clear()


def released(message: Message, cc: tuple[str, ...] = ()) -> Message:
    """A copy of a due message with ``x-delay`` set to minus its delay
    (``swap_delay_header`` in the plugin), routed as any other (with its
    CC/BCC keys ``cc``)."""
    delay = delay_of(message)
    try:
        props = properties.replace_header_int(message.properties, DELAY_HEADER, -delay)
    except properties.PropertyError:
        props = message.properties
    return Message(
        message.exchange,
        message.routing_key,
        props,
        message.body,
        message.persistent,
        message.priority,
        cc,
    )


# Registered here rather than in exchange.py: the type needs the virtual
# host (its log and timers), which the other routing objects never do.
EXCHANGE_TYPES[DELAYED_TYPE] = DelayedExchange
