"""A session of the push agent: the loop, the dispatch, the lock, the commit's order, the cascade.

The agent does every write on its host.  It reads each message through
syncd.messages (validated once there), plans each push as its rows arrive
(plan.Planner), stages the files the pusher sends (receive.Receiver), and at
``commit`` passes the whole generation through one gate (gate.Gate) before
it publishes it into root in the order of docs/design.md ("Publish order",
publish.Publisher).  New directories and new data files at new paths may go
live before, once it is safe (early.Early).  The manifest records the new
generation only after publishing.  A generation the gate refuses is held
back: only pure additions go live, the edge stays on its last good
generation, and the pusher gets an error.

Staged objects survive a killed session: a rerun finds them by content and
does not ask for them again; the temporaries of a killed session are
removed at the next one's start (syncd.staging.clean).  A file already
published by a killed session is recognized by size, mtime and a local
re-hash, so a rerun converges without resending it.

This node pushes on to its own downstreams (``cascade``) with the pusher
it is handed (``cascade``, from syncd.cli): the agent does not import the
pusher, which sits above it.

Messages are documented in docs/protocol.md, section 4.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from typing import Any, Callable

from .. import import_in_background
from ..config import Config
from ..errors import ProtocolError, SyncdError
from ..fsops import SafeRoot
from ..lock import StateLock
from ..manifest import META_REPAIR, Manifest
from ..messages import Begin, Cascade, Commit, Entries, EntriesEnd, File, Files, Hello, Message, decode, field_error
from ..plan import IndexMatcher
from ..protocol import PROTOCOL_VERSION, BodyPool, FrameReader, FrameType, negotiate
from ..session import stdio
from .early import Early
from .gate import Gate
from .plan import Plan, Planner
from .publish import Publisher
from .receive import BODY_BUFFERS, Receiver, as_error, send_error
from .signatures import Signatures
from .staged import Staging
from .touched import TouchedDirs
from .wire import LockedWriter

log = logging.getLogger(__package__)

# A second push into this node (a daemon's reconcile meeting a cascade) waits
# this long for the first to finish before it gives up.
AGENT_LOCK_WAIT = 120.0
# Seconds between "cascading" heartbeats while this node pushes to its subtree.
CASCADE_HEARTBEAT = 5.0
#: What this agent takes beyond the negotiated minor (its welcome's
#: ``features``, docs/protocol.md section 4): ``sparse`` payloads and holes
#: in a delta's result, ``resume`` offers in ``needs`` with the
#: ``file`` message's ``offset``, ``fuzzy``: begin's ``fuzzy``, with
#: new files put off to ``planned`` while their basis is looked for, and
#: ``hardlinks``: the groups a ``begin`` with ``hardlinks`` names in its
#: ``entries`` (``links``), and ``itemize``: rsync's %i in each item.
FEATURES = ("sparse", "resume", "fuzzy", "hardlinks", "itemize")

#: How this node pushes on to its own downstreams: ``push.push_tree``'s
#: signature, ``(cfg, manifest, links=...) -> [PushResult]``.
PushOn = Callable[..., list]


class Agent:
    """The remote end of a push: reads frames from ``recv``, writes answers through ``send_all``."""

    def __init__(self, cfg: Config, recv: Callable[[int], bytes], send_all: Callable[[Any], None],
                 recv_into: Callable[[memoryview], int] | None = None, *, cascade: PushOn | None = None) -> None:
        self.cfg = cfg
        self.cascade = cascade
        # DATA bodies go to the staging threads, which give each buffer back.
        self.bodies = BodyPool(limit=BODY_BUFFERS)
        self.reader = FrameReader(recv, recv_into=recv_into, bodies=self.bodies)
        self.writer = LockedWriter(send_all)

    def serve(self) -> int:
        self.writer.hello()
        self.writer.flush()
        version = negotiate(PROTOCOL_VERSION, self.reader.read_hello())
        self.cfg.node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        with Manifest.open(self.cfg.node.state_dir, self.cfg.node.name) as manifest:
            session = Session(self, manifest, version)
            try:
                return session.run()
            finally:
                session.close()


class Session:
    """One session's state on this node, from the handshake to the end of input."""

    def __init__(self, agent: Agent, manifest: Manifest, version: tuple[int, int]) -> None:
        cfg = self.cfg = agent.cfg
        self.reader = agent.reader
        self.writer = agent.writer
        self.bodies = agent.bodies
        self.cascade = agent.cascade
        self.version = version
        # The lock is taken per push (at begin) and let go at its end, not for
        # the session: an upstream daemon keeps its session to this node open
        # between pushes, and must not lock this node out meanwhile.
        self.lock = StateLock(cfg.node.state_dir, "agent", wait=AGENT_LOCK_WAIT)
        self.locked = False
        self.links: dict = {}  # this node's own downstreams, kept for the session (cascade)
        self.client = "?"  # the upstream's node name, from its hello
        self._importer: threading.Thread | None = None
        self._verify_importer: threading.Thread | None = None
        self.manifest = manifest
        self.lookup = manifest.reader()
        self.root = SafeRoot(cfg.node.root)
        self.staging = Staging(cfg.node.state_dir / "staging")
        self.staging.clean()
        self.touched = TouchedDirs(cfg.node.state_dir)  # loaded at begin, under the lock
        index = IndexMatcher(cfg.node.index_patterns)
        self.early = Early(cfg.node.root, self.staging, self.touched, index)
        self.receiver = Receiver(cfg.node.name, self.root, self.staging, self.writer, self.bodies,
                                 on_staged=self.early.staged)
        self.signatures = Signatures(self.writer, failed=self.receiver.failed, quiet=self._quiet)
        self.planner = Planner(cfg, self.lookup, self.root, self.staging, self.receiver, self.signatures,
                               self.early.make_dir, version)
        self.gate = Gate(cfg, manifest, self.root, self.staging, index)
        self.publisher = Publisher(cfg, manifest, self.lookup, self.root, self.staging, self.touched, index)

    def _quiet(self) -> bool:
        """Whether the session is ending, or failed: nothing more is sent from other threads."""
        return self.receiver.closing or self.receiver.failure is not None

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        try:
            while True:
                frame = self.reader.read_frame()
                if self.receiver.failure is not None:
                    return self.receiver.failure.exit_status  # a staging thread failed: logged and sent
                if frame is None:
                    return 0  # the client closed: a session without commit publishes nothing more
                if frame.kind is FrameType.MESSAGE:
                    done = self._message(decode(frame.payload))
                    self.writer.flush()
                    if done:
                        return 0
                elif frame.kind is FrameType.DATA:
                    self.receiver.data(frame.stream, frame.payload)
                else:
                    self.receiver.end(frame.stream)
        except SyncdError as err:
            if self.receiver.failure is not None:
                return self.receiver.failure.exit_status
            log.error("%s", err)
            send_error(self.writer, err)
            return err.exit_status
        except OSError as err:
            failure = as_error(err, self.cfg.node.name)
            log.error("%s", failure)
            send_error(self.writer, failure)
            return failure.exit_status

    def _message(self, msg: Message) -> bool:
        """Act on one message; True when it ends the session."""
        if isinstance(msg, Hello):
            self._hello(msg)
        elif isinstance(msg, Begin):
            self._begin(msg)
        elif isinstance(msg, Entries):
            self._entries(msg)
        elif isinstance(msg, EntriesEnd):
            self._entries_end()
        elif isinstance(msg, File):  # one file
            self.receiver.open(msg, self.planner.basis_of(msg.path))
        elif isinstance(msg, Files):  # a bundle of small ones (1.1)
            self.receiver.open(msg)
        elif isinstance(msg, Commit):
            self._commit(msg)
        elif isinstance(msg, Cascade):
            self._cascade()
        else:  # abort, bye
            return True
        return False

    def _hello(self, msg: Hello) -> None:
        held = self.manifest.get_meta("upstream_generation")
        if self._verify_importer is None:
            # syncd.verify is first needed at commit: imported from here on,
            # not before this end's hello (docs/performance.md, "Start-up").
            self._verify_importer = import_in_background("syncd.verify")
        if self._importer is None and held is not None:
            # numpy and the signature code for a push's first changed file:
            # imported from here on, while the upstream reads the welcome and
            # sends its first entries.  (A mirror without a generation decides at begin.)
            self._importer = import_in_background("syncd.delta")
        # Findings of `syncd verify --repair` are in rows no generation
        # will list: claiming no generation asks for a full comparison.
        repair = self.manifest.get_meta(META_REPAIR) is not None
        self.writer.message({
            "type": "welcome",
            "node": self.cfg.node.name,
            "generation": None if held is None or repair else int(held),
            "upstream": self.manifest.get_meta("upstream"),
            "repair": repair,
            # Its own downstreams: the pusher then asks it to cascade.
            "downstreams": [m.name for m in self.cfg.mirrors],
            # What it takes beyond the negotiated minor's messages (optional keys).
            "features": list(FEATURES),
        })
        self.client = msg.node if msg.node is not None else "?"

    def _in_push(self) -> bool:
        return bool(self.receiver.incoming or self.planner.plan.rows)

    # -- a push -----------------------------------------------------------------------------

    def _begin(self, msg: Begin) -> None:
        if self._in_push():
            raise ProtocolError("begin in the middle of a push")
        if msg.generation is None and self.version < (1, 4):
            raise field_error("begin", "generation", int)
        # No cyclic GC during a push, as in syncd.gc_paused (full collections
        # walked its rows in the commit); back on once it is committed.
        gc.disable()
        if not self.locked:
            self.lock.acquire()  # waits for another push into this node to end
            self.locked = True
        # Directory fds kept from an earlier push of this session may name
        # directories another session (or the operator) replaced since: walk
        # afresh from root, now that the lock keeps other writers out.
        self.root.forget()
        self.touched.load()  # directories a push cut short left with the wrong mtime
        self.early.stop_publishing()
        plan = self.planner.begin(msg)
        self.receiver.new_push()
        if not plan.dry_run and self._importer is None and not self.planner.began_empty:
            # numpy and the signature code, for the first changed file,
            # imported while the entries arrive.
            self._importer = import_in_background("syncd.delta")

    def _entries(self, msg: Entries) -> None:
        plan = self.planner.plan
        if plan.ended:
            raise ProtocolError("entries after entries_end")
        if msg.links is not None and not plan.hardlinks:
            raise ProtocolError("entries: links without a begin that announced them, or not a list")
        streamed = self.version >= (1, 3)
        try:
            items = self.planner.batch(msg.rows)
        except BaseException:
            self.signatures.send_all()  # to close their files
            raise
        if not streamed:
            self.signatures.send_all()  # before the needs that names them
        needs: dict[str, Any] = {"type": "needs", "batch": msg.batch, "items": [i.to_wire() for i in items]}
        offers = self.receiver.take_offers()
        if offers:
            needs["resume"] = offers
        self.writer.message(needs)
        if streamed:
            # 1.3: each signature follows the needs as soon as it is computed,
            # and the pusher starts that file's delta while the others are
            # still being read here.
            self.signatures.stream_all()
        # A copy's "staged" must not reach the pusher before the item asking for it.
        for row, sources in self.planner.take_copies():
            self.receiver.copy(row, sources)

    def _entries_end(self) -> None:
        """The plan is complete (in a full comparison, with the deletion of what was not listed)."""
        plan = self.planner.plan
        if plan.ended:
            raise ProtocolError("entries_end twice")
        items = self.planner.end()
        streamed = self.version >= (1, 3)
        if not streamed:
            self.signatures.send_all()  # before the planned that names them
        self.writer.message({"type": "planned", "items": [i.to_wire() for i in items]})
        if streamed:
            self.signatures.stream_all()
        # Not while signatures read the edge's old copies: those reads would
        # queue behind the writes (docs/performance.md, "The agent").
        if plan.files and not plan.dry_run and not plan.signatures:
            self.staging.sync_in_background()
        if plan.fresh and not plan.dry_run:
            try:  # a plan the guard will refuse changes nothing before it does
                plan.policy.check_deletions(plan.deletes, self.lookup.live_count)
            except SyncdError:
                return
            self.early.publish_fresh(plan)

    def _commit(self, msg: Commit) -> None:
        try:
            self._commit_locked(msg)
        finally:
            self._unlock()
            gc.enable()
            self.bodies.clear()  # the session may stay open, idle, until the next push

    def _commit_locked(self, msg: Commit) -> None:
        self._drain()
        plan = self.planner.plan
        try:
            self._check_commit(plan, msg)
            started = time.monotonic()
            # While the early publisher still works (its syncfs, mostly: the
            # last files staged are written out first), not after it: the
            # index group it never touches, and this session's objects are
            # trusted as hashed when written (docs/performance.md, "The agent").
            findings, corrupt = self.gate.check(plan)
        finally:
            plan.early = self.early.stop_publishing()
        if findings:
            error = self.publisher.hold_back(plan, findings, corrupt, self.client)
            self._end_push()
            raise error
        published = self.publisher.publish(plan, started, self.client)
        log.info(
            "generation %d from %s published: %d files, %d links, %d metadata, %d deleted in %.2f s",
            plan.generation, self.client, published, len(plan.links), len(plan.metas),
            len(plan.deletes), time.monotonic() - started,
        )
        self.writer.message({
            "type": "committed", "generation": plan.generation,
            "published": published, "deleted": len(plan.deletes),
        })
        self.writer.flush()
        self.publisher.free_parked_later()
        self._end_push()

    def _check_commit(self, plan: Plan, msg: Commit) -> None:
        """What ``commit`` asks for can be published: the generation begun,
        every file arrived, and the deletions within the guard."""
        if plan.generation is None:
            if msg.generation < 0:
                raise ProtocolError("commit: generation is negative")
            plan.generation = msg.generation
        elif msg.generation != plan.generation:
            raise ProtocolError("commit: generation differs from begin")
        if msg.root is not None:
            plan.root = msg.root
        if self.receiver.incoming:
            raise ProtocolError("commit while files are still arriving")
        if self.receiver.missing():
            raise ProtocolError(f"commit with {self.receiver.missing()} files never received")
        plan.policy.check_deletions(plan.deletes, self.lookup.live_count)

    def _drain(self) -> None:
        """Wait until every file handed to the staging threads is staged (or
        failed), and every new directory queued is made (or left to publish)."""
        self.receiver.drain()
        self.planner.plan.made_dirs |= self.early.dirs_made()
        if self.receiver.failure is not None:
            raise self.receiver.failure

    def _end_push(self) -> None:
        """The push is over: the next one starts from nothing."""
        self.planner.reset()
        self.receiver.new_push()

    def _unlock(self) -> None:
        if self.locked:
            self.lock.release()
            self.locked = False

    # -- the cascade ------------------------------------------------------------------------

    def _cascade(self) -> None:
        """Push this node's generation on to its own downstreams, and report the subtree.

        A heartbeat every few seconds tells the waiting upstream that the
        subtree is still being served (its io_timeout counts silence).
        """
        if self._in_push():
            raise ProtocolError("cascade in the middle of a push")
        if self.cascade is None:
            raise SyncdError(f"{self.cfg.node.name}: this agent was started without a pusher; it cannot cascade")
        done = threading.Event()
        lock = threading.Lock()

        def beat() -> None:
            while not done.wait(CASCADE_HEARTBEAT):
                with lock:
                    self.writer.message({"type": "cascading"})
                    self.writer.flush()

        beater = threading.Thread(target=beat, name="cascade-heartbeat", daemon=True)
        beater.start()
        try:
            results = self.cascade(self.cfg, self.manifest, links=self.links)
        finally:
            done.set()
            beater.join()
        self.manifest.set_meta("last_tree", json.dumps([r.to_wire() for r in results]))
        with lock:
            self.writer.message({"type": "cascaded", "results": [r.to_wire() for r in results]})

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """The session ends: what is under way stops, what is uncommitted goes back."""
        gc.enable()
        self.receiver.ending()
        for link in self.links.values():
            link.close()
        self.receiver.stop()
        self.early.stop_publishing()
        self.staging.buffers.close()
        # A push that ends without its commit takes back the new directories made for it.
        self.early.unmake_dirs(self.root, self.planner.plan.made_dirs)
        self.planner.plan.made_dirs = set()
        self.publisher.session_over()
        self.staging.join_background()  # it uses staging's fd, closed below
        self.publisher.free_parked()
        self.signatures.close()
        self.planner.plan.seen.clear()  # a session cut before entries_end: its scratch file goes
        for importer in (self._importer, self._verify_importer):
            if importer is not None:
                importer.join()  # not cut off by the interpreter's exit mid-import
        self.receiver.close()
        self._unlock()
        self.touched.close()
        self.staging.close()
        self.root.close()
        self.lookup.close()
        self.gate.close()


def serve_stdio(cfg: Config, *, cascade: PushOn | None) -> int:
    """Run one session on fds 0 and 1 (the SSH exec channel); ``cascade``
    pushes this node on to its own downstreams (``push.push_tree``, handed
    down by the command line)."""
    recv, send_all, recv_into = stdio()
    return Agent(cfg, recv, send_all, recv_into=recv_into, cascade=cascade).serve()
