"""One push of a generation to one downstream: plan and pipelined send.

The downstream's agent says which generation it holds; the rows stamped
after it are the changes (O(changes)), or, when it holds none or an
impossible one, every live row (a full comparison).  Rows go out in batches
without waiting; the agent answers each batch with what it needs (whole,
delta with its signature, or nothing: it already has the bytes, or copies
them from a file it has with the same SHA-256), and the files go out as the
answers come, several batches in flight.  At the end one round trip commits.

Hard links: the rows come from the manifest with their file's group (its
names, the first of them in path order), and an ``entries`` batch names the
rows that are one of several names of a file (``links``); the first name
comes first in the push, and carries the bytes, if any go.  The agent links
the other names to it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .. import import_in_background
from .. import plan as planmod
from ..config import Config, MirrorConfig
from ..errors import ConnectionLostError, ProtocolError, RemoteError, StoppedError
from ..filters import Filter
from ..manifest import KIND_DIR, KIND_FILE, KIND_LETTERS, Entry, Manifest, fspath
from ..messages import Item as WireItem
from ..messages import Row
from ..scanfeed import ScanFeed
from .link import Channel, Link, SignatureArrived, quoting_stderr
from .result import PushResult, filter_rules
from .send import BUNDLE_FILE_MAX, FileSender
from .window import Window

log = logging.getLogger(__package__)

BATCH_ROWS = 1000
# ... or fewer, so that an entries message stays well inside the 4 MiB frame
# limit with long names (4,096 bytes each: a row's path and symlink target,
# and the first name of its hard-link group).
BATCH_BYTES = 2 << 20
BATCHES_IN_FLIGHT = 4
# While a scan feeds the rows, the pusher looks at the agent's answers this
# often when no rows are ready: the files they ask for go out meanwhile.
FEED_POLL = 0.005


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
        feed: ScanFeed | None = None,
        follow_feed: bool = True,
    ) -> None:
        self.cascade = cascade
        # A syncd.scan.ScanFeed: this node is scanning meanwhile.  A mirror
        # that holds nothing is sent the rows as the scan finds them; any
        # other push waits for the scan's end.
        self.feed = feed
        # False: this mirror fell behind a feed once, and waits for the scan's end.
        self.follow_feed = follow_feed
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
        # False once the agent ended its session itself (a dry run's abort),
        # or when the push opened a session of its own.
        self.keep_open = True
        # Optional keys the agent takes (docs/protocol.md section 4), from
        # its welcome: sparse payloads, resuming a file from the offset it
        # offers, hard-link groups.
        self.features: set[str] = set()
        # Made at ``begin``: what is in flight, and the sender of the files.
        self.window: Window | None = None
        self.sender: FileSender | None = None

    def run(self, result: PushResult, link: Link | None = None) -> None:
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
                raise quoting_stderr(err, link.stderr_tail) from err
            raise
        finally:
            if own:
                link.drop()
            result.seconds += time.monotonic() - started

    # -- the session -------------------------------------------------------------------

    def _session(self, ch: Channel, result: PushResult) -> None:
        held, downstreams = self._welcome(ch)
        if self.feed is not None:
            sub = None
            if held is None and ch.version >= (1, 4) and not self.force_full and self.follow_feed:
                sub = self.feed.subscribe()
            else:
                self.feed.decline()
            if sub is not None:
                self._push_fed(ch, result, sub)
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

        # numpy and the delta encoder, imported while the agent plans: its
        # first "needs" may ask for a delta.
        importer = None if self.dry_run else import_in_background("syncd.delta")
        try:
            rows = self._grouped(self.manifest.push_rows(None if full else held, self._keep()))
            self._plan_and_send(ch, result, rows, target, full)
        finally:
            if importer is not None:
                importer.join()  # never cut off by the interpreter's exit mid-import
        self._pushed(ch, result, downstreams)

    def _welcome(self, ch: Channel) -> tuple[int | None, list]:
        """Say hello; the generation the agent holds, and its downstreams."""
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
        self.features = {f for f in features if isinstance(f, str)} if isinstance(features, list) else set()
        return held, downstreams

    def _pushed(self, ch: Channel, result: PushResult, downstreams: list) -> None:
        result.ok = True
        if not self.dry_run:  # a dry run's abort ended the agent's session
            self._cascade(ch, result, downstreams)

    def _push_fed(self, ch: Channel, result: PushResult, sub: Any) -> None:
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

    def _fed_rows(self, ch: Channel, result: PushResult, sub: Any) -> Iterator[Any]:
        feed = self.feed
        pending = False  # rows yielded since the last _CUT
        while True:
            while not ch.inbox.empty():  # answers that came meanwhile: their files go now
                self.window.outstanding -= self._handle(ch, result, expect="needs")
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

    # -- plan and send -------------------------------------------------------------------

    def _plan_and_send(self, ch: Channel, result: PushResult, rows: Iterable[Entry], target: int | None,
                       full: bool) -> None:
        self._begin(ch, target, full)
        w = ch.writer
        window = self.window
        links = self._links
        for batch in _batches(self._filtered(rows), BATCH_ROWS, self._wire_size):
            self._check_stop()
            batch_no = window.add_batch(batch)
            msg = {"type": "entries", "batch": batch_no, "rows": [Row.wire(e) for e in batch]}
            if links:
                msg["links"] = [[i, *links.pop(e.path)] for i, e in enumerate(batch) if e.path in links]
            w.message(msg)
            w.flush()
            while window.outstanding >= BATCHES_IN_FLIGHT:
                window.outstanding -= self._handle(ch, result, expect="needs")
        w.message({"type": "entries_end"})
        w.flush()
        if target is None:  # fed by the scan, which has now committed
            target = result.generation = self.feed.wait().generation
        while window.outstanding:
            window.outstanding -= self._handle(ch, result, expect="needs")
        while self._handle(ch, result, expect="planned") == 0:
            pass
        if window.later:
            raise ProtocolError(f"the agent never asked for {fspath(next(iter(window.later)))} again")
        while window.awaiting:
            self._handle(ch, result, expect="acks")
        if self.dry_run:
            w.message({"type": "abort"})
            w.flush()
            self.keep_open = False  # abort ends the agent's session (no cascade either)
            return
        self._commit(ch, result, target)

    def _begin(self, ch: Channel, target: int | None, full: bool) -> None:
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
        ch.writer.message(begin)
        self.window = Window()
        self.sender = FileSender(ch, self.root, self.mirror.name, self.features, self._check_stop)

    def _commit(self, ch: Channel, result: PushResult, target: int) -> None:
        w = ch.writer
        commit = {"type": "commit", "generation": target}
        root = self.manifest.root_row()
        if root is not None:
            # The root's own mode and mtime: in every commit, not only when
            # they changed, since the agent puts them back after each
            # publish into root (and an edge whose manifest predates the
            # root's row has never had them).
            commit["root"] = Row.wire(root)
        w.message(commit)
        w.flush()
        while True:
            msg = self._next(ch)
            if isinstance(msg, dict) and msg["type"] == "committed":
                break
            self._dispatch(ch, result, msg)

    def _cascade(self, ch: Channel, result: PushResult, downstreams: list) -> None:
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
                if isinstance(msg, SignatureArrived):
                    continue  # one no item asked for: nothing to do
                if msg["type"] == "cascaded":
                    result.below = [PushResult.from_wire(r) for r in msg.get("results") or []]
                    break
                if msg["type"] != "cascading":
                    raise ProtocolError(f"expected 'cascaded', got {msg['type']!r}")
        if not self.keep_open:
            w.message({"type": "bye"})
            w.flush()

    # -- the agent's answers -------------------------------------------------------------

    def _next(self, ch: Channel) -> dict:
        return ch.next_message(self.mirror.io_timeout)

    def _handle(self, ch: Channel, result: PushResult, *, expect: str) -> int:
        """Handle one message; returns 1 when it is the kind the caller waits for."""
        msg = self._next(ch)
        self._dispatch(ch, result, msg)
        kind = msg["type"] if isinstance(msg, dict) else None
        if expect == "needs":
            return 1 if kind == "needs" else 0
        if expect == "planned":
            return 1 if kind == "planned" else 0
        return 1

    def _dispatch(self, ch: Channel, result: PushResult, msg: Any) -> None:
        window = self.window
        if isinstance(msg, SignatureArrived):
            entry = window.sig_waiting.pop(msg.stream, None)
            if entry is not None:  # else the needs naming it is still to come
                window.awaiting -= 1
                self._send_file(result, entry, "delta", ch.signatures.pop(msg.stream))
                ch.writer.flush()
            return
        kind = msg["type"]
        if kind in ("needs", "planned"):
            self._resume_offers(msg.get("resume"))
            for raw in msg.get("items") or []:
                self._item(ch, result, raw)
            self._sent_bundle(result, self.sender.bundle_flush())
            ch.writer.flush()
            window.answered(msg.get("batch"))
        elif kind == "staged":
            paths = msg.get("paths") if "paths" in msg else [msg.get("path")]
            if not isinstance(paths, list):
                raise ProtocolError("staged: paths is not a list")
            for path in paths:
                window.acked(path)
        elif kind == "failed":
            path = msg.get("path")
            entry = window.by_path.get(path) if isinstance(path, bytes) else None
            if entry is None or not msg.get("retry_whole") or path in window.retried:
                raise RemoteError(f"agent could not stage {fspath(path or b'?')}: {msg.get('error')}")
            window.retried.add(path)
            self.sender.forget_basis(path)
            window.forget_signature(path)
            log.warning("%s: %s; sending it whole", self.mirror.name, msg.get("error"))
            window.awaiting -= 1
            self._send_file(result, entry, "whole", None)
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
            self.sender.offer_resume(offer[0], offer[1])

    def _item(self, ch: Channel, result: PushResult, raw: Any) -> None:
        action, path, need, source, sig_stream, _flags = WireItem.from_wire(raw)
        window = self.window
        entry = window.by_path.get(path)
        if need == "later":
            # Its item comes in "planned", once the agent has the whole plan
            # to look for a basis in.
            if entry is None or entry.kind != KIND_FILE or path in window.later:
                raise ProtocolError(f"needs: {fspath(path)} put off, which is not a file in this push")
            window.later.add(path)
            return
        window.later.discard(path)
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
            window.expect_ack(path)
            return
        if need == "delta":
            self._delta_item(ch, result, entry, source, sig_stream)
        elif need != "whole":
            raise ProtocolError(f"needs: unknown need {need!r}")
        elif entry.size <= BUNDLE_FILE_MAX and ch.version >= (1, 1):
            self._sent_bundle(result, self.sender.bundle_add(entry))
        else:
            self._send_file(result, entry, need, None)

    def _delta_item(self, ch: Channel, result: PushResult, entry: Entry, source: Any, sig_stream: Any) -> None:
        """A delta the agent asked for: sent once its signature is here."""
        path = entry.path
        if sig_stream not in ch.signatures:
            if ch.version < (1, 3) or not isinstance(sig_stream, int) or isinstance(sig_stream, bool):
                raise ProtocolError(f"no signature arrived for {fspath(path)}")
            if sig_stream in self.window.sig_waiting:
                raise ProtocolError(f"needs: signature stream {sig_stream} named twice")
            # 1.3: it follows; the delta starts when it is complete.
            self.window.sig_waiting[sig_stream] = entry
            if isinstance(source, bytes) and source != path:
                self.sender.use_basis(path, source)
            self.window.expect_ack(path)
            return
        signature = ch.signatures.pop(sig_stream)
        if isinstance(source, bytes) and source != path:
            self.sender.use_basis(path, source)
        self._send_file(result, entry, "delta", signature)

    # -- the files -----------------------------------------------------------------------

    def _send_file(self, result: PushResult, entry: Entry, need: str, signature: bytes | None) -> None:
        self.sender.send_file(entry, need, signature)
        self._sent(result, entry)

    def _sent_bundle(self, result: PushResult, sent: list[Entry]) -> None:
        for e in sent:
            self._sent(result, e)

    def _sent(self, result: PushResult, entry: Entry) -> None:
        """A file is on its way: its acknowledgement is awaited."""
        result.files_sent += 1
        self.window.expect_ack(entry.path)

    def _check_stop(self) -> None:
        # Checked between chunks (1 MiB at most): a stop ends the session at
        # once; the agent publishes nothing more of an uncommitted generation
        # (new data files may be live already) and discards the partial file.
        if self.stop is not None and self.stop.is_set():
            raise StoppedError(f"{self.mirror.name}: push stopped (the daemon is shutting down)")

    def _filtered(self, rows: Iterable[Entry]) -> Iterator[Entry]:
        if not self.filter:
            yield from rows
            return
        for e in rows:
            if e is _CUT or not self.filter.excluded_path(e.path, e.kind == KIND_DIR):
                yield e


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
