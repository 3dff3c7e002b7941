"""Wires a broker to its data directory: recovery at start-up, definitions
saved on every durable change, everything flushed at shutdown.

Definitions are written by the message store's writer, as the first job of
the commit batch that follows a change: a record of a queue declared a
moment ago is never durable before the queue is, a segment is never
unlinked (nor a record punched out by compaction) before the queue that
kept it alive is durably gone, and a declare-ok or confirm never runs ahead
of either.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from roost.broker.broker import Broker
from roost.broker.delayed import DelayedExchange
from roost.store import definitions, encryption
from roost.store.datadir import MESSAGES_DIR, DataDirLock
from roost.store.dedup_state import DedupState
from roost.store.message_store import DEFAULT_SEGMENT_SIZE, Batch, MessageStore

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


def _store_ids(broker: Broker) -> set[int]:
    """Ids under which durable queues and delayed exchanges log messages."""
    ids = {q.store_id for vh in broker.vhosts.values() for q in vh.queues.values() if q.store_id}
    return ids | set(_delayed_exchanges(broker))


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
        self._started = False
        # Generations of the definitions: handed to a batch, and on disk.
        self._submitted_generation = 0
        self._saved_generation = 0
        self._save_waiters: list[tuple[int, Callable[[], None]]] = []
        # Store ids in the definitions last made durable: compaction keeps
        # their records until a deletion is on disk.
        self._durable_ids: set[int] = set()

    def recover(self, broker: Broker) -> None:
        """Load definitions and queue contents into a fresh broker.

        Refuses (``definitions.DefinitionsError``, nothing on disk changed)
        when the log holds unsettled messages of a queue the definitions
        neither define nor record as deleted: a missing, emptied or
        hand-edited definitions.json must never make start-up delete them.
        """
        started = time.monotonic()
        self.broker = broker
        self.store.on_error = self._store_error
        # Before the definitions: durable queues and exchanges declared from
        # them load their dedup caches.
        broker.set_dedup_persistence(self.dedup.attach)
        path = self.data_dir / definitions.FILENAME
        try:
            saved = definitions.load(path)
        except definitions.DefinitionsError:
            # Unreadable (a symbolic link, not JSON): close() must not
            # replace it with the defaults.
            self.broker = None
            raise
        problems = definitions.restore(broker, saved) if saved is not None else []
        for problem in problems:
            log.error("recovering definitions: %s", problem)
        attribution = definitions.Attribution(path, saved, problems)
        # Only ids the file itself gives attribute records: a queue that got
        # a fresh id while the file was loaded (a file without roost's own
        # section) must not take over records that happen to carry it.
        by_id = {
            q.store_id: q
            for vh in broker.vhosts.values()
            for q in vh.queues.values()
            if q.store_id in attribution.listed
        }
        delayed = {i: ex for i, ex in _delayed_exchanges(broker).items() if i in attribution.listed}
        try:
            recovered, report = self.store.recover(set(by_id) | set(delayed), attribution.check)
        except (encryption.EncryptionError, definitions.DefinitionsError):
            self.broker = None  # so close() does not rewrite the definitions either
            raise
        # Never hand out an id that records on disk already carry; forget
        # deleted ids nothing on disk needs any more.
        broker.next_queue_id = max(broker.next_queue_id, report.max_queue_id + 1)
        # What check() let through unknown is deleted (an older file's
        # counter implied it): recorded as such from now on.
        known = set(by_id) | set(delayed)
        broker.deleted_store_ids.intersection_update(set(report.live_ids))
        broker.deleted_store_ids.update(i for i in report.live_ids if i not in known)
        for vh in broker.vhosts.values():
            for q in vh.queues.values():
                if q.store_id and q.store_id not in attribution.listed:
                    q.store_id = broker.allocate_queue_id()
            for ex in vh.exchanges.values():
                if (
                    isinstance(ex, DelayedExchange)
                    and ex.store_id
                    and ex.store_id not in attribution.listed
                ):
                    ex.store_id = broker.allocate_queue_id()
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
        self._durable_ids = _store_ids(broker) | broker.deleted_store_ids
        # Compaction keeps the records of every id defined now or in the
        # definitions on disk (a deletion not yet durable).
        self.store.queue_ids = lambda: _store_ids(broker) | self._durable_ids
        self.store.batch_hooks.insert(0, self._add_to_batch)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.store.start(loop)
        self.dedup.start()
        self.save_now()
        self._started = True

    # -- definitions ----------------------------------------------------

    def schedule_save(self) -> None:
        """The broker's definitions changed: write them with the next batch."""
        if self._started:
            self.store.request_batch()

    def _when_saved(self, generation: int, callback: Callable[[], None]) -> None:
        if generation <= self._saved_generation:
            callback()
        else:
            self._save_waiters.append((generation, callback))

    def _snapshot(self) -> tuple[int, bytes, set[int]]:
        assert self.broker is not None
        broker = self.broker
        content = definitions.encode(definitions.export(broker, include_internal=True))
        return broker.definitions_generation, content, _store_ids(broker)

    def _add_to_batch(self, batch: Batch) -> None:
        """Store hook: changed definitions go first in the batch being cut."""
        assert self.broker is not None
        if self.broker.definitions_generation <= self._submitted_generation:
            return
        generation, content, ids = self._snapshot()
        self._submitted_generation = generation
        path = self.data_dir / definitions.FILENAME
        batch.before.append(functools.partial(definitions.write_atomic, path, content))
        batch.committed.append(functools.partial(self._saved, generation, ids))

    def _saved(self, generation: int, ids: set[int]) -> None:
        assert self.broker is not None
        self._durable_ids = ids | self.broker.deleted_store_ids
        self._saved_generation = max(self._saved_generation, generation)
        ready = [w for w in self._save_waiters if w[0] <= self._saved_generation]
        self._save_waiters = [w for w in self._save_waiters if w[0] > self._saved_generation]
        for _, cb in ready:
            cb()

    def save_now(self) -> None:
        generation, content, ids = self._snapshot()
        definitions.write_atomic(self.data_dir / definitions.FILENAME, content)
        self._submitted_generation = max(self._submitted_generation, generation)
        self._saved(generation, ids)

    # -- disk alarm -----------------------------------------------------

    def _store_error(self, failing: bool) -> None:
        if self.broker is None:
            return
        if failing:
            log.error("disk alarm set: writes to %s are failing", self.data_dir)
            self.broker.set_alarm(DISK_ALARM)
        elif not self.store.failing:
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
