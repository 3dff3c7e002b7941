"""Message deduplication on publish, as LavinMQ and the
``rabbitmq-message-deduplication`` plugin offer it.

A queue or exchange declared with ``x-message-deduplication: true`` keeps a
cache of the deduplication keys it has seen. A message's key is the value of
the header named by ``x-deduplication-header`` (default: the header
``x-deduplication-header`` itself) or, when the message has no such header,
its ``message-id`` property; a message with neither is never a duplicate.

A message whose key is in the cache is dropped: an exchange routes it
nowhere, a queue does not take it. A confirming publisher still gets
``basic.ack`` for it (LavinMQ does the same; the plugin acks exchange-level
duplicates too, but nacks queue-level ones): a publisher that resends after a
lost confirm must not be told its message failed.

The cache holds at most ``x-cache-size`` keys (default 128, LavinMQ's; the
oldest goes first) and, with ``x-cache-ttl``, forgets a key that many ms
after it was added. A message's own ``x-cache-ttl`` header overrides that
TTL for its key. The cache of a durable queue or exchange survives a
restart when the broker has a data directory (see
:mod:`roost.store.dedup_state`); any other cache lives in memory only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

from roost import properties
from roost.broker import clock, fields
from roost.broker.errors import BrokerError, precondition

if TYPE_CHECKING:
    from roost.broker.message import Message
    from roost.broker.queue_args import QueueOptions

DEFAULT_HEADER = "x-deduplication-header"
DEFAULT_CACHE_SIZE = 128
TTL_HEADER = "x-cache-ttl"


def _now_ms() -> float:
    return clock.monotonic_ms()


class DedupCache:
    """Keys seen recently: bounded in number, optionally expiring."""

    __slots__ = ("_store", "size", "ttl")

    def __init__(self, size: int = DEFAULT_CACHE_SIZE, ttl: int | None = None) -> None:
        self.size = size
        self.ttl = ttl  # ms; None: keys stay until evicted
        # key -> expiry (monotonic ms, 0: never), oldest insertion first.
        self._store: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        expires = self._store.get(key)
        if expires is None:
            return False
        if expires and expires <= _now_ms():
            del self._store[key]
            return False
        return True

    def add(self, key: Hashable, ttl: int | None = None) -> None:
        store = self._store
        now = _now_ms()
        # Expired keys at the old end go first, so a TTL bounds memory too.
        while store:
            oldest, expires = next(iter(store.items()))
            if not expires or expires > now:
                break
            del store[oldest]
        store.pop(key, None)
        while len(store) >= self.size:
            store.popitem(last=False)
        ttl = self.ttl if ttl is None else ttl
        store[key] = now + ttl if ttl else 0.0

    def discard(self, key: Hashable) -> None:
        self._store.pop(key, None)

    def items(self) -> list[tuple[Hashable, float]]:
        """(key, expiry in monotonic ms or 0), oldest first."""
        return list(self._store.items())

    def load(self, items: list[tuple[Hashable, float]]) -> None:
        """Put back what :meth:`items` gave (after a restart), oldest first."""
        now = _now_ms()
        for key, expires in items:
            if not expires or expires > now:
                self._store.pop(key, None)
                self._store[key] = expires
        while len(self._store) > self.size:
            self._store.popitem(last=False)


class SharedKey(NamedTuple):
    """A deduplication key that PostgreSQL decides on (cluster mode): the
    rows of the publish that carries it are written only if the key was
    new to the cache ``scope`` in the same transaction."""

    scope: str
    key: str
    ttl_ms: int | None  # None: kept until evicted
    size: int
    queue_id: int | None = None  # a queue's cache goes with its row

    @property
    def token(self) -> str:
        return f"k{self.scope}\x1f{self.key}"


# Longer keys are stored as their digest (an index entry has a size limit).
_KEY_MAX = 200


class Deduplicator:
    """The deduplication state of one queue or exchange.

    In cluster mode (:meth:`share`) the cache is PostgreSQL's, shared by
    every node: :meth:`check_and_add` never finds a duplicate here; an
    exchange's key goes with the message (``Message.requires``) and a
    queue's backing queue asks :meth:`shared_key` for the queue's."""

    __slots__ = ("cache", "duplicates", "header", "on_change", "queue_id", "scope")

    def __init__(
        self, size: int | None = None, ttl: int | None = None, header: str | None = None
    ) -> None:
        self.cache = DedupCache(size or DEFAULT_CACHE_SIZE, ttl)
        self.header = header or DEFAULT_HEADER
        self.duplicates = 0  # messages dropped as duplicates
        # Called after a key is added or dropped (persistence of durable caches).
        self.on_change: Callable[[], None] | None = None
        self.scope: str | None = None  # shared: the cache's name in PostgreSQL
        self.queue_id: int | None = None

    def share(self, scope: str, queue_id: int | None = None) -> None:
        """Cluster mode: keys are decided in PostgreSQL under ``scope``
        (a queue's ``queue_id`` also names the queue the keys go with)."""
        self.scope = scope
        self.queue_id = queue_id
        self.cache = DedupCache(self.cache.size, self.cache.ttl)

    def shared_key(self, message: Message) -> SharedKey | None:
        """The key ``message`` must find new in the shared cache (None: it
        has none, or the cache is not shared)."""
        if self.scope is None:
            return None
        key = self.key_of(message)
        if key is None:
            return None
        # repr tells 1 from "1" from b"1", as the local cache does.
        text = repr(key)
        if len(text) > _KEY_MAX:
            text = "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
        ttl = message.headers.get(TTL_HEADER)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            ttl = self.cache.ttl
        return SharedKey(self.scope, text, ttl, self.cache.size, self.queue_id)

    @classmethod
    def for_queue(cls, options: QueueOptions) -> Deduplicator | None:
        if not options.dedup:
            return None
        return cls(options.dedup_cache_size, options.dedup_cache_ttl, options.dedup_header)

    def key_of(self, message: Message) -> Hashable | None:
        raw = message.properties
        flags = (raw[0] << 8) | raw[1] if len(raw) >= 2 else 0
        if flags & properties.FLAG_HEADERS:
            value = message.headers.get(self.header)
            if value is not None:
                return _hashable(value)
        if flags & properties.FLAG_MESSAGE_ID:
            return properties.message_id_of(raw)
        return None

    def check_and_add(self, message: Message) -> bool:
        """True when ``message`` is a duplicate; otherwise remember its key."""
        if self.scope is not None:
            # PostgreSQL decides when the rows are written: an exchange's
            # key goes with the message to every row (and held message) of
            # this publish; a queue's is added by its backing queue.
            if self.queue_id is None:
                shared = self.shared_key(message)
                if shared is not None:
                    message.requires = (*message.requires, shared)
            return False
        key = self.key_of(message)
        if key is None:
            return False
        if key in self.cache:
            self.duplicates += 1
            return True
        ttl = message.headers.get(TTL_HEADER)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            ttl = None
        self.cache.add(key, ttl)
        if self.on_change is not None:
            self.on_change()
        return False

    def forget(self, message: Message) -> None:
        """``message`` was not taken after all (a queue refused it): a resend
        must not count as its duplicate."""
        if self.scope is not None:
            return  # (shared: a refused message's row, key included, is never written)
        key = self.key_of(message)
        if key is not None:
            self.cache.discard(key)
            if self.on_change is not None:
                self.on_change()


# Persistence hook: (vhost, "q" or "x", name, deduper or None when deleted).
DedupHook = Callable[[str, str, str, Deduplicator | None], None]


def _hashable(value: Any) -> Hashable:
    if isinstance(value, list | dict | bytearray):
        return repr(value)
    return value  # type: ignore[no-any-return]


def exchange_deduplicator(name: str, vhost: str, args: dict[str, Any]) -> Deduplicator | None:
    """The deduplicator an exchange's arguments ask for, validated as queue
    arguments are (406 on a wrong type or value)."""
    enabled = args.get("x-message-deduplication")
    if enabled is None:
        return None

    def fail(key: str, detail: str) -> BrokerError:
        return precondition(
            f"invalid arg '{key}' for exchange '{name}' in vhost '{vhost}': {detail}"
        )

    if not isinstance(enabled, bool):
        raise fail("x-message-deduplication", f"{{unacceptable_type,{fields.type_name(enabled)}}}")
    numbers: dict[str, int | None] = {}
    for key in ("x-cache-size", TTL_HEADER):
        v = args.get(key)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool):
                raise fail(key, f'"expected integer, got {fields.type_name(v)}"')
            if v < 0:
                raise fail(key, f"{{value_negative,{v}}}")
            if v == 0:
                raise fail(key, "{value_zero,0}")
        numbers[key] = v
    header = args.get("x-deduplication-header")
    if isinstance(header, bytes):
        header = header.decode("utf-8", "replace")
    if header is not None and not isinstance(header, str):
        raise fail("x-deduplication-header", f'"expected string, got {fields.type_name(header)}"')
    if not enabled:
        return None
    return Deduplicator(numbers["x-cache-size"], numbers[TTL_HEADER], header)
