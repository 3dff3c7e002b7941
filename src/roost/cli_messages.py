"""How the ``roost`` sub-commands that work on a data directory
(``definitions``, ``ctl``) speak to the user: lines on standard error, and
the failure that ends a command with one and an exit code."""

from __future__ import annotations

import sys


class CommandFailed(Exception):
    """Ends a command with a message for the user and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def say(text: str) -> None:
    print(f"roost: {text}", file=sys.stderr)
