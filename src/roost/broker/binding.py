"""Bindings: an edge from an exchange to a queue or another exchange."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from roost.broker.exchange import Exchange
    from roost.broker.queue import Queue

    Destination: TypeAlias = Queue | Exchange


def args_key(arguments: dict[str, Any] | None) -> str:
    """A hashable identity for a binding's arguments table."""
    if not arguments:
        return ""
    return repr(sorted((k, repr(v)) for k, v in arguments.items()))


class Binding:
    __slots__ = ("arguments", "destination", "key", "routing_key", "source")

    def __init__(
        self,
        source: Exchange,
        destination: Destination,
        routing_key: str,
        arguments: dict[str, Any] | None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.routing_key = routing_key
        self.arguments: dict[str, Any] = dict(arguments or {})
        self.key = (destination.kind, destination.name, routing_key, args_key(arguments))
