"""``syncd run``: the daemon that keeps every downstream current.

- On a node that publishes by itself (a primary), watchdog events on root mark
  directories dirty; after a short quiet period (``watch_debounce``) a
  partial scan of just those directories updates the manifest, and a new
  generation is pushed to every downstream at once.  Where watches cannot be
  placed (the inotify watch limit, ``watch = no``), a periodic full scan
  takes their place, and the log says so once.
- One worker thread per downstream, with its SSH session and the remote
  agent kept open between pushes (a lost one is opened again by the next
  push, with the usual retries).  A push requested while one runs is
  merged into a single next push, never dropped.  At most
  ``parallel_pushes`` run at the same time.  A failed push is retried with
  exponential backoff and jitter.
- APScheduler runs each mirror's ``schedule`` as a full reconcile (a full
  comparison, repairing drift no generation lists) and ``[verify] schedule``
  as a ``syncd verify`` of this node's own tree.
- SIGTERM: pushes stop at the next chunk (the agent publishes nothing more of
  an uncommitted generation than new data files that went live early), the daemon exits within 10 s.  SIGHUP: reload
  sync.ini (a broken file is logged and the old config kept).  A lock file
  (``state_dir/daemon.lock``) keeps a second daemon off the same state_dir.
- A primary checks each new generation's own index group (signatures,
  Release/repomd chains) before pushing it, as ``run --once`` does; a
  failing generation is not pushed, and the ERROR log says why.
- systemd: READY, WATCHDOG, RELOADING, STOPPING and STATUS through
  ``syncd.notify``; Prometheus metrics on ``metrics_listen`` when set.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from watchdog.observers import Observer

from . import config as configmod
from . import logs, notify
from .config import Config, MirrorConfig
from .errors import ConfigError, LockedError, SyncdError
from .lock import StateLock
from .manifest import Manifest
from .metrics import Metrics
from .push import Link, PushResult, push_with_retries
from .runonce import ReleaseGate, scan_node

log = logging.getLogger(__name__)

STOP_GRACE = 8.0  # seconds the workers get to stop; the daemon is gone within 10
MAX_BACKOFF = 300.0  # seconds between attempts at a downstream that keeps failing
WATCH_MAX_DELAY = 2.0  # a steady stream of events still gets pushed this often


class MirrorWorker(threading.Thread):
    """Pushes to one downstream whenever asked; requests made meanwhile merge."""

    def __init__(self, daemon: "Daemon", mirror: MirrorConfig) -> None:
        super().__init__(name=f"push-{mirror.name}", daemon=True)
        self.d = daemon
        self.mirror = mirror
        self.cond = threading.Condition()
        self.pending = False
        self.full = False
        self.quit = False
        self.failures = 0
        self.last: PushResult | None = None
        self.pushes = 0
        # The session and remote agent stay open between pushes: a push then
        # costs no SSH handshake and no interpreter start on the mirror.
        self.link = Link(mirror)

    def request(self, *, full: bool = False) -> None:
        with self.cond:
            self.pending = True
            self.full = self.full or full
            self.cond.notify()

    def finish(self) -> None:
        with self.cond:
            self.quit = True
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.quit:
                    self.cond.wait()
                if self.quit:
                    self.link.close()
                    return
                full, self.pending, self.full = self.full, False, False
            if self.mirror.via is not None:
                served = self.d.workers.get(self.mirror.via)
                if served is None or served.last is None or served.last.ok:
                    continue  # its tier-1 serves it; only a failure there makes it ours
            with self.d.slots:
                if self.d.stop.is_set():
                    self.link.close()
                    return
                result = push_with_retries(
                    self.d.cfg, self.mirror, self.d.manifest, force_full=full, stop=self.d.stop, link=self.link,
                )
            self.pushes += 1
            self.last = result
            self.d.pushed(self, result)
            if result.ok:
                self.failures = 0
            elif not self.d.stop.is_set():
                self.failures += 1
                delay = min(MAX_BACKOFF, self.mirror.retry_delay * 2 ** self.failures) * random.uniform(0.5, 1.5)
                log.warning("%s: next attempt in %.0f s", self.mirror.name, delay)
                timer = threading.Timer(delay, self.request)
                timer.daemon = True
                timer.start()


class Daemon:
    def __init__(self, config_path: Path | None, verbosity: int = 0) -> None:
        self.config_path = config_path
        self.verbosity = verbosity  # -v's count minus -q's, on top of [node] log_level
        self.cfg: Config = configmod.load(config_path)
        logs.set_level(logs.level_for(self.cfg.node.log_level, verbosity))
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_wanted = False
        self.dirty: set[bytes] = set()
        self.dirty_lock = threading.Lock()
        self.first_event = 0.0
        self.last_event = 0.0
        self.workers: dict[str, MirrorWorker] = {}
        self.slots = threading.BoundedSemaphore(self.cfg.node.parallel_pushes)
        self.observer = None
        self.scheduler = None
        self.watching = False
        self.scans = 0
        self.next_full_scan = 0.0
        self.metrics = None
        self.release_gate = ReleaseGate(self._release_refused)

    # -- life ----------------------------------------------------------------

    def run(self) -> int:
        node = self.cfg.node
        node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        try:
            daemon_lock = StateLock(node.state_dir, "daemon", name="daemon.lock").acquire()
        except LockedError as err:
            raise LockedError(f"another syncd daemon runs on this state_dir: {err}") from None
        self.manifest = Manifest.open(node.state_dir, node.name)
        self.primary = self.manifest.get_meta("upstream") is None
        if node.metrics_listen:
            self.metrics = Metrics(node.name)
            try:
                self.metrics.serve(node.metrics_listen)
            except OSError as err:
                daemon_lock.release()
                raise SyncdError(f"[node] metrics_listen {node.metrics_listen}: cannot listen: "
                                 f"{err.strerror or err}") from err
            self.metrics.generation.set(self.manifest.generation)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            if self.primary:
                self._full_scan()
                self._start_watch()
            self._start_workers()
            self._start_scheduler()
            self._request_all()
            role = "primary, watching root" if self.watching else ("primary, periodic scans" if self.primary
                                                                   else f"mirror of {self.manifest.get_meta('upstream')}")
            log.info("%s: daemon ready (%s), %d downstream(s)", node.name, role, len(self.workers))
            notify.ready(f"{role}; generation {self.manifest.generation}")
            self._loop()
        finally:
            notify.stopping()
            self._shutdown()
            self.manifest.close()
            daemon_lock.release()
        return 0

    def _loop(self) -> None:
        beat = notify.watchdog_interval()
        next_beat = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            timeout = 1.0
            if self.dirty:
                timeout = min(timeout, max(0.0, self._due() - now))
            if beat:
                timeout = min(timeout, max(0.0, next_beat - now))
            self.wake.wait(timeout)
            self.wake.clear()
            if self.stop.is_set():
                break
            if self.reload_wanted:
                self.reload_wanted = False
                self._reload()
            now = time.monotonic()
            if self.dirty and now >= self._due():
                self._scan_dirty()
            if self.primary and now >= self.next_full_scan:
                self._full_scan()
            if beat and now >= next_beat:
                notify.watchdog()
                next_beat = now + beat

    def _due(self) -> float:
        return min(self.last_event + self.cfg.node.watch_debounce, self.first_event + WATCH_MAX_DELAY)

    def _on_term(self, signum: int, _frame: object) -> None:
        log.info("%s: stopping (%s)", self.cfg.node.name, signal.Signals(signum).name)
        self.stop.set()
        self.wake.set()

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self.reload_wanted = True
        self.wake.set()

    def _shutdown(self) -> None:
        self.stop.set()
        if self.observer is not None:
            # watchdog's emitter logs an ERROR when stopped mid-read: not ours to report.
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            self.observer.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for w in self.workers.values():
            w.finish()
        deadline = time.monotonic() + STOP_GRACE
        for w in self.workers.values():
            w.join(max(0.0, deadline - time.monotonic()))
        if self.observer is not None:
            self.observer.join(max(0.0, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.stop()

    # -- scanning ---------------------------------------------------------------

    def _scan(self, dirs: set[bytes] | None) -> None:
        node = self.cfg.node
        before = self.manifest.generation
        with StateLock(node.state_dir, "daemon scan", wait=60.0):
            result = scan_node(self.cfg, self.manifest, dirs=dirs)
        self.scans += 1
        if self.metrics is not None:
            self.metrics.scanned(self.manifest.generation)
        # One line per scan, changes or none: the log shows the daemon at work.
        what = "full scan" if dirs is None else f"scan of {len(dirs)} dir(s)"
        log.info("%s: %s: %s", node.name, what, result.summary())
        if self.manifest.generation != before:
            notify.status(f"generation {self.manifest.generation}")
            self._request_all()

    def _full_scan(self) -> None:
        self.next_full_scan = time.monotonic() + self.cfg.node.scan_interval
        try:
            self._scan(None)
        except SyncdError as err:
            log.error("%s", err)

    def _scan_dirty(self) -> None:
        with self.dirty_lock:
            dirs, self.dirty = self.dirty, set()
        try:
            self._scan(dirs)
        except SyncdError as err:
            log.error("%s", err)
            with self.dirty_lock:
                self.dirty |= dirs  # tried again with the next events or scan

    def mark_dirty(self, rel_dirs: list[bytes]) -> None:
        now = time.monotonic()
        with self.dirty_lock:
            if not self.dirty:
                self.first_event = now
            self.dirty.update(rel_dirs)
            self.last_event = now
        self.wake.set()

    def _start_watch(self) -> None:
        if not self.cfg.node.watch:
            log.warning("%s: watch = no: scanning root every %.0f s instead of watching it",
                        self.cfg.node.name, self.cfg.node.scan_interval)
            return
        # watchdog warns when a directory is re-created under an old watch; it copes.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.")

        handler = _Handler(self, os.fsencode(os.path.abspath(self.cfg.node.root)))
        observer = Observer()
        observer.schedule(handler, str(self.cfg.node.root), recursive=True)
        try:
            observer.start()
        except OSError as err:
            # Typically the inotify watch limit (fs.inotify.max_user_watches).
            log.warning(
                "%s: cannot watch %s (%s): scanning it every %.0f s instead",
                self.cfg.node.name, self.cfg.node.root, err.strerror or err, self.cfg.node.scan_interval,
            )
            return
        self.observer = observer
        self.watching = True

    # -- pushing ----------------------------------------------------------------

    def _start_workers(self) -> None:
        self.workers = {m.name: MirrorWorker(self, m) for m in self.cfg.mirrors}
        for w in self.workers.values():
            w.start()

    def _request_all(self, *, full: bool = False) -> None:
        # A primary does not push a generation whose own index group fails
        # its checks; the next scan that changes the tree checks again.
        if self.primary and not self.release_gate.allows(self.cfg, self.manifest):
            return
        for w in self.workers.values():
            w.request(full=full)

    def _release_refused(self, generation: int, err: SyncdError) -> None:
        log.error("%s", err)
        notify.status(f"generation {generation} not pushed: its own checks failed")

    def pushed(self, worker: MirrorWorker, result: PushResult) -> None:
        # One line per push.  (run --once prints its results instead: a
        # failed push was said twice when push_with_retries logged it too.)
        (log.info if result.ok else log.error)("%s", result.summary())
        if self.metrics is not None:
            self.metrics.pushed(result, self.manifest.generation)
        # A failed tier-1 hands its edges (mirrors with via = it) to us.
        if not result.ok:
            for w in self.workers.values():
                if w.mirror.via == worker.mirror.name:
                    w.request()

    def _start_scheduler(self) -> None:
        sched = BackgroundScheduler(daemon=True)
        for m in self.cfg.mirrors:
            sched.add_job(self._reconcile, CronTrigger.from_crontab(m.schedule), args=[m.name],
                          id=f"reconcile-{m.name}", coalesce=True, max_instances=1, misfire_grace_time=300)
        schedule = getattr(self.cfg.verify, "schedule", None)
        if schedule:
            sched.add_job(self._verify, CronTrigger.from_crontab(schedule), id="verify",
                          coalesce=True, max_instances=1, misfire_grace_time=3600)
        sched.start()
        self.scheduler = sched

    def _reconcile(self, name: str) -> None:
        if self.primary:
            self._full_scan()
        worker = self.workers.get(name)
        if worker is not None:
            worker.request(full=True)

    def _verify(self) -> None:
        # Its own process: a verify of a big tree must not hold up pushes.
        args = [sys.executable, "-m", "syncd", "-c", str(self.cfg.path), "verify"]
        if not self.primary:
            args.append("--repair")
        proc = subprocess.run(args, capture_output=True, text=True)
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        (log.info if proc.returncode == 0 else log.error)("%s: scheduled verify: %s", self.cfg.node.name, summary)

    # -- reload -----------------------------------------------------------------

    def _reload(self) -> None:
        notify.reloading()
        try:
            new = configmod.load(self.config_path)
        except ConfigError as err:
            log.error("reload refused, keeping the running config: %s", err)
            notify.ready("reload refused; old config kept")
            return
        if (new.node.root, new.node.state_dir, new.node.name) != (self.cfg.node.root, self.cfg.node.state_dir,
                                                                  self.cfg.node.name):
            log.error("reload: [node] name, root and state_dir take effect only at a restart; other changes applied")
            new = configmod.Config(path=new.path, node=self.cfg.node, mirrors=new.mirrors, verify=new.verify)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for w in self.workers.values():
            w.finish()
        for w in self.workers.values():
            w.join(STOP_GRACE)
        self.cfg = new
        logs.set_level(logs.level_for(new.node.log_level, self.verbosity))
        self.slots = threading.BoundedSemaphore(new.node.parallel_pushes)
        self._start_workers()
        self._start_scheduler()
        self._request_all()
        log.info("%s: config reloaded from %s: %d downstream(s)", new.node.name, new.path, len(self.workers))
        notify.ready(f"reloaded; generation {self.manifest.generation}")


class _Handler:
    """watchdog events to dirty directories (relative to root)."""

    def __init__(self, daemon: Daemon, root: bytes) -> None:
        self.d = daemon
        self.root = root

    def dispatch(self, event) -> None:  # noqa: ANN001 - watchdog's FileSystemEvent
        if event.event_type in ("opened", "closed_no_write"):
            return
        dirs = []
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if not p:
                continue
            path = os.fsencode(p)
            if path == self.root:
                continue
            if not path.startswith(self.root + b"/"):
                continue
            rel = path[len(self.root) + 1:]
            dirs.append(rel.rpartition(b"/")[0])
            if event.is_directory and event.event_type in ("created", "moved"):
                dirs.append(rel)
        if dirs:
            self.d.mark_dirty(dirs)


def run_daemon(config_path: Path | None, verbosity: int = 0) -> int:
    return Daemon(config_path, verbosity).run()
