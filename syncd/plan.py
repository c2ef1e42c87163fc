"""Planning: pure decisions about one generation's changes, no I/O.

Which paths are index files (published last, together), the order in which
a generation reaches the served tree, the deletion guard, and the itemized
form of a plan that ``run --dry-run`` prints.  Everything here is a function
of its arguments, so property tests can drive it directly.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterable, Sequence

from .config import DEFAULT_INDEX_PATTERNS
from .errors import DeletionGuardError, ProtocolError
from .messages import ACTIONS, COPY, DELETE, DELTA, DIR, HLINK, LINK, META, NEW


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

# What the agent will do with one path, as the agent decides it: the wire's
# item actions (syncd.messages).


@dataclass(frozen=True)
class Item:
    action: str
    path: bytes
    size: int = 0
    source: bytes | None = None  # COPY: the edge's existing file with the same content; HLINK: the name linked to
    #: rsync's ``%i`` of this change as the agent saw it (``itemize``), or
    #: None from an agent that does not itemize.
    flags: str | None = None
    is_dir: bool = False
    target: bytes | None = None  # a symlink's target, shown as rsync shows it

    def line(self) -> str:
        text = f"{self.action:<7}{self.path.decode('utf-8', 'backslashreplace')}"
        if self.source is not None:
            source = self.source.decode('utf-8', 'backslashreplace')
            text += f" => {source}" if self.action == HLINK else f"  (from {source})"
        return text

    def itemized(self) -> str:
        """``FLAGS PATH`` as ``rsync -i`` prints it: '/' after a directory,
        `` -> TARGET`` after a symlink."""
        flags = self.flags or _GUESS.get(self.action, "?") + "?" * 10
        text = f"{flags:<11} {self.path.decode('utf-8', 'backslashreplace')}"
        if self.is_dir:
            text += "/"
        if self.target is not None:
            text += " -> " + self.target.decode("utf-8", "backslashreplace")
        if self.action == HLINK and self.source is not None:
            text += " => " + self.source.decode("utf-8", "backslashreplace")
        return text

    @classmethod
    def from_wire(cls, raw: list, size: int, kind: str | None, target: bytes | None) -> "Item":
        """An item of ``needs``/``planned`` (already checked but for its
        optional sixth field, ``itemize``); ``kind`` ("f", "d", "L") and
        ``target`` as this node's manifest has the path, None if it lacks it."""
        action, path, _need, source = raw[:4]
        flags = raw[5] if len(raw) > 5 else None
        is_dir = kind == "d"
        if flags is not None:
            if not isinstance(flags, str) or not _FLAGS_RE.fullmatch(flags):
                raise ValueError(f"itemize {flags!r:.40} is not rsync's %i")
            is_dir = flags.endswith("/")
            flags = flags.rstrip("/")
        elif action == DELETE:  # an agent that does not itemize: what is known
            flags = DELETING
        elif kind is not None:
            flags = _GUESS.get(action, "?") + kind + "?" * 9
        return cls(action, path, size, source if isinstance(source, bytes) else None, flags, is_dir,
                   target if kind == "L" and action != DELETE else None)


# rsync's %i: update type, file type, nine attributes; or the deletion message.
# On the wire a '/' follows when the path is a directory.
DELETING = "*deleting  "
_FLAGS_RE = re.compile(r"(?:[<>ch.][fdLDS][.+ ?cstTpoguax]{9}|\*deleting  )/?")
_GUESS = {NEW: ">", DELTA: ">", COPY: ">", META: ".", LINK: "c", DIR: "c", DELETE: "*", HLINK: "h"}


def itemize(kind: str, st: os.stat_result | None, *, size: int, mtime_ns: int, mode: int,
            transfer: bool = False, target_changed: bool = False) -> str:
    """rsync's ``%i`` for one path a push changes on an edge (what ``rsync
    -rlptHi`` prints for it), from the edge's lstat ``st`` (None: absent) and
    what the path becomes: ``kind`` "f", "d" or "L", its ``size`` (files),
    ``mtime_ns`` and ``mode``; ``transfer``: a file's content is written
    (sent, patched or copied from a file of the same content);
    ``target_changed``: a symlink that exists points elsewhere.

    Owner, group, atimes, ACLs and xattrs are not what syncd copies: their
    letters stay '.'.  Without rsync's --checksum, rsync never says 'c' of a
    regular file: neither does this.
    """
    is_type = {"f": stat.S_ISREG, "d": stat.S_ISDIR, "L": stat.S_ISLNK}[kind]
    if st is None or not is_type(st.st_mode):
        return (">" if kind == "f" else "c") + kind + "+" * 9
    if kind == "f":
        update = ">" if transfer else "."
    else:
        update = "c" if target_changed else "."
    return "".join((
        update, kind,
        "c" if target_changed else ".",
        "s" if kind == "f" and st.st_size != size else ".",
        "t" if st.st_mtime_ns != mtime_ns else ".",
        "p" if kind != "L" and stat.S_IMODE(st.st_mode) != mode else ".",
        ".....",
    ))


def hard_link_flags(flags: str) -> str:
    """``flags`` (of the file a name becomes) for a name made one more link
    of another name's file: rsync -H says ``h``, and spaces for attributes
    when none changes (``hf          b => a``)."""
    attrs = flags[2:]
    return "h" + flags[1] + (" " * len(attrs) if attrs == "." * len(attrs) else attrs)


def summarize(items: Iterable[Item]) -> dict[str, int]:
    counts = dict.fromkeys(ACTIONS, 0)
    for item in items:
        counts[item.action] += 1
    return counts
