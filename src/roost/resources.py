"""Resource alarms, as RabbitMQ's: a periodic check of the broker's memory
(resident set size) against ``memory_high_watermark`` and of the data
directory's free disk space against ``disk_free_limit``. Either alarm blocks
publishing connections (see Broker.set_alarm and AMQPConnection). When
the memory alarm goes off, queues page the messages they hold in memory
out to the message log (all but ~1 MiB each: Broker lowers
queue_memory_limit) and keep paging new ones while it lasts, so memory
falls without waiting for consumers."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("roost")

MEMORY_ALARM = "memory"
DISK_ALARM = "disk"
# The source name of the free-space check; the store raises "disk" under its
# own source when writes fail, and the alarm lasts while either holds it.
DISK_FREE_SOURCE = "disk_free_limit"
# Likewise the watermark check holds "memory" under its own source, so it
# never clears an alarm something else set.
MEMORY_SOURCE = "memory_high_watermark"
CHECK_INTERVAL = 0.1
# The memory alarm clears only below this share of the watermark, so a
# broker hovering at the watermark does not flap between blocked and not.
MEMORY_CLEAR_RATIO = 0.9

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """An absolute size: bytes, or with a unit as RabbitMQ accepts them
    (``50MB`` = 50,000,000; ``1GiB`` = 2**30). Raises ValueError."""
    m = _SIZE.fullmatch(text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 50MB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_memory_watermark(text: str, total_ram: int) -> int:
    """The memory alarm threshold in bytes: a fraction of ``total_ram``
    (``0.4``, RabbitMQ's vm_memory_high_watermark.relative) when the value
    is a plain number of at most 1, else an absolute size (``256MB``,
    vm_memory_high_watermark.absolute). Raises ValueError."""
    stripped = text.strip()
    try:
        fraction = float(stripped)
    except ValueError:
        fraction = None
    if fraction is not None and fraction <= 1:
        if fraction <= 0:
            raise ValueError(f"a fraction of the RAM must be above 0, got {text!r}")
        return int(total_ram * fraction)
    size = parse_size(stripped)
    if size <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return size


def total_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def rss() -> int:
    """The process's resident set size in bytes (RabbitMQ's default
    ``mem_calculation_strategy`` is ``rss`` too)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # No /proc (macOS): the peak RSS is the best there is.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): hands freed heap pages back to the system.
    Without it the RSS of a drained broker can stay near its peak, and the
    memory alarm, measured on the RSS, would never clear."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


class ResourceMonitor:
    """Checks memory and disk every CHECK_INTERVAL seconds on the broker's
    loop and sets or clears the broker's alarms. ``rss`` and ``disk_free``
    can be replaced (tests)."""

    def __init__(
        self,
        broker: Any,
        *,
        memory_limit: int,
        disk_free_limit: int,
        data_dir: Path,
        rss: Callable[[], int] = rss,
        disk_free: Callable[[Path], int] = disk_free,
    ) -> None:
        self.broker = broker
        self.memory_limit = memory_limit
        self.disk_free_limit = disk_free_limit
        broker.memory_limit = memory_limit  # reported by the management API
        broker.disk_free_limit = disk_free_limit
        self.data_dir = data_dir
        self.rss = rss
        self.disk_free = disk_free
        self._trim = _malloc_trim()
        self._handle: Any = None
        self._stopped = False

    def start(self, scheduler: Callable[[float, Callable[[], None]], Any]) -> None:
        def tick() -> None:
            if self._stopped:
                return
            self.check()
            self._handle = scheduler(CHECK_INTERVAL, tick)

        self.check()
        self._handle = scheduler(CHECK_INTERVAL, tick)
        # Between ticks too, after every few MB read from clients.
        self.broker.memory_check = self.check_memory

    def stop(self) -> None:
        self._stopped = True
        self.broker.memory_check = None
        if self._handle is not None and hasattr(self._handle, "cancel"):
            self._handle.cancel()

    def check(self) -> None:
        self.check_memory()
        self.check_disk()

    def check_memory(self) -> None:
        if not self.memory_limit:
            return
        self.broker.page_out_step()  # a no-op unless the alarm's page-out is unfinished
        used = self.rss()
        alarmed = self.broker.has_alarm(MEMORY_ALARM, MEMORY_SOURCE)
        if alarmed and used >= self.memory_limit * MEMORY_CLEAR_RATIO:
            # Freed memory may still count in the RSS: give it back first.
            self._trim()
            used = self.rss()
        if not alarmed and used > self.memory_limit:
            log.warning(
                "memory alarm set: %d bytes used, above the watermark of %d",
                used,
                self.memory_limit,
            )
            self.broker.set_alarm(MEMORY_ALARM, MEMORY_SOURCE)
        elif alarmed and used < self.memory_limit * MEMORY_CLEAR_RATIO:
            log.info("memory alarm cleared: %d bytes used", used)
            self.broker.clear_alarm(MEMORY_ALARM, MEMORY_SOURCE)

    def check_disk(self) -> None:
        if not self.disk_free_limit:
            return
        try:
            free = self.disk_free(self.data_dir)
        except OSError as exc:
            log.error("cannot check the free disk space of %s: %s", self.data_dir, exc)
            return
        alarmed = self.broker.has_alarm(DISK_ALARM, DISK_FREE_SOURCE)
        if not alarmed and free < self.disk_free_limit:
            log.warning(
                "disk alarm set: %d bytes free on %s, below the limit of %d",
                free,
                self.data_dir,
                self.disk_free_limit,
            )
            self.broker.set_alarm(DISK_ALARM, DISK_FREE_SOURCE)
        elif alarmed and free >= self.disk_free_limit:
            log.info("disk free-space alarm cleared: %d bytes free", free)
            self.broker.clear_alarm(DISK_ALARM, DISK_FREE_SOURCE)
