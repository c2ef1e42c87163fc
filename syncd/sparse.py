"""Sparse files: where a file's data lies, and the extent stream that carries only that.

A file with holes (ranges never written, or deallocated) reads as zeros
there but takes no blocks.  rsync -S keeps them; so does syncd:

- The sender asks the kernel where the data is (``lseek`` with SEEK_DATA and
  SEEK_HOLE: :func:`data_extents`) and sends a **sparse payload**
  (:func:`payload`): for each data extent, in order, a 16-byte header (u64
  offset, u64 length, big-endian) and that many bytes.  Holes are the gaps,
  never sent.  docs/protocol.md, section 8, is the byte format.
- The receiver parses it with :class:`Decoder`, which checks every header
  against the announced range (inside it, in order, no overlap, no empty
  extent: the sender is not trusted) and reports data and holes in order,
  so that the receiver hashes the file's whole logical content (zeros
  included, :func:`hash_zeros`) and writes only its data.
- :func:`zero_runs` finds aligned all-zero blocks in bytes being written
  (a delta's output, which says nothing of holes), for a writer that leaves
  them unwritten, as rsync -S does on its receiving side.

Pure functions and small state machines over buffers; the only I/O is
:func:`data_extents` and :func:`payload`'s reads of a file the caller opened.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Callable, Iterator

from .errors import ProtocolError, SyncdError

#: One extent header: offset, length (bytes), big-endian.
EXTENT = struct.Struct(">QQ")
#: Zeros hashed for holes, a slice at a time: bounded memory, no per-byte loop.
ZEROS = bytes(1 << 20)
_ZVIEW = memoryview(ZEROS)
#: Granularity of the zero detection of :func:`zero_runs`: a filesystem block.
ZERO_BLOCK = 4096
READ_CHUNK = 1 << 20

__all__ = ["EXTENT", "ZEROS", "ZERO_BLOCK", "Decoder", "data_extents", "has_holes", "hash_zeros",
           "logical_sha256", "payload", "zero_runs"]


def has_holes(st: os.stat_result) -> bool:
    """Whether a regular file may have holes: fewer blocks allocated than its size needs.

    (Only a hint: a filesystem that compresses also allocates less; the
    extents then say the whole file is data, which costs nothing.)"""
    return st.st_blocks * 512 < st.st_size


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each data extent of ``fd`` inside ``[start, end)``,
    in order; everything else there reads as zeros.

    Where the filesystem cannot tell (no SEEK_DATA), the whole range is one
    extent.  A file shorter than ``end`` ends its last extent at its end: the
    caller, reading it, finds it short."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return  # a hole up to the end of the file
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                yield pos, end - pos
                return
            raise
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            hole = end  # shrank meanwhile: the read comes out short
        hole = min(max(hole, data + 1), end)
        yield data, hole - data
        pos = hole


def hash_zeros(hasher: Any, n: int) -> None:
    """Feed ``n`` zero bytes to ``hasher`` (a hole's share of the content)."""
    while n > 0:
        k = min(n, len(ZEROS))
        hasher.update(_ZVIEW[:k])
        n -= k


def payload(fd: int, start: int, end: int, buf: memoryview, hasher: Any = None,
            name: str = "file") -> Iterator[bytes | memoryview]:
    """The sparse payload of ``[start, end)`` of ``fd``: for each data extent,
    its header, then its bytes read into ``buf`` (each piece valid until the
    next is asked for).  With ``hasher``, the range's whole logical content
    (the holes' zeros too) goes into it on the way.  A file that turns out
    shorter than ``end`` is a SyncdError naming ``name``."""
    pos = start
    for off, length in data_extents(fd, start, end):
        if hasher is not None and off > pos:
            hash_zeros(hasher, off - pos)
        yield EXTENT.pack(off, length)
        pos, stop = off, off + length
        while pos < stop:
            n = os.preadv(fd, [buf[:min(len(buf), stop - pos)]], pos)
            if n <= 0:
                raise SyncdError(f"{name}: shrank while being read")
            piece = buf[:n]
            if hasher is not None:
                hasher.update(piece)
            yield piece
            pos += n
    if os.fstat(fd).st_size < end:
        raise SyncdError(f"{name}: shrank while being read")
    if hasher is not None and pos < end:
        hash_zeros(hasher, end - pos)


def logical_sha256(fd: int, start: int, end: int, buf: memoryview, hasher: Any = None) -> Any:
    """The hasher (a new SHA-256 unless given) fed the logical content of
    ``[start, end)`` of ``fd``: data read into ``buf``, holes as zeros without
    reading them.  Stops short where the file ends early (the caller compares
    the digest)."""
    import hashlib

    h = hasher if hasher is not None else hashlib.sha256()
    pos = start
    for off, length in data_extents(fd, start, end):
        hash_zeros(h, off - pos)
        pos, stop = off, off + length
        while pos < stop:
            n = os.preadv(fd, [buf[:min(len(buf), stop - pos)]], pos)
            if n <= 0:
                return h
            h.update(buf[:n])
            pos += n
    hash_zeros(h, min(end, os.fstat(fd).st_size) - pos)
    return h


class Decoder:
    """A push parser for a sparse payload that must cover ``[start, end)``.

    Fed pieces split at any byte, it calls ``data(view)`` for the bytes of
    each extent and ``hole(n)`` for each gap, in order: together they cover
    the range exactly once :meth:`finish` returned.  A header outside the
    range, out of order, overlapping the last extent or announcing an empty
    extent is a ProtocolError, before anything of it is passed on.
    """

    def __init__(self, start: int, end: int, data: Callable[[memoryview], Any], hole: Callable[[int], Any],
                 name: str = "file") -> None:
        if not 0 <= start <= end:
            raise ValueError("bad range")
        self.pos = start  # the next logical offset to account for
        self.end = end
        self._data = data
        self._hole = hole
        self._name = name
        self._header = bytearray()
        self._left = 0  # bytes of the current extent still to come

    def feed(self, piece: Any) -> None:
        view = memoryview(piece).cast("B")
        while view:
            if self._left:
                take = view[:self._left]
                view = view[len(take):]
                self._left -= len(take)
                self.pos += len(take)
                self._data(take)
                continue
            need = EXTENT.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == EXTENT.size:
                off, length = EXTENT.unpack(self._header)
                self._header.clear()
                self._extent(off, length)

    def _extent(self, off: int, length: int) -> None:
        if length == 0:
            raise ProtocolError(f"{self._name}: sparse payload: an empty extent at {off}")
        if off < self.pos:
            raise ProtocolError(f"{self._name}: sparse payload: extent at {off} before offset {self.pos} "
                                "(out of order or overlapping)")
        if length > self.end - off:
            raise ProtocolError(f"{self._name}: sparse payload: extent [{off}, {off + length}) "
                                f"beyond the announced end {self.end}")
        if off > self.pos:
            gap, self.pos = off - self.pos, off
            self._hole(gap)
        self._left = length

    def finish(self) -> None:
        """The payload ended: what follows the last extent is a hole."""
        if self._left or self._header:
            raise ProtocolError(f"{self._name}: sparse payload ends inside an extent")
        if self.pos < self.end:
            gap, self.pos = self.end - self.pos, self.end
            self._hole(gap)


def zero_runs(view: memoryview, block: int = ZERO_BLOCK) -> list[tuple[int, int, bool]]:
    """Runs of ``view`` (a whole number of ``block``-byte blocks) as
    ``(start, end, all_zero)``, alternating, covering it in order.

    Vectorized (numpy): one pass over the bytes, and Python work per run,
    not per block or byte."""
    import numpy as np

    n = len(view)
    if n % block or block % 8:
        raise ValueError("view must be whole blocks of a multiple of 8 bytes")
    if n == 0:
        return []
    words = np.frombuffer(view, dtype=np.uint64).reshape(-1, block // 8)
    zero = ~words.any(axis=1)
    cuts = np.flatnonzero(zero[1:] != zero[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(zero)]
    return [(bounds[i] * block, bounds[i + 1] * block, bool(zero[bounds[i]])) for i in range(len(bounds) - 1)]
