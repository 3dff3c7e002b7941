"""Where the control socket lives, and how to reach it by a short path.

A Unix socket's path is limited to about 107 bytes, which a deep data
directory (a CI workspace, pytest's tmp_path) easily exceeds. Through an
``O_PATH`` descriptor of the directory, ``/proc/self/fd/N/roost.ctl`` names
the same file in a few bytes (Linux only; elsewhere the full path is used).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SOCKET_FILE = "roost.ctl"
_MAX_PATH = 100


def control_socket(data_dir: Path) -> Path:
    return data_dir / SOCKET_FILE


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A path for ``bind``/``connect`` naming ``path``, valid inside the block."""
    if len(os.fsencode(path)) <= _MAX_PATH or not os.path.isdir("/proc/self/fd"):
        yield str(path)
        return
    fd = os.open(path.parent, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
