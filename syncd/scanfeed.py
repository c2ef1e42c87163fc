"""The rows of a running full scan, handed to the pushes that start before it ends.

:class:`ScanFeed` is the meeting point of ``syncd.scan`` (which puts rows
in) and the pushes of ``run --once`` (which take them): a bounded queue per
streaming push, a replay for a push that has not decided yet, and the
scan's end (its ``ScanResult``) or its failure for everyone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

#: How many batches of rows (syncd.scan.FEED_BATCH each) a pusher that
#: streams may have waiting before the scan waits for it (bounded memory).
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
        self._result: Any = None  # the scan's ScanResult, once it finished
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

    def finish(self, result: Any) -> None:
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

    def wait(self) -> Any:
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
