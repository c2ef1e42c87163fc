"""The streams of a prewarm: each takes work items from a shared queue and
sends them to one edge stager, from this node's root or relayed from a
source mirror; all but the first run in worker processes."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from ..compress import compressor, named_compressed, should_compress
from ..config import Config, MirrorConfig
from ..errors import ConnectionLostError, ProtocolError, SyncdError
from ..manifest import fspath
from ..protocol import FrameType
from ..sparse import data_extents, has_holes, payload
from .codec import digest_key, range_hasher
from .conn import Resumed, StageConn

log = logging.getLogger(__package__)

CHUNK = 1 << 20


class Bucket:
    """A token bucket shared by every worker process (``--bwlimit``)."""

    def __init__(self, ctx: Any, rate: float | None) -> None:
        self.rate = rate
        self._next = ctx.Value("d", 0.0, lock=True)

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._next.get_lock():
            now = time.monotonic()
            start = max(now, self._next.value)
            self._next.value = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class Shared:
    """Counters shared by the worker processes and the parent."""

    def __init__(self, ctx: Any) -> None:
        # Work items, then one None per worker: a worker takes the next item
        # when it is free, so a slow stream never holds the others back.
        self.items = ctx.Queue()
        self.bytes = ctx.Value("q", 0, lock=True)
        self.files = ctx.Value("q", 0, lock=True)
        self.failed = ctx.Value("q", 0, lock=True)
        self.wire = ctx.Value("q", 0, lock=True)
        self.errors = ctx.Queue()

    @staticmethod
    def add(value: Any, n: int) -> None:
        with value.get_lock():
            value.value += n


class Stream:
    """One worker: pieces from the shared list, to one edge stager."""

    def __init__(self, cfg: Config, edge: MirrorConfig, source: MirrorConfig | None,
                 shared: Shared, bucket: Bucket, open_session: Callable) -> None:
        self.cfg = cfg
        self.shared = shared
        self.bucket = bucket
        self.root = os.fsencode(os.path.abspath(cfg.node.root))
        self.edge = StageConn(edge, open_session, "edge", cfg.node.name)
        self.source = StageConn(source, open_session, "source", cfg.node.name) if source is not None else None
        self.stream_id = 0
        # A range's own digest: XXH3-128 where both ends offer it (the
        # object's SHA-256 is checked whole on the edge in any case).
        offered = self.edge.features if self.source is None else self.edge.features & self.source.features
        self.digest = "xxh3-128" if "xxh3-128" in offered else "sha256"
        self.runs = "run" in self.edge.features
        self.sparse = "sparse" in (self.edge.features if self.source is None
                                   else self.edge.features & self.source.features)
        self._packs: dict[bytes, bool] = {}
        self._chunk = bytearray(CHUNK)  # ranges are read into this, hashed and sent from it
        self.sent_pieces = 0
        self.acked = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.reader = threading.Thread(target=self._acks, name="prewarm-acks", daemon=True)

    def run(self, hand_over: bool = False) -> Any:
        """Send pieces until the list ends and every one is acknowledged.

        With ``hand_over`` and a stager that offers it, the edge session is
        not closed but turned into a push agent's (``agent``) and returned,
        for the push that follows.  Otherwise None."""
        self.reader.start()
        handed = None
        try:
            while (item := self.shared.items.get()) is not None:
                for piece in item:
                    self._check()
                    if self.source is None:
                        self._send_local(piece)
                    else:
                        self._relay(piece)
            self.edge.writer.flush()
            with self.cond:
                while self.acked < self.sent_pieces and self.error is None:
                    self.cond.wait(1.0)
            self._check()
            if hand_over and "agent" in self.edge.features:
                self.edge.writer.message({"type": "agent"})
                self.edge.writer.flush()
                self.reader.join()  # it ends at the stager's agent_ok
                self._check()
                handed = Resumed(self.edge.session, self.edge.reader.detach())
            return handed
        finally:
            self.shared.add(self.shared.wire, self.edge.sent)
            if handed is None:
                self.edge.close()
            if self.source is not None:
                self.source.close()

    def abandon(self) -> None:
        """Close the sessions of a stream that never ran."""
        self.edge.close()
        if self.source is not None:
            self.source.close()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _acks(self) -> None:
        try:
            while True:
                msg = self.edge.message()
                kind = msg.get("type")
                if kind == "put_ok":
                    length = msg.get("length")
                    self.shared.add(self.shared.bytes, length if isinstance(length, int) else 0)
                    if msg.get("staged"):
                        self.shared.add(self.shared.files, 1)
                elif kind == "put_failed":
                    # Left for phase 2, which sends what is not staged.
                    log.warning("%s: %s", self.edge.session.label, msg.get("error"))
                    self.shared.add(self.shared.failed, 1)
                elif kind == "agent_ok" and self.acked == self.sent_pieces:
                    return  # the session is the push's from here on
                else:
                    raise ProtocolError(f"unexpected message {kind!r} from the stager")
                with self.cond:
                    self.acked += 1
                    self.cond.notify_all()
        except BaseException as err:  # handed to the sending thread
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def _open_put(self, piece: tuple, how: str, sparse: bool = False) -> int:
        sha, size, _path, off, length, run = piece
        self.stream_id += 1
        msg = {"type": "put", "stream": self.stream_id, "sha256": sha, "size": size,
               "offset": off, "length": length, "how": how}
        if sparse:
            msg["sparse"] = True
        if length != size:
            if self.digest != "sha256":
                msg["digest"] = self.digest
            if run and self.runs:
                msg["run"] = True
        self.edge.writer.message(msg)
        self.sent_pieces += 1
        return self.stream_id

    def _send_local(self, piece: tuple) -> None:
        sha, size, path, off, length, _run = piece
        try:
            fd = os.open(self.root + b"/" + path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            log.warning("%s: cannot read on this node (%s); left to the push", fspath(path), err.strerror)
            self.shared.add(self.shared.failed, 1)
            return
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                log.warning("%s: changed since the scan; left to the push", fspath(path))
                self.shared.add(self.shared.failed, 1)
                return
            # Holes are not sent where the stager takes a sparse payload.
            sparse = self.sparse and has_holes(st)
            start = next(data_extents(fd, off, off + length), (off, 0))[0] if sparse else off
            w = self.edge.writer
            first = None
            packed = self._packs.get(path)
            if packed is None:
                # One decision per file: the ranges of an ISO are alike.  A
                # name that says "compressed" decides without a read.
                if named_compressed(path):
                    packed = False
                else:
                    first = os.pread(fd, min(CHUNK, length), start)
                    packed = should_compress(path, first)
                self._packs[path] = packed
            stream = self._open_put(piece, "zstd" if packed else "whole", sparse)
            # A whole object is checked against its own SHA-256 on the edge;
            # only a range needs a digest of its own.
            whole = off == 0 and length == size
            if whole and not packed and not sparse and first is None and self.edge.can_send_file:
                # Nothing to look at on this side: file to pipe, no copy here.
                self._send_file(stream, fd, path, off, length)
                w.end(stream, None)
                return
            cobj = None
            if packed:
                cobj = compressor()
            h = None if whole else range_hasher(self.digest)
            with memoryview(self._chunk) as buf:
                if sparse:
                    pieces = payload(fd, off, off + length, buf, h, name=fspath(path))
                else:
                    pieces = self._pieces(fd, path, buf, first, off, off + length, h)
                for chunk in pieces:
                    # Sent (or copied into the writer) before the buffer is read into again.
                    out = cobj.compress(chunk) if cobj else chunk
                    if out:
                        self.bucket.take(len(out))
                        w.data(stream, out)
                del pieces
            if cobj is not None:
                w.data(stream, cobj.flush())
            w.end(stream, None if h is None else {digest_key(self.digest): h.digest()})
        finally:
            os.close(fd)

    @staticmethod
    def _pieces(fd: int, path: bytes, buf: memoryview, first: bytes | None, pos: int, end: int, h: Any) -> Any:
        while pos < end:
            if first is not None:
                chunk, first = memoryview(first), None
            else:
                chunk = buf[:os.preadv(fd, [buf[:min(CHUNK, end - pos)]], pos)]
                if not chunk:
                    raise SyncdError(f"{fspath(path)}: shrank while being read")
            if h is not None:
                h.update(chunk)
            pos += len(chunk)
            yield chunk

    def _send_file(self, stream: int, fd: int, path: bytes, off: int, length: int) -> None:
        w = self.edge.writer
        pos, end = off, off + length
        while pos < end:
            n = min(CHUNK, end - pos)
            self.bucket.take(n)

            def body(at: int = pos, n: int = n) -> None:
                if self.edge.send_file(fd, at, n) != n:
                    raise SyncdError(f"{fspath(path)}: shrank while being read")

            w.data_from(stream, n, body)
            pos += n

    def _relay(self, piece: tuple) -> None:
        sha, _size, path, off, length, _run = piece
        src = self.source
        msg = {"type": "get", "stream": 1, "path": path, "sha256": sha, "offset": off, "length": length}
        if self.digest != "sha256":
            msg["digest"] = self.digest
        if self.sparse:
            msg["sparse"] = True
        src.writer.message(msg)
        src.writer.flush()
        head = src.message()
        if head.get("type") == "get_failed":
            log.warning("%s: source cannot serve it (%s); left to the push", fspath(path), head.get("error"))
            self.shared.add(self.shared.failed, 1)
            return
        if head.get("type") != "range" or head.get("how") not in ("whole", "zstd"):
            raise ProtocolError(f"expected 'range' from the source, got {head.get('type')!r}")
        stream = self._open_put(piece, head["how"], self.sparse and head.get("sparse") is True)
        w = self.edge.writer
        while True:
            frame = src.reader.read_frame()
            if frame is None:
                raise ConnectionLostError(f"{src.session.label}: the source closed the connection")
            if frame.kind is FrameType.DATA:
                self.bucket.take(len(frame.payload))
                w.data(stream, frame.payload)
            elif frame.kind is FrameType.END:
                w.end(stream, frame.payload)
                return
            else:
                raise ProtocolError("a message inside a range from the source")


def _die_with_parent(parent: int) -> None:
    # A killed prewarm must not leave workers sending: the kernel kills them
    # with their parent (Linux); elsewhere they stop at their next piece.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _worker(cfg: Config, edge: MirrorConfig, source: MirrorConfig | None, shared: Shared,
            bucket: Bucket, parent: int, open_session: Callable) -> None:
    _die_with_parent(parent)
    code = 0
    try:
        Stream(cfg, edge, source, shared, bucket, open_session).run()
    except SyncdError as err:
        shared.errors.put((str(err), err.retryable))
        code = 1
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
        shared.errors.put((f"{type(err).__name__}: {err}", False))
        code = 1
    shared.errors.close()
    shared.errors.join_thread()
    os._exit(code)


class Launch:
    """The streams of one staging attempt, started: worker processes for all
    but the first, and the first stream's login in a thread of this process.
    Started before this node's snapshot where the source is known without
    probing, so the logins (a third of a second) overlap the snapshot."""

    def __init__(self, cfg: Config, edge: MirrorConfig, source: MirrorConfig | None, streams: int,
                 bwlimit: float | None, open_session: Callable) -> None:
        ctx = multiprocessing.get_context("fork")
        self.streams = streams
        self.shared = Shared(ctx)
        self.bucket = Bucket(ctx, bwlimit)
        # Forked before any thread of ours exists.
        self.procs = [ctx.Process(target=_worker, name=f"prewarm-{i}", daemon=True,
                                  args=(cfg, edge, source, self.shared, self.bucket, os.getpid(), open_session))
                      for i in range(1, streams)]
        for p in self.procs:
            p.start()
        self._lead: Stream | None = None
        self._error: BaseException | None = None

        def connect() -> None:
            try:
                self._lead = Stream(cfg, edge, source, self.shared, self.bucket, open_session)
            except BaseException as err:  # noqa: BLE001 - raised where the lead is asked for
                self._error = err

        self._thread = threading.Thread(target=connect, name="prewarm-0-login", daemon=True)
        self._thread.start()

    def lead(self) -> Stream:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._lead is not None
        return self._lead

    def abort(self) -> None:
        """Stop the streams before they got any work."""
        for _ in self.procs:
            self.shared.items.put(None)
        self._thread.join()
        if self._lead is not None:
            self._lead.abandon()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
