"""Verification of one group before it is published: what the agent's gate and
``syncd verify`` call.

Decides which files are signatures, which are clearsigned and which must be
signed; checks every signature with the node's keyring; follows the chain
from a signed Debian ``Release``/``InRelease`` or RPM ``repomd.xml`` to every
index file it names; hashes every file once, in one parallel pass.

It makes no publishing decision: it returns findings, and an empty list means
the group may be published.  It does no writes outside the keyring's
private GNUPGHOME.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncd.errors import IndexFormatError

from .findings import Finding, FindingKind, hash_mismatch, os_finding
from .gpg import Keyring, SigOutcome, SigResult
from .hashing import DEFAULT_BUFFER, default_workers, digest_file, hash_files
from .index import (
    BY_HASH_RE,
    MAX_INDEX_BYTES,
    IndexEntry,
    clearsigned_body,
    parse_release,
    parse_repomd,
)

log = logging.getLogger(__name__)

# Files matching these globs must carry a signature when a keyring is
# configured.  A glob without "/" matches the file name in any directory;
# one with "/" matches the whole relative path.
DEFAULT_REQUIRE_SIGNED: tuple[str, ...] = ("Release", "repomd.xml")
# X.gpg, X.asc, X.sig beside X are detached signatures of X.
DEFAULT_DETACHED_SUFFIXES: tuple[str, ...] = (".gpg", ".asc", ".sig")
# Clearsigned files: the signature and the signed text in one file.  "InX"
# beside "X" also counts as X's signature (InRelease for Release).
DEFAULT_CLEARSIGNED: tuple[str, ...] = ("InRelease",)
# Debian release files whose SHA256 list is checked against the group.
DEFAULT_DEBIAN_RELEASE: tuple[str, ...] = ("Release", "InRelease")

_OUTCOME_KIND = {
    SigOutcome.BAD: FindingKind.BAD_SIGNATURE,
    SigOutcome.UNKNOWN_KEY: FindingKind.UNKNOWN_KEY,
    SigOutcome.EXPIRED_KEY: FindingKind.EXPIRED_KEY,
    # The finding kinds are a contract with the caller; an expired signature
    # is, like an expired key, a signature that was good once.
    SigOutcome.EXPIRED_SIG: FindingKind.EXPIRED_KEY,
    SigOutcome.REVOKED_KEY: FindingKind.REVOKED_KEY,
    SigOutcome.MISSING: FindingKind.MISSING_SIGNATURE,
    SigOutcome.ERROR: FindingKind.ERROR,
}


# ---------------------------------------------------------------------------
# Which files are signatures, which are signed, which must be


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    base = posixpath.basename(relpath)
    return any(fnmatch.fnmatchcase(relpath if "/" in p else base, p) for p in patterns)


@dataclass(frozen=True)
class SignaturePlan:
    """How the files of one group relate to signatures.

    ``detached`` maps a signature to the file it signs (both in the group);
    ``orphans`` maps a signature to the file it should sign, which is not in
    the group; ``clearsigned`` lists clearsigned files; ``unsigned`` lists
    files that require a signature and have none.
    """

    detached: dict[str, str]
    orphans: dict[str, str]
    clearsigned: tuple[str, ...]
    unsigned: tuple[str, ...]


def plan_signatures(
    paths: Iterable[str],
    *,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    detached_suffixes: Sequence[str] = DEFAULT_DETACHED_SUFFIXES,
    clearsigned: Sequence[str] = DEFAULT_CLEARSIGNED,
) -> SignaturePlan:
    """Pair signatures with what they sign, for the relative paths of a group.

    ``X.gpg`` (any suffix in ``detached_suffixes``) is a signature of ``X``
    when ``X`` is in the group, or when ``X`` is a file that requires a
    signature (``Release.gpg`` without ``Release``: an orphan).  Otherwise it
    is an ordinary file: a public key ``archive.gpg`` signs nothing.
    """
    pathset = set(paths)
    detached: dict[str, str] = {}
    orphans: dict[str, str] = {}
    for p in sorted(pathset):
        for sfx in detached_suffixes:
            if p.endswith(sfx) and len(p) > len(sfx):
                target = p[: -len(sfx)]
                if target in pathset:
                    detached[p] = target
                elif not target.endswith("/") and _matches(target, require_signed):
                    orphans[p] = target
                break
    clear = tuple(sorted(p for p in pathset if p not in detached and _matches(p, clearsigned)))
    signed_targets = set(detached.values())
    unsigned = []
    for p in sorted(pathset):
        if p in detached or p in clear or not _matches(p, require_signed):
            continue
        if p in signed_targets or _in_sibling(p) in clear:
            continue
        unsigned.append(p)
    return SignaturePlan(detached, orphans, clear, tuple(unsigned))


def _in_sibling(p: str) -> str:
    """``dists/x/InRelease`` for ``dists/x/Release``: the clearsigned file that also signs it."""
    head, base = posixpath.split(p)
    return posixpath.join(head, "In" + base)


# ---------------------------------------------------------------------------
# The entry points


@dataclass
class GroupReport:
    """Findings, and per index file how many named files were checked or absent."""

    findings: list[Finding]
    checked: dict[str, int] = field(default_factory=dict)
    absent: dict[str, int] = field(default_factory=dict)


def verify_index_group(files: Mapping[str, Path], **options: Any) -> list[Finding]:
    """Everything that stops this group from being published; empty = publish.

    The keyword arguments are ``verify_index_group_report``'s, which this calls.
    """
    return verify_index_group_report(files, **options).findings


def verify_index_group_report(
    files: Mapping[str, Path],
    *,
    keyring: Keyring | None,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    expected_sha256: Mapping[str, bytes] | None = None,
    detached_suffixes: Sequence[str] = DEFAULT_DETACHED_SUFFIXES,
    clearsigned: Sequence[str] = DEFAULT_CLEARSIGNED,
    debian_release: Sequence[str] = DEFAULT_DEBIAN_RELEASE,
    workers: int | None = None,
    require_sha256_list: bool = True,
) -> GroupReport:
    """Verify one group: ``files`` maps each relative path, as it will be
    published, to where its bytes are now (staging or the published tree).

    - SHA-256 of every file in ``expected_sha256`` (the sender's manifest);
      a path there but not in ``files`` is ``missing_file``.
    - With a keyring: every detached and clearsigned signature, and every
      file matching ``require_signed`` has one.  Without: no signature checks.
    - Every Debian Release/InRelease's SHA256 list and every
      ``repodata/repomd.xml``'s checksums against the files of the group that
      they name (size and digest); files named but not in the group are not
      checked and are counted in ``absent``.
    - A Release with no SHA256 list, named by no other Release, is
      ``malformed_index`` unless ``require_sha256_list`` is False (a tree
      checked without a keyring: such a Release has no chain to check, and
      is not the archive's trust root).

    All files are hashed once, in one parallel pass; signatures are checked
    by several gpg processes at once.  Raises VerifyError only when the
    keyring itself cannot be read (a node problem, not a finding about the
    group); everything about the files is a finding.
    """
    report = GroupReport([])
    findings = report.findings
    plan = plan_signatures(files, require_signed=require_signed,
                           detached_suffixes=detached_suffixes, clearsigned=clearsigned)
    signed = _Signed()
    if keyring is not None:
        signed = _check_signatures(files, plan, keyring, workers, findings)
    chains = _Chains(files, report)
    chains.read_indices(plan, signed.clear_content, keyring is not None,
                        debian_release=debian_release, clearsigned=clearsigned)
    if require_sha256_list:
        chains.report_missing_lists()
    if keyring is not None:
        _check_release_texts(files, plan, signed, findings)
        sig_failed = {t for s, t in plan.detached.items() if t not in signed.good}
        sig_failed.update(p for p in plan.clearsigned if p not in signed.good)
        for p in _unsigned_to_report(plan.unsigned, _chain_closure(signed.good, chains.named), sig_failed,
                                     chains.named):
            findings.append(Finding(p, FindingKind.MISSING_SIGNATURE, f"{p}: requires a signature and has none"))
    for rel, digest in (expected_sha256 or {}).items():
        if rel not in files:
            findings.append(Finding(rel, FindingKind.MISSING_FILE, f"{rel}: in the manifest but not staged"))
        else:
            chains.check(rel, "sha256", "", digest, None)
    findings.extend(_run_checks(chains.checks, files, workers))
    findings[:] = sorted(set(findings))  # one file, two checks, same failure: say it once
    return report


def verify_tree_group(
    root: Path,
    rels: Iterable[str],
    *,
    keyring: Keyring | None,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    workers: int | None = None,
) -> list[Finding]:
    """The index group of a published tree (``syncd verify``, the primary's
    check before a push): ``rels`` relative to ``root``.

    Only regular files count: a path that is missing or no longer a file
    is left out of the group, so it is reported only where an index names
    it.  Without a keyring a Release without a SHA256 list is no finding
    (see ``require_sha256_list``).
    """
    files: dict[str, Path] = {}
    for rel in rels:
        where = Path(root) / rel
        try:
            if stat.S_ISREG(os.lstat(where).st_mode):
                files[rel] = where
        except OSError:
            continue
    return verify_index_group(files, keyring=keyring, require_signed=require_signed, workers=workers,
                              require_sha256_list=keyring is not None)


# ---------------------------------------------------------------------------
# Signatures


@dataclass
class _Signed:
    """What good signatures cover: files, and each good clearsigned file's signed text."""

    good: set[str] = field(default_factory=set)
    clear_content: dict[str, bytes] = field(default_factory=dict)


def _check_signatures(files: Mapping[str, Path], plan: SignaturePlan, keyring: Keyring,
                      workers: int | None, findings: list[Finding]) -> _Signed:
    signed = _Signed()
    keyring.refresh()
    for sig, target in plan.orphans.items():
        findings.append(Finding(sig, FindingKind.MISSING_FILE, f"{sig}: signs {target}, which is not in the group"))
    jobs = [(sig, target) for sig, target in plan.detached.items()] + [(p, None) for p in plan.clearsigned]

    def check(job: tuple[str, str | None]) -> SigResult:
        sig, target = job
        if target is None:
            return keyring.verify_clearsigned(files[sig], name=sig)
        return keyring.verify_detached(files[sig], files[target], name=sig)

    # One gpg process per signature (docs/performance.md, "Hashing and signatures"): run them side by side.
    n = min(len(jobs), default_workers() if workers is None else max(1, workers))
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="syncd-gpg") as pool:
        for (sig, target), res in zip(jobs, pool.map(check, jobs)):
            log.debug("%s", res.message)
            if not res.good:
                findings.append(Finding(sig, _OUTCOME_KIND[res.outcome], res.message))
            elif target is None:
                signed.good.add(sig)
                signed.clear_content[sig] = res.content or b""
            else:
                signed.good.add(target)
    return signed


def _check_release_texts(files: Mapping[str, Path], plan: SignaturePlan, signed: _Signed,
                         findings: list[Finding]) -> None:
    """A Release stands on its InRelease's signature: it must say the same."""
    for p in sorted(files):
        sibling = _in_sibling(p)
        if p in plan.detached.values() or sibling not in signed.clear_content:
            continue
        if not _same_text(files[p], signed.clear_content[sibling]):
            findings.append(Finding(p, FindingKind.INDEX_MISMATCH, f"{p}: differs from the signed text of {sibling}"))
        else:
            signed.good.add(p)


def _same_text(path: Path, signed: bytes) -> bool:
    # Clearsigning does not sign trailing whitespace; compare what it does sign.
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError:
        return False

    def canon(b: bytes) -> list[bytes]:
        return [line.rstrip() for line in b.rstrip().split(b"\n")]

    return canon(data) == canon(signed)


def _unsigned_to_report(unsigned: Iterable[str], covered: set[str], sig_failed: set[str],
                        named: Mapping[str, set[str]]) -> list[str]:
    """Unsigned required files to report, one finding per root cause.

    A file named by an index that already failed (bad or missing signature)
    is not reported again: the index is.  A ring of unsigned indices naming
    one another, with no root, is reported whole.
    """
    pending = {p for p in unsigned if p not in covered}
    namers: dict[str, set[str]] = {}
    for index, names in named.items():
        for rel in names:
            namers.setdefault(rel, set()).add(index)
    roots = {p for p in pending if not namers.get(p, set()) & (pending | sig_failed)}
    inherited = _chain_closure(roots | sig_failed, {i: n & pending for i, n in named.items()})
    return sorted(roots | (pending - inherited))


def _chain_closure(roots: Iterable[str], named: Mapping[str, set[str]]) -> set[str]:
    """Files reached from well-signed indices through the indices they name.

    Only a path from a good signature counts: two unsigned indices naming
    each other cover nothing.
    """
    seen = set(roots)
    todo = list(seen)
    while todo:
        for rel in named.get(todo.pop(), ()):
            if rel not in seen:
                seen.add(rel)
                todo.append(rel)
    return seen


# ---------------------------------------------------------------------------
# Index chains

# (relpath, algo) -> list of (index that names it, or "" for the manifest;
# expected digest; expected size or None)
_Checks = dict[tuple[str, str], list[tuple[str, bytes, int | None]]]


class _Chains:
    """What the group's indices name: the digests to check per file, and
    which files of the group each index names (for the signature chain)."""

    def __init__(self, files: Mapping[str, Path], report: GroupReport) -> None:
        self.files = files
        self.report = report
        self.checks: _Checks = {}
        self.named: dict[str, set[str]] = {}
        self.no_sha256: list[str] = []

    def check(self, rel: str, algo: str, index: str, digest: bytes, size: int | None) -> None:
        self.checks.setdefault((rel, algo), []).append((index, digest, size))

    def _want(self, index: str, entries: Iterable[IndexEntry], base: str) -> None:
        n_absent = 0
        names = self.named.setdefault(index, set())
        for e in entries:
            rel = posixpath.normpath(posixpath.join(base, e.path)) if base else e.path
            if rel.startswith("../") or rel == "..":
                self.report.findings.append(Finding(index, FindingKind.MALFORMED_INDEX,
                                                    f"{index}: names {e.path} outside the tree"))
            elif rel in self.files:
                self.check(rel, e.algo, index, e.digest, e.size)
                names.add(rel)
            else:
                n_absent += 1
        self.report.checked[index], self.report.absent[index] = len(names), n_absent

    def read_indices(self, plan: SignaturePlan, clear_content: Mapping[str, bytes], signatures_checked: bool, *,
                     debian_release: Sequence[str], clearsigned: Sequence[str]) -> None:
        findings = self.report.findings

        def parsed(p: str, parse: Callable[[bytes], Any], clear: bool) -> Any:
            text = _index_text(p, self.files[p], findings, clear_content, signatures_checked, clearsigned=clear)
            if text is None:
                return None
            try:
                return parse(text)
            except IndexFormatError as err:
                findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: {err}"))
                return None

        for p in sorted(self.files):
            base = posixpath.basename(p)
            if _matches(p, debian_release) and p not in plan.detached:
                rel = parsed(p, parse_release, _matches(p, clearsigned))
                if rel is None:
                    continue
                if rel.sha256 is None:
                    self.no_sha256.append(p)
                else:
                    self._want(p, rel.sha256, posixpath.dirname(p))
            elif base == "repomd.xml" and posixpath.basename(posixpath.dirname(p)) == "repodata":
                entries = parsed(p, parse_repomd, False)
                if entries is not None:
                    self._want(p, entries, posixpath.dirname(posixpath.dirname(p)))
            elif BY_HASH_RE.search(p):
                self.check(p, "sha256", "its by-hash name", bytes.fromhex(base), None)

    def report_missing_lists(self) -> None:
        """A Release without a SHA256 list that no other Release names.

        Debian's per-component Release files (main/binary-amd64/Release)
        carry neither a signature nor a SHA256 list: the suite's Release
        names them, and its signature covers them through that chain.
        """
        named_by_any = set().union(*self.named.values()) if self.named else set()
        for p in self.no_sha256:
            if p not in named_by_any:
                self.report.findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: has no SHA256 field"))


def _index_text(p: str, where: Path, findings: list[Finding], clear_content: Mapping[str, bytes],
                signatures_checked: bool, *, clearsigned: bool) -> bytes | None:
    """The bytes of an index to parse, or None (a finding is already recorded)."""
    if clearsigned and signatures_checked:
        # Only gpg's output of a good signature is trusted: a bad one already
        # has a finding, and its text is not worth parsing.
        return clear_content.get(p)
    try:
        with open(where, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError as err:
        findings.append(os_finding(p, err))
        return None
    if len(data) > MAX_INDEX_BYTES:
        findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: larger than {MAX_INDEX_BYTES} bytes"))
        return None
    if clearsigned:
        try:
            return clearsigned_body(data)
        except IndexFormatError as err:
            findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: {err}"))
            return None
    return data


def _run_checks(checks: _Checks, files: Mapping[str, Path], workers: int | None) -> list[Finding]:
    findings: list[Finding] = []
    sizes: dict[str, int] = {}
    for rel, _algo in checks:
        if rel in sizes:
            continue
        try:
            sizes[rel] = os.stat(files[rel]).st_size
        except OSError as err:
            sizes[rel] = -1
            findings.append(os_finding(rel, err))
    digests: dict[tuple[str, str], bytes] = {}
    by_path: dict[Path, list[str]] = {}
    for rel, algo in checks:
        if algo == "sha256" and sizes[rel] >= 0:
            by_path.setdefault(files[rel], []).append(rel)
    for where, got in hash_files(by_path, workers=workers):
        for rel in by_path[where]:
            if isinstance(got, OSError):
                findings.append(os_finding(rel, got))
            else:
                digests[(rel, "sha256")] = got
    buf = bytearray(DEFAULT_BUFFER)
    for rel, algo in checks:
        if algo != "sha256" and sizes[rel] >= 0:
            try:
                digests[(rel, algo)] = digest_file(files[rel], algo, buf)
            except OSError as err:
                findings.append(os_finding(rel, err))
    for (rel, algo), wanted in checks.items():
        got = digests.get((rel, algo))
        if got is None:
            # Unreadable or missing: already a finding, and nothing to compare.
            continue
        for index, digest, size in wanted:
            if not index:
                if got != digest:
                    findings.append(hash_mismatch(rel, got, digest))
            elif size is not None and sizes[rel] != size:
                findings.append(Finding(rel, FindingKind.INDEX_MISMATCH,
                                        f"{rel}: {sizes[rel]} bytes, {index} says {size}"))
            elif got != digest:
                findings.append(Finding(rel, FindingKind.INDEX_MISMATCH,
                                        f"{rel}: {algo} {got.hex()} differs from {digest.hex()} in {index}"))
    return findings
