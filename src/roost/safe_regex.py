"""Regular expressions that come from users (management API name filters,
permission patterns), run on RE2.

Python's ``re`` backtracks: a pattern like ``(a+)+$`` against a long name
takes exponential time, and the broker has one event loop. RE2 matches in
time linear in the subject and refuses what it cannot do that way
(backreferences, lookaround), so a pattern either compiles to something
cheap or is refused up front."""

from __future__ import annotations

from typing import Any

import re2

# Compiling is linear in the pattern too, but there is no reason for a
# name filter or a permission pattern to be longer than this.
MAX_PATTERN_LENGTH = 4096

_OPTIONS: Any = re2.Options()
# A refused pattern is reported to whoever sent it, not logged by RE2 itself.
_OPTIONS.log_errors = False


class InvalidPattern(ValueError):
    """The pattern is not one RE2 accepts (or is too long); the message says why."""


class SafePattern:
    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str, regex: Any) -> None:
        self.pattern = pattern
        self._regex = regex

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text`` (as ``re.search``)."""
        return self._regex.search(text) is not None


def compile_pattern(pattern: str) -> SafePattern:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    try:
        regex = re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidPattern(str(reason)) from None
    return SafePattern(pattern, regex)
