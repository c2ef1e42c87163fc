"""The stage-only agent mode: ``syncd agent --stage``, for prewarming.

One process per parallel stream.  It speaks the framing of docs/protocol.md
with its own small set of messages (section 7 of that file) in one of two
roles, chosen by the client's ``hello``:

- ``edge``: it receives objects into ``state_dir/staging``, content-addressed
  by SHA-256, exactly where the push agent looks for them; a later push finds
  them there and asks for nothing.  It never touches ``root`` and never takes
  the state_dir lock: every name it creates is derived from a SHA-256, so
  several stagers (and a push agent) can share the directory.  Small objects
  arrive whole into a private temporary name, are hashed and renamed to
  ``<sha256hex>``.  Large objects arrive as ranges written with ``pwrite``
  into ``partial.<sha256hex>``; each range is hashed on arrival, its
  write-out to disk started (not waited for), then appended to
  ``partial.<sha256hex>.ranges``.  That record is what a resumed prewarm asks
  for, so a killed run resends only unrecorded ranges (kill -9 loses nothing
  of the page cache).  A partial file reaches its content name only after
  its whole SHA-256 has been checked, so a record that outlived its bytes
  (a power cut) costs a refetch, never a wrong object; the push that follows
  makes staging durable (syncfs) before it publishes anything.  Objects and
  ranges from ``DIRECT_MIN`` on are written with O_DIRECT where the
  filesystem allows (fsops.DirectWriter).  Each object named is logged in
  ``verified.<boot id>`` (staging.VerifiedLog), so the push does not read it
  again unless the machine went down in between.
- ``source``: it serves byte ranges of files in its ``root`` by path and
  SHA-256, after checking that its manifest holds that content at that path
  and the file still has the recorded size and mtime.  The prewarming node
  relays them to an edge's stager.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import logging
import os
import stat
import threading
from typing import Any, Callable

from ..compress import compressor, should_compress
from ..config import Config
from ..errors import ManifestError, ProtocolError, SyncdError, UnsafePathError
from ..fsops import BufferPool, SafeRoot, sha256_around_cache, unlink_at
from ..manifest import KIND_FILE, Manifest, fspath
from ..messages import TO_STAGER, BecomeAgent, Bye, Get, Have, Message, StageHello, decode
from ..messages import Put as PutMessage
from ..partial import PARTIAL_PREFIX, RANGES_SUFFIX, RUN_PREFIX, covered, promote_run, read_ranges
from ..protocol import MAX_OPEN_STREAMS, PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate
from ..session import stdio
from ..sparse import data_extents, has_holes, payload
from ..staging import STAGE_PREFIX, VerifiedLog, clean
from .codec import digest_key, range_hasher
from .put import Put, Run

log = logging.getLogger(__package__)

CHUNK = 1 << 20
# A source serves at most this much per request: the relaying node holds no
# more than one range per stream in memory.
MAX_RANGE = 64 << 20
# Commits (start the write-out, then rename or record) run beside the
# receiving loop; a bound keeps the open files and the unacknowledged work small.
COMMIT_THREADS = 2
COMMITS_IN_FLIGHT = 8
# What this stager offers beyond the messages of protocol 1.0, in its welcome.
#   agent:    after an ``agent`` message (and its ``agent_ok``) the session is a
#             push agent's (docs/protocol.md section 7).
#   xxh3-128: a range's END may carry the range's XXH3-128 instead of its
#             SHA-256 (``put``/``get`` key ``digest``): the object's own
#             SHA-256 is what guards publishing; the range digest only
#             decides what a resumed prewarm sends again.
#   run:      a ``put`` with ``run`` true is one of an object's ranges sent in
#             order on this session: the stager hashes the object as the
#             ranges arrive and need not read it back.
#   sparse:   a ``put`` (and a ``get``) with ``sparse`` true carries a sparse
#             payload (syncd.sparse): the range's data extents only.
FEATURES = ("agent", "xxh3-128", "run", "sparse")


class Stager:
    """One stage-only session over ``recv`` / ``send_all``."""

    def __init__(self, cfg: Config, recv: Callable[[int], bytes], send_all: Callable[[Any], None],
                 recv_into: Callable[[memoryview], int] | None = None) -> None:
        self.cfg = cfg
        # Each DATA body is hashed and copied out (or decompressed) before
        # the next frame is read: one receive buffer serves them all.
        self.reader = FrameReader(recv, recv_into=recv_into, reuse_data=True)
        self.writer = FrameWriter(send_all)
        self.staging = cfg.node.state_dir / "staging"
        self.staging_fd = -1  # opened by serve(), with the log of what it verified
        self.verified: VerifiedLog | None = None
        self.puts: dict[int, Put] = {}
        self.role: str | None = None
        self.manifest: Manifest | None = None
        self.root: SafeRoot | None = None
        self._tmp_n = 0
        self.buffers = BufferPool(write_behind=True)
        # The writer is shared with the commit threads, which send the acks.
        self.wlock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(COMMITS_IN_FLIGHT)
        self._commit_error: BaseException | None = None
        # Set by an ``agent`` message: the session goes on as a push agent's.
        self.become_agent = False
        self.runs: dict[bytes, Run] = {}

    def _send(self, msg: dict) -> None:
        with self.wlock:
            self.writer.message(msg)
            self.writer.flush()

    def serve(self) -> int:
        self.writer.hello()
        self.writer.flush()
        negotiate(PROTOCOL_VERSION, self.reader.read_hello())
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.staging_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.verified = VerifiedLog(self.staging_fd)
        try:
            # Only what writers that are gone left (a push agent or another
            # stager may be writing beside this one): syncd.staging.
            clean(self.staging_fd)
            return self._loop()
        finally:
            if self._pool is not None:
                # What arrived is made durable and named even when the client
                # is gone: a resumed prewarm then finds it.
                self._pool.shutdown(wait=True)
            for put in self.puts.values():
                put.discard()
            for run in self.runs.values():
                if not run.done:
                    promote_run(self.staging_fd, run.name)
            self.buffers.close()
            self.verified.close()
            os.close(self.staging_fd)
            if self.root is not None:
                self.root.close()
            if self.manifest is not None:
                self.manifest.close()

    def new_tmp(self) -> str:
        self._tmp_n += 1
        return f"{STAGE_PREFIX}{os.getpid()}.{self._tmp_n}"

    def run_for(self, sha: bytes, size: int, offset: int) -> Run | None:
        """The run this range continues (or, at offset 0, starts), if any.

        A run starts only where no partial file of the object exists: the
        ranges recorded there are what a resumed prewarm does not send."""
        run = self.runs.get(sha)
        if offset != 0:
            if run is not None and not (run.broken or run.done) and run.pos == offset and run.size == size:
                return run
            return None
        hexname = sha.hex()
        if self._exists(PARTIAL_PREFIX + hexname):
            return None
        if run is not None and not run.done:
            return None  # begun again while the first is unfinished: the partial file's way
        name = f"{RUN_PREFIX}{os.getpid()}.{hexname}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.staging_fd)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        unlink_at(self.staging_fd, name + RANGES_SUFFIX)
        run = self.runs[sha] = Run(sha, size, name)
        return run

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.staging_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _loop(self) -> int:
        try:
            while True:
                frame = self.reader.read_frame(lazy=True)
                if frame is None:
                    return 0
                if frame.kind is FrameType.MESSAGE:
                    if self._message(decode(frame.payload, TO_STAGER)):
                        self._drain()
                        if self.become_agent:
                            self._send({"type": "agent_ok"})
                        return 0
                    with self.wlock:
                        self.writer.flush()
                    continue
                elif frame.kind is FrameType.DATA:
                    put = self.puts.get(frame.stream)
                    if put is None:
                        raise ProtocolError(f"DATA for stream {frame.stream}, which no 'put' opened")
                    put.receive(self.reader, frame.payload)
                    continue
                else:
                    self._end(frame.stream, frame.payload)
                if self._commit_error is not None:
                    raise self._commit_error
        except SyncdError as err:
            log.error("%s", err)
            self._send_error(err)
            return err.exit_status
        except OSError as err:
            message = f"{os.strerror(err.errno) if err.errno else err} {err.filename or ''}".strip()
            log.error("%s", message)
            self._send_error(SyncdError(message))
            return 1

    def _drain(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._commit_error is not None:
            raise self._commit_error
        with self.wlock:
            self.writer.flush()

    def _send_error(self, err: SyncdError) -> None:
        try:
            self._send({"type": "error", "kind": type(err).__name__, "message": str(err)})
        except OSError:
            pass

    def _open_manifest(self) -> Manifest | None:
        try:
            return Manifest.open(self.cfg.node.state_dir, self.cfg.node.name, create=False)
        except ManifestError:
            return None

    def _message(self, msg: Message) -> bool:
        if isinstance(msg, StageHello):
            self.role = msg.role
            self.manifest = self._open_manifest()
            held = self.manifest.get_meta("upstream_generation") if self.manifest else None
            self.writer.message({
                "type": "welcome", "node": self.cfg.node.name,
                "generation": None if held is None else int(held),
                "upstream": self.manifest.get_meta("upstream") if self.manifest else None,
                "features": list(FEATURES),
            })
            self.root = SafeRoot(self.cfg.node.root) if os.path.isdir(self.cfg.node.root) else None
        elif isinstance(msg, Have):
            self._have(msg)
        elif isinstance(msg, PutMessage):
            self._need_role("edge", msg.TYPE)
            if msg.stream in self.puts:
                raise ProtocolError(f"stream {msg.stream} opened twice")
            if len(self.puts) >= MAX_OPEN_STREAMS:
                raise ProtocolError(f"more than {MAX_OPEN_STREAMS} objects open at once")
            self.puts[msg.stream] = Put(self, msg)
        elif isinstance(msg, Get):
            self._need_role("source", msg.TYPE)
            self._get(msg)
        elif isinstance(msg, Bye):
            return True
        elif isinstance(msg, BecomeAgent):
            # Staging is done: the same session carries the push that
            # follows, without a second SSH login and interpreter start.
            self._need_role("edge", msg.TYPE)
            self.become_agent = True
            return True
        return False

    def _need_role(self, role: str, kind: str) -> None:
        if self.role != role:
            raise ProtocolError(f"{kind!r} needs role {role!r} (hello said {self.role!r})")

    # -- edge role ---------------------------------------------------------------

    def _have(self, msg: Have) -> None:
        """Per object: "staged", "published" (root already holds it at that
        path), "partial" with its verified ranges, or "none"."""
        self._need_role("edge", "have")
        answers = []
        for sha, size, path, mtime_ns in msg.objects:
            hexname = sha.hex()
            if self._is_file(hexname):
                answers.append(["staged", []])
            elif self._published(path, sha, size, mtime_ns):
                answers.append(["published", []])
            else:
                ranges = read_ranges(self.staging_fd, PARTIAL_PREFIX + hexname)
                answers.append(["partial", [list(r) for r in ranges]] if ranges else ["none", []])
        with self.wlock:
            self.writer.message({"type": "have", "batch": msg.batch, "objects": answers})

    def _is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.staging_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _published(self, path: bytes, sha: bytes, size: int, mtime_ns: int) -> bool:
        # A stale mirror: the same size and mtime at the same path is worth a
        # local re-hash, far cheaper than the bytes on the wire.
        if self.root is None:
            return False
        st = self.root.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size or st.st_mtime_ns != mtime_ns:
            return False
        try:
            fd = self.root.open_read(path)
        except (OSError, UnsafePathError):
            return False
        try:
            h = hashlib.sha256()
            while chunk := os.read(fd, CHUNK):
                h.update(chunk)
            return h.digest() == sha
        finally:
            os.close(fd)

    def _end(self, stream: int, trailer: Any) -> None:
        put = self.puts.pop(stream, None)
        if put is None:
            raise ProtocolError(f"END for stream {stream}, which no 'put' opened")
        try:
            ok = put.check(trailer)
        except BaseException:
            put.discard()
            raise
        if not ok:
            put.discard()
            log.warning("%s [%d+%d]: received bytes do not match their digest", put.hex, put.offset, put.length)
            self._send({"type": "put_failed", "sha256": put.sha256, "offset": put.offset,
                        "error": "received bytes do not match their digest"})
            return
        run = put.run
        if run is not None:
            with run.lock:
                run.pos = put.offset + put.length
                run.pending += 1
        # A thread starts the write-out and does the rename or record, while
        # this one goes on receiving.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="stage-commit")
        self._slots.acquire()
        self._pool.submit(self._commit, put)

    def _commit(self, put: Put) -> None:
        try:
            put.commit()
            if put.whole:
                staged = True
            elif put.run is not None:
                staged = self._finish_run(put.run)
            else:
                staged = self._finalize(put.hex, put.sha256, put.size)
            self._send({"type": "put_ok", "sha256": put.sha256, "offset": put.offset,
                        "length": put.length, "staged": bool(staged)})
        except BaseException as err:  # noqa: BLE001 - raised by the receiving thread
            put.discard()
            if self._commit_error is None:
                self._commit_error = err
        finally:
            self._slots.release()

    def _finish_run(self, run: Run) -> bool:
        """After a run's range is recorded: name the object once every range
        arrived and is recorded, by the hash taken on the way in."""
        with run.lock:
            run.pending -= 1
            if run.pending or run.pos != run.size or run.broken or run.done:
                return False
            run.done = True
        return self._name_object(run.name, run.sha256.hex(), run.chain.digest() == run.sha256)

    def _name_object(self, assembled: str, hexname: str, matches: bool) -> bool:
        """An object assembled from ranges under ``assembled`` (with its
        records): named ``hexname`` when its SHA-256 ``matches``, else
        discarded.  True when named."""
        sfd = self.staging_fd
        if not matches:
            log.warning("%s: assembled object does not match its SHA-256; discarded", hexname)
            unlink_at(sfd, assembled, assembled + RANGES_SUFFIX)
            return False
        os.rename(assembled, hexname, src_dir_fd=sfd, dst_dir_fd=sfd)
        self.verified.add(hexname)
        unlink_at(sfd, assembled + RANGES_SUFFIX)
        return True

    def _finalize(self, hexname: str, sha: bytes, size: int) -> bool:
        """Stage a partial object once its ranges cover it and its SHA-256 matches."""
        if not covered(read_ranges(self.staging_fd, PARTIAL_PREFIX + hexname), size):
            return False
        sfd = self.staging_fd
        partial = PARTIAL_PREFIX + hexname
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
        except FileNotFoundError:
            return False  # another stager finished it first
        try:
            # Two stagers may both see the last range recorded: one hashes
            # and renames, the other finds the name gone.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = os.stat(partial, dir_fd=sfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if now.st_ino != os.fstat(fd).st_ino:
                return False
            digest, offset = sha256_around_cache(fd, self.buffers)
            return self._name_object(partial, hexname, offset == size and digest == sha)
        finally:
            os.close(fd)

    # -- source role ---------------------------------------------------------------

    def _get(self, msg: Get) -> None:
        stream, path, sha, offset, length, digest = msg.stream, msg.path, msg.sha256, msg.offset, msg.length, msg.digest
        if offset < 0 or not 0 <= length <= MAX_RANGE:
            raise ProtocolError(f"get {fspath(path)}: range out of bounds")
        problem = None
        entry = self.manifest.lookup(path) if self.manifest else None
        if entry is None or entry.deleted or entry.kind != KIND_FILE or entry.sha256 != sha:
            problem = "not this content in this mirror's manifest"
        elif self.root is None:
            problem = "no root"
        fd = -1
        if problem is None:
            try:
                fd = self.root.open_read(path)
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns) or offset + length > st.st_size:
                    problem = "changed since its manifest row"
            except (OSError, UnsafePathError) as err:
                problem = f"cannot read: {err}"
        if problem is not None:
            if fd >= 0:
                os.close(fd)
            self.writer.message({"type": "get_failed", "stream": stream, "path": path, "error": problem})
            return
        try:
            sparse = msg.sparse and has_holes(os.fstat(fd))
            start = next(data_extents(fd, offset, offset + length), (offset, 0))[0] if sparse else offset
            first = os.pread(fd, min(CHUNK, length), start)
            packed = should_compress(path, first)
            head = {"type": "range", "stream": stream, "how": "zstd" if packed else "whole"}
            if sparse:
                head["sparse"] = True
            self.writer.message(head)
            h = range_hasher(digest)
            cobj = compressor() if packed else None
            if sparse:
                pieces = payload(fd, offset, offset + length, memoryview(bytearray(CHUNK)), h, name=fspath(path))
            else:
                pieces = self._pieces(fd, path, first, offset, offset + length, h)
            for chunk in pieces:
                out = cobj.compress(chunk) if cobj else chunk
                if out:
                    self.writer.data(stream, out)
            if cobj is not None:
                tail = cobj.flush()
                if tail:
                    self.writer.data(stream, tail)
            self.writer.end(stream, {digest_key(digest): h.digest()})
        finally:
            os.close(fd)
        self.writer.flush()

    @staticmethod
    def _pieces(fd: int, path: bytes, first: bytes, pos: int, end: int, h: Any) -> Any:
        chunk = first
        while True:
            if len(chunk) == 0 and pos < end:
                raise SyncdError(f"{fspath(path)}: shrank while being read")
            h.update(chunk)
            pos += len(chunk)
            yield chunk
            if pos >= end:
                return
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)


def serve_stage_stdio(cfg: Config, then: Callable[[Config], int] | None = None) -> int:
    """Run one stage-only session on fds 0 and 1 (``syncd agent --stage``).

    When the client asks (``agent``), the session goes on as ``then(cfg)``'s:
    the command line hands in the push agent's ``serve_stdio``, so that this
    package imports no agent (and a stream that never becomes one does not
    load it).  Without ``then`` the session ends there."""
    recv, send_all, recv_into = stdio()
    stager = Stager(cfg, recv, send_all, recv_into=recv_into)
    status = stager.serve()
    if status == 0 and stager.become_agent and then is not None:
        return then(cfg)
    return status
