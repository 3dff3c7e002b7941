"""Topic pattern matching (roost.broker.topic) against RabbitMQ's rules.

``*`` is exactly one word, ``#`` zero or more; words are separated by dots;
the empty routing key is zero words while ``"a."`` is two (the second one
empty). The reference for all of it is ``rabbit_exchange_type_topic``.
"""

from __future__ import annotations

import random
from functools import cache

import pytest

from roost.broker.topic import compile_pattern, matches, split

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # hypothesis is optional; the seeded comparison below always runs
    HAVE_HYPOTHESIS = False


def match(pattern: str, key: str) -> bool:
    return matches(compile_pattern(pattern), split(key))


def reference(pattern: str, key: str) -> bool:
    """A deliberately naive recursive matcher, straight from the rules."""
    p = tuple(pattern.split(".")) if pattern else ()
    k = tuple(key.split(".")) if key else ()

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            # '#' takes zero words, or one word and stays.
            return go(i + 1, j) or (j < len(k) and go(i, j + 1))
        if j == len(k):
            return False
        return (p[i] == "*" or p[i] == k[j]) and go(i + 1, j + 1)

    return go(0, 0)


# -- splitting ------------------------------------------------------------


def test_split_empty_key_is_zero_words() -> None:
    assert split("") == ()


def test_split_keeps_empty_words() -> None:
    assert split("a..b") == ("a", "", "b")
    assert split("a.") == ("a", "")
    assert split(".") == ("", "")
    assert split(".a") == ("", "a")


def test_compile_collapses_consecutive_hashes() -> None:
    assert compile_pattern("#.#") == ("#",)
    assert compile_pattern("a.#.#.#.b") == ("a", "#", "b")
    # Separated hashes are kept: "#.*.#" needs at least one word.
    assert compile_pattern("#.*.#") == ("#", "*", "#")


# -- the rules ------------------------------------------------------------

CASES: list[tuple[str, str, bool]] = [
    # exact words
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a.b.c", "a.b.d", False),
    ("", "", True),
    ("", "a", False),
    ("a", "", False),
    # '*' is exactly one word
    ("*", "a", True),
    ("*", "", False),
    ("*", "a.b", False),
    ("*.b", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    # '#' is zero or more words
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b.a", False),
    ("a.#", "", False),
    ("#.a", "a", True),
    ("#.a", "b.a", True),
    ("#.a", "b.c.a", True),
    ("#.a", "a.b", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y.c", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    # '*' and '#' together
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("a.*.#", "b.c", False),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("#.*", "a.b.c", True),
    ("*.#", "a", True),
    ("#.*.#", "", False),
    ("#.*.#", "x", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a.b.c.d", True),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "a.c", False),
    # empty words are words like any other
    ("a..b", "a..b", True),
    ("a.*.b", "a..b", True),
    ("a.#.b", "a..b", True),
    ("a.b", "a..b", False),
    ("a.", "a.", True),
    ("a.", "a", False),
    ("a.*", "a.", True),
    ("*", ".", False),
    ("*.*", ".", True),
    ("#", ".", True),
    ("#", "..", True),
    ("a.#", "a.", True),
    (".", ".", True),
    ("..", ".", False),
    # '*' and '#' are wildcards only as whole words
    ("a*", "ab", False),
    ("a*", "a*", True),
    ("a#", "a", False),
    ("a#", "a#", True),
    ("*", "*", True),
    ("#", "#", True),
    ("a.b", "*.b", False),
    # case matters
    ("A.b", "a.b", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), CASES)
def test_rabbitmq_rules(pattern: str, key: str, expected: bool) -> None:
    assert match(pattern, key) is expected
    # The reference matcher agrees, so the property tests below are sound.
    assert reference(pattern, key) is expected


# An exponential matcher would not finish these; the timeout turns a hang
# into a failure without asserting on speed.
@pytest.mark.timeout(20)
def test_many_hashes_do_not_blow_up() -> None:
    # A naive backtracking matcher is exponential here; RabbitMQ's trie and
    # roost's glob-style matcher are not.
    words = ["w"] * 40
    key = ".".join(words)
    pattern_match = ".".join(["#"] * 20 + ["w"])
    pattern_miss = ".".join(["#", "w"] * 20 + ["x"])
    assert match(pattern_match, key) is True
    assert match(pattern_miss, key) is False
    assert match(".".join(["#", "*"] * 30), key) is True
    assert match(".".join(["#", "*"] * 41), key) is False


@pytest.mark.timeout(20)
def test_many_hashes_against_long_mismatching_key() -> None:
    key = ".".join(["a"] * 200) + ".b"
    assert match("#.a.#.a.#.a.#.c", key) is False
    assert match("#.a.#.a.#.a.#.b", key) is True


_ALPHABET = ["a", "b", "", "*", "#"]
_KEY_WORDS = ["a", "b", ""]


def _random_words(rng: random.Random, choices: list[str], max_len: int) -> str:
    return ".".join(rng.choice(choices) for _ in range(rng.randint(0, max_len)))


def test_matches_reference_on_random_patterns() -> None:
    # Always runs (hypothesis is optional): a seeded sweep over small
    # alphabets, which is where the corner cases live.
    rng = random.Random(0x70B1C)
    for _ in range(5000):
        pattern = _random_words(rng, _ALPHABET, 6)
        key = _random_words(rng, _KEY_WORDS, 6)
        assert match(pattern, key) is reference(pattern, key), (pattern, key)


if HAVE_HYPOTHESIS:
    _pattern_words = st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=8)
    _key_words = st.lists(st.sampled_from(["a", "b", ""]), max_size=8)

    @settings(max_examples=500, deadline=None)
    @given(_pattern_words, _key_words)
    def test_matches_reference_property(pattern_words: list[str], key_words: list[str]) -> None:
        pattern, key = ".".join(pattern_words), ".".join(key_words)
        assert match(pattern, key) is reference(pattern, key)

    @settings(max_examples=200, deadline=None)
    @given(_key_words)
    def test_hash_matches_every_key(key_words: list[str]) -> None:
        assert match("#", ".".join(key_words)) is True

    @settings(max_examples=200, deadline=None)
    @given(_key_words)
    def test_key_matches_itself_literally(key_words: list[str]) -> None:
        literal = [w for w in key_words if w not in ("*", "#")]
        key = ".".join(literal)
        assert match(key, key) is True

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_matches_reference_property() -> None:
        pass
