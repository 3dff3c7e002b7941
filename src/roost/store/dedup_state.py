"""Deduplication caches of durable queues and exchanges, kept on disk.

Each durable queue or exchange with ``x-message-deduplication`` has a small
JSON file, ``dedup/<vhost hex>/<q|x>-<name hex>.json``, holding its cache's
keys oldest first with their expiry (wall-clock ms, 0: none). A cache that
changed is rewritten whole (write to a temporary file, fsync, rename) at
most once per event-loop iteration, on the message store's writer thread,
and always *before* the next message batch: a publish whose key went into
the cache is confirmed only after a batch taken later is on disk, so a
confirmed message's key survives a crash (SIGKILL, power loss).

The crash window left: a key added by a message that was not logged
(transient, or to a non-durable target alongside) may be lost if the broker
dies before that iteration's write finishes; its publisher got no
persistence promise either. Keys that are neither strings, numbers, booleans
nor byte strings (a header holding a timestamp or a decimal) are not kept.
The files are not encrypted, even with encryption at rest: they hold
deduplication keys (message ids or header values), never bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from roost.broker.dedup import Deduplicator
from roost.store import definitions
from roost.store.message_store import MessageStore

log = logging.getLogger("roost.store")

DEDUP_DIR = "dedup"


def _encode_key(key: Hashable) -> list[Any] | None:
    if isinstance(key, str):
        return ["s", key]
    if isinstance(key, bool):
        return ["t", key]
    if isinstance(key, int):
        return ["i", key]
    if isinstance(key, float):
        return ["f", key]
    if isinstance(key, bytes):
        return ["b", key.hex()]
    return None


def _decode_key(tag: str, value: Any) -> Hashable | None:
    if tag == "s" and isinstance(value, str):
        return value
    if tag == "t" and isinstance(value, bool):
        return value
    if tag == "i" and isinstance(value, int):
        return value
    if tag == "f" and isinstance(value, int | float):
        return float(value)
    if tag == "b" and isinstance(value, str):
        return bytes.fromhex(value)
    return None


def _write(path: Path, content: bytes | None) -> None:
    if content is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    definitions.write_atomic(path, content)


class DedupState:
    def __init__(self, data_dir: Path, store: MessageStore) -> None:
        self.dir = data_dir / DEDUP_DIR
        self.store = store
        # While recovering, a declared cache is loaded from its file; later
        # a new queue or exchange starts empty (a file left by one of the
        # same name deleted a moment ago may not be gone yet).
        self.recovering = True
        self._dirty: dict[Path, Deduplicator | None] = {}
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        store.before_batch = self.flush

    def path(self, vhost: str, kind: str, name: str) -> Path:
        return self.dir / vhost.encode().hex() / f"{kind}-{name.encode().hex()}.json"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.recovering = False
        if self._dirty:
            self._schedule()

    def attach(self, vhost: str, kind: str, name: str, deduper: Deduplicator | None) -> None:
        """Broker hook: a durable queue or exchange with a cache was declared
        (``deduper``) or deleted (None)."""
        path = self.path(vhost, kind, name)
        if deduper is None:
            self._mark(path, None)
            return
        if self.recovering:
            self._load(path, deduper)
        else:
            self._mark(path, deduper)  # supersedes a pending delete
        deduper.on_change = lambda: self._mark(path, deduper)

    def _load(self, path: Path, deduper: Deduplicator) -> None:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("dedup cache %s unreadable, starting empty: %s", path, exc)
            return
        offset = time.monotonic() * 1000 - time.time() * 1000
        items: list[tuple[Hashable, float]] = []
        for entry in raw.get("keys", []) if isinstance(raw, dict) else []:
            if not isinstance(entry, list) or len(entry) != 3:
                continue
            tag, value, expires = entry
            key = _decode_key(tag, value)
            if key is not None and isinstance(expires, int | float):
                items.append((key, expires + offset if expires else 0.0))
        deduper.cache.load(items)

    def _mark(self, path: Path, deduper: Deduplicator | None) -> None:
        self._dirty[path] = deduper
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        if self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def _contents(self) -> list[tuple[Path, bytes | None]]:
        dirty, self._dirty = self._dirty, {}
        offset = time.time() * 1000 - time.monotonic() * 1000
        out: list[tuple[Path, bytes | None]] = []
        for path, deduper in dirty.items():
            if deduper is None:
                out.append((path, None))
                continue
            keys = []
            for key, expires in deduper.cache.items():
                enc = _encode_key(key)
                if enc is not None:
                    enc.append(int(expires + offset) if expires else 0)
                    keys.append(enc)
            out.append((path, json.dumps({"keys": keys}, separators=(",", ":")).encode()))
        return out

    def flush(self) -> None:
        """Hand changed caches to the writer thread (ahead of any batch
        submitted after this call)."""
        self._scheduled = False
        for path, content in self._contents():
            fut = self.store.run_in_writer(_write, path, content)
            fut.add_done_callback(_report)

    def flush_sync(self) -> None:
        """At shutdown, on the calling thread."""
        self._scheduled = False
        for path, content in self._contents():
            try:
                _write(path, content)
            except OSError as exc:
                log.error("saving dedup cache %s failed: %s", path, exc)


def _report(fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("saving a dedup cache failed: %s", exc)
