"""The data directory: its layout, the lock that keeps it to one broker,
and the check that it is the broker's own.

Whoever can write into the data directory can make the broker load any
definitions (users, passwords, permissions), so a start refuses a
directory that any other user could have written: one owned by another
user, or writable by group or others, or holding such an entry. The rule
is the same for root (RabbitMQ has no such check): the broker runs only
on a directory owned by its effective uid.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from roost.store import fsio

LOCK_FILE = "roost.lock"
MESSAGES_DIR = "messages"
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class DataDirInUse(Exception):
    pass


class DataDirUnsafe(Exception):
    """The data directory could have been written by another user, or a file
    the broker opens there is a symbolic link. The message is fit for a
    user."""


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``open`` that refuses a symbolic link in the last component (raises
    ``DataDirUnsafe``): a link there could point the broker at a file of
    another user's choosing."""
    try:
        return fsio.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise DataDirUnsafe(f"{path} is a symbolic link; refusing to follow it") from None
        raise exc


def read_nofollow(path: Path) -> bytes:
    """The content of ``path``, refusing a symbolic link (``DataDirUnsafe``)."""
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        fsio.close(fd)


def _unsafe(path: Path, st: os.stat_result, euid: int) -> str | None:
    if st.st_uid != euid:
        return f"{path} is owned by uid {st.st_uid}, not by uid {euid} running roost"
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & _WRITABLE_BY_OTHERS:
        who = "group and others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_ownership(directory: Path, euid: int | None = None) -> None:
    """Raise ``DataDirUnsafe`` unless ``directory`` and everything in it are
    owned by ``euid`` (the effective uid) and writable by no one else.

    One ``lstat`` per entry: a start-up check, cheap next to recovery,
    which reads every segment anyway. Links inside are not followed (their
    own owner is checked); the directory itself may be reached through one.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        problem = _unsafe(directory, os.stat(directory), euid)
    except OSError as exc:
        raise DataDirUnsafe(f"cannot check data directory {directory}: {exc.strerror}") from None
    if problem is None:
        for parent, dirs, files in os.walk(directory, onerror=None):
            for name in (*dirs, *files):
                path = Path(parent) / name
                try:
                    problem = _unsafe(path, os.lstat(path), euid)
                except FileNotFoundError:  # gone meanwhile (a temp file)
                    continue
                if problem is not None:
                    break
            if problem is not None:
                break
    if problem is not None:
        raise DataDirUnsafe(
            f"refusing data directory {directory}: {problem}; it must belong to the user "
            "running roost and be writable by no one else (chown/chmod go-w it)"
        )


class DataDirLock:
    """An exclusive ``flock`` on ``roost.lock``, held for the broker's life.

    The kernel drops the lock when the process dies, even on SIGKILL, so a
    crashed broker never leaves the directory locked. Acquiring it first
    checks that the directory is the broker's own (:func:`check_ownership`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        fsio.makedirs(self.directory)
        check_ownership(self.directory)
        path = self.directory / LOCK_FILE
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o600)
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
