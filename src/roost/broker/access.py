"""Access control: permission checks, loopback-only users, login throttling.

Permissions follow RabbitMQ's internal authorisation backend
(``rabbit_auth_backend_internal``): each user has, per virtual host, three
regular expressions (configure, write, read). A resource is permitted when
its name *matches anywhere* in the pattern (``re:run`` without anchors, so
``"q"`` permits ``"myqueue"``; write ``"^q$"`` to mean exactly ``q``); an
empty pattern permits nothing (RabbitMQ turns it into ``^$``). The default
exchange is checked under the name ``amq.default``. The refusal is a 403
with RabbitMQ 3.10's text, "access to queue 'q' in vhost '/' refused for
user 'bob'".
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from roost import safe_regex
from roost.broker.errors import BrokerError, access_refused, precondition
from roost.safe_regex import SafePattern

log = logging.getLogger("roost.access")

CONFIGURE = 0
WRITE = 1
READ = 2

Permissions = tuple[str, str, str]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> SafePattern | None:
    try:
        return safe_regex.compile_pattern(pattern or "^$")
    except safe_regex.InvalidPattern as exc:
        # Patterns are validated when they are set; one that slipped in (a
        # hand-edited definitions file, or one Python's re accepted before
        # patterns ran on RE2) permits nothing.
        log.warning(
            "invalid permission pattern %r (%s): treated as permitting nothing", pattern, exc
        )
        return None


def permitted(perms: Permissions | None, which: int, name: str) -> bool:
    """Whether ``perms`` grant permission ``which`` (CONFIGURE, WRITE or
    READ) on a resource called ``name``; compiled patterns are cached."""
    if perms is None:
        return False
    regex = _compile(perms[which])
    return regex is not None and regex.search(name)


def resource_name(kind: str, name: str) -> str:
    # rabbit_access_control checks the default exchange as amq.default.
    return "amq.default" if kind == "exchange" and not name else name


def check(
    perms: Permissions | None, which: int, kind: str, name: str, vhost: str, user: str
) -> None:
    """Raise RabbitMQ's 403 unless ``perms`` permit ``which`` on ``name``."""
    name = resource_name(kind, name)
    if not permitted(perms, which, name):
        raise refused(kind, name, vhost, user)


def refused(kind: str, name: str, vhost: str, user: str) -> BrokerError:
    return access_refused(
        f"access to {kind} '{resource_name(kind, name)}' in vhost '{vhost}' "
        f"refused for user '{user}'"
    )


@dataclass(frozen=True, slots=True)
class Actor:
    """A user acting on the resources of one vhost: the one authorization
    path that AMQP channels, the management API and ``roost ctl`` all go
    through, with rabbit_channel's rules. The permission table is read on
    every check, so a change applies at once to every way in."""

    user: str
    vhost: str
    permissions: Mapping[tuple[str, str], Permissions]

    @property
    def perms(self) -> Permissions | None:
        return self.permissions.get((self.user, self.vhost))

    def check(self, which: int, kind: str, name: str) -> None:
        check(self.perms, which, kind, name, self.vhost, self.user)

    def may_declare_exchange(self, name: str, new: bool, arguments: Mapping[str, Any]) -> None:
        # A new exchange with an alternate exchange also needs read on
        # itself and write on the alternate.
        self.check(CONFIGURE, "exchange", name)
        ae = arguments.get("alternate-exchange")
        if new and isinstance(ae, str):
            self.check(READ, "exchange", name)
            self.check(WRITE, "exchange", ae)

    def may_declare_queue(self, name: str, new: bool, arguments: Mapping[str, Any]) -> None:
        # A new queue with a dead-letter exchange also needs read on itself
        # and write on that exchange.
        self.check(CONFIGURE, "queue", name)
        dlx = arguments.get("x-dead-letter-exchange")
        if new and isinstance(dlx, str):
            self.check(READ, "queue", name)
            self.check(WRITE, "exchange", dlx)

    def may_bind(self, kind: str, destination: str, source: str) -> None:
        """rabbit_channel:binding_action_with_checks: write on the
        destination, the default exchange refused, read on the source
        (binding and unbinding alike)."""
        self.check(WRITE, kind, destination)
        if not source or (kind == "exchange" and not destination):
            raise access_refused("operation not permitted on the default exchange")
        self.check(READ, "exchange", source)

    def may_publish_as(self, user_id: str | None) -> None:
        """A published ``user_id`` must name the publishing user."""
        if user_id is not None and user_id != self.user:
            raise precondition(
                f"user_id property set to '{user_id}' but authenticated user was '{self.user}'"
            )


def check_not_internal(name: str, internal: bool, vhost: str) -> None:
    """Clients never publish to an internal exchange (403, as RabbitMQ)."""
    if internal:
        raise access_refused(f"cannot publish to internal exchange '{name}' in vhost '{vhost}'")


def is_loopback(host: str) -> bool:
    """Whether a peer address is a loopback one (127.0.0.0/8, ::1, or an
    IPv4-mapped loopback). A peer that is not an IP address at all (a Unix
    socket) is local too."""
    if not host:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def loopback_allowed(user: str, host: str, loopback_users: frozenset[str]) -> bool:
    """RabbitMQ's ``check_user_loopback``: users listed in ``loopback_users``
    (by default guest) may only log in from a loopback address."""
    return user not in loopback_users or is_loopback(host)


class LoginThrottle:
    """Refuses logins from an address, or to an account, that failed too
    often.

    After ``max_failures`` failed logins from one address within ``window``
    seconds, every login attempt from it is refused without looking at the
    credentials for ``backoff`` seconds, so guessing passwords costs the
    guesser time rather than the broker CPU. Successful logins do not reset
    the count: a client holding one valid account must not be able to
    interleave guesses for another.

    Guesses for one account spread over many addresses are caught per
    user: after ``max_user_failures`` failures for one user name within
    ``window``, logins as that user are refused for ``backoff`` seconds too
    -- except from an address that logged in as that user before, so that
    someone guessing cannot lock its clients out. Attempts refused during a
    back-off do not count, so no block outlasts the guessing by more than
    ``backoff``.
    """

    MAX_TRACKED = 10000

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 10.0,
        backoff: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_user_failures: int = 10,
    ) -> None:
        self.max_failures = max_failures
        self.max_user_failures = max_user_failures
        self.window = window
        self.backoff = backoff
        self.clock = clock
        # Keyed by ("address", host) or ("user", name).
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._blocked: dict[tuple[str, str], float] = {}
        # (user, host) pairs that logged in, oldest first.
        self._known: dict[tuple[str, str], None] = {}

    def blocked(self, host: str, user: str | None = None) -> bool:
        """Whether a login from ``host`` (as ``user``, once its name is
        known) is to be refused without checking the credentials."""
        if self._is_blocked(("address", host)):
            return True
        if user is None or (user, host) in self._known:
            return False
        return self._is_blocked(("user", user))

    def failed(self, host: str, user: str = "") -> str | None:
        """Record a failed login; what is now blocked (``"address 'h'"`` or
        ``"user 'u'"``), or None."""
        now = self.clock()
        if self._count(("address", host), self.max_failures, now):
            return f"address '{host}'"
        if user and self._count(("user", user), self.max_user_failures, now):
            return f"user '{user}'"
        return None

    def succeeded(self, host: str, user: str) -> None:
        """Remember that ``user`` logged in from ``host``."""
        key = (user, host)
        self._known.pop(key, None)
        if len(self._known) >= self.MAX_TRACKED:
            del self._known[next(iter(self._known))]
        self._known[key] = None

    def _is_blocked(self, key: tuple[str, str]) -> bool:
        until = self._blocked.get(key)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._blocked[key]
        return False

    def _count(self, key: tuple[str, str], limit: int, now: float) -> bool:
        if limit <= 0:
            return False
        recent = self._failures.get(key)
        if recent is None:
            if len(self._failures) >= self.MAX_TRACKED:
                self._prune(now)
            recent = self._failures[key] = deque()
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) < limit:
            return False
        del self._failures[key]
        self._blocked[key] = now + self.backoff
        return True

    def _prune(self, now: float) -> None:
        for key, recent in list(self._failures.items()):
            if not recent or recent[-1] <= now - self.window:
                del self._failures[key]
        for key, until in list(self._blocked.items()):
            if until <= now:
                del self._blocked[key]
        # Still full of fresh entries (names made up by the thousand): the
        # oldest go, so memory stays bounded.
        while len(self._failures) >= self.MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
