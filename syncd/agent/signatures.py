"""Block signatures of the edge's old copies, computed beside planning and sent on their streams.

A signature is computed in a pool of two threads (numpy and the hashing
release the GIL), beside the batch's other signatures and local copies; a
large file's two halves are read at once.  Up to protocol 1.2 a batch's
signatures go, in order, before its ``needs``; from 1.3 each one follows it
as soon as it is computed, from whichever thread ends it, and the pusher
starts that file's delta while the others are still being read.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from ..manifest import fspath
from .wire import LockedWriter

#: From this size on, an old copy's signature is computed in two halves at once.
SIG_SPLIT_MIN = 16 << 20
SIGNATURE_THREADS = 2


class Signatures:
    """The signature jobs of one session and the streams they go on."""

    def __init__(self, writer: LockedWriter, *, failed: Callable[[bytes, str], None],
                 quiet: Callable[[], bool]) -> None:
        self.writer = writer
        self._failed = failed  # answers "failed" for a path: the pusher sends it whole
        self._quiet = quiet  # the session is ending or failed: nothing more is sent
        self._pool: ThreadPoolExecutor | None = None  # started at the first signature
        self._jobs: list[tuple[int, bytes, Any]] = []  # this batch's, not yet sent or streamed
        self._stream = 0

    def start(self, fd: int) -> Future:
        """The signature of the file open on ``fd`` (which it closes), being
        computed in the pool: a Future of its encoded bytes."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SIGNATURE_THREADS, thread_name_prefix="signature")
        try:
            size: int | None = os.fstat(fd).st_size
        except OSError:
            size = None  # signature_of meets the same error and reports it
        if size is not None and size >= SIG_SPLIT_MIN:
            return split_signature(self._pool, fd, size)
        return self._pool.submit(signature_of, fd, size)

    def add(self, path: bytes, job: Any) -> int:
        """The stream id on which ``job``'s signature goes, for ``path``'s delta."""
        self._stream += 1
        self._jobs.append((self._stream, path, job))
        return self._stream

    def send_all(self) -> None:
        """Up to 1.2: this batch's signatures, in order, before its ``needs``.
        (Also after a failed batch: every job closes its file.)"""
        jobs, self._jobs = self._jobs, []
        try:
            for stream, _path, job in jobs:
                self.writer.data(stream, job.result())
                self.writer.end(stream)
        finally:
            wait([job for _, _, job in jobs])  # every job closes its file, even after an error

    def stream_all(self) -> None:
        """1.3: send each signature of this batch when its job ends, from
        whichever thread ends it."""
        jobs, self._jobs = self._jobs, []
        for stream, path, job in jobs:
            job.add_done_callback(functools.partial(self.signature_done, stream, path))

    def signature_done(self, stream: int, path: bytes, job: Any) -> None:
        """A signature is computed.  A copy that cannot be read is answered
        ``failed`` with ``retry_whole``: the pusher sends that file whole."""
        if self._quiet():
            return
        try:
            try:
                signature = job.result()
            except Exception as err:  # noqa: BLE001 - any failure: the file comes whole instead
                why = err.strerror if isinstance(err, OSError) and err.strerror else err
                self._failed(path, f"{fspath(path)}: cannot read this edge's copy for a delta "
                                   f"({why}); asking for it whole")
            else:
                with self.writer.lock:  # the whole signature, then its END
                    self.writer.data(stream, signature)
                    self.writer.end(stream)
            self.writer.flush()
        except OSError:
            pass  # the pusher is gone: the main loop sees the stream end

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _read_ahead(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
    except OSError:
        pass


def _range_signature(fd: int, offset: int, length: int, block: int) -> Any:
    """The signature of ``length`` bytes of ``fd`` from ``offset`` on, in
    blocks of ``block`` (fewer bytes if the file ends first)."""
    from ..delta import signature_of_reader

    end = offset + length
    at = [offset]

    def readinto(view: memoryview) -> int:
        want = min(len(view), end - at[0])
        if want <= 0:
            return 0
        got = os.preadv(fd, [view[:want]], at[0])
        at[0] += got
        return got

    return signature_of_reader(readinto, file_size=length, block_size=block)


def split_signature(pool: Any, fd: int, size: int) -> Future:
    """The encoded signature of a large file open on ``fd`` (closed at the
    end), its two halves computed at once by the pool's two threads: the
    first signature of a push is ready in about half the time, and its delta
    starts while the next file's signature is read.  A Future."""
    from ..delta import block_size_for, join_signatures

    block = block_size_for(size)
    mid = size // 2 // block * block
    ranges = [(0, mid), (mid, size - mid)]
    done: Future = Future()
    results: list[Any] = [None, None]
    left = [len(ranges)]
    lock = threading.Lock()

    def finished(i: int, job: Any) -> None:
        with lock:
            results[i] = job
            left[0] -= 1
            last = left[0] == 0
        if not last:
            return
        os.close(fd)
        try:
            done.set_result(join_signatures([r.result() for r in results]).encode())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on it
            done.set_exception(err)

    _read_ahead(fd)
    for i, (offset, length) in enumerate(ranges):
        pool.submit(_range_signature, fd, offset, length, block).add_done_callback(functools.partial(finished, i))
    return done


def signature_of(fd: int, size: int | None) -> bytes:
    """The encoded block signature of the file open on ``fd`` (its ``size``
    bytes, fewer if it shrank; None: its size now), which it closes."""
    from ..delta import block_size_for

    try:
        if size is None:
            size = os.fstat(fd).st_size
        _read_ahead(fd)
        return _range_signature(fd, 0, size, block_size_for(size)).encode()
    finally:
        os.close(fd)
