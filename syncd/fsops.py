"""The agent's filesystem layer: every write, delete and read below ``root``.

Names from the wire are checked by :func:`validate_name` before anything
touches the disk, and :class:`SafeRoot` reaches every path by walking it one
component at a time from a directory fd with ``O_NOFOLLOW``, so a symlink
already on the edge (``root/pool -> /elsewhere``) is never followed, written
through, deleted through or chmod'ed through (docs/design.md, invariant 4).  Only
``root`` itself may be a symlink: the operator chose it.

All paths are bytes relative to root, ``/``-separated; names need not be
UTF-8.  Unsafe names and symlinks met on the way raise
:class:`~syncd.errors.UnsafePathError`; every other failure is the
``OSError`` the kernel gave, errno intact, so the caller can tell a full disk
(``ENOSPC``) from a vanished file.

Nothing here creates a temporary name inside root: files are made elsewhere
(staging) and arrive by :meth:`SafeRoot.publish`, one ``rename(2)``
(invariant 1).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Any, Callable

from .errors import UnsafePathError
from .manifest import fspath

log = logging.getLogger(__name__)

MAX_PATH = 4096
MAX_COMPONENT = 255

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO someone left on the edge must not hang the agent.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)

_READ_CHUNK = 1 << 20

# Control characters would break a one-line message (a name may hold "\n").
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def show(path: bytes) -> str:
    """``path`` for a one-line message: undecodable and control bytes as \\xNN."""
    return fspath(path).translate(_CONTROL)


def validate_name(path: bytes) -> bytes:
    """Return ``path`` unchanged if it is a safe, normal relative name.

    Refused (UnsafePathError): empty, absolute, a ``.`` or ``..`` or empty
    component (``a//b``, trailing ``/``), a NUL byte, over 4096 bytes, or a
    component over 255 bytes.  Nothing is normalized: both ends must agree on
    every name byte for byte, so a non-normal name is an error, not a variant.
    """
    if not isinstance(path, bytes):
        raise UnsafePathError(f"unsafe path {path!r}: not bytes")
    reason = _name_problem(path)
    if reason:
        raise UnsafePathError(f"unsafe path {show(path)!r}: {reason}")
    return path


def _name_problem(path: bytes) -> str | None:
    if not path:
        return "empty name"
    if len(path) > MAX_PATH:
        return f"longer than {MAX_PATH} bytes"
    if b"\0" in path:
        return "contains NUL"
    if path[0] == 0x2F:
        return "absolute"
    for comp in path.split(b"/"):
        if not comp:
            return "empty component"
        if comp == b"." or comp == b"..":
            return f"'{comp.decode()}' component"
        if len(comp) > MAX_COMPONENT:
            return f"component longer than {MAX_COMPONENT} bytes"
    return None


def fsync_dir(fd: int) -> None:
    """Make the entries of the directory open as ``fd`` durable (new names, renames)."""
    os.fsync(fd)


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
        with ``pool`` a write around the page cache (:class:`DirectWriter`).
        On ext4 that was half the time of ``copy_file_range`` followed by a
        re-read to hash the copy.  The new file is mode 0600: the caller sets
        the final metadata.
        """
        src = self.open_read(rel)
        try:
            dst = os.open(dst_name, _CREATE_FLAGS, 0o600, dir_fd=dst_dir_fd)
            try:
                total = _copy_hashing(src, dst, pool)
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


# -- durability without an fsync per file ------------------------------------


_libc = None


def _load_libc():  # noqa: ANN202
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if hasattr(libc, "sync_file_range"):  # off64_t arguments: say so, or ctypes passes ints
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _libc = libc
    return _libc


_SYNC_FILE_RANGE_WRITE = 2
# Staged files (and prewarm ranges) from this size on start their write-out
# at once; for smaller ones the separate writes cost more than they save
# (measured on 5,000 files of 1-64 KiB).
WRITEBACK_MIN = 512 * 1024


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk, without waiting (sync_file_range)."""
    try:
        _load_libc().sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    except AttributeError:
        pass  # not Linux: syncfs (or sync) at publish does all of it


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (staging and root share it): one call
    instead of an fsync per file.  Falls back to sync(2) where syncfs is missing."""
    try:
        libc = _load_libc()
        if libc.syncfs(fd) == 0:
            return
        import ctypes

        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            # EIO (reported since Linux 5.8): what was written may not be on
            # disk, so nothing may be published as if it were.
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    except AttributeError:
        pass
    os.sync()


# -- bulk writes around the page cache -----------------------------------------

# O_DIRECT wants the buffer's address, the file offset and the length aligned
# to the device's logical block; 4 KiB covers every common device.
DIRECT_ALIGN = 4096
DIRECT_BUF = 1 << 20
# Objects from this size on are written with O_DIRECT where the filesystem
# allows it.  A buffered write copies every byte into a page-cache page, and
# on the 2-core benchmark host that copy was the largest single cost of a
# bulk fill (1.0-1.4 s of system time per 600 MB, against 0.06 s for the
# same writes with O_DIRECT).  The pages would also push out what the mirror
# is serving.  Smaller files stay buffered: one aligned write each buys
# nothing and costs a wait on the device.
DIRECT_MIN = 256 * 1024


class BufferPool:
    """Page-aligned buffers (anonymous mmaps) for :class:`DirectWriter`, reused.

    With ``write_behind``, its writers hand each full buffer to a thread of
    the pool's (one write in flight per writer) and go on filling another:
    hashing and the disk's transfer then overlap.  :meth:`close` stops the
    threads.
    """

    def __init__(self, size: int = DIRECT_BUF, *, write_behind: bool = False) -> None:
        self.size = size
        self._free: list[Any] = []
        self.write_behind = write_behind
        self._executor: Any = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(WRITE_BEHIND_THREADS, thread_name_prefix="write-behind")
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def get(self) -> Any:
        import mmap

        try:
            return self._free.pop()  # atomic: commit threads share the pool
        except IndexError:
            return mmap.mmap(-1, self.size)

    def put(self, buf: Any) -> None:
        self._free.append(buf)


#: Threads of a write-behind pool: writes to the disk, not CPU work.
WRITE_BEHIND_THREADS = 2


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the filesystem refuses it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except OSError:
        return False
    return True


class DirectWriter:
    """Sequential writes to ``fd`` from ``offset`` on, around the page cache.

    Bytes gather in an aligned buffer and go out a full buffer at a time
    with O_DIRECT; :meth:`close` writes the aligned rest the same way and the
    last partial block buffered (O_DIRECT turned off on the fd).  Where
    O_DIRECT is refused (tmpfs, some FUSE filesystems) or ``offset`` is not
    aligned, every write is an ordinary ``pwrite``.  The caller keeps ``fd``
    and closes it.  ``OSError`` (ENOSPC included) reaches the caller as is.
    """

    def __init__(self, fd: int, offset: int, pool: BufferPool | None) -> None:
        self.fd = fd
        self.pos = offset  # file offset of the buffer's first byte
        self.fill = 0
        self.pool = pool
        self.buf = None
        self.direct = False
        self._in_flight: tuple[Any, memoryview, Any] | None = None  # (buffer, view, future)
        self._flight_pos = offset  # file offset of the buffer in flight
        if pool is not None and offset % DIRECT_ALIGN == 0 and _set_direct(fd, True):
            self.direct = True
            self.buf = pool.get()
            self.view = memoryview(self.buf)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.buf is None:
            self._pwrite(view)
            return
        size = len(self.view)
        while view:
            n = min(len(view), size - self.fill)
            self.view[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == size:
                self._buffer_full()

    def space(self) -> memoryview | None:
        """The free part of the aligned buffer, to read into directly (then
        :meth:`advance`); None when writes are not buffered here."""
        return None if self.buf is None else self.view[self.fill:]

    def advance(self, n: int) -> None:
        """``n`` bytes were put into :meth:`space`: count them, and write a full buffer out."""
        self.fill += n
        if self.fill == len(self.view):
            self._buffer_full()

    def _buffer_full(self) -> None:
        if self.pool.write_behind:
            self._write_behind()
        else:
            self._drain(self.fill)

    def _write_behind(self) -> None:
        """Hand the full buffer to the pool's threads; go on in another."""
        self._wait()
        pos, self.pos = self.pos, self.pos + self.fill
        self._flight_pos = pos
        future = self.pool.submit(self._write_out, self.view[:self.fill], pos)
        self._in_flight = (self.buf, self.view, future)
        self.buf = self.pool.get()
        self.view = memoryview(self.buf)
        self.fill = 0

    def done(self) -> int:
        """The file offset up to which every byte handed over has reached the
        file (the disk with O_DIRECT, else the page cache): what a resumable
        transfer may record.  Bytes still gathered, or in flight, are not."""
        if self._in_flight is not None:
            future = self._in_flight[2]
            if not future.done() or future.exception() is not None:
                return self._flight_pos
        return self.pos

    def _wait(self) -> None:
        """The buffer in flight is written (its error raised here); back to the pool."""
        if self._in_flight is None:
            return
        buf, view, future = self._in_flight
        self._in_flight = None
        try:
            future.result()
        finally:
            view.release()
            self.pool.put(buf)

    def _write_out(self, out: memoryview, pos: int) -> int:
        try:
            while out:
                try:
                    w = os.pwrite(self.fd, out, pos)
                except OSError as err:
                    # O_DIRECT accepted at open but not this alignment (a larger
                    # logical block, some FUSE filesystems): ordinary writes.
                    if err.errno != errno.EINVAL or not self.direct or not _set_direct(self.fd, False):
                        raise
                    self.direct = False
                    continue
                pos += w
                out = out[w:]
                if out and w % DIRECT_ALIGN:
                    # A short write off the block grid: the rest goes buffered.
                    self.direct = False
                    _set_direct(self.fd, False)
        finally:
            out.release()
        return pos

    def _drain(self, n: int) -> None:
        self.pos = self._write_out(self.view[:n], self.pos)
        self.view[: self.fill - n] = self.view[n:self.fill]
        self.fill -= n

    def _pwrite(self, view: memoryview) -> None:
        while view:
            w = os.pwrite(self.fd, view, self.pos)
            self.pos += w
            view = view[w:]

    def close(self) -> None:
        """Write what is buffered; give the buffer back.  Idempotent."""
        if self.buf is None:
            return
        try:
            self._wait()
            aligned = self.fill - self.fill % DIRECT_ALIGN
            if aligned:
                self._drain(aligned)
            _set_direct(self.fd, False)
            if self.fill:
                self._pwrite(self.view[:self.fill])
                self.fill = 0
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Give the buffer back without writing what it holds."""
        if self._in_flight is not None:
            try:
                self._wait()  # its buffer is the pool's again only once written
            except OSError:
                pass  # abandoned anyway
        if self.buf is not None:
            self.view.release()
            self.pool.put(self.buf)
            self.buf = None


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of ``fd`` read as zeros, deallocated
    where the filesystem can (fallocate PUNCH_HOLE), else by writing zeros
    (a bounded buffer at a time).  The file's size is kept."""
    if length <= 0:
        return
    try:
        import ctypes

        libc = _load_libc()
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
    except (AttributeError, OSError):
        pass
    from .sparse import ZEROS

    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, memoryview(ZEROS)[:min(len(ZEROS), end - offset)], offset)


class SparseWriter:
    """A file's content written from ``offset`` on (through
    :class:`DirectWriter`), where holes stay unwritten.

    The caller gives the file its final size first (``ftruncate``), so what
    is not written reads as zeros and takes no blocks.  :meth:`skip` leaves
    the next bytes as a hole (a sparse payload says where, syncd.sparse);
    with ``find_zeros``, aligned :data:`syncd.sparse.ZERO_BLOCK` blocks of
    what is written that are all zeros become holes too (a delta's output,
    which does not say), as rsync -S does where it receives.  With
    ``punch``, a hole is also deallocated (the file may hold older bytes
    there: a partial file written before).
    """

    def __init__(self, fd: int, offset: int, pool: BufferPool | None, *, find_zeros: bool = False,
                 punch: bool = False) -> None:
        self.fd = fd
        self.pool = pool
        self.pos = offset  # the next logical offset
        self.find_zeros = find_zeros
        self.punch = punch
        self._carry = bytearray()  # the start of a zero-detection block not complete yet
        self.out = DirectWriter(fd, offset, pool)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if not self.find_zeros:
            self.out.write(view)
            self.pos += len(view)
            return
        from .sparse import ZERO_BLOCK

        if self._carry:
            need = ZERO_BLOCK - len(self._carry)
            self._carry += view[:need]
            view = view[need:]
            if len(self._carry) < ZERO_BLOCK:
                return
            block, self._carry = self._carry, bytearray()
            self._blocks(memoryview(block))
        whole = len(view) - len(view) % ZERO_BLOCK
        if whole:
            self._blocks(view[:whole])
        if whole < len(view):
            self._carry += view[whole:]

    def _blocks(self, view: memoryview) -> None:
        from .sparse import zero_runs

        for start, end, zero in zero_runs(view):
            if zero:
                self.skip(end - start)
            else:
                self.out.write(view[start:end])
                self.pos += end - start

    def skip(self, n: int) -> None:
        """The next ``n`` bytes are zeros: left as a hole."""
        if n <= 0:
            return
        if self._carry:  # (only when find_zeros: bytes before the hole)
            tail, self._carry = bytes(self._carry), bytearray()
            self.out.write(tail)
            self.pos += len(tail)
        self.out.close()  # what is gathered goes out; the next bytes start elsewhere
        if self.punch:
            punch_hole(self.fd, self.pos, n)
        self.pos += n
        self.out = DirectWriter(self.fd, self.pos, self.pool)

    def done(self) -> int:
        """The offset up to which everything is on the file (written, or a hole)."""
        return self.out.done()

    def close(self) -> None:
        if self._carry:
            tail, self._carry = bytes(self._carry), bytearray()
            if tail.count(0) == len(tail):
                self.skip(len(tail))  # zeros at the very end: the size set already covers them
            else:
                self.out.write(tail)
                self.pos += len(tail)
        self.out.close()

    def abandon(self) -> None:
        self._carry = bytearray()
        self.out.abandon()


def copy_extents(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of ``src`` to the new, empty ``dst`` in the kernel
    (``copy_file_range``), data extents only: holes stay holes (on ext4 a
    plain copy_file_range fills them)."""
    from .sparse import data_extents

    os.ftruncate(dst, size)
    for off, length in data_extents(src, 0, size):
        end = off + length
        while off < end:
            n = os.copy_file_range(src, dst, min(1 << 30, end - off), off, off)
            if n == 0:
                return  # shrank: the caller's size check (or hash) finds it
            off += n


def sha256_around_cache(fd: int, pool: BufferPool) -> tuple[bytes, int]:
    """SHA-256 and length of ``fd``'s whole content, read with O_DIRECT where
    the filesystem allows it (so reading back what :class:`DirectWriter`
    wrote costs no page-cache copy), else with ordinary reads."""
    import hashlib

    st = os.fstat(fd)
    from .sparse import has_holes, logical_sha256

    if has_holes(st):
        # Holes are hashed as the zeros they read as, without reading them.
        buf = pool.get()
        try:
            with memoryview(buf) as view:
                return logical_sha256(fd, 0, st.st_size, view).digest(), os.fstat(fd).st_size
        finally:
            pool.put(buf)
    h = hashlib.sha256()
    offset = 0
    if not _set_direct(fd, True):
        while chunk := os.pread(fd, DIRECT_BUF, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.digest(), offset
    buf = pool.get()
    view = memoryview(buf)
    direct = True
    try:
        while True:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as err:
                if err.errno != errno.EINVAL or not direct:
                    raise
                direct = False
                _set_direct(fd, False)  # not this alignment after all: ordinary reads
                continue
            if not n:
                break
            h.update(view[:n])
            offset += n
            if n % DIRECT_ALIGN:
                break  # end of file
    finally:
        view.release()
        pool.put(buf)
        _set_direct(fd, False)
    return h.digest(), offset


# -- staged objects checked in this boot ------------------------------------------

VERIFIED_PREFIX = "verified."
_boot_id: str | None = None


def boot_id() -> str:
    """This boot's identity ("" where the kernel does not say)."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
                _boot_id = fh.read(64).strip().decode("ascii", "replace").replace("-", "")
        except OSError:
            _boot_id = ""
    return _boot_id


class VerifiedLog:
    """``staging/verified.<boot id>``: the staged objects whose bytes were
    checked against their SHA-256 name during this boot, one hex name a line.

    A push trusts such an object without reading it again: until the machine
    goes down, the kernel returns exactly the bytes that were checked
    (staging is syncd's own; nothing writes a named object after it is
    named).  A crash or power cut can lose unsynced bytes, but it also
    changes the boot id, so the log no longer applies and the push re-hashes
    as before.  A name is appended only after its rename, so the log never
    names an object that was not there; lines from concurrent writers are
    single O_APPEND writes.
    """

    def __init__(self, staging_fd: int) -> None:
        self.fd = -1
        if boot_id():
            try:
                self.fd = os.open(VERIFIED_PREFIX + boot_id(), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=staging_fd)
            except OSError as err:
                log.warning("staging log %s: %s; staged objects are re-hashed at publish",
                            VERIFIED_PREFIX + boot_id(), err.strerror)

    def add(self, hexname: str) -> None:
        """Log one name; best effort (an object not logged is only re-hashed)."""
        if self.fd >= 0:
            try:
                os.write(self.fd, hexname.encode("ascii") + b"\n")
            except OSError as err:
                log.warning("staging log %s: %s; objects staged from now on are re-hashed at publish",
                            VERIFIED_PREFIX + boot_id(), err.strerror)
                self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def verified_this_boot(staging_fd: int) -> set[str]:
    """The names :class:`VerifiedLog` holds for this boot (a torn line is ignored)."""
    if not boot_id():
        return set()
    try:
        fd = os.open(VERIFIED_PREFIX + boot_id(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
    except FileNotFoundError:
        return set()
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    return {line.decode("ascii", "replace") for line in data.split(b"\n") if len(line) == 64}


def _copy_hashing(src: int, dst: int, pool: BufferPool | None) -> tuple[int, bytes]:
    """Copy ``src`` to ``dst`` in one pass, hashing what is written."""
    import hashlib

    h = hashlib.sha256()
    st = os.fstat(src)
    view = memoryview(bytearray(_READ_CHUNK))
    from .sparse import data_extents, has_holes, hash_zeros

    if has_holes(st):
        # Holes stay holes in the copy; the digest covers their zeros.
        os.ftruncate(dst, st.st_size)
        sparse = SparseWriter(dst, 0, pool if st.st_size >= DIRECT_MIN else None)
        pos = 0
        try:
            for off, length in data_extents(src, 0, st.st_size):
                hash_zeros(h, off - pos)
                sparse.skip(off - pos)
                pos, end = off, off + length
                while pos < end:
                    n = os.preadv(src, [view[:min(len(view), end - pos)]], pos)
                    if not n:
                        return pos, h.digest()  # shrank: a short copy, which its digest tells
                    h.update(view[:n])
                    sparse.write(view[:n])
                    pos += n
            hash_zeros(h, st.st_size - pos)
            sparse.skip(st.st_size - pos)
            sparse.close()
        finally:
            sparse.abandon()
        return st.st_size, h.digest()
    out = DirectWriter(dst, 0, pool if st.st_size >= DIRECT_MIN else None)
    total = 0
    try:
        while n := os.readv(src, [view]):
            h.update(view[:n])
            out.write(view[:n])
            total += n
        out.close()
    finally:
        out.abandon()
    return total, h.digest()


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


__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_MIN",
    "BufferPool",
    "DirectWriter",
    "SparseWriter",
    "copy_extents",
    "punch_hole",
    "VerifiedLog",
    "boot_id",
    "verified_this_boot",
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
