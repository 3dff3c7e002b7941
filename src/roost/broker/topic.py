"""Topic pattern matching with RabbitMQ's rules.

Words are separated by dots; ``*`` matches exactly one word and ``#`` zero or
more. As in RabbitMQ (``rabbit_exchange_type_topic:split_topic_key``) the
empty key is zero words, so ``#`` matches it and ``*`` does not, while
``"a."`` is two words, the second one empty.
"""

from __future__ import annotations

from functools import lru_cache


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
