"""``syncd prewarm NAME``: fill a new or stale downstream before it takes traffic.

Two phases.  Phase 1 stages content on the edge, in parallel: N worker
processes (a process each, since a stream in Python keeps a core busy), each
with its own SSH connection (OpenSSH's ``ssh`` when installed, else
paramiko) to a stage-only receiver on the edge (``syncd agent --stage``,
syncd/stager.py).  The objects the edge lacks (by SHA-256) are cut into
ranges, large files first so one ISO is spread over every stream, small
files batched; workers take the next item from a shared queue, so a slow
stream never holds the others back.  The bytes come from this node's root,
or, when a sibling mirror already holds this node's generation and probes
faster, from that mirror's stage-only server (each worker then relays one
range at a time from the source to the edge).

Phase 2 is an ordinary push (``push_with_retries``): everything it would ask
for is already staged, so it moves almost nothing, publishes in the safe
order and records the manifest, generation and trace exactly as an
incremental push does.  Phase 1 is only an accelerator: whatever it failed to
stage, phase 2 sends.

Resuming needs no state on this node: the edge's staging area is the state.
Staged objects are found by content; ranges of a large object that were
verified and recorded are not sent again.

Progress goes to ``state_dir/prewarm.json`` (read by ``status``), to a rich
progress bar when stdout is a terminal, and to the log every few seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import PROBE_TIMEOUT, Config, MirrorConfig
from .errors import ConnectionLostError, ProtocolError, RemoteError, SyncdError, UsageError
from .manifest import KIND_FILE, fspath
from .partial import RANGE_SIZE, contains
from .protocol import PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate

log = logging.getLogger(__name__)

# Small files travel in batches of about this many bytes per work item.
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
HAVE_BATCH = 1000
CHUNK = 1 << 20
PROBE_BYTES = 4 << 20
# A throughput sample stops after this long, whatever has arrived.
PROBE_SECONDS = 1.5
PROGRESS_FILE = "prewarm.json"
PROGRESS_EVERY = 1.0
LOG_EVERY = 5.0
SELF = "self"
# Below this TCP handshake time a link is a LAN: one stream's window fills it.
LAN_RTT = 0.002


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def link_rtt(mirror: MirrorConfig, confirm: int = 2) -> float | None:
    """A TCP handshake to the mirror's SSH port, in seconds (None: no answer).

    One below LAN_RTT is taken as it is; a slower one may be a delay of the
    moment (a busy host or proxy: seen in one round of three through the
    benchmark's relay on loopback, which then chose 4 streams instead of 2),
    so ``confirm`` more are made and the fastest counts.
    """
    best = None
    for _ in range(1 + confirm):
        started = time.monotonic()
        try:
            with socket.create_connection((mirror.host, int(mirror.port or 22)),
                                          timeout=min(float(mirror.connect_timeout), 5.0)):
                took = time.monotonic() - started
        except OSError:
            return best
        best = took if best is None else min(best, took)
        if best < LAN_RTT:
            break
    return best


def default_streams(rtt: float | None = None) -> int:
    """Streams from the link and the cores.

    A stream's SSH channel window (2 MiB in OpenSSH) caps it at about
    window / RTT: 40 MB/s at 50 ms.  On such a link (RTT from 2 ms) more
    streams fill the pipe: two per core, at most 4 (beyond that the edge's
    disk and the handshakes gain nothing).  On a LAN one stream is not
    limited by its window, only by CPU: one stream per core, at most 4
    (on the 2-core benchmark host, 1, 2 and 4 streams were within the
    noise of each other; see scripts/bench_prewarm.py).
    """
    cores = _cores()
    if rtt is not None and rtt < LAN_RTT:
        return max(1, min(4, cores))
    return max(1, min(4, 2 * cores))


def stage_mirror(mirror: MirrorConfig, io_timeout: float | None = None) -> MirrorConfig:
    """The mirror with ``remote_command`` running the stage-only agent mode.

    The mode is ``agent --stage``: the token ``agent`` of the configured
    command gets ``--stage`` after it, so the same key, user and known_hosts
    reach it.
    """
    words = shlex.split(mirror.remote_command)
    if "agent" not in words:
        raise UsageError(
            f"[mirror:{mirror.name}] remote_command {mirror.remote_command!r} has no 'agent' word: "
            "cannot derive the stage-only command ('agent --stage') for prewarm"
        )
    i = words.index("agent")
    words.insert(i + 1, "--stage")
    changes: dict[str, Any] = {"remote_command": " ".join(shlex.quote(w) for w in words)}
    if io_timeout is not None:
        changes["io_timeout"] = io_timeout
    return dataclasses.replace(mirror, **changes)


def session_factory(transport: str = "auto") -> Callable:
    """``open_session`` for the stage streams: ``openssh``, ``paramiko`` or
    ``auto`` (OpenSSH when its client is installed)."""
    if transport == "auto":
        transport = "openssh" if shutil.which("ssh") else "paramiko"
    if transport == "openssh":
        from .session import open_openssh_session

        return open_openssh_session
    if transport == "paramiko":
        from .transport import open_session

        return open_session
    raise UsageError(f"--transport: {transport!r} is not auto, openssh or paramiko")


# -- what to send ----------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    sha256: bytes
    size: int
    path: bytes
    mtime_ns: int
    generation: int  # the newest generation among the paths holding this content


@dataclass
class Probe:
    name: str
    connect: float | None = None  # SSH handshake, login and command start, seconds
    rtt: float | None = None  # one protocol round trip, seconds
    rate: float | None = None  # sample throughput, bytes/s
    generation: int | None = None
    ok: bool = False
    note: str = ""
    chosen: bool = False


@dataclass
class PrewarmResult:
    mirror: str
    generation: int = 0
    source: str = SELF
    streams: int = 1
    probes: list[Probe] = field(default_factory=list)
    files_total: int = 0
    bytes_total: int = 0
    files_present: int = 0
    bytes_present: int = 0
    files_staged: int = 0
    bytes_staged: int = 0
    failed_pieces: int = 0
    seconds_staging: float = 0.0
    push: Any = None
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.ok:
            return f"{self.mirror}: prewarm FAILED: {self.error}"
        push = self.push
        return (
            f"{self.mirror}: prewarmed to generation {self.generation} from {self.source} with "
            f"{self.streams} stream(s): {self.files_staged} objects, {_human(self.bytes_staged)} staged "
            f"in {self.seconds_staging:.2f} s ({self.files_present} objects already there); "
            f"push {push.bytes_sent if push else 0} bytes; total {self.seconds:.2f} s"
        )


def probe_table(probes: list[Probe]) -> str:
    rows = [["source", "connect", "rtt", "throughput", "generation", "usable", ""]]
    for p in probes:
        rows.append([
            p.name + (" *" if p.chosen else ""),
            "-" if p.connect is None else f"{p.connect * 1000:.0f} ms",
            "-" if p.rtt is None else f"{p.rtt * 1000:.1f} ms",
            "-" if p.rate is None else f"{_human(p.rate)}/s",
            "-" if p.generation is None else str(p.generation),
            "yes" if p.ok else "no",
            p.note,
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pieces(objs: list[Obj], states: list[list], range_size: int, streams: int = 1) -> list[list[tuple]]:
    """Work items: lists of (sha256, size, path, offset, length, run), large objects first.

    A large object the edge holds nothing of, and no larger than one
    stream's share of the work, is one item: its ranges in order on one
    stream (``run``), which the stager hashes on arrival instead of reading
    the object back.  A larger one, or one with ranges already there, is cut
    into one item per range, so that every stream carries some of it."""
    runs: list[list[tuple]] = []
    big: list[list[tuple]] = []
    small: list[list[tuple]] = []
    batch: list[tuple] = []
    batch_bytes = 0
    order = sorted(range(len(objs)), key=lambda i: -objs[i].size)
    todo = sum(objs[i].size for i in order if states[i][0] not in ("staged", "published"))
    share = todo / max(1, streams)
    for i in order:
        o = objs[i]
        state, ranges = states[i]
        if state in ("staged", "published"):
            continue
        if o.size > range_size:
            done = [tuple(r) for r in ranges] if state == "partial" else []
            whole_run = state == "none" and o.size <= share
            pieces = [(o.sha256, o.size, o.path, off, min(range_size, o.size - off), whole_run)
                      for off in range(0, o.size, range_size)
                      if not contains(done, off, min(range_size, o.size - off))]
            if whole_run:
                runs.append(pieces)
            else:
                big.extend([p] for p in pieces)
            continue
        batch.append((o.sha256, o.size, o.path, 0, o.size, False))
        batch_bytes += o.size
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            small.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        small.append(batch)
    return runs + big + small


# -- one stream -------------------------------------------------------------------


class _Bucket:
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


class _Conn:
    """A stage-only session: frames both ways, byte counters."""

    def __init__(self, mirror: MirrorConfig, open_session: Callable, role: str, node: str) -> None:
        self.session = open_session(mirror)
        self.sent = 0

        def send_all(data: Any) -> None:
            self.sent += memoryview(data).nbytes
            self.session.send_all(data)

        self.writer = FrameWriter(send_all)
        self.reader = FrameReader(self.session.recv)
        self.can_send_file = hasattr(self.session, "send_file")
        self.writer.hello()
        self.writer.message({"type": "hello", "node": node, "mirror": mirror.name, "role": role})
        try:
            self.writer.flush()
            negotiate(PROTOCOL_VERSION, self.reader.read_hello())
            self.welcome = self.message("welcome")
        except (ProtocolError, ConnectionLostError) as err:
            from .session import openssh_error

            raise openssh_error(self.session, err) from None
        features = self.welcome.get("features")
        self.features = {f for f in features if isinstance(f, str)} if isinstance(features, list) else set()

    def send_file(self, fd: int, offset: int, length: int) -> int:
        """``length`` bytes of a file into the session: straight from the file
        where the session can (splice), else read and sent.  Returns how many
        went; fewer only when the file is shorter."""
        got = 0
        if self.can_send_file:
            try:
                got = self.session.send_file(fd, offset, length)
            except NotImplementedError:
                self.can_send_file = False
            self.sent += got
        if got < length:
            rest = os.pread(fd, length - got, offset + got)
            self.sent += len(rest)
            self.session.send_all(rest)
            got += len(rest)
        return got

    def message(self, expect: str | None = None) -> dict:
        frame = self.reader.read_frame()
        if frame is None:
            raise ConnectionLostError(f"{self.session.label}: the stager closed the connection")
        if frame.kind is not FrameType.MESSAGE or not isinstance(frame.payload, dict):
            raise ProtocolError(f"{self.session.label}: expected a message, got a {frame.kind.name} frame")
        msg = frame.payload
        if msg.get("type") == "error":
            raise RemoteError(f"{self.session.label}: stager: {msg.get('message')}")
        if expect is not None and msg.get("type") != expect:
            raise ProtocolError(f"{self.session.label}: expected {expect!r}, got {msg.get('type')!r}")
        return msg

    def close(self) -> None:
        try:
            self.writer.message({"type": "bye"})
            self.writer.flush()
        except SyncdError:
            pass
        self.session.close()


class _Resumed:
    """A session handed on mid-stream: what the last reader had read ahead
    comes first."""

    def __init__(self, session: Any, head: bytes) -> None:
        self._session = session
        self._head = head

    def recv(self, n: int = 1 << 20) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._session.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _Shared:
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


class _Stream:
    """One worker: pieces from the shared list, to one edge stager."""

    def __init__(self, cfg: Config, edge: MirrorConfig, source: MirrorConfig | None,
                 shared: _Shared, bucket: _Bucket, open_session: Callable) -> None:
        self.cfg = cfg
        self.shared = shared
        self.bucket = bucket
        self.root = os.fsencode(os.path.abspath(cfg.node.root))
        self.edge = _Conn(edge, open_session, "edge", cfg.node.name)
        self.source = _Conn(source, open_session, "source", cfg.node.name) if source is not None else None
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
                handed = _Resumed(self.edge.session, self.edge.reader.detach())
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
        from .plan import COMPRESSED_SUFFIXES
        from .sparse import data_extents, has_holes, payload
        from .stager import ZSTD_LEVEL, digest_key, range_hasher, zstd_pays

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
                if path.lower().endswith(COMPRESSED_SUFFIXES):
                    packed = False
                else:
                    first = os.pread(fd, min(CHUNK, length), start)
                    packed = zstd_pays(path, first)
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
                import zstandard

                cobj = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
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


def _worker(cfg: Config, edge: MirrorConfig, source: MirrorConfig | None, shared: _Shared,
            bucket: _Bucket, parent: int, open_session: Callable) -> None:
    _die_with_parent(parent)
    code = 0
    try:
        _Stream(cfg, edge, source, shared, bucket, open_session).run()
    except SyncdError as err:
        shared.errors.put((str(err), err.retryable))
        code = 1
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
        shared.errors.put((f"{type(err).__name__}: {err}", False))
        code = 1
    shared.errors.close()
    shared.errors.join_thread()
    os._exit(code)


# -- progress -------------------------------------------------------------------


class _Progress:
    """prewarm.json for ``status``, a rich bar on a terminal, a log line otherwise."""

    def __init__(self, cfg: Config, result: PrewarmResult, tty: bool) -> None:
        self.path = cfg.node.state_dir / PROGRESS_FILE
        self.result = result
        self.started = time.time()
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.bar = None
        if tty:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                TextColumn("{task.fields[files]}"), TransferSpeedColumn(), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task(f"prewarm {result.mirror}", total=result.bytes_total, files="")

    def update(self, phase: str, bytes_done: int, files_done: int, *, final: bool = False) -> None:
        r = self.result
        now = time.monotonic()
        elapsed = max(now - self.t0, 1e-6)
        rate = max(bytes_done - r.bytes_present, 0) / elapsed
        state = {
            "mirror": r.mirror, "source": r.source, "streams": r.streams, "phase": phase, "pid": os.getpid(),
            "generation": r.generation, "bytes_done": bytes_done, "bytes_total": r.bytes_total,
            "files_done": files_done, "files_total": r.files_total, "rate": round(rate),
            "started": round(self.started, 3), "updated": round(time.time(), 3),
        }
        tmp = self.path.with_name(f"{PROGRESS_FILE}.tmp.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as err:
            log.debug("cannot write %s: %s", self.path, err)
        if self.bar is not None:
            self.bar.update(self.task, completed=bytes_done, files=f"{files_done}/{r.files_total} files")
        elif final or now - self.last_log >= LOG_EVERY:
            self.last_log = now
            left = r.bytes_total - bytes_done
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            log.info("%s: prewarm %s: %s of %s, %d of %d objects, %s/s, ETA %s", r.mirror, phase,
                     _human(bytes_done), _human(r.bytes_total), files_done, r.files_total, _human(rate), eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- the whole run --------------------------------------------------------------------


def _snapshot(cfg: Config, mirror: MirrorConfig) -> tuple[int, list[Obj]]:
    """This node's generation and its live files (one per content) under the lock."""
    from .filters import Filter
    from .lock import StateLock
    from .manifest import Manifest
    from .push import filter_rules
    from .scan import scan

    cfg.node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    flt = Filter.parse(filter_rules(cfg, mirror))
    with StateLock(cfg.node.state_dir, "prewarm"), Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        # As run --once: only a node that publishes by itself scans its root.
        if m.get_meta("upstream") is None:
            scan(cfg.node.root, m, workers=cfg.node.hash_workers)
        objs: dict[bytes, Obj] = {}
        for e in m.entries(include_deleted=False):
            if e.kind != KIND_FILE or e.sha256 is None:
                continue
            if flt and flt.excluded_path(e.path, False):
                continue
            known = objs.get(e.sha256)
            if known is None or known.generation < e.generation:
                objs[e.sha256] = Obj(e.sha256, e.size, e.path, e.mtime_ns, e.generation)
        return m.generation, list(objs.values())


def _probe_one(cfg: Config, mirror: MirrorConfig, sample: Obj | None, generation: int, timeout: float,
               open_session: Callable, out: Probe) -> None:
    try:
        t0 = time.monotonic()
        conn = _Conn(stage_mirror(mirror, io_timeout=timeout), open_session, "source", cfg.node.name)
        out.connect = time.monotonic() - t0
        try:
            held = conn.welcome.get("generation")
            out.generation = held if isinstance(held, int) else None
            upstream = conn.welcome.get("upstream")
            t1 = time.monotonic()
            conn.writer.message({"type": "get", "stream": 1, "path": b"x", "sha256": b"\0" * 32,
                                 "offset": 0, "length": 0})
            conn.writer.flush()
            conn.message("get_failed")
            out.rtt = time.monotonic() - t1
            if out.generation != generation or upstream != cfg.node.name:
                out.note = (f"holds generation {out.generation} from {upstream}, "
                            f"not {generation} from {cfg.node.name}")
                return
            if sample is None:
                out.ok = True
                return
            length = min(PROBE_BYTES, sample.size)
            t2 = time.monotonic()
            conn.writer.message({"type": "get", "stream": 1, "path": sample.path, "sha256": sample.sha256,
                                 "offset": 0, "length": length})
            conn.writer.flush()
            head = conn.message()
            if head.get("type") != "range":
                out.note = f"sample refused: {head.get('error')}"
                return
            got = 0
            while True:
                frame = conn.reader.read_frame()
                if frame is None:
                    raise ConnectionLostError("the source closed the connection")
                if frame.kind is FrameType.DATA:
                    got += len(frame.payload)
                    if time.monotonic() - t2 > PROBE_SECONDS:
                        out.note = f"sampled {_human(got)} in {PROBE_SECONDS:.0f} s"
                        break  # a slow source: what arrived so far is the measure
                elif frame.kind is FrameType.END:
                    break
            out.rate = got / max(time.monotonic() - t2, 1e-6)
            out.ok = True
        finally:
            conn.close()
    except SyncdError as err:
        out.note = str(err).splitlines()[0][:120]


def _probe_names(cfg: Config, mirror: MirrorConfig, wanted: list[str] | None) -> list[str]:
    """The other mirrors that may serve a prewarm of ``mirror`` (each is
    probed), in ``--from``'s order when it is given."""
    others = [m.name for m in cfg.mirrors if m.name != mirror.name]
    return others if wanted is None else [n for n in wanted if n in others]


def _choose_source(cfg: Config, mirror: MirrorConfig, wanted: list[str] | None, objs: list[Obj], generation: int,
                   timeout: float, open_session: Callable) -> tuple[MirrorConfig | None, list[Probe]]:
    others = {m.name: m for m in cfg.mirrors if m.name != mirror.name}
    if wanted is not None:
        for name in wanted:
            if name not in others and name not in (SELF, cfg.node.name):
                raise UsageError(f"--from: {name!r} is neither 'self' nor another [mirror:NAME] of {cfg.path}")
        allow_self = SELF in wanted or cfg.node.name in wanted
    else:
        allow_self = True
    names = _probe_names(cfg, mirror, wanted)
    sample = max(objs, key=lambda o: o.size, default=None)
    probes = [Probe(name) for name in names]
    threads = [threading.Thread(target=_probe_one, daemon=True, name=f"probe {p.name}",
                                args=(cfg, others[p.name], sample, generation, timeout, open_session, p))
               for p in probes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t, p in zip(threads, probes):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            p.ok = False
            p.note = p.note or f"no answer within {timeout:.0f} s"
    own = Probe(f"{SELF} ({cfg.node.name})", connect=0.0, rtt=0.0, generation=generation, ok=allow_self,
                note="fallback" if allow_self else "excluded by --from")
    if sample is not None and allow_self:
        t0 = time.monotonic()
        try:
            with open(os.path.join(os.fsencode(cfg.node.root), sample.path), "rb") as fh:
                n = len(fh.read(PROBE_BYTES))
            own.rate = n / max(time.monotonic() - t0, 1e-6)
        except OSError as err:
            own.note = f"cannot read: {err.strerror}"
    probes.append(own)
    usable = [p for p in probes[:-1] if p.ok]
    if usable:
        best = max(usable, key=lambda p: (p.rate or 0.0, -(p.rtt or 0.0)))
        best.chosen = True
        return others[best.name], probes
    if allow_self:
        own.chosen = True
        return None, probes
    raise SyncdError(f"--from {','.join(wanted or [])}: no usable source holds generation {generation} "
                     f"of {cfg.node.name}\n{probe_table(probes)}")


def _query_edge(conn: _Conn, node: str, objs: list[Obj], generation: int) -> tuple[list[Obj], list[list]]:
    """The objects the coming push will ask for, and the edge's state of each,
    asked on the first stream's session before it sends anything.

    An edge that holds an older generation of this node gets an incremental
    push: only content stamped after it (what it already has is no concern
    of a prewarm, and staging more would leave objects no push consumes).
    """
    held = conn.welcome.get("generation")
    if (isinstance(held, int) and not isinstance(held, bool) and held <= generation
            and conn.welcome.get("upstream") == node):
        objs = [o for o in objs if o.generation > held]
    states: list[list] = []
    for start in range(0, len(objs), HAVE_BATCH):
        batch = objs[start:start + HAVE_BATCH]
        conn.writer.message({"type": "have", "batch": start,
                             "objects": [[o.sha256, o.size, o.path, o.mtime_ns] for o in batch]})
        conn.writer.flush()
        answer = conn.message("have").get("objects")
        if not isinstance(answer, list) or len(answer) != len(batch):
            raise ProtocolError("have: the answer does not match the question")
        states.extend(answer)
    return objs, states


def _paramiko_session(mirror: MirrorConfig) -> Any:
    # Imported only when a push needs its own login: paramiko takes 40 ms.
    from .transport import open_session

    return open_session(mirror)


class _PushOpener:
    """Opens the push's session (SSH handshake, agent start) while the last
    bytes are staged; the push's first attempt takes it, retries open anew."""

    def __init__(self, mirror: MirrorConfig, open_session: Callable) -> None:
        self.mirror = mirror
        self.open_session = open_session
        self.session: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._open, name="prewarm-push-open", daemon=True)
            self.thread.start()

    def _open(self) -> None:
        try:
            self.session = self.open_session(self.mirror)
        except SyncdError as err:
            log.debug("%s: opening the push session early failed: %s", self.mirror.name, err)

    def give(self, session: Any) -> None:
        """The first stream's session, already a push agent's: the push's first attempt takes it."""
        self.session = session

    def __call__(self, mirror: MirrorConfig) -> Any:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.session is not None:
            session, self.session = self.session, None
            return session
        return self.open_session(mirror)

    def close(self) -> None:
        """Close a session no push took."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class _Launch:
    """The streams of one staging attempt, started: worker processes for all
    but the first, and the first stream's login in a thread of this process.
    Started before this node's snapshot where the source is known without
    probing, so the logins (a third of a second) overlap the snapshot."""

    def __init__(self, cfg: Config, edge: MirrorConfig, source: MirrorConfig | None, streams: int,
                 bwlimit: float | None, open_session: Callable) -> None:
        ctx = multiprocessing.get_context("fork")
        self.streams = streams
        self.shared = _Shared(ctx)
        self.bucket = _Bucket(ctx, bwlimit)
        # Forked before any thread of ours exists.
        self.procs = [ctx.Process(target=_worker, name=f"prewarm-{i}", daemon=True,
                                  args=(cfg, edge, source, self.shared, self.bucket, os.getpid(), open_session))
                      for i in range(1, streams)]
        for p in self.procs:
            p.start()
        self._lead: _Stream | None = None
        self._error: BaseException | None = None

        def connect() -> None:
            try:
                self._lead = _Stream(cfg, edge, source, self.shared, self.bucket, open_session)
            except BaseException as err:  # noqa: BLE001 - raised where the lead is asked for
                self._error = err

        self._thread = threading.Thread(target=connect, name="prewarm-0-login", daemon=True)
        self._thread.start()

    def lead(self) -> _Stream:
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


def _stage(cfg: Config, launch: _Launch, plan: Callable[[_Conn], tuple], progress: _Progress,
           opener: _PushOpener) -> tuple[int, int, int, int, int, list[tuple[str, bool]]]:
    """Run the streams: the first in this process, the others in worker processes.

    The first stream's session asks the edge what it holds (``plan``) before
    it sends anything, so planning costs no login of its own; when the
    staging went well that session is handed to ``opener``, turned into the
    push's (the stager's ``agent``).

    Returns (bytes present, objects present, bytes staged, objects staged,
    pieces failed, errors).
    """
    shared, procs, streams = launch.shared, launch.procs, launch.streams
    errors: list[tuple[str, bool]] = []
    try:
        try:
            lead = launch.lead()
            base_bytes, base_files, items = plan(lead.edge)
        except BaseException:
            launch.abort()
            raise
        for item in items:
            shared.items.put(item)
        for _ in range(streams):
            shared.items.put(None)
        to_send = sum(piece[4] for item in items for piece in item)
        can_hand_over = "agent" in lead.edge.features
        handed: list[Any] = []

        def run_lead() -> None:
            try:
                handed.append(lead.run(hand_over=True))
            except SyncdError as err:
                shared.errors.put((str(err), err.retryable))
            except BaseException as err:  # noqa: BLE001 - as a worker's: reported, then decided on
                shared.errors.put((f"{type(err).__name__}: {err}", False))

        lead_thread = threading.Thread(target=run_lead, name="prewarm-0", daemon=True)
        lead_thread.start()
        from multiprocessing.connection import wait

        last = 0.0
        t0 = time.monotonic()
        while lead_thread.is_alive() or any(p.is_alive() for p in procs):
            # Wake when a worker ends, not a whole progress period later.
            alive = [p.sentinel for p in procs if p.is_alive()]
            if alive:
                wait(alive, timeout=0.2)
            else:
                lead_thread.join(0.2)
            while True:
                try:
                    errors.append(shared.errors.get_nowait())
                except queue.Empty:
                    break
            done = shared.bytes.value
            rate = done / max(time.monotonic() - t0, 1e-3)
            if not can_hand_over and to_send - done <= 2 * rate:
                opener.start()  # about two seconds left: the push's own login meanwhile
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                progress.update("staging", base_bytes + done, base_files + shared.files.value)
        for p in procs:
            p.join()
        while True:
            try:
                errors.append(shared.errors.get_nowait())
            except queue.Empty:
                break
        for p in procs:
            if p.exitcode not in (0, None) and not errors:
                errors.append((f"stream process {p.name} died (exit {p.exitcode})", True))
        session = handed[0] if handed else None
        if session is not None:
            if errors:
                session.close()  # staging is tried again, on new sessions
            else:
                opener.give(session)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return (base_bytes, base_files, shared.bytes.value, shared.files.value, shared.failed.value, errors)


def prewarm(
    cfg: Config,
    name: str,
    *,
    sources: list[str] | None = None,
    streams: int | None = None,
    bwlimit: float | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    range_size: int = RANGE_SIZE,
    tty: bool = False,
    transport: str = "auto",
    open_session: Callable | None = None,
    on_probes: Callable[[list[Probe]], None] | None = None,
) -> PrewarmResult:
    """Fill mirror ``name`` to this node's current generation; see the module docstring."""
    from .lock import StateLock
    from .manifest import Manifest
    from .push import push_with_retries

    push_session = open_session  # the push (phase 2) keeps syncd.transport unless told otherwise
    if open_session is None:
        open_session = session_factory(transport)
    mirror = cfg.mirror(name)
    if mirror is None:
        raise UsageError(f"{cfg.path}: no [mirror:{name}]: prewarm fills one of this node's downstreams")
    if not streams:
        rtt = link_rtt(mirror)
        streams = default_streams(rtt)
        log.info("%s: %d stream(s) (link RTT %s, %d cores)", name, streams,
                 "unknown" if rtt is None else f"{rtt * 1000:.1f} ms", _cores())
    if streams < 1:
        raise UsageError("--streams must be at least 1")
    started = time.monotonic()
    result = PrewarmResult(mirror=name, streams=streams)
    edge = stage_mirror(mirror)
    launch: _Launch | None = None
    if not _probe_names(cfg, mirror, sources):  # the source is this node: log in at once
        launch = _Launch(cfg, edge, None, streams, bwlimit, open_session)
    try:
        generation, objs = _snapshot(cfg, mirror)
        result.generation = generation
        result.files_total = len(objs)
        result.bytes_total = sum(o.size for o in objs)
        source, result.probes = _choose_source(cfg, mirror, sources, objs, generation, probe_timeout,
                                               open_session)
    except BaseException:
        if launch is not None:
            launch.abort()
        raise
    result.source = source.name if source is not None else SELF
    if source is not None:
        source = stage_mirror(source)
    if on_probes is not None:
        on_probes(result.probes)
    log.info("%s: prewarm from %s, %d stream(s), %d objects, %s\n%s", name, result.source, streams,
             result.files_total, _human(result.bytes_total), probe_table(result.probes))
    progress = _Progress(cfg, result, tty)
    opener: _PushOpener | None = None
    try:
        opener = _PushOpener(mirror, push_session or _paramiko_session)
        for attempt in range(1, mirror.retries + 1):
            def plan(conn: _Conn) -> tuple[int, int, list]:
                needed, states = _query_edge(conn, cfg.node.name, objs, generation)
                present = [i for i, st in enumerate(states) if st[0] in ("staged", "published")]
                done_bytes = sum(needed[i].size for i in present)
                # Verified ranges of partial objects count as done too.
                done_bytes += sum(sum(r[1] for r in st[1]) for st in states if st[0] == "partial")
                # So do the objects the edge holds already from an earlier generation.
                done_bytes += result.bytes_total - sum(o.size for o in needed)
                done_files = len(present) + len(objs) - len(needed)
                return done_bytes, done_files, _pieces(needed, states, range_size, streams)

            t0 = time.monotonic()
            if launch is None:
                launch = _Launch(cfg, edge, source, streams, bwlimit, open_session)
            this, launch = launch, None
            base_bytes, base_files, sent, staged, failed, errors = _stage(cfg, this, plan, progress, opener)
            if attempt == 1:
                result.files_present = base_files
                result.bytes_present = base_bytes
            result.seconds_staging += time.monotonic() - t0
            result.bytes_staged += sent
            result.files_staged += staged
            result.failed_pieces += failed
            if not errors:
                break
            message, retryable = errors[0]
            if not retryable or attempt == mirror.retries:
                raise SyncdError(f"{name}: staging failed: {message}")
            delay = min(mirror.retry_delay * 2 ** (attempt - 1), 60.0)
            log.warning("%s: %s; staging again in %.1f s (attempt %d of %d)", name, message, delay,
                        attempt + 1, mirror.retries)
            time.sleep(delay)
        progress.update("publishing", result.bytes_total, result.files_total)
        with StateLock(cfg.node.state_dir, f"prewarm {name}"), \
                Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:
            if manifest.generation != generation:
                log.info("%s: this node moved to generation %d during staging; the push sends the rest",
                         name, manifest.generation)
            result.push = push_with_retries(cfg, mirror, manifest, open_session=opener)
        result.ok = bool(result.push.ok)
        result.error = result.push.error
        result.generation = result.push.generation
        progress.update("done" if result.ok else "failed", result.bytes_total, result.files_total, final=True)
    except SyncdError as err:
        result.error = str(err)
        progress.update("failed", result.bytes_present + result.bytes_staged, result.files_staged, final=True)
        raise
    finally:
        if launch is not None:
            launch.abort()
        if opener is not None:
            opener.close()
        progress.close()
        result.seconds = time.monotonic() - started
    return result


def read_progress(state_dir: os.PathLike | str) -> dict | None:
    """The last prewarm's progress (for ``status``), with ``running`` set
    when its process still lives; None when there was none."""
    path = os.path.join(state_dir, PROGRESS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    state["running"] = state.get("phase") in ("staging", "publishing") and isinstance(pid, int) \
        and os.path.exists(f"/proc/{pid}")
    return state


# -- command line ---------------------------------------------------------------------


def cmd_prewarm(args: argparse.Namespace) -> int:
    from . import config as configmod
    from .errors import EXIT_FAILURE

    cfg = configmod.load(args.config)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    bwlimit = None
    if args.bwlimit:
        from .config import parse_rate

        try:
            bwlimit = parse_rate(args.bwlimit)
        except ValueError as err:
            raise UsageError(f"--bwlimit: {err}, got {args.bwlimit!r}") from None
        if bwlimit <= 0:
            raise UsageError("--bwlimit must be above zero")
    out = sys.stdout
    tty = out.isatty()

    def show(probes: list[Probe]) -> None:
        out.write(probe_table(probes) + "\n")
        out.flush()

    result = prewarm(cfg, args.name, sources=sources, streams=args.streams, bwlimit=bwlimit,
                     probe_timeout=args.probe_timeout, tty=tty, transport=args.transport, on_probes=show)
    out.write(result.summary() + "\n")
    if result.push is not None:
        out.write(result.push.summary() + "\n")
    return 0 if result.ok else EXIT_FAILURE
