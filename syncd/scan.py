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
from .scanfeed import FeedClosed, FeedLeft, ScanFeed

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


#: Rows the scan hands its feed at a time (bounded memory: see
#: syncd.scanfeed.FEED_QUEUE) ...
FEED_BATCH = 500
#: ... or what came within this many seconds (a tree of large files hashes
#: a few rows a second: they go out as they come, not at the scan's end).
FEED_FLUSH = 0.05


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
    if dirs is not None and feed is not None:
        raise ValueError("scan: a feed goes with a full scan")
    return _Scan(root, manifest, workers=workers, on_change=on_change, dirs=dirs, feed=feed).run()


class _Scan:
    """One scan: the walk merged with the manifest's rows, written in one transaction.

    Directories are visited in byte order (a heap); the manifest's rows of
    a directory are the old side of its merge.  Files whose stat data
    changed are hashed in batches by a thread pool while the walk goes on;
    their rows are written when the hashes come back.
    """

    def __init__(self, root: Path, manifest: Manifest, *, workers: int,
                 on_change: Callable[[str, bytes], None] | None, dirs: Iterable[bytes] | None,
                 feed: ScanFeed | None) -> None:
        self.started = time.monotonic()
        self.root_b = os.fsencode(os.path.abspath(root))
        self.prev_gen = manifest.generation
        self.gen = self.prev_gen + 1
        self.result = ScanResult(generation=self.prev_gen, previous_generation=self.prev_gen)
        self.on_change = on_change
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") if workers > 1 else None
        self.in_flight: deque[Future | list] = deque()
        self.batch: list[tuple] = []  # hash jobs not yet handed to the pool
        self.batch_bytes = 0
        self.skip_prefixes: list[bytes] = []  # unreadable directories: their rows are kept
        self.partial = dirs is not None
        self.writer = manifest.writer()
        # A feed sends the unchanged rows too, with their hashes.
        self.rows = _no_rows() if self.partial else manifest.iter_entries(with_sha256=feed is not None)
        self.row: tuple | None = None  # the manifest's next row in the merge
        self.feed = feed
        self.feeding = self.have_sha = feed is not None
        self.out: list[tuple] = []  # final rows not yet handed to the feed
        self.listed: dict[bytes, tuple] = {}  # directories' rows, fed once they are listed themselves
        self.next_flush = 0.0  # when ``out`` goes to the feed even short of FEED_BATCH
        self.heap: list[bytes] = sorted(set(dirs)) if dirs is not None else [b""]
        self.visited: set[bytes] = set()

    def run(self) -> ScanResult:
        result, writer = self.result, self.writer
        self.row = next(self.rows, None)
        try:
            while self.heap:
                self._visit(heapq.heappop(self.heap))
            while self.row is not None:
                self._tombstone(self.row)
                self.row = next(self.rows, None)
            self._submit()
            self._drain(0)
            if self.feeding:
                self._flush()
            if result.changes:
                writer.set_generation(self.gen, result.changes)
                result.generation = self.gen
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        finally:
            self.rows.close()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        result.seconds = time.monotonic() - self.started
        return result

    # -- what the scan reports and feeds

    def _changed(self, kind: str, row: tuple) -> None:
        self.result.counts[kind] += 1
        if self.on_change is not None:
            self.on_change(kind, join(row[_PARENT], row[_NAME]))

    def _emit(self, row: tuple) -> None:
        self.out.append(row)
        if len(self.out) >= FEED_BATCH or time.monotonic() >= self.next_flush:
            self._flush()

    def _flush(self) -> None:
        if self.out:
            self.feed.put(self.out)
            self.out = []
        self.next_flush = time.monotonic() + FEED_FLUSH

    def _keep(self, row: tuple | None) -> None:
        # A row the scan leaves as it was (unreadable, still changing).
        if self.feeding and row is not None and not row[_DELETED]:
            self._emit(row)

    def _tombstone(self, row: tuple) -> None:
        if row[_DELETED]:
            return
        for p in self.skip_prefixes:
            if row[_PARENT] == p or row[_PARENT].startswith(p + b"/"):
                self._keep(row)  # below an unreadable directory: kept as it was
                return
        self.writer.tombstone(row[_PARENT], row[_NAME], self.gen)
        self._changed(DELETED, row)
        if self.partial and row[_KIND] == KIND_DIR:
            # A full walk meets the rows below it on its way; a partial scan
            # never lists this directory again, so they go now.
            self._tombstone_below(join(row[_PARENT], row[_NAME]))

    def _tombstone_below(self, rel: bytes) -> None:
        for below in self.writer.live_under(rel):
            self.writer.tombstone(below[_PARENT], below[_NAME], self.gen)
            self._changed(DELETED, below)

    # -- one directory

    def _visit(self, d: bytes) -> None:
        if self.feeding and not self.feed.wanted:  # every push declined: stop building rows
            self.feeding = False
            self.out.clear()
            self.listed.clear()
        old_rows: dict[bytes, tuple] = {}
        if self.partial:
            if d in self.visited:
                return
            self.visited.add(d)
            if not _real_dir(self.root_b, d):
                # A symlink (or a file) now stands where the watcher saw a
                # directory: never list through it.  Its parent's visit
                # records what is there.
                return
            old_rows = {r[_NAME]: r for r in self.writer.rows_in(d)}
        row, rows = self.row, self.rows
        while row is not None and row[_PARENT] < d:
            self._tombstone(row)
            row = next(rows, None)
        while row is not None and row[_PARENT] == d:
            old_rows[row[_NAME]] = row
            row = next(rows, None)
        self.row = row
        dir_path = self.root_b + b"/" + d if d else self.root_b
        if not d:
            self._record_root()
        mine = self.listed.pop(d, None) if self.feeding else None
        listing = self._list(d, dir_path, mine, old_rows)
        if listing is None:
            return
        dirents, mine = listing
        if mine is not None:
            self._emit(mine)  # listed: it exists, and comes before what it holds
        self.result.entries += len(dirents)
        self._entries(d, dir_path, dirents, old_rows)
        for old in old_rows.values():
            self._tombstone(old)

    def _list(self, d: bytes, dir_path: bytes, mine: tuple | None,
              old_rows: dict[bytes, tuple]) -> tuple[list[os.DirEntry], tuple | None] | None:
        """The directory's entries, and its own row to feed; None when it is
        left as it was (unreadable, or gone in a partial scan)."""
        try:
            with os.scandir(dir_path) as it:
                return list(it), mine
        except (FileNotFoundError, NotADirectoryError):
            if self.partial:
                return None  # gone: its parent's visit tombstones it and all below
            # Vanished since its parent was listed: its rows are deletions,
            # and it is never fed.
            if d:
                parent, name = split(d)
                self.writer.upsert((parent, name, KIND_DIR, 0, 0, 0, 0, 0, None, None, self.gen, 1, 0, 1))
                self._changed(DELETED, (parent, name))
            return [], None
        except OSError as err:
            if not d:
                raise ScanError(f"cannot list root {fspath(self.root_b)}: {err.strerror}") from err
            log.warning("cannot list %s: %s; kept as it was", fspath(d), err.strerror)
            self.result.unreadable.append(d)
            self.skip_prefixes.append(d)
            self._keep(mine)
            for old in old_rows.values():
                self._keep(old)
            return None

    def _entries(self, d: bytes, dir_path: bytes, dirents: list[os.DirEntry], old_rows: dict[bytes, tuple]) -> None:
        feeding = self.feeding
        pop = old_rows.pop
        for de in dirents:
            name = de.name
            old = pop(name, None)
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                if old is not None:
                    self._tombstone(old)
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
                        self._emit(old)
                else:
                    self._relinked(d, name, old, st)
                continue
            self._entry(d, dir_path, name, old, st)

    def _relinked(self, d: bytes, name: bytes, old: tuple, st: os.stat_result) -> None:
        """Only the device or the link count differ: a row of a version 1
        manifest (the file's ctime moves with its link count).  No need to
        read the file again."""
        sha = old[_SHA] if self.have_sha else self.writer.sha256_of(d, name)
        fixed = old[:_SHA] + (sha,) + old[_TARGET:_DEV] + (st.st_dev, st.st_nlink)
        if link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev, st.st_ino, st.st_nlink):
            fixed = fixed[:_GEN] + (self.gen,) + fixed[_DELETED:]
            self._changed(RELINKED, fixed)
        self.writer.upsert(fixed)
        if self.feeding:
            self._emit(fixed)

    def _entry(self, d: bytes, dir_path: bytes, name: bytes, old: tuple | None, st: os.stat_result) -> None:
        """One entry that is not an unchanged file."""
        mode = st.st_mode
        perm = stat.S_IMODE(mode)
        fresh = old is None or old[_DELETED]
        if self.partial and not fresh and old[_KIND] == KIND_DIR and not stat.S_ISDIR(mode):
            # A directory became a file or link: what was below it is gone.
            self._tombstone_below(join(d, name))
        if stat.S_ISREG(mode):
            self._file(d, name, old, st, perm, fresh)
        elif stat.S_ISDIR(mode):
            self._dir(d, name, old, st, perm, fresh)
        elif stat.S_ISLNK(mode):
            self._symlink(d, dir_path, name, old, st, perm, fresh)
        elif old is not None:
            # FIFOs, sockets, devices are not mirrored; one that replaced a
            # mirrored path deletes that path.
            self._tombstone(old)

    def _file(self, d: bytes, name: bytes, old: tuple | None, st: os.stat_result, perm: int, fresh: bool) -> None:
        if (
            not fresh
            and old[_KIND] == KIND_FILE
            and old[_SIZE] == st.st_size
            and old[_MTIME] == st.st_mtime_ns
            and old[_CTIME] == st.st_ctime_ns
            and old[_INO] == st.st_ino
            and old[_MODE] == perm
        ):
            if self.feeding:
                self._emit(old)
            return
        self.batch.append((join(d, name), d, name, None if fresh else old))
        self.batch_bytes += st.st_size
        if self.batch_bytes >= BATCH_BYTES or len(self.batch) >= BATCH_FILES:
            self._submit()

    def _dir(self, d: bytes, name: bytes, old: tuple | None, st: os.stat_result, perm: int, fresh: bool) -> None:
        rel = join(d, name)
        new = (d, name, KIND_DIR, 0, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino, None, None)
        if not self.partial or fresh or old[_KIND] != KIND_DIR:
            heapq.heappush(self.heap, rel)
        final = old
        # A directory's link count is its subdirectories, not names of it:
        # recorded as 1.
        if fresh or old[_KIND] != KIND_DIR:
            final = new + (self.gen, 0, st.st_dev, 1)
            self._changed(ADDED, new)
        elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
            final = new + (self.gen, 0, st.st_dev, 1)
            self._changed(META, new)
        elif (old[_CTIME], old[_INO], old[_DEV]) != (st.st_ctime_ns, st.st_ino, st.st_dev):
            final = new + (old[_GEN], 0, st.st_dev, 1)
        if final is not old:
            self.writer.upsert(final)
        if self.feeding:
            self.listed[rel] = final

    def _symlink(self, d: bytes, dir_path: bytes, name: bytes, old: tuple | None, st: os.stat_result, perm: int,
                 fresh: bool) -> None:
        if (
            not fresh
            and old[_KIND] == KIND_SYMLINK
            and (old[_SIZE], old[_MTIME], old[_CTIME], old[_INO], old[_DEV])
            == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        ):
            if self.feeding:
                self._emit(old)
            return
        try:
            target = os.readlink(dir_path + b"/" + name)
        except FileNotFoundError:
            if old is not None:
                self._tombstone(old)
            return
        new = (d, name, KIND_SYMLINK, st.st_size, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino, None, target)
        # A symlink may have several names too (link(2) of the symlink
        # itself): rsync -H keeps them.
        ident = (st.st_dev, st.st_nlink)
        gen = self.gen
        if fresh or old[_KIND] != KIND_SYMLINK:
            new += (gen, 0) + ident
            self._changed(ADDED, new)
        elif old[_TARGET] != target or link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev, st.st_ino,
                                                    st.st_nlink):
            new += (gen, 0) + ident
            self._changed(RELINKED, new)
        elif old[_MTIME] != st.st_mtime_ns:
            new += (gen, 0) + ident
            self._changed(META, new)
        else:
            new += (old[_GEN], 0) + ident
        self.writer.upsert(new)
        if self.feeding:
            self._emit(new)

    def _record_root(self) -> None:
        # Stat'ed before it is listed, as every other directory is (by its parent).
        try:
            st = os.stat(self.root_b)  # root may be a symlink to the tree: the operator's choice, followed
        except OSError:
            return  # the listing says why
        old = self.writer.root_row()
        perm = stat.S_IMODE(st.st_mode)
        new = (b"", b"", KIND_DIR, 0, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino, None, None)
        if old is None or old[_DELETED]:
            # Recorded for the first time (a new manifest, or one from before
            # the root had a row): no generation of its own.  An empty root
            # stays generation 0, and an existing tree's mirrors get root's
            # times with the next generation (every commit carries them).
            self.writer.upsert(new + (self.prev_gen, 0, st.st_dev, 1))
        elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
            self.writer.upsert(new + (self.gen, 0, st.st_dev, 1))
            self._changed(META, new)
        elif (old[_CTIME], old[_INO], old[_DEV]) != (st.st_ctime_ns, st.st_ino, st.st_dev):
            self.writer.upsert(new + (old[_GEN], 0, st.st_dev, 1))

    # -- hashing, beside the walk

    def _submit(self) -> None:
        if not self.batch:
            return
        if self.pool is None:
            self.in_flight.append(_hash_batch(self.root_b, self.batch))
        else:
            self.in_flight.append(self.pool.submit(_hash_batch, self.root_b, self.batch))
        self.batch, self.batch_bytes = [], 0
        self._drain(MAX_BATCHES_IN_FLIGHT)

    def _drain(self, limit: int) -> None:
        while len(self.in_flight) > limit:
            item = self.in_flight.popleft()
            results = item.result() if isinstance(item, Future) else item
            for job, outcome in results:
                self._hashed(job, outcome)

    def _hashed(self, job: tuple, outcome: object) -> None:
        rel, parent, name, old = job
        if outcome is _Vanished:
            if old is not None:
                self._tombstone(old)
            return
        if isinstance(outcome, OSError):
            # Unreadable now (permissions, I/O error): keep what we knew.
            log.warning("cannot read %s: %s; kept as it was", fspath(rel), outcome.strerror)
            self._keep(old)
            return
        if outcome is None:
            log.warning("%s is still changing; left for the next scan", fspath(rel))
            self.result.unstable.append(rel)
            self._keep(old)
            return
        digest, st = outcome
        self.result.files_hashed += 1
        self.result.bytes_hashed += st.st_size
        perm = stat.S_IMODE(st.st_mode)
        row = (parent, name, KIND_FILE, st.st_size, st.st_mtime_ns, st.st_ctime_ns, perm, st.st_ino,
               digest, None)
        ident = (st.st_dev, st.st_nlink)
        gen = self.gen
        if old is None or old[_DELETED] or old[_KIND] != KIND_FILE:
            row += (gen, 0) + ident
            self._changed(ADDED, row)
        elif (old[_SHA] if self.have_sha else self.writer.sha256_of(parent, name)) != digest:
            row += (gen, 0) + ident
            self._changed(MODIFIED, row)
        elif (old[_MODE], old[_MTIME]) != (perm, st.st_mtime_ns):
            row += (gen, 0) + ident
            self._changed(META, row)
        elif link_changed(old[_DEV], old[_INO], old[_NLINK], st.st_dev, st.st_ino, st.st_nlink):
            row += (gen, 0) + ident
            self._changed(RELINKED, row)
        else:
            row += (old[_GEN], 0) + ident  # same content, metadata and names: no new generation
        self.writer.upsert(row)
        if self.feeding:
            self._emit(row)


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


# FeedClosed and ScanFeed: syncd.scanfeed's, named here too for the scan's callers.
__all__ = ["ADDED", "DELETED", "META", "MODIFIED", "RELINKED", "FeedClosed", "FeedLeft", "ScanFeed", "ScanResult",
           "hash_file", "link_changed", "scan"]
