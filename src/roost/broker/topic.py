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


class _Node:
    __slots__ = ("children", "destinations")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        # Destination -> how many bindings (differing in their arguments)
        # end here with it: the destination stays until the last one goes.
        self.destinations: dict[Any, int] = {}


class TopicTrie:
    """Binding patterns as a trie of words, as RabbitMQ's topic exchange
    keeps them: adding or removing a binding costs its pattern's length,
    and matching a key visits each (node, word position) pair at most once,
    so no set of patterns, however '#'-heavy, makes it worse than
    O(nodes x words)."""

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
        out: dict[Any, None] = {}
        seen: set[tuple[int, int]] = set()
        # (node, words consumed, whether the node was reached by a '#').
        stack: list[tuple[_Node, int, bool]] = [(self._root, 0, False)]
        while stack:
            node, i, is_hash = stack.pop()
            state = (id(node), i)
            if state in seen:
                continue
            seen.add(state)
            children = node.children
            if is_hash and i < n:
                stack.append((node, i + 1, True))  # '#' takes one more word
            hash_child = children.get("#")
            if hash_child is not None:
                stack.append((hash_child, i, True))  # '#' takes zero words
            if i == n:
                out.update(dict.fromkeys(node.destinations))
                continue
            word = words[i]
            child = children.get(word)
            if child is not None and word != "#":
                stack.append((child, i + 1, False))
            star = children.get("*")
            if star is not None and word != "*":
                stack.append((star, i + 1, False))
        return list(out)
