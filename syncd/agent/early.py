"""What goes live before the commit: new directories, and new data files.

Both are what a held-back generation would publish as well, so nothing
served can see them early: an empty directory nothing refers to yet, and a
data file (not in the index group) at a path the edge does not have.  Each
thread has a SafeRoot of its own (the main thread's caches directory fds),
and records the directories it changes (touched.TouchedDirs) before it
changes them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from ..errors import UnsafePathError
from ..fsops import SafeRoot
from ..manifest import fspath
from ..messages import Row
from ..plan import IndexMatcher, depth
from .plan import Plan, is_index, object_uses
from .staged import Staging
from .touched import TouchedDirs

log = logging.getLogger(__package__)

# New data files published while the push still arrives: in batches of at
# least this many (or what came within the wait), one syncfs each.
EARLY_PUBLISH_BATCH = 64
EARLY_PUBLISH_WAIT = 0.05


class DirMaker(threading.Thread):
    """Makes the directories a push adds while the main thread goes on planning.

    Allocating the directories' inodes in the one-threaded commit was a
    share of an initial copy (docs/performance.md, "The agent").  An empty directory
    that nothing served refers to yet may appear early: a held-back
    generation makes the new directories live as well.  What fails here is
    left to the commit, which makes the directory itself and reports why it
    cannot.
    """

    def __init__(self, root: bytes | str, touched: TouchedDirs) -> None:
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
                self._make(root, batch)

    def _make(self, root: SafeRoot, batch: list[tuple[bytes, int]]) -> None:
        try:
            self.touched.add(path for path, _ in batch)
        except OSError as err:
            log.debug("new directories left to the commit (%s)", err)
            return
        for path, mode in batch:
            if self.cancelled:
                break
            try:
                root.ensure_dir(path, mode)
            except (OSError, UnsafePathError) as err:
                log.debug("%s: left to the commit (%s)", fspath(path), err)
            else:
                self.made.add(path)

    def finish(self, *, cancel: bool = False) -> set[bytes]:
        """Wait for the directories queued so far (with ``cancel``, make no
        more of them); the ones made."""
        self.cancelled = cancel
        self.queue.put(None)
        self.join()
        return self.made


class EarlyPublisher(threading.Thread):
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
    """

    def __init__(self, root: bytes | str, staging: Staging, touched: TouchedDirs) -> None:
        super().__init__(name="early-publish", daemon=True)
        self.root = root
        self.staging = staging
        self.touched = touched
        self._cond = threading.Condition()
        self._ready: list[tuple[str, Row]] = []
        self._stopping = False
        self.published: dict[bytes, os.stat_result] = {}  # path -> its stat once published

    def offer(self, items: list[tuple[str, Row]]) -> None:
        with self._cond:
            self._ready += items
            self._cond.notify()

    def run(self) -> None:
        with SafeRoot(self.root) as root:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    # Recorded before the syncfs: durable before the renames it announces.
                    self.touched.add(row.path for _, row in batch)
                    self.staging.sync()
                except OSError:
                    continue  # the commit meets it again and says so; the rest waits in staging
                for obj, row in batch:
                    try:
                        self.published[row.path] = root.publish(self.staging.fd, obj.encode(), row.path)
                    except (OSError, UnsafePathError) as err:
                        # Left to the commit, which also replaces a file
                        # standing where a directory goes (and says why not).
                        log.debug("%s: published at the commit (%s)", fspath(row.path), err)

    def _next_batch(self) -> list[tuple[str, Row]] | None:
        """What is ready (None: stopped, and nothing is)."""
        with self._cond:
            while not self._ready and not self._stopping:
                self._cond.wait()
            if not self._ready:
                return None
            # A few at a time are not worth a syncfs each: gather a moment.
            deadline = time.monotonic() + EARLY_PUBLISH_WAIT
            while not self._stopping and len(self._ready) < EARLY_PUBLISH_BATCH:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._ready = self._ready, []
            return batch

    def finish(self) -> dict[bytes, os.stat_result]:
        """Publish what was offered, stop; the paths published."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join()
        return self.published


class Early:
    """The session's publishing before the commit: one directory maker and
    one early publisher per push, started when there is work for them."""

    def __init__(self, root: bytes | str, staging: Staging, touched: TouchedDirs, index: IndexMatcher) -> None:
        self.root = root
        self.staging = staging
        self.touched = touched
        self.index = index
        self._maker: DirMaker | None = None  # started at a push's first new directory
        self._publisher: EarlyPublisher | None = None  # started at entries_end (see the class)
        self._rows: dict[str, Row] = {}  # object -> the row it may go live as early
        self._lock = threading.Lock()

    # -- directories ---------------------------------------------------------------------

    def make_dir(self, path: bytes, mode: int) -> None:
        """A new directory of the plan, made while the planning goes on."""
        if self._maker is None:
            self._maker = DirMaker(self.root, self.touched)
            self._maker.start()
        self._maker.queue.put((path, mode))

    def dirs_made(self, *, cancel: bool = False) -> set[bytes]:
        """Wait for the directories queued (with ``cancel``: make no more); the ones made."""
        maker, self._maker = self._maker, None
        if maker is None:
            return set()
        return maker.finish(cancel=cancel)

    def unmake_dirs(self, root: SafeRoot, made: set[bytes]) -> None:
        """A push that ends without its commit takes back the new directories
        made for it (empty ones only, deepest first).  After a kill -9 they
        stay, empty, and the next push uses them."""
        made = self.dirs_made(cancel=True) | made
        try:
            self.touched.add(made)  # already, as the maker made them; unless that failed
        except OSError:
            pass  # the next push makes them again, and records their parents first
        for path in sorted(made, key=depth, reverse=True):
            root.remove_empty_dir(path)

    # -- data files ------------------------------------------------------------------------

    def publish_fresh(self, plan: Plan) -> None:
        """The plan is complete and its deletions pass the guard: its new
        data files go live as they are staged (those staged already, at once)."""
        uses = object_uses(plan.files)
        eligible: dict[str, Row] = {}
        for row in plan.files:
            obj = row.sha256.hex()
            if (uses[obj] == 1 and row.path in plan.fresh and self.staging.wanted_meta(row.path) is not None
                    and row.link is None and not is_index(self.index, row)):
                eligible[obj] = row
        if not eligible:
            return
        self._publisher = EarlyPublisher(self.root, self.staging, self.touched)
        self._publisher.start()
        ready = []
        with self._lock:
            self._rows = eligible
            for obj in [o for o in eligible if self.staging.applied(o) is not None]:  # staged already
                row = eligible.pop(obj)
                if self.staging.applied(obj) == (row.mode, row.mtime_ns):
                    ready.append((obj, row))
        if ready:
            self._publisher.offer(ready)

    def staged(self, obj: str) -> None:
        """In a staging thread: ``obj`` is staged, hashed and has its final
        mode and mtime; it goes live early if the plan allows it."""
        if not self._rows:
            return
        with self._lock:
            row = self._rows.pop(obj, None)
            publisher = self._publisher
        if row is not None and publisher is not None and self.staging.applied(obj) == (row.mode, row.mtime_ns):
            publisher.offer([(obj, row)])

    def stop_publishing(self) -> dict[bytes, os.stat_result]:
        """No more early publishing in this push; the paths published early."""
        with self._lock:
            self._rows = {}
        publisher, self._publisher = self._publisher, None
        return publisher.finish() if publisher is not None else {}

