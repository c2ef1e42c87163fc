"""``root`` as a directory fd: every write, delete and read below it.

:class:`SafeRoot` reaches every path by walking it one component at a time
from a directory fd with ``O_NOFOLLOW``, so a symlink already on the edge
(``root/pool -> /elsewhere``) is never followed, written through, deleted
through or chmod'ed through (docs/design.md, invariant 4).  Only ``root``
itself may be a symlink: the operator chose it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any, Callable

from ..errors import UnsafePathError
from ..manifest import fspath
from .names import show, validate_name
from .sync import fsync_dir
from .writers import BufferPool, copy_hashing

log = logging.getLogger(__package__)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO someone left on the edge must not hang the agent.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)


def _split(rel: bytes) -> tuple[list[bytes], bytes]:
    parts = rel.split(b"/")
    return parts[:-1], parts[-1]


_DIR_CACHE = 64  # directory fds a SafeRoot keeps open


class SafeRoot:
    """``root`` opened once as a directory fd; every operation is relative to it.

    Each method validates its ``rel`` first.  Directory fds returned to the
    caller (:meth:`open_dir`, :meth:`open_read`) are the caller's to close;
    every other fd is closed before the method returns, error or not.
    """

    def __init__(self, root: os.PathLike | str) -> None:
        self.root = os.fspath(root)
        # Following a symlink here is deliberate: root is the operator's choice.
        self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        # Directories walked to, kept open (least recently used first): a
        # walk starts from the longest cached prefix of its path, so going
        # through a tree costs about one open per new directory instead of
        # one per component.  Dropped on every change of the directory
        # structure this object makes.
        self._dirs: dict[tuple[bytes, ...], int] = {}

    def _drop_cache(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def forget(self) -> None:
        """Drop the directory fds kept open: the tree may have been changed by
        someone else since (call it when taking the lock for a new push)."""
        self._drop_cache()

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        self._drop_cache()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafeRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    # -- walking ------------------------------------------------------------

    def _unsafe(self, rel: bytes, upto: list[bytes], index: int, dir_fd: int) -> UnsafePathError:
        comp = upto[index]
        where = b"/".join(upto[: index + 1])
        try:
            st = os.stat(comp, dir_fd=dir_fd, follow_symlinks=False)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        except OSError:
            what = "a symlink or not a directory"
        return UnsafePathError(f"unsafe path {show(rel)!r}: {show(where)!r} is {what} on this host")

    def _borrow(self, rel: bytes, comps: list[bytes], create: bool = False) -> tuple[int, bool]:
        """The fd of directory ``comps`` and whether the caller must close it:
        a cached one is lent as it is (no dup and close per lookup).  Only
        for a caller that makes no other walk and drops no cache while it
        holds it (:meth:`_own` first where it must)."""
        if not comps:
            return self._fd, False
        cached = self._dirs.get(tuple(comps))
        if cached is not None:
            return cached, False
        return self._walk(rel, comps, create), True

    def _look(self, rel: bytes, call: Callable[[bytes, int], Any], absent: Any) -> Any:
        """``call(leaf, parent_fd)`` for a look at ``rel`` that changes
        nothing; None when a parent is missing or unsafe, or ``call`` raises
        one of ``absent``."""
        validate_name(rel)
        parents, leaf = _split(rel)
        try:
            pfd, owned = self._borrow(rel, parents)
        except (FileNotFoundError, UnsafePathError):
            return None
        try:
            return call(leaf, pfd)
        except absent:
            return None
        finally:
            if owned:
                os.close(pfd)

    def _walk(self, rel: bytes, comps: list[bytes], create: bool, mode: int = 0o755) -> int:
        """A new fd of the directory ``comps`` (a prefix of ``rel``'s components)."""
        if not comps:
            return os.dup(self._fd)
        dirs = self._dirs
        key = tuple(comps)
        start = len(comps)
        while start and (cached := dirs.get(key[:start])) is None:
            start -= 1
        if start:
            # Most recently used last: re-insert.
            del dirs[key[:start]]
            dirs[key[:start]] = cached
            if start == len(comps):
                return os.dup(cached)
            fd = cached  # lent: only opened from, before anything is evicted below
        else:
            fd = self._fd
        owned = False
        try:
            for i in range(start, len(comps)):
                comp = comps[i]
                try:
                    try:
                        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        try:
                            os.mkdir(comp, mode, dir_fd=fd)
                        except FileExistsError:
                            pass  # made by someone else meanwhile: the open below checks its type
                        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._unsafe(rel, comps, i, fd) from err
                    # Same errno and type, but naming the whole path, not one component.
                    raise OSError(err.errno, err.strerror, show(rel)) from err
                if owned:
                    os.close(fd)
                fd, owned = nfd, True
                # Every directory on the way is cached: siblings share it.
                if len(dirs) >= _DIR_CACHE:
                    os.close(dirs.pop(next(iter(dirs))))
                dirs[key[: i + 1]] = os.dup(fd)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        return fd

    def _parent(self, rel: bytes, *, create: bool) -> tuple[int, bytes]:
        validate_name(rel)
        parents, leaf = _split(rel)
        return self._walk(rel, parents, create), leaf

    def _lent_parent(self, rel: bytes, *, create: bool) -> tuple[int, bytes, bool]:
        """As :meth:`_parent`, but the parent's fd through :meth:`_borrow`:
        (fd, leaf, whether the caller closes it)."""
        validate_name(rel)
        parents, leaf = _split(rel)
        pfd, owned = self._borrow(rel, parents, create)
        return pfd, leaf, owned

    @staticmethod
    def _own(fd: int, owned: bool) -> int:
        """An fd of the caller's own for a lent one (before the cache is dropped)."""
        return fd if owned else os.dup(fd)

    # -- reading ------------------------------------------------------------

    def lstat(self, rel: bytes) -> os.stat_result | None:
        """stat of ``rel`` itself (a symlink is reported, not followed); None when absent.

        A parent component that is a symlink or not a directory means the path
        does not exist as such on this host: None.  ``b""`` is root itself.
        """
        if rel == b"":
            return os.fstat(self._fd)
        return self._look(rel, lambda leaf, pfd: os.stat(leaf, dir_fd=pfd, follow_symlinks=False),
                          (FileNotFoundError, NotADirectoryError))

    def open_dir(self, rel: bytes, *, create: bool = False, mode: int = 0o755) -> int:
        """fd of directory ``rel`` (``b""`` = root); the caller closes it.

        With ``create`` missing components are made (``mode``, less the umask).
        A component that is a symlink or not a directory is an UnsafePathError:
        never followed, never replaced here.  FileNotFoundError when absent and
        not ``create``.
        """
        if rel == b"":
            return os.dup(self._fd)
        validate_name(rel)
        return self._walk(rel, rel.split(b"/"), create, mode)

    def readlink(self, rel: bytes) -> bytes | None:
        """The target of the symlink ``rel``, or None when ``rel`` is absent,
        not a symlink, or below a symlink.  The target is read, never followed."""
        # OSError: absent (ENOENT) or not a symlink (EINVAL).
        return self._look(rel, lambda leaf, pfd: os.readlink(leaf, dir_fd=pfd), OSError)

    def open_read(self, rel: bytes) -> int:
        """A read-only fd on the regular file ``rel``; the caller closes it.

        FileNotFoundError when absent (or a parent is absent); UnsafePathError
        when the leaf or a parent is a symlink, or the leaf is not a regular
        file (a FIFO or device on the edge is never read).
        """
        pfd, leaf = self._parent(rel, create=False)
        try:
            fd = os.open(leaf, _READ_FLAGS, dir_fd=pfd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePathError(f"unsafe path {show(rel)!r}: is a symlink on this host") from err
            raise
        finally:
            os.close(pfd)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), fspath(rel))
            if not stat.S_ISREG(mode):
                raise UnsafePathError(f"unsafe path {show(rel)!r}: not a regular file on this host")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- writing ------------------------------------------------------------

    def publish(self, src_dir_fd: int, src_name: bytes, rel: bytes,
                park: Callable[[int, bytes, os.stat_result], object] | None = None) -> os.stat_result:
        """Move the staged entry ``src_name`` (in ``src_dir_fd``) to ``rel`` by one rename.

        An existing file or symlink at ``rel`` is replaced atomically (the
        symlink itself, never its target).  A directory at ``rel`` (the entry
        changed from directory to file) is removed first, without following
        anything inside it.  Missing parents are created (0o755); a parent that
        is a symlink or a file is an UnsafePathError.  Not fsync'ed: call
        :meth:`sync_dir` on the parents once a batch is published.
        ``park(parent_fd, leaf, stat)`` is called first when a regular file
        is replaced (it may keep a link to it, to free its blocks later).
        Returns the published entry's own stat (taken through the parent fd
        at hand: the caller records it without walking the path again).
        """
        pfd, leaf, owned = self._lent_parent(rel, create=True)
        try:
            if park is None:
                # Nothing to look at first (a new name, or a file or symlink
                # replaced): the rename alone; a directory in the way fails it.
                try:
                    os.rename(src_name, leaf, src_dir_fd=src_dir_fd, dst_dir_fd=pfd)
                    return os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
                except OSError as err:
                    if err.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                        raise
            try:
                st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if park is not None and st is not None and stat.S_ISREG(st.st_mode):
                park(pfd, leaf, st)
            if st is not None and stat.S_ISDIR(st.st_mode):
                log.debug("replacing directory %s with a file", show(rel))
                pfd, owned = self._own(pfd, owned), True
                self._drop_cache()
                _rmtree(pfd, leaf)
            os.rename(src_name, leaf, src_dir_fd=src_dir_fd, dst_dir_fd=pfd)
            return os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        finally:
            if owned:
                os.close(pfd)

    def link_out(self, rel: bytes, dst_dir_fd: int, dst_name: str | bytes, expect: tuple[int, int]) -> None:
        """Make ``dst_name`` (new, in ``dst_dir_fd``: staging) one more name of
        the file ``rel``, by ``link(2)``.

        The link is made from ``rel``'s parent fd (the walk there follows no
        symlink) without following ``rel`` itself: a symlink at ``rel`` gets
        the new name itself, its target is never reached.  ``expect`` is the
        ``(dev, ino)`` the caller found there: whatever stands at ``rel`` now
        that is not that (a symlink planted meanwhile, another file) is
        refused with an UnsafePathError, and the new name removed again.
        """
        pfd, leaf, owned = self._lent_parent(rel, create=False)
        try:
            os.link(leaf, dst_name, src_dir_fd=pfd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
        finally:
            if owned:
                os.close(pfd)
        st = os.stat(dst_name, dir_fd=dst_dir_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != tuple(expect):
            os.unlink(dst_name, dir_fd=dst_dir_fd)
            raise UnsafePathError(f"unsafe path {show(rel)!r}: no longer the file it was on this host")

    def ensure_dir(self, rel: bytes, mode: int) -> None:
        """Make ``rel`` a directory with permission bits ``mode``.

        A file or symlink in its place (the entry changed type) is unlinked
        first, never followed.  The mode is set through the directory's own fd.
        """
        pfd, leaf, owned = self._lent_parent(rel, create=True)
        try:
            try:
                os.mkdir(leaf, 0o700, dir_fd=pfd)  # a new one, mostly: nothing to look at first
            except FileExistsError:
                st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    log.debug("replacing %s with a directory", show(rel))
                    pfd, owned = self._own(pfd, owned), True
                    self._drop_cache()
                    os.unlink(leaf, dir_fd=pfd)
                    try:
                        os.mkdir(leaf, 0o700, dir_fd=pfd)
                    except FileExistsError:
                        pass  # raced with another maker; the O_NOFOLLOW open checks the type
            try:
                dfd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"unsafe path {show(rel)!r}: replaced by a non-directory meanwhile") from err
                raise
            try:
                os.fchmod(dfd, stat.S_IMODE(mode))
            finally:
                os.close(dfd)
        finally:
            if owned:
                os.close(pfd)

    def set_meta(self, rel: bytes, *, mode: int | None, mtime_ns: int | None) -> os.stat_result | None:
        """Set permission bits and/or mtime of ``rel`` without following a symlink.

        Files and directories go through an ``O_NOFOLLOW`` fd.  A symlink leaf
        gets only its own mtime (``mode`` is ignored: chmod through a symlink
        would change its target).  atime is kept.  Returns the entry's stat
        afterwards where that costs one fstat (the common case), else None.
        ``b""`` is root itself, through the fd this object holds.
        """
        if rel == b"":
            if mode is not None:
                os.fchmod(self._fd, stat.S_IMODE(mode))
            if mtime_ns is not None:
                os.utime(self._fd, ns=(os.fstat(self._fd).st_atime_ns, mtime_ns))
            return os.fstat(self._fd)
        if mode is None and mtime_ns is None:
            validate_name(rel)
            return None
        pfd, leaf, owned = self._lent_parent(rel, create=False)
        try:
            try:
                fd = os.open(leaf, _READ_FLAGS, dir_fd=pfd)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    if mtime_ns is not None:
                        st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
                        os.utime(leaf, ns=(st.st_atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
                    return None
                if err.errno != errno.EACCES or not _O_PATH:
                    raise
                # Unreadable to us (mode 000, agent not root): reach the inode by an
                # O_PATH fd; /proc/self/fd/N names exactly that inode, not a path.
                fd = os.open(leaf, _O_PATH | os.O_NOFOLLOW | _CLOEXEC, dir_fd=pfd)
                try:
                    if stat.S_ISLNK(os.fstat(fd).st_mode):
                        raise UnsafePathError(f"unsafe path {show(rel)!r}: became a symlink meanwhile") from err
                    proc = f"/proc/self/fd/{fd}"
                    if mode is not None:
                        os.chmod(proc, stat.S_IMODE(mode))
                    if mtime_ns is not None:
                        os.utime(proc, ns=(os.fstat(fd).st_atime_ns, mtime_ns))
                finally:
                    os.close(fd)
                return None
            try:
                if mode is not None:
                    os.fchmod(fd, stat.S_IMODE(mode))
                if mtime_ns is not None:
                    os.utime(fd, ns=(os.fstat(fd).st_atime_ns, mtime_ns))
                return os.fstat(fd)
            finally:
                os.close(fd)
        finally:
            if owned:
                os.close(pfd)

    def remove_empty_dir(self, rel: bytes) -> bool:
        """Remove ``rel`` if it is an empty directory (rmdir); False otherwise."""
        validate_name(rel)
        parents, leaf = _split(rel)
        try:
            pfd = self._walk(rel, parents, False)
        except (FileNotFoundError, UnsafePathError):
            return False
        try:
            self._drop_cache()  # no cached fd may outlive the directory
            os.rmdir(leaf, dir_fd=pfd)
            return True
        except OSError:
            return False  # not empty, not a directory, or gone
        finally:
            os.close(pfd)

    def remove(self, rel: bytes, park: Callable[[int, bytes], bool] | None = None) -> bool:
        """Remove the file, symlink or directory tree at ``rel``; False if absent.

        A retried delete is done, not an error.  Symlinks are unlinked, never
        followed, also inside a removed tree.  A parent that is a symlink or
        not a directory means ``rel`` does not exist as such here: False.
        ``park(parent_fd, leaf)``, when given, may take the entry away itself
        (returning True), to free a large file's blocks later.
        """
        validate_name(rel)
        parents, leaf = _split(rel)
        try:
            pfd = self._walk(rel, parents, False)
        except (FileNotFoundError, UnsafePathError) as err:
            log.debug("remove %s: nothing there (%s)", show(rel), err)
            return False
        try:
            try:
                if park is not None and park(pfd, leaf):
                    return True
                os.unlink(leaf, dir_fd=pfd)
                return True
            except FileNotFoundError:
                return False
            except OSError as err:
                # Linux says EISDIR for a directory; POSIX allows EPERM.
                if err.errno not in (errno.EISDIR, errno.EPERM):
                    raise
                self._drop_cache()  # a directory goes: no cached fd may outlive it
                st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise
            try:
                _rmtree(pfd, leaf)
            except FileNotFoundError:
                return False
            return True
        finally:
            os.close(pfd)

    def sync_dir(self, rel: bytes) -> None:
        """fsync directory ``rel`` (``b""`` = root) so that renames into it survive a crash."""
        fd = self.open_dir(rel)
        try:
            fsync_dir(fd)
        finally:
            os.close(fd)

    def copy_into(self, rel: bytes, dst_dir_fd: int, dst_name: bytes,
                  pool: BufferPool | None = None) -> tuple[int, bytes]:
        """Copy the regular file ``rel`` into a new file ``dst_name`` in ``dst_dir_fd``.

        ``dst_name`` must not exist (``O_EXCL``).  Not fsync'ed (the agent
        makes staging durable with one syncfs before it publishes); on
        failure the partial copy is unlinked.  Returns the bytes copied and
        their SHA-256, taken in the same pass: one read of the source, and
        with ``pool`` a write around the page cache (:class:`DirectWriter`),
        faster than ``copy_file_range`` followed by a re-read to hash the
        copy (docs/performance.md, "Writing to disk").  The new file is mode
        0600: the caller sets the final metadata.
        """
        src = self.open_read(rel)
        try:
            dst = os.open(dst_name, _CREATE_FLAGS, 0o600, dir_fd=dst_dir_fd)
            try:
                total = copy_hashing(src, dst, pool)
            except BaseException:
                os.close(dst)
                try:
                    os.unlink(dst_name, dir_fd=dst_dir_fd)
                except OSError:
                    pass
                raise
            os.close(dst)
            return total
        finally:
            os.close(src)



def _rmtree(parent_fd: int, name: bytes) -> None:
    """Remove directory ``name`` in ``parent_fd`` and all below it, following nothing.

    Iterative, so depth is bounded by open fds, not by Python's recursion
    limit; each directory is listed once.
    """
    # Each frame: this directory's fd, its name in the frame below, and the
    # subdirectories still to empty.
    stack: list[tuple[int, bytes, list[str]]] = []

    def enter(dir_fd: int, dname: bytes) -> None:
        fd = os.open(dname, _DIR_FLAGS, dir_fd=dir_fd)
        subdirs: list[str] = []
        stack.append((fd, dname, subdirs))
        with os.scandir(fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                    continue
                unlink_at(fd, entry.name)

    try:
        enter(parent_fd, name)
        while stack:
            fd, dname, subdirs = stack[-1]
            if subdirs:
                try:
                    enter(fd, os.fsencode(subdirs.pop()))
                except FileNotFoundError:
                    pass  # removed by someone else meanwhile: the goal holds
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(dname, dir_fd=stack[-1][0] if stack else parent_fd)
            except FileNotFoundError:
                pass
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def unlink_at(dir_fd: int, *names: str | bytes) -> None:
    """Remove these names from the directory ``dir_fd``; one already gone is no error."""
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
