"""The agent's filesystem layer: every write, delete and read below ``root``.

Names from the wire are checked by :func:`validate_name` (``names``) before
anything touches the disk, and :class:`SafeRoot` (``saferoot``) reaches
every path from root's directory fd without following a symlink.  Below
them: ``writers`` (bulk writes around the page cache, sparse files, copies
hashed as they go) and ``sync`` (durability without an fsync per file).
The staged objects checked during this boot are syncd.staging's.

All paths are bytes relative to root, ``/``-separated; names need not be
UTF-8.  Unsafe names and symlinks met on the way raise
:class:`~syncd.errors.UnsafePathError`; every other failure is the
``OSError`` the kernel gave, errno intact, so the caller can tell a full disk
(``ENOSPC``) from a vanished file.

Nothing here creates a temporary name inside root: files are made elsewhere
(staging) and arrive by :meth:`SafeRoot.publish`, one ``rename(2)``.

The modules log as ``syncd.fsops``, the name this package always logged as.
"""

from __future__ import annotations

from .names import MAX_COMPONENT, MAX_PATH, show, validate_name
from .saferoot import SafeRoot, unlink_at
from .sync import WRITEBACK_MIN, fsync_dir, start_writeback, syncfs
from .writers import (DIRECT_ALIGN, DIRECT_MIN, BufferPool, DirectWriter, SparseWriter, copy_extents, punch_hole,
                      sha256_around_cache)

__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_MIN",
    "BufferPool",
    "DirectWriter",
    "SparseWriter",
    "copy_extents",
    "punch_hole",
    "sha256_around_cache",
    "MAX_COMPONENT",
    "MAX_PATH",
    "SafeRoot",
    "WRITEBACK_MIN",
    "unlink_at",
    "fsync_dir",
    "show",
    "start_writeback",
    "syncfs",
    "validate_name",
]
