"""Walking ``root`` into manifest changes.

The walk visits directories in byte order of their relative paths (a heap of
pending directories), which is the order the manifest streams its rows in
(``ORDER BY parent, name``): so the scan is a merge of two sorted streams and
holds only one directory's rows at a time, whatever the size of the tree.

A file is re-hashed when any of size, mtime_ns, ctime_ns, inode or permission
bits differ from its row.  ctime is in the list because a rewrite that keeps
the size and restores the mtime (``touch -d``) cannot restore ctime: rsync's
default quick check misses that edit, syncd does not.  A change of ctime or
inode alone, with the same content, size, mode and mtime (a chown, a copy-then-
rename of identical bytes), updates the row without a new generation: there is
nothing for a mirror to do.

Hard links: each file and symlink row records its device and link count with
its inode, and the names sharing ``(dev, ino)`` are one file (or symlink).  A change of which names a
file has is a change for the mirrors (:func:`link_changed`): the row of a
name that joins, leaves or changes file is stamped with the new generation,
though its content is the same.  A link count that only moved (a name came
or went elsewhere) stamps nothing itself: the name that came or went is the
change.

The root's own mode and mtime are recorded too, in its row ``(b"", b"")``
(see syncd.manifest), whenever root itself is listed: a change to them is a
metadata change of the tree, reported with the empty path.  Recording them
the first time is not a change.

Symlinks are never followed: they are recorded with their target and their
own mtime (a changed mtime alone is a metadata change, as rsync -a keeps it).  Sockets,
FIFOs and device nodes are not mirrored.  Names are bytes end to end, so names
that are not UTF-8 are kept exactly.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ScanError
from .manifest import KIND_DIR, KIND_FILE, KIND_SYMLINK, Manifest, fspath, join, split

log = logging.getLogger(__name__)

HASH_BUFFER = 1 << 20
HASH_RETRIES = 3
# Hash jobs are grouped so that thread hand-off costs little next to the work.
BATCH_BYTES = 8 << 20
BATCH_FILES = 64
MAX_BATCHES_IN_FLIGHT = 8

# Change kinds, as printed by ``syncd scan``.
ADDED, MODIFIED, META, DELETED, RELINKED = "add", "modify", "meta", "delete", "link"

# Row tuple positions (manifest.ENTRY_COLUMNS order).
_PARENT, _NAME, _KIND, _SIZE, _MTIME, _CTIME, _MODE, _INO, _SHA, _TARGET, _GEN, _DELETED, _DEV, _NLINK = range(14)

_O_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass
class ScanResult:
    generation: int
    previous_generation: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (ADDED, MODIFIED, META, DELETED, RELINKED), 0))
    entries: int = 0
    bytes_hashed: int = 0
    files_hashed: int = 0
    unstable: list[bytes] = field(default_factory=list)  # still changing: left for the next scan
    unreadable: list[bytes] = field(default_factory=list)  # directories we could not list
    seconds: float = 0.0

    @property
    def changes(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        c = self.counts
        if self.changes:
            head = f"generation {self.previous_generation} -> {self.generation}"
        else:
            head = f"generation {self.generation} unchanged"
        text = (
            f"{head}: {c[ADDED]} added, {c[MODIFIED]} modified, {c[DELETED]} deleted, "
            f"{c[META]} metadata, {c[RELINKED]} relinked; {self.entries} entries, "
            f"{self.files_hashed} files ({_human(self.bytes_hashed)}) hashed in {self.seconds:.2f} s"
        )
        if self.unstable:
            text += f"; {len(self.unstable)} still changing, left for the next scan"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable directories kept as they were"
        return text


#: Rows a feed hands over at a time, and how many such batches a pusher that
#: streams may have waiting before the scan waits for it (bounded memory).
FEED_BATCH = 500
#: ... or what came within this many seconds (a tree of large files hashes
#: a few rows a second: they go out as they come, not at the scan's end).
FEED_FLUSH = 0.05
FEED_QUEUE = 16
#: Rows kept for a pusher that has not said yet whether it streams (its SSH
#: login and the agent's welcome take a few tenths of a second).  Past this,
#: a late pusher waits for the scan's end instead, like a push without a feed.
FEED_REPLAY = 50_000
#: How long the scan waits for a streaming push that fell behind while
#: another push waits for the scan's end, before it lets the slow one go.
FEED_STALL = 1.0


class FeedClosed(Exception):
    """The scan feeding a push failed or was given up: push nothing of it."""


class FeedLeft(Exception):
    """This push fell behind while another push waited for the scan's end:
    it was let go, and pushes again (an ordinary full comparison, resuming
    from what it staged) once the scan has ended."""


class _Sub:
    """One streaming push's queue of batches (by identity: two queues may be equal)."""

    __slots__ = ("batches", "left", "dropped")

    def __init__(self, batches: list[list[tuple]]) -> None:
        self.batches: deque[list[tuple]] = deque(batches)
        self.left = False  # it left, or was let go: never waited for again
        self.dropped = False  # let go (FeedLeft): it fell behind


class ScanFeed:
    """The live rows of a running full scan, for pushes that start before it ends.

    ``run --once`` scans and pushes at the same time for a mirror that holds
    nothing yet (a full comparison of every row): each row goes out as soon
    as it is final (listed, and hashed if it changed), in place of being read
    back from the manifest after the scan committed.  The scan calls
    :meth:`put` with batches of final rows (``ENTRY_COLUMNS`` tuples), then,
    once it has committed and the caller's checks passed, :meth:`finish`
    (or :meth:`fail`).  Rows are final: a directory's row goes out when the
    directory itself was listed (one that vanished first is never sent), a
    file's once hashed.  The order keeps every directory before what it holds.

    Each push that can stream calls :meth:`subscribe` (it gets every row so
    far, then the rest); every other one calls :meth:`decline` and then
    :meth:`wait` for the end.  ``parties`` is how many pushes will say one or
    the other: once all have, rows are no longer kept for latecomers.

    A streaming push takes rows between the files it sends, so the scan may
    wait for it (bounded memory).  It never waits long for one while another
    push waits for the scan's end: after ``FEED_STALL`` seconds the slow one
    is let go (:class:`FeedLeft`) and pushes again after the scan.
    """

    def __init__(self, parties: int) -> None:
        self._cond = threading.Condition()
        self._undecided = parties
        self._replay: list[list[tuple]] | None = []
        self._replayed = 0
        self._subs: list[_Sub] = []
        self._waiting = 0  # pushes in wait(): someone needs the scan's end
        self._result: ScanResult | None = None
        self._error: BaseException | None = None

    @property
    def subscribers(self) -> int:
        """How many pushes are taking the rows now."""
        with self._cond:
            return len(self._subs)

    @property
    def wanted(self) -> bool:
        """Whether anyone may still take the rows (the scan skips building them otherwise)."""
        return self._replay is not None or bool(self._subs)

    # -- the scan's side

    def put(self, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._cond:
            if self._replay is not None:
                self._replay.append(rows)
                self._replayed += len(rows)
                if self._replayed > FEED_REPLAY:
                    self._replay = None  # latecomers wait for the end instead
            # A snapshot: the list changes while this waits (a push leaves,
            # or joins and gets this batch from the replay).
            for sub in list(self._subs):
                stalled = 0.0
                while len(sub.batches) >= FEED_QUEUE and not sub.left:
                    if self._waiting and stalled >= FEED_STALL:
                        self._drop(sub, dropped=True)
                        break
                    started = time.monotonic()
                    self._cond.wait(FEED_STALL / 4)
                    stalled += time.monotonic() - started
                if not sub.left:
                    sub.batches.append(rows)
            self._cond.notify_all()

    def finish(self, result: ScanResult) -> None:
        """The scan committed and the caller's checks passed: the rows are all out."""
        with self._cond:
            self._result = result
            self._replay = None
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        with self._cond:
            if self._result is None and self._error is None:
                self._error = err
            self._replay = None
            self._cond.notify_all()

    # -- a push's side

    def subscribe(self) -> _Sub | None:
        """A queue of the rows so far and to come (for :meth:`take`), or None
        when too late: the rows were let go, or the scan is over."""
        with self._cond:
            sub = None
            if self._replay is not None:
                sub = _Sub(self._replay)
                self._subs.append(sub)
            self._decided()
            return sub

    def decline(self) -> None:
        with self._cond:
            self._decided()

    def leave(self, sub: _Sub) -> None:
        """A streaming push ended (or failed): never wait for it again."""
        with self._cond:
            self._drop(sub, dropped=False)

    def take(self, sub: _Sub, timeout: float | None = None) -> list[tuple] | None:
        """The next batch of rows; ``[]`` when there are no more (the scan
        finished); None when none came within ``timeout``.  Raises
        :class:`FeedClosed` if the scan failed, :class:`FeedLeft` if this
        push was let go."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise FeedClosed(self._error)
                if sub.dropped:
                    raise FeedLeft()
                if sub.batches:
                    rows = sub.batches.popleft()
                    self._cond.notify_all()
                    return rows
                if self._result is not None:
                    return []
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def wait(self) -> ScanResult:
        """Block until the scan finished; its result, or :class:`FeedClosed`."""
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            try:
                while self._result is None and self._error is None:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            if self._error is not None:
                raise FeedClosed(self._error)
            return self._result

    def _decided(self) -> None:  # with the lock held
        self._undecided -= 1
        if self._undecided <= 0 and self._replay is not None and self._result is None:
            self._replay = None
            self._cond.notify_all()

    def _drop(self, sub: _Sub, *, dropped: bool) -> None:  # with the lock held
        if not sub.left:
            sub.left = True
            sub.dropped = dropped
            self._subs = [s for s in self._subs if s is not sub]
            sub.batches.clear()
        self._cond.notify_all()


def link_changed(old_dev: int, old_ino: int, old_nlink: int, dev: int, ino: int, nlink: int) -> bool:
    """Whether a name's place among hard links changed, its content the same.

    It did when the name went from one name of its file to several or back,
    or when, with several, it now names another file (a rename over it, a
    new link).  A count that only moved while the name stayed on its file
    is a name that came or went elsewhere: that name's own row tells.  A row
    of a version 1 manifest has device 0 and count 1: its first scan stamps
    the files that turn out to have more names.
    """
    was, now = old_nlink > 1, nlink > 1
    return was != now or (now and (old_dev, old_ino) != (dev, ino))


class _Vanished(Exception):
    """The file went away or stopped being a regular file while we looked."""


_local = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(HASH_BUFFER))
    return buf


def hash_file(path: bytes) -> tuple[bytes, os.stat_result] | None:
    """SHA-256 of a regular file, with the stat data that goes with that content.

    Returns None when the file kept changing through ``HASH_RETRIES`` reads (a
    half-written file is never recorded); raises ``_Vanished`` if it is gone
    or is no longer a regular file.
    """
    buf = _buffer()
    for _ in range(HASH_RETRIES):
        try:
            fd = _open_nofollow(path)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise _Vanished from err
        except OSError as err:
            if err.errno == errno.ELOOP:  # replaced by a symlink since it was listed
                raise _Vanished from err
            raise
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise _Vanished
            h = sha256()
            total = 0
            # Read no further than the size seen at open: a file appended
            # faster than we read must not keep the scan here forever.
            want = before.st_size
            while total < want:
                n = os.readv(fd, [buf[: min(len(buf), want - total)]])
                if not n:
                    break
                h.update(buf[:n])
                total += n
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (
            total == after.st_size
            and before.st_size == after.st_size
            and before.st_mtime_ns == after.st_mtime_ns
            and before.st_ctime_ns == after.st_ctime_ns
        ):
            return h.digest(), after
    return None


def _open_nofollow(path: bytes) -> int:
    # O_NONBLOCK: a FIFO swapped in since the listing must not hang the scan.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if _O_NOATIME:
        try:
            return os.open(path, flags | _O_NOATIME)
        except PermissionError:
            pass  # O_NOATIME needs ownership; fall back to a plain read
    return os.open(path, flags)


def _hash_batch(root: bytes, jobs: list[tuple]) -> list[tuple]:
    out = []
    for job in jobs:
        rel = job[0]
        try:
            out.append((job, hash_file(root + b"/" + rel)))
        except _Vanished:
            out.append((job, _Vanished))
        except OSError as err:
            out.append((job, err))
    return out


def scan(
    root: Path,
    manifest: Manifest,
    *,
    workers: int = 2,
    on_change: Callable[[str, bytes], None] | None = None,
    dirs: Iterable[bytes] | None = None,
    feed: ScanFeed | None = None,
) -> ScanResult:
    """Walk ``root`` and bring ``manifest`` up to date in one transaction.

    With ``dirs`` (relative directory paths, ``b""`` for root), only those
    directories are listed, each without descending, except into
    directories that are new: what a watcher saw change, without walking
    the tree.  A directory that vanished takes its whole subtree with it.

    The caller holds the state_dir lock.  Bumps the generation once if
    anything changed; a killed scan commits nothing.

    With ``feed`` (a full scan only), every live row also goes to the feed
    once it is final, for pushes that run meanwhile (see :class:`ScanFeed`).
    The caller finishes the feed after its own checks.
    """
    started = time.monotonic()
    root_b = os.fsencode(os.path.abspath(root))
    prev_gen = manifest.generation
    gen = prev_gen + 1
    result = ScanResult(generation=prev_gen, previous_generation=prev_gen)
    counts = result.counts

    def changed(kind: str, row: tuple) -> None:
        counts[kind] += 1
        if on_change is not None:
            on_change(kind, join(row[_PARENT], row[_NAME]))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") if workers > 1 else None
    in_flight: deque[Future | list] = deque()
    batch: list[tuple] = []
    batch_bytes = 0
    skip_prefixes: list[bytes] = []

    partial = dirs is not None
    if partial and feed is not None:
        raise ValueError("scan: a feed goes with a full scan")
    writer = manifest.writer()
    # A feed sends the unchanged rows too, with their hashes.
    rows = _no_rows() if partial else manifest.iter_entries(with_sha256=feed is not None)
    out: list[tuple] = []  # final rows not yet handed to the feed
    listed: dict[bytes, tuple] = {}  # directories' rows, fed once they are listed themselves
    next_flush = 0.0  # when ``out`` goes to the feed even short of FEED_BATCH

    def emit(row: tuple) -> None:
        out.append(row)
        if len(out) >= FEED_BATCH or time.monotonic() >= next_flush:
            flush()

    def flush() -> None:
        nonlocal out, next_flush
        if out:
            feed.put(out)
            out = []
        next_flush = time.monotonic() + FEED_FLUSH

    def keep(row: tuple | None) -> None:
        # A row the scan leaves as it was (unreadable, still changing).
        if feeding and row is not None and not row[_DELETED]:
            emit(row)

    feeding = have_sha = feed is not None

    def tombstone(row: tuple) -> None:
        if row[_DELETED]:
            return
        for p in skip_prefixes:
            if row[_PARENT] == p or row[_PARENT].startswith(p + b"/"):
                keep(row)  # below an unreadable directory: kept as it was
                return
        writer.tombstone(row[_PARENT], row[_NAME], gen)
        changed(DELETED, row)
        if partial and row[_KIND] == KIND_DIR:
            # A full walk meets the rows below it on its way; a partial scan
            # never lists this directory again, so they go now.
            for below in writer.live_under(join(row[_PARENT], row[_NAME])):
                writer.tombstone(below[_PARENT], below[_NAME], gen)
                changed(DELETED, below)

    def finish_hash(job: tuple, outcome: object) -> None:
        rel, parent, name, old = job
        if outcome is _Vanished:
            if old is not None:
                tombstone(old)
            return
        if isinstance(outcome, OSError):
            # Unreadable now (permissions, I/O error): keep what we knew.
            log.warning("cannot read %s: %s; kept as it was", fspath(rel), outcome.strerror)
            keep(old)
            return
        if outcome is None:
            log.warning("%s is still changing; left for the next scan", fspath(rel))
            result.unstable.append(rel)
            keep(old)
            return
        digest, st = outcome
        result.files_hashed += 1
        result.bytes_hashed += st.st_size
        perm = stat.S_IMODE(st.st_mode)
        row = (parent, name, KIND_FILE, st.st_size, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino,
               digest, None)
        ident = (st.st_dev, st.st_nlink)
        if old is None or old[_DELETED] or old[_KIND] != KIND_FILE:
            row += (gen, 0) + ident
            changed(ADDED, row)
        elif (old[_SHA] if have_sha else writer.sha256_of(parent, name)) != digest:
            row += (gen, 0) + ident
            changed(MODIFIED, row)
        elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
            row += (gen, 0) + ident
            changed(META, row)
        elif link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev, st.st_ino, st.st_nlink):
            row += (gen, 0) + ident
            changed(RELINKED, row)
        else:
            row += (old[_GEN], 0) + ident  # same content, metadata and names: no new generation
        writer.upsert(row)
        if feeding:
            emit(row)

    def record_root() -> None:
        # Stat'ed before it is listed, as every other directory is (by its parent).
        try:
            st = os.stat(root_b)  # root may be a symlink to the tree: the operator's choice, followed
        except OSError:
            return  # the listing says why
        old = writer.root_row()
        perm = stat.S_IMODE(st.st_mode)
        new = (b"", b"", KIND_DIR, 0, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino, None, None)
        if old is None or old[_DELETED]:
            # Recorded for the first time (a new manifest, or one from before
            # the root had a row): no generation of its own.  An empty root
            # stays generation 0, and an existing tree's mirrors get root's
            # times with the next generation (every commit carries them).
            writer.upsert(new + (prev_gen, 0, st.st_dev, 1))
        elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
            writer.upsert(new + (gen, 0, st.st_dev, 1))
            changed(META, new)
        elif (old[_CTIME], old[_INO], old[_DEV]) != (st.st_ctime_ns, st.st_ino, st.st_dev):
            writer.upsert(new + (old[_GEN], 0, st.st_dev, 1))

    def drain(limit: int) -> None:
        while len(in_flight) > limit:
            item = in_flight.popleft()
            results = item.result() if isinstance(item, Future) else item
            for job, outcome in results:
                finish_hash(job, outcome)

    def submit() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        if pool is None:
            in_flight.append(_hash_batch(root_b, batch))
        else:
            in_flight.append(pool.submit(_hash_batch, root_b, batch))
        batch, batch_bytes = [], 0
        drain(MAX_BATCHES_IN_FLIGHT)

    heap: list[bytes] = sorted(set(dirs)) if partial else [b""]
    visited: set[bytes] = set()
    row = next(rows, None)
    try:
        while heap:
            d = heapq.heappop(heap)
            if feeding and not feed.wanted:  # every push declined: stop building rows
                feeding = False
                out.clear()
                listed.clear()
            old_rows: dict[bytes, tuple] = {}
            if partial:
                if d in visited:
                    continue
                visited.add(d)
                if not _real_dir(root_b, d):
                    # A symlink (or a file) now stands where the watcher saw a
                    # directory: never list through it.  Its parent's visit
                    # records what is there.
                    continue
                old_rows = {r[_NAME]: r for r in writer.rows_in(d)}
            while row is not None and row[_PARENT] < d:
                tombstone(row)
                row = next(rows, None)
            while row is not None and row[_PARENT] == d:
                old_rows[row[_NAME]] = row
                row = next(rows, None)
            dir_path = root_b + b"/" + d if d else root_b
            if not d:
                record_root()
            mine = listed.pop(d, None) if feeding else None
            try:
                with os.scandir(dir_path) as it:
                    dirents = list(it)
            except (FileNotFoundError, NotADirectoryError):
                if partial:
                    continue  # gone: its parent's visit tombstones it and all below
                dirents = []  # vanished since its parent was listed: its rows are deletions
                mine = None  # and it is never fed
                if d:
                    parent, name = split(d)
                    writer.upsert((parent, name, KIND_DIR, 0, 0, 0, 0, 0, None, None, gen, 1, 0, 1))
                    changed(DELETED, (parent, name))
            except OSError as err:
                if not d:
                    raise ScanError(f"cannot list root {fspath(root_b)}: {err.strerror}") from err
                log.warning("cannot list %s: %s; kept as it was", fspath(d), err.strerror)
                result.unreadable.append(d)
                skip_prefixes.append(d)
                keep(mine)
                for old in old_rows.values():
                    keep(old)
                continue
            if mine is not None:
                emit(mine)  # listed: it exists, and comes before what it holds
            result.entries += len(dirents)
            pop = old_rows.pop
            for de in dirents:
                name = de.name
                old = pop(name, None)
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    if old is not None:
                        tombstone(old)
                    continue
                mode = st.st_mode
                # The common case first, in one comparison: a live file row
                # whose (kind, size, mtime, ctime, mode, inode, device, link
                # count) all still hold.
                if (
                    old is not None
                    and not old[_DELETED]
                    and old[_KIND:_SHA] == (KIND_FILE, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                            mode & 0o7777, st.st_ino)
                    and mode & 0o170000 == stat.S_IFREG
                ):
                    if old[_DEV:] == (st.st_dev, st.st_nlink):
                        if feeding:
                            emit(old)
                        continue
                    # Only the device or the link count differ: a row of a
                    # version 1 manifest (the file's ctime moves with its
                    # link count).  No need to read the file again.
                    sha = old[_SHA] if have_sha else writer.sha256_of(d, name)
                    fixed = old[:_SHA] + (sha,) + old[_TARGET:_DEV] + (st.st_dev, st.st_nlink)
                    if link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev, st.st_ino, st.st_nlink):
                        fixed = fixed[:_GEN] + (gen,) + fixed[_DELETED:]
                        changed(RELINKED, fixed)
                    writer.upsert(fixed)
                    if feeding:
                        emit(fixed)
                    continue
                perm = stat.S_IMODE(mode)
                fresh = old is None or old[_DELETED]
                if partial and not fresh and old[_KIND] == KIND_DIR and not stat.S_ISDIR(mode):
                    # A directory became a file or link: what was below it is gone.
                    for below in writer.live_under(join(d, name)):
                        writer.tombstone(below[_PARENT], below[_NAME], gen)
                        changed(DELETED, below)
                if stat.S_ISREG(mode):
                    if (
                        not fresh
                        and old[_KIND] == KIND_FILE
                        and old[_SIZE] == st.st_size
                        and old[_MTIME] == st.st_mtime_ns
                        and old[_CTIME] == st.st_ctime_ns
                        and old[_INO] == st.st_ino
                        and old[_MODE] == perm
                    ):
                        if feeding:
                            emit(old)
                        continue
                    batch.append((join(d, name), d, name, None if fresh else old))
                    batch_bytes += st.st_size
                    if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
                        submit()
                elif stat.S_ISDIR(mode):
                    rel = join(d, name)
                    new = (d, name, KIND_DIR, 0, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino, None, None)
                    if not partial or fresh or old[_KIND] != KIND_DIR:
                        heapq.heappush(heap, rel)
                    final = old
                    # A directory's link count is its subdirectories, not
                    # names of it: recorded as 1.
                    if fresh or old[_KIND] != KIND_DIR:
                        final = new + (gen, 0, st.st_dev, 1)
                        changed(ADDED, new)
                    elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
                        final = new + (gen, 0, st.st_dev, 1)
                        changed(META, new)
                    elif (old[_CTIME], old[_INO], old[_DEV]) != (st.st_ctime_ns, st.st_ino, st.st_dev):
                        final = new + (old[_GEN], 0, st.st_dev, 1)
                    if final is not old:
                        writer.upsert(final)
                    if feeding:
                        listed[rel] = final
                elif stat.S_ISLNK(mode):
                    if (
                        not fresh
                        and old[_KIND] == KIND_SYMLINK
                        and (old[_SIZE], old[_MTIME], old[_CTIME], old[_INO], old[_DEV])
                        == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                    ):
                        if feeding:
                            emit(old)
                        continue
                    try:
                        target = os.readlink(dir_path + b"/" + name)
                    except FileNotFoundError:
                        if old is not None:
                            tombstone(old)
                        continue
                    new = (d, name, KIND_SYMLINK, st.st_size, st.st_mtime_ns, st.st_ctime_ns, perm,
                           st.st_ino, None, target)
                    # A symlink may have several names too (link(2) of the
                    # symlink itself): rsync -H keeps them.
                    ident = (st.st_dev, st.st_nlink)
                    if fresh or old[_KIND] != KIND_SYMLINK:
                        new += (gen, 0) + ident
                        changed(ADDED, new)
                    elif old[_TARGET] != target or link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev,
                                                                st.st_ino, st.st_nlink):
                        new += (gen, 0) + ident
                        changed(RELINKED, new)
                    elif old[_MTIME] != st.st_mtime_ns:
                        new += (gen, 0) + ident
                        changed(META, new)
                    else:
                        new += (old[_GEN], 0) + ident
                    writer.upsert(new)
                    if feeding:
                        emit(new)
                else:
                    # FIFOs, sockets, devices are not mirrored; one that
                    # replaced a mirrored path deletes that path.
                    if old is not None:
                        tombstone(old)
            for old in old_rows.values():
                tombstone(old)
        while row is not None:
            tombstone(row)
            row = next(rows, None)
        submit()
        drain(0)
        if feeding:
            flush()
        if result.changes:
            writer.set_generation(gen, result.changes)
            result.generation = gen
        writer.commit()
    except BaseException:
        writer.rollback()
        raise
    finally:
        rows.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    result.seconds = time.monotonic() - started
    return result


def _real_dir(root: bytes, rel: bytes) -> bool:
    """Every component of ``rel`` is a directory, none a symlink (lstat each)."""
    path = root
    for part in rel.split(b"/") if rel else ():
        path += b"/" + part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except OSError:
            return False
    return True


def _no_rows() -> Iterator[tuple]:
    yield from ()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
