"""The broker: virtual hosts, users and broker-wide state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roost.broker.delayed import DelayedExchange
from roost.broker.journal import Journal
from roost.broker.users import UserStore
from roost.broker.vhost import VirtualHost

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class Broker:
    def __init__(
        self,
        *,
        default_user: str = "guest",
        default_password: str = "guest",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        journal: Journal | None = None,
    ) -> None:
        self.journal = journal
        self.scheduler: Callable[[float, Callable[[], None]], Any] | None = None
        self.max_message_size = max_message_size
        # Called whenever a durable definition changes (set by the store).
        self.on_definitions_changed: Callable[[], None] | None = None
        # Bumped on every durable change; the store calls back once a save
        # covering a given generation is written.
        self.definitions_generation = 0
        self.definitions_saved_hook: Callable[[int, Callable[[], None]], None] | None = None
        self.next_queue_id = 1
        self.vhosts: dict[str, VirtualHost] = {}
        self.users = UserStore()
        # (user, vhost) -> (configure, write, read) patterns.
        self.permissions: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.add_vhost("/")
        self.users.add(default_user, default_password, ("administrator",))
        self.permissions[(default_user, "/")] = (".*", ".*", ".*")
        # Resource alarms (memory, disk): while any is set, publishers block.
        self.alarms: set[str] = set()
        self._alarm_listeners: list[Callable[[bool, str], None]] = []

    def set_scheduler(self, scheduler: Callable[[float, Callable[[], None]], Any]) -> None:
        """Give every vhost (now and later) a timer source and start the
        timers of queues that already exist (after recovery)."""
        self.scheduler = scheduler
        for vh in self.vhosts.values():
            vh.scheduler = scheduler
            for q in list(vh.queues.values()):
                q.start_timers()
            for ex in list(vh.exchanges.values()):
                if isinstance(ex, DelayedExchange):
                    ex.start_timer()

    def vhost(self, name: str) -> VirtualHost | None:
        return self.vhosts.get(name)

    def add_vhost(self, name: str) -> VirtualHost:
        vh = self.vhosts.get(name)
        if vh is None:
            vh = self.vhosts[name] = VirtualHost(
                name,
                journal=self.journal,
                on_definitions_changed=self.definitions_changed,
                allocate_queue_id=self.allocate_queue_id,
            )
            vh.scheduler = self.scheduler
            self.definitions_changed()
        return vh

    def allocate_queue_id(self) -> int:
        qid = self.next_queue_id
        self.next_queue_id += 1
        return qid

    def definitions_changed(self) -> None:
        self.definitions_generation += 1
        if self.on_definitions_changed is not None:
            self.on_definitions_changed()

    def when_definitions_saved(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every change so far is on disk."""
        if self.definitions_saved_hook is None:
            callback()
        else:
            self.definitions_saved_hook(self.definitions_generation, callback)

    # -- resource alarms --------------------------------------------------

    @property
    def blocked(self) -> bool:
        return bool(self.alarms)

    def watch_alarms(self, listener: Callable[[bool, str], None]) -> None:
        self._alarm_listeners.append(listener)

    def unwatch_alarms(self, listener: Callable[[bool, str], None]) -> None:
        if listener in self._alarm_listeners:
            self._alarm_listeners.remove(listener)

    def set_alarm(self, resource: str) -> None:
        if resource in self.alarms:
            return
        was_blocked = self.blocked
        self.alarms.add(resource)
        if not was_blocked:
            self._notify(True, f"low on {resource}")

    def clear_alarm(self, resource: str) -> None:
        if resource not in self.alarms:
            return
        self.alarms.discard(resource)
        if not self.blocked:
            self._notify(False, "")

    def _notify(self, blocked: bool, reason: str) -> None:
        for listener in list(self._alarm_listeners):
            listener(blocked, reason)
