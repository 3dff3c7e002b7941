"""Exchange types: small routing objects from a routing key to destinations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from roost.broker import fields, topic
from roost.broker.binding import Binding
from roost.broker.errors import precondition

if TYPE_CHECKING:
    from roost.broker.binding import Destination
    from roost.broker.dedup import Deduplicator
    from roost.broker.message import Message

_ROUTE_CACHE_LIMIT = 10_000


class Exchange:
    kind: ClassVar[str] = "exchange"
    type_name: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.internal = internal
        self.arguments: dict[str, Any] = dict(arguments or {})
        ae = self.arguments.get("alternate-exchange")
        self.alternate_exchange: str | None = ae if isinstance(ae, str) and ae else None
        # Bindings where this exchange is the source, by identity.
        self.bindings: dict[tuple[str, str, str, str], Binding] = {}
        # Bindings where this exchange is the destination (exchange-to-exchange).
        self.inbound: set[Binding] = set()
        # x-message-deduplication (set by the vhost from the arguments).
        self.deduper: Deduplicator | None = None
        # Messages published to it by clients (stats.py: publish_in).
        self.published = 0

    @property
    def destination_key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    def add_binding(self, binding: Binding) -> bool:
        if binding.key in self.bindings:
            return False
        self.bindings[binding.key] = binding
        self._index(binding)
        return True

    def remove_binding(self, binding: Binding) -> None:
        if self.bindings.pop(binding.key, None) is not None:
            self._unindex(binding)

    def route(self, message: Message) -> list[Destination]:
        raise NotImplementedError

    def validate_binding(self, arguments: dict[str, Any]) -> None:
        """Raise a BrokerError when a binding's arguments make no sense for
        this type (RabbitMQ's ``validate_binding`` callback)."""

    def _index(self, binding: Binding) -> None:
        pass

    def _unindex(self, binding: Binding) -> None:
        pass


class _Refcounts:
    """Destinations with how many bindings lead to each, and the list the
    exchange routes to, rebuilt only when it is asked for after a change:
    binding and unbinding cost O(1) however many bindings there are."""

    __slots__ = ("_counts", "_list")

    def __init__(self) -> None:
        self._counts: dict[Destination, int] = {}
        self._list: list[Destination] | None = []

    def __bool__(self) -> bool:
        return bool(self._counts)

    def add(self, destination: Destination) -> None:
        self._counts[destination] = self._counts.get(destination, 0) + 1
        self._list = None

    def remove(self, destination: Destination) -> None:
        count = self._counts.get(destination)
        if count is None:
            return
        if count > 1:
            self._counts[destination] = count - 1
        else:
            del self._counts[destination]
            self._list = None

    def destinations(self) -> list[Destination]:
        if self._list is None:
            self._list = list(self._counts)
        return self._list


class DirectExchange(Exchange):
    type_name = "direct"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._by_key: dict[str, _Refcounts] = {}

    def _index(self, binding: Binding) -> None:
        dests = self._by_key.get(binding.routing_key)
        if dests is None:
            dests = self._by_key[binding.routing_key] = _Refcounts()
        dests.add(binding.destination)

    def _unindex(self, binding: Binding) -> None:
        dests = self._by_key.get(binding.routing_key)
        if dests is not None:
            dests.remove(binding.destination)
            if not dests:
                del self._by_key[binding.routing_key]

    def route(self, message: Message) -> list[Destination]:
        dests = self._by_key.get(message.routing_key)
        return dests.destinations() if dests is not None else []


class FanoutExchange(Exchange):
    type_name = "fanout"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dests = _Refcounts()

    def _index(self, binding: Binding) -> None:
        self._dests.add(binding.destination)

    def _unindex(self, binding: Binding) -> None:
        self._dests.remove(binding.destination)

    def route(self, message: Message) -> list[Destination]:
        return self._dests.destinations()


class TopicExchange(Exchange):
    type_name = "topic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trie = topic.TopicTrie()
        self._cache: dict[str, list[Destination]] = {}

    def _index(self, binding: Binding) -> None:
        self._trie.add(binding.routing_key, binding.destination)
        self._cache.clear()

    def _unindex(self, binding: Binding) -> None:
        self._trie.remove(binding.routing_key, binding.destination)
        self._cache.clear()

    def route(self, message: Message) -> list[Destination]:
        key = message.routing_key
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out: list[Destination] = self._trie.match(key)
        if len(self._cache) >= _ROUTE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = out
        return out


def _headers_match(binding_args: dict[str, Any], headers: dict[str, Any]) -> bool:
    mode = binding_args.get("x-match", "all")
    if isinstance(mode, bytes):
        mode = mode.decode("utf-8", "replace")
    with_x = mode in ("all-with-x", "any-with-x")
    want_all = mode in ("all", "all-with-x")
    for k, v in binding_args.items():
        if k == "x-match" or (not with_x and k.startswith("x-")):
            continue
        # A void binding value asks only for the header's presence.
        hit = k in headers and (v is None or fields.headers_equal(v, headers[k]))
        if want_all and not hit:
            return False
        if not want_all and hit:
            return True
    # "all" with nothing to compare matches everything; "any" matches nothing.
    return want_all


_X_MATCH_MODES = ("all", "any", "all-with-x", "any-with-x")


class HeadersExchange(Exchange):
    type_name = "headers"

    def validate_binding(self, arguments: dict[str, Any]) -> None:
        # rabbit_exchange_type_headers:validate_binding/2, texts included.
        if "x-match" not in arguments:
            return
        mode = arguments["x-match"]
        if not isinstance(mode, str):
            raise precondition(
                f"Invalid x-match field type {fields.type_name(mode)} "
                f"(value {fields.plain(mode)[1:-1]}); expected longstr"
            )
        if mode not in _X_MATCH_MODES:
            raise precondition(
                f'Invalid x-match field value <<"{mode}">>; '
                "expected all, any, all-with-x, or any-with-x"
            )

    def route(self, message: Message) -> list[Destination]:
        headers = message.headers
        out: dict[Destination, None] = {}
        for b in self.bindings.values():
            if b.destination not in out and _headers_match(b.arguments, headers):
                out[b.destination] = None
        return list(out)


EXCHANGE_TYPES: dict[str, type[Exchange]] = {
    cls.type_name: cls for cls in (DirectExchange, FanoutExchange, TopicExchange, HeadersExchange)
}
