"""The remote end of a push: ``syncd agent``, speaking the protocol on stdin/stdout.

The agent does every write on its host.  It validates each name from the
wire, stages received files under ``state_dir/staging`` (content-addressed by
SHA-256, same filesystem as root), checks each one's SHA-256, and at
``commit`` publishes the generation into root, in docs/design.md's "Publish order":
directories, data files, index files together, deletions, this node's trace
file, and last the upstream's times of every directory whose entries changed
(``_TouchedDirs`` remembers those across a push cut short) and of root.
(New data files at new paths may go live before, once the plan is complete:
``_EarlyPublisher``.)
Every file reaches its final name by ``rename(2)`` through ``SafeRoot``,
which never follows a symlink below root.  The manifest records the new
generation only after publishing.

Staged objects survive a killed session: a rerun finds them by content and
does not ask for them again.  Temporary files (``tmp.*``) of a killed session
are removed at start.  A file already published by a killed session is
recognized by size, mtime and a local re-hash, so a rerun converges without
resending it.

Before publishing, ``commit`` passes the whole generation through one gate
(``_verify_generation``): every staged object is re-hashed against its
SHA-256 (except those this session or, during this boot, a prewarm stager
checked: ``fsops.VerifiedLog``), and when the generation touches an index file, the index group of
the tree as it will be (changed files from staging, the others from root)
goes through ``verify.verify_index_group``: signatures against ``[verify]
keyring`` when one is set, Release/repomd chains always.  Any finding holds
the generation back (``_hold_back``): only pure additions go live, the edge
stays on its last good generation, and the pusher gets an error.

Messages are documented in docs/protocol.md, section 4.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import json
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import import_in_background
from . import plan as planmod
from .basis import Candidates
from .config import Config
from .errors import (
    DISK_FULL_ERRNOS,
    DiskFullError,
    PatchMismatchError,
    ProtocolError,
    SyncdError,
    UnsafePathError,
    VerifyError,
    disk_full_as,
)
from .filters import Filter
from .fsops import (DIRECT_MIN, WRITEBACK_MIN, BufferPool, SafeRoot, SparseWriter, boot_id, copy_extents,
                    sha256_around_cache, start_writeback, syncfs, unlink_at, validate_name, verified_this_boot)
from .lock import StateLock
from .manifest import (
    KIND_DIR,
    KIND_FILE,
    KIND_LETTERS,
    KIND_SYMLINK,
    META_HELD_BACK,
    META_REPAIR,
    Manifest,
    fspath,
    join,
    split,
)
from .partial import (PARTIAL_MAX_AGE, PARTIAL_PREFIX, RANGES_SUFFIX, RECORD_EVERY, RESUME_MIN, RUN_PREFIX, RangeLog, promote_run,
                      take_over)
from .protocol import (MAX_OPEN_STREAMS, PROTOCOL_VERSION, BodyPool, FrameReader, FrameType, FrameWriter,
                       negotiate)
from .session import stdio
from .sparse import hash_zeros

if TYPE_CHECKING:
    from . import verify as verifymod

log = logging.getLogger(__name__)

# A second push into this node (a daemon's reconcile meeting a cascade) waits
# this long for the first to finish before it gives up.
AGENT_LOCK_WAIT = 120.0
# Seconds between "cascading" heartbeats while this node pushes to its subtree.
CASCADE_HEARTBEAT = 5.0
# Below this size a delta saves too little to pay for its signature round trip.
DELTA_MIN_SIZE = 64 * 1024
# New files per push that may look for a basis (a file of a similar name the
# plan deletes or replaces, syncd.basis): a signature read each, at most.
BASIS_MAX_FILES = 1000
# Signatures of bases kept for other new files that choose the same one.
BASIS_SIGNATURES_KEPT = 16
#: Replaced or deleted files from this size on are freed after the commit.
PARK_MIN = 1 << 20
#: From this size on, an old copy's signature is computed in two halves at once.
SIG_SPLIT_MIN = 16 << 20
PARK_FREE_DELAY = 1.0  # seconds after the commit
# Protocol 1.2: a local copy of a file from this size on is made by a
# staging thread (need "copy"); smaller ones at once, by the main thread.
ASYNC_COPY_MIN = 1 << 20
ROW_FIELDS = 9  # path, kind, size, mtime_ns, mode, sha256, target, deleted, generation
#: What this agent takes beyond the negotiated minor (its welcome's
#: ``features``, docs/protocol.md section 4): ``sparse`` payloads and holes
#: in a delta's result, ``resume`` offers in ``needs`` with the
#: ``file`` message's ``offset``, ``fuzzy``: begin's ``fuzzy``, with
#: new files put off to ``planned`` while their basis is looked for, and
#: ``hardlinks``: the groups a ``begin`` with ``hardlinks`` names in its
#: ``entries`` (``links``), and ``itemize``: rsync's %i in each item.
FEATURES = ("sparse", "resume", "fuzzy", "hardlinks", "itemize")
# How many findings a held-back generation's error message and meta quote.
FINDINGS_QUOTED = 5
# New data files published while the push still arrives: in batches of at
# least this many (or what came within the wait), one syncfs each.
EARLY_PUBLISH_BATCH = 64
EARLY_PUBLISH_WAIT = 0.05
# Threads that stage arriving files (create, decompress or patch, hash, write:
# the GIL is released for the syscalls and the hashing), while the main
# thread reads and parses frames.  A file goes to one of them whole.
STAGING_WORKERS = 2
# Chunks (each at most a frame body) waiting for one staging thread: memory
# stays bounded by this, not by file sizes.
STAGING_QUEUE = 16
# DATA body buffers kept for reuse: as many as can be out at once (every
# queue full, one chunk in each staging thread's hands, one being read).
BODY_BUFFERS = STAGING_WORKERS * (STAGING_QUEUE + 1) + 1
# A bundle ("files", protocol 1.1) carries at most this many files and bytes.
BUNDLE_MAX_FILES = 4096
BUNDLE_MAX_BYTES = 16 << 20
# A full comparison keeps this many listed paths in memory, the rest on disk.
SEEN_IN_MEMORY = 50_000


@dataclass(slots=True)
class _Row:  # slots: a full comparison holds one per path until commit
    path: bytes
    kind: int
    size: int
    mtime_ns: int
    mode: int
    sha256: bytes | None
    target: bytes | None
    deleted: int
    generation: int
    # Whether the path is an index file (Agent._is_index): asked up to three
    # times a row at commit, so classified once.
    index: bool | None = None
    # Hard links (a push that names them): the first name of this file's
    # group (this row's own path for the first), and how many names it has.
    link: bytes | None = None
    names: int = 1

    @classmethod
    def from_wire(cls, raw: Any) -> "_Row":
        if not isinstance(raw, list) or len(raw) != ROW_FIELDS:
            raise ProtocolError("entries: a row is not a list of 9 fields")
        path, kind, size, mtime_ns, mode, sha, target, deleted, gen = raw
        if not isinstance(path, bytes):
            raise ProtocolError("entries: path is not bytes")
        validate_name(path)
        if kind not in (KIND_FILE, KIND_DIR, KIND_SYMLINK):
            raise ProtocolError(f"entries: {fspath(path)}: unknown kind {kind!r}")
        _check_numbers(f"entries: {fspath(path)}", size, mtime_ns, mode, gen)
        if not deleted:
            if kind == KIND_FILE and not (isinstance(sha, bytes) and len(sha) == 32):
                raise ProtocolError(f"entries: {fspath(path)}: a file without a SHA-256")
            if kind == KIND_SYMLINK and not (isinstance(target, bytes) and target and b"\0" not in target):
                raise ProtocolError(f"entries: {fspath(path)}: a symlink without a valid target")
        return cls(path, kind, size, mtime_ns, mode & 0o7777, sha, target, 1 if deleted else 0, gen)

    @classmethod
    def root_from_wire(cls, raw: Any) -> "_Row":
        """``commit``'s ``root``: the root's own row, a live directory at the empty path."""
        if not isinstance(raw, list) or len(raw) != ROW_FIELDS or raw[0] != b"":
            raise ProtocolError("commit: root is not a row of 9 fields with the empty path")
        _, kind, size, mtime_ns, mode, _sha, _target, deleted, gen = raw
        if kind != KIND_DIR or deleted:
            raise ProtocolError("commit: root is not a live directory")
        _check_numbers("commit: root", size, mtime_ns, mode, gen)
        return cls(b"", KIND_DIR, 0, mtime_ns, mode & 0o7777, None, None, 0, gen)

    def manifest_row(self, st: os.stat_result | None) -> tuple:
        """The row this node records: the upstream's content and times, this
        node's own stat data (its inodes and link counts, as a scan here would)."""
        parent, name = split(self.path)
        ctime = st.st_ctime_ns if st else 0
        ino = st.st_ino if st else 0
        size = self.size if self.kind == KIND_FILE else (st.st_size if st and self.kind == KIND_SYMLINK else 0)
        return (parent, name, self.kind, size, self.mtime_ns, ctime, self.mode, ino,
                self.sha256 if self.kind == KIND_FILE else None,
                self.target if self.kind == KIND_SYMLINK else None, self.generation, self.deleted,
                st.st_dev if st else 0, st.st_nlink if st and self.kind != KIND_DIR else 1)

    def content(self) -> bytes:
        """What every name of one file (or symlink) has in common."""
        return b"f" + self.sha256 if self.kind == KIND_FILE else b"l" + self.target


@dataclass(slots=True)
class _LinkGroup:
    """One file (or symlink) of several names in a push, as this edge will publish it."""

    first: _Row
    # Where the first name's content comes from: "staged" (received or
    # copied into staging; for a symlink, made anew), "have" (the file in
    # place), "meta" (in place, its mode or mtime to set).
    state: str
    inode: tuple[int, int] | None  # (dev, ino) of the first name's file here, when it stays in place
    exact: bool  # the edge has it already: one file with exactly these names
    members: list[_Row] = field(default_factory=list)


def _check_numbers(where: str, size: Any, mtime_ns: Any, mode: Any, gen: Any) -> None:
    for name, value in (("size", size), ("mtime_ns", mtime_ns), ("mode", mode), ("generation", gen)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}: {name} is not an integer")
    if size < 0 or not 0 <= mode <= 0o7777:
        raise ProtocolError(f"{where}: size or mode out of range")


@dataclass
class _Plan:
    generation: int | None = 0  # None: named by the commit (1.4, a push fed by a running scan)
    full: bool = False
    dry_run: bool = False
    filter: Filter = field(default_factory=lambda: Filter.from_lists())
    max_delete: float = 0.1
    dirs: list[_Row] = field(default_factory=list)
    files: list[_Row] = field(default_factory=list)  # content comes from staging
    metas: list[_Row] = field(default_factory=list)  # content in place; mode/mtime to apply
    links: list[_Row] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)  # every row, for the manifest
    seen: "_PathSet" = field(default_factory=lambda: _PathSet())  # full mode: every path listed (class below)
    pending: set[bytes] = field(default_factory=set)  # SHA-256s asked for and not yet staged
    made_dirs: set[bytes] = field(default_factory=set)  # new directories the _DirMaker made
    fresh: set[bytes] = field(default_factory=set)  # files at paths the edge did not have
    early: dict[bytes, os.stat_result] = field(default_factory=dict)  # published before the commit
    root: _Row | None = None  # the root's own row, from the commit (protocol: commit's "root")
    ended: bool = False  # entries_end came: the plan is complete
    signatures: int = 0  # signatures of the edge's old copies asked for
    # SHA-256 -> the offset offered: a file sent whole may start there (its
    # prefix is this edge's partial file, taken over as a run of this process).
    resumes: dict[bytes, int] = field(default_factory=dict)
    # A basis for new files that have no copy here (syncd.basis, _basis_items):
    bases: Candidates = field(default_factory=Candidates)  # files the plan deletes or replaces
    want_basis: list[_Row] = field(default_factory=list)  # new files of this entries batch
    deferred: list[_Row] = field(default_factory=list)  # answered in "planned" (need "later")
    basis_of: dict[bytes, bytes] = field(default_factory=dict)  # path -> the file its delta is against
    basis_sigs: dict[bytes, Any] = field(default_factory=dict)  # basis -> its signature's Future, the last few
    defer: bool = False  # the pusher keeps a file answered "later" until "planned" (begin: fuzzy)
    itemize: bool = False  # each item carries rsync's %i (begin: itemize)
    basis_tries: int = 0  # new files that looked for a basis (BASIS_MAX_FILES)
    # Hard links: the pusher names the groups (rows not named are files of one name).
    hardlinks: bool = False
    linkcheck: planmod.LinkChecker = field(default_factory=planmod.LinkChecker)
    groups: list[_LinkGroup] = field(default_factory=list)  # complete, and not as they are here yet
    breaks: list[_Row] = field(default_factory=list)  # files of one name in place, which have more here
    # Files here (dev, ino) whose names this push changes: the manifest rows
    # of their other names get their new link count and ctime.
    touched: set[tuple[int, int]] = field(default_factory=set)


class _PathSet:
    """The paths a full comparison listed, for the deletion walk at its end.

    In memory up to ``limit`` paths, then in a scratch SQLite file in
    staging (``tmp.PID.seen``, removed with the set or, after a kill, by the
    next agent's temp cleanup): a reconcile of millions of paths stays
    bounded.  Adds are buffered; the walk asks, after the last add, one
    directory at a time (:meth:`in_dir`).
    """

    def __init__(self, limit: int = 0, where: Path | None = None) -> None:
        self.limit = limit or SEEN_IN_MEMORY
        self.where = where
        self._mem: set[bytes] = set()
        self._db: Any = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._file: Path | None = None

    def add(self, path: bytes) -> None:
        if self._db is None:
            self._mem.add(path)
            if len(self._mem) > self.limit and self.where is not None:
                self._spill()
            return
        self._pending.append(split(path))
        if len(self._pending) >= 10_000:
            self._flush()

    def _spill(self) -> None:
        import sqlite3

        self._file = self.where / f"tmp.{_PID}.seen"
        try:
            self._file.unlink()
        except FileNotFoundError:
            pass
        self._db = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (parent BLOB, name BLOB, PRIMARY KEY (parent, name)) WITHOUT ROWID")
        self._pending = [split(p) for p in self._mem]
        self._mem = set()
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO seen (parent, name) VALUES (?, ?)", self._pending)
            self._db.execute("COMMIT")
            self._pending = []

    def in_dir(self, d: bytes) -> set[bytes]:
        """The listed paths directly in directory ``d`` (or, held in memory, all of them)."""
        if self._db is None:
            return self._mem
        self._flush()
        return {join(d, name) for (name,) in self._db.execute("SELECT name FROM seen WHERE parent = ?", (d,))}

    def __contains__(self, path: bytes) -> bool:
        return path in self.in_dir(split(path)[0])

    def clear(self) -> None:
        self._mem = set()
        self._pending = []
        if self._db is not None:
            self._db.close()
            self._db = None
            try:
                self._file.unlink()
            except FileNotFoundError:
                pass


class _Incoming:
    """One file arriving on a stream, written to a staging temp file.

    From RESUME_MIN on, a file sent whole (raw or zstd) is written as a run
    of this process (``run.PID.<sha256hex>``, syncd.partial) whose progress
    is recorded as it reaches the file: cut short, it becomes the object's
    partial file, and the next push resumes from its prefix (the ``offset``
    this agent offered, the prefix taken over again at planning).  A sparse
    payload (``sparse``, syncd.sparse) writes only the data; with ``delta``,
    ``sparse`` asks for runs of zeros in the result to be left as holes.
    """

    def __init__(self, agent: "Agent", msg: dict) -> None:
        self.agent = agent
        self.path = validate_name(_field(msg, "path", bytes))
        self.how = _field(msg, "how", str)
        self.size = _field(msg, "size", int)
        self.sha256 = _field(msg, "sha256", bytes)
        if self.how not in ("whole", "zstd", "delta"):
            raise ProtocolError(f"file {fspath(self.path)}: unknown encoding {self.how!r}")
        if self.size < 0:
            raise ProtocolError(f"file {fspath(self.path)}: negative size")
        self.sparse = msg.get("sparse") is True
        self.offset = msg.get("offset", 0)
        if not isinstance(self.offset, int) or isinstance(self.offset, bool):
            raise ProtocolError(f"file {fspath(self.path)}: offset is not an integer")
        if self.offset and (self.how == "delta" or agent.plan.resumes.get(self.sha256) != self.offset):
            raise ProtocolError(f"file {fspath(self.path)}: offset {self.offset} was not offered")
        agent.plan.resumes.pop(self.sha256, None)  # an offer is used once
        self.tmp = agent._new_tmp()
        # A run's name is this process's and this object's: the prefix taken
        # over at planning is there already.  One stream at a time writes it
        # (a second one for the same content, which no plan asks for, goes
        # to a file of its own and is not resumable).
        self.run = (f"{RUN_PREFIX}{_PID}.{self.sha256.hex()}"
                    if self.how != "delta" and self.size >= RESUME_MIN else None)
        if self.run is not None:
            if self.run in agent._open_runs:
                if self.offset:
                    raise ProtocolError(f"file {fspath(self.path)}: offset {self.offset} was not offered")
                self.run = None
            else:
                agent._open_runs.add(self.run)
        self.records: RangeLog | None = None
        self.recorded = self.offset  # the run's prefix recorded so far
        # Created by the staging thread at the first write (creating a file
        # is one of the slower steps per small file).
        self.fd: int | None = None
        self.out: SparseWriter | None = None
        self.worker: "_Stager | None" = None
        self.dead = False  # failed, or its session did: the staging thread drops the rest
        # A resumed file is hashed again whole at the end (its prefix was
        # written by an earlier session, possibly another process).
        self.hasher = None if self.offset else hashlib.sha256()
        self.written = self.offset  # logical bytes accounted for (holes included)
        self.old_fd: int | None = None
        self._sink: Callable[[Any], None]
        self._decoder = None
        write: Callable[[Any], None] = self._write
        if self.sparse and self.how != "delta":
            from .sparse import Decoder

            self._decoder = Decoder(self.offset, self.size, self._write, self._hole, name=fspath(self.path))
            write = self._decoder.feed
        if self.how == "whole":
            self._sink = write
        elif self.how == "zstd":
            import zstandard

            self._zw = zstandard.ZstdDecompressor().stream_writer(_Sink(write), write_size=1 << 20)
            self._sink = self._zw.write
        else:
            from .delta import Patcher

            # A new file's old copy is the basis the plan chose (syncd.basis).
            self.old_fd = agent.root.open_read(agent.plan.basis_of.get(self.path, self.path))
            old_size = os.fstat(self.old_fd).st_size
            old_fd = self.old_fd
            self._patcher = Patcher(lambda off, n: os.pread(old_fd, n, off), old_size, self._write,
                                    max_output=self.size)
            self._sink = self._patcher.feed

    def _open(self) -> None:
        sfd = self.agent.staging_fd
        if self.run is not None:
            # Read back at the end when resumed: O_RDWR.
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            if self.offset:
                self.fd = os.open(self.run, flags, dir_fd=sfd)
                if os.fstat(self.fd).st_size != self.size:
                    raise PatchMismatchError(f"{fspath(self.path)}: its partial file changed meanwhile")
            else:
                self.fd = os.open(self.run, flags | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=sfd)
            self.agent._taken.discard(self.run)
            self.records = RangeLog(sfd, self.run, fresh=not self.offset)
        else:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=sfd)
        if (self.run is not None and not self.offset) or self.sparse:
            # At its final size from the start: a hole is what is not written,
            # and a run cut short is a partial file (at its final size).
            os.ftruncate(self.fd, self.size)
        self.out = SparseWriter(self.fd, self.offset, self.agent.buffers if self.size >= DIRECT_MIN else None,
                                find_zeros=self.sparse and self.how == "delta")

    def _write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.written + len(view) > self.size:
            raise PatchMismatchError(f"{fspath(self.path)}: more bytes than the announced {self.size}")
        if self.fd is None:
            self._open()
        if self.how != "delta" and self.hasher is not None:  # the patcher hashes its output itself
            self.hasher.update(view)
        with disk_full_as(self._disk_full):
            self.out.write(view)
        self.written += len(view)
        if self.records is not None:
            self._record()

    def _hole(self, n: int) -> None:
        """``n`` bytes of zeros the sender did not send (a sparse payload)."""
        if self.fd is None:
            self._open()
        if self.hasher is not None:
            hash_zeros(self.hasher, n)
        with disk_full_as(self._disk_full):
            self.out.skip(n)
        self.written += n
        if self.records is not None:
            self._record()

    def _record(self) -> None:
        done = self.out.done()
        if done - self.recorded >= RECORD_EVERY:
            self.records.add(self.recorded, done - self.recorded)
            self.recorded = done

    def _disk_full(self) -> str:
        return f"disk full staging {fspath(self.path)} in {self.agent.staging}; nothing was published"

    def feed(self, data: bytes) -> None:
        self._sink(data)

    def finish(self) -> bytes | None:
        """Close the stream; returns the staged object name, or None if it failed."""
        try:
            if self.fd is None:
                self._open()  # an empty file
            digest = None
            if self.how == "zstd":
                self._zw.flush()
            elif self.how == "delta":
                digest = self._patcher.finish()
            if self._decoder is not None:
                self._decoder.finish()  # a hole up to the end, or a payload cut inside an extent
            with disk_full_as(self._disk_full):
                self.out.close()
            if self.written != self.size:
                raise PatchMismatchError(f"{fspath(self.path)}: received content does not match its SHA-256")
            if self.hasher is None:
                # Resumed: the whole file as it is now, read back (holes not read).
                digest, _ = sha256_around_cache(self.fd, self.agent.buffers)
            elif digest is None:
                digest = self.hasher.digest()
            if digest != self.sha256:
                raise PatchMismatchError(
                    f"{fspath(self.path)}: received content does not match its SHA-256"
                )
            meta = self.agent._wanted_meta.get(self.path)
            if meta is not None:  # after the last write: the mtime stays
                os.fchmod(self.fd, meta[0])
                os.utime(self.fd, ns=(meta[1], meta[1]))
            # No fsync per file (it cost 0.3 ms a file, most of a small-file
            # sync): a killed process loses nothing of the page cache, and
            # _publish makes staging durable with one syncfs before any rename
            # into root.  A large file's write-out starts now, without waiting
            # for it, so that the disk works while the rest arrives and
            # syncfs finds less left to do (for small files the separate
            # writes cost more than they save: measured).
            if self.size >= WRITEBACK_MIN:
                start_writeback(self.fd)
        except BaseException:
            self.discard()
            raise
        finally:
            self._close_fds()
        obj = self.sha256.hex()
        sfd = self.agent.staging_fd
        os.rename(self.run or self.tmp, obj, src_dir_fd=sfd, dst_dir_fd=sfd)
        if self.run is not None:
            # The object is whole: its records, and any partial file of it
            # (an earlier, shorter attempt), serve nothing any more.
            unlink_at(sfd, self.run + RANGES_SUFFIX, PARTIAL_PREFIX + obj, PARTIAL_PREFIX + obj + RANGES_SUFFIX)
            self.agent._open_runs.discard(self.run)  # its name is free again only now
        self.agent.verified_now.add(obj)
        self.agent.staged_this_push.add(obj)
        if meta is not None:
            self.agent._applied[obj] = meta
        if self.agent._early_rows:
            self.agent._staged_now(obj)
        return obj

    def _close_fds(self) -> None:
        # The sink is a bound method of this object (a cycle): dropped, so
        # that reference counting frees it with the cyclic GC paused.
        self._sink = self._zw = self._patcher = self._decoder = None  # type: ignore[assignment]
        if self.out is not None:
            self.out.abandon()
        if self.records is not None:
            self.records.close()
        for fd in (self.fd, self.old_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.old_fd = None  # type: ignore[assignment]

    def discard(self, keep: bool = False) -> None:
        """Drop what arrived.  With ``keep`` (the session ended, nothing went
        wrong with the file itself), a run's recorded prefix stays, as the
        object's partial file, for the next push to resume from."""
        self._close_fds()
        sfd = self.agent.staging_fd
        if self.run is not None:
            self.agent._taken.discard(self.run)
        if self.run is None:
            unlink_at(sfd, self.tmp)
        elif keep and self.recorded > 0:
            promote_run(sfd, self.run)
        else:
            unlink_at(sfd, self.run, self.run + RANGES_SUFFIX)
        if self.run is not None:
            self.agent._open_runs.discard(self.run)


class _Bundle:
    """Small files arriving together on one stream ("files"): their bytes
    back to back, cut by the announced sizes, each staged as a file of its own."""

    def __init__(self, agent: "Agent", msg: dict) -> None:
        self.agent = agent
        how = _field(msg, "how", str)
        if how not in ("whole", "zstd"):
            raise ProtocolError(f"files: unknown encoding {how!r}")
        raw = _field(msg, "items", list)
        if not 0 < len(raw) <= BUNDLE_MAX_FILES:
            raise ProtocolError(f"files: {len(raw)} items, outside [1, {BUNDLE_MAX_FILES}]")
        self.items: list[tuple[bytes, int, bytes]] = []
        for item in raw:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], bytes)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0
                    or not isinstance(item[2], bytes) or len(item[2]) != 32):
                raise ProtocolError("files: an item is not [path bytes, size int, sha256 32 bytes]")
            self.items.append((validate_name(item[0]), item[1], item[2]))
        self.total = sum(size for _, size, _ in self.items)
        if self.total > BUNDLE_MAX_BYTES:
            raise ProtocolError(f"files: {self.total} bytes, above {BUNDLE_MAX_BYTES}")
        self.path = self.items[0][0]  # named in errors
        self.how = how
        self.worker: "_Stager | None" = None
        self.dead = False
        self.received = 0
        self._next = 0  # the item whose bytes come next
        self._cur: _Incoming | None = None
        self.staged: list[bytes] = []
        self.failed: list[tuple[bytes, str]] = []
        self._zw: Any = None

    def feed(self, data: Any) -> None:
        if self.how == "zstd":
            if self._zw is None:
                import zstandard

                self._zw = zstandard.ZstdDecompressor().stream_writer(_Sink(self._take), write_size=1 << 20)
            self._zw.write(data)
        else:
            self._take(data)

    def _take(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.received + n > self.total:
            raise ProtocolError(f"files: more than the announced {self.total} bytes")
        self.received += n
        while True:
            if self._cur is None:
                if self._next == len(self.items):
                    break
                path, size, sha = self.items[self._next]
                self._next += 1
                self._cur = _Incoming(self.agent, {"type": "file", "path": path, "how": "whole",
                                                   "size": size, "sha256": sha})
            cur = self._cur
            want = cur.size - cur.written
            if want:
                if not view:
                    break
                piece, view = view[:want], view[want:]
                cur._write(piece)
                if cur.written < cur.size:
                    break
            self._cur = None
            self._complete(cur)
        return n

    def _complete(self, inc: "_Incoming") -> None:
        try:
            inc.finish()
        except PatchMismatchError as err:
            self.failed.append((inc.path, str(err)))
            return
        self.agent.plan.pending.discard(inc.sha256)
        self.staged.append(inc.path)

    def finish(self) -> None:
        """The stream ended: every announced byte must have arrived."""
        if self._zw is not None:
            self._zw.flush()
        self._take(b"")  # empty files at the end
        self._zw = None  # it holds a bound method of this object (a cycle)
        if self.received != self.total or self._cur is not None or self._next != len(self.items):
            raise ProtocolError(f"files: stream ended after {self.received} of {self.total} bytes")

    def discard(self, keep: bool = False) -> None:
        self._zw = None
        if self._cur is not None:
            self._cur.discard()
            self._cur = None


class _Sink:
    def __init__(self, write: Callable[[Any], None]) -> None:
        self.write = write


def _field(msg: dict, key: str, kind: type) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{msg.get('type')!r} message: field {key!r} missing or not {kind.__name__}")
    return value


class _LockedWriter(FrameWriter):
    """The agent's writer: the main loop, the staging threads and the cascade
    heartbeat all answer on it, each frame whole."""

    def __init__(self, send_all: Callable[[Any], None]) -> None:
        super().__init__(send_all)
        self.lock = threading.RLock()

    def message(self, value: Any, stream: int = 0) -> None:
        with self.lock:
            super().message(value, stream)

    def end(self, stream: int, value: Any = None) -> None:
        with self.lock:
            super().end(stream, value)

    def data(self, stream: int, chunk: Any) -> None:
        with self.lock:
            super().data(stream, chunk)

    def flush(self) -> None:
        with self.lock:
            super().flush()


class _LocalCopy:
    """A file this edge holds already under another name (rename or copy
    detection), copied into staging by a staging thread while the main
    thread goes on planning.  Protocol 1.2: its item says need ``copy``, and
    it is acknowledged like a file that arrived (``staged``, or ``failed``
    with ``retry_whole`` when no source still holds the content)."""

    def __init__(self, row: "_Row", sources: list[bytes]) -> None:
        self.row = row
        self.sources = sources
        self.path = row.path
        self.sha256 = row.sha256
        self.dead = False
        self.worker: "_Stager | None" = None

    def discard(self, keep: bool = False) -> None:
        pass  # _stage_copy leaves no partial file behind


class _TouchedDirs:
    """The directories whose entries this node changed since its last commit.

    At the end of a commit every directory whose entries a push added,
    replaced or removed gets its upstream's mtime back (a rename or an
    unlink sets it to now).  A push cut short (kill -9 of either end, a
    lost link, a held-back generation) may already have changed some: the
    directory maker, the early publisher, a commit killed half-way.  A
    rerun's plan need not name those directories again (a file the killed
    push published is found in place and needs nothing), so the edge keeps
    the record itself: ``state_dir/touched-dirs``, one NUL-terminated path
    per directory (root is the empty one), appended *before* the change it
    announces and removed once a commit has put every mtime back and
    recorded its generation.  Each push reads it at ``begin``, under the
    lock.  kill -9 needs no sync (the page cache survives the process);
    where a ``syncfs`` precedes renames (early publisher, commit) it makes
    the record durable with the staged bytes.  The set is closed under
    parents: publishing may make missing directories, each of which changes
    its own parent.  Memory follows the directories touched, not the files.
    Called from the main, directory-maker and early-publisher threads.
    """

    NAME = "touched-dirs"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.NAME
        self._lock = threading.Lock()
        self._dirs: set[bytes] = set()
        self._fd = -1

    def load(self) -> None:
        """Take over what an earlier session recorded and did not repair."""
        with self._lock:
            self._dirs = set()
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return
            records = data.split(b"\0")
            records.pop()  # b"", or a record cut short by a kill: its change never happened
            for path in records:
                try:
                    if path:
                        validate_name(path)
                except UnsafePathError:
                    log.warning("%s: ignoring a bad record %r", self.path, path[:80])
                    continue
                self._close_under(path)

    def add(self, paths: Any) -> None:
        """Record the parent directories of ``paths`` (relative paths of
        entries about to be made, replaced or removed), and theirs.  Raises
        OSError when the record cannot be written: the change must not go
        ahead then."""
        parents = {path.rpartition(b"/")[0] for path in paths}  # (a set first: 35 ms per 100,000 paths)
        with self._lock:
            new: list[bytes] = []
            for d in parents - self._dirs:
                new += self._close_under(d)
            if not new:
                return
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            record = b"".join(d + b"\0" for d in new)
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                self._dirs.difference_update(new)  # not recorded: asked again next time
                raise

    def _close_under(self, d: bytes) -> list[bytes]:
        new = []
        while d not in self._dirs:
            self._dirs.add(d)
            new.append(d)
            if not d:
                break
            d = split(d)[0]
        return new

    def dirs(self) -> set[bytes]:
        with self._lock:
            return set(self._dirs)

    def clear(self) -> None:
        """Every directory recorded has its mtime back, and the generation is recorded."""
        with self._lock:
            self._close_fd()
            self._dirs = set()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _DirMaker(threading.Thread):
    """Makes the directories a push adds while the main thread goes on planning.

    Allocating a directory's inode was 0.23 s of a 5,000-directory initial
    copy, all of it in the one-threaded commit before.  An empty directory
    that nothing served refers to yet may appear early: a held-back
    generation makes the new directories live as well.  It has a SafeRoot
    of its own (the main thread's caches directory fds).  What fails here is
    left to the commit, which makes the directory itself and reports why it
    cannot.
    """

    def __init__(self, root: bytes | str, touched: _TouchedDirs) -> None:
        super().__init__(name="dirs", daemon=True)
        self.root = root
        self.touched = touched
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.made: set[bytes] = set()
        self.cancelled = False  # the push ends uncommitted: what is still queued is not made

    def run(self) -> None:
        with SafeRoot(self.root) as root:
            done = False
            while not done:
                # What is queued by now goes in one record of touched directories.
                batch = [self.queue.get()]
                while batch[-1] is not None:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is None:
                    done = True
                    batch.pop()
                if self.cancelled or not batch:
                    continue
                try:
                    self.touched.add(path for path, _ in batch)
                except OSError as err:
                    log.debug("new directories left to the commit (%s)", err)
                    continue
                for path, mode in batch:
                    if self.cancelled:
                        break
                    try:
                        root.ensure_dir(path, mode)
                    except (OSError, UnsafePathError) as err:
                        log.debug("%s: left to the commit (%s)", fspath(path), err)
                    else:
                        self.made.add(path)

    def finish(self) -> set[bytes]:
        """Wait for the directories queued so far; the ones made."""
        self.queue.put(None)
        self.join()
        return self.made


class _EarlyPublisher(threading.Thread):
    """Publishes new data files while the rest of a push still arrives.

    Only what the commit itself would publish first, and what a held-back
    generation would publish as well: a data file (not in the index group)
    at a path the edge does not have, whose content this session received
    and hashed, staged with its final mode and mtime, under no other path
    of the plan.  It starts once the plan is complete and its deletions
    pass the guard.  Each batch is made durable by one syncfs before its
    renames (as at commit), so a reader never meets a file that a crash
    could leave torn.  The commit then publishes the rest: the other data
    files, the index group, the deletions, and directory mtimes last.  A
    push that ends without its commit leaves these files in place, verified
    and unrecorded: the next push finds them there and sends nothing again.
    It has a SafeRoot of its own (the main thread's caches directory fds).
    """

    def __init__(self, agent: "Agent") -> None:
        super().__init__(name="early-publish", daemon=True)
        self.agent = agent
        self._cond = threading.Condition()
        self._ready: list[tuple[str, "_Row"]] = []
        self._stopping = False
        self.published: dict[bytes, os.stat_result] = {}  # path -> its stat once published

    def offer(self, items: list[tuple[str, "_Row"]]) -> None:
        with self._cond:
            self._ready += items
            self._cond.notify()

    def run(self) -> None:
        agent = self.agent
        with SafeRoot(agent.cfg.node.root) as root:
            while True:
                with self._cond:
                    while not self._ready and not self._stopping:
                        self._cond.wait()
                    if not self._ready:
                        return
                    # A few at a time are not worth a syncfs each: gather a moment.
                    deadline = time.monotonic() + EARLY_PUBLISH_WAIT
                    while not self._stopping and len(self._ready) < EARLY_PUBLISH_BATCH:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    batch, self._ready = self._ready, []
                try:
                    # Recorded before the syncfs: durable before the renames it announces.
                    agent.touched.add(row.path for _, row in batch)
                    agent.sync_staging()
                except OSError:
                    continue  # the commit meets it again and says so; the rest waits in staging
                for obj, row in batch:
                    try:
                        self.published[row.path] = root.publish(agent.staging_fd, obj.encode(), row.path)
                    except (OSError, UnsafePathError) as err:
                        # Left to the commit, which also replaces a file
                        # standing where a directory goes (and says why not).
                        log.debug("%s: published at the commit (%s)", fspath(row.path), err)

    def finish(self) -> dict[bytes, os.stat_result]:
        """Publish what was offered, stop; the paths published."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join()
        return self.published


_END = object()  # queued after a file's last chunk
_ASK_BASIS = object()  # _decide_row: this new file's item waits for its basis (Agent._basis_items)


class _Stager(threading.Thread):
    """Stages the files handed to it, in order, and acknowledges each one."""

    def __init__(self, agent: "Agent", n: int) -> None:
        super().__init__(name=f"stager-{n}", daemon=True)
        self.agent = agent
        self.queue: queue.Queue = queue.Queue(maxsize=STAGING_QUEUE)

    def run(self) -> None:
        give_back = self.agent.bodies.give_back
        while True:
            item = self.queue.get()
            payload = None
            try:
                if item is None:
                    return
                inc, payload = item
                if inc.dead or self.agent.failure is not None or (
                        self.agent.closing and isinstance(inc, _LocalCopy)):
                    # Failed earlier, or the session did: drop what is left of
                    # it.  (A session that just ends still stages the files
                    # that arrived whole: a retry finds them and resumes.)
                    if payload is _END:
                        inc.discard()
                    continue
                if payload is _END:
                    self.agent._finish(inc)
                else:
                    inc.feed(payload)
            except BaseException as err:  # the session's error: reported by the agent
                inc.dead = True
                try:
                    inc.discard()
                    self.agent._staging_failed(inc, err)
                except BaseException:  # noqa: BLE001 - this thread must go on draining its queue
                    log.exception("staging thread: while failing")
            finally:
                # The chunk's buffer goes back to the reader once it is
                # written, dropped or failed: nothing holds its bytes then
                # (DirectWriter copies them into its aligned buffer or
                # writes them at once, the zstd writer and the patcher take
                # what they keep into their own).  A view still alive, such
                # as one in a failure's traceback, keeps it from reuse:
                # give_back checks.
                give_back(payload)
                self.queue.task_done()

    def put(self, item: tuple) -> None:
        """Hand over a chunk, waiting while the queue is full (bounded memory),
        but never for a thread that is gone."""
        while True:
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if not self.is_alive():
                    raise ProtocolError("a staging thread ended unexpectedly") from None


class Agent:
    """One session: reads frames from ``recv``, writes answers through ``send_all``."""

    def __init__(self, cfg: Config, recv: Callable[[int], bytes], send_all: Callable[[Any], None],
                 recv_into: Callable[[memoryview], int] | None = None) -> None:
        self.cfg = cfg
        # DATA bodies go to the staging threads, which give each buffer back.
        self.bodies = BodyPool(limit=BODY_BUFFERS)
        self.reader = FrameReader(recv, recv_into=recv_into, bodies=self.bodies)
        self.writer = _LockedWriter(send_all)
        self.stagers: list[_Stager] = []  # started at the first file
        self._next_stager = 0
        # The first error of a staging thread, already logged and sent.
        self.failure: SyncdError | None = None
        self._failure_lock = threading.Lock()
        self._importer: threading.Thread | None = None
        self._verify_importer: threading.Thread | None = None
        self._sig_pool: Any = None
        self._sig_jobs: list = []
        self._tmp_counter = itertools.count(1)
        self._manifest_empty = False
        self._began_empty = False  # this push began on an empty mirror (see _begin)
        self._missing: set[bytes] = set()
        # path -> (mode, mtime_ns) the staging thread applies; object -> what it applied
        self._wanted_meta: dict[bytes, tuple[int, int]] = {}
        self._applied: dict[str, tuple[int, int]] = {}
        self._known_path: bytes | None = None  # the last lookup of _manifest_row
        self._going: tuple[set[bytes], set[bytes]] | None = None  # what the push deletes, what it replaces
        self._known: Any = None
        self.state_dir = cfg.node.state_dir
        self.staging = self.state_dir / "staging"
        self.plan = _Plan()
        self.incoming: dict[int, _Incoming] = {}
        self._parked: list[str] = []  # trash.PID.N in staging, unlinked after the commit
        self._early_sync: threading.Thread | None = None
        self._freers: list[threading.Thread] = []
        self._session_over = threading.Event()
        self._dir_maker: _DirMaker | None = None  # started at a push's first new directory
        self.touched = _TouchedDirs(self.state_dir)  # loaded at begin, under the lock
        self._early: _EarlyPublisher | None = None  # started at entries_end (see the class)
        self._early_rows: dict[str, _Row] = {}  # object -> the row it may go live as early
        self._early_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync_error: OSError | None = None  # sticky (see sync_staging)
        self._copies: list[_LocalCopy] = []  # decided in this entries batch, not yet handed over
        # Runs taken over from partial files for a resume offered and not
        # yet begun: given back as partial files if the session ends first.
        self._taken: set[str] = set()
        self._resume_offers: list[list] = []  # [path, offset] of this entries batch
        self._open_runs: set[str] = set()  # runs an _Incoming writes now
        self.closing = False  # the session is ending: staging threads drop the local copies queued
        # Staged objects whose SHA-256 this session computed from the bytes it wrote.
        self.verified_now: set[str] = set()
        # Planning asks "is this object staged?" once per new file: answered
        # from one listing at begin plus what this push staged since, not by
        # a stat each in the staging directory (where the staging threads'
        # creates and renames hold its lock: 2.8 s of a 100,000-file push).
        self.staged_at_begin: set[str] = set()
        self.staged_this_push: set[str] = set()
        self.buffers = BufferPool(write_behind=True)  # for the staging threads' DirectWriters
        self.index = planmod.IndexMatcher(cfg.node.index_patterns)
        self._keyring: verifymod.Keyring | None = None

    # -- session ------------------------------------------------------------------

    def serve(self) -> int:
        self.writer.hello()
        self.writer.flush()
        self.version = negotiate(PROTOCOL_VERSION, self.reader.read_hello())
        self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        # The lock is taken per push (at begin) and let go at its end, not for
        # the session: an upstream daemon keeps its session to this node open
        # between pushes, and must not lock this node out meanwhile.
        self.lock = StateLock(self.state_dir, "agent", wait=AGENT_LOCK_WAIT)
        self.locked = False
        self.links: dict = {}  # this node's own downstreams, kept for the session (cascade)
        with Manifest.open(self.state_dir, self.cfg.node.name) as manifest:
            self.manifest = manifest
            self.lookup = manifest.reader()
            self.root = SafeRoot(self.cfg.node.root)
            self.staging.mkdir(mode=0o700, exist_ok=True)
            self.staging_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._clean_temps()
            try:
                return self._loop()
            finally:
                gc.enable()
                self.closing = True
                for link in self.links.values():
                    link.close()
                self._stop_stagers()
                self._stop_early_publish()
                self.buffers.close()
                self._unmake_dirs()
                self._session_over.set()
                for freer in self._freers:
                    freer.join()
                if self._early_sync is not None:
                    self._early_sync.join()  # it uses staging_fd, closed below
                self._free_parked()
                if self._sig_pool is not None:
                    self._sig_pool.shutdown(wait=True)
                self.plan.seen.clear()  # a session cut before entries_end: its scratch file goes
                for importer in (self._importer, self._verify_importer):
                    if importer is not None:
                        importer.join()  # not cut off by the interpreter's exit mid-import
                for inc in self.incoming.values():
                    inc.discard(keep=True)  # a run cut short stays as a partial file
                for run in self._taken:  # offered, never begun: back as it was
                    promote_run(self.staging_fd, run)
                self._unlock()
                self.touched.close()
                os.close(self.staging_fd)
                self.root.close()
                self.lookup.close()
                if self._keyring is not None:
                    self._keyring.close()

    def _loop(self) -> int:
        try:
            while True:
                frame = self.reader.read_frame()
                if self.failure is not None:
                    return self.failure.exit_status  # a staging thread failed: logged and sent
                if frame is None:
                    return 0  # the client closed: a session without commit publishes nothing more
                if frame.kind is FrameType.MESSAGE:
                    if not isinstance(frame.payload, dict) or not isinstance(frame.payload.get("type"), str):
                        raise ProtocolError("a MESSAGE frame without a 'type'")
                    done = self._message(frame.payload)
                    self.writer.flush()
                    if done:
                        return 0
                elif frame.kind is FrameType.DATA:
                    inc = self._stream(frame.stream)
                    inc.worker.put((inc, frame.payload))
                else:
                    self._end(frame.stream)
        except SyncdError as err:
            if self.failure is not None:
                return self.failure.exit_status
            log.error("%s", err)
            self._send_error(err)
            return err.exit_status
        except OSError as err:
            failure = _as_error(err, self.cfg.node.name)
            log.error("%s", failure)
            self._send_error(failure)
            return failure.exit_status

    def _send_error(self, err: SyncdError) -> None:
        try:
            self.writer.message({"type": "error", "kind": type(err).__name__, "message": str(err)})
            self.writer.flush()
        except OSError:
            pass  # the client is gone; the log has it

    def _message(self, msg: dict) -> bool:
        kind = msg["type"]
        if kind == "hello":
            held = self.manifest.get_meta("upstream_generation")
            if self._verify_importer is None:
                # syncd.verify (0.01 s) is first needed at commit: imported
                # from here on, not before this end's hello (6 ms sooner).
                self._verify_importer = import_in_background("syncd.verify")
            if self._importer is None and held is not None:
                # numpy and the signature code (0.07 s of CPU) for a push's
                # first changed file: imported from here on, while the
                # upstream reads the welcome and sends its first entries.
                # (A mirror without a generation decides at begin.)
                self._importer = import_in_background("syncd.delta")
            # Findings of `syncd verify --repair` are in rows no generation
            # will list: claiming no generation asks for a full comparison.
            repair = self.manifest.get_meta(META_REPAIR) is not None
            self.writer.message({
                "type": "welcome",
                "node": self.cfg.node.name,
                "generation": None if held is None or repair else int(held),
                "upstream": self.manifest.get_meta("upstream"),
                "repair": repair,
                # Its own downstreams: the pusher then asks it to cascade.
                "downstreams": [m.name for m in self.cfg.mirrors],
                # What it takes beyond the negotiated minor's messages (optional keys).
                "features": list(FEATURES),
            })
            self.client = msg.get("node") if isinstance(msg.get("node"), str) else "?"
        elif kind == "begin":
            self._begin(msg)
        elif kind == "entries":
            self._entries(msg)
        elif kind == "entries_end":
            self._entries_end()
        elif kind in ("file", "files"):  # one file, or a bundle of small ones (1.1)
            stream = _field(msg, "stream", int)
            if stream in self.incoming:
                raise ProtocolError(f"stream {stream} opened twice")
            if len(self.incoming) >= MAX_OPEN_STREAMS:
                raise ProtocolError(f"more than {MAX_OPEN_STREAMS} files open at once")
            self._assign(stream, (_Incoming if kind == "file" else _Bundle)(self, msg))
        elif kind == "commit":
            self._commit(msg)
        elif kind == "cascade":
            self._cascade()
        elif kind in ("abort", "bye"):
            return True
        else:
            raise ProtocolError(f"unknown message type {kind!r}")
        return False

    def _cascade(self) -> None:
        """Push this node's generation on to its own downstreams, and report the subtree.

        A heartbeat every few seconds tells the waiting upstream that the
        subtree is still being served (its io_timeout counts silence).
        """
        import threading

        from .push import push_tree

        if self.incoming or self.plan.rows:
            raise ProtocolError("cascade in the middle of a push")
        done = threading.Event()
        lock = threading.Lock()

        def beat() -> None:
            while not done.wait(CASCADE_HEARTBEAT):
                with lock:
                    self.writer.message({"type": "cascading"})
                    self.writer.flush()

        beater = threading.Thread(target=beat, name="cascade-heartbeat", daemon=True)
        beater.start()
        try:
            results = push_tree(self.cfg, self.manifest, links=self.links)
        finally:
            done.set()
            beater.join()
        self.manifest.set_meta("last_tree", json.dumps([r.to_wire() for r in results]))
        with lock:
            self.writer.message({"type": "cascaded", "results": [r.to_wire() for r in results]})

    def _assign(self, stream: int, inc: "_Incoming | _Bundle") -> None:
        """A new incoming stream, handed to a staging thread."""
        self.incoming[stream] = inc
        self._hand_to_stager(inc)

    def _hand_to_stager(self, inc: "_Incoming | _Bundle | _LocalCopy") -> None:
        """Choose the staging thread for ``inc`` (the threads start at the first)."""
        if not self.stagers:
            self.stagers = [_Stager(self, n) for n in range(STAGING_WORKERS)]
            for stager in self.stagers:
                stager.start()
        inc.worker = self.stagers[self._next_stager % len(self.stagers)]
        self._next_stager += 1

    def _stream(self, stream: int) -> _Incoming:
        inc = self.incoming.get(stream)
        if inc is None:
            raise ProtocolError(f"DATA for stream {stream}, which no 'file' message opened")
        return inc

    def _end(self, stream: int) -> None:
        inc = self._stream(stream)
        del self.incoming[stream]
        inc.worker.put((inc, _END))

    def _finish(self, inc: "_Incoming | _Bundle") -> None:
        """In a staging thread: a file's (or a bundle's) last chunk arrived."""
        if isinstance(inc, _Bundle):
            inc.finish()  # a short bundle is the session's error (raised to run())
            for path, error in inc.failed:
                self._failed(path, error)
            if inc.staged:
                self.writer.message({"type": "staged", "paths": inc.staged})
        elif isinstance(inc, _LocalCopy):
            # A fresh SafeRoot: the main thread's keeps a cache of directory fds.
            with SafeRoot(self.cfg.node.root) as root:
                copied = self._stage_copy(root, inc.row, inc.sources)
            if copied is None:
                self._failed(inc.path, f"{fspath(inc.path)}: no local file with its content matched its SHA-256")
            else:
                self.plan.pending.discard(inc.sha256)
                self.writer.message({"type": "staged", "path": inc.path})
        else:
            try:
                inc.finish()
            except (PatchMismatchError, _delta_format_error()) as err:
                self._failed(inc.path, str(err))
            else:
                self.plan.pending.discard(inc.sha256)
                self.writer.message({"type": "staged", "path": inc.path})
        if inc.worker.queue.unfinished_tasks <= 1:  # nothing more queued: answer now
            self.writer.flush()

    def _failed(self, path: bytes, error: str) -> None:
        """A file that arrived wrong: the pusher sends it once more, whole."""
        log.warning("%s", error)
        self.writer.message({"type": "failed", "path": path, "error": error, "retry_whole": True})

    def _staging_failed(self, inc: _Incoming, err: BaseException) -> None:
        """In a staging thread: the session cannot go on.  Said at once (the
        main thread may be waiting for frames the pusher will not send before
        it hears back); every file still queued is dropped."""
        with self._failure_lock:
            if self.failure is not None:
                return
            if isinstance(err, OSError):
                failure = _as_error(err, self.cfg.node.name)
            elif isinstance(err, SyncdError):
                failure = err
            else:  # a codec's own error (a corrupt zstd frame): one line, not a traceback
                failure = ProtocolError(f"file {fspath(inc.path)}: {type(err).__name__}: {err}")
            self.failure = failure
        # Said first; the staging threads drop everything still queued (they
        # check ``failure``), and the main thread stops at its next frame.
        log.error("%s", failure)
        self._send_error(failure)

    def _drain(self) -> None:
        """Wait until every file handed to the staging threads is staged (or
        failed), and every new directory queued is made (or left to publish)."""
        for stager in self.stagers:
            stager.queue.join()  # run() marks every item done, error or not
        self.plan.made_dirs |= self._stop_dir_maker()
        if self.failure is not None:
            raise self.failure

    def _stop_dir_maker(self, *, cancel: bool = False) -> set[bytes]:
        maker, self._dir_maker = self._dir_maker, None
        if maker is None:
            return set()
        maker.cancelled = cancel
        return maker.finish()

    def _unmake_dirs(self) -> None:
        """A push that ends without its commit takes back the new directories
        made for it (empty ones only, deepest first).  After a kill -9 they
        stay, empty, and the next push uses them."""
        made = self._stop_dir_maker(cancel=True) | self.plan.made_dirs
        try:
            self.touched.add(made)  # already, as the maker made them; unless that failed
        except OSError:
            pass  # the next push makes them again, and records their parents first
        for path in sorted(made, key=planmod.depth, reverse=True):
            self.root.remove_empty_dir(path)
        self.plan.made_dirs = set()

    def _stop_stagers(self) -> None:
        for stager in self.stagers:
            try:
                stager.put(None)
            except ProtocolError:
                pass  # gone already
        for stager in self.stagers:
            stager.join()
        self.stagers = []

    # -- planning -------------------------------------------------------------------

    def _unlock(self) -> None:
        if self.locked:
            self.lock.release()
            self.locked = False

    def _begin(self, msg: dict) -> None:
        if self.incoming or self.plan.rows:
            raise ProtocolError("begin in the middle of a push")
        # No cyclic GC during a push, as in syncd.gc_paused (full collections
        # walked its rows in the commit); back on once it is committed.
        gc.disable()
        if not self.locked:
            self.lock.acquire()  # waits for another push into this node to end
            self.locked = True
        # Directory fds kept from an earlier push of this session may name
        # directories another session (or the operator) replaced since: walk
        # afresh from root, now that the lock keeps other writers out.
        self.root.forget()
        self.touched.load()  # directories a push cut short left with the wrong mtime
        self._manifest_empty = self.lookup.empty()  # see _manifest_row
        # A new mirror: nothing here for a full comparison to delete, and no
        # old copy to send a signature of.  (The lock keeps other writers out.)
        self._began_empty = self._manifest_empty and self._root_empty()
        self.staged_at_begin = _staged_objects(self.staging_fd)
        self.staged_this_push = set()
        self._known_path = None  # the manifest may have changed since the last push
        self._missing = set()  # directories this plan found absent
        self._going = None  # see _goes_away
        self._wanted_meta = {}
        self._applied = {}
        self._stop_early_publish()
        rules = msg.get("filter") or []
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise ProtocolError("begin: filter is not a list of rules")
        ppm = msg.get("max_delete_ppm", 100_000)
        if not isinstance(ppm, int) or isinstance(ppm, bool) or not 0 <= ppm <= 1_000_000:
            raise ProtocolError("begin: max_delete_ppm is not an integer from 0 to 1000000")
        max_delete = ppm / 1_000_000
        try:
            rule_filter = Filter.parse(rules)
        except ValueError as err:
            raise ProtocolError(f"begin: {err}") from None
        generation = msg.get("generation")
        if generation is not None or self.version < (1, 4) or not msg.get("full"):
            generation = _field(msg, "generation", int)
        self.plan = _Plan(
            generation=generation,
            full=bool(msg.get("full")),
            dry_run=bool(msg.get("dry_run")),
            filter=rule_filter,
            max_delete=max_delete,
            seen=_PathSet(where=self.staging),
            defer=bool(msg.get("fuzzy")) and self.version >= (1, 3),
            hardlinks=msg.get("hardlinks") is True,
            itemize=bool(msg.get("itemize")),
        )
        self.force_deletes = bool(msg.get("force_deletes"))
        if not self.plan.dry_run and self._importer is None and not self._began_empty:
            # numpy and the signature code (0.07 s), for the first changed
            # file, imported while the entries arrive.
            self._importer = import_in_background("syncd.delta")

    def _root_empty(self) -> bool:
        try:
            with os.scandir(self.cfg.node.root) as it:
                return next(it, None) is None
        except OSError:
            return False

    def _entries(self, msg: dict) -> None:
        if self.plan.ended:
            raise ProtocolError("entries after entries_end")
        batch = _field(msg, "batch", int)
        raw_rows = _field(msg, "rows", list)
        links = self._links(msg, len(raw_rows))
        items: list[list] = []
        streamed = self.version >= (1, 3)
        try:
            for i, raw in enumerate(raw_rows):
                row = _Row.from_wire(raw)
                if i in links:
                    row.link, row.names = links[i]
                item = self._decide(row)
                if item is not None:
                    items.append(item)
            items += self._basis_items(final=False)
        except BaseException:
            self._send_signatures()  # to close their files
            raise
        if not streamed:
            self._send_signatures()  # before the needs that names them
        needs: dict[str, Any] = {"type": "needs", "batch": batch, "items": items}
        if self._resume_offers:
            needs["resume"], self._resume_offers = self._resume_offers, []
        self.writer.message(needs)
        if streamed:
            # 1.3: each signature follows the needs as soon as it is computed,
            # and the pusher starts that file's delta while the others are
            # still being read here.
            self._stream_signatures()
        # A copy's "staged" must not reach the pusher before the item asking for it.
        copies, self._copies = self._copies, []
        for copy in copies:
            self._hand_to_stager(copy)
            copy.worker.put((copy, _END))

    def _links(self, msg: dict, count: int) -> dict[int, tuple[bytes, int]]:
        """The batch's hard-link groups (``links``): row index -> (first name, names)."""
        raw = msg.get("links")
        if raw is None:
            return {}
        if not self.plan.hardlinks or not isinstance(raw, list):
            raise ProtocolError("entries: links without a begin that announced them, or not a list")
        links: dict[int, tuple[bytes, int]] = {}
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ProtocolError("entries: a links entry is not a list of 3 fields")
            i, first, names = entry
            if (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count or i in links
                    or not isinstance(names, int) or isinstance(names, bool) or not isinstance(first, bytes)):
                raise ProtocolError(f"entries: bad links entry {entry!r:.80}")
            links[i] = (validate_name(first), names)
        return links

    def _decide(self, row: _Row) -> list | None:
        """What to do with one row; returns the wire item, or None for nothing.

        Item: [action, path, need, source, sig_stream]; ``need`` is "whole",
        "delta" or None (no bytes wanted).
        """
        plan = self.plan
        if plan.full and not self._began_empty:  # for the deletion walk
            plan.seen.add(row.path)
        parent = split(row.path)[0]
        if parent and parent in self._missing:
            st = None  # below a directory that is not there (nothing makes one before commit)
        else:
            st = self.root.lstat(row.path)
        if st is None and row.kind == KIND_DIR:
            self._missing.add(row.path)
        if row.link is not None:
            item = self._decide_linked(row, st)
        else:
            item = self._decide_row(row, st)
        if plan.itemize and item is not _ASK_BASIS:
            item = self._itemized(row, st, item)
        if item is _ASK_BASIS:
            plan.rows.append(row)
            return None  # answered at the end of its batch, or in "planned"
        if item is None and plan.full and self._recorded(row, st):
            # A full comparison (a reconcile) lists every path: one that the
            # manifest already records exactly as it is is not kept until
            # commit, so memory follows the changes, not the tree.
            return None
        plan.rows.append(row)
        return item

    def _itemized(self, row: _Row, st: os.stat_result | None, item: list | None) -> list | None:
        """``item`` with rsync's %i added (begin's ``itemize``).  A directory
        whose only change is its time gets an item of its own (the commit
        sets that time without one): rsync lists it too."""
        if item is None:
            if row.kind != KIND_DIR or row.deleted or st is None or st.st_mtime_ns == row.mtime_ns:
                return None
            item = [planmod.META, row.path, None, None, None]
        item.append(self._flags(row, st, item[0]))
        return item

    def _flags(self, row: _Row, st: os.stat_result | None, action: str) -> str:
        """rsync's %i of one item, '/' after it when the path is a directory."""
        if action == planmod.DELETE:
            return planmod.DELETING + ("/" if st is not None and stat.S_ISDIR(st.st_mode) else "")
        kind = KIND_LETTERS[row.kind]
        retarget = action == planmod.LINK and st is not None and stat.S_ISLNK(st.st_mode)
        flags = planmod.itemize(kind, st, size=row.size, mtime_ns=row.mtime_ns, mode=row.mode,
                                transfer=action in (planmod.NEW, planmod.DELTA, planmod.COPY),
                                target_changed=retarget)
        if action == planmod.HLINK:
            flags = planmod.hard_link_flags(flags)
        return flags + ("/" if kind == "d" else "")

    def _recorded(self, row: _Row, st: os.stat_result | None) -> bool:
        known = self._manifest_row(row.path)
        return known is not None and tuple(known) == row.manifest_row(st)

    def _manifest_row(self, path: bytes) -> Any:
        """This node's manifest row of ``path`` (None: none).  The last one is
        kept: _decide_file and then _recorded ask for the same path.  A new
        mirror (or a lost manifest) has no rows: 100,000 lookups of nothing
        cost seconds."""
        if self._manifest_empty:
            return None
        if path != self._known_path:
            self._known_path, self._known = path, self.lookup.lookup(path)
        return self._known

    def _decide_row(self, row: _Row, st: os.stat_result | None) -> list | None:
        plan = self.plan
        if row.deleted:
            if st is not None:
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    plan.touched.add((st.st_dev, st.st_ino))  # its other names' link count moves
                plan.deletes.append(row.path)
                self._basis_candidate(row.path, st)
                return [planmod.DELETE, row.path, None, None, None]
            return None
        if row.kind == KIND_DIR:
            plan.dirs.append(row)
            if st is not None and stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == row.mode:
                return None
            if st is None and not plan.dry_run:
                if self._dir_maker is None:
                    self._dir_maker = _DirMaker(self.cfg.node.root, self.touched)
                    self._dir_maker.start()
                self._dir_maker.queue.put((row.path, row.mode))
            return [planmod.DIR, row.path, None, None, None]
        if row.kind == KIND_SYMLINK:
            if st is not None and stat.S_ISLNK(st.st_mode) and self.root.readlink(row.path) == row.target:
                item = None
                if st.st_mtime_ns != row.mtime_ns:  # its own time, as rsync -a keeps it
                    plan.metas.append(row)
                    item = [planmod.META, row.path, None, None, None]
                if plan.hardlinks and row.link is None and st.st_nlink > 1:
                    plan.breaks.append(row)  # one name upstream, several here (see _decide_file)
                    plan.touched.add((st.st_dev, st.st_ino))
                    item = item or [planmod.LINK, row.path, None, None, None]
                return item
            if st is not None and stat.S_ISLNK(st.st_mode) and st.st_nlink > 1:
                plan.touched.add((st.st_dev, st.st_ino))
            plan.links.append(row)
            return [planmod.LINK, row.path, None, None, None]
        return self._decide_file(row, st)


    def _decide_linked(self, row: _Row, st: os.stat_result | None) -> list | None:
        """A row the pusher names as one of several names of a file.

        The first name is decided as any file (its bytes are the group's, sent
        once if at all); every other name needs no bytes: at commit it
        becomes a hard link of the first name's file.  A group that already
        is one file here with exactly these names needs nothing.
        """
        plan = self.plan
        if row.deleted or row.kind == KIND_DIR:
            raise ProtocolError(f"entries: {fspath(row.path)}: a hard link named on a row that is no live file "
                                "or symlink")
        same_kind = st is not None and _same_kind(row, st)
        if row.link == row.path:
            item = self._decide_file(row, st) if row.kind == KIND_FILE else self._decide_row(row, st)
            if item is None:
                state = "have"
            elif item is not _ASK_BASIS and item[0] == planmod.META:
                state = "meta"
            else:
                state = "staged"  # whole, as a delta (against a basis too), or a local copy
            in_place = state != "staged"
            group = _LinkGroup(row, state, (st.st_dev, st.st_ino) if in_place else None,
                               exact=in_place and st.st_nlink == row.names)
            plan.linkcheck.first(row.path, row.names, row.content(), group)
            return item
        group, last = plan.linkcheck.member(row.path, row.link, row.names, row.content())
        on_file = same_kind and (st.st_dev, st.st_ino) == group.inode
        if not on_file and same_kind and st.st_nlink > 1:
            plan.touched.add((st.st_dev, st.st_ino))  # linked anew: its old file loses a name
        group.exact = group.exact and on_file and st.st_nlink == row.names
        group.members.append(row)
        if last:
            if not group.exact:
                plan.groups.append(group)
                if group.inode is not None:
                    plan.touched.add(group.inode)
        return None if on_file else [planmod.HLINK, row.path, None, row.link, None]

    def _decide_file(self, row: _Row, st: os.stat_result | None) -> list | None:
        plan = self.plan
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == row.size:
            have = False
            known = self._manifest_row(row.path)
            if (
                known is not None and not known.deleted and known.sha256 == row.sha256
                and (known.size, known.mtime_ns, known.ino, known.ctime_ns)
                == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            ):
                have = True
            elif st.st_mtime_ns == row.mtime_ns:
                # Published by a killed session, or a manifest that was lost:
                # a local re-hash is far cheaper than the bytes on the wire.
                have = self._local_sha256(row.path) == row.sha256
            if have:
                item = None
                if stat.S_IMODE(st.st_mode) != row.mode or st.st_mtime_ns != row.mtime_ns:
                    plan.metas.append(row)
                    item = [planmod.META, row.path, None, None, None]
                if plan.hardlinks and row.link is None and st.st_nlink > 1:
                    # A file of one name upstream, of several here: it gets
                    # a file of its own at commit (a copy of itself), unless
                    # its other names go in this push anyway.
                    plan.breaks.append(row)
                    plan.touched.add((st.st_dev, st.st_ino))
                    item = item or [planmod.COPY, row.path, None, row.path, None]
                return item
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            plan.touched.add((st.st_dev, st.st_ino))  # replaced: its other names' link count moves
        plan.files.append(row)
        if st is None:
            plan.fresh.add(row.path)
        else:
            self._basis_candidate(row.path, st)  # replaced: its old bytes stay until the commit
        obj = row.sha256.hex()
        if row.sha256 in plan.pending or obj in self.staged_at_begin or obj in self.staged_this_push:
            return [planmod.NEW, row.path, None, None, None]  # already staged or on its way
        sources = self._copy_sources(row)
        if sources and plan.dry_run:
            return [planmod.COPY, row.path, None, sources[0], None]
        if sources and row.size >= ASYNC_COPY_MIN and self.version >= (1, 2):
            # A staging thread copies it while this one goes on planning (a
            # renamed 64 MiB file held the needs of its batch back 0.2 s).
            plan.pending.add(row.sha256)
            self._copies.append(_LocalCopy(row, sources))  # started once the needs naming it is out
            return [planmod.COPY, row.path, "copy", sources[0], None]
        source = self._stage_copy(self.root, row, sources) if sources else None
        if source is not None:
            return [planmod.COPY, row.path, None, source, None]
        plan.pending.add(row.sha256)
        if row.mode & 0o400:
            # The staging thread gives the file its final mode and mtime while
            # it still has it open: publishing then skips an open, a chmod, a
            # utime and a close per file, in the one-threaded commit.  (An
            # object its owner cannot read keeps 0600 until then: a second
            # path with the same content is copied from it at publish.)
            self._wanted_meta[row.path] = (row.mode, row.mtime_ns)
        if (
            st is not None and stat.S_ISREG(st.st_mode)
            and st.st_size >= DELTA_MIN_SIZE and row.size >= DELTA_MIN_SIZE
        ):
            if plan.dry_run:
                return [planmod.DELTA, row.path, "delta", None, None]
            return [planmod.DELTA, row.path, "delta", None, self._send_signature(row.path)]
        if row.size >= RESUME_MIN and not plan.dry_run and self._offer_resume(row):
            return [planmod.NEW, row.path, "whole", None, None]  # the rest of its verified prefix
        if self._wants_basis(row):
            plan.want_basis.append(row)
            return _ASK_BASIS
        return [planmod.NEW, row.path, "whole", None, None]

    def _offer_resume(self, row: _Row) -> bool:
        """A partial file of this object (a push or a prewarm cut short): its
        recorded prefix becomes a run of this process, and the pusher may
        send the rest only (the ``file`` message's ``offset``).  Whether it
        was offered."""
        run = f"{RUN_PREFIX}{_PID}.{row.sha256.hex()}"
        try:
            have = take_over(self.staging_fd, row.sha256.hex(), row.size, run)
        except OSError as err:
            log.warning("%s: its partial file cannot be resumed (%s); asked for whole", fspath(row.path), err)
            return False
        if have:
            self._taken.add(run)
            self.plan.resumes[row.sha256] = have
            self._resume_offers.append([row.path, have])
            log.info("%s: resuming from byte %d of %d", fspath(row.path), have, row.size)
        return bool(have)

    # -- a basis for a new file (rsync's --fuzzy; the choice is syncd.basis's) ------

    def _basis_candidate(self, path: bytes, st: os.stat_result) -> None:
        """``path`` is deleted or replaced by this plan: a possible basis,
        when it is a regular file large enough for a delta."""
        if stat.S_ISREG(st.st_mode) and st.st_size >= DELTA_MIN_SIZE and not self.plan.dry_run:
            parent, name = split(path)
            self.plan.bases.add(parent, name, st.st_size)

    def _wants_basis(self, row: _Row) -> bool:
        """Whether a new file with no old copy of its own here looks for a
        basis: large enough for a delta, not compressed (a new version of a
        compressed file shares next to nothing with the old one), in a
        directory this edge has, within the push's bound on signature reads."""
        plan = self.plan
        if (plan.dry_run or self._began_empty or row.size < DELTA_MIN_SIZE
                or plan.basis_tries >= BASIS_MAX_FILES or row.path.lower().endswith(planmod.COMPRESSED_SUFFIXES)):
            return False
        parent = split(row.path)[0]
        if parent in self._missing:
            return False
        if parent:
            pst = self.root.lstat(parent)
            if pst is None or not stat.S_ISDIR(pst.st_mode):
                return False
        plan.basis_tries += 1
        return True

    def _basis_items(self, *, final: bool) -> list[list]:
        """Items for the new files waiting for a basis: a delta against the
        candidate :meth:`Candidates.choose` picks, with its signature, or
        the file whole.  At a batch's end (``final`` False) one without a
        candidate yet waits for the rest of the plan (need "later", when the
        pusher keeps such files: begin's ``fuzzy``): its old version may be
        deleted by a later batch, or, in a full comparison, be found
        unlisted at the end.  At entries_end (``final``) every file is
        answered."""
        plan = self.plan
        rows, plan.want_basis = plan.want_basis, []
        if final:
            rows, plan.deferred = plan.deferred + rows, []
        items = []
        for row in rows:
            parent, name = split(row.path)
            chosen = plan.bases.choose(parent, name, row.size)
            item = self._delta_from(row, join(parent, chosen)) if chosen is not None else None
            if item is None and not final and plan.defer:
                plan.deferred.append(row)
                item = [planmod.NEW, row.path, "later", None, None]
            item = item or [planmod.NEW, row.path, "whole", None, None]
            if plan.itemize and item[2] != "later":
                item.append(self._flags(row, self.root.lstat(row.path), item[0]))
            items.append(item)
        return items

    def _delta_from(self, row: _Row, basis: bytes) -> list | None:
        """The delta item of ``row`` against this edge's file ``basis``, its
        signature started; None when ``basis`` cannot be read as a regular
        file in root (SafeRoot walks from root's fd and follows no symlink,
        so a symlink or a directory planted there is never read through)."""
        plan = self.plan
        job = plan.basis_sigs.pop(basis, None)
        if job is None:
            try:
                fd = self.root.open_read(basis)
            except (OSError, UnsafePathError) as err:
                log.debug("%s: no basis %s (%s)", fspath(row.path), fspath(basis), err)
                return None
            job = self._signature_job(fd)
        # Several new files may share a basis (a directory's one replaced
        # file): it is read once for them.  The last few are kept.
        plan.basis_sigs[basis] = job
        if len(plan.basis_sigs) > BASIS_SIGNATURES_KEPT:
            del plan.basis_sigs[next(iter(plan.basis_sigs))]
        plan.basis_of[row.path] = basis
        log.debug("%s: a delta against %s", fspath(row.path), fspath(basis))
        return [planmod.DELTA, row.path, "delta", basis, self._signature_stream(row.path, job)]

    def _staged(self, obj: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(obj, dir_fd=self.staging_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _local_sha256(self, path: bytes) -> bytes | None:
        from . import verify as verifymod  # (in the background since the upstream's hello)

        try:
            fd = self.root.open_read(path)
        except (OSError, UnsafePathError):
            return None
        try:
            return verifymod.sha256_file(fd)
        finally:
            os.close(fd)

    def _copy_sources(self, row: _Row) -> list[bytes]:
        """Rename and copy detection: the edge's regular files that its
        manifest says hold ``row``'s content, at the right size."""
        if self._manifest_empty:
            return []  # it knows no content to copy from
        sources = []
        for cand in self.lookup.with_sha256(row.sha256):
            if cand.path == row.path:
                continue
            st = self.root.lstat(cand.path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == row.size:
                sources.append(cand.path)
        return sources

    def _stage_copy(self, root: SafeRoot, row: _Row, sources: list[bytes]) -> bytes | None:
        """Stage ``row``'s content from the first of ``sources`` whose bytes
        match its SHA-256; the source used, or None.  A full disk raises."""
        for src in sources:
            tmp = self._new_tmp()
            try:
                _, digest = root.copy_into(src, self.staging_fd, tmp, self.buffers)
                if digest != row.sha256:
                    os.unlink(tmp, dir_fd=self.staging_fd)
                    continue
                obj = row.sha256.hex()
                os.rename(tmp, obj, src_dir_fd=self.staging_fd, dst_dir_fd=self.staging_fd)
                self.verified_now.add(obj)
                self.staged_this_push.add(obj)
                return src
            except (OSError, UnsafePathError) as err:
                if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
                    raise
                unlink_at(self.staging_fd, tmp)
        return None

    def _send_signature(self, path: bytes) -> int:
        """Start the block signature of this edge's copy of ``path``; its stream id.

        Computed in a pool (numpy and the hashing release the GIL), beside
        the batch's other signatures and local copies; ``_entries`` sends
        each one after the batch's ``needs`` as it ends (1.3), or all of
        them, in order, before it (1.2).
        """
        fd = self.root.open_read(path)  # here: SafeRoot belongs to this thread
        return self._signature_stream(path, self._signature_job(fd))

    def _signature_job(self, fd: int) -> Any:
        """The signature of the file open on ``fd`` (which it closes), being
        computed in the pool: a Future of its encoded bytes."""
        if self._sig_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._sig_pool = ThreadPoolExecutor(STAGING_WORKERS, thread_name_prefix="signature")
        try:
            size: int | None = os.fstat(fd).st_size
        except OSError:
            size = None  # _signature_of meets the same error and reports it
        if size is not None and size >= SIG_SPLIT_MIN:
            return _split_signature(self._sig_pool, fd, size)
        return self._sig_pool.submit(_signature_of, fd, size)

    def _signature_stream(self, path: bytes, job: Any) -> int:
        """The stream id on which ``job``'s signature goes, for ``path``'s delta."""
        self.plan.signatures += 1
        self._sig_stream = getattr(self, "_sig_stream", 0) + 1
        self._sig_jobs.append((self._sig_stream, path, job))
        return self._sig_stream

    def _send_signatures(self) -> None:
        jobs, self._sig_jobs = self._sig_jobs, []
        try:
            for stream, _path, job in jobs:
                self.writer.data(stream, job.result())
                self.writer.end(stream)
        finally:
            from concurrent.futures import wait

            wait([job for _, _, job in jobs])  # every job closes its file, even after an error

    def _stream_signatures(self) -> None:
        """1.3: send each signature of this batch when its job ends, from
        whichever thread ends it.  A copy that cannot be read is answered
        ``failed`` with ``retry_whole``: the pusher sends that file whole."""
        jobs, self._sig_jobs = self._sig_jobs, []
        for stream, path, job in jobs:
            job.add_done_callback(functools.partial(self._signature_done, stream, path))

    def _signature_done(self, stream: int, path: bytes, job: Any) -> None:
        if self.closing or self.failure is not None:
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

    def _entries_end(self) -> None:
        """Full comparison: what this edge has that the upstream did not list goes."""
        if self.plan.ended:
            raise ProtocolError("entries_end twice")
        self.plan.linkcheck.end()  # before anything can go live early
        self.plan.ended = True
        items = []
        # Deferred new files look for their basis among the unlisted files of their directory too.
        basis_dirs = {split(r.path)[0] for r in self.plan.deferred}
        if self.plan.full and not self._began_empty:  # (an empty mirror holds nothing unlisted)
            for path, is_dir, listed in self._walk():
                if listed or self.plan.filter.excluded_path(path, is_dir):
                    continue
                from .trace import protects  # this node's own trace file is not the upstream's to delete

                if protects(self.cfg, path):
                    continue
                self.plan.deletes.append(path)
                items.append([planmod.DELETE, path, None, None, None]
                             + ([planmod.DELETING + ("/" if is_dir else "")] if self.plan.itemize else []))
                if not is_dir and split(path)[0] in basis_dirs and (st := self.root.lstat(path)) is not None:
                    self._basis_candidate(path, st)
                known = None if is_dir else self._manifest_row(path)
                if known is not None and known.nlink > 1:
                    self.plan.touched.add((known.dev, known.ino))
        self.plan.seen.clear()
        items += self._basis_items(final=True)
        streamed = self.version >= (1, 3)
        if not streamed:
            self._send_signatures()  # before the planned that names them
        self.writer.message({"type": "planned", "items": items})
        if streamed:
            self._stream_signatures()
        # Not while signatures read the edge's old copies: those reads would
        # queue behind the writes (measured: the first delta started 0.1 s later).
        if self.plan.files and not self.plan.dry_run and not self.plan.signatures:
            self._start_early_sync()
        if self.plan.fresh and not self.plan.dry_run:
            self._start_early_publish()

    def _start_early_publish(self) -> None:
        plan = self.plan
        try:  # a plan the guard will refuse changes nothing before it does
            self._check_deletions()
        except SyncdError:
            return
        uses = _object_uses(plan.files)
        eligible: dict[str, _Row] = {}
        for row in plan.files:
            obj = row.sha256.hex()
            if (uses[obj] == 1 and row.path in plan.fresh and row.path in self._wanted_meta
                    and row.link is None and not self._is_index(row)):
                eligible[obj] = row
        if not eligible:
            return
        self._early = _EarlyPublisher(self)
        self._early.start()
        ready = []
        with self._early_lock:
            self._early_rows = eligible
            for obj in [o for o in eligible if o in self._applied]:  # staged already
                row = eligible.pop(obj)
                if self._applied[obj] == (row.mode, row.mtime_ns):
                    ready.append((obj, row))
        if ready:
            self._early.offer(ready)

    def _is_index(self, row: _Row) -> bool:
        if row.index is None:
            row.index = self.index(row.path)
        return row.index

    def _check_deletions(self) -> None:
        """The deletion guard on the plan's deletions (DeletionGuardError)."""
        plan = self.plan
        if plan.deletes:  # (nothing to count the tree for otherwise)
            planmod.check_deletions(
                len(set(plan.deletes)), max(self.lookup.live_count(), len(plan.deletes)), plan.max_delete,
                force=self.force_deletes, where=self.cfg.node.name,
            )

    def _staged_now(self, obj: str) -> None:
        """In a staging thread: ``obj`` is staged, hashed and has its final
        mode and mtime; it goes live early if the plan allows it."""
        with self._early_lock:
            row = self._early_rows.pop(obj, None)
            early = self._early
        if row is not None and early is not None and self._applied.get(obj) == (row.mode, row.mtime_ns):
            early.offer([(obj, row)])

    def _stop_early_publish(self) -> dict[bytes, os.stat_result]:
        with self._early_lock:
            self._early_rows = {}
        early, self._early = self._early, None
        return early.finish() if early is not None else {}

    def _start_early_sync(self) -> None:
        """Planning is over and the last files are arriving: write what is
        staged so far out now, in a thread, so that the commit's first syncfs
        finds little left (on an initial copy it was a third of the commit)."""
        self._join_early_sync()

        def sync() -> None:
            try:
                self.sync_staging()
            except OSError:
                pass  # sticky: the commit's own sync_staging raises it, and nothing is published

        self._early_sync = threading.Thread(target=sync, name="early-syncfs", daemon=True)
        self._early_sync.start()

    def sync_staging(self) -> None:
        """``syncfs`` of staging, one caller at a time, and sticky: a write-out
        error is reported to one ``syncfs`` call only, so whoever meets it
        records it for every later caller (the early syncfs thread, the
        early publisher, the commit) and none goes on to rename."""
        with self._sync_lock:
            if self._sync_error is None:
                try:
                    syncfs(self.staging_fd)
                except OSError as err:
                    self._sync_error = err
            if self._sync_error is not None:
                raise self._sync_error

    def _join_early_sync(self) -> None:
        if self._early_sync is not None:
            self._early_sync.join()
            self._early_sync = None

    def _walk(self):  # noqa: ANN202 - yields (path, is_dir, listed by the upstream)
        stack = [b""]
        root_fd = self.root.open_dir(b"")
        os.close(root_fd)
        while stack:
            d = stack.pop()
            try:
                fd = self.root.open_dir(d)
            except (OSError, UnsafePathError):
                continue
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            finally:
                os.close(fd)
            seen = self.plan.seen.in_dir(d)
            for name, is_dir in entries:
                path = join(d, os.fsencode(name))
                listed = path in seen
                yield path, is_dir, listed
                if is_dir and listed:  # else the whole directory goes: no need to list inside it
                    stack.append(path)

    # -- publishing --------------------------------------------------------------------

    def _commit(self, msg: dict) -> None:
        try:
            self._commit_locked(msg)
        finally:
            self._unlock()
            gc.enable()
            self.bodies.clear()  # the session may stay open, idle, until the next push

    def _commit_locked(self, msg: dict) -> None:
        self._drain()
        plan = self.plan
        try:
            generation = _field(msg, "generation", int)
            if plan.generation is None:
                if generation < 0:
                    raise ProtocolError("commit: generation is negative")
                plan.generation = generation
            elif generation != plan.generation:
                raise ProtocolError("commit: generation differs from begin")
            if msg.get("root") is not None:
                plan.root = _Row.root_from_wire(msg["root"])
            if self.incoming:
                raise ProtocolError("commit while files are still arriving")
            if plan.pending:
                raise ProtocolError(f"commit with {len(plan.pending)} files never received")
            self._check_deletions()
            started = time.monotonic()
            # While the early publisher still works (its syncfs, mostly: the
            # last files staged are written out first), not after it: the
            # index group it never touches, and this session's objects are
            # trusted as hashed when written.  17 ms of a 5,000-file commit.
            findings, corrupt = self._verify_generation()
        finally:
            plan.early = self._stop_early_publish()
        if findings:
            self._hold_back(findings, corrupt)  # raises
        published = self._publish(started)
        log.info(
            "generation %d from %s published: %d files, %d links, %d metadata, %d deleted in %.2f s",
            plan.generation, getattr(self, "client", "?"), published, len(plan.links), len(plan.metas),
            len(plan.deletes), time.monotonic() - started,
        )
        self.writer.message({
            "type": "committed", "generation": plan.generation,
            "published": published, "deleted": len(plan.deletes),
        })
        self.writer.flush()
        self._free_parked_later()
        self.plan = _Plan()

    def _publish(self, started: float) -> int:
        plan = self.plan
        root = self.root
        trace = None
        if self.cfg.node.trace:  # (not even its import otherwise: 4 ms of every commit)
            from . import trace
        # Every directory whose entries this commit may change is recorded
        # first (see _TouchedDirs); the syncfs below makes the record durable.
        self.touched.add(itertools.chain(
            (r.path for r in plan.dirs), (r.path for r in plan.files), (r.path for r in plan.links),
            # Names linked or given a file of their own are renamed in too.
            (r.path for g in plan.groups for r in (g.first, *g.members)), (r.path for r in plan.breaks),
            plan.deletes, [trace.trace_path(self.cfg)] if trace else ()))
        # What was staged reaches the disk before anything references it.
        self._join_early_sync()
        self.sync_staging()
        # 1. Directories, parents first (the new ones are made already, mostly).
        for row in sorted(plan.dirs, key=lambda r: (planmod.depth(r.path), r.path)):
            if row.path not in plan.made_dirs:
                root.ensure_dir(row.path, row.mode)
        # 2. Data files and links, then 3. the index group, together.  A
        # file of several names goes as one unit, with the index group if
        # any of its names is an index file.
        uses = _object_uses(plan.files)
        data: list[Any] = []
        index: list[Any] = []
        # Breaks first: a metadata change of the same row (below) then goes
        # to the file it is given.
        units: list[Any] = [_Break(r) for r in plan.breaks] + plan.groups
        firsts = {id(g.first) for g in plan.groups}  # published with their group
        units += [r for r in plan.files + plan.links + plan.metas if id(r) not in firsts]
        for unit in units:
            (index if self._unit_is_index(unit) else data).append(unit)
        index.sort(key=lambda unit: min(_index_order(r.path) for r in _unit_rows(unit)))
        meta_only = {id(r) for r in plan.metas}  # by identity: a set, not a scan per row
        published = 0
        # Each entry's stat once it is final, taken where it was just
        # published (the manifest records it without walking each path again).
        stats: dict[bytes, os.stat_result | None] = {}
        for group in (data, index):
            for row in group:
                if isinstance(row, _LinkGroup):
                    published += self._publish_group(row, uses)
                    continue
                if isinstance(row, _Break):
                    self._break_link(row.row)
                    continue
                if row.path in plan.early and id(row) not in meta_only and row.kind == KIND_FILE:
                    stats[row.path] = plan.early[row.path]  # live already (_EarlyPublisher)
                    uses[row.sha256.hex()] -= 1
                    published += 1
                    continue
                if id(row) in meta_only:
                    stats[row.path] = root.set_meta(row.path, mode=row.mode, mtime_ns=row.mtime_ns)
                elif row.kind == KIND_SYMLINK:
                    stats[row.path] = self._publish_link(row)
                else:
                    stats[row.path] = self._publish_file(row, uses)
                    published += 1
            # The renames of this group are durable before the next group
            # (the indices) can reference them: one syncfs (a journal commit,
            # the data being on disk already) instead of an fsync per directory.
            if group:
                self.sync_staging()
        # 4. Deletions, deepest first: after the indices that referenced them.
        for path in planmod.deletion_order(set(plan.deletes)):
            root.remove(path, park=self._park_deleted)
        # This node's trace file: the last change of an entry of root
        # (a failure is logged: a stale trace only makes the mirror look older).
        if trace is not None:
            trace.after_commit(self.cfg, root, self.staging_fd, generation=plan.generation,
                               upstream=getattr(self, "client", "?"), started_monotonic=started)
        # 5. Directory times last: nothing changes an entry of root after this.
        self._restore_dir_times(stats)
        # The manifest says "generation G is here" only once it is, durably
        # (deletions and directory metadata included).
        self.sync_staging()
        self._record(plan, stats)
        self.touched.clear()  # (a kill before this only repeats step 5 at the next commit)
        # (No object of this plan is left to unlink: the last path of each
        # took it by rename, here or in the early publisher.)
        # Objects still staged were kept for a held-back generation that
        # this one superseded (an InRelease signed again): nothing needs them.
        self._clean_temps(everything=True)
        return published

    def _restore_dir_times(self, stats: dict[bytes, os.stat_result | None]) -> None:
        """Give every directory of the plan, every directory whose entries
        changed since the last commit (:class:`_TouchedDirs`) and root the
        upstream's mtime (root its mode too).

        A directory's mtime is not an entry of its parent, so the order
        does not matter; what matters is that no entry below changes after
        it.  A touched directory that this plan does not list has not
        changed upstream since the generation this edge holds: its row in
        this edge's manifest has the time.  One that is gone, or that the
        upstream never had (the trace file's own ``project/trace``, made
        here), keeps the time it has.
        """
        plan = self.plan
        root = self.root
        listed = {row.path: row.mtime_ns for row in plan.dirs}
        for row in sorted(plan.dirs, key=lambda r: (-planmod.depth(r.path), r.path)):
            stats[row.path] = root.set_meta(row.path, mode=None, mtime_ns=row.mtime_ns)
        for path in self.touched.dirs():
            if not path or path in listed:
                continue
            known = self.lookup.lookup(path)
            if known is None or known.deleted or known.kind != KIND_DIR:
                continue
            st = root.lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode) or st.st_mtime_ns == known.mtime_ns:
                continue
            root.set_meta(path, mode=None, mtime_ns=known.mtime_ns)
        own = plan.root
        if own is None:  # an upstream that does not send it: as recorded, if ever
            known = self.lookup.lookup(b"")
            if known is not None and not known.deleted:
                own = _Row(b"", KIND_DIR, 0, known.mtime_ns, known.mode, None, None, 0, known.generation)
        if own is not None:
            stats[b""] = root.set_meta(b"", mode=own.mode, mtime_ns=own.mtime_ns)

    def _unit_is_index(self, unit: Any) -> bool:
        return any(self._is_index(r) for r in _unit_rows(unit))

    # -- hard links ----------------------------------------------------------------------

    def _publish_group(self, group: _LinkGroup, uses: dict[str, int]) -> int:
        """Publish one file of several names; how many names were published.

        The file's content is the staged object (verified at the gate, like
        every staged object), or the first name's file in place.  The other
        names are linked to it in staging (``link(2)``, from the object
        before it is renamed, or from the first name's file through the
        dir-fd walk, never following a symlink), then each reaches its name
        by ``rename(2)``, as any file does.  A file in place that has names
        outside the group which this push does not remove is not reused:
        the group gets a copy of it, checked against its SHA-256.  A symlink
        of several names is made anew in staging, or reused, the same way.
        """
        first = group.first
        root = self.root
        src = None  # the staging name that becomes the first name (None: the file in place stays)
        if group.state == "staged":
            src = self._staged_source(first, uses) if first.kind == KIND_FILE else self._fresh_copy(first)
            inode = None
        else:
            st = root.lstat(first.path)
            if st is None or not _same_kind(first, st) or (st.st_dev, st.st_ino) != group.inode:
                raise SyncdError(f"{fspath(first.path)}: changed on {self.cfg.node.name} during the push; "
                                 "push again")
            inode = group.inode
            if not self._only_names(st, [first.path] + [m.path for m in group.members]):
                src, inode = self._fresh_copy(first), None  # with the row's mode and mtime
            elif group.state == "meta":
                root.set_meta(first.path, mode=first.mode, mtime_ns=first.mtime_ns)
        linked: list[tuple[str, _Row]] = []
        try:
            for member in group.members:
                if inode is not None:
                    mst = root.lstat(member.path)
                    if mst is not None and (mst.st_dev, mst.st_ino) == inode:
                        continue  # a name of that file already
                tmp = self._new_tmp()
                if src is not None:
                    os.link(src, tmp, src_dir_fd=self.staging_fd, dst_dir_fd=self.staging_fd,
                            follow_symlinks=False)
                else:
                    root.link_out(first.path, self.staging_fd, tmp, inode)
                linked.append((tmp, member))
            published = 0
            if src is not None:
                st = root.publish(self.staging_fd, src.encode(), first.path, park=self._park_replaced)
                published += 1
            self.plan.touched.add((st.st_dev, st.st_ino))
            while linked:
                tmp, member = linked[-1]
                root.publish(self.staging_fd, tmp.encode(), member.path, park=self._park_replaced)
                linked.pop()
                published += 1
        finally:
            unlink_at(self.staging_fd, *(tmp for tmp, _ in linked))  # (after an error only)
        return published

    def _break_link(self, row: _Row) -> None:
        """A file of one name upstream that has more names here: give it a
        file of its own, unless its other names go in this push anyway."""
        st = self.root.lstat(row.path)
        if st is None or not _same_kind(row, st) or st.st_nlink <= 1 or self._only_names(st, [row.path]):
            return
        self.root.publish(self.staging_fd, self._fresh_copy(row).encode(), row.path)

    def _only_names(self, st: os.stat_result, names: list[bytes]) -> bool:
        """Whether the file at ``st`` will have no name but ``names`` once this
        push is published: each other name of it (as this node's manifest
        records them, checked by lstat) is deleted or replaced by the push."""
        inode = (st.st_dev, st.st_ino)
        root = self.root

        def on_file(path: bytes) -> bool:
            got = root.lstat(path)
            return got is not None and (got.st_dev, got.st_ino) == inode

        others = st.st_nlink - sum(1 for path in names if on_file(path))
        if others <= 0:
            return True
        keep = set(names)
        going = sum(1 for path in self.lookup.names_of(*inode)
                    if path not in keep and self._goes_away(path) and on_file(path))
        return going >= others

    def _goes_away(self, path: bytes) -> bool:
        """Whether this push deletes ``path`` (or a directory above it), or
        puts a new file, symlink or directory in its place."""
        going = self._going
        if going is None:
            plan = self.plan
            going = self._going = (set(plan.deletes),
                                   {r.path for r in plan.files + plan.links + plan.dirs})
        deleted, replaced = going
        if path in replaced:
            return True
        while path:
            if path in deleted:
                return True
            path = split(path)[0]
        return False

    def _fresh_copy(self, row: _Row) -> str:
        """A new file (or symlink) in staging with ``row``'s content and
        mtime, not linked to anything: the staging name.  A file is copied
        from its name in place, checked against the row's SHA-256, and given
        its mode too."""
        tmp = self._new_tmp()
        if row.kind == KIND_SYMLINK:
            os.symlink(row.target, tmp, dir_fd=self.staging_fd)
            os.utime(tmp, ns=(row.mtime_ns, row.mtime_ns), dir_fd=self.staging_fd, follow_symlinks=False)
            return tmp
        try:
            _, digest = self.root.copy_into(row.path, self.staging_fd, tmp.encode(), self.buffers)
            if digest != row.sha256:
                raise SyncdError(f"{fspath(row.path)}: changed on {self.cfg.node.name} during the push; "
                                 "push again")
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.staging_fd)
            try:
                os.fchmod(fd, row.mode)
                os.utime(fd, ns=(row.mtime_ns, row.mtime_ns))
            finally:
                os.close(fd)
        except BaseException:
            unlink_at(self.staging_fd, tmp)
            raise
        return tmp

    def _publish_link(self, row: _Row) -> os.stat_result:
        """A symlink, made in staging and renamed into place like a file,
        with its own mtime (the rename keeps it)."""
        tmp = self._new_tmp()
        os.symlink(row.target, tmp, dir_fd=self.staging_fd)
        os.utime(tmp, ns=(row.mtime_ns, row.mtime_ns), dir_fd=self.staging_fd, follow_symlinks=False)
        return self.root.publish(self.staging_fd, tmp.encode(), row.path)

    def _publish_file(self, row: _Row, uses: dict[str, int]) -> os.stat_result:
        return self.root.publish(self.staging_fd, self._staged_source(row, uses).encode(), row.path,
                                 park=self._park_replaced)

    def _staged_source(self, row: _Row, uses: dict[str, int]) -> str:
        """The staging name that becomes ``row``'s file, with its mode and mtime."""
        obj = row.sha256.hex()
        uses[obj] -= 1
        if uses[obj] > 0:
            # The same content is published under another name too: give
            # this one its own copy, keep the object for the next.
            src = self._new_tmp()
            _copy_at(self.staging_fd, obj, src)
        else:
            src = obj
        if src != obj or self._applied.get(obj) != (row.mode, row.mtime_ns):
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.staging_fd)
            try:
                os.fchmod(fd, row.mode)
                os.utime(fd, ns=(row.mtime_ns, row.mtime_ns))
            finally:
                os.close(fd)
        return src

    # A large file replaced or deleted at publish is moved aside into staging
    # (a link, or a rename), and unlinked once "committed" is out: freeing
    # its blocks and cached pages (tens of ms for 64 MiB) is then not part
    # of the commit.  Leftovers of a killed agent go with its temporaries.
    def _park_replaced(self, pfd: int, leaf: bytes, st: os.stat_result) -> None:
        if st.st_size >= PARK_MIN and st.st_nlink == 1:
            self._park(lambda name: os.link(leaf, name, src_dir_fd=pfd, dst_dir_fd=self.staging_fd,
                                            follow_symlinks=False))

    def _park_deleted(self, pfd: int, leaf: bytes) -> bool:
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return False  # unlink says what is wrong
        if not stat.S_ISREG(st.st_mode) or st.st_size < PARK_MIN or st.st_nlink != 1:
            return False
        return self._park(lambda name: os.rename(leaf, name, src_dir_fd=pfd, dst_dir_fd=self.staging_fd))

    def _park(self, move: Callable[[str], None]) -> bool:
        name = f"trash.{_PID}.{next(self._tmp_counter)}"
        try:
            move(name)
        except OSError:
            return False  # (a hard link refused, say): freed at once instead
        self._parked.append(name)
        return True

    def _free_parked(self, parked: list[str] | None = None) -> None:
        if parked is None:
            parked, self._parked = self._parked, []
        for name in parked:
            try:
                os.unlink(name, dir_fd=self.staging_fd)
            except OSError:
                pass  # removed with the temporaries of a later session

    def _free_parked_later(self) -> None:
        """Unlink the parked files in a moment, from a thread: the upstream
        hears ``committed`` first, and its own manifest update does not wait
        behind the freeing (with ``discard``, a trim per extent)."""
        parked, self._parked = self._parked, []
        if not parked:
            return

        def free() -> None:
            self._session_over.wait(PARK_FREE_DELAY)  # at once when the session ends
            self._free_parked(parked)

        freer = threading.Thread(target=free, name="free-parked", daemon=True)
        freer.start()
        self._freers.append(freer)

    def _record(self, plan: _Plan, stats: dict[bytes, os.stat_result | None]) -> None:
        if plan.groups:
            # Every name of a group published (a full comparison kept only
            # those with something to do): each one's link count moved.
            listed = {id(r) for r in plan.rows}
            plan.rows += [r for g in plan.groups for r in (g.first, *g.members) if id(r) not in listed]
        with self.manifest.writer() as w:
            if plan.root is not None:
                w.upsert(plan.root.manifest_row(stats.get(b"")))
            for row in plan.rows:
                if row.deleted:
                    st = None
                else:
                    st = stats.get(row.path)
                    # Listed and in place already, or a file of several names,
                    # whose link count and ctime moved with each name after it.
                    if st is None or st.st_nlink > 1 or row.link is not None:
                        st = self.root.lstat(row.path)
                w.upsert(row.manifest_row(st))
            if plan.touched:
                self._restat_names(w, plan)
            deleted_listed = {r.path for r in plan.rows if r.deleted}
            for path in plan.deletes:
                if path not in deleted_listed:
                    known = self.lookup.lookup(path)
                    parent, name = split(path)
                    kind = known.kind if known else KIND_FILE
                    w.upsert((parent, name, kind, 0, 0, 0, 0, 0,
                              known.sha256 if known else None, None, plan.generation, 1, 0, 1))
            w.set_meta("upstream_generation", str(plan.generation))
            w.set_meta("upstream", getattr(self, "client", "?"))
            w.set_generation(plan.generation, len(plan.rows))
            w.delete_meta(META_HELD_BACK)
            if plan.full:
                w.delete_meta(META_REPAIR)

    def _restat_names(self, w: Any, plan: _Plan) -> None:
        """The names that this push did not list, of files whose names it
        changed: their rows get the link count and ctime the files have now
        (a stale row would make them look changed to the next push)."""
        listed = {r.path for r in plan.rows}
        for dev, ino in plan.touched:
            for path in self.lookup.names_of(dev, ino):
                if path in listed:
                    continue
                st = self.root.lstat(path)
                if st is not None and not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in plan.touched:
                    w.restat(path, st)

    # -- verification ----------------------------------------------------------------

    def _keyring_or_none(self) -> verifymod.Keyring | None:
        from . import verify as verifymod  # (in the background since the upstream's hello)

        if self.cfg.verify.keyring is None:
            return None
        if self._keyring is None:
            home = self.cfg.verify.gnupghome or self.state_dir / "gnupg"
            self._keyring = verifymod.Keyring(self.cfg.verify.keyring, home)
        return self._keyring

    def _verify_generation(self) -> tuple[list[verifymod.Finding], set[str]]:
        """The gate before publishing: findings (empty: publish) and the
        staged objects found corrupt (already removed from staging).

        Every staged object that this session did not itself verify is
        re-hashed: one staged by an earlier session (a killed push, a
        prewarm) has waited in staging since, unsynced.  The ones this session
        received or copied were hashed from the very bytes written; those a
        prewarm stager logged as checked during this boot need no reading
        either (a crash that could have lost their bytes changes the boot).  The index
        group is checked only when this generation changes, adds or deletes an
        index file; otherwise the group on the edge is the one checked when it
        was published.  Files of the group that this generation leaves alone
        are read from root (as the manifest and an lstat below root say they
        are regular files).  Raises VerifyError when the keyring itself is
        unusable: a node problem, and nothing is published.
        """
        from . import verify as verifymod  # (in the background since the upstream's hello)

        plan = self.plan
        findings: list[verifymod.Finding] = []
        corrupt: set[str] = set()
        first_path: dict[str, bytes] = {}
        for row in plan.files:
            first_path.setdefault(row.sha256.hex(), row.path)
        # Objects checked in this boot by a stager (prewarm) need no second
        # reading, but must still be there.
        logged = verified_this_boot(self.staging_fd) - self.verified_now if first_path else set()
        for name in logged & first_path.keys():
            if not self._staged(name):
                rel = fspath(first_path[name])
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.MISSING_FILE,
                                                  f"{rel}: staged object {name} is gone"))
        trusted = self.verified_now | logged
        objects = {self.staging / name: name for name in first_path if name not in trusted}
        for where, got in verifymod.hash_files(objects, workers=self.cfg.node.hash_workers):
            name = objects[where]
            rel = fspath(first_path[name])
            if isinstance(got, OSError):
                corrupt.add(name)
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.MISSING_FILE,
                                                  f"{rel}: staged object {name} is gone: {got.strerror or got}"))
            elif got.hex() != name:
                corrupt.add(name)
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.HASH_MISMATCH,
                                                  f"{rel}: staged object differs from its SHA-256 {name}"))
        unlink_at(self.staging_fd, *corrupt)  # so that the next push sends them again
        changed = plan.files + plan.metas + plan.links + [m for g in plan.groups for m in g.members]
        if any(self._is_index(r) for r in changed) or any(self.index(p) for p in plan.deletes):
            group, expected = self._index_group()
            keyring = self._keyring_or_none()
            findings += verifymod.verify_index_group(
                group, keyring=keyring,
                require_signed=self.cfg.verify.require_signed or verifymod.DEFAULT_REQUIRE_SIGNED,
                expected_sha256=expected, workers=self.cfg.node.hash_workers,
                require_sha256_list=keyring is not None,
            )
        return sorted(set(findings)), corrupt

    def _index_group(self) -> tuple[dict[str, Path], dict[str, bytes]]:
        """Every index file of the tree as it will be after this generation,
        mapped to where its bytes are now; and the sender's SHA-256 of the
        staged ones."""
        plan = self.plan
        root = Path(os.fsdecode(self.cfg.node.root))
        deleted = set(plan.deletes)

        def gone(path: bytes) -> bool:
            while path:
                if path in deleted:
                    return True
                path = split(path)[0]
            return False

        def on_edge(path: bytes) -> Path | None:
            st = self.root.lstat(path)
            return root / os.fsdecode(path) if st is not None and stat.S_ISREG(st.st_mode) else None

        staged = {r.path: r for r in plan.files}
        # A name to be linked has its group's content: staged, or the first name's file.
        linked = {m.path: g for g in plan.groups for m in g.members}
        group: dict[str, Path] = {}
        expected: dict[str, bytes] = {}
        listed: set[bytes] = set()
        for row in plan.rows:
            listed.add(row.path)
            if row.deleted or row.kind != KIND_FILE or not self._is_index(row) or gone(row.path):
                continue
            rel = os.fsdecode(row.path)
            source = linked[row.path].first.path if row.path in linked else row.path
            if source in staged:
                group[rel] = self.staging / row.sha256.hex()
                expected[rel] = row.sha256
            elif (where := on_edge(source)) is not None:
                group[rel] = where
        # O(tree) inside SQLite, but only for a generation that changes the index group.
        for path in self.manifest.live_files_matching(self.index):
            if path in listed or gone(path):
                continue
            if (where := on_edge(path)) is not None:
                group[os.fsdecode(path)] = where
        return group, expected

    def _hold_back(self, findings: list[verifymod.Finding], corrupt: set[str]) -> None:
        """Publish only what no served index can see, record why, raise.

        Goes live: new directories, and new data files and links at paths
        that do not exist on the edge yet (nothing served refers to them).
        Held back: the whole index group, every replacement of an existing
        data file (the index still served may name the old content: a
        replaced .deb would no longer match the Packages that lists it),
        metadata changes, deletions and directory mtimes.  The manifest gets
        the rows of what went live, but not ``upstream_generation``: the next
        push plans from the last good generation, and the held-back objects
        stay staged so that it does not send them again.
        """
        plan = self.plan
        root = self.root
        went_live: list[_Row] = []
        # Their directories' times wait for the next commit (see _TouchedDirs).
        self.touched.add(itertools.chain((r.path for r in plan.dirs), (r.path for r in plan.files + plan.links)))
        self._join_early_sync()
        self.sync_staging()  # as in _publish: staged bytes are durable before any rename
        for row in sorted(plan.dirs, key=lambda r: (planmod.depth(r.path), r.path)):
            if row.path in plan.made_dirs:
                went_live.append(row)
            elif root.lstat(row.path) is None:
                root.ensure_dir(row.path, row.mode)
                went_live.append(row)
        uses = _object_uses(plan.files)
        touched = False
        for row in plan.files + plan.links:
            if row.kind == KIND_FILE and row.path in plan.early:
                uses[row.sha256.hex()] -= 1
                went_live.append(row)  # live already (_EarlyPublisher)
                continue
            if self._is_index(row) or root.lstat(row.path) is not None:
                continue
            if row.kind == KIND_FILE and row.sha256.hex() in corrupt:
                continue
            parent = split(row.path)[0]
            pst = root.lstat(parent) if parent else None
            if parent and (pst is None or not stat.S_ISDIR(pst.st_mode)):
                continue
            if row.kind == KIND_SYMLINK:
                self._publish_link(row)
            else:
                self._publish_file(row, uses)
            went_live.append(row)
            touched = True
        if touched:
            self.sync_staging()
        # What went live took its object by rename; an object some path
        # still waits for stays staged: the next push does not send it again.
        held = self.manifest.get_meta("upstream_generation")
        client = getattr(self, "client", "?")
        quoted = [f.message for f in findings[:FINDINGS_QUOTED]]
        with self.manifest.writer() as w:
            for row in went_live:
                w.upsert(row.manifest_row(root.lstat(row.path)))
            w.set_meta("upstream", client)
            w.set_meta(META_HELD_BACK, json.dumps({
                "generation": plan.generation, "upstream": client, "at_ns": time.time_ns(),
                "findings": len(findings), "first": quoted,
                "kinds": sorted({f.kind.value for f in findings}),
            }))
        more = f" (and {len(findings) - FINDINGS_QUOTED} more)" if len(findings) > FINDINGS_QUOTED else ""
        published = sum(1 for r in went_live if r.kind != KIND_DIR)
        message = (
            f"{self.cfg.node.name}: generation {plan.generation} held back, {len(findings)} finding(s): "
            f"{'; '.join(quoted)}{more}; published only {published} new data file(s), no index file and "
            f"no deletion; still serving generation {held if held is not None else 'none'}"
        )
        self.plan = _Plan()
        raise VerifyError(message)

    # -- staging --------------------------------------------------------------------

    def _new_tmp(self) -> str:
        # next() on a count is atomic under the GIL: the staging threads name
        # their files too.
        return f"tmp.{_PID}.{next(self._tmp_counter)}"

    def _clean_temps(self, *, everything: bool = False) -> None:
        """Remove temporary files of processes that are gone (and with
        ``everything``, this process's own and every staged object).

        Another agent or a prewarm stager may be writing into staging right
        now: its ``tmp.PID.N`` / ``stage.PID.N`` / ``run.PID.HEX`` files and
        ``partial.*`` assemblies are left alone while its process lives.
        """
        me = os.getpid()
        for entry in os.scandir(self.staging_fd):
            name = entry.name
            kind, _, rest = name.partition(".")
            if kind in ("tmp", "stage", "trash", "run"):
                digits = rest.partition(".")[0]
                pid = int(digits) if digits.isdigit() else None
                if pid is not None and pid != me and _alive(pid):
                    continue  # another live process is writing it
                if kind == "run" and not everything:
                    # A killed stager's in-order object: its recorded ranges
                    # stay, as the object's partial file, for a resumed prewarm.
                    from .partial import RANGES_SUFFIX, promote_run

                    if not name.endswith(RANGES_SUFFIX):
                        promote_run(self.staging_fd, name)
                    continue
                # This process's trash (replaced files) is freed after its commit.
                if pid == me and (kind == "trash" or not everything):
                    continue
            elif kind == "verified" and not everything:
                if rest == boot_id():
                    continue  # this boot's log; an older boot's is void
            elif kind == "partial":
                # Kept for a resumed push or prewarm, unless nobody went on
                # with it for days: its file changed before it was finished.
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > time.time() - PARTIAL_MAX_AGE:
                        continue
                except FileNotFoundError:
                    continue
            elif not everything:
                continue
            unlink_at(self.staging_fd, name)


def _staged_objects(staging_fd: int) -> set[str]:
    """Names of the objects in staging (regular files named by a SHA-256)."""
    names = set()
    with os.scandir(staging_fd) as it:
        for entry in it:
            if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                names.add(entry.name)
    return names


@dataclass(slots=True)
class _Break:
    """A publish unit: a file in place that gets a file of its own (Agent._break_link)."""

    row: _Row


def _same_kind(row: _Row, st: os.stat_result) -> bool:
    return stat.S_IFMT(st.st_mode) == (stat.S_IFREG if row.kind == KIND_FILE else stat.S_IFLNK)


def _unit_rows(unit: Any) -> list[_Row]:
    """The rows a publish unit publishes: a row, a group's names, a break's row."""
    if isinstance(unit, _LinkGroup):
        return [unit.first, *unit.members]
    if isinstance(unit, _Break):
        return [unit.row]
    return [unit]


def _object_uses(files: list[_Row]) -> dict[str, int]:
    """How many paths each staged object is published under."""
    uses: dict[str, int] = {}
    for row in files:
        name = row.sha256.hex()
        uses[name] = uses.get(name, 0) + 1
    return uses


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process, alive
    # A killed agent stays a zombie until sshd reaps it, which the next
    # session may start before: it writes nothing any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _index_order(path: bytes) -> tuple:
    """Publishing order inside the index group: what an index names before
    the index, so a client that reads the new index finds what it names.

    by-hash files first (content-addressed, named by everything), then the
    other indices deepest first (Packages before the Release above them),
    then Release and repomd.xml, and their signatures (InRelease, *.gpg,
    *.asc, *.sig) last.
    """
    name = split(path)[1]
    if b"/by-hash/" in b"/" + path:
        rank = 0
    elif name == b"InRelease" or name.endswith((b".gpg", b".asc", b".sig")):
        rank = 3
    elif name in (b"Release", b"repomd.xml"):
        rank = 2
    else:
        rank = 1
    return (rank, -planmod.depth(path), path)


def _read_ahead(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
    except OSError:
        pass


def _range_signature(fd: int, offset: int, length: int, block: int) -> Any:
    """The signature of ``length`` bytes of ``fd`` from ``offset`` on, in
    blocks of ``block`` (fewer bytes if the file ends first)."""
    from .delta import signature_of_reader

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


def _split_signature(pool: Any, fd: int, size: int) -> Any:
    """The encoded signature of a large file open on ``fd`` (closed at the
    end), its two halves computed at once by the pool's two threads: the
    first signature of a push is ready in about half the time, and its delta
    starts while the next file's signature is read.  A Future."""
    from concurrent.futures import Future

    from .delta import block_size_for, join_signatures

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


def _signature_of(fd: int, size: int | None) -> bytes:
    """The encoded block signature of the file open on ``fd`` (its ``size``
    bytes, fewer if it shrank; None: its size now), which it closes."""
    from .delta import block_size_for

    try:
        if size is None:
            size = os.fstat(fd).st_size
        _read_ahead(fd)
        return _range_signature(fd, 0, size, block_size_for(size)).encode()
    finally:
        os.close(fd)


_PID = os.getpid()  # temporary names carry it; an agent never forks


def _as_error(err: OSError, node: str) -> SyncdError:
    """An OSError of staging or publishing as the one-line error the pusher gets."""
    where = f" {err.filename!r}" if err.filename else ""
    message = f"{os.strerror(err.errno) if err.errno else err}{where}"
    if err.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full on {node}: {message}; nothing partial was published")
    return SyncdError(message)


def _copy_at(dir_fd: int, src: str, dst: str) -> None:
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dir_fd)
        try:
            copy_extents(sfd, dfd, os.fstat(sfd).st_size)  # holes stay holes
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _delta_format_error() -> type:
    from .errors import DeltaFormatError

    return DeltaFormatError


def serve_stdio(cfg: Config) -> int:
    """Run one session on fds 0 and 1 (the SSH exec channel)."""
    recv, send_all, recv_into = stdio()
    if cfg.mirrors:
        # paramiko and the pusher cost ~0.15 s to import: a node that will
        # push on imports them while its own push arrives, not after it commits.
        import_in_background("syncd.push", "syncd.transport")
    return Agent(cfg, recv, send_all, recv_into=recv_into).serve()
