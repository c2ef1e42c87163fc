"""Planning a push on the edge: what to do with each row the upstream lists.

The :class:`Planner` decides every row of a push as its ``entries`` batch
arrives (nothing, metadata, a directory, a symlink, a local copy, bytes
whole or as a delta), asks for the signatures of the edge's old copies,
picks a basis for new files (rsync's ``--fuzzy``; the choice is
syncd.basis's), has the push's hard-link groups checked and tells which of
them are not one file here yet, and in a full comparison walks the tree at
``entries_end`` for what the upstream did not list.  Its decisions go into
the push's :class:`Plan`, which the commit publishes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .. import plan as planmod
from ..basis import Candidates
from ..compress import named_compressed
from ..errors import ProtocolError, UnsafePathError
from ..fsops import SafeRoot
from ..manifest import KIND_DIR, KIND_FILE, KIND_LETTERS, KIND_SYMLINK, fspath, join, split
from ..messages import Begin, Item, Row
from ..partial import RESUME_MIN
from ..staging import TMP_PREFIX
from .policy import Policy

if TYPE_CHECKING:
    from ..config import Config
    from ..manifest import ManifestReader
    from .receive import Receiver
    from .signatures import Signatures
    from .staged import Staging

log = logging.getLogger(__package__)

# Below this size a delta saves too little to pay for its signature round trip.
DELTA_MIN_SIZE = 64 * 1024
# New files per push that may look for a basis (a file of a similar name the
# plan deletes or replaces, syncd.basis): a signature read each, at most.
BASIS_MAX_FILES = 1000
# Signatures of bases kept for other new files that choose the same one.
BASIS_SIGNATURES_KEPT = 16
# Protocol 1.2: a local copy of a file from this size on is made by a
# staging thread (need "copy"); smaller ones at once, by the main thread.
ASYNC_COPY_MIN = 1 << 20
# A full comparison keeps this many listed paths in memory, the rest on disk.
SEEN_IN_MEMORY = 50_000

_PID = os.getpid()  # the scratch file of a full comparison carries it; an agent never forks
_ASK_BASIS = object()  # Planner._decide_row: this new file's item waits for its basis (Planner._basis_items)


@dataclass(slots=True)
class LinkGroup:
    """One file (or symlink) of several names in a push, as this edge will publish it."""

    first: Row
    # Where the first name's content comes from: "staged" (received or
    # copied into staging; for a symlink, made anew), "have" (the file in
    # place), "meta" (in place, its mode or mtime to set).
    state: str
    inode: tuple[int, int] | None  # (dev, ino) of the first name's file here, when it stays in place
    exact: bool  # the edge has it already: one file with exactly these names
    members: list[Row] = field(default_factory=list)


class PathSet:
    """The paths a full comparison listed, for the deletion walk at its end.

    In memory up to ``limit`` paths, then in a scratch SQLite file in
    staging (``tmp.PID.seen``, removed with the set or, after a kill, by the
    next agent's temp cleanup): a reconcile of millions of paths stays
    bounded.  Adds are buffered; the walk asks, after the last add, one
    directory at a time (:meth:`in_dir`).
    """

    def __init__(self, limit: int = 0, where: Path | None = None) -> None:
        self.limit = limit or SEEN_IN_MEMORY
        self.where = where
        self._mem: set[bytes] = set()
        self._db: Any = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._file: Path | None = None

    def add(self, path: bytes) -> None:
        if self._db is None:
            self._mem.add(path)
            if len(self._mem) > self.limit and self.where is not None:
                self._spill()
            return
        self._pending.append(split(path))
        if len(self._pending) >= 10_000:
            self._flush()

    def _spill(self) -> None:
        self._file = self.where / f"{TMP_PREFIX}{_PID}.seen"
        try:
            self._file.unlink()
        except FileNotFoundError:
            pass
        self._db = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (parent BLOB, name BLOB, PRIMARY KEY (parent, name)) WITHOUT ROWID")
        self._pending = [split(p) for p in self._mem]
        self._mem = set()
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO seen (parent, name) VALUES (?, ?)", self._pending)
            self._db.execute("COMMIT")
            self._pending = []

    def in_dir(self, d: bytes) -> set[bytes]:
        """The listed paths directly in directory ``d`` (or, held in memory, all of them)."""
        if self._db is None:
            return self._mem
        self._flush()
        return {join(d, name) for (name,) in self._db.execute("SELECT name FROM seen WHERE parent = ?", (d,))}

    def __contains__(self, path: bytes) -> bool:
        return path in self.in_dir(split(path)[0])

    def clear(self) -> None:
        self._mem = set()
        self._pending = []
        if self._db is not None:
            self._db.close()
            self._db = None
            try:
                self._file.unlink()
            except FileNotFoundError:
                pass


@dataclass
class Plan:
    """One push: what ``begin`` asked for, and what the planner decided."""

    policy: Policy  # this push's rules (syncd.agent.policy)
    generation: int | None = 0  # None: named by the commit (1.4, a push fed by a running scan)
    full: bool = False
    dry_run: bool = False
    dirs: list[Row] = field(default_factory=list)
    files: list[Row] = field(default_factory=list)  # content comes from staging
    metas: list[Row] = field(default_factory=list)  # content in place; mode/mtime to apply
    links: list[Row] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # every row, for the manifest
    seen: PathSet = field(default_factory=PathSet)  # full mode: every path listed
    made_dirs: set[bytes] = field(default_factory=set)  # new directories made before the commit (early.DirMaker)
    fresh: set[bytes] = field(default_factory=set)  # files at paths the edge did not have
    early: dict[bytes, os.stat_result] = field(default_factory=dict)  # published before the commit
    root: Row | None = None  # the root's own row, from the commit (protocol: commit's "root")
    ended: bool = False  # entries_end came: the plan is complete
    signatures: int = 0  # signatures of the edge's old copies asked for
    # A basis for new files that have no copy here (syncd.basis, Planner._basis_items):
    bases: Candidates = field(default_factory=Candidates)  # files the plan deletes or replaces
    want_basis: list[Row] = field(default_factory=list)  # new files of this entries batch
    deferred: list[Row] = field(default_factory=list)  # answered in "planned" (need "later")
    basis_of: dict[bytes, bytes] = field(default_factory=dict)  # path -> the file its delta is against
    basis_sigs: dict[bytes, Any] = field(default_factory=dict)  # basis -> its signature's Future, the last few
    defer: bool = False  # the pusher keeps a file answered "later" until "planned" (begin: fuzzy)
    itemize: bool = False  # each item carries rsync's %i (begin: itemize)
    basis_tries: int = 0  # new files that looked for a basis (BASIS_MAX_FILES)
    # Hard links: the pusher names the groups (rows not named are files of one name).
    hardlinks: bool = False
    groups: list[LinkGroup] = field(default_factory=list)  # complete, and not as they are here yet
    breaks: list[Row] = field(default_factory=list)  # files of one name in place, which have more here
    # Files here (dev, ino) whose names this push changes: the manifest rows
    # of their other names get their new link count and ctime.
    touched: set[tuple[int, int]] = field(default_factory=set)


def is_index(match: planmod.IndexMatcher, row: Row) -> bool:
    """Whether ``row``'s path is an index file (classified once per row)."""
    if row.index is None:
        row.index = match(row.path)
    return row.index


def same_kind(row: Row, st: os.stat_result) -> bool:
    """Whether ``st`` is of the kind of a file (or symlink) row."""
    return stat.S_IFMT(st.st_mode) == (stat.S_IFREG if row.kind == KIND_FILE else stat.S_IFLNK)


def object_uses(files: list[Row]) -> dict[str, int]:
    """How many paths each staged object is published under."""
    uses: dict[str, int] = {}
    for row in files:
        name = row.sha256.hex()
        uses[name] = uses.get(name, 0) + 1
    return uses


class Planner:
    """Decides the rows of one push after another (main thread only)."""

    def __init__(self, cfg: Config, lookup: ManifestReader, root: SafeRoot, staging: Staging, receiver: Receiver,
                 signatures: Signatures, make_dir: Callable[[bytes, int], None], version: tuple[int, int]) -> None:
        self.cfg = cfg
        self.lookup = lookup
        self.root = root
        self.staging = staging
        self.receiver = receiver
        self.signatures = signatures
        self._make_dir = make_dir  # a new directory, made while the plan arrives (early.Early)
        self.version = version
        self.plan = Plan(policy=Policy(cfg))
        self._manifest_empty = False
        self.began_empty = False  # this push began on an empty mirror (see begin)
        self._missing: set[bytes] = set()  # directories this plan found absent
        self._known_path: bytes | None = None  # the last lookup of _manifest_row
        self._known: Any = None
        self._copies: list[tuple[Row, list[bytes]]] = []  # decided in this entries batch, not yet handed over

    def begin(self, msg: Begin) -> Plan:
        """A new push (under the state lock): its plan, empty."""
        self._manifest_empty = self.lookup.empty()  # see _manifest_row
        # A new mirror: nothing here for a full comparison to delete, and no
        # old copy to send a signature of.  (The lock keeps other writers out.)
        self.began_empty = self._manifest_empty and self._root_empty()
        self.staging.begin_push()
        self._known_path = None  # the manifest may have changed since the last push
        self._missing = set()
        self.plan = Plan(
            generation=msg.generation,
            full=msg.full,
            dry_run=msg.dry_run,
            policy=Policy(self.cfg, msg),
            seen=PathSet(where=self.staging.path),
            defer=msg.fuzzy and self.version >= (1, 3),
            hardlinks=msg.hardlinks,
            itemize=msg.itemize,
        )
        return self.plan

    def reset(self) -> None:
        """The push is over (committed, or held back)."""
        self.plan = Plan(policy=Policy(self.cfg))

    def _root_empty(self) -> bool:
        try:
            with os.scandir(self.cfg.node.root) as it:
                return next(it, None) is None
        except OSError:
            return False

    def batch(self, rows: list[Row]) -> list[Item]:
        """The items of one ``entries`` batch (its ``needs``)."""
        items = []
        for row in rows:
            item = self._decide(row)
            if item is not None:
                items.append(item)
        return items + self._basis_items(final=False)

    def take_copies(self) -> list[tuple[Row, list[bytes]]]:
        """The local copies this batch decided, for the staging threads (after its ``needs`` is out)."""
        copies, self._copies = self._copies, []
        return copies

    def basis_of(self, path: bytes) -> bytes:
        """The edge's file that ``path``'s delta is taken against."""
        return self.plan.basis_of.get(path, path)

    def _decide(self, row: Row) -> Item | None:
        """What to do with one row; the wire item, or None for nothing."""
        plan = self.plan
        if plan.full and not self.began_empty:  # for the deletion walk
            plan.seen.add(row.path)
        parent = split(row.path)[0]
        if parent and parent in self._missing:
            st = None  # below a directory that is not there (nothing makes one before commit)
        else:
            st = self.root.lstat(row.path)
        if st is None and row.kind == KIND_DIR:
            self._missing.add(row.path)
        if row.link is not None:
            item = self._decide_linked(row, st)
        else:
            item = self._decide_row(row, st)
        if plan.itemize and item is not _ASK_BASIS:
            item = self._itemized(row, st, item)
        if item is _ASK_BASIS:
            plan.rows.append(row)
            return None  # answered at the end of its batch, or in "planned"
        if item is None and plan.full and self._recorded(row, st):
            # A full comparison (a reconcile) lists every path: one that the
            # manifest already records exactly as it is is not kept until
            # commit, so memory follows the changes, not the tree.
            return None
        plan.rows.append(row)
        return item

    def _itemized(self, row: Row, st: os.stat_result | None, item: Item | None) -> Item | None:
        """``item`` with rsync's %i added (begin's ``itemize``).  A directory
        whose only change is its time gets an item of its own (the commit
        sets that time without one): rsync lists it too."""
        if item is None:
            if row.kind != KIND_DIR or row.deleted or st is None or st.st_mtime_ns == row.mtime_ns:
                return None
            item = Item(planmod.META, row.path)
        return item._replace(flags=self._flags(row, st, item.action))

    def _flags(self, row: Row, st: os.stat_result | None, action: str) -> str:
        """rsync's %i of one item, '/' after it when the path is a directory."""
        if action == planmod.DELETE:
            return planmod.DELETING + ("/" if st is not None and stat.S_ISDIR(st.st_mode) else "")
        kind = KIND_LETTERS[row.kind]
        retarget = action == planmod.LINK and st is not None and stat.S_ISLNK(st.st_mode)
        flags = planmod.itemize(kind, st, size=row.size, mtime_ns=row.mtime_ns, mode=row.mode,
                                transfer=action in (planmod.NEW, planmod.DELTA, planmod.COPY),
                                target_changed=retarget)
        if action == planmod.HLINK:
            flags = planmod.hard_link_flags(flags)
        return flags + ("/" if kind == "d" else "")

    def _recorded(self, row: Row, st: os.stat_result | None) -> bool:
        known = self._manifest_row(row.path)
        return known is not None and tuple(known) == row.manifest_row(st)

    def _manifest_row(self, path: bytes) -> Any:
        """This node's manifest row of ``path`` (None: none).  The last one is
        kept: _decide_file and then _recorded ask for the same path.  A new
        mirror (or a lost manifest) has no rows: 100,000 lookups of nothing
        cost seconds."""
        if self._manifest_empty:
            return None
        if path != self._known_path:
            self._known_path, self._known = path, self.lookup.lookup(path)
        return self._known

    def _decide_row(self, row: Row, st: os.stat_result | None) -> Any:
        plan = self.plan
        if row.deleted:
            if st is not None:
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    plan.touched.add((st.st_dev, st.st_ino))  # its other names' link count moves
                plan.deletes.append(row.path)
                self._basis_candidate(row.path, st)
                return Item(planmod.DELETE, row.path)
            return None
        if row.kind == KIND_DIR:
            plan.dirs.append(row)
            if st is not None and stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == row.mode:
                return None
            if st is None and not plan.dry_run:
                self._make_dir(row.path, row.mode)
            return Item(planmod.DIR, row.path)
        if row.kind == KIND_SYMLINK:
            return self._decide_symlink(row, st)
        return self._decide_file(row, st)

    def _decide_symlink(self, row: Row, st: os.stat_result | None) -> Item | None:
        plan = self.plan
        if st is not None and stat.S_ISLNK(st.st_mode) and self.root.readlink(row.path) == row.target:
            item = None
            if st.st_mtime_ns != row.mtime_ns:  # its own time, as rsync -a keeps it
                plan.metas.append(row)
                item = Item(planmod.META, row.path)
            if plan.hardlinks and row.link is None and st.st_nlink > 1:
                plan.breaks.append(row)  # one name upstream, several here (see _decide_file)
                plan.touched.add((st.st_dev, st.st_ino))
                item = item or Item(planmod.LINK, row.path)
            return item
        if st is not None and stat.S_ISLNK(st.st_mode) and st.st_nlink > 1:
            plan.touched.add((st.st_dev, st.st_ino))
        plan.links.append(row)
        return Item(planmod.LINK, row.path)

    def _decide_linked(self, row: Row, st: os.stat_result | None) -> Any:
        """A row the pusher names as one of several names of a file.

        The first name is decided as any file (its bytes are the group's, sent
        once if at all); every other name needs no bytes: at commit it
        becomes a hard link of the first name's file.  A group that already
        is one file here with exactly these names needs nothing.
        """
        plan = self.plan
        if row.deleted or row.kind == KIND_DIR:
            raise ProtocolError(f"entries: {fspath(row.path)}: a hard link named on a row that is no live file "
                                "or symlink")
        same = st is not None and same_kind(row, st)
        if row.link == row.path:
            item = self._decide_file(row, st) if row.kind == KIND_FILE else self._decide_row(row, st)
            if item is None:
                state = "have"
            elif item is not _ASK_BASIS and item.action == planmod.META:
                state = "meta"
            else:
                state = "staged"  # whole, as a delta (against a basis too), or a local copy
            in_place = state != "staged"
            group = LinkGroup(row, state, (st.st_dev, st.st_ino) if in_place else None,
                              exact=in_place and st.st_nlink == row.names)
            plan.policy.link_first(row, group)
            return item
        group, last = plan.policy.link_member(row)
        on_file = same and (st.st_dev, st.st_ino) == group.inode
        if not on_file and same and st.st_nlink > 1:
            plan.touched.add((st.st_dev, st.st_ino))  # linked anew: its old file loses a name
        group.exact = group.exact and on_file and st.st_nlink == row.names
        group.members.append(row)
        if last:
            if not group.exact:
                plan.groups.append(group)
                if group.inode is not None:
                    plan.touched.add(group.inode)
        return None if on_file else Item(planmod.HLINK, row.path, None, row.link)

    def _decide_file(self, row: Row, st: os.stat_result | None) -> Any:
        plan = self.plan
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == row.size and self._have(row, st):
            item = None
            if stat.S_IMODE(st.st_mode) != row.mode or st.st_mtime_ns != row.mtime_ns:
                plan.metas.append(row)
                item = Item(planmod.META, row.path)
            if plan.hardlinks and row.link is None and st.st_nlink > 1:
                # A file of one name upstream, of several here: it gets
                # a file of its own at commit (a copy of itself), unless
                # its other names go in this push anyway.
                plan.breaks.append(row)
                plan.touched.add((st.st_dev, st.st_ino))
                item = item or Item(planmod.COPY, row.path, None, row.path)
            return item
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            plan.touched.add((st.st_dev, st.st_ino))  # replaced: its other names' link count moves
        plan.files.append(row)
        if st is None:
            plan.fresh.add(row.path)
        else:
            self._basis_candidate(row.path, st)  # replaced: its old bytes stay until the commit
        if self.receiver.expects(row.sha256) or self.staging.has(row.sha256.hex()):
            return Item(planmod.NEW, row.path)  # already staged or on its way
        sources = self._copy_sources(row)
        item = self._copy(row, sources) if sources else None
        return item if item is not None else self._bytes(row, st)

    def _have(self, row: Row, st: os.stat_result) -> bool:
        """Whether the regular file at ``row``'s path (of its size) has its content."""
        known = self._manifest_row(row.path)
        if (
            known is not None and not known.deleted and known.sha256 == row.sha256
            and (known.size, known.mtime_ns, known.ino, known.ctime_ns)
            == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        ):
            return True
        if st.st_mtime_ns == row.mtime_ns:
            # Published by a killed session, or a manifest that was lost:
            # a local re-hash is far cheaper than the bytes on the wire.
            return self._local_sha256(row.path) == row.sha256
        return False

    def _copy(self, row: Row, sources: list[bytes]) -> Item | None:
        """A new file whose content this edge has under another name (None:
        none of ``sources`` still holds it)."""
        if self.plan.dry_run:
            return Item(planmod.COPY, row.path, None, sources[0])
        if row.size >= ASYNC_COPY_MIN and self.version >= (1, 2):
            # A staging thread copies it while this one goes on planning (a
            # large renamed file held its batch's needs back: docs/performance.md,
            # "The agent").
            self.receiver.expect(row.sha256)
            self._copies.append((row, sources))  # started once the needs naming it is out
            return Item(planmod.COPY, row.path, "copy", sources[0])
        source = self.staging.copy_from(self.root, row, sources)
        return None if source is None else Item(planmod.COPY, row.path, None, source)

    def _bytes(self, row: Row, st: os.stat_result | None) -> Any:
        """A file whose bytes the pusher sends: as a delta against the edge's
        old copy, the rest of a verified prefix, against a basis, or whole."""
        plan = self.plan
        self.receiver.expect(row.sha256)
        if row.mode & 0o400:
            # The staging thread gives the file its final mode and mtime while
            # it still has it open: publishing then skips an open, a chmod, a
            # utime and a close per file, in the one-threaded commit.  (An
            # object its owner cannot read keeps 0600 until then: a second
            # path with the same content is copied from it at publish.)
            self.staging.want_meta(row.path, row.mode, row.mtime_ns)
        if (
            st is not None and stat.S_ISREG(st.st_mode)
            and st.st_size >= DELTA_MIN_SIZE and row.size >= DELTA_MIN_SIZE
        ):
            if plan.dry_run:
                return Item(planmod.DELTA, row.path, "delta")
            return Item(planmod.DELTA, row.path, "delta", None, self._signature(row.path))
        if row.size >= RESUME_MIN and not plan.dry_run and self.receiver.offer_resume(row):
            return Item(planmod.NEW, row.path, "whole")  # the rest of its verified prefix
        if self._wants_basis(row):
            plan.want_basis.append(row)
            return _ASK_BASIS
        return Item(planmod.NEW, row.path, "whole")

    def _local_sha256(self, path: bytes) -> bytes | None:
        # syncd.verify: imported in the background since the upstream's hello
        # (docs/performance.md, "Start-up").
        from .. import verify as verifymod

        try:
            fd = self.root.open_read(path)
        except (OSError, UnsafePathError):
            return None
        try:
            return verifymod.sha256_file(fd)
        finally:
            os.close(fd)

    def _copy_sources(self, row: Row) -> list[bytes]:
        """Rename and copy detection: the edge's regular files that its
        manifest says hold ``row``'s content, at the right size."""
        if self._manifest_empty:
            return []  # it knows no content to copy from
        sources = []
        for cand in self.lookup.with_sha256(row.sha256):
            if cand.path == row.path:
                continue
            st = self.root.lstat(cand.path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == row.size:
                sources.append(cand.path)
        return sources

    # -- signatures of the edge's old copies ------------------------------------------------

    def _signature(self, path: bytes) -> int:
        """Start the block signature of this edge's copy of ``path``; its stream id."""
        fd = self.root.open_read(path)  # here: SafeRoot belongs to this thread
        return self._signature_stream(path, self.signatures.start(fd))

    def _signature_stream(self, path: bytes, job: Any) -> int:
        """The stream id on which ``job``'s signature goes, for ``path``'s delta."""
        self.plan.signatures += 1
        return self.signatures.add(path, job)

    # -- a basis for a new file (rsync's --fuzzy; the choice is syncd.basis's) ------

    def _basis_candidate(self, path: bytes, st: os.stat_result) -> None:
        """``path`` is deleted or replaced by this plan: a possible basis,
        when it is a regular file large enough for a delta."""
        if stat.S_ISREG(st.st_mode) and st.st_size >= DELTA_MIN_SIZE and not self.plan.dry_run:
            parent, name = split(path)
            self.plan.bases.add(parent, name, st.st_size)

    def _wants_basis(self, row: Row) -> bool:
        """Whether a new file with no old copy of its own here looks for a
        basis: large enough for a delta, not compressed (a new version of a
        compressed file shares next to nothing with the old one), in a
        directory this edge has, within the push's bound on signature reads."""
        plan = self.plan
        if (plan.dry_run or self.began_empty or row.size < DELTA_MIN_SIZE
                or plan.basis_tries >= BASIS_MAX_FILES or named_compressed(row.path)):
            return False
        parent = split(row.path)[0]
        if parent in self._missing:
            return False
        if parent:
            pst = self.root.lstat(parent)
            if pst is None or not stat.S_ISDIR(pst.st_mode):
                return False
        plan.basis_tries += 1
        return True

    def _basis_items(self, *, final: bool) -> list[Item]:
        """Items for the new files waiting for a basis: a delta against the
        candidate :meth:`Candidates.choose` picks, with its signature, or
        the file whole.  At a batch's end (``final`` False) one without a
        candidate yet waits for the rest of the plan (need "later", when the
        pusher keeps such files: begin's ``fuzzy``): its old version may be
        deleted by a later batch, or, in a full comparison, be found
        unlisted at the end.  At entries_end (``final``) every file is
        answered."""
        plan = self.plan
        rows, plan.want_basis = plan.want_basis, []
        if final:
            rows, plan.deferred = plan.deferred + rows, []
        items = []
        for row in rows:
            parent, name = split(row.path)
            chosen = plan.bases.choose(parent, name, row.size)
            item = self._delta_from(row, join(parent, chosen)) if chosen is not None else None
            if item is None and not final and plan.defer:
                plan.deferred.append(row)
                item = Item(planmod.NEW, row.path, "later")
            item = item or Item(planmod.NEW, row.path, "whole")
            if plan.itemize and item.need != "later":
                item = item._replace(flags=self._flags(row, self.root.lstat(row.path), item.action))
            items.append(item)
        return items

    def _delta_from(self, row: Row, basis: bytes) -> Item | None:
        """The delta item of ``row`` against this edge's file ``basis``, its
        signature started; None when ``basis`` cannot be read as a regular
        file in root (SafeRoot walks from root's fd and follows no symlink,
        so a symlink or a directory planted there is never read through)."""
        plan = self.plan
        job = plan.basis_sigs.pop(basis, None)
        if job is None:
            try:
                fd = self.root.open_read(basis)
            except (OSError, UnsafePathError) as err:
                log.debug("%s: no basis %s (%s)", fspath(row.path), fspath(basis), err)
                return None
            job = self.signatures.start(fd)
        # Several new files may share a basis (a directory's one replaced
        # file): it is read once for them.  The last few are kept.
        plan.basis_sigs[basis] = job
        if len(plan.basis_sigs) > BASIS_SIGNATURES_KEPT:
            del plan.basis_sigs[next(iter(plan.basis_sigs))]
        plan.basis_of[row.path] = basis
        log.debug("%s: a delta against %s", fspath(row.path), fspath(basis))
        return Item(planmod.DELTA, row.path, "delta", basis, self._signature_stream(row.path, job))

    # -- the end of the plan --------------------------------------------------------------

    def end(self) -> list[Item]:
        """``entries_end``: the plan is complete.  In a full comparison, what
        this edge has that the upstream did not list goes; the new files put
        off get their items."""
        plan = self.plan
        plan.policy.links_end()  # before anything can go live early
        plan.ended = True
        items = []
        # Deferred new files look for their basis among the unlisted files of their directory too.
        basis_dirs = {split(r.path)[0] for r in plan.deferred}
        if plan.full and not self.began_empty:  # (an empty mirror holds nothing unlisted)
            for path, is_dir, listed in self._walk():
                if listed or not plan.policy.deletes_unlisted(path, is_dir):
                    continue
                plan.deletes.append(path)
                items.append(Item(planmod.DELETE, path,
                                  flags=planmod.DELETING + ("/" if is_dir else "") if plan.itemize else None))
                if not is_dir and split(path)[0] in basis_dirs and (st := self.root.lstat(path)) is not None:
                    self._basis_candidate(path, st)
                known = None if is_dir else self._manifest_row(path)
                if known is not None and known.nlink > 1:
                    plan.touched.add((known.dev, known.ino))
        plan.seen.clear()
        return items + self._basis_items(final=True)

    def _walk(self) -> Iterator[tuple[bytes, bool, bool]]:
        """(path, is a directory, listed by the upstream) for what root holds,
        not descending into directories the upstream did not list."""
        stack = [b""]
        root_fd = self.root.open_dir(b"")
        os.close(root_fd)
        while stack:
            d = stack.pop()
            try:
                fd = self.root.open_dir(d)
            except (OSError, UnsafePathError):
                continue
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            finally:
                os.close(fd)
            seen = self.plan.seen.in_dir(d)
            for name, is_dir in entries:
                path = join(d, os.fsencode(name))
                listed = path in seen
                yield path, is_dir, listed
                if is_dir and listed:  # else the whole directory goes: no need to list inside it
                    stack.append(path)
