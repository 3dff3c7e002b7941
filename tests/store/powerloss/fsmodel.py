"""Recording what the store does to the disk, and rebuilding what a disk
would hold after a power loss at any point of it.

:class:`Recorder` rebinds the functions of :mod:`roost.store.fsio` while a
broker runs: each call is made for real and logged (under a lock, so the
log's order is the order the calls took effect), with the data it wrote.
:func:`crash_images` then replays the log offline (like ALICE or
CrashMonkey) and, for a crash before operation ``N``, keeps only what was
made durable by then:

- ``strict``: each file's content as of its last ``fsync``/``fdatasync``,
  each directory's entries as of its last directory ``fsync``; nothing
  else (the POSIX minimum);
- ``torn``: the namespace as of some point between the last directory
  fsync and the crash (metadata reaches the disk in order, as a journal
  writes it), and each file's un-fsync'd writes applied block by block
  (4 KiB), each block taken from a random one of its versions since the
  last fsync, at a random one of its sizes: partial, reordered writes,
  and a file size that reached the disk before the data did.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.store import fsio, holes

BLOCK = 4096
# Op kinds (first element of each logged tuple).
CREAT = "creat"  # (CREAT, path, ino)
MKDIR = "mkdir"  # (MKDIR, path)
WRITE = "write"  # (WRITE, ino, offset, data)
TRUNC = "trunc"  # (TRUNC, ino, size)
PUNCH = "punch"  # (PUNCH, ino, start, end): whole blocks freed, read as zeros
FSYNC = "fsync"  # (FSYNC, ino)
DIRSYNC = "dirsync"  # (DIRSYNC, dir path)
UNLINK = "unlink"  # (UNLINK, path)
RENAME = "rename"  # (RENAME, src path, dst path)
NAMESPACE_OPS = (CREAT, MKDIR, UNLINK, RENAME)

Op = tuple[Any, ...]


class Recorder:
    """Logs every disk-changing call the store makes under ``root``.

    Paths in the log are relative to ``root`` ('' is the root itself).
    Files already under ``root`` when recording starts are taken as
    durable as they are."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.ops: list[Op] = []
        self.initial: dict[str, bytes | None] = {}  # path -> content (None: directory)
        self._lock = threading.RLock()
        self._names: dict[str, int] = {}  # current namespace: path -> ino
        self._fds: dict[int, int | str] = {}  # fd -> ino, or a directory's path
        self._next_ino = 1
        self._marked = 0
        self._saved: dict[str, Any] = {}

    # -- recording ------------------------------------------------------

    @property
    def counter(self) -> int:
        """Operations logged so far: a crash at this point keeps every
        operation before it."""
        with self._lock:
            return len(self.ops)

    @property
    def marked(self) -> int:
        """The counter just after the latest :meth:`mark`."""
        with self._lock:
            return self._marked

    def mark(self, what: str) -> None:
        """Log a point in time (no disk effect): the harness marks each
        message batch the store reports committed, before its confirms go
        out, so a confirm can be dated to the batch that made it durable
        rather than to when the client happened to read it."""
        with self._lock:
            self.ops.append(("mark", what))
            self._marked = len(self.ops)

    def install(self) -> None:
        for dirpath, _dirnames, filenames in os.walk(self.root):
            rel = self._rel(dirpath)
            assert rel is not None
            if rel:
                self.initial[rel] = None
            for name in filenames:
                path = os.path.join(rel, name) if rel else name
                self.initial[path] = Path(dirpath, name).read_bytes()
                self._names[path] = self._new_ino()
        self.ops.append(("start", dict(self._names)))
        for name in (
            "open",
            "close",
            "write",
            "pwrite",
            "ftruncate",
            "fsync",
            "fdatasync",
            "unlink",
            "replace",
            "mkdir",
            "punch_hole",
        ):
            self._saved[name] = getattr(fsio, name)
            setattr(fsio, name, getattr(self, "_" + name))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(fsio, name, fn)
        self._saved.clear()

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _rel(self, path: Any) -> str | None:
        p = str(os.path.abspath(os.fspath(path)))
        root = str(self.root)
        if p == root:
            return ""
        if p.startswith(root + os.sep):
            return p[len(root) + 1 :]
        return None

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        with self._lock:
            rel = self._rel(path)
            if rel is not None and os.path.isdir(path):
                fd: int = self._saved["open"](path, flags, mode, **kw)
                self._fds[fd] = rel if rel else "."
                return fd
            existed = rel is not None and rel in self._names
            if rel is not None and not existed and os.path.exists(path):
                raise AssertionError(f"{rel} was created behind the recorder (not through fsio)")
            fd = self._saved["open"](path, flags, mode, **kw)
            if rel is None:
                return fd
            if not existed:
                ino = self._new_ino()
                self._names[rel] = ino
                self.ops.append((CREAT, rel, ino))
            ino = self._names[rel]
            if flags & os.O_TRUNC:
                self.ops.append((TRUNC, ino, 0))
            self._fds[fd] = ino
            return fd

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._saved["close"](fd)

    def _file(self, fd: int) -> int | None:
        target = self._fds.get(fd)
        return target if isinstance(target, int) else None

    def _write(self, fd: int, data: Any) -> int:
        with self._lock:
            n: int = self._saved["write"](fd, data)
            ino = self._file(fd)
            if ino is not None:
                end = os.lseek(fd, 0, os.SEEK_CUR)
                self.ops.append((WRITE, ino, end - n, bytes(memoryview(data)[:n])))
            return n

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        with self._lock:
            n: int = self._saved["pwrite"](fd, data, offset)
            ino = self._file(fd)
            if ino is not None:
                self.ops.append((WRITE, ino, offset, bytes(memoryview(data)[:n])))
            return n

    def _ftruncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._saved["ftruncate"](fd, size)
            ino = self._file(fd)
            if ino is not None:
                self.ops.append((TRUNC, ino, size))

    def _sync(self, fd: int, name: str) -> None:
        with self._lock:
            self._saved[name](fd)
            target = self._fds.get(fd)
            if isinstance(target, int):
                self.ops.append((FSYNC, target))
            elif target is not None:
                self.ops.append((DIRSYNC, "" if target == "." else target))

    def _fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def _fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _unlink(self, path: Any, **kw: Any) -> None:
        with self._lock:
            self._saved["unlink"](path, **kw)
            rel = self._rel(path)
            if rel is not None:
                self._names.pop(rel, None)
                self.ops.append((UNLINK, rel))

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        with self._lock:
            self._saved["replace"](src, dst, **kw)
            s, d = self._rel(src), self._rel(dst)
            if s is not None and d is not None:
                self._names[d] = self._names.pop(s)
                self.ops.append((RENAME, s, d))

    def _mkdir(self, path: Any, mode: int = 0o777, **kw: Any) -> None:
        with self._lock:
            self._saved["mkdir"](path, mode, **kw)
            rel = self._rel(path)
            if rel is not None:
                self.ops.append((MKDIR, rel))

    def _punch_hole(self, fd: int, offset: int, length: int) -> bool:
        with self._lock:
            done: bool = self._saved["punch_hole"](fd, offset, length)
            ino = self._file(fd)
            if done and ino is not None:
                start = -(-offset // holes.BLOCK) * holes.BLOCK
                end = (offset + length) // holes.BLOCK * holes.BLOCK
                self.ops.append((PUNCH, ino, start, end))
            return done

    # -- describing -------------------------------------------------------

    def describe(self, i: int) -> str:
        op = self.ops[i]
        if op[0] in ("start", "mark"):
            return f"#{i} {op[0]} {op[1] if op[0] == 'mark' else ''}"
        if op[0] == WRITE:
            return f"#{i} write {self.path_of(op[1], i)} [{op[2]}, {op[2] + len(op[3])})"
        if op[0] in (TRUNC, FSYNC):
            return f"#{i} {op[0]} {self.path_of(op[1], i)} {' '.join(map(str, op[2:]))}"
        if op[0] == PUNCH:
            return f"#{i} punch {self.path_of(op[1], i)} [{op[2]}, {op[3]})"
        return f"#{i} " + " ".join(str(x) for x in op)

    def path_of(self, ino: int, before: int) -> str:
        names = dict(self.ops[0][1])
        for op in self.ops[1:before]:
            if op[0] == CREAT:
                names[op[1]] = op[2]
            elif op[0] == UNLINK:
                names.pop(op[1], None)
            elif op[0] == RENAME:
                names[op[2]] = names.pop(op[1])
        found = [p for p, i in names.items() if i == ino]
        return found[0] if found else f"<ino {ino}>"

    def trace(self, n: int, around: int = 12) -> str:
        lo, hi = max(0, n - around), min(len(self.ops), n + around // 2)
        lines = []
        for i in range(lo, hi):
            mark = ">>" if i == n else "  "
            lines.append(f"{mark} {self.describe(i)}")
        return "\n".join(lines)


# -- replay -------------------------------------------------------------


@dataclass
class _Inode:
    cur: bytearray = field(default_factory=bytearray)
    dur: bytes = b""
    # Versions since the last fsync (for torn images): content after each.
    versions: list[bytes] = field(default_factory=list)


class _State:
    def __init__(self, initial: dict[str, bytes | None], names: dict[str, int]) -> None:
        self.inodes: dict[int, _Inode] = {}
        self.cur: dict[str, dict[str, int | None]] = {"": {}}  # dir -> name -> ino (None: dir)
        self.dur: dict[str, dict[str, int | None]] = {"": {}}
        for path, content in sorted(initial.items()):
            parent, name = _split(path)
            if content is None:
                self.cur[path] = {}
                self.dur[path] = {}
                self.cur[parent][name] = None
            else:
                ino = names[path]
                self.inodes[ino] = _Inode(bytearray(content), content)
                self.cur[parent][name] = ino
        for d, entries in self.cur.items():
            self.dur[d] = dict(entries)
        # Namespace as it was after each namespace op (for torn images).
        self.last_dirsync = 0
        self.namespace_log: list[tuple[int, dict[str, dict[str, int | None]]]] = []

    def apply(self, i: int, op: Op, keep_versions: bool) -> None:
        kind = op[0]
        if kind == WRITE:
            node = self.inodes[op[1]]
            off, data = op[2], op[3]
            if len(node.cur) < off:
                node.cur.extend(bytes(off - len(node.cur)))
            node.cur[off : off + len(data)] = data
            if keep_versions:
                node.versions.append(bytes(node.cur))
        elif kind == TRUNC:
            node = self.inodes[op[1]]
            size = op[2]
            if len(node.cur) > size:
                del node.cur[size:]
            else:
                node.cur.extend(bytes(size - len(node.cur)))
            if keep_versions:
                node.versions.append(bytes(node.cur))
        elif kind == PUNCH:
            node = self.inodes[op[1]]
            start, end = op[2], min(op[3], len(node.cur))
            if end > start:
                node.cur[start:end] = bytes(end - start)
            if keep_versions:
                node.versions.append(bytes(node.cur))
        elif kind == FSYNC:
            node = self.inodes[op[1]]
            node.dur = bytes(node.cur)
            node.versions = []
        elif kind == DIRSYNC:
            self.dur[op[1]] = dict(self.cur[op[1]])
            self.last_dirsync = i + 1
        elif kind == CREAT:
            parent, name = _split(op[1])
            self.inodes[op[2]] = _Inode()
            self.cur[parent][name] = op[2]
        elif kind == MKDIR:
            parent, name = _split(op[1])
            self.cur[parent][name] = None
            self.cur[op[1]] = {}
            self.dur.setdefault(op[1], {})
        elif kind == UNLINK:
            parent, name = _split(op[1])
            self.cur[parent].pop(name, None)
        elif kind == RENAME:
            sp, sn = _split(op[1])
            dp, dn = _split(op[2])
            self.cur[dp][dn] = self.cur[sp].pop(sn)
        if keep_versions and kind in NAMESPACE_OPS:
            self.namespace_log.append((i + 1, {d: dict(e) for d, e in self.cur.items()}))


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _torn_content(node: _Inode, rng: random.Random) -> bytes:
    versions = [node.dur, *node.versions]
    if len(versions) == 1:
        return node.dur
    size = len(rng.choice(versions))
    out = bytearray()
    for start in range(0, size, BLOCK):
        v = rng.choice(versions)
        block = v[start : min(start + BLOCK, size)]
        out += block + bytes(min(BLOCK, size - start) - len(block))
    return bytes(out[:size])


def _materialize(state: _State, target: Path, torn: bool, rng: random.Random) -> None:
    entries = state.dur
    if torn and rng.random() < 0.75:
        # Metadata reaches the disk in order: the namespace as of some
        # point between the last directory fsync and the crash; most often
        # the crash itself (every rename and unlink made it).
        later = [ns for at, ns in state.namespace_log if at >= state.last_dirsync]
        merged = {d: dict(e) for d, e in state.dur.items()}
        if rng.random() < 0.7:
            merged.update({d: dict(e) for d, e in state.cur.items()})
            entries = merged
        elif later:
            merged.update(rng.choice(later))
            entries = merged

    def walk(d: str, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, ino in entries.get(d, {}).items():
            path = f"{d}/{name}" if d else name
            if ino is None:
                walk(path, out / name)
            else:
                node = state.inodes[ino]
                data = _torn_content(node, rng) if torn else node.dur
                (out / name).write_bytes(data)

    walk("", target)


def crash_images(
    rec: Recorder,
    points: Iterable[int],
    make_dir: Callable[[int], Path],
    torn: bool = False,
    seed: int = 0,
) -> Iterator[tuple[int, Path]]:
    """For each crash point ``n`` (in increasing order), the image of a
    crash before op ``n`` is written to ``make_dir(n)`` and yielded."""
    rng = random.Random(seed)
    state = _State(rec.initial, dict(rec.ops[0][1]))
    wanted = sorted(set(points))
    i = 1
    for n in wanted:
        n = max(1, min(n, len(rec.ops)))
        while i < n:
            state.apply(i, rec.ops[i], keep_versions=torn)
            i += 1
        target = make_dir(n)
        _materialize(state, target, torn, rng)
        yield n, target
