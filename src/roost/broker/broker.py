"""The broker: virtual hosts, users and broker-wide state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from roost.broker import errors, stats
from roost.broker.access import LoginThrottle, Permissions
from roost.broker.dedup import DedupHook
from roost.broker.delayed import DelayedExchange, DelayStore
from roost.broker.errors import BrokerError
from roost.broker.journal import Journal
from roost.broker.users import UserStore
from roost.broker.vhost import ReplyRelay, VirtualHost

if TYPE_CHECKING:
    from roost.broker.read_models import ConnectionView

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_QUEUE_MEMORY_LIMIT = 128 * 1024 * 1024
# Each queue's queue_memory_limit while the memory alarm is set.
ALARM_QUEUE_MEMORY_LIMIT = 1024 * 1024
# Body bytes Broker.page_out_step pages out per call.
PAGE_OUT_STEP = 16 * 1024 * 1024
# Bytes read from clients between two memory checks, at most (see received()).
INGRESS_CHECK_BYTES = 4 * 1024 * 1024


# RabbitMQ's reply text for a close the server decided on (with 320).
FORCED_CLOSE_TEXT = "broker forced connection closure"


class ClientConnection(Protocol):
    """What the broker needs of an open client connection (AMQP or other):
    who it is, where, a way to close it, and a description of itself and
    its channels for the management adapters."""

    username: str
    vhost: VirtualHost | None

    def close(
        self, code: int = errors.CONNECTION_FORCED, text: str = FORCED_CLOSE_TEXT
    ) -> None: ...

    def describe(self) -> ConnectionView: ...


class Broker:
    def __init__(
        self,
        *,
        default_user: str = "guest",
        default_password: str = "guest",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        journal: Journal | None = None,
        max_connections: int = 0,
        max_connections_per_vhost: int = 0,
        max_connections_per_user: int = 0,
        max_queues_per_vhost: int = 0,
        queue_memory_limit: int = DEFAULT_QUEUE_MEMORY_LIMIT,
        loopback_users: Iterable[str] = ("guest",),
    ) -> None:
        self.journal = journal
        self.scheduler: Callable[[float, Callable[[], None]], Any] | None = None
        self.persist_dedup: DedupHook | None = None
        self.max_message_size = max_message_size
        # Called whenever a durable definition changes (set by the store).
        self.on_definitions_changed: Callable[[], None] | None = None
        # Bumped on every durable change; the store calls back once a save
        # covering a given generation is written.
        self.definitions_generation = 0
        self.definitions_saved_hook: Callable[[int, Callable[[], None]], None] | None = None
        # Cluster mode: the vhosts are shared by the nodes (VirtualHost.clustered).
        self.clustered = False
        # Cluster mode: where delayed exchanges keep what they hold (every vhost's).
        self.delay_store: DelayStore | None = None
        # Cluster mode: direct reply-to across nodes (VirtualHost.reply_relay).
        self.reply_relay: ReplyRelay | None = None
        self.next_queue_id = 1
        # Log ids of deleted queues and delayed exchanges that may still have
        # unsettled records on disk: recovery drops those records instead of
        # refusing to start over data it cannot attribute.
        self.deleted_store_ids: set[int] = set()
        self.vhosts: dict[str, VirtualHost] = {}
        self.users = UserStore()
        # (user, vhost) -> (configure, write, read) patterns (see access.py).
        self.permissions: dict[tuple[str, str], Permissions] = {}
        # Limits (0: none), enforced where RabbitMQ enforces them: connections
        # at connection.open, queues when a client declares a new one.
        self.max_connections = max_connections
        self.max_connections_per_vhost = max_connections_per_vhost
        self.max_connections_per_user = max_connections_per_user
        self.max_queues_per_vhost = max_queues_per_vhost
        self.queue_memory_limit = queue_memory_limit
        # Users that may log in from loopback addresses only (RabbitMQ's
        # loopback_users), and per-address back-off after failed logins.
        self.loopback_users = frozenset(loopback_users)
        self.login_throttle = LoginThrottle()
        # Connections that completed connection.open.
        self.connections: set[ClientConnection] = set()
        # Resource alarms (memory, disk): while any is set, publishers block.
        # Each alarm lasts while any of its sources holds it (the disk alarm
        # has two: the free-space check and failing writes).
        self.alarms: set[str] = set()
        self._alarm_sources: dict[str, set[str]] = {}
        self._alarm_listeners: list[Callable[[bool, str], None]] = []
        self._paging_out = False  # the memory alarm's page-out is unfinished
        # Set by roost.resources.ResourceMonitor; see received().
        self.memory_check: Callable[[], None] | None = None
        self._ingress_left = INGRESS_CHECK_BYTES
        # The thresholds of the memory and disk checks, in bytes (set by
        # roost.resources.ResourceMonitor; 0 while nothing checks).
        self.memory_limit = 0
        self.disk_free_limit = 0
        self.default_user = default_user
        self.default_password = default_password
        self.add_vhost("/")
        self.ensure_default_user()
        # Message counters of deleted vhosts (stats.VHOST_KEYS order), and
        # the rate sampler, started with the scheduler.
        self.retired_counts: tuple[int, ...] = (0,) * len(stats.VHOST_KEYS)
        self.retired_dead_lettered: dict[tuple[str, str], int] = {}
        self.stats = stats.Sampler(self)

    def set_scheduler(self, scheduler: Callable[[float, Callable[[], None]], Any]) -> None:
        """Give every vhost (now and later) a timer source and start the
        timers of queues that already exist (after recovery)."""
        self.scheduler = scheduler
        self.stats.start(scheduler)
        for vh in self.vhosts.values():
            vh.scheduler = scheduler
            for q in list(vh.queues.values()):
                q.start_timers()
            for ex in list(vh.exchanges.values()):
                if isinstance(ex, DelayedExchange):
                    ex.start_timer()

    def set_dedup_persistence(self, hook: DedupHook) -> None:
        """Keep durable queues' and exchanges' dedup caches (declared from
        now on, in every vhost) through ``hook``."""
        self.persist_dedup = hook
        for vh in self.vhosts.values():
            vh.persist_dedup = hook

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
                retire_store_id=self._retire_store_id,
                store_id_settled=self._store_id_settled,
            )
            vh.scheduler = self.scheduler
            vh.persist_dedup = self.persist_dedup
            vh.clustered = self.clustered
            vh.delay_store = self.delay_store
            vh.reply_relay = self.reply_relay
            vh.queue_memory_limit = self._vhost_queue_memory_limit()
            self.definitions_changed()
        return vh

    def delete_vhost(self, name: str) -> bool:
        """Delete a virtual host as ``rabbitmqctl delete_vhost`` does: close
        its connections with 320, delete its queues (and their stored
        messages), exchanges and bindings, and its users' permissions on it.
        Returns False when there is no such vhost."""
        vh = self.vhosts.get(name)
        if vh is None:
            return False
        for conn in [c for c in self.connections if c.vhost is vh]:
            conn.close(errors.CONNECTION_FORCED, f"vhost '{name}' is down")
        del self.vhosts[name]
        vh.clear()
        stats.retire_vhost(self, vh)
        for key in [k for k in self.permissions if k[1] == name]:
            del self.permissions[key]
        self.definitions_changed()
        return True

    def ensure_default_user(self) -> None:
        """Create the default user (guest), with full permissions on "/",
        when there is no user at all: a new broker starts with it, and a
        data directory's own definitions replace it
        (``definitions.restore``), so a deleted guest stays deleted."""
        if self.users.users:
            return
        self.users.add(self.default_user, self.default_password, ("administrator",))
        self.permissions[(self.default_user, "/")] = (".*", ".*", ".*")

    # -- connections ----------------------------------------------------

    def connection_opening(self, user: str, vhost_name: str) -> VirtualHost:
        """The checks of RabbitMQ's connection.open, in its order: the
        connection limits (node, vhost, user), then access to the vhost.
        Returns the vhost or raises 530 NOT_ALLOWED."""
        conns = self.connections
        if self.max_connections and len(conns) >= self.max_connections:
            raise BrokerError(
                errors.NOT_ALLOWED,
                f"connection refused: node connection limit ({self.max_connections}) is reached",
            )
        vh = self.vhosts.get(vhost_name)
        if vh is None:
            raise BrokerError(errors.NOT_ALLOWED, f"vhost {vhost_name} not found")
        limit = self.max_connections_per_vhost
        if limit and sum(1 for c in conns if c.vhost is vh) >= limit:
            raise BrokerError(
                errors.NOT_ALLOWED,
                f"access to vhost '{vhost_name}' refused for user '{user}': "
                f"connection limit ({limit}) is reached",
            )
        limit = self.max_connections_per_user
        if limit and sum(1 for c in conns if c.username == user) >= limit:
            raise BrokerError(
                errors.NOT_ALLOWED,
                f"connection refused for user '{user}': user connection limit ({limit}) is reached",
            )
        if (user, vhost_name) not in self.permissions:
            raise BrokerError(
                errors.NOT_ALLOWED, f"access to vhost '{vhost_name}' refused for user '{user}'"
            )
        return vh

    def allocate_queue_id(self) -> int:
        qid = self.next_queue_id
        self.next_queue_id += 1
        return qid

    def _retire_store_id(self, store_id: int) -> None:
        self.deleted_store_ids.add(store_id)

    def _store_id_settled(self, store_id: int) -> None:
        """Everything logged under a deleted id has been settled: forget the
        id once that is on disk. Not written at once: a stale id in the
        definitions costs nothing, and the next save drops it."""
        journal = self.journal
        if journal is not None:
            journal.wait_durable(
                journal.barrier(), lambda: self.deleted_store_ids.discard(store_id)
            )

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything written to the log so far is on
        disk (at once without a log)."""
        journal = self.journal
        if journal is None:
            callback()
        else:
            journal.wait_durable(journal.barrier(), callback)

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

    @property
    def blocked_reason(self) -> str:
        """connection.blocked's reason, worded as RabbitMQ's ("low on memory",
        "low on disk & memory")."""
        return "low on " + " & ".join(sorted(self.alarms))

    def received(self, nbytes: int) -> None:
        """Count bytes read from clients: every INGRESS_CHECK_BYTES the
        memory check runs at once instead of at its next tick, so a fast
        publisher cannot carry the broker far past the watermark between
        two ticks."""
        self._ingress_left -= nbytes
        if self._ingress_left < 0:
            self._ingress_left = INGRESS_CHECK_BYTES
            if self.memory_check is not None:
                self.memory_check()

    def watch_alarms(self, listener: Callable[[bool, str], None]) -> None:
        self._alarm_listeners.append(listener)

    def unwatch_alarms(self, listener: Callable[[bool, str], None]) -> None:
        if listener in self._alarm_listeners:
            self._alarm_listeners.remove(listener)

    def has_alarm(self, resource: str, source: str = "") -> bool:
        return source in self._alarm_sources.get(resource, ())

    def set_alarm(self, resource: str, source: str = "") -> None:
        self._alarm_sources.setdefault(resource, set()).add(source)
        if resource in self.alarms:
            return
        was_blocked = self.blocked
        self.alarms.add(resource)
        if resource == "memory":
            self._apply_queue_memory_limit()
            self._paging_out = True
            self.page_out_step()
        if not was_blocked:
            self._notify(True, self.blocked_reason)

    def clear_alarm(self, resource: str, source: str = "") -> None:
        sources = self._alarm_sources.get(resource)
        if sources is not None:
            sources.discard(source)
            if sources:
                return  # another source still holds it
            del self._alarm_sources[resource]
        if resource not in self.alarms:
            return
        self.alarms.discard(resource)
        if resource == "memory":
            self._apply_queue_memory_limit()
            self._paging_out = False
        if not self.blocked:
            self._notify(False, "")

    def page_out_step(self) -> None:
        """While the memory alarm is set, page out what queues hold in memory
        beyond the alarm's limit, PAGE_OUT_STEP body bytes at a time (the
        resource monitor calls again on every check): all at once, the
        records being written and the bodies not yet given back to the
        system would briefly double that memory."""
        if not self._paging_out:
            return
        budget = PAGE_OUT_STEP
        for vh in self.vhosts.values():
            for q in vh.queues.values():
                budget -= q.page_out_tail(budget)
                if budget <= 0:
                    return
        self._paging_out = False  # done; new messages are paged as they come

    def _vhost_queue_memory_limit(self) -> int:
        """What queues may keep in memory: while the memory alarm is set,
        next to nothing, so messages go to the message log instead."""
        if "memory" in self.alarms:
            return min(self.queue_memory_limit, ALARM_QUEUE_MEMORY_LIMIT)
        return self.queue_memory_limit

    def _apply_queue_memory_limit(self) -> None:
        limit = self._vhost_queue_memory_limit()
        for vh in self.vhosts.values():
            vh.queue_memory_limit = limit

    def _notify(self, blocked: bool, reason: str) -> None:
        for listener in list(self._alarm_listeners):
            listener(blocked, reason)
