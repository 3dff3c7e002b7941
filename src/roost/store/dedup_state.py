"""Deduplication caches of durable queues and exchanges, kept on disk.

Each durable queue or exchange with ``x-message-deduplication`` has a small
JSON file, ``dedup/<vhost hex>/<q|x>-<name hex>.json``, holding its cache's
keys oldest first with their expiry (wall-clock ms, 0: none). A cache that
changed is rewritten whole (write to a temporary file, fsync, rename) at
most once per commit batch of the message store, on its writer thread,
*after* the batch's records are on disk and before its confirms go out.
So a key is never durable before the message that added it (a crash in
between would make the publisher's re-send look like a duplicate of a
message that is gone), and a confirmed message's key survives a crash
(SIGKILL, power loss).

The crash window left: between a batch's records and its caches, a crash
keeps the message but not its key, so a re-send (the publisher had no
confirm yet) is taken again: a duplicate, never a loss. Keys that are
neither strings, numbers, booleans nor byte strings (a header holding a
timestamp or a decimal) are not kept.
With encryption at rest the file is sealed with the store's key (the
keys are message ids or header values a publisher chose, as telling as a
body): ``MAGIC``, the key id, then the JSON sealed as the message store
seals records, bound to the file's own path so that one cache cannot be
passed off as another's. A plain file (written before encryption was
enabled) is still read, and rewritten sealed at start-up.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from roost.broker import clock
from roost.broker.dedup import Deduplicator
from roost.store import fsio
from roost.store.encryption import KEY_ID_SIZE
from roost.store.message_store import Batch, MessageStore

log = logging.getLogger("roost.store")

DEDUP_DIR = "dedup"
# Plain files are JSON and start with "{".
MAGIC = b"\x00roost-dedup-sealed\n"


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
        fsio.unlink_durably(path)
        return
    fsio.makedirs(path.parent)  # each new directory's entry made durable
    fsio.write_atomic(path, content)


class DedupState:
    def __init__(self, data_dir: Path, store: MessageStore) -> None:
        self.dir = data_dir / DEDUP_DIR
        self.store = store
        # While recovering, a declared cache is loaded from its file; later
        # a new queue or exchange starts empty (a file left by one of the
        # same name deleted a moment ago may not be gone yet).
        self.recovering = True
        self._dirty: dict[Path, Deduplicator | None] = {}
        self._started = False
        store.batch_hooks.append(self._add_to_batch)

    def path(self, vhost: str, kind: str, name: str) -> Path:
        return self.dir / vhost.encode().hex() / f"{kind}-{name.encode().hex()}.json"

    def start(self) -> None:
        self.recovering = False
        self._started = True
        if self._dirty:
            self.store.request_batch()

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

    def _aad(self, path: Path) -> bytes:
        return str(path.relative_to(self.dir)).encode()

    def _seal(self, path: Path, plain: bytes) -> bytes:
        keyring = self.store.keyring
        if keyring is None:
            return plain
        return MAGIC + keyring.current_id + keyring.seal(plain, self._aad(path))

    def _unseal(self, path: Path, content: bytes) -> bytes:
        if not content.startswith(MAGIC):
            return content
        keyring = self.store.keyring
        if keyring is None:
            raise ValueError("the file is encrypted and no encryption key was given")
        kid_end = len(MAGIC) + KEY_ID_SIZE
        return keyring.open(content[len(MAGIC) : kid_end], content[kid_end:], self._aad(path))

    def _load(self, path: Path, deduper: Deduplicator) -> None:
        try:
            content = path.read_bytes()
            raw = json.loads(self._unseal(path, content))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("dedup cache %s unreadable, starting empty: %s", path, exc)
            return
        if self.store.keyring is not None and not content.startswith(MAGIC):
            self._mark(path, deduper)  # written before encryption: seal it now
        offset = clock.monotonic_ms() - clock.wall_ms()
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
        if not self._dirty and self._started:
            self.store.request_batch()
        self._dirty[path] = deduper

    def _contents(self) -> list[tuple[Path, bytes | None]]:
        dirty, self._dirty = self._dirty, {}
        offset = clock.wall_ms() - clock.monotonic_ms()
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
            plain = json.dumps({"keys": keys}, separators=(",", ":")).encode()
            out.append((path, self._seal(path, plain)))
        return out

    def _add_to_batch(self, batch: Batch) -> None:
        """Store hook: write changed caches once this batch's records are
        on disk."""
        for path, content in self._contents():
            batch.after_records.append(functools.partial(_write, path, content))

    def flush_sync(self) -> None:
        """At shutdown, on the calling thread."""
        for path, content in self._contents():
            try:
                _write(path, content)
            except OSError as exc:
                log.error("saving dedup cache %s failed: %s", path, exc)
