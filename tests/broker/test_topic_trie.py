"""The topic exchange's trie (roost.broker.topic.TopicTrie) against the
reference matcher: for any set of bound patterns and any key, the trie
returns exactly the destinations whose pattern matches, each once, also
after bindings are removed again."""

from __future__ import annotations

import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.broker.topic import TopicTrie, compile_pattern, matches, split

_PATTERN_WORDS = st.sampled_from(["a", "b", "", "*", "#", "#"])
_KEY_WORDS = st.sampled_from(["a", "b", "", "*", "#"])
_PATTERNS = st.lists(_PATTERN_WORDS, max_size=7).map(".".join)
_KEYS = st.lists(_KEY_WORDS, max_size=8).map(".".join)


def expected(bound: list[tuple[str, int]], key: str) -> set[int]:
    words = split(key)
    return {dest for pattern, dest in bound if matches(compile_pattern(pattern), words)}


def matched(trie: TopicTrie, key: str) -> list[int]:
    out = trie.match(key)
    assert len(out) == len(set(out)), f"a destination came back twice: {out}"
    return out


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_PATTERNS, st.integers(0, 4)), max_size=12),
    st.lists(_KEYS, min_size=1, max_size=6),
    st.data(),
)
def test_trie_agrees_with_reference_matcher(
    bound: list[tuple[str, int]], keys: list[str], data: st.DataObject
) -> None:
    trie = TopicTrie()
    for pattern, dest in bound:
        trie.add(pattern, dest)
    for key in keys:
        assert set(matched(trie, key)) == expected(bound, key), key
    # Remove some bindings (one of each duplicate at a time, as unbinding
    # one of two bindings that differ only in their arguments does).
    removed = data.draw(st.lists(st.sampled_from(bound), unique=True) if bound else st.just([]))
    remaining = list(bound)
    for pattern, dest in removed:
        trie.remove(pattern, dest)
        remaining.remove((pattern, dest))
    for key in keys:
        assert set(matched(trie, key)) == expected(remaining, key), key


def test_removing_every_binding_leaves_an_empty_trie() -> None:
    rng = random.Random(7)
    trie = TopicTrie()
    bound = [
        (".".join(rng.choice(["a", "b", "*", "#"]) for _ in range(rng.randint(0, 6))), d)
        for d in range(300)
    ]
    for pattern, dest in bound:
        trie.add(pattern, dest)
    rng.shuffle(bound)
    for pattern, dest in bound:
        trie.remove(pattern, dest)
    assert trie.match("a.b.a") == []
    # Pruned back to the root: nothing kept for patterns that are gone.
    assert not trie._root.children and not trie._root.destinations


def test_removing_an_unknown_binding_is_a_no_op() -> None:
    trie = TopicTrie()
    trie.add("a.*", "q")
    trie.remove("a.#", "q")
    trie.remove("a.*", "other")
    trie.remove("b", "q")
    assert trie.match("a.b") == ["q"]


def test_hash_heavy_patterns_match_in_bounded_time() -> None:
    # Patterns that make a backtracking matcher retry '#' at every word
    # (and a naive trie walk revisit states): 1,500 of them against
    # 120-word keys that almost match. Generous bound: an order of
    # magnitude above what the trie takes on a slow machine.
    trie = TopicTrie()
    rng = random.Random(3)
    for i in range(1500):
        words = [rng.choice(["#", "a", "*", "#"]) for _ in range(40)]
        trie.add(".".join([*words, f"z{i}"]), i)
    keys = [".".join(["a"] * 119 + [f"y{j}"]) for j in range(20)]
    start = time.monotonic()
    for key in keys:
        assert trie.match(key) == []
    assert time.monotonic() - start < 5.0
