"""``syncd prewarm NAME``: the run, from this node's snapshot through the
staging attempts to the push that publishes (see the package's docstring)."""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable

from ..config import PROBE_TIMEOUT, Config, MirrorConfig, load, parse_rate
from ..errors import EXIT_FAILURE, SyncdError, UsageError
from ..lock import StateLock
from ..manifest import Manifest
from ..partial import RANGE_SIZE
from ..push import push_with_retries
from .conn import StageConn, session_factory, stage_mirror
from .pieces import Obj, query_edge, snapshot, work_items
from .progress import PROGRESS_EVERY, Progress
from .result import SELF, PrewarmResult, Probe, human, probe_table
from .sources import choose_source, probe_names, streams_for
from .streams import Launch

log = logging.getLogger(__package__)


def _paramiko_session(mirror: MirrorConfig) -> Any:
    # paramiko: imported only when the push needs a login of its own.
    from ..transport import open_session

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


class _Staging:
    """One staging attempt: the streams run, the first in this process, the
    others in worker processes; their progress is shown and their errors
    gathered.

    The first stream's session asks the edge what it holds (``plan``) before
    it sends anything, so planning costs no login of its own; when the
    staging went well that session is handed to ``opener``, turned into the
    push's (the stager's ``agent``).
    """

    def __init__(self, launch: Launch, progress: Progress, opener: _PushOpener) -> None:
        self.launch = launch
        self.shared = launch.shared
        self.procs = launch.procs
        self.progress = progress
        self.opener = opener
        self.errors: list[tuple[str, bool]] = []
        self.handed: list[Any] = []  # the lead stream's session, if it was turned into a push agent's
        self.base_bytes = 0  # what the edge holds already
        self.base_files = 0

    def run(self, plan: Callable[[StageConn], tuple]) -> tuple[int, int, int, int, int, list[tuple[str, bool]]]:
        """Returns (bytes present, objects present, bytes staged, objects
        staged, pieces failed, errors)."""
        shared, procs = self.shared, self.procs
        try:
            try:
                lead = self.launch.lead()
                self.base_bytes, self.base_files, items = plan(lead.edge)
            except BaseException:
                self.launch.abort()
                raise
            for item in items:
                shared.items.put(item)
            for _ in range(self.launch.streams):
                shared.items.put(None)
            to_send = sum(piece[4] for item in items for piece in item)
            lead_thread = threading.Thread(target=self._run_lead, args=(lead,), name="prewarm-0", daemon=True)
            lead_thread.start()
            self._watch(lead_thread, to_send, can_hand_over="agent" in lead.edge.features)
            for p in procs:
                p.join()
            self._take_errors()
            for p in procs:
                if p.exitcode not in (0, None) and not self.errors:
                    self.errors.append((f"stream process {p.name} died (exit {p.exitcode})", True))
            session = self.handed[0] if self.handed else None
            if session is not None:
                if self.errors:
                    session.close()  # staging is tried again, on new sessions
                else:
                    self.opener.give(session)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
        return (self.base_bytes, self.base_files, shared.bytes.value, shared.files.value, shared.failed.value,
                self.errors)

    def _run_lead(self, lead: Any) -> None:
        try:
            self.handed.append(lead.run(hand_over=True))
        except SyncdError as err:
            self.shared.errors.put((str(err), err.retryable))
        except BaseException as err:  # noqa: BLE001 - as a worker's: reported, then decided on
            self.shared.errors.put((f"{type(err).__name__}: {err}", False))

    def _watch(self, lead_thread: threading.Thread, to_send: int, *, can_hand_over: bool) -> None:
        """Until every stream ended: progress, and the push's own login
        started about two seconds before the end (where no session is handed over)."""
        shared, procs = self.shared, self.procs
        last = 0.0
        t0 = time.monotonic()
        while lead_thread.is_alive() or any(p.is_alive() for p in procs):
            # Wake when a worker ends, not a whole progress period later.
            alive = [p.sentinel for p in procs if p.is_alive()]
            if alive:
                wait(alive, timeout=0.2)
            else:
                lead_thread.join(0.2)
            self._take_errors()
            done = shared.bytes.value
            rate = done / max(time.monotonic() - t0, 1e-3)
            if not can_hand_over and to_send - done <= 2 * rate:
                self.opener.start()  # about two seconds left: the push's own login meanwhile
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                self.progress.update("staging", self.base_bytes + done, self.base_files + shared.files.value)

    def _take_errors(self) -> None:
        while True:
            try:
                self.errors.append(self.shared.errors.get_nowait())
            except queue.Empty:
                break


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
    """Fill mirror ``name`` to this node's current generation; see the package's docstring."""
    push_session = open_session  # the push (phase 2) keeps syncd.transport unless told otherwise
    if open_session is None:
        open_session = session_factory(transport)
    mirror = cfg.mirror(name)
    if mirror is None:
        raise UsageError(f"{cfg.path}: no [mirror:{name}]: prewarm fills one of this node's downstreams")
    if not streams:
        streams = streams_for(mirror)
    if streams < 1:
        raise UsageError("--streams must be at least 1")
    run = _Prewarm(cfg, mirror, streams=streams, bwlimit=bwlimit, range_size=range_size, open_session=open_session)
    run.start(sources, probe_timeout)
    if on_probes is not None:
        on_probes(run.result.probes)
    return run.finish(tty, push_session or _paramiko_session)


class _Prewarm:
    """One prewarm of ``mirror``: snapshot and source (:meth:`start`), then
    staging and the push (:meth:`finish`)."""

    def __init__(self, cfg: Config, mirror: MirrorConfig, *, streams: int, bwlimit: float | None, range_size: int,
                 open_session: Callable) -> None:
        self.started = time.monotonic()
        self.cfg = cfg
        self.mirror = mirror
        self.name = mirror.name
        self.streams = streams
        self.bwlimit = bwlimit
        self.range_size = range_size
        self.open_session = open_session
        self.result = PrewarmResult(mirror=mirror.name, streams=streams)
        self.edge = stage_mirror(mirror)
        self.source: MirrorConfig | None = None  # None: this node
        self.launch: Launch | None = None  # streams started, not yet given their work
        self.generation = 0
        self.objs: list[Obj] = []

    def start(self, sources: list[str] | None, probe_timeout: float) -> None:
        """This node's snapshot and the source chosen; where the source is
        this node for sure, the streams log in meanwhile."""
        cfg, mirror, result = self.cfg, self.mirror, self.result
        if not probe_names(cfg, mirror, sources):  # the source is this node: log in at once
            self.launch = Launch(cfg, self.edge, None, self.streams, self.bwlimit, self.open_session)
        try:
            self.generation, self.objs = snapshot(cfg, mirror)
            result.generation = self.generation
            result.files_total = len(self.objs)
            result.bytes_total = sum(o.size for o in self.objs)
            source, result.probes = choose_source(cfg, mirror, sources, self.objs, self.generation, probe_timeout,
                                                  self.open_session)
        except BaseException:
            if self.launch is not None:
                self.launch.abort()
            raise
        result.source = source.name if source is not None else SELF
        if source is not None:
            self.source = stage_mirror(source)

    def finish(self, tty: bool, push_session: Callable) -> PrewarmResult:
        """Stage (retried), then push; the result, also when staging failed for good."""
        result = self.result
        log.info("%s: prewarm from %s, %d stream(s), %d objects, %s\n%s", self.name, result.source, self.streams,
                 result.files_total, human(result.bytes_total), probe_table(result.probes))
        progress = Progress(self.cfg, result, tty)
        opener: _PushOpener | None = None
        try:
            opener = _PushOpener(self.mirror, push_session)
            self._stage(progress, opener)
            progress.update("publishing", result.bytes_total, result.files_total)
            self._push(opener)
            progress.update("done" if result.ok else "failed", result.bytes_total, result.files_total, final=True)
        except SyncdError as err:
            result.error = str(err)
            progress.update("failed", result.bytes_present + result.bytes_staged, result.files_staged, final=True)
            raise
        finally:
            if self.launch is not None:
                self.launch.abort()
            if opener is not None:
                opener.close()
            progress.close()
            result.seconds = time.monotonic() - self.started
        return result

    def _stage(self, progress: Progress, opener: _PushOpener) -> None:
        """Staging attempts, with backoff, until one ends without errors."""
        mirror, result = self.mirror, self.result
        for attempt in range(1, mirror.retries + 1):
            t0 = time.monotonic()
            if self.launch is None:
                self.launch = Launch(self.cfg, self.edge, self.source, self.streams, self.bwlimit, self.open_session)
            this, self.launch = self.launch, None
            base_bytes, base_files, sent, staged, failed, errors = _Staging(this, progress, opener).run(self._plan)
            if attempt == 1:
                result.files_present = base_files
                result.bytes_present = base_bytes
            result.seconds_staging += time.monotonic() - t0
            result.bytes_staged += sent
            result.files_staged += staged
            result.failed_pieces += failed
            if not errors:
                return
            message, retryable = errors[0]
            if not retryable or attempt == mirror.retries:
                raise SyncdError(f"{self.name}: staging failed: {message}")
            delay = min(mirror.retry_delay * 2 ** (attempt - 1), 60.0)
            log.warning("%s: %s; staging again in %.1f s (attempt %d of %d)", self.name, message, delay,
                        attempt + 1, mirror.retries)
            time.sleep(delay)

    def _plan(self, conn: StageConn) -> tuple[int, int, list]:
        """What the edge holds already (bytes, objects), and the work items for the rest."""
        needed, states = query_edge(conn, self.cfg.node.name, self.objs, self.generation)
        present = [i for i, st in enumerate(states) if st[0] in ("staged", "published")]
        done_bytes = sum(needed[i].size for i in present)
        # Verified ranges of partial objects count as done too.
        done_bytes += sum(sum(r[1] for r in st[1]) for st in states if st[0] == "partial")
        # So do the objects the edge holds already from an earlier generation.
        done_bytes += self.result.bytes_total - sum(o.size for o in needed)
        done_files = len(present) + len(self.objs) - len(needed)
        return done_bytes, done_files, work_items(needed, states, self.range_size, self.streams)

    def _push(self, opener: _PushOpener) -> None:
        """Phase 2: an ordinary push, over the session staging handed over where it could."""
        cfg, result = self.cfg, self.result
        with StateLock(cfg.node.state_dir, f"prewarm {self.name}"), \
                Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:
            if manifest.generation != self.generation:
                log.info("%s: this node moved to generation %d during staging; the push sends the rest",
                         self.name, manifest.generation)
            result.push = push_with_retries(cfg, self.mirror, manifest, open_session=opener)
        result.ok = bool(result.push.ok)
        result.error = result.push.error
        result.generation = result.push.generation


def cmd_prewarm(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    bwlimit = None
    if args.bwlimit:
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
