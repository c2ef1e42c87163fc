"""Objects that arrived in part: the resume mechanism prewarm and a push share.

A large object is written in staging as ranges, and each range whose bytes
reached the file is recorded, so that a transfer cut short (a lost
connection, SIGTERM, kill -9 of either end) goes on from what arrived:

- ``run.<pid>.<sha256hex>``: an object arriving in order on one session, in
  a file of that process's own (prewarm's ``put`` with ``run``; a push's
  whole file from :data:`RESUME_MIN` on), with its records in
  ``run.<pid>.<sha256hex>.ranges``.
- ``partial.<sha256hex>``: an object being assembled, already at its final
  size, with its records in ``partial.<sha256hex>.ranges``.  Prewarm
  stagers write ranges into it; a run that did not complete becomes one
  (:func:`promote_run`: by its own process at the session's end, or by the
  next stager or agent once that process is gone).
- A records file holds one ASCII line ``OFFSET LENGTH\\n`` per range, appended
  after the range's bytes were written (:class:`RangeLog`).  A killed writer
  loses nothing of the page cache, so a record never names bytes it did not
  write; after a power cut a record may outlive its bytes, which only makes
  the whole object's SHA-256 check fail and the object come again.

Nothing is named ``<sha256hex>`` before its whole SHA-256 matched.  A
partial file may be written by more than one process (prewarm's stagers):
the push that resumes from one takes it over first (:func:`take_over`,
renaming it to a run of its own) and hashes the assembled file again before
naming it, so no byte it did not check is ever named.
"""

from __future__ import annotations

import logging
import os

from .fsops import unlink_at

log = logging.getLogger(__name__)

PARTIAL_PREFIX = "partial."
RUN_PREFIX = "run."
RANGES_SUFFIX = ".ranges"
#: Prewarm cuts large objects into ranges of this size: small enough that a
#: killed run loses little, large enough that a record and an ack per range cost nothing.
RANGE_SIZE = 4 << 20
#: A push writes a file sent whole from this size on as a run, recording its
#: progress, and resumes it from its recorded prefix after a cut.  Below it
#: a resend costs less than the records and the re-hash of a resumed file.
RESUME_MIN = 8 << 20
#: A push records its run's progress every time this much more has reached the file.
RECORD_EVERY = 1 << 20
#: A partial file (or its records) untouched this long is another object's,
#: one no push or prewarm went on with (its file changed meanwhile): an
#: agent removes it when it starts.  Seconds.
PARTIAL_MAX_AGE = 2 * 24 * 3600

__all__ = ["PARTIAL_MAX_AGE", "PARTIAL_PREFIX", "RANGES_SUFFIX", "RANGE_SIZE", "RECORD_EVERY", "RESUME_MIN", "RUN_PREFIX",
           "RangeLog", "covered", "prefix", "promote_run", "read_ranges", "take_over"]


def covered(ranges: list[tuple[int, int]], size: int) -> bool:
    """Whether the (offset, length) ranges cover [0, size) without a gap."""
    return prefix(ranges) >= size


def prefix(ranges: list[tuple[int, int]]) -> int:
    """How far from 0 the (offset, length) ranges cover without a gap."""
    end = 0
    for off, length in sorted(ranges):
        if off > end:
            break
        end = max(end, off + length)
    return end


def contains(ranges: list[tuple[int, int]], off: int, length: int) -> bool:
    """Whether ``[off, off+length)`` is covered by the union of ``ranges``."""
    end = off
    for o, n in sorted(ranges):
        if o > end:
            break
        if o + n > end:
            end = o + n
        if end >= off + length:
            return True
    return length <= 0


def read_ranges(staging_fd: int, name: str) -> list[tuple[int, int]]:
    """The ranges recorded for ``name`` (a partial or run file; a torn last line is ignored)."""
    try:
        fd = os.open(name + RANGES_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
    except FileNotFoundError:
        return []
    try:
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
    out = []
    for line in data.split(b"\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out.append((int(parts[0]), int(parts[1])))
    return out


class RangeLog:
    """Appends records to ``<name>.ranges``: one write per record, each line
    whole (O_APPEND), after the bytes it names reached the file."""

    def __init__(self, staging_fd: int, name: str, *, fresh: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        if fresh:
            flags |= os.O_TRUNC
        self.fd = os.open(name + RANGES_SUFFIX, flags, 0o600, dir_fd=staging_fd)

    def add(self, offset: int, length: int) -> None:
        if length > 0:
            os.write(self.fd, f"{offset} {length}\n".encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def promote_run(staging_fd: int, name: str) -> None:
    """Hand a run over as the object's partial file, with its records, or
    drop it when a partial file of that object exists already (two sets of
    records cannot be merged without reading)."""
    hexname = name.split(".", 2)[2]
    partial = PARTIAL_PREFIX + hexname
    try:
        os.link(name, partial, src_dir_fd=staging_fd, dst_dir_fd=staging_fd, follow_symlinks=False)
    except FileExistsError:
        pass
    except FileNotFoundError:
        pass  # only its records are left (the data was named, or never made)
    else:
        try:
            os.replace(name + RANGES_SUFFIX, partial + RANGES_SUFFIX, src_dir_fd=staging_fd, dst_dir_fd=staging_fd)
        except FileNotFoundError:
            pass
    unlink_at(staging_fd, name, name + RANGES_SUFFIX)


def take_over(staging_fd: int, hexname: str, size: int, run: str) -> int:
    """Make the partial file of object ``hexname`` (``size`` bytes) the run
    ``run`` of this process, cut back to its recorded prefix; that prefix's
    length (0: nothing worth resuming, and nothing was taken).

    After the rename nobody else opens it by name; what lies beyond the
    prefix is deallocated (it reads as zeros again), and its records are
    replaced by the prefix alone.  A writer that had it open before may
    still write into it: the object is hashed again before it is named."""
    partial = PARTIAL_PREFIX + hexname
    ranges = read_ranges(staging_fd, partial)
    have = min(prefix(ranges), size)
    if have <= 0:
        return 0
    try:
        st = os.stat(partial, dir_fd=staging_fd, follow_symlinks=False)
        if st.st_size != size:
            return 0
        os.rename(partial, run, src_dir_fd=staging_fd, dst_dir_fd=staging_fd)
    except FileNotFoundError:
        return 0
    # The records go with the file: replaced by one line for the prefix.
    unlink_at(staging_fd, partial + RANGES_SUFFIX)
    fd = os.open(run, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
    try:
        os.ftruncate(fd, have)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    records = RangeLog(staging_fd, run, fresh=True)
    try:
        records.add(0, have)
    finally:
        records.close()
    return have
