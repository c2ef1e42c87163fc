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
from .errors import DeletionGuardError


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


# -- itemized plans (``run --dry-run``) -----------------------------------------

# What the agent will do with one path, as the agent decides it.
NEW, DELTA, COPY, META, LINK, DELETE, DIR = "new", "delta", "copy", "meta", "link", "delete", "dir"
ACTIONS = (NEW, DELTA, COPY, META, LINK, DELETE, DIR)


@dataclass(frozen=True)
class Item:
    action: str
    path: bytes
    size: int = 0
    source: bytes | None = None  # COPY: the edge's existing file with the same content

    def line(self) -> str:
        text = f"{self.action:<7}{self.path.decode('utf-8', 'backslashreplace')}"
        if self.source is not None:
            text += f"  (from {self.source.decode('utf-8', 'backslashreplace')})"
        return text


def summarize(items: Iterable[Item]) -> dict[str, int]:
    counts = dict.fromkeys(ACTIONS, 0)
    for item in items:
        counts[item.action] += 1
    return counts
