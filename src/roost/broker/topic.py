"""Topic pattern matching with RabbitMQ's rules.

Words are separated by dots; ``*`` matches exactly one word and ``#`` zero or
more. As in RabbitMQ (``rabbit_exchange_type_topic:split_topic_key``) the
empty key is zero words, so ``#`` matches it and ``*`` does not, while
``"a."`` is two words, the second one empty.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def split(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> tuple[str, ...]:
    # Consecutive '#' words match the same as one, and collapsing them keeps
    # the matcher from going exponential on keys like "#.#.#.#".
    out: list[str] = []
    for w in split(pattern):
        if w == "#" and out and out[-1] == "#":
            continue
        out.append(w)
    return tuple(out)


def matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """Whether the compiled ``pattern`` matches the routing key ``words``."""
    np, nw = len(pattern), len(words)
    # Iterative matcher with backtracking to the last '#' (like glob '*').
    pi = wi = 0
    star_p = -1
    star_w = 0
    while wi < nw:
        if pi < np:
            p = pattern[pi]
            if p == "#":
                star_p = pi
                star_w = wi
                pi += 1
                continue
            if p == "*" or p == words[wi]:
                pi += 1
                wi += 1
                continue
        if star_p >= 0:
            pi = star_p + 1
            star_w += 1
            wi = star_w
            continue
        return False
    while pi < np and pattern[pi] == "#":
        pi += 1
    return pi == np


WILDCARDS = frozenset({"*", "#"})


class _Node:
    __slots__ = ("children", "destinations")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        # Destination -> how many bindings (differing in their arguments)
        # end here with it: the destination stays until the last one goes.
        self.destinations: dict[Any, int] = {}


class TopicTrie:
    """Binding patterns as a trie of words, as RabbitMQ's topic exchange
    keeps them: adding or removing a binding costs its pattern's length.

    Matching walks the trie once, carrying for each node the set of word
    positions at which the key's prefix can stand there, as a bitmask
    (bit i: i words consumed). A '#' node's set is every position from its
    parent's lowest on, a '*' or literal word shifts it by one. Each node is
    visited at most once per key and literal children only when the key
    has that word, so no set of patterns, however '#'-heavy, makes a match
    cost more than the trie's size: no backtracking to blow up."""

    def __init__(self) -> None:
        self._root = _Node()

    def add(self, pattern: str, destination: Any) -> None:
        node = self._root
        for word in compile_pattern(pattern):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _Node()
            node = child
        node.destinations[destination] = node.destinations.get(destination, 0) + 1

    def remove(self, pattern: str, destination: Any) -> None:
        path = [self._root]
        words = compile_pattern(pattern)
        for word in words:
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        node = path[-1]
        count = node.destinations.get(destination)
        if count is None:
            return
        if count > 1:
            node.destinations[destination] = count - 1
            return
        del node.destinations[destination]
        # Prune the branch back to the last node still in use, so a trie
        # that saw many short-lived patterns does not keep their nodes.
        for depth in range(len(words), 0, -1):
            node = path[depth]
            if node.children or node.destinations:
                break
            del path[depth - 1].children[words[depth - 1]]

    def match(self, key: str) -> list[Any]:
        """The destinations of every pattern matching ``key``, each once."""
        words = split(key)
        n = len(words)
        full = (1 << (n + 1)) - 1
        accept = 1 << n
        at: dict[str, int] = {}
        for i, word in enumerate(words):
            if word not in WILDCARDS:
                at[word] = at.get(word, 0) | (1 << i)
        out: dict[Any, None] = {}
        stack: list[tuple[_Node, int]] = [(self._root, 1)]
        while stack:
            node, reached = stack.pop()
            if reached & accept and node.destinations:
                out.update(dict.fromkeys(node.destinations))
            children = node.children
            if not children:
                continue
            child = children.get("#")
            if child is not None:
                lowest = reached & -reached
                stack.append((child, full ^ (lowest - 1)))
            child = children.get("*")
            if child is not None:
                shifted = (reached << 1) & full
                if shifted:
                    stack.append((child, shifted))
            # Literal words: look up whichever side is smaller.
            if len(children) <= len(at):
                for word, child in children.items():
                    positions = at.get(word)
                    if positions is not None and reached & positions:
                        stack.append((child, (reached & positions) << 1))
            else:
                for word, positions in at.items():
                    child = children.get(word)
                    if child is not None and reached & positions:
                        stack.append((child, (reached & positions) << 1))
        return list(out)
