"""The gate before publishing: a generation goes live only if it passes.

Every staged object that this session did not hash itself is hashed again
against its SHA-256 (except those a prewarm stager logged as checked during
this boot: staging.VerifiedLog), and when the generation touches an index
file, the index group of the tree as it will be (changed files from
staging, the others from root) goes through ``verify.verify_index_group``:
signatures against ``[verify] keyring`` when one is set, Release/repomd
chains always.  Any finding holds the generation back
(publish.Publisher.hold_back).

syncd.verify is imported in the background from the upstream's hello on
(docs/performance.md, "Start-up"), and here when first used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..fsops import SafeRoot, unlink_at
from ..manifest import KIND_FILE, Manifest, fspath, split
from ..plan import IndexMatcher
from ..staging import verified_this_boot
from .plan import Plan, is_index
from .staged import Staging

if TYPE_CHECKING:
    from .. import verify as verifymod


class Gate:
    """The verification of the session's generations before they are published."""

    def __init__(self, cfg: Config, manifest: Manifest, root: SafeRoot, staging: Staging,
                 index: IndexMatcher) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.root = root
        self.staging = staging
        self.index = index
        self._keyring: verifymod.Keyring | None = None  # opened at the first index group checked

    def check(self, plan: Plan) -> tuple[list[verifymod.Finding], set[str]]:
        """Findings (empty: publish) and the staged objects found corrupt
        (already removed from staging, so that the next push sends them again).

        The objects this session received or copied were hashed from the
        very bytes written; one staged by an earlier session (a killed push,
        a prewarm) has waited in staging since, unsynced, and is read again,
        unless a prewarm stager logged it as checked during this boot (a
        crash that could have lost its bytes changes the boot).  The index
        group is checked only when this generation changes, adds or deletes
        an index file; otherwise the group on the edge is the one checked
        when it was published.  Raises VerifyError when the keyring itself
        is unusable: a node problem, and nothing is published.
        """
        from .. import verify as verifymod

        findings, corrupt = self._check_objects(plan)
        changed = plan.files + plan.metas + plan.links + [m for g in plan.groups for m in g.members]
        if any(is_index(self.index, r) for r in changed) or any(self.index(p) for p in plan.deletes):
            group, expected = self._index_group(plan)
            keyring = self._keyring_or_none()
            findings += verifymod.verify_index_group(
                group, keyring=keyring,
                require_signed=self.cfg.verify.require_signed or verifymod.DEFAULT_REQUIRE_SIGNED,
                expected_sha256=expected, workers=self.cfg.node.hash_workers,
                require_sha256_list=keyring is not None,
            )
        return sorted(set(findings)), corrupt

    def _check_objects(self, plan: Plan) -> tuple[list[verifymod.Finding], set[str]]:
        from .. import verify as verifymod

        findings: list[verifymod.Finding] = []
        corrupt: set[str] = set()
        first_path: dict[str, bytes] = {}
        for row in plan.files:
            first_path.setdefault(row.sha256.hex(), row.path)
        verified_now = self.staging.verified_now
        # Objects checked in this boot by a stager (prewarm) need no second
        # reading, but must still be there.
        logged = verified_this_boot(self.staging.fd) - verified_now if first_path else set()
        for name in logged & first_path.keys():
            if not self.staging.exists(name):
                rel = fspath(first_path[name])
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.MISSING_FILE,
                                                  f"{rel}: staged object {name} is gone"))
        trusted = verified_now | logged
        objects = {self.staging.path / name: name for name in first_path if name not in trusted}
        for where, got in verifymod.hash_files(objects, workers=self.cfg.node.hash_workers):
            name = objects[where]
            rel = fspath(first_path[name])
            if isinstance(got, OSError):
                corrupt.add(name)
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.MISSING_FILE,
                                                  f"{rel}: staged object {name} is gone: {got.strerror or got}"))
            elif got.hex() != name:
                corrupt.add(name)
                findings.append(verifymod.Finding(rel, verifymod.FindingKind.HASH_MISMATCH,
                                                  f"{rel}: staged object differs from its SHA-256 {name}"))
        unlink_at(self.staging.fd, *corrupt)  # so that the next push sends them again
        return findings, corrupt

    def _keyring_or_none(self) -> verifymod.Keyring | None:
        from .. import verify as verifymod

        if self.cfg.verify.keyring is None:
            return None
        if self._keyring is None:
            home = self.cfg.verify.gnupghome or self.cfg.node.state_dir / "gnupg"
            self._keyring = verifymod.Keyring(self.cfg.verify.keyring, home)
        return self._keyring

    def _index_group(self, plan: Plan) -> tuple[dict[str, Path], dict[str, bytes]]:
        """Every index file of the tree as it will be after this generation,
        mapped to where its bytes are now; and the sender's SHA-256 of the
        staged ones."""
        root = Path(os.fsdecode(self.cfg.node.root))
        deleted = set(plan.deletes)

        def gone(path: bytes) -> bool:
            while path:
                if path in deleted:
                    return True
                path = split(path)[0]
            return False

        def on_edge(path: bytes) -> Path | None:
            st = self.root.lstat(path)
            return root / os.fsdecode(path) if st is not None and stat.S_ISREG(st.st_mode) else None

        staged = {r.path: r for r in plan.files}
        # A name to be linked has its group's content: staged, or the first name's file.
        linked = {m.path: g for g in plan.groups for m in g.members}
        group: dict[str, Path] = {}
        expected: dict[str, bytes] = {}
        listed: set[bytes] = set()
        for row in plan.rows:
            listed.add(row.path)
            if row.deleted or row.kind != KIND_FILE or not is_index(self.index, row) or gone(row.path):
                continue
            rel = os.fsdecode(row.path)
            source = linked[row.path].first.path if row.path in linked else row.path
            if source in staged:
                group[rel] = self.staging.path / row.sha256.hex()
                expected[rel] = row.sha256
            elif (where := on_edge(source)) is not None:
                group[rel] = where
        # O(tree) inside SQLite, but only for a generation that changes the index group.
        for path in self.manifest.live_files_matching(self.index):
            if path in listed or gone(path):
                continue
            if (where := on_edge(path)) is not None:
                group[os.fsdecode(path)] = where
        return group, expected

    def close(self) -> None:
        if self._keyring is not None:
            self._keyring.close()
