"""Giving disk blocks back from the middle of a file (Linux hole punching).

``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` frees the blocks
of a byte range while the file keeps its size and every other byte its
offset, so records that are still needed stay exactly where the queues
expect them. Where the call is missing or the filesystem refuses it,
:func:`punch_hole` returns False and the space is reclaimed only when the
whole segment goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096

_fallocate: Any = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc
    pass


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the whole blocks inside ``[offset, offset + length)``; the
    range reads back as zeros. Returns False when unsupported."""
    start = -(-offset // BLOCK) * BLOCK
    end = (offset + length) // BLOCK * BLOCK
    if _fallocate is None or end <= start:
        return False
    rc = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    return True
