"""Durability without an fsync per file, and the libc calls it takes.

Staged files start their write-out as they are closed (``sync_file_range``);
before anything is published, one ``syncfs`` makes staging and root durable
at once (they share a filesystem).  A directory's new names are made
durable by :func:`fsync_dir`.
"""

from __future__ import annotations

import errno
import os
from typing import Any

_libc: Any = None
_ctypes: Any = None  # the ctypes module, once load_libc has run

_SYNC_FILE_RANGE_WRITE = 2
# Staged files (and prewarm ranges) from this size on start their write-out
# at once; for smaller ones the separate writes cost more than they save
# (docs/performance.md, "Writing to disk").
WRITEBACK_MIN = 512 * 1024


def load_libc() -> Any:
    """The C library, loaded once, its 64-bit offset arguments declared.

    ctypes is imported here, at the first call, not with the module: every
    agent and stager start would pay for it (docs/performance.md,
    "Start-up"), and a push that stages nothing never calls this."""
    global _libc, _ctypes
    if _libc is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # off64_t arguments: say so, or ctypes passes ints.
        if hasattr(libc, "sync_file_range"):
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        if hasattr(libc, "fallocate"):
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc, _ctypes = libc, ctypes
    return _libc


def fsync_dir(fd: int) -> None:
    """Make the entries of the directory open as ``fd`` durable (new names, renames)."""
    os.fsync(fd)


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk, without waiting (sync_file_range)."""
    try:
        load_libc().sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    except AttributeError:
        pass  # not Linux: syncfs (or sync) at publish does all of it


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (staging and root share it): one call
    instead of an fsync per file.  Falls back to sync(2) where syncfs is missing."""
    try:
        libc = load_libc()
        if libc.syncfs(fd) == 0:
            return
        err = _ctypes.get_errno()
        if err != errno.ENOSYS:
            # EIO (reported since Linux 5.8): what was written may not be on
            # disk, so nothing may be published as if it were.
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    except AttributeError:
        pass
    os.sync()

