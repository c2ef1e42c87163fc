"""``state_dir/touched-dirs``: the directories whose entries this node changed since its last commit."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from ..errors import UnsafePathError
from ..fsops import validate_name
from ..manifest import split

log = logging.getLogger(__package__)


class TouchedDirs:
    """The directories whose entries this node changed since its last commit.

    At the end of a commit every directory whose entries a push added,
    replaced or removed gets its upstream's mtime back (a rename or an
    unlink sets it to now).  A push cut short (kill -9 of either end, a
    lost link, a held-back generation) may already have changed some: the
    directory maker, the early publisher, a commit killed half-way.  A
    rerun's plan need not name those directories again (a file the killed
    push published is found in place and needs nothing), so the edge keeps
    the record itself: ``state_dir/touched-dirs``, one NUL-terminated path
    per directory (root is the empty one), appended *before* the change it
    announces and removed once a commit has put every mtime back and
    recorded its generation.  Each push reads it at ``begin``, under the
    lock.  kill -9 needs no sync (the page cache survives the process);
    where a ``syncfs`` precedes renames (early publisher, commit) it makes
    the record durable with the staged bytes.  The set is closed under
    parents: publishing may make missing directories, each of which changes
    its own parent.  Memory follows the directories touched, not the files.
    Called from the main, directory-maker and early-publisher threads.
    """

    NAME = "touched-dirs"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.NAME
        self._lock = threading.Lock()
        self._dirs: set[bytes] = set()
        self._fd = -1

    def load(self) -> None:
        """Take over what an earlier session recorded and did not repair."""
        with self._lock:
            self._dirs = set()
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return
            records = data.split(b"\0")
            records.pop()  # b"", or a record cut short by a kill: its change never happened
            for path in records:
                try:
                    if path:
                        validate_name(path)
                except UnsafePathError:
                    log.warning("%s: ignoring a bad record %r", self.path, path[:80])
                    continue
                self._close_under(path)

    def add(self, paths: Any) -> None:
        """Record the parent directories of ``paths`` (relative paths of
        entries about to be made, replaced or removed), and theirs.  Raises
        OSError when the record cannot be written: the change must not go
        ahead then."""
        # A set of parents first (docs/performance.md, "The agent").
        parents = {path.rpartition(b"/")[0] for path in paths}
        with self._lock:
            new: list[bytes] = []
            for d in parents - self._dirs:
                new += self._close_under(d)
            if not new:
                return
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            record = b"".join(d + b"\0" for d in new)
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                self._dirs.difference_update(new)  # not recorded: asked again next time
                raise

    def _close_under(self, d: bytes) -> list[bytes]:
        new = []
        while d not in self._dirs:
            self._dirs.add(d)
            new.append(d)
            if not d:
                break
            d = split(d)[0]
        return new

    def dirs(self) -> set[bytes]:
        with self._lock:
            return set(self._dirs)

    def clear(self) -> None:
        """Every directory recorded has its mtime back, and the generation is recorded."""
        with self._lock:
            self._close_fd()
            self._dirs = set()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
