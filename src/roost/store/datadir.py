"""The data directory: its layout and the lock that keeps it to one broker."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from roost.store import fsio

LOCK_FILE = "roost.lock"
MESSAGES_DIR = "messages"


class DataDirInUse(Exception):
    pass


class DataDirLock:
    """An exclusive ``flock`` on ``roost.lock``, held for the broker's life.

    The kernel drops the lock when the process dies, even on SIGKILL, so a
    crashed broker never leaves the directory locked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        fsio.makedirs(self.directory)
        path = self.directory / LOCK_FILE
        fd = fsio.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                fsio.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise DataDirInUse(
                f"data directory {self.directory} is in use by another roost process{who}"
            ) from None
        fsio.ftruncate(fd, 0)
        fsio.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            fsio.close(self._fd)
            self._fd = None
