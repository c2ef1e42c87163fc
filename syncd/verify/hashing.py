"""SHA-256 of staged and published files, many at once on a bounded set of threads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from .findings import Finding, hash_mismatch, os_finding

PathLike = TypeVar("PathLike", str, os.PathLike)

# 256 KiB reads: large enough that hashlib drops the GIL for each update and
# syscalls cost nothing, small enough that the hash reads the bytes from L2
# right after the kernel copied them there (faster than 1 MiB reads: see
# docs/performance.md, "Hashing and signatures").
DEFAULT_BUFFER = 256 << 10


def _fileio(path_or_fd: str | os.PathLike | int) -> io.FileIO:
    if isinstance(path_or_fd, int):
        return io.FileIO(path_or_fd, "rb", closefd=False)
    f = io.FileIO(os.fspath(path_or_fd), "rb")
    with contextlib.suppress(OSError, AttributeError):
        # Cold files: ask for aggressive readahead; harmless when cached.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def sha256_file(path_or_fd: str | os.PathLike | int, *, buffer: int | bytearray = DEFAULT_BUFFER) -> bytes:
    """SHA-256 of a file, streamed through one reused buffer.

    ``path_or_fd`` is a path, or an open fd read from its current offset and
    left open.  ``buffer`` is a size or a preallocated bytearray to reuse
    (hash_files gives each worker its own).  Raises OSError.
    """
    return digest_file(path_or_fd, "sha256", bytearray(buffer) if isinstance(buffer, int) else buffer)


def digest_file(path_or_fd: str | os.PathLike | int, algo: str, buf: bytearray) -> bytes:
    """The ``algo`` digest (a hashlib name) of a file, read through ``buf``.  Raises OSError."""
    view = memoryview(buf)
    h = hashlib.new(algo)
    with _fileio(path_or_fd) as f:
        readinto, update = f.readinto, h.update
        while n := readinto(view):
            update(view[:n])
    return h.digest()


def default_workers() -> int:
    """Hash threads: one per core (SHA-256 is CPU-bound once files are cached)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def hash_files(
    items: Iterable[PathLike],
    *,
    workers: int | None = None,
    buffer_size: int = DEFAULT_BUFFER,
) -> Iterator[tuple[PathLike, bytes | OSError]]:
    """SHA-256 of many files, yielded as ``(item, digest or OSError)``.

    Results come in completion order, not input order: a large file must not
    hold back the small ones behind it.  Memory is one buffer per worker and
    at most ``4 * workers`` finished results waiting; ``items`` is consumed
    lazily, by the worker threads.  Closing the iterator early stops the
    workers after the files they are hashing.
    """
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1:
        buf = bytearray(buffer_size)
        for item in items:
            yield item, _hash_one(item, buf)
        return

    # Workers pull from one shared iterator and push to one bounded queue: a
    # lock and a queue hop per file, where an executor future per file cost
    # more than hashing a small file (docs/performance.md, "Hashing and signatures").
    source = iter(items)
    pull = threading.Lock()
    results: queue.Queue = queue.Queue(maxsize=4 * workers)
    stop = threading.Event()
    finished = object()

    def work() -> None:
        buf = bytearray(buffer_size)
        try:
            while not stop.is_set():
                with pull:
                    item = next(source, finished)
                if item is finished:
                    break
                results.put((item, _hash_one(item, buf)))
        except BaseException as err:  # from the caller's iterator: re-raised there
            results.put((finished, err))
            return
        results.put((finished, None))

    threads = [threading.Thread(target=work, name=f"syncd-hash-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    running, error = workers, None
    try:
        while running:
            item, got = results.get()
            if item is finished:
                running -= 1
                error = error or got
            elif error is None:
                yield item, got
        if error is not None:
            raise error
    finally:
        stop.set()
        while running:  # unblock workers waiting on a full queue
            item, _ = results.get()
            running -= item is finished
        for t in threads:
            t.join()


def _hash_one(item: str | os.PathLike, buf: bytearray) -> bytes | OSError:
    try:
        return sha256_file(item, buffer=buf)
    except OSError as err:
        return err


def check_hashes(expected: Mapping[PathLike, bytes], *, workers: int | None = None) -> list[Finding]:
    """Compare each file's SHA-256 with ``expected``; findings sorted by path.

    A file that does not exist is ``missing_file``; one that cannot be read
    is ``error``; a different digest is ``hash_mismatch``.
    """
    findings = []
    for item, got in hash_files(expected.keys(), workers=workers):
        name = os.fspath(item)
        if isinstance(got, OSError):
            findings.append(os_finding(name, got))
        elif got != expected[item]:
            findings.append(hash_mismatch(name, got, expected[item]))
    findings.sort()
    return findings
