"""Publishing a push at its commit, in the order of docs/design.md ("Publish order").

1. directories, parents first (most are made already, early.DirMaker);
2. data files and symlinks, each by ``rename(2)`` from staging (a file of
   several names as one unit), then one ``syncfs``;
3. the index group, the same way;
4. deletions, deepest first;
5. this node's trace file;
6. the upstream's times of every directory whose entries changed
   (touched.TouchedDirs), and root's.

Then the manifest records the generation, with each entry's stat as taken
right after its rename.  A large file replaced or deleted is parked in
staging and freed after ``committed`` is out.  A generation the gate held
back publishes only what no served index can see (:meth:`Publisher.hold_back`).
Every file operation goes through the session's SafeRoot, which never
follows a symlink below root.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import plan as planmod
from ..config import Config
from ..errors import SyncdError, VerifyError
from ..fsops import SafeRoot, unlink_at
from ..manifest import (KIND_DIR, KIND_FILE, KIND_SYMLINK, META_HELD_BACK, META_REPAIR, Manifest, ManifestReader,
                        fspath, split)
from ..messages import Row
from .plan import LinkGroup, Plan, is_index, object_uses, same_kind
from .staged import Staging
from .touched import TouchedDirs

log = logging.getLogger(__package__)

#: Replaced or deleted files from this size on are freed after the commit.
PARK_MIN = 1 << 20
PARK_FREE_DELAY = 1.0  # seconds after the commit
# How many findings a held-back generation's error message and meta quote.
FINDINGS_QUOTED = 5


@dataclass(slots=True)
class Break:
    """A publish unit: a file in place that gets a file of its own (Publisher._break_link)."""

    row: Row


def unit_rows(unit: Any) -> list[Row]:
    """The rows a publish unit publishes: a row, a group's names, a break's row."""
    if isinstance(unit, LinkGroup):
        return [unit.first, *unit.members]
    if isinstance(unit, Break):
        return [unit.row]
    return [unit]


def index_order(path: bytes) -> tuple:
    """Publishing order inside the index group: what an index names before
    the index, so a client that reads the new index finds what it names.

    by-hash files first (content-addressed, named by everything), then the
    other indices deepest first (Packages before the Release above them),
    then Release and repomd.xml, and their signatures (InRelease, *.gpg,
    *.asc, *.sig) last.
    """
    name = split(path)[1]
    if b"/by-hash/" in b"/" + path:
        rank = 0
    elif name == b"InRelease" or name.endswith((b".gpg", b".asc", b".sig")):
        rank = 3
    elif name in (b"Release", b"repomd.xml"):
        rank = 2
    else:
        rank = 1
    return (rank, -planmod.depth(path), path)


class Publisher:
    """Publishes the session's pushes into root, and records them."""

    def __init__(self, cfg: Config, manifest: Manifest, lookup: ManifestReader, root: SafeRoot, staging: Staging,
                 touched: TouchedDirs, index: planmod.IndexMatcher) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.lookup = lookup
        self.root = root
        self.staging = staging
        self.touched = touched
        self.index = index
        self._parked: list[str] = []  # trash.PID.N in staging, unlinked after the commit
        self._freers: list[threading.Thread] = []
        self._session_over = threading.Event()
        self._going: tuple[set[bytes], set[bytes]] | None = None  # what the push deletes, what it replaces

    # -- the commit ---------------------------------------------------------------------

    def publish(self, plan: Plan, started: float, client: str) -> int:
        """Publish ``plan`` and record its generation; how many files were published."""
        root = self.root
        self._going = None
        trace = None
        if self.cfg.node.trace:  # (not even its import otherwise: docs/performance.md, "Start-up")
            from .. import trace
        # Every directory whose entries this commit may change is recorded
        # first (see TouchedDirs); the syncfs below makes the record durable.
        self.touched.add(itertools.chain(
            (r.path for r in plan.dirs), (r.path for r in plan.files), (r.path for r in plan.links),
            # Names linked or given a file of their own are renamed in too.
            (r.path for g in plan.groups for r in (g.first, *g.members)), (r.path for r in plan.breaks),
            plan.deletes, [trace.trace_path(self.cfg)] if trace else ()))
        # What was staged reaches the disk before anything references it.
        self.staging.join_background()
        self.staging.sync()
        # 1. Directories, parents first (the new ones are made already, mostly).
        for row in sorted(plan.dirs, key=lambda r: (planmod.depth(r.path), r.path)):
            if row.path not in plan.made_dirs:
                root.ensure_dir(row.path, row.mode)
        # 2. Data files and links, then 3. the index group.
        published, stats = self._publish_entries(plan)
        # 4. Deletions, deepest first: after the indices that referenced them.
        for path in planmod.deletion_order(set(plan.deletes)):
            root.remove(path, park=self._park_deleted)
        # 5. This node's trace file: the last change of an entry of root
        # (a failure is logged: a stale trace only makes the mirror look older).
        if trace is not None:
            trace.after_commit(self.cfg, root, self.staging.fd, generation=plan.generation,
                               upstream=client, started_monotonic=started)
        # 6. Directory times last: nothing changes an entry of root after this.
        self._restore_dir_times(plan, stats)
        # The manifest says "generation G is here" only once it is, durably
        # (deletions and directory metadata included).
        self.staging.sync()
        self._record(plan, stats, client)
        self.touched.clear()  # (a kill before this only repeats step 6 at the next commit)
        # (No object of this plan is left to unlink: the last path of each
        # took it by rename, here or in the early publisher.)
        # Objects still staged were kept for a held-back generation that
        # this one superseded (an InRelease signed again): nothing needs them.
        self.staging.clean(everything=True)
        return published

    def _units(self, plan: Plan) -> tuple[list[Any], list[Any]]:
        """The publish units: data files and links, and the index group in
        its order.  A file of several names goes as one unit, with the index
        group if any of its names is an index file."""
        data: list[Any] = []
        index: list[Any] = []
        # Breaks first: a metadata change of the same row (below) then goes
        # to the file it is given.
        units: list[Any] = [Break(r) for r in plan.breaks] + plan.groups
        firsts = {id(g.first) for g in plan.groups}  # published with their group
        units += [r for r in plan.files + plan.links + plan.metas if id(r) not in firsts]
        for unit in units:
            (index if any(is_index(self.index, r) for r in unit_rows(unit)) else data).append(unit)
        index.sort(key=lambda unit: min(index_order(r.path) for r in unit_rows(unit)))
        return data, index

    def _publish_entries(self, plan: Plan) -> tuple[int, dict[bytes, os.stat_result | None]]:
        """Steps 2 and 3: how many files were published, and each entry's
        stat once it is final, taken where it was just published (the
        manifest records it without walking each path again)."""
        uses = object_uses(plan.files)
        meta_only = {id(r) for r in plan.metas}  # by identity: a set, not a scan per row
        published = 0
        stats: dict[bytes, os.stat_result | None] = {}
        for group in self._units(plan):
            for row in group:
                if isinstance(row, LinkGroup):
                    published += self._publish_group(plan, row, uses)
                    continue
                if isinstance(row, Break):
                    self._break_link(plan, row.row)
                    continue
                if row.path in plan.early and id(row) not in meta_only and row.kind == KIND_FILE:
                    stats[row.path] = plan.early[row.path]  # live already (early.EarlyPublisher)
                    uses[row.sha256.hex()] -= 1
                    published += 1
                    continue
                if id(row) in meta_only:
                    stats[row.path] = self.root.set_meta(row.path, mode=row.mode, mtime_ns=row.mtime_ns)
                elif row.kind == KIND_SYMLINK:
                    stats[row.path] = self._publish_link(row)
                else:
                    stats[row.path] = self._publish_file(row, uses)
                    published += 1
            # The renames of this group are durable before the next group
            # (the indices) can reference them: one syncfs (a journal commit,
            # the data being on disk already) instead of an fsync per directory.
            if group:
                self.staging.sync()
        return published, stats

    def _restore_dir_times(self, plan: Plan, stats: dict[bytes, os.stat_result | None]) -> None:
        """Give every directory of the plan, every directory whose entries
        changed since the last commit (:class:`TouchedDirs`) and root the
        upstream's mtime (root its mode too).

        A directory's mtime is not an entry of its parent, so the order
        does not matter; what matters is that no entry below changes after
        it.  A touched directory that this plan does not list has not
        changed upstream since the generation this edge holds: its row in
        this edge's manifest has the time.  One that is gone, or that the
        upstream never had (the trace file's own ``project/trace``, made
        here), keeps the time it has.
        """
        root = self.root
        listed = {row.path: row.mtime_ns for row in plan.dirs}
        for row in sorted(plan.dirs, key=lambda r: (-planmod.depth(r.path), r.path)):
            stats[row.path] = root.set_meta(row.path, mode=None, mtime_ns=row.mtime_ns)
        for path in self.touched.dirs():
            if not path or path in listed:
                continue
            known = self.lookup.lookup(path)
            if known is None or known.deleted or known.kind != KIND_DIR:
                continue
            st = root.lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode) or st.st_mtime_ns == known.mtime_ns:
                continue
            root.set_meta(path, mode=None, mtime_ns=known.mtime_ns)
        own = plan.root
        if own is None:  # an upstream that does not send it: as recorded, if ever
            known = self.lookup.lookup(b"")
            if known is not None and not known.deleted:
                own = Row(b"", KIND_DIR, 0, known.mtime_ns, known.mode, None, None, 0, known.generation)
        if own is not None:
            stats[b""] = root.set_meta(b"", mode=own.mode, mtime_ns=own.mtime_ns)

    # -- files -----------------------------------------------------------------------------

    def _publish_link(self, row: Row) -> os.stat_result:
        """A symlink, made in staging and renamed into place like a file,
        with its own mtime (the rename keeps it)."""
        tmp = self.staging.new_tmp()
        os.symlink(row.target, tmp, dir_fd=self.staging.fd)
        os.utime(tmp, ns=(row.mtime_ns, row.mtime_ns), dir_fd=self.staging.fd, follow_symlinks=False)
        return self.root.publish(self.staging.fd, tmp.encode(), row.path)

    def _publish_file(self, row: Row, uses: dict[str, int]) -> os.stat_result:
        return self.root.publish(self.staging.fd, self._staged_source(row, uses).encode(), row.path,
                                 park=self._park_replaced)

    def _staged_source(self, row: Row, uses: dict[str, int]) -> str:
        """The staging name that becomes ``row``'s file, with its mode and mtime."""
        obj = row.sha256.hex()
        uses[obj] -= 1
        if uses[obj] > 0:
            # The same content is published under another name too: give
            # this one its own copy, keep the object for the next.
            src = self.staging.copy_object(obj)
        else:
            src = obj
        if src != obj or self.staging.applied(obj) != (row.mode, row.mtime_ns):
            self.staging.give_meta(src, row.mode, row.mtime_ns)
        return src

    # -- hard links --------------------------------------------------------------------------

    def _publish_group(self, plan: Plan, group: LinkGroup, uses: dict[str, int]) -> int:
        """Publish one file of several names; how many names were published.

        The file's content is the staged object (verified at the gate, like
        every staged object), or the first name's file in place.  The other
        names are linked to it in staging (``link(2)``, from the object
        before it is renamed, or from the first name's file through the
        dir-fd walk, never following a symlink), then each reaches its name
        by ``rename(2)``, as any file does.  A file in place that has names
        outside the group which this push does not remove is not reused:
        the group gets a copy of it, checked against its SHA-256.  A symlink
        of several names is made anew in staging, or reused, the same way.
        """
        src, inode = self._group_source(plan, group, uses)
        sfd = self.staging.fd
        linked: list[tuple[str, Row]] = []
        try:
            for member in group.members:
                if inode is not None:
                    mst = self.root.lstat(member.path)
                    if mst is not None and (mst.st_dev, mst.st_ino) == inode:
                        continue  # a name of that file already
                tmp = self.staging.new_tmp()
                if src is not None:
                    os.link(src, tmp, src_dir_fd=sfd, dst_dir_fd=sfd, follow_symlinks=False)
                else:
                    self.root.link_out(group.first.path, sfd, tmp, inode)
                linked.append((tmp, member))
            published = 0
            if src is not None:
                st = self.root.publish(sfd, src.encode(), group.first.path, park=self._park_replaced)
                published += 1
                plan.touched.add((st.st_dev, st.st_ino))
            else:
                plan.touched.add(inode)
            while linked:
                tmp, member = linked[-1]
                self.root.publish(sfd, tmp.encode(), member.path, park=self._park_replaced)
                linked.pop()
                published += 1
        finally:
            unlink_at(sfd, *(tmp for tmp, _ in linked))  # (after an error only)
        return published

    def _group_source(self, plan: Plan, group: LinkGroup, uses: dict[str, int]) -> tuple[str | None, Any]:
        """The staging name that becomes the group's first name, or None when
        the first name's file in place stays (then its (dev, ino) too)."""
        first = group.first
        if group.state == "staged":
            src = self._staged_source(first, uses) if first.kind == KIND_FILE else self._fresh_copy(first)
            return src, None
        st = self.root.lstat(first.path)
        if st is None or not same_kind(first, st) or (st.st_dev, st.st_ino) != group.inode:
            raise SyncdError(f"{fspath(first.path)}: changed on {self.cfg.node.name} during the push; "
                             "push again")
        if not self._only_names(plan, st, [first.path] + [m.path for m in group.members]):
            return self._fresh_copy(first), None  # with the row's mode and mtime
        if group.state == "meta":
            self.root.set_meta(first.path, mode=first.mode, mtime_ns=first.mtime_ns)
        return None, group.inode

    def _break_link(self, plan: Plan, row: Row) -> None:
        """A file of one name upstream that has more names here: give it a
        file of its own, unless its other names go in this push anyway."""
        st = self.root.lstat(row.path)
        if st is None or not same_kind(row, st) or st.st_nlink <= 1 or self._only_names(plan, st, [row.path]):
            return
        self.root.publish(self.staging.fd, self._fresh_copy(row).encode(), row.path)

    def _only_names(self, plan: Plan, st: os.stat_result, names: list[bytes]) -> bool:
        """Whether the file at ``st`` will have no name but ``names`` once this
        push is published: each other name of it (as this node's manifest
        records them, checked by lstat) is deleted or replaced by the push."""
        inode = (st.st_dev, st.st_ino)
        root = self.root

        def on_file(path: bytes) -> bool:
            got = root.lstat(path)
            return got is not None and (got.st_dev, got.st_ino) == inode

        others = st.st_nlink - sum(1 for path in names if on_file(path))
        if others <= 0:
            return True
        keep = set(names)
        going = sum(1 for path in self.lookup.names_of(*inode)
                    if path not in keep and self._goes_away(plan, path) and on_file(path))
        return going >= others

    def _goes_away(self, plan: Plan, path: bytes) -> bool:
        """Whether this push deletes ``path`` (or a directory above it), or
        puts a new file, symlink or directory in its place."""
        going = self._going
        if going is None:
            going = self._going = (set(plan.deletes),
                                   {r.path for r in plan.files + plan.links + plan.dirs})
        deleted, replaced = going
        if path in replaced:
            return True
        while path:
            if path in deleted:
                return True
            path = split(path)[0]
        return False

    def _fresh_copy(self, row: Row) -> str:
        """A new file (or symlink) in staging with ``row``'s content and
        mtime, not linked to anything: the staging name.  A file is copied
        from its name in place, checked against the row's SHA-256, and given
        its mode too."""
        sfd = self.staging.fd
        tmp = self.staging.new_tmp()
        if row.kind == KIND_SYMLINK:
            os.symlink(row.target, tmp, dir_fd=sfd)
            os.utime(tmp, ns=(row.mtime_ns, row.mtime_ns), dir_fd=sfd, follow_symlinks=False)
            return tmp
        try:
            _, digest = self.root.copy_into(row.path, sfd, tmp.encode(), self.staging.buffers)
            if digest != row.sha256:
                raise SyncdError(f"{fspath(row.path)}: changed on {self.cfg.node.name} during the push; "
                                 "push again")
            self.staging.give_meta(tmp, row.mode, row.mtime_ns)
        except BaseException:
            unlink_at(sfd, tmp)
            raise
        return tmp

    # -- parking -------------------------------------------------------------------------------

    # A large file replaced or deleted at publish is moved aside into staging
    # (a link, or a rename), and unlinked once "committed" is out: freeing
    # its blocks and cached pages (docs/performance.md, "The agent") is then
    # not part of the commit.  Leftovers of a killed agent go with its temporaries.
    def _park_replaced(self, pfd: int, leaf: bytes, st: os.stat_result) -> None:
        if st.st_size >= PARK_MIN and st.st_nlink == 1:
            self._park(lambda name: os.link(leaf, name, src_dir_fd=pfd, dst_dir_fd=self.staging.fd,
                                            follow_symlinks=False))

    def _park_deleted(self, pfd: int, leaf: bytes) -> bool:
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return False  # unlink says what is wrong
        if not stat.S_ISREG(st.st_mode) or st.st_size < PARK_MIN or st.st_nlink != 1:
            return False
        return self._park(lambda name: os.rename(leaf, name, src_dir_fd=pfd, dst_dir_fd=self.staging.fd))

    def _park(self, move: Callable[[str], None]) -> bool:
        name = self.staging.new_trash()
        try:
            move(name)
        except OSError:
            return False  # (a hard link refused, say): freed at once instead
        self._parked.append(name)
        return True

    def _free_parked(self, parked: list[str] | None = None) -> None:
        if parked is None:
            parked, self._parked = self._parked, []
        for name in parked:
            try:
                os.unlink(name, dir_fd=self.staging.fd)
            except OSError:
                pass  # removed with the temporaries of a later session

    def free_parked_later(self) -> None:
        """Unlink the parked files in a moment, from a thread: the upstream
        hears ``committed`` first, and its own manifest update does not wait
        behind the freeing (with ``discard``, a trim per extent)."""
        parked, self._parked = self._parked, []
        if not parked:
            return

        def free() -> None:
            self._session_over.wait(PARK_FREE_DELAY)  # at once when the session ends
            self._free_parked(parked)

        freer = threading.Thread(target=free, name="free-parked", daemon=True)
        freer.start()
        self._freers.append(freer)

    def session_over(self) -> None:
        """The session ends: the parked files are freed now."""
        self._session_over.set()
        for freer in self._freers:
            freer.join()

    def free_parked(self) -> None:
        """What is still parked (a commit that failed half-way) is freed."""
        self._free_parked()

    # -- the manifest ------------------------------------------------------------------------

    def _record(self, plan: Plan, stats: dict[bytes, os.stat_result | None], client: str) -> None:
        if plan.groups:
            # Every name of a group published (a full comparison kept only
            # those with something to do): each one's link count moved.
            listed = {id(r) for r in plan.rows}
            plan.rows += [r for g in plan.groups for r in (g.first, *g.members) if id(r) not in listed]
        with self.manifest.writer() as w:
            if plan.root is not None:
                w.upsert(plan.root.manifest_row(stats.get(b"")))
            for row in plan.rows:
                if row.deleted:
                    st = None
                else:
                    st = stats.get(row.path)
                    # Listed and in place already, or a file of several names,
                    # whose link count and ctime moved with each name after it.
                    if st is None or st.st_nlink > 1 or row.link is not None:
                        st = self.root.lstat(row.path)
                w.upsert(row.manifest_row(st))
            if plan.touched:
                self._restat_names(w, plan)
            deleted_listed = {r.path for r in plan.rows if r.deleted}
            for path in plan.deletes:
                if path not in deleted_listed:
                    known = self.lookup.lookup(path)
                    parent, name = split(path)
                    kind = known.kind if known else KIND_FILE
                    w.upsert((parent, name, kind, 0, 0, 0, 0, 0,
                              known.sha256 if known else None, None, plan.generation, 1, 0, 1))
            w.set_meta("upstream_generation", str(plan.generation))
            w.set_meta("upstream", client)
            w.set_generation(plan.generation, len(plan.rows))
            w.delete_meta(META_HELD_BACK)
            if plan.full:
                w.delete_meta(META_REPAIR)

    def _restat_names(self, w: Any, plan: Plan) -> None:
        """The names that this push did not list, of files whose names it
        changed: their rows get the link count and ctime the files have now
        (a stale row would make them look changed to the next push)."""
        listed = {r.path for r in plan.rows}
        for dev, ino in plan.touched:
            for path in self.lookup.names_of(dev, ino):
                if path in listed:
                    continue
                st = self.root.lstat(path)
                if st is not None and not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in plan.touched:
                    w.restat(path, st)

    # -- a generation held back -------------------------------------------------------------

    def hold_back(self, plan: Plan, findings: list, corrupt: set[str], client: str) -> VerifyError:
        """Publish only what no served index can see, record why; the error to raise.

        Goes live: new directories, and new data files and links at paths
        that do not exist on the edge yet (nothing served refers to them).
        Held back: the whole index group, every replacement of an existing
        data file (the index still served may name the old content: a
        replaced .deb would no longer match the Packages that lists it),
        metadata changes, deletions and directory mtimes.  The manifest gets
        the rows of what went live, but not ``upstream_generation``: the next
        push plans from the last good generation, and the held-back objects
        stay staged so that it does not send them again.
        """
        # Their directories' times wait for the next commit (see TouchedDirs).
        self.touched.add(itertools.chain((r.path for r in plan.dirs), (r.path for r in plan.files + plan.links)))
        self.staging.join_background()
        self.staging.sync()  # as in publish: staged bytes are durable before any rename
        went_live = self._new_dirs_only(plan) + self._new_files_only(plan, corrupt)
        # What went live took its object by rename; an object some path
        # still waits for stays staged: the next push does not send it again.
        held = self.manifest.get_meta("upstream_generation")
        quoted = [f.message for f in findings[:FINDINGS_QUOTED]]
        with self.manifest.writer() as w:
            for row in went_live:
                w.upsert(row.manifest_row(self.root.lstat(row.path)))
            w.set_meta("upstream", client)
            w.set_meta(META_HELD_BACK, json.dumps({
                "generation": plan.generation, "upstream": client, "at_ns": time.time_ns(),
                "findings": len(findings), "first": quoted,
                "kinds": sorted({f.kind.value for f in findings}),
            }))
        more = f" (and {len(findings) - FINDINGS_QUOTED} more)" if len(findings) > FINDINGS_QUOTED else ""
        published = sum(1 for r in went_live if r.kind != KIND_DIR)
        return VerifyError(
            f"{self.cfg.node.name}: generation {plan.generation} held back, {len(findings)} finding(s): "
            f"{'; '.join(quoted)}{more}; published only {published} new data file(s), no index file and "
            f"no deletion; still serving generation {held if held is not None else 'none'}"
        )

    def _new_dirs_only(self, plan: Plan) -> list[Row]:
        """A held-back generation's new directories, made (most are already)."""
        went_live = []
        for row in sorted(plan.dirs, key=lambda r: (planmod.depth(r.path), r.path)):
            if row.path in plan.made_dirs:
                went_live.append(row)
            elif self.root.lstat(row.path) is None:
                self.root.ensure_dir(row.path, row.mode)
                went_live.append(row)
        return went_live

    def _new_files_only(self, plan: Plan, corrupt: set[str]) -> list[Row]:
        """A held-back generation's data files and links at new paths, published."""
        root = self.root
        went_live: list[Row] = []
        uses = object_uses(plan.files)
        touched = False
        for row in plan.files + plan.links:
            if row.kind == KIND_FILE and row.path in plan.early:
                uses[row.sha256.hex()] -= 1
                went_live.append(row)  # live already (early.EarlyPublisher)
                continue
            if is_index(self.index, row) or root.lstat(row.path) is not None:
                continue
            if row.kind == KIND_FILE and row.sha256.hex() in corrupt:
                continue
            parent = split(row.path)[0]
            pst = root.lstat(parent) if parent else None
            if parent and (pst is None or not stat.S_ISDIR(pst.st_mode)):
                continue
            if row.kind == KIND_SYMLINK:
                self._publish_link(row)
            else:
                self._publish_file(row, uses)
            went_live.append(row)
            touched = True
        if touched:
            self.staging.sync()
        return went_live
