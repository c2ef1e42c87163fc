"""Plan and pipelined send of one generation to one downstream.

The downstream's agent says which generation it holds; the rows stamped
after it are the changes (O(changes)), or, when it holds none or an
impossible one, every live row (a full comparison).  Rows go out in batches
without waiting; the agent answers each batch with what it needs (whole,
delta with its signature, or nothing: it already has the bytes, or copies
them from a file it has with the same SHA-256), and the files go out as the
answers come, several batches in flight.  At the end one round trip commits.

A reader thread drains the agent's answers so that neither side can block
the other on a full channel.

Hard links: the rows come from the manifest with their file's group (its
names, the first of them in path order), and an ``entries`` batch names the
rows that are one of several names of a file (``links``); the first name
comes first in the push, and carries the bytes, if any go.  The agent links
the other names to it.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from . import import_in_background
from . import plan as planmod
from .config import Config, MirrorConfig
from .errors import (
    ConnectionLostError,
    StoppedError,
    ProtocolError,
    RemoteError,
    SyncdError,
    error_from_wire,
)
from .filters import Filter
from .manifest import KIND_DIR, KIND_FILE, KIND_LETTERS, Entry, Manifest, fspath
from .plan import COMPRESSED_SUFFIXES
from .protocol import PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
# ... or fewer, so that an entries message stays well inside the 4 MiB frame
# limit with long names (4,096 bytes each: a row's path and symlink target,
# and the first name of its hard-link group).
BATCH_BYTES = 2 << 20
BATCHES_IN_FLIGHT = 4
OPEN_IMPORT_WAIT = 1.0  # s: Link.open_in_background waits at most this for its thread's import
# While a scan feeds the rows, the pusher looks at the agent's answers this
# often when no rows are ready: the files they ask for go out meanwhile.
FEED_POLL = 0.005
CHUNK = 1 << 20
# zstd pays only where it shrinks the bytes noticeably; the sample decides.
# Files up to this size travel together, in bundles of about BUNDLE_BYTES
# ("files", protocol 1.1): one message and one stream for many small files.
BUNDLE_FILE_MAX = 64 * 1024
BUNDLE_BYTES = 1 << 20
BUNDLE_FILES = 512
ZSTD_LEVEL = 1
ZSTD_MIN_GAIN = 0.9
# A delta against a basis the agent chose by name or size goes only when
# samples of the new file find its blocks (_delta_pays).
PAYS_SAMPLES = 16
PAYS_MIN = 2
PAYS_SAMPLE_MIN = 64 << 10


@dataclass
class PushResult:
    mirror: str
    generation: int
    held_before: int | None = None
    full: bool = False
    fed: bool = False  # the rows came from this node's scan while it ran
    ok: bool = False
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    files_sent: int = 0
    items: list[planmod.Item] = field(default_factory=list)
    seconds: float = 0.0
    attempts: int = 0
    # The downstream's own downstreams, as it reported them (cascade).
    below: list["PushResult"] = field(default_factory=list)
    # A failover push: this mirror is normally served by ``via``, which failed.
    failover_from: str | None = None

    def tree_ok(self) -> bool:
        return self.ok and all(r.tree_ok() for r in self.below)

    def to_wire(self) -> dict:
        return {
            "mirror": self.mirror, "ok": self.ok, "generation": self.generation,
            "held_before": self.held_before, "error": self.error, "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent, "ms": round(self.seconds * 1000), "attempts": self.attempts,
            "summary": self.summary(), "failover_from": self.failover_from,
            "below": [r.to_wire() for r in self.below],
        }

    @classmethod
    def from_wire(cls, raw: Any, depth: int = 0) -> "PushResult":
        if not isinstance(raw, dict) or depth > 16:
            raise ProtocolError("cascaded: a result is not a dict (or nests too deep)")
        r = cls(mirror=str(raw.get("mirror")), generation=int(raw.get("generation") or 0))
        r.ok = raw.get("ok") is True
        r.held_before = raw.get("held_before") if isinstance(raw.get("held_before"), int) else None
        r.error = raw.get("error") if isinstance(raw.get("error"), str) else None
        r.files_sent = int(raw.get("files_sent") or 0)
        r.bytes_sent = int(raw.get("bytes_sent") or 0)
        r.seconds = int(raw.get("ms") or 0) / 1000
        r.attempts = int(raw.get("attempts") or 0)
        r.failover_from = raw.get("failover_from") if isinstance(raw.get("failover_from"), str) else None
        r._summary = raw.get("summary") if isinstance(raw.get("summary"), str) else None
        r.below = [cls.from_wire(b, depth + 1) for b in raw.get("below") or []]
        return r

    def report(self, indent: str = "") -> list[str]:
        """One line per mirror of the subtree, tier by tier."""
        lines = [indent + self.summary()]
        for r in self.below:
            lines += r.report(indent + "  ")
        return lines

    def counts(self) -> dict[str, int]:
        return planmod.summarize(self.items)

    def summary(self) -> str:
        if getattr(self, "_summary", None):
            return self._summary
        prefix = f"(failover: {self.failover_from} failed) " if self.failover_from else ""
        return prefix + self._own_summary()

    def _own_summary(self) -> str:
        if not self.ok:
            return f"{self.mirror}: FAILED after {self.attempts} attempt(s): {self.error}"
        c = self.counts()
        held = "none" if self.held_before is None else str(self.held_before)
        what = ", ".join(f"{n} {k}" for k, n in c.items() if n) or "nothing to do"
        how = " (full comparison, fed by the scan)" if self.fed else " (full comparison)" if self.full else ""
        return (
            f"{self.mirror}: generation {held} -> {self.generation}{how}: "
            f"{what}; {self.files_sent} files, {self.bytes_sent} bytes sent, {self.bytes_received} received "
            f"in {self.seconds:.2f} s"
        )


def filter_rules(cfg: Config, mirror: MirrorConfig) -> list[str]:
    """The rules a push to ``mirror`` sends in ``begin`` (their order: Config.filter_rules)."""
    return cfg.filter_rules(mirror)


def _quoting(err: SyncdError, tail: str) -> SyncdError:
    """``err`` with the agent's last stderr line quoted, unless that line
    says what ``err`` says already (the agent logs the error it sends)."""
    last = tail.splitlines()[-1]
    said = last.partition(": ")[2]
    if said and said in str(err):
        return type(err)(str(err))
    return type(err)(f"{err} (agent stderr: {last})")


class _TokenBucket:
    """A send rate limit in bytes per second, with one second of burst."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.last = time.monotonic()

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


class _SignatureArrived:
    """In the inbox: the signature stream ``stream`` is complete."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream


class _Channel:
    """Frames both ways over a session; a thread reads the agent's answers."""

    def __init__(self, session: Any, bwlimit: int = 0) -> None:
        self.session = session
        self.sent = 0
        self.received = 0
        bucket = _TokenBucket(bwlimit) if bwlimit else None

        def send_all(data: Any) -> None:
            n = memoryview(data).nbytes
            if bucket is not None:
                bucket.take(n)
            self.sent += n
            session.send_all(data)

        def recv(n: int) -> bytes:
            data = session.recv(n)
            self.received += len(data)
            return data

        self.writer = FrameWriter(send_all)
        self.reader = FrameReader(recv)
        self.version = PROTOCOL_VERSION  # what both sides speak, set by the handshake
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[int, list[bytes]] = {}
        self.signatures: dict[int, bytes] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read_loop, name="push-reader", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            for frame in self.reader:
                if frame.kind is FrameType.MESSAGE:
                    if not isinstance(frame.payload, dict) or not isinstance(frame.payload.get("type"), str):
                        raise ProtocolError("the agent sent a MESSAGE without a 'type'")
                    self.inbox.put(frame.payload)
                elif frame.kind is FrameType.DATA:
                    self.streams.setdefault(frame.stream, []).append(frame.payload)
                else:
                    self.signatures[frame.stream] = b"".join(self.streams.pop(frame.stream, []))
                    # 1.3: it may follow the needs naming it; the main thread
                    # hears of it in order with the messages.
                    self.inbox.put(_SignatureArrived(frame.stream))
            self.inbox.put(ConnectionLostError("the agent closed the connection"))
        except BaseException as err:  # handed to the main thread, which raises it
            self.inbox.put(err)

    def next_message(self, timeout: float | None = None) -> dict:
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionLostError(f"no answer from the agent in {timeout:.0f} s") from None
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, _SignatureArrived):
            return item
        if item.get("type") == "error":
            raise error_from_wire(item)
        return item


class Link:
    """A session to one mirror's agent, opened on first use and kept between pushes.

    The daemon keeps one per downstream, and a cascading agent one per
    downstream of its own for as long as its own session lasts: a push then
    costs neither an SSH handshake nor the start of a remote interpreter.
    Anything that goes wrong mid-push drops the link (``drop``); the next
    push opens a new one.
    """

    def __init__(self, mirror: MirrorConfig, open_session: Callable[[MirrorConfig], Any] | None = None) -> None:
        self.mirror = mirror
        # None: syncd.transport's, imported by the first open (paramiko's
        # import, 0.06 s, then runs in open_in_background's thread).
        self._open_session = open_session
        self._session: Any = None
        self._ch: _Channel | None = None
        self.stderr_tail = ""
        self._opener: threading.Thread | None = None
        self._early_error: BaseException | None = None

    def open_in_background(self) -> None:
        """Start the SSH handshake and the agent now, in a thread: ``run
        --once`` overlaps them with its scan.  The first :meth:`channel`
        waits for it, and raises what it met (once: a retry opens anew).

        Returns once the thread has imported the transport (paramiko, about
        0.06 s): the caller's own imports and scan, which want the GIL as
        much, would stretch that import and the handshake after it.  On a
        new connection's path that is the whole run's: measured, the TCP
        connect came at 0.09-0.11 s instead of 0.12-0.13 s, and a no-op
        ``run --once`` over 11,000 entries took 0.389 s instead of 0.421 s
        (medians of 10 alternations).
        """
        imported = threading.Event()

        def opener() -> None:
            try:
                self._session_opener()
                imported.set()
                self.channel()
            except BaseException as err:  # handed to channel()
                self._early_error = err
            finally:
                imported.set()

        self._opener = threading.Thread(target=opener, name=f"connect-{self.mirror.name}", daemon=True)
        self._opener.start()
        imported.wait(OPEN_IMPORT_WAIT)

    def _session_opener(self) -> Callable[[MirrorConfig], Any]:
        """The function that opens a session: syncd.transport's unless one was given."""
        if self._open_session is None:
            from .transport import open_session

            self._open_session = open_session
        return self._open_session

    def channel(self) -> _Channel:
        if self._opener is not None and self._opener is not threading.current_thread():
            opener, self._opener = self._opener, None
            opener.join()
            err, self._early_error = self._early_error, None
            if err is not None:
                raise err
        if self._ch is None:
            self.stderr_tail = ""  # what an earlier session said is not this one's
            session = self._session_opener()(self.mirror)
            try:
                ch = _Channel(session, self.mirror.bwlimit)
                ch.writer.hello()
                ch.writer.flush()
                ch.version = negotiate(PROTOCOL_VERSION, ch.reader.read_hello())
                ch.start()
            except BaseException as err:
                session.close()
                tail = session.stderr_tail().strip() if hasattr(session, "stderr_tail") else ""
                if isinstance(err, (ProtocolError, ConnectionLostError)) and tail:
                    self.stderr_tail = ""  # quoted here; run() must not quote it again
                    # An agent that could not start says why (a broken config
                    # on the mirror, a missing root): quote its last line.
                    raise _quoting(err, tail) from err
                raise
            self._session, self._ch = session, ch
        return self._ch

    def close(self) -> None:
        """End the session politely (``bye``), as at a daemon's stop or reload."""
        if self._opener is not None:
            # Still connecting (run --once's scan failed first): let it finish,
            # so that the session it opens is closed here, not left behind.
            self._opener.join(self.mirror.connect_timeout + 5)
            self._opener = None
            self._early_error = None
        if self._ch is not None:
            try:
                self._ch.writer.message({"type": "bye"})
                self._ch.writer.flush()
            except (OSError, SyncdError):
                pass
        self.drop()

    def drop(self) -> None:
        if self._session is not None:
            if hasattr(self._session, "stderr_tail"):
                self.stderr_tail = self._session.stderr_tail().strip()
            self._session.close()
        self._session = self._ch = None


class Pusher:
    """One push of ``manifest``'s current generation to ``mirror``."""

    def __init__(
        self,
        cfg: Config,
        mirror: MirrorConfig,
        manifest: Manifest,
        *,
        dry_run: bool = False,
        force_deletes: bool = False,
        open_session: Callable[[MirrorConfig], Any] | None = None,
        on_item: Callable[[str, planmod.Item], None] | None = None,
        cascade: bool = True,
        force_full: bool = False,
        stop: threading.Event | None = None,
        feed: Any = None,
        stream: bool = True,
    ) -> None:
        self.cascade = cascade
        self.stream = stream  # False: this mirror fell behind a feed once, and waits for the scan's end
        # A syncd.scan.ScanFeed: this node is scanning meanwhile.  A mirror
        # that holds nothing is sent the rows as the scan finds them; any
        # other push waits for the scan's end.
        self.feed = feed
        self.force_full = force_full
        self.stop = stop
        self.cfg = cfg
        self.mirror = mirror
        self.manifest = manifest
        self.dry_run = dry_run
        self.force_deletes = force_deletes
        self.rules = filter_rules(cfg, mirror)
        self.filter = Filter.parse(self.rules)
        self.root = os.fsencode(os.path.abspath(cfg.node.root))
        self.on_item = on_item
        self._open_session = open_session  # None: Link's default
        # path -> (first name, names) of the rows read but not yet sent: one batch's worth
        self._links: dict[bytes, tuple[bytes, int]] = {}

    def run(self, result: PushResult, link: "Link | None" = None) -> None:
        """One push; over ``link`` when given (kept open afterwards), else over
        a session of its own, closed at the end."""
        started = time.monotonic()
        own = link is None
        if own:
            link = Link(self.mirror, self._open_session)
        self.keep_open = not own
        try:
            ch = link.channel()
            sent, received = ch.sent, ch.received
            try:
                self._session(ch, result)
            finally:
                result.bytes_sent += ch.sent - sent
                result.bytes_received += ch.received - received
            if not self.keep_open and not own:
                link.drop()  # the agent ended its session (a dry run's abort)
        except BaseException as err:
            link.drop()  # a push that did not end cleanly leaves the link unusable
            if isinstance(err, (ProtocolError, ConnectionLostError)) and link.stderr_tail:
                # An agent that died says why on its stderr: quote its last line.
                raise _quoting(err, link.stderr_tail) from err
            raise
        finally:
            if own:
                link.drop()
            result.seconds += time.monotonic() - started

    # -- the session -------------------------------------------------------------------

    def _session(self, ch: _Channel, result: PushResult) -> None:
        w = ch.writer
        # On a kept link too: the agent's welcome says what it holds now
        # (another upstream, a failover, may have pushed to it meanwhile).
        w.message({"type": "hello", "node": self.cfg.node.name, "mirror": self.mirror.name})
        w.flush()
        welcome = ch.next_message(self.mirror.io_timeout)
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            got = welcome.get("type") if isinstance(welcome, dict) else "a signature stream"
            raise ProtocolError(f"expected 'welcome', got {got!r}")
        held = welcome.get("generation")
        if welcome.get("repair"):
            log.warning("%s: reports findings of 'syncd verify --repair': full comparison", self.mirror.name)
        if held is not None and (not isinstance(held, int) or isinstance(held, bool)):
            raise ProtocolError("welcome: generation is not an integer")
        downstreams = welcome.get("downstreams") or []
        features = welcome.get("features")
        # Optional keys the agent takes (docs/protocol.md section 4): sparse
        # payloads, resuming a file from the offset it offers, hard-link groups.
        self.features = {f for f in features if isinstance(f, str)} if isinstance(features, list) else set()
        if self.feed is not None:
            sub = None
            if held is None and ch.version >= (1, 4) and not self.force_full and self.stream:
                sub = self.feed.subscribe()
            else:
                self.feed.decline()
            if sub is not None:
                self._streamed(ch, result, sub)
                self._pushed(ch, result, downstreams)
                return
            self.feed.wait()  # the scan's end, then as without a feed
        target = self.manifest.generation
        result.generation = target
        result.held_before = held
        # A scheduled reconcile compares everything, repairing drift that no
        # generation lists (hand edits, bit rot caught by the edge's stat data).
        full = held is None or held > target or self.force_full
        result.full = full
        if held == target and not full:
            result.ok = True
            self._cascade(ch, result, downstreams)
            return

        # numpy and the delta encoder (0.07 s), imported while the agent
        # plans: its first "needs" may ask for a delta.
        importer = None if self.dry_run else import_in_background("syncd.delta")
        try:
            rows = self._grouped(self.manifest.push_rows(None if full else held, self._keep()))
            self._plan_and_send(ch, result, rows, target, full)
        finally:
            if importer is not None:
                importer.join()  # never cut off by the interpreter's exit mid-import
        self._pushed(ch, result, downstreams)

    def _pushed(self, ch: _Channel, result: PushResult, downstreams: list) -> None:
        result.ok = True
        if not self.dry_run:  # a dry run's abort ended the agent's session
            self._cascade(ch, result, downstreams)

    def _streamed(self, ch: _Channel, result: PushResult, sub: Any) -> None:
        """A full comparison fed by the running scan (protocol 1.4).

        ``begin`` names no generation: the scan has not committed one yet.
        The rows go out as the scan hands them over, and the agent's answers
        are served in between, so files flow while the tree is still being
        walked and hashed; ``commit`` names the generation the scan made.
        Nothing is published before entries_end, and a scan that fails (or
        a release it refuses) ends the push with nothing published.
        """
        result.full = result.fed = True
        try:
            self._plan_and_send(ch, result, self._fed_rows(ch, result, sub), None, True)
        finally:
            self.feed.leave(sub)

    def _fed_rows(self, ch: _Channel, result: PushResult, sub: Any) -> Iterator[Any]:
        feed = self.feed
        pending = False  # rows yielded since the last _CUT
        while True:
            while not ch.inbox.empty():  # answers that came meanwhile: their files go now
                self._outstanding -= self._handle(ch, result, expect="needs")
            rows = feed.take(sub, FEED_POLL)
            if rows is None:
                self._check_stop()
                if pending:  # the scan is busy hashing: what came goes now
                    pending = False
                    yield _CUT
                continue
            if not rows:
                break
            pending = True
            for row in rows:
                entry = Entry(*row)
                if self._hardlinks and entry.nlink > 1 and entry.kind != KIND_DIR and not entry.deleted:
                    continue  # its group is known once the scan is over: sent last, below
                yield entry
        if self._hardlinks:
            # The scan has committed: the files of several names go now,
            # grouped by the manifest, each group's first name first.
            yield _CUT
            yield from self._grouped(self.manifest.push_rows(None, self._keep(), linked_only=True))

    def _wire_size(self, entry: Entry) -> int:
        """About what ``entry`` adds to its entries message, at most."""
        link = self._links.get(entry.path)
        return 128 + len(entry.path) + len(entry.target or b"") + (len(link[0]) if link else 0)

    def _keep(self) -> Callable[[bytes], bool] | None:
        """Which names count in a hard-link group: those the mirror's filter lets through."""
        if not self.filter:
            return None
        return lambda path: not self.filter.excluded_path(path, False)

    @property
    def _hardlinks(self) -> bool:
        """Whether this push names hard-link groups: the agent takes them."""
        return "hardlinks" in self.features

    def _grouped(self, rows: Iterable[tuple[Entry, bytes | None, int]]) -> Iterator[Entry]:
        """The entries of ``rows``, their groups kept aside for the batch that sends them
        (for an agent that takes no groups, every name goes as a file of its own)."""
        links = self._links
        for entry, first, names in rows:
            if first is not None and self._hardlinks:
                links[entry.path] = (first, names)
            yield entry

    def _plan_and_send(self, ch: _Channel, result: PushResult, rows: Iterable[Entry], target: int | None,
                       full: bool) -> None:
        w = ch.writer
        begin = {
            "type": "begin", "generation": target, "full": full, "dry_run": self.dry_run,
            "filter": self.rules, "max_delete_ppm": round(self.cfg.node.max_delete * 1_000_000),
            "force_deletes": self.force_deletes,
        }
        if "fuzzy" in self.features:
            # A new file may be answered need "later" (its basis is looked for
            # in the rest of the plan) and named again in "planned".
            begin["fuzzy"] = True
        if self._hardlinks:
            # Each batch names its rows of several names ("links"): the
            # others are files of one name.
            begin["hardlinks"] = True
        if "itemize" in self.features and self.on_item is not None:
            begin["itemize"] = True  # each item then carries rsync's %i
        w.message(begin)
        # Entries are kept only while their batch is in flight or their file
        # is unacknowledged: memory follows the window, not the tree.
        self._by_path: dict[bytes, Entry] = {}
        self._batch_paths: dict[int, list[bytes]] = {}
        self._unacked: set[bytes] = set()
        self._retried: set[bytes] = set()
        self._sig_waiting: dict[int, Entry] = {}  # 1.3: delta items whose signature is still coming
        self._resume: dict[bytes, int] = {}  # path -> the offset the agent offered to resume from
        self._read_buf = memoryview(bytearray(CHUNK))  # a sparse file's data is read into it
        self._later: set[bytes] = set()  # need "later": named again in "planned"
        self._basis: dict[bytes, bytes] = {}  # a delta against another file of the edge: path -> that file
        self._bundle: list[Entry] = []
        self._bundle_bytes = 0
        # The bundle's bytes, read straight into place (no bytes object per
        # file, no join per bundle); reused once a bundle is sent, which
        # the writer does before it returns.
        self._bundle_buf = bytearray(BUNDLE_BYTES + BUNDLE_FILE_MAX + 1)
        self.awaiting = 0
        self._outstanding = 0  # entries batches not yet answered
        batch_no = 0
        links = self._links
        for batch in _batches(self._filtered(rows), BATCH_ROWS, self._wire_size):
            self._check_stop()
            batch_no += 1
            msg = {"type": "entries", "batch": batch_no, "rows": [_wire(e) for e in batch]}
            if links:
                msg["links"] = [[i, *links.pop(e.path)] for i, e in enumerate(batch) if e.path in links]
            w.message(msg)
            for e in batch:
                self._by_path[e.path] = e
            self._batch_paths[batch_no] = [e.path for e in batch]
            self._outstanding += 1
            w.flush()
            while self._outstanding >= BATCHES_IN_FLIGHT:
                self._outstanding -= self._handle(ch, result, expect="needs")
        w.message({"type": "entries_end"})
        w.flush()
        if target is None:  # fed by the scan, which has now committed
            target = result.generation = self.feed.wait().generation
        while self._outstanding:
            self._outstanding -= self._handle(ch, result, expect="needs")
        while self._handle(ch, result, expect="planned") == 0:
            pass
        if self._later:
            raise ProtocolError(f"the agent never asked for {fspath(next(iter(self._later)))} again")
        while self.awaiting:
            self._handle(ch, result, expect="acks")
        if self.dry_run:
            w.message({"type": "abort"})
            w.flush()
            self.keep_open = False  # abort ends the agent's session (no cascade either)
            return
        commit = {"type": "commit", "generation": target}
        root = self.manifest.root_row()
        if root is not None:
            # The root's own mode and mtime: in every commit, not only when
            # they changed, since the agent puts them back after each
            # publish into root (and an edge whose manifest predates the
            # root's row has never had them).
            commit["root"] = _wire(root)
        w.message(commit)
        w.flush()
        while True:
            msg = self._next(ch)
            if isinstance(msg, dict) and msg["type"] == "committed":
                break
            self._dispatch(ch, result, msg)

    def _cascade(self, ch: _Channel, result: PushResult, downstreams: list) -> None:
        """Have the downstream push on to its own downstreams, and wait for their report.

        Asked even when the downstream already held the generation: the
        push's promise is the whole tree below, and a subtree may be behind.
        """
        w = ch.writer
        if downstreams and not self.dry_run and self.cascade:
            w.message({"type": "cascade"})
            w.flush()
            while True:
                msg = self._next(ch)  # "cascading" heartbeats keep io_timeout from firing
                if isinstance(msg, _SignatureArrived):
                    continue  # one no item asked for: nothing to do
                if msg["type"] == "cascaded":
                    result.below = [PushResult.from_wire(r) for r in msg.get("results") or []]
                    break
                if msg["type"] != "cascading":
                    raise ProtocolError(f"expected 'cascaded', got {msg['type']!r}")
        if not self.keep_open:
            w.message({"type": "bye"})
            w.flush()

    def _next(self, ch: _Channel) -> dict:
        return ch.next_message(self.mirror.io_timeout)

    def _handle(self, ch: _Channel, result: PushResult, *, expect: str) -> int:
        """Handle one message; returns 1 when it is the kind the caller waits for."""
        msg = self._next(ch)
        self._dispatch(ch, result, msg)
        kind = msg["type"] if isinstance(msg, dict) else None
        if expect == "needs":
            return 1 if kind == "needs" else 0
        if expect == "planned":
            return 1 if kind == "planned" else 0
        return 1

    def _dispatch(self, ch: _Channel, result: PushResult, msg: Any) -> None:
        if isinstance(msg, _SignatureArrived):
            entry = self._sig_waiting.pop(msg.stream, None)
            if entry is not None:  # else the needs naming it is still to come
                self.awaiting -= 1
                self._send_file(ch, result, entry, "delta", ch.signatures.pop(msg.stream))
                ch.writer.flush()
            return
        kind = msg["type"]
        if kind in ("needs", "planned"):
            self._resume_offers(msg.get("resume"))
            for raw in msg.get("items") or []:
                self._item(ch, result, raw)
            self._bundle_flush(ch, result)
            ch.writer.flush()
            batch = msg.get("batch")
            for path in self._batch_paths.pop(batch, []) if isinstance(batch, int) else []:
                if path not in self._unacked and path not in self._later:
                    self._by_path.pop(path, None)
        elif kind == "staged":
            paths = msg.get("paths") if "paths" in msg else [msg.get("path")]
            if not isinstance(paths, list):
                raise ProtocolError("staged: paths is not a list")
            for path in paths:
                self.awaiting -= 1
                self._unacked.discard(path)
                self._by_path.pop(path, None)
        elif kind == "failed":
            path = msg.get("path")
            entry = self._by_path.get(path) if isinstance(path, bytes) else None
            if entry is None or not msg.get("retry_whole") or path in self._retried:
                raise RemoteError(f"agent could not stage {fspath(path or b'?')}: {msg.get('error')}")
            self._retried.add(path)
            self._basis.pop(path, None)
            for stream, waiting in list(self._sig_waiting.items()):
                if waiting.path == path:  # its signature will not come (1.3)
                    del self._sig_waiting[stream]
            log.warning("%s: %s; sending it whole", self.mirror.name, msg.get("error"))
            self.awaiting -= 1
            self._send_file(ch, result, entry, "whole", None)
            ch.writer.flush()
        else:
            raise ProtocolError(f"unexpected message {kind!r} from the agent")

    def _resume_offers(self, offers: Any) -> None:
        """A needs' ``resume``: files sent whole may start at these offsets
        (the agent holds their prefixes, checked again whole at the end)."""
        if offers is None or "resume" not in self.features:
            return
        if not isinstance(offers, list):
            raise ProtocolError("needs: resume is not a list")
        for offer in offers:
            if (not isinstance(offer, list) or len(offer) != 2 or not isinstance(offer[0], bytes)
                    or not isinstance(offer[1], int) or isinstance(offer[1], bool) or offer[1] <= 0):
                raise ProtocolError("needs: a resume offer is not [path bytes, offset int > 0]")
            self._resume[offer[0]] = offer[1]

    def _item(self, ch: _Channel, result: PushResult, raw: Any) -> None:
        if not isinstance(raw, list) or len(raw) not in (5, 6):
            raise ProtocolError("needs: an item is not a list of 5 or 6 fields")
        action, path, need, source, sig_stream = raw[:5]
        if action not in planmod.ACTIONS or not isinstance(path, bytes):
            raise ProtocolError(f"needs: bad item {raw!r:.80}")
        entry = self._by_path.get(path)
        if need == "later":
            # Its item comes in "planned", once the agent has the whole plan
            # to look for a basis in.
            if entry is None or entry.kind != KIND_FILE or path in self._later:
                raise ProtocolError(f"needs: {fspath(path)} put off, which is not a file in this push")
            self._later.add(path)
            return
        self._later.discard(path)
        known = entry is not None and not entry.deleted
        try:
            item = planmod.Item.from_wire(raw, entry.size if entry else 0, KIND_LETTERS[entry.kind] if known else None,
                                          entry.target if known else None)
        except ValueError as err:
            raise ProtocolError(f"needs: {fspath(path)}: {err}") from None
        result.items.append(item)
        if self.on_item is not None:
            self.on_item(self.mirror.name, item)
        if need is None or self.dry_run:
            return
        if entry is None or entry.kind != KIND_FILE:
            raise ProtocolError(f"the agent asked for {fspath(path)}, which is not a file in this push")
        if need == "copy":
            # The agent copies it from a file it has (1.2) and acknowledges
            # it like a file sent; if that copy fails, it asks for it whole.
            self.awaiting += 1
            self._unacked.add(path)
            return
        signature = None
        if need == "delta":
            if sig_stream not in ch.signatures:
                if ch.version < (1, 3) or not isinstance(sig_stream, int) or isinstance(sig_stream, bool):
                    raise ProtocolError(f"no signature arrived for {fspath(path)}")
                if sig_stream in self._sig_waiting:
                    raise ProtocolError(f"needs: signature stream {sig_stream} named twice")
                # 1.3: it follows; the delta starts when it is complete.
                self._sig_waiting[sig_stream] = entry
                if isinstance(source, bytes) and source != path:
                    self._basis[path] = source
                self.awaiting += 1
                self._unacked.add(path)
                return
            signature = ch.signatures.pop(sig_stream)
            if isinstance(source, bytes) and source != path:
                self._basis[path] = source
        elif need != "whole":
            raise ProtocolError(f"needs: unknown need {need!r}")
        elif entry.size <= BUNDLE_FILE_MAX and ch.version >= (1, 1):
            self._bundle_add(ch, result, entry)
            return
        self._send_file(ch, result, entry, need, signature)

    # -- small files travel together ("files", protocol 1.1) -----------------------------

    def _open_source(self, entry: Entry) -> int:
        """An fd on the file to send, still the regular file of the scan's size."""
        try:
            fd = os.open(self.root + b"/" + entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise SyncdError(
                f"{fspath(entry.path)}: cannot read on this node ({err.strerror}); rescan and push again"
            ) from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            os.close(fd)
            raise SyncdError(f"{fspath(entry.path)}: changed since the last scan; rescan and push again")
        return fd

    def _bundle_add(self, ch: _Channel, result: PushResult, entry: Entry) -> None:
        start = self._bundle_bytes
        fd = self._open_source(entry)
        try:
            # One byte more than the scan saw: a file grown since is caught.
            with memoryview(self._bundle_buf) as buf:
                got = os.preadv(fd, [buf[start:start + entry.size + 1]], 0)
        finally:
            os.close(fd)
        if got != entry.size:
            raise SyncdError(f"{fspath(entry.path)}: changed since the last scan; rescan and push again")
        self._bundle.append(entry)
        self._bundle_bytes += got
        if self._bundle_bytes >= BUNDLE_BYTES or len(self._bundle) >= BUNDLE_FILES:
            self._bundle_flush(ch, result)

    def _bundle_flush(self, ch: _Channel, result: PushResult) -> None:
        bundle, size = self._bundle, self._bundle_bytes
        self._bundle, self._bundle_bytes = [], 0
        if not bundle:
            return
        self._check_stop()
        self._stream = getattr(self, "_stream", 0) + 1
        stream = self._stream
        with memoryview(self._bundle_buf) as buf:
            self._send_bundle(ch, stream, bundle, buf[:size])
        for e in bundle:
            self._sent(result, e)

    def _send_bundle(self, ch: _Channel, stream: int, bundle: list[Entry], payload: Any) -> None:
        how = "whole"
        if any(not e.path.lower().endswith(COMPRESSED_SUFFIXES) for e in bundle) and \
                self._maybe_zstd(b"", payload[: 256 * 1024]):
            import zstandard

            packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload)
            if len(packed) < ZSTD_MIN_GAIN * len(payload):
                payload, how = packed, "zstd"
        w = ch.writer
        w.message({"type": "files", "stream": stream, "how": how,
                   "items": [[e.path, e.size, e.sha256] for e in bundle]})
        w.data(stream, payload)
        w.end(stream)

    def _sent(self, result: PushResult, entry: Entry) -> None:
        """A file is on its way: its acknowledgement is awaited."""
        result.files_sent += 1
        self.awaiting += 1
        self._unacked.add(entry.path)

    def _send_file(self, ch: _Channel, result: PushResult, entry: Entry, need: str, signature: bytes | None) -> None:
        from .sparse import data_extents, has_holes, payload

        w = ch.writer
        self._stream = getattr(self, "_stream", 0) + 1
        stream = self._stream
        fd = self._open_source(entry)
        try:
            header: dict[str, Any] = {"type": "file", "stream": stream, "path": entry.path, "size": entry.size,
                                      "sha256": entry.sha256}
            # Holes are not sent: only where the agent takes a sparse payload.
            sparse = "sparse" in self.features and has_holes(os.fstat(fd))
            if sparse:
                header["sparse"] = True
            sig = None
            if need == "delta":
                from .delta import decode_signature

                sig = decode_signature(signature)
                basis = self._basis.pop(entry.path, None)
                if basis is not None and not _delta_pays(sig, fd, entry.size):
                    log.debug("%s: %s shares too little with %s on the mirror; sending it whole",
                             self.mirror.name, fspath(entry.path), fspath(basis))
                    sig = None
            if sig is not None:
                from .delta import iter_delta

                w.message(dict(header, how="delta"))
                for piece in iter_delta(sig, _chunks(fd)):
                    self._check_stop()
                    w.data(stream, piece)
                    if len(piece) < CHUNK:
                        # Mostly copy ops, standing for megabytes: sent now,
                        # the edge rebuilds while the rest is matched.
                        w.flush()
            else:
                # A retry after a failure (retry_whole) starts from 0: its offer was used.
                offset = self._resume.pop(entry.path, 0)
                if not 0 <= offset <= entry.size:
                    raise ProtocolError(f"needs: resume of {fspath(entry.path)} at {offset}, "
                                        f"beyond its {entry.size} bytes")
                if offset:
                    header["offset"] = offset
                    log.info("%s: %s resumed from byte %d of %d", self.mirror.name, fspath(entry.path),
                             offset, entry.size)
                if sparse:
                    first_data = next(data_extents(fd, offset, entry.size), (offset, 0))[0]
                    first = os.pread(fd, CHUNK, first_data)
                    pieces: Iterable[Any] = payload(fd, offset, entry.size, self._read_buf, name=fspath(entry.path))
                else:
                    first = os.pread(fd, CHUNK, offset)
                    pieces = itertools.chain([first], _chunks(fd, offset + len(first)))
                packed = self._maybe_zstd(entry.path, first)
                if packed is None:
                    w.message(dict(header, how="whole"))
                    for chunk in pieces:
                        self._check_stop()
                        w.data(stream, chunk)
                else:
                    w.message(dict(header, how="zstd"))
                    import zstandard

                    cobj = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
                    for chunk in pieces:
                        self._check_stop()
                        out = cobj.compress(chunk)
                        if out:
                            w.data(stream, out)
                    w.data(stream, cobj.flush())
            w.end(stream)
        finally:
            os.close(fd)
        self._sent(result, entry)

    def _check_stop(self) -> None:
        # Checked between chunks (1 MiB at most): a stop ends the session at
        # once; the agent publishes nothing more of an uncommitted generation
        # (new data files may be live already) and discards the partial file.
        if self.stop is not None and self.stop.is_set():
            raise StoppedError(f"{self.mirror.name}: push stopped (the daemon is shutting down)")

    @staticmethod
    def _maybe_zstd(path: bytes, sample: bytes) -> bool | None:
        # Under 4 KiB the bytes saved do not pay for the attempt.
        if len(sample) < 4096 or path.lower().endswith(COMPRESSED_SUFFIXES):
            return None
        import zstandard

        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(sample[: 256 * 1024])
        return True if len(packed) < ZSTD_MIN_GAIN * min(len(sample), 256 * 1024) else None

    def _filtered(self, rows: Iterable[Entry]) -> Iterator[Entry]:
        if not self.filter:
            yield from rows
            return
        for e in rows:
            if e is _CUT or not self.filter.excluded_path(e.path, e.kind == 1):
                yield e




def _wire(e: Entry) -> list:
    return [e.path, e.kind, e.size, e.mtime_ns, e.mode, e.sha256, e.target, e.deleted, e.generation]


_CUT = object()  # among fed rows: send the batch so far, the next rows are a while away


def _batches(rows: Iterable[Any], n: int, size: Callable[[Any], int] | None = None,
             budget: int = BATCH_BYTES) -> Iterator[list[Entry]]:
    """Batches of at most ``n`` rows, and of at most ``budget`` bytes as
    ``size`` counts them; a _CUT among the rows ends a batch early."""
    batch: list[Entry] = []
    used = 0
    for row in rows:
        if row is _CUT:
            if batch:
                yield batch
                batch, used = [], 0
            continue
        if size is not None:
            used += size(row)
            if batch and used > budget:
                yield batch
                batch, used = [], size(row)
        batch.append(row)
        if len(batch) >= n:
            yield batch
            batch, used = [], 0
    if batch:
        yield batch


def _delta_pays(sig: Any, fd: int, size: int) -> bool:
    """Whether a delta against ``sig``'s file, a basis the agent chose by
    its name or size, saves enough to send: a block of it is found in at
    least PAYS_MIN of PAYS_SAMPLES samples spread evenly over the new file
    (a few milliseconds: 16 samples of 64 KiB for a 64 MiB file).  Unrelated
    data then goes whole, zstd-compressed where that pays, instead of as a
    delta of literals that costs the search and compresses nothing."""
    from .delta import samples_matching

    length = min(size, max(PAYS_SAMPLE_MIN, 8 * sig.block_size))
    count = 1 if size <= length else PAYS_SAMPLES
    offsets = [i * (size - length) // max(1, count - 1) for i in range(count)]
    found = samples_matching(sig, (os.pread(fd, length, offset) for offset in offsets))
    return found >= min(PAYS_MIN, count)


def _chunks(fd: int, offset: int = 0) -> Iterator[bytes]:
    while True:
        chunk = os.pread(fd, CHUNK, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def push_tree(
    cfg: Config,
    manifest: Manifest,
    *,
    mirrors: Iterable[MirrorConfig] | None = None,
    dry_run: bool = False,
    force_deletes: bool = False,
    on_item: Callable[[str, planmod.Item], None] | None = None,
    cascade: bool = True,
    links: dict[str, Link] | None = None,
    feed: Any = None,
    force_full: bool = False,
) -> list[PushResult]:
    """Push to every direct downstream at once (each cascading to its subtree).

    Siblings run concurrently (at most ``parallel_pushes``): one that fails or
    hangs does not hold back the others.  A mirror with ``via = T`` is an edge
    normally served by T; it is pushed to directly only while T fails
    (failover), and left to T again once T succeeds.

    With ``feed`` (a syncd.scan.ScanFeed), this node is still scanning: see
    :class:`Pusher`.
    """
    from concurrent.futures import ThreadPoolExecutor

    chosen = list(mirrors if mirrors is not None else cfg.mirrors)
    direct = [m for m in chosen if not m.via]
    standby = [m for m in chosen if m.via]

    def one(m: MirrorConfig) -> PushResult:
        link = None
        if links is not None:
            link = links.get(m.name)
            if link is None or link.mirror != m:
                if link is not None:
                    link.close()  # the mirror's settings changed: a new session
                link = links[m.name] = Link(m)
        return push_with_retries(cfg, m, manifest, dry_run=dry_run, force_deletes=force_deletes,
                                 on_item=on_item, cascade=cascade, link=link, feed=feed, force_full=force_full)

    with ThreadPoolExecutor(max_workers=max(1, cfg.node.parallel_pushes), thread_name_prefix="push") as pool:
        results = list(pool.map(one, direct))
        failed = {r.mirror for r in results if not r.ok}
        takeover = [m for m in standby if m.via in failed]
        for m in takeover:
            log.warning("%s: %s failed; pushing to %s directly (failover)", cfg.node.name, m.via, m.name)
        for m, r in zip(takeover, pool.map(one, takeover)):
            r.failover_from = m.via
            results.append(r)
    return results


def push_with_retries(
    cfg: Config,
    mirror: MirrorConfig,
    manifest: Manifest,
    *,
    dry_run: bool = False,
    force_deletes: bool = False,
    on_item: Callable[[str, planmod.Item], None] | None = None,
    open_session: Callable[[MirrorConfig], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cascade: bool = True,
    force_full: bool = False,
    stop: threading.Event | None = None,
    link: Link | None = None,
    feed: Any = None,
) -> PushResult:
    """Push, retrying a lost connection with exponential backoff and jitter.

    A retry resumes: what the agent staged survives the lost session, and it
    does not ask for those bytes again.  Anything but a lost connection (a
    bad host key, a refusal by the agent) is final at once.  With ``feed``,
    a scan that fails ends the push, which then records nothing: the run
    reports the scan's error.
    """
    from .scan import FeedClosed, FeedLeft

    result = PushResult(mirror=mirror.name, generation=manifest.generation)
    stream = True
    attempt = 0
    while attempt < mirror.retries:
        attempt += 1
        result.attempts = attempt
        result.items = []
        result.below = []
        result.fed = False
        try:
            Pusher(cfg, mirror, manifest, dry_run=dry_run, force_deletes=force_deletes,
                   on_item=on_item, open_session=open_session, cascade=cascade,
                   force_full=force_full, stop=stop, feed=feed, stream=stream).run(result, link)
            break
        except FeedClosed as err:
            return _not_pushed(result, err)
        except FeedLeft:
            # It fell behind while another push waited for the scan: pushed
            # again once the scan is over (what it staged is not sent again).
            log.info("%s: pushing after the scan (the rows came faster than it took them)", mirror.name)
            stream = False
            attempt -= 1
            continue
        except SyncdError as err:
            result.error = str(err)
            if not err.retryable or attempt == mirror.retries or (stop is not None and stop.is_set()):
                break
            delay = min(mirror.retry_delay * 2 ** (attempt - 1), 60.0) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; retry %d of %d in %.1f s", mirror.name, err, attempt, mirror.retries - 1, delay)
            if stop is not None:
                if stop.wait(delay):
                    break
            else:
                sleep(delay)
    if feed is not None:
        # The scan's write transaction is open until it ends: the row
        # recorded below would wait for it.
        try:
            scanned = feed.wait()
        except FeedClosed as err:
            return _not_pushed(result, err)
        if not result.ok:
            result.generation = scanned.generation  # the one it failed to push
    if not dry_run:
        now = time.time_ns()
        if result.ok:
            manifest.record_downstream(
                mirror.name, generation=result.generation, acked_ns=now, last_success_ns=now,
                last_error=None, bytes_sent=result.bytes_sent, files_sent=result.files_sent,
            )
        else:
            manifest.record_downstream(mirror.name, last_error=result.error, last_error_ns=now)
    if result.ok:
        result.error = None
    return result


def _not_pushed(result: PushResult, err: BaseException) -> PushResult:
    """The scan feeding this push failed: nothing of it is recorded (the run
    reports the scan's own error)."""
    result.ok = False
    result.error = f"not pushed: this node's scan failed ({err.args[0] if err.args else err})"
    return result


__all__ = ["Link", "PushResult", "Pusher", "push_tree", "push_with_retries", "filter_rules"]
