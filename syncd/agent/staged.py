"""The push agent's side of ``state_dir/staging`` for one session.

It owns what the planner, the staging threads and the publisher share about
staging: its directory fd and the names made in it (syncd.staging), which
objects are staged, the metadata the staging threads give them, which of them
this session hashed itself, and the one ``syncfs`` that makes them durable.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
from pathlib import Path

from .. import staging as names
from ..errors import DISK_FULL_ERRNOS, UnsafePathError
from ..fsops import BufferPool, SafeRoot, copy_extents, syncfs, unlink_at
from ..messages import Row

_PID = os.getpid()  # temporary names carry it; an agent never forks

Meta = tuple[int, int]  # (mode, mtime_ns)


class Staging:
    """``state_dir/staging`` as this agent uses it; open from construction to :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(mode=0o700, exist_ok=True)
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.buffers = BufferPool(write_behind=True)  # for the staging threads' DirectWriters
        self._counter = itertools.count(1)
        # Staged objects whose SHA-256 this session computed from the bytes it wrote.
        self.verified_now: set[str] = set()
        # Planning asks "is this object staged?" once per new file: answered
        # from one listing at begin plus what this push staged since, not by
        # a stat each in the staging directory (where the staging threads'
        # creates and renames hold its lock: docs/performance.md, "The agent").
        self._at_begin: set[str] = set()
        self._this_push: set[str] = set()
        # path -> (mode, mtime_ns) a staging thread gives the file it stages;
        # object -> what it gave.
        self._wanted: dict[bytes, Meta] = {}
        self._applied: dict[str, Meta] = {}
        self._sync_lock = threading.Lock()
        self._sync_error: OSError | None = None  # sticky (see sync)
        self._background: threading.Thread | None = None

    # -- names --------------------------------------------------------------------------

    def new_tmp(self) -> str:
        # next() on a count is atomic under the GIL: the staging threads name
        # their files too.
        return f"{names.TMP_PREFIX}{_PID}.{next(self._counter)}"

    def new_trash(self) -> str:
        return f"{names.TRASH_PREFIX}{_PID}.{next(self._counter)}"

    def scratch(self, what: str) -> Path:
        """A scratch file of this process in staging (removed by :func:`staging.clean` after a kill)."""
        return self.path / f"{names.TMP_PREFIX}{_PID}.{what}"

    def clean(self, *, everything: bool = False) -> None:
        """Temporaries of writers that are gone (syncd.staging.clean); with
        ``everything``, after a commit, every object and this process's own."""
        names.clean(self.fd, stale=True, everything=everything)

    # -- what is staged -------------------------------------------------------------------

    def begin_push(self) -> None:
        self._at_begin = names.staged_objects(self.fd)
        self._this_push = set()
        self._wanted = {}
        self._applied = {}

    def has(self, obj: str) -> bool:
        """Whether object ``obj`` is staged (as of begin, or by this push since)."""
        return obj in self._at_begin or obj in self._this_push

    def exists(self, obj: str) -> bool:
        """Whether object ``obj`` is in staging now (a stat)."""
        try:
            return stat.S_ISREG(os.stat(obj, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def staged(self, obj: str, meta: Meta | None) -> None:
        """``obj`` was staged from bytes this session hashed, with ``meta`` given (or none)."""
        self.verified_now.add(obj)
        self._this_push.add(obj)
        if meta is not None:
            self._applied[obj] = meta

    def want_meta(self, path: bytes, mode: int, mtime_ns: int) -> None:
        """The staging thread gives ``path``'s file this mode and mtime after its last write."""
        self._wanted[path] = (mode, mtime_ns)

    def wanted_meta(self, path: bytes) -> Meta | None:
        return self._wanted.get(path)

    def applied(self, obj: str) -> Meta | None:
        """The mode and mtime a staging thread gave ``obj``, if it did."""
        return self._applied.get(obj)

    # -- copies -------------------------------------------------------------------------

    def copy_from(self, root: SafeRoot, row: Row, sources: list[bytes]) -> bytes | None:
        """Stage ``row``'s content from the first of ``sources`` (paths in
        ``root``) whose bytes match its SHA-256; the source used, or None.
        A full disk raises."""
        for src in sources:
            tmp = self.new_tmp()
            try:
                _, digest = root.copy_into(src, self.fd, tmp, self.buffers)
                if digest != row.sha256:
                    os.unlink(tmp, dir_fd=self.fd)
                    continue
                obj = row.sha256.hex()
                os.rename(tmp, obj, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                self.staged(obj, None)
                return src
            except (OSError, UnsafePathError) as err:
                if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
                    raise
                unlink_at(self.fd, tmp)
        return None

    def copy_object(self, obj: str) -> str:
        """A copy of object ``obj`` under a new temporary name (holes stay holes)."""
        dst = self.new_tmp()
        sfd = os.open(obj, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=self.fd)
            try:
                copy_extents(sfd, dfd, os.fstat(sfd).st_size)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        return dst

    def give_meta(self, name: str, mode: int, mtime_ns: int) -> None:
        """Give the staged file ``name`` its final mode and mtime."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    # -- durability -----------------------------------------------------------------------

    def sync(self) -> None:
        """``syncfs`` of staging, one caller at a time, and sticky: a write-out
        error is reported to one ``syncfs`` call only, so whoever meets it
        records it for every later caller (the early syncfs thread, the
        early publisher, the commit) and none goes on to rename."""
        with self._sync_lock:
            if self._sync_error is None:
                try:
                    syncfs(self.fd)
                except OSError as err:
                    self._sync_error = err
            if self._sync_error is not None:
                raise self._sync_error

    def sync_in_background(self) -> None:
        """Planning is over and the last files are arriving: write what is
        staged so far out now, in a thread, so that the commit's first syncfs
        finds little left (on an initial copy it was a third of the commit)."""
        self.join_background()

        def sync() -> None:
            try:
                self.sync()
            except OSError:
                pass  # sticky: the commit's own sync raises it, and nothing is published

        self._background = threading.Thread(target=sync, name="early-syncfs", daemon=True)
        self._background.start()

    def join_background(self) -> None:
        if self._background is not None:
            self._background.join()
            self._background = None

    def close(self) -> None:
        os.close(self.fd)

