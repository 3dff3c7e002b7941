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
from collections.abc import Callable

from roost import safe_regex
from roost.broker.errors import BrokerError, access_refused
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
    """Refuses logins from an address that failed too often.

    After ``max_failures`` failed logins from one address within ``window``
    seconds, every login attempt from it is refused without looking at the
    credentials for ``backoff`` seconds, so guessing passwords costs the
    guesser time rather than the broker CPU. Successful logins do not reset
    the count: a client holding one valid account must not be able to
    interleave guesses for another.
    """

    MAX_TRACKED = 10000

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 10.0,
        backoff: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.backoff = backoff
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def blocked(self, host: str) -> bool:
        until = self._blocked.get(host)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._blocked[host]
        return False

    def failed(self, host: str) -> bool:
        """Record a failed login; True when ``host`` is now blocked."""
        if self.max_failures <= 0:
            return False
        now = self.clock()
        recent = self._failures.get(host)
        if recent is None:
            if len(self._failures) >= self.MAX_TRACKED:
                self._prune(now)
            recent = self._failures[host] = deque()
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) < self.max_failures:
            return False
        del self._failures[host]
        self._blocked[host] = now + self.backoff
        return True

    def _prune(self, now: float) -> None:
        for host, recent in list(self._failures.items()):
            if not recent or recent[-1] <= now - self.window:
                del self._failures[host]
        for host, until in list(self._blocked.items()):
            if until <= now:
                del self._blocked[host]
