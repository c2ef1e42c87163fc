"""Bulk writes around the page cache, sparse files, and hashing what is written.

:class:`DirectWriter` gathers bytes in page-aligned buffers from a
:class:`BufferPool` and writes them with O_DIRECT where the filesystem
allows it; :class:`SparseWriter` leaves holes unwritten.  The copies and
hashes here read each byte once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..sparse import ZERO_BLOCK, ZEROS, data_extents, has_holes, hash_zeros, logical_sha256, zero_runs
from .sync import load_libc

_READ_CHUNK = 1 << 20

# O_DIRECT wants the buffer's address, the file offset and the length aligned
# to the device's logical block; 4 KiB covers every common device.
DIRECT_ALIGN = 4096
DIRECT_BUF = 1 << 20
# Objects from this size on are written with O_DIRECT where the filesystem
# allows it.  A buffered write copies every byte into a page-cache page: on
# the benchmark host that copy was the largest single cost of a bulk fill
# (docs/performance.md, "Writing to disk").  The pages would also push out
# what the mirror is serving.  Smaller files stay buffered: one aligned
# write each buys nothing and costs a wait on the device.
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
                self._executor = ThreadPoolExecutor(WRITE_BEHIND_THREADS, thread_name_prefix="write-behind")
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def get(self) -> Any:
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
        libc = load_libc()
        if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
    except (AttributeError, OSError):
        pass
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
    st = os.fstat(fd)
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


def copy_hashing(src: int, dst: int, pool: BufferPool | None) -> tuple[int, bytes]:
    """Copy ``src`` to ``dst`` in one pass, hashing what is written."""
    h = hashlib.sha256()
    st = os.fstat(src)
    view = memoryview(bytearray(_READ_CHUNK))
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
