"""Planning: pure decisions about one generation's changes, no I/O.

Which paths are index files (published last, together), the order in which
a generation reaches the served tree, the deletion guard, and the itemized
form of a plan that ``run --dry-run`` prints.  Everything here is a function
of its arguments, so property tests can drive it directly.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .config import DEFAULT_INDEX_PATTERNS
from .errors import DeletionGuardError, ProtocolError


# Names of files compressed already: zstd does not shrink them, and a new
# version shares next to no bytes with an old one (a delta against another
# file's blocks does not pay).
COMPRESSED_SUFFIXES = (b".gz", b".xz", b".bz2", b".zst", b".lz4", b".deb", b".udeb", b".rpm", b".zip",
                       b".jpg", b".png", b".7z", b".lzma", b".squashfs", b".whl")


class IndexMatcher:
    """Classifies paths as index files by glob patterns.

    A pattern without ``/`` matches the last path component anywhere; one with
    ``/`` matches the end of the path at a component boundary (``**`` spans
    directories, ``*`` does not).
    """

    def __init__(self, patterns: Sequence[str] = DEFAULT_INDEX_PATTERNS) -> None:
        self.patterns = tuple(patterns)
        name_res, path_res = [], []
        for pat in self.patterns:
            if "/" in pat:
                path_res.append(_glob_to_regex(pat))
            else:
                name_res.append(fnmatch.translate(pat))
        self._name = re.compile("|".join(name_res).encode(), re.S) if name_res else None
        self._path = re.compile(b"(?:^|/)(?:" + b"|".join(path_res) + b")$", re.S) if path_res else None

    def __call__(self, path: bytes) -> bool:
        name = path.rpartition(b"/")[2]
        if self._name is not None and self._name.fullmatch(name):
            return True
        return bool(self._path is not None and self._path.search(path))


def _glob_to_regex(pat: str) -> bytes:
    out = []
    i = 0
    while i < len(pat):
        if pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return "".join(out).encode()


# -- the deletion guard ---------------------------------------------------------


def check_deletions(deleting: int, live: int, max_share: float, *, force: bool, where: str) -> None:
    """Refuse a plan deleting more than ``max_share`` of ``live`` entries.

    An empty tree (a new mirror) has nothing to protect.  ``max_share`` of 1.0
    turns the guard off.
    """
    if force or deleting == 0 or live == 0 or max_share >= 1.0:
        return
    if deleting > max_share * live:
        raise DeletionGuardError(
            f"{where}: plan deletes {deleting} of {live} entries ({100.0 * deleting / live:.1f}%), "
            f"above max_delete {100.0 * max_share:g}%; nothing was changed "
            "(rerun with --force-deletes if this is intended)"
        )


# -- ordering -----------------------------------------------------------------


def depth(path: bytes) -> int:
    return path.count(b"/")


def deletion_order(paths: Iterable[bytes]) -> list[bytes]:
    """Deepest first, so a directory is removed after what was inside it."""
    return sorted(paths, key=lambda p: (-depth(p), p))


# -- hard links: the sender's groups, checked -------------------------------------


def _show(path: bytes) -> str:
    """A name for a one-line message (control bytes would break the line)."""
    return path.decode("utf-8", "backslashreplace").translate({c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)})


class _OpenGroup:
    __slots__ = ("first", "sha256", "names", "left", "payload")

    def __init__(self, first: bytes, sha256: bytes, names: int, payload: object) -> None:
        self.first, self.sha256, self.names, self.left, self.payload = first, sha256, names, names - 1, payload


class LinkChecker:
    """The hard-link groups a push announces, checked row by row in push order.

    A group of ``names`` names is announced by its first name's row, which
    comes before the others.  Each other name must point at a first name
    announced earlier in this push, with the same content (SHA-256) and the
    same count, and no more names may come than announced; at the end
    (:meth:`end`) every group must be complete.  What the sender says is
    never trusted beyond that: any other claim is a ProtocolError, before
    anything of the push is published.  Only groups still waiting for names
    are held (memory follows the open groups, not the tree).
    """

    def __init__(self) -> None:
        self._open: dict[bytes, _OpenGroup] = {}

    def first(self, path: bytes, names: int, sha256: bytes, payload: object = None) -> None:
        """``path`` is the first of ``names`` names of one file (content ``sha256``)."""
        if names < 2:
            raise ProtocolError(f"entries: {_show(path)}: a hard-link group of {names} name(s)")
        if path in self._open:
            raise ProtocolError(f"entries: {_show(path)}: announced as the first name of two groups")
        self._open[path] = _OpenGroup(path, sha256, names, payload)

    def member(self, path: bytes, first: bytes, names: int, sha256: bytes) -> tuple[object, bool]:
        """``path`` is one more name of ``first``'s file: that group's payload,
        and whether this was its last name."""
        group = self._open.get(first)
        if group is None:
            raise ProtocolError(f"entries: {_show(path)}: hard link to {_show(first)}, which is not the first "
                                "name of a group earlier in this push")
        if group.sha256 != sha256:
            raise ProtocolError(f"entries: {_show(path)}: hard link to {_show(first)}, whose content differs")
        if group.names != names:
            raise ProtocolError(f"entries: {_show(path)}: hard link to {_show(first)} in a group of {names} "
                                f"names, announced with {group.names}")
        group.left -= 1
        if group.left == 0:
            del self._open[first]
            return group.payload, True
        return group.payload, False

    def end(self) -> None:
        """No more rows: every group announced must be complete."""
        if self._open:
            group = next(iter(self._open.values()))
            raise ProtocolError(f"entries_end: the hard-link group of {_show(group.first)} announced "
                                f"{group.names} names, {group.names - group.left} came")


# -- itemized plans (``run --dry-run``) -----------------------------------------

# What the agent will do with one path, as the agent decides it.  LINK is a
# symlink; HLINK makes the path one more name of another path's file (a hard link).
NEW, DELTA, COPY, META, LINK, DELETE, DIR, HLINK = "new", "delta", "copy", "meta", "link", "delete", "dir", "hlink"
ACTIONS = (NEW, DELTA, COPY, META, LINK, DELETE, DIR, HLINK)


@dataclass(frozen=True)
class Item:
    action: str
    path: bytes
    size: int = 0
    source: bytes | None = None  # COPY: the edge's existing file with the same content; HLINK: the name linked to

    def line(self) -> str:
        text = f"{self.action:<7}{self.path.decode('utf-8', 'backslashreplace')}"
        if self.source is not None:
            source = self.source.decode('utf-8', 'backslashreplace')
            text += f" => {source}" if self.action == HLINK else f"  (from {source})"
        return text


def summarize(items: Iterable[Item]) -> dict[str, int]:
    counts = dict.fromkeys(ACTIONS, 0)
    for item in items:
        counts[item.action] += 1
    return counts
