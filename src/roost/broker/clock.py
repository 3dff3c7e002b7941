"""The clocks the broker model reads, in one place, so that a test driving
the model without an event loop can move time (TTL, delays, dedup cache
expiry, x-expires) instead of sleeping. Read them as ``clock.wall_ms()``,
not imported by name, so replacing them here reaches every reader."""

from __future__ import annotations

import time


def wall_ms() -> int:
    """Wall-clock milliseconds since the epoch (deadlines that survive a
    restart: message expiry, delayed delivery)."""
    return int(time.time() * 1000)


def monotonic_ms() -> float:
    """Milliseconds of a clock that never goes back (in-memory timeouts)."""
    return time.monotonic() * 1000
