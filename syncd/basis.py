"""Choosing a basis for a new file: the edge's file it goes as a delta against.

A large file that is renamed and edited in the same push (a respun ISO under
a new name, ``image-1.2.iso`` becoming ``image-1.3.iso``) has no copy on the
edge by SHA-256 and no old copy at its own path.  Like rsync's ``--fuzzy``,
the agent then takes the delta against another file it has: one that the
same plan deletes or replaces (so it is still there until the commit), in
the same directory, with the most similar name, or else of a similar size.

Everything here is a pure function of its arguments, with bounded memory
and bounded work per choice: at most :data:`PER_DIR` candidates are kept per
directory, :data:`PER_STEM` per name stem (so a directory with thousands of
deletions still finds the old version of a file), and :data:`MAX_CANDIDATES`
in all.  Reading the chosen file, safely, is the agent's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Names at least this similar (see :func:`similarity`) are a name match.
NAME_MIN = 0.5
#: Without a name match, a candidate whose size is within this ratio of the
#: new file's (smaller / larger) is a size match.
SIZE_MIN = 0.9
#: Candidates kept per directory, per (directory, stem), and in all.
PER_DIR = 32
PER_STEM = 4
MAX_CANDIDATES = 65_536

_DIGITS = re.compile(rb"[0-9]+")


def similarity(a: bytes, b: bytes) -> float:
    """How alike two file names are, from 0.0 (nothing in common at either
    end) to 1.0 (equal): the common prefix and the common suffix (not
    overlapping it) over the longer name's length.

    A version bump keeps both ends: ``image-1.2.iso`` and ``image-1.3.iso``
    share ``image-1.`` and ``.iso``, 12 of 13 bytes.  Computed in time
    linear in the names (no edit distance), so choosing among a directory's
    candidates stays cheap.
    """
    if a == b:
        return 1.0
    longest = max(len(a), len(b))
    shortest = min(len(a), len(b))
    prefix = 0
    while prefix < shortest and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return (prefix + suffix) / longest


def stem(name: bytes) -> bytes:
    """The name with each run of digits as one ``0``: the versions of one
    file share it (``image-1.2.iso``, ``image-1.10.iso``: ``image-0.0.iso``)."""
    return _DIGITS.sub(b"0", name)


def closeness(a: int, b: int) -> float:
    """Sizes' ratio, smaller over larger (1.0 when equal, 0.0 when one is empty)."""
    if a == b:
        return 1.0
    return min(a, b) / max(a, b) if min(a, b) > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Candidate:
    name: bytes
    size: int


class Candidates:
    """The files a plan deletes or replaces, by directory, that may serve
    as a basis.  Bounded: what comes past the limits is not kept."""

    def __init__(self, per_dir: int = PER_DIR, per_stem: int = PER_STEM, limit: int = MAX_CANDIDATES) -> None:
        self.per_dir = per_dir
        self.per_stem = per_stem
        self.limit = limit
        self.count = 0
        self._by_dir: dict[bytes, list[Candidate]] = {}
        self._by_stem: dict[tuple[bytes, bytes], list[Candidate]] = {}

    def add(self, parent: bytes, name: bytes, size: int) -> None:
        if self.count >= self.limit:
            return
        cand = Candidate(name, size)
        kept = False
        in_dir = self._by_dir.setdefault(parent, [])
        if len(in_dir) < self.per_dir:
            in_dir.append(cand)
            kept = True
        # Past a directory's limit, a name's own versions still find each other.
        same_stem = self._by_stem.setdefault((parent, stem(name)), [])
        if len(same_stem) < self.per_stem:
            same_stem.append(cand)
            kept = True
        if kept:
            self.count += 1

    def choose(self, parent: bytes, name: bytes, size: int) -> bytes | None:
        """The name, in ``parent``, of the best basis for a new file ``name``
        of ``size`` bytes, or None: the most similar name at or above
        :data:`NAME_MIN` (ties: the closer size, then the smaller name), else
        the closest size at or above :data:`SIZE_MIN`."""
        seen: dict[bytes, Candidate] = {}
        for cand in self._by_stem.get((parent, stem(name)), ()):
            seen[cand.name] = cand
        for cand in self._by_dir.get(parent, ()):
            seen.setdefault(cand.name, cand)
        seen.pop(name, None)  # (its own old copy is an ordinary delta, not this)
        return best(name, size, list(seen.values()))


def best(name: bytes, size: int, candidates: list[Candidate]) -> bytes | None:
    """The choice of :meth:`Candidates.choose` among ``candidates``."""
    by_name = [(similarity(name, c.name), closeness(size, c.size), c.name) for c in candidates]
    named = [k for k in by_name if k[0] >= NAME_MIN]
    if named:
        return min(named, key=lambda k: (-k[0], -k[1], k[2]))[2]
    sized = [(k[1], k[2]) for k in by_name if k[1] >= SIZE_MIN]
    if sized:
        return min(sized, key=lambda k: (-k[0], k[1]))[1]
    return None
