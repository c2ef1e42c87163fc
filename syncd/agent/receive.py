"""Files arriving: their streams, the staging threads, and the answers for each file.

The main thread reads and parses frames; two staging threads create,
decompress or patch, hash and write the files (a file goes to one thread
whole; each queue holds at most STAGING_QUEUE chunks, so memory follows the
window).  Each chunk is read into a recycled buffer (protocol.BodyPool),
which its staging thread gives back once the chunk is written or dropped.
The staging threads acknowledge each file themselves (``staged``, or
``failed`` with ``retry_whole``), and a staging thread's error (a full disk)
is answered at once, since the main thread may be waiting for frames the
pusher will not send first.

The :class:`Receiver` also owns what a push expects to arrive (the SHA-256s
asked for and not yet staged) and the resume offers: a partial file of an
object taken over as a run of this process, whose prefix the pusher need
not send again (syncd.partial).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from typing import Any, Callable

from ..compress import decompressing_writer
from ..errors import (DISK_FULL_ERRNOS, DeltaFormatError, DiskFullError, PatchMismatchError, ProtocolError,
                      SyncdError, disk_full_as)
from ..fsops import (DIRECT_MIN, WRITEBACK_MIN, SafeRoot, SparseWriter, sha256_around_cache, start_writeback,
                     unlink_at)
from ..manifest import fspath
from ..messages import File, Files, Row
from ..partial import (PARTIAL_PREFIX, RANGES_SUFFIX, RECORD_EVERY, RESUME_MIN, RUN_PREFIX, RangeLog,
                      promote_run, take_over)
from ..protocol import MAX_OPEN_STREAMS, BodyPool
from ..sparse import Decoder, hash_zeros
from .staged import Staging
from .wire import LockedWriter

log = logging.getLogger(__package__)

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

_PID = os.getpid()  # a run's name carries it; an agent never forks
_END = object()  # queued after a file's last chunk


def as_error(err: OSError, node: str) -> SyncdError:
    """An OSError of staging or publishing as the one-line error the pusher gets."""
    where = f" {err.filename!r}" if err.filename else ""
    message = f"{os.strerror(err.errno) if err.errno else err}{where}"
    if err.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full on {node}: {message}; nothing partial was published")
    return SyncdError(message)


def answer_failed(writer: LockedWriter, path: bytes, error: str) -> None:
    """A file that arrived wrong (or cannot be made here): the pusher sends it once more, whole."""
    log.warning("%s", error)
    writer.message({"type": "failed", "path": path, "error": error, "retry_whole": True})


class Incoming:
    """One file arriving on a stream, written to a staging temp file.

    From RESUME_MIN on, a file sent whole (raw or zstd) is written as a run
    of this process (``run.PID.<sha256hex>``, syncd.partial) whose progress
    is recorded as it reaches the file: cut short, it becomes the object's
    partial file, and the next push resumes from its prefix (the ``offset``
    this agent offered, the prefix taken over again at planning).  A sparse
    payload (``sparse``, syncd.sparse) writes only the data; with ``delta``,
    ``sparse`` asks for runs of zeros in the result to be left as holes.
    """

    def __init__(self, receiver: "Receiver", path: bytes, how: str, size: int, sha256: bytes, *,
                 sparse: bool = False, offset: int = 0, basis: bytes | None = None) -> None:
        self.receiver = receiver
        self.staging = receiver.staging
        self.path, self.how, self.size, self.sha256 = path, how, size, sha256
        self.sparse = sparse
        self.offset = offset
        receiver.use_offer(self)
        self.tmp = self.staging.new_tmp()
        # A run's name is this process's and this object's: the prefix taken
        # over at planning is there already.  One stream at a time writes it
        # (a second one for the same content, which no plan asks for, goes
        # to a file of its own and is not resumable).
        self.run = (f"{RUN_PREFIX}{_PID}.{self.sha256.hex()}"
                    if self.how != "delta" and self.size >= RESUME_MIN else None)
        if self.run is not None and not receiver.claim_run(self.run):
            if self.offset:
                raise ProtocolError(f"file {fspath(self.path)}: offset {self.offset} was not offered")
            self.run = None
        self.records: RangeLog | None = None
        self.recorded = self.offset  # the run's prefix recorded so far
        # Created by the staging thread at the first write (creating a file
        # is one of the slower steps per small file).
        self.fd: int | None = None
        self.out: SparseWriter | None = None
        self.worker: "StagingThread | None" = None
        self.dead = False  # failed, or its session did: the staging thread drops the rest
        # A resumed file is hashed again whole at the end (its prefix was
        # written by an earlier session, possibly another process).
        self.hasher = None if self.offset else hashlib.sha256()
        self.written = self.offset  # logical bytes accounted for (holes included)
        self.old_fd: int | None = None
        self._sink: Callable[[Any], None] | None = None
        self._zw: Any = None
        self._patcher: Any = None
        self._decoder: Decoder | None = None
        self._open_codec(basis)

    def _open_codec(self, basis: bytes | None) -> None:
        write: Callable[[Any], None] = self._write
        if self.sparse and self.how != "delta":
            self._decoder = Decoder(self.offset, self.size, self._write, self._hole, name=fspath(self.path))
            write = self._decoder.feed
        if self.how == "whole":
            self._sink = write
        elif self.how == "zstd":
            self._zw = decompressing_writer(write)
            self._sink = self._zw.write
        else:
            from ..delta import Patcher

            # A new file's old copy is the basis the plan chose (syncd.basis).
            self.old_fd = self.receiver.root.open_read(basis if basis is not None else self.path)
            old_size = os.fstat(self.old_fd).st_size
            old_fd = self.old_fd
            self._patcher = Patcher(lambda off, n: os.pread(old_fd, n, off), old_size, self._write,
                                    max_output=self.size)
            self._sink = self._patcher.feed

    def _open(self) -> None:
        sfd = self.staging.fd
        if self.run is not None:
            # Read back at the end when resumed: O_RDWR.
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            if self.offset:
                self.fd = os.open(self.run, flags, dir_fd=sfd)
                if os.fstat(self.fd).st_size != self.size:
                    raise PatchMismatchError(f"{fspath(self.path)}: its partial file changed meanwhile")
            else:
                self.fd = os.open(self.run, flags | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=sfd)
            self.receiver.untake(self.run)
            self.records = RangeLog(sfd, self.run, fresh=not self.offset)
        else:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=sfd)
        if (self.run is not None and not self.offset) or self.sparse:
            # At its final size from the start: a hole is what is not written,
            # and a run cut short is a partial file (at its final size).
            os.ftruncate(self.fd, self.size)
        self.out = SparseWriter(self.fd, self.offset, self.staging.buffers if self.size >= DIRECT_MIN else None,
                                find_zeros=self.sparse and self.how == "delta")

    def write(self, data: Any) -> None:
        """Bytes of the file itself (a bundle cuts them out of its stream)."""
        self._write(data)

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
        return f"disk full staging {fspath(self.path)} in {self.staging.path}; nothing was published"

    def feed(self, data: bytes) -> None:
        self._sink(data)

    def finish(self) -> str:
        """Close the stream; the staged object's name.  Raises (the file
        discarded) when what arrived is not the file announced."""
        try:
            if self.fd is None:
                self._open()  # an empty file
            digest = self._complete()
            if digest != self.sha256:
                raise PatchMismatchError(
                    f"{fspath(self.path)}: received content does not match its SHA-256"
                )
            meta = self.staging.wanted_meta(self.path)
            if meta is not None:  # after the last write: the mtime stays
                os.fchmod(self.fd, meta[0])
                os.utime(self.fd, ns=(meta[1], meta[1]))
            # No fsync per file (most of a small-file sync: docs/performance.md,
            # "The agent"): a killed process loses nothing of the page cache, and
            # the commit makes staging durable with one syncfs before any
            # rename into root.  A large file's write-out starts now, without
            # waiting for it, so that the disk works while the rest arrives
            # and syncfs finds less left to do (for small files the separate
            # writes cost more than they save: measured).
            if self.size >= WRITEBACK_MIN:
                start_writeback(self.fd)
        except BaseException:
            self.discard()
            raise
        finally:
            self._close_fds()
        obj = self.sha256.hex()
        sfd = self.staging.fd
        os.rename(self.run or self.tmp, obj, src_dir_fd=sfd, dst_dir_fd=sfd)
        if self.run is not None:
            # The object is whole: its records, and any partial file of it
            # (an earlier, shorter attempt), serve nothing any more.
            unlink_at(sfd, self.run + RANGES_SUFFIX, PARTIAL_PREFIX + obj, PARTIAL_PREFIX + obj + RANGES_SUFFIX)
            self.receiver.release_run(self.run)  # its name is free again only now
        self.receiver.staged_object(obj, meta)
        return obj

    def _complete(self) -> bytes | None:
        """The last bytes written, checked to be as many as announced: the
        file's SHA-256 (None: the sender's claim is not checked yet)."""
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
            digest, _ = sha256_around_cache(self.fd, self.staging.buffers)
        elif digest is None:
            digest = self.hasher.digest()
        return digest

    def _close_fds(self) -> None:
        # The sink is a bound method of this object (a cycle): dropped, so
        # that reference counting frees it with the cyclic GC paused.
        self._sink = self._zw = self._patcher = self._decoder = None
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
        self.fd = self.old_fd = None

    def discard(self, keep: bool = False) -> None:
        """Drop what arrived.  With ``keep`` (the session ended, nothing went
        wrong with the file itself), a run's recorded prefix stays, as the
        object's partial file, for the next push to resume from."""
        self._close_fds()
        sfd = self.staging.fd
        if self.run is not None:
            self.receiver.untake(self.run)
        if self.run is None:
            unlink_at(sfd, self.tmp)
        elif keep and self.recorded > 0:
            promote_run(sfd, self.run)
        else:
            unlink_at(sfd, self.run, self.run + RANGES_SUFFIX)
        if self.run is not None:
            self.receiver.release_run(self.run)


class Bundle:
    """Small files arriving together on one stream ("files"): their bytes
    back to back, cut by the announced sizes, each staged as a file of its own."""

    def __init__(self, receiver: "Receiver", msg: Files) -> None:
        self.receiver = receiver
        self.items = msg.items
        self.total = msg.total
        self.path = self.items[0][0]  # named in errors
        self.how = msg.how
        self.worker: "StagingThread | None" = None
        self.dead = False
        self.received = 0
        self._next = 0  # the item whose bytes come next
        self._cur: Incoming | None = None
        self.staged: list[bytes] = []
        self.failed: list[tuple[bytes, str]] = []
        self._zw: Any = None

    def feed(self, data: Any) -> None:
        if self.how == "zstd":
            if self._zw is None:
                self._zw = decompressing_writer(self._take)
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
                self._cur = Incoming(self.receiver, path, "whole", size, sha)
            cur = self._cur
            want = cur.size - cur.written
            if want:
                if not view:
                    break
                piece, view = view[:want], view[want:]
                cur.write(piece)
                if cur.written < cur.size:
                    break
            self._cur = None
            self._complete(cur)
        return n

    def _complete(self, inc: Incoming) -> None:
        try:
            inc.finish()
        except PatchMismatchError as err:
            self.failed.append((inc.path, str(err)))
            return
        self.receiver.arrived(inc.sha256)
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


class LocalCopy:
    """A file this edge holds already under another name (rename or copy
    detection), copied into staging by a staging thread while the main
    thread goes on planning.  Protocol 1.2: its item says need ``copy``, and
    it is acknowledged like a file that arrived (``staged``, or ``failed``
    with ``retry_whole`` when no source still holds the content)."""

    def __init__(self, row: Row, sources: list[bytes]) -> None:
        self.row = row
        self.sources = sources
        self.path = row.path
        self.sha256 = row.sha256
        self.dead = False
        self.worker: "StagingThread | None" = None

    def discard(self, keep: bool = False) -> None:
        pass  # Staging.copy_from leaves no partial file behind


class StagingThread(threading.Thread):
    """Stages the files handed to it, in order; the receiver acknowledges each one."""

    def __init__(self, receiver: Any, n: int) -> None:
        super().__init__(name=f"stager-{n}", daemon=True)
        self.receiver = receiver
        self.queue: queue.Queue = queue.Queue(maxsize=STAGING_QUEUE)

    def run(self) -> None:
        receiver = self.receiver
        give_back = receiver.bodies.give_back
        while True:
            item = self.queue.get()
            payload = None
            try:
                if item is None:
                    return
                inc, payload = item
                if inc.dead or receiver.failure is not None or (
                        receiver.closing and isinstance(inc, LocalCopy)):
                    # Failed earlier, or the session did: drop what is left of
                    # it.  (A session that just ends still stages the files
                    # that arrived whole: a retry finds them and resumes.)
                    if payload is _END:
                        inc.discard()
                    continue
                if payload is _END:
                    receiver.finish(inc)
                else:
                    inc.feed(payload)
            except BaseException as err:  # the session's error: reported by the receiver
                inc.dead = True
                try:
                    inc.discard()
                    receiver.staging_failed(inc, err)
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

    def put(self, item: tuple | None) -> None:
        """Hand over a chunk, waiting while the queue is full (bounded memory),
        but never for a thread that is gone."""
        while True:
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if not self.is_alive():
                    raise ProtocolError("a staging thread ended unexpectedly") from None


class Receiver:
    """The files of a session's pushes, from their message to ``staged``."""

    def __init__(self, node: str, root: SafeRoot, staging: Staging, writer: LockedWriter, bodies: BodyPool,
                 on_staged: Callable[[str], None]) -> None:
        self.node = node  # this node's name, in errors
        self.root = root  # the main thread's (a delta's old copy is opened there)
        self.staging = staging
        self.writer = writer
        self.bodies = bodies  # DATA bodies, each given back by the staging thread it went to
        self._on_staged = on_staged  # an object staged with its final metadata (early publishing)
        self.incoming: dict[int, Incoming | Bundle] = {}
        self.stagers: list[StagingThread] = []  # started at the first file
        self._next_stager = 0
        # The first error of a staging thread, already logged and sent.
        self.failure: SyncdError | None = None
        self._failure_lock = threading.Lock()
        self.closing = False  # the session is ending: staging threads drop the local copies queued
        self._pending: set[bytes] = set()  # SHA-256s asked for and not yet staged
        # SHA-256 -> the offset offered: a file sent whole may start there (its
        # prefix is this edge's partial file, taken over as a run of this process).
        self._offers: dict[bytes, int] = {}
        self._offered: list[list] = []  # [path, offset] of this entries batch
        # Runs taken over from partial files for a resume offered and not
        # yet begun: given back as partial files if the session ends first.
        self._taken: set[str] = set()
        self._open_runs: set[str] = set()  # runs an Incoming writes now

    # -- what a push expects --------------------------------------------------------------

    def new_push(self) -> None:
        """A push begins (or one ended): nothing is expected, nothing offered."""
        self._pending = set()
        self._offers = {}

    def expect(self, sha256: bytes) -> None:
        """The content ``sha256`` is asked for (or being copied here)."""
        self._pending.add(sha256)

    def expects(self, sha256: bytes) -> bool:
        return sha256 in self._pending

    def arrived(self, sha256: bytes) -> None:
        self._pending.discard(sha256)

    def missing(self) -> int:
        """How many contents asked for have not been staged."""
        return len(self._pending)

    # -- resuming -------------------------------------------------------------------------

    def offer_resume(self, row: Row) -> bool:
        """A partial file of this object (a push or a prewarm cut short): its
        recorded prefix becomes a run of this process, and the pusher may
        send the rest only (the ``file`` message's ``offset``).  Whether it
        was offered."""
        run = f"{RUN_PREFIX}{_PID}.{row.sha256.hex()}"
        try:
            have = take_over(self.staging.fd, row.sha256.hex(), row.size, run)
        except OSError as err:
            log.warning("%s: its partial file cannot be resumed (%s); asked for whole", fspath(row.path), err)
            return False
        if have:
            self._taken.add(run)
            self._offers[row.sha256] = have
            self._offered.append([row.path, have])
            log.info("%s: resuming from byte %d of %d", fspath(row.path), have, row.size)
        return bool(have)

    def take_offers(self) -> list[list]:
        """This batch's offers, for its ``needs``' ``resume``."""
        offered, self._offered = self._offered, []
        return offered

    def use_offer(self, inc: Incoming) -> None:
        """A file starts at ``inc.offset``: only where offered, and an offer is used once."""
        if inc.offset and (inc.how == "delta" or self._offers.get(inc.sha256) != inc.offset):
            raise ProtocolError(f"file {fspath(inc.path)}: offset {inc.offset} was not offered")
        self._offers.pop(inc.sha256, None)

    def claim_run(self, run: str) -> bool:
        """Whether no other stream writes the run ``run`` now (then this one does)."""
        if run in self._open_runs:
            return False
        self._open_runs.add(run)
        return True

    def release_run(self, run: str) -> None:
        self._open_runs.discard(run)

    def untake(self, run: str) -> None:
        """The run taken over for an offer is being written (or dropped)."""
        self._taken.discard(run)

    # -- streams ----------------------------------------------------------------------------

    def open(self, msg: File | Files, basis: bytes | None = None) -> None:
        """A ``file`` (``basis``: its delta's old copy, when not its own
        path) or a bundle (``files``) opens its stream."""
        if msg.stream in self.incoming:
            raise ProtocolError(f"stream {msg.stream} opened twice")
        if len(self.incoming) >= MAX_OPEN_STREAMS:
            raise ProtocolError(f"more than {MAX_OPEN_STREAMS} files open at once")
        if isinstance(msg, File):
            inc: Incoming | Bundle = Incoming(self, msg.path, msg.how, msg.size, msg.sha256, sparse=msg.sparse,
                                              offset=msg.offset, basis=basis)
        else:
            inc = Bundle(self, msg)
        self.incoming[msg.stream] = inc
        self._hand_over(inc)

    def copy(self, row: Row, sources: list[bytes]) -> None:
        """A local copy for a staging thread (its item is out already)."""
        copy = LocalCopy(row, sources)
        self._hand_over(copy)
        copy.worker.put((copy, _END))

    def _hand_over(self, inc: Incoming | Bundle | LocalCopy) -> None:
        """Choose the staging thread for ``inc`` (the threads start at the first)."""
        if not self.stagers:
            self.stagers = [StagingThread(self, n) for n in range(STAGING_WORKERS)]
            for stager in self.stagers:
                stager.start()
        inc.worker = self.stagers[self._next_stager % len(self.stagers)]
        self._next_stager += 1

    def _stream(self, stream: int) -> Incoming | Bundle:
        inc = self.incoming.get(stream)
        if inc is None:
            raise ProtocolError(f"DATA for stream {stream}, which no 'file' message opened")
        return inc

    def data(self, stream: int, payload: Any) -> None:
        inc = self._stream(stream)
        inc.worker.put((inc, payload))

    def end(self, stream: int) -> None:
        inc = self._stream(stream)
        del self.incoming[stream]
        inc.worker.put((inc, _END))

    # -- in the staging threads -------------------------------------------------------------

    def staged_object(self, obj: str, meta: tuple[int, int] | None) -> None:
        """``obj`` was staged from bytes this session hashed, with ``meta`` given (or none)."""
        self.staging.staged(obj, meta)
        self._on_staged(obj)

    def finish(self, inc: Incoming | Bundle | LocalCopy) -> None:
        """In a staging thread: a file's (or a bundle's) last chunk arrived."""
        if isinstance(inc, Bundle):
            inc.finish()  # a short bundle is the session's error (raised to run())
            for path, error in inc.failed:
                self.failed(path, error)
            if inc.staged:
                self.writer.message({"type": "staged", "paths": inc.staged})
        elif isinstance(inc, LocalCopy):
            # A fresh SafeRoot: the main thread's keeps a cache of directory fds.
            with SafeRoot(self.root.root) as root:
                copied = self.staging.copy_from(root, inc.row, inc.sources)
            if copied is None:
                self.failed(inc.path, f"{fspath(inc.path)}: no local file with its content matched its SHA-256")
            else:
                self.arrived(inc.sha256)
                self.writer.message({"type": "staged", "path": inc.path})
        else:
            try:
                inc.finish()
            except (PatchMismatchError, DeltaFormatError) as err:
                self.failed(inc.path, str(err))
            else:
                self.arrived(inc.sha256)
                self.writer.message({"type": "staged", "path": inc.path})
        if inc.worker.queue.unfinished_tasks <= 1:  # nothing more queued: answer now
            self.writer.flush()

    def failed(self, path: bytes, error: str) -> None:
        """A file that arrived wrong: the pusher sends it once more, whole."""
        answer_failed(self.writer, path, error)

    def staging_failed(self, inc: Any, err: BaseException) -> None:
        """In a staging thread: the session cannot go on.  Said at once (the
        main thread may be waiting for frames the pusher will not send before
        it hears back); every file still queued is dropped."""
        with self._failure_lock:
            if self.failure is not None:
                return
            if isinstance(err, OSError):
                failure = as_error(err, self.node)
            elif isinstance(err, SyncdError):
                failure = err
            else:  # a codec's own error (a corrupt zstd frame): one line, not a traceback
                failure = ProtocolError(f"file {fspath(inc.path)}: {type(err).__name__}: {err}")
            self.failure = failure
        # Said first; the staging threads drop everything still queued (they
        # check ``failure``), and the main thread stops at its next frame.
        log.error("%s", failure)
        send_error(self.writer, failure)

    # -- the end ------------------------------------------------------------------------------

    def drain(self) -> None:
        """Wait until every file handed to the staging threads is staged (or failed)."""
        for stager in self.stagers:
            stager.queue.join()  # run() marks every item done, error or not

    def ending(self) -> None:
        """The session ends: local copies still queued are dropped, signatures no longer sent."""
        self.closing = True

    def stop(self) -> None:
        """The staging threads finish what is queued, then stop."""
        for stager in self.stagers:
            try:
                stager.put(None)
            except ProtocolError:
                pass  # gone already
        for stager in self.stagers:
            stager.join()
        self.stagers = []

    def close(self) -> None:
        """After :meth:`stop`: a run cut short stays as a partial file, an offer never begun goes back."""
        for inc in self.incoming.values():
            inc.discard(keep=True)
        for run in self._taken:
            promote_run(self.staging.fd, run)


def send_error(writer: LockedWriter, err: SyncdError) -> None:
    """The session's error, to the pusher (``kind``: its class, errors.WIRE_KINDS)."""
    try:
        writer.message({"type": "error", "kind": type(err).__name__, "message": str(err)})
        writer.flush()
    except OSError:
        pass  # the client is gone; the log has it
