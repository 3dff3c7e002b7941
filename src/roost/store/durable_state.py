"""Wires a broker to its data directory: recovery at start-up, definitions
saved on every durable change, everything flushed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from roost.broker.broker import Broker
from roost.broker.delayed import DelayedExchange
from roost.store import definitions, encryption
from roost.store.datadir import MESSAGES_DIR, DataDirLock
from roost.store.dedup_state import DedupState
from roost.store.message_store import DEFAULT_SEGMENT_SIZE, MessageStore

log = logging.getLogger("roost.store")
DISK_ALARM = "disk"


def _delayed_exchanges(broker: Broker) -> dict[int, DelayedExchange]:
    """Delayed exchanges holding persistent messages, by their store id."""
    return {
        ex.store_id: ex
        for vh in broker.vhosts.values()
        for ex in vh.exchanges.values()
        if isinstance(ex, DelayedExchange) and ex.store_id
    }


class DurableState:
    def __init__(
        self,
        data_dir: Path,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        keyring: encryption.Keyring | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.lock = DataDirLock(data_dir)
        self.lock.acquire()
        try:
            # Before anything is read or written: a directory encrypted with
            # a key that was not given is refused untouched.
            encryption.check_marker(data_dir, keyring)
            self.store = MessageStore(data_dir / MESSAGES_DIR, segment_size, keyring=keyring)
            self.dedup = DedupState(data_dir, self.store)
        except BaseException:
            self.lock.release()
            raise
        self.broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._save_scheduled = False
        self._defs_failed = False
        self._saved_generation = 0
        self._save_waiters: list[tuple[int, Callable[[], None]]] = []

    def recover(self, broker: Broker) -> None:
        """Load definitions and queue contents into a fresh broker."""
        started = time.monotonic()
        self.broker = broker
        self.store.on_error = self._store_error
        # Before the definitions: durable queues and exchanges declared from
        # them load their dedup caches.
        broker.set_dedup_persistence(self.dedup.attach)
        saved = definitions.load(self.data_dir / definitions.FILENAME)
        if saved is not None:
            for problem in definitions.restore(broker, saved):
                log.error("recovering definitions: %s", problem)
        by_id = {
            q.store_id: q for vh in broker.vhosts.values() for q in vh.queues.values() if q.store_id
        }
        delayed = _delayed_exchanges(broker)
        try:
            recovered, report = self.store.recover(set(by_id) | set(delayed))
        except encryption.EncryptionError:
            self.broker = None  # so close() does not rewrite the definitions either
            raise
        keyring = self.store.keyring
        if keyring is not None and encryption.read_marker(self.data_dir) != keyring.current_id:
            # Remember the key in use (first enabled, or rotated), so a later
            # start with another key, or none, is refused.
            definitions.write_atomic(
                self.data_dir / encryption.MARKER_FILE, encryption.marker_content(keyring)
            )
            log.info("encryption at rest: key id %s", keyring.current_id.hex())
        for qid, rq in recovered.items():
            if qid in delayed:
                delayed[qid].restore(rq.refs)
            else:
                by_id[qid].restore(rq.refs, rq.delivered)
        for line in report.truncated:
            log.warning("recovery: %s", line)
        for line in report.skipped:
            log.error("recovery: %s", line)
        log.info(
            "recovered %d messages in %d queues from %d segments in %.2fs",
            report.messages,
            sum(1 for rq in recovered.values() if rq.refs),
            report.segments,
            time.monotonic() - started,
        )
        broker.on_definitions_changed = self.schedule_save
        broker.definitions_saved_hook = self._when_saved
        # Delayed exchanges' ids too: compaction must keep their records.
        self.store.queue_ids = lambda: (
            {q.store_id for vh in broker.vhosts.values() for q in vh.queues.values() if q.store_id}
            | set(_delayed_exchanges(broker))
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.store.start(loop)
        self.dedup.start(loop)
        self.save_now()

    # -- definitions ----------------------------------------------------

    def schedule_save(self) -> None:
        if not self._save_scheduled and self._loop is not None:
            self._save_scheduled = True
            self._loop.call_soon(self._save)

    def _when_saved(self, generation: int, callback: Callable[[], None]) -> None:
        if generation <= self._saved_generation:
            callback()
        else:
            self._save_waiters.append((generation, callback))

    def _save(self) -> None:
        self._save_scheduled = False
        assert self.broker is not None
        generation = self.broker.definitions_generation
        content = definitions.encode(definitions.export(self.broker, include_internal=True))
        path = self.data_dir / definitions.FILENAME
        # Through the store's writer thread: written before any message
        # batch submitted after it, so a confirmed message's queue exists.
        fut = self.store.run_in_writer(definitions.write_atomic, path, content)
        fut.add_done_callback(lambda f: self._saved_threadsafe(f, generation))

    def _saved_threadsafe(self, fut: object, generation: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._saved, fut, generation)

    def _saved(self, fut: object, generation: int) -> None:
        exc = fut.exception()  # type: ignore[attr-defined]
        if exc is None:
            self._saved_generation = max(self._saved_generation, generation)
            ready = [w for w in self._save_waiters if w[0] <= self._saved_generation]
            self._save_waiters = [w for w in self._save_waiters if w[0] > self._saved_generation]
            for _, cb in ready:
                cb()
            if self._defs_failed:
                self._defs_failed = False
                self._store_error(False)
            return
        log.error("saving definitions failed: %s; retrying", exc)
        if not self._defs_failed:
            self._defs_failed = True
            self._store_error(True)
        assert self._loop is not None
        self._loop.call_later(1.0, self.schedule_save)

    def save_now(self) -> None:
        assert self.broker is not None
        self._saved_generation = self.broker.definitions_generation
        content = definitions.encode(definitions.export(self.broker, include_internal=True))
        definitions.write_atomic(self.data_dir / definitions.FILENAME, content)

    # -- disk alarm -----------------------------------------------------

    def _store_error(self, failing: bool) -> None:
        if self.broker is None:
            return
        if failing:
            log.error("disk alarm set: writes to %s are failing", self.data_dir)
            self.broker.set_alarm(DISK_ALARM)
        elif not self._defs_failed and not self.store.failing:
            log.info("disk alarm cleared")
            self.broker.clear_alarm(DISK_ALARM)

    # -- shutdown -------------------------------------------------------

    def close(self) -> None:
        try:
            self.dedup.flush_sync()
            self.store.close()
            if self.broker is not None:
                try:
                    self.save_now()
                except OSError as exc:
                    log.error("saving definitions at shutdown failed: %s", exc)
        finally:
            self.lock.release()
