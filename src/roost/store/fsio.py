"""The file-system seam: every call by which the store changes what is on
disk goes through this module.

By default each name is the ``os`` function itself (a module attribute
bound once, so a call costs what ``os.pwrite`` costs). The power-loss
harness (``tests/store/powerloss``) rebinds them to a recorder that logs
each operation, so that it can rebuild what a disk would hold after a crash
at any point: each file's content as of its last ``fsync``, each
directory's entries as of its last directory ``fsync``.

Rules for store code: call these as ``fsio.pwrite(...)`` (attribute lookup
at call time, never ``from fsio import pwrite``), close every descriptor
opened with :func:`open` through :func:`close`, and never change the disk
by another route (``pathlib`` writes, builtin ``open`` for writing).
Reads may use anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from roost.store import holes

open = os.open
close = os.close
write = os.write
pwrite = os.pwrite
ftruncate = os.ftruncate
fsync = os.fsync
fdatasync = os.fdatasync
unlink = os.unlink
replace = os.replace
mkdir = os.mkdir
punch_hole = holes.punch_hole


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[write(fd, view) :]


def fsync_dir(path: Path | str) -> None:
    """Make the directory's entries (names created, renamed, unlinked in
    it) durable."""
    fd = open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        close(fd)


def makedirs(path: Path) -> None:
    """``mkdir -p``, with each new directory's entry made durable: a
    directory created and then lost in a crash takes its files with it."""
    path = Path(path)
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            mkdir(d, 0o755)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        fsync_dir(d.parent)


def truncate(path: Path, size: int) -> None:
    """Cut a file to ``size`` bytes and make that durable."""
    fd = open(path, os.O_RDWR)
    try:
        ftruncate(fd, size)
        fsync(fd)
    finally:
        close(fd)


def unlink_durably(path: Path, missing_ok: bool = True) -> None:
    """Remove a file and make its removal durable."""
    try:
        unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return
    fsync_dir(path.parent)


def write_atomic(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` so that a crash leaves the old
    file or the new one, never a mix: temp file, fsync, rename, fsync of
    the directory."""
    tmp = path.with_name(path.name + ".tmp")
    # Never through a link planted under the temporary name.
    fd = open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        write_all(fd, content)
        fsync(fd)
    finally:
        close(fd)
    replace(tmp, path)
    fsync_dir(path.parent)
