"""Include/exclude rules in rsync's pattern style, for partial mirrors.

A :class:`Filter` is an ordered list of rules, each ``+ PATTERN`` (include)
or ``- PATTERN`` (exclude); the first rule whose pattern matches a path
decides, and a path no rule matches is included.  Patterns follow rsync's
filter rules, so an operator can move a working ``--include``/``--exclude``
list into ``sync.ini`` unchanged:

- a leading ``/`` anchors the pattern at the root of the tree; otherwise it
  may match at any depth: ``foo`` matches a final component ``foo``
  anywhere, and ``sub/foo`` matches ``sub/foo`` and ``x/sub/foo`` alike (a
  pattern matches the end of the path, starting at a component boundary);
- a trailing ``/`` matches directories only;
- ``*`` is any run of bytes without ``/``, ``**`` any run including ``/``,
  ``?`` one byte that is not ``/``, ``[...]`` a class (``!`` or ``^``
  negates; ranges; ``[:alpha:]`` and friends), never matching ``/``;
- a backslash escapes the next character when the pattern holds a wildcard;
- ``dir/***`` matches ``dir`` itself and everything below it.

Excluding a directory excludes its whole subtree, whatever the later rules
say (rsync never descends into it): :meth:`Filter.excluded_path` applies that.

Patterns are compiled once into one regular expression over bytes per kind
of entry (files, directories); names need not be UTF-8 (patterns given as
``str`` are encoded like file names, ``os.fsencode``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

# Parent decisions are cached per directory; the cache is dropped when it
# grows past this, keeping memory bounded on any tree (invariant 9).
_CACHE_LIMIT = 1 << 17

_CLASSES: dict[bytes, bytes] = {
    b"alnum": rb"0-9A-Za-z",
    b"alpha": rb"A-Za-z",
    b"blank": rb" \t",
    b"cntrl": rb"\x00-\x1f\x7f",
    b"digit": rb"0-9",
    b"graph": rb"\x21-\x7e",
    b"lower": rb"a-z",
    b"print": rb"\x20-\x7e",
    b"punct": rb"!-/:-@\[-`{-~",
    b"space": rb"\t-\r ",
    b"upper": rb"A-Z",
    b"xdigit": rb"0-9A-Fa-f",
}

_SLASH = 0x2F
_BACKSLASH = 0x5C


@dataclass(frozen=True)
class Rule:
    """One parsed rule: include or exclude, the pattern as written, its regexes.

    The regexes match ``b"/" + path`` whole; ``file_regex`` is None for a rule
    that matches directories only.
    """

    include: bool
    pattern: str
    file_regex: bytes | None
    dir_regex: bytes

    def matches(self, path: bytes, is_dir: bool) -> bool:
        rx = self.dir_regex if is_dir else self.file_regex
        return rx is not None and re.fullmatch(rx, b"/" + path, re.DOTALL) is not None

    def __str__(self) -> str:
        return f"{'+' if self.include else '-'} {self.pattern}"


def _byte(b: int) -> bytes:
    return b"\\x%02x" % b


def _class(pat: bytes, i: int, pattern: str) -> tuple[bytes, int]:
    """Translate the class starting at ``pat[i] == '['``; returns (regex, index after ']')."""
    n = len(pat)
    i += 1
    negated = i < n and pat[i] in b"!^"
    if negated:
        i += 1
    parts: list[bytes] = []
    first = True
    prev: int | None = None
    while True:
        if i >= n:
            raise ValueError(f"filter pattern {pattern!r}: unterminated '['")
        c = pat[i]
        if c == ord("]") and not first:
            i += 1
            break
        first = False
        if c == _BACKSLASH:
            i += 1
            if i >= n:
                raise ValueError(f"filter pattern {pattern!r}: unterminated '['")
            c = pat[i]
            parts.append(_byte(c))
            prev = c
            i += 1
        elif c == ord("-") and prev is not None and i + 1 < n and pat[i + 1] != ord("]"):
            i += 1
            hi = pat[i]
            if hi == _BACKSLASH:
                i += 1
                if i >= n:
                    raise ValueError(f"filter pattern {pattern!r}: unterminated '['")
                hi = pat[i]
            i += 1
            parts.pop()
            if hi >= prev:
                parts.append(_byte(prev) + b"-" + _byte(hi))
            # A reversed range matches nothing, as in rsync's matcher.
            prev = None
        elif c == ord("[") and pat[i + 1 : i + 2] == b":":
            end = pat.find(b":]", i + 2)
            if end < 0:
                parts.append(_byte(c))  # no closing ":]": a literal '['
                prev = c
                i += 1
                continue
            name = pat[i + 2 : end]
            if name not in _CLASSES:
                raise ValueError(f"filter pattern {pattern!r}: unknown class [:{name.decode('ascii', 'replace')}:]")
            parts.append(_CLASSES[name])
            prev = None
            i = end + 2
        else:
            parts.append(_byte(c))
            prev = c
            i += 1
    body = b"".join(parts)
    if negated:
        return b"[^/" + body + b"]", i
    if not body:
        return b"(?!)", i
    return b"(?!/)[" + body + b"]", i


def _translate(pat: bytes, pattern: str) -> bytes:
    """Regex (no anchors) for a wildcard pattern body."""
    wild = any(ch in pat for ch in (b"*", b"?", b"["))
    out: list[bytes] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == ord("*"):
            j = i
            while j < n and pat[j] == ord("*"):
                j += 1
            out.append(b".*" if j - i > 1 else b"[^/]*")
            i = j
        elif c == ord("?"):
            out.append(b"[^/]")
            i += 1
        elif c == ord("["):
            rx, i = _class(pat, i, pattern)
            out.append(rx)
        elif c == _BACKSLASH and wild and i + 1 < n:
            out.append(_byte(pat[i + 1]))
            i += 2
        else:
            out.append(_byte(c))
            i += 1
    return b"".join(out)


def compile_pattern(pattern: str | bytes) -> tuple[bytes | None, bytes]:
    """(file regex or None, directory regex) for one rsync pattern.

    Both match ``b"/" + path`` as a whole (``fullmatch``): the leading slash
    gives anchored and unanchored patterns one form, and is what rsync lets a
    leading ``**`` match, so ``**/a`` matches a top-level ``a`` too.  The file
    regex is None for a pattern that matches directories only.  ValueError
    names the pattern when it is empty or malformed.
    """
    shown = os.fsdecode(pattern) if isinstance(pattern, bytes) else pattern
    pat = os.fsencode(pattern)
    dir_only = len(pat) > 1 and pat.endswith(b"/")
    if dir_only:
        pat = pat[:-1]
    anchored = pat.startswith(b"/")
    if anchored:
        pat = pat[1:]
    if not pat:
        raise ValueError(f"filter pattern {shown!r}: empty")
    if b"\0" in pat:
        raise ValueError(f"filter pattern {shown!r}: contains NUL")
    # "dir/***" is directory "dir" (as "dir/" would be) and everything below it.
    subtree = pat.endswith(b"/***")
    if subtree:
        pat = pat[:-4]
    rx = _translate(pat, shown)
    if anchored:
        rx = b"/" + rx
    elif not pat.startswith(b"**"):
        # The pattern may begin at any component boundary.  One without '/'
        # and '**' cannot span components, so this is also "matches the final
        # component", and one with inner slashes matches the path's last
        # components, as in rsync.
        rx = b".*/" + rx
    if subtree:
        dir_rx, file_rx = rx + b"(?:/.*)?", rx + b"/.*"
    else:
        dir_rx = file_rx = rx
    try:
        re.compile(dir_rx, re.DOTALL)
    except re.error as err:  # pragma: no cover - the translation escapes everything
        raise ValueError(f"filter pattern {shown!r}: {err}") from err
    return (None if dir_only else file_rx), dir_rx


def parse_rule(text: str) -> tuple[bool, str]:
    """``"+ PATTERN"`` / ``"- PATTERN"`` (or ``include``/``exclude`` spelt
    out, as rsync allows) into (include, pattern), the pattern checked.
    rsync's other rule kinds and modifiers (merge files, ``!``, ``-/``,
    protect, risk ...) are not taken: ValueError names the rule."""
    include, pattern = _split_rule(text)
    compile_pattern(pattern)
    return include, pattern


def _split_rule(text: str) -> tuple[bool, str]:
    for prefix, include in (("+ ", True), ("- ", False), ("include ", True), ("exclude ", False)):
        if text.startswith(prefix):
            return include, text[len(prefix) :]
    raise ValueError(f"filter rule {text!r}: expected '+ PATTERN' or '- PATTERN'")


def read_rule_file(path: str | os.PathLike[str], *, include: bool) -> tuple[str, ...]:
    """The rules of an ``--include-from``/``--exclude-from`` style file.

    As rsync reads those: one pattern a line, blank lines and lines starting
    with ``;`` or ``#`` skipped, the rest of a line taken as it is (spaces
    included); a line starting with ``+ `` or ``- `` is a rule of that kind,
    any other line one of the file's kind (``include``).  Returns the rules
    as ``"+ PATTERN"``/``"- PATTERN"``; ValueError names the file and line.
    """
    shown = os.fsdecode(os.fspath(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ValueError(f"{shown}: no such file") from None
    except OSError as err:
        raise ValueError(f"{shown}: cannot read: {err.strerror or err}") from None
    rules = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = os.fsdecode(raw.rstrip(b"\r"))
        if not line.strip() or line[0] in "#;":
            continue
        try:
            if line.startswith(("+ ", "- ")):
                rule_include, pattern = parse_rule(line)
            elif line == "!":
                raise ValueError("'!' (clear the list) is not supported here")
            else:
                rule_include, pattern = include, line
                compile_pattern(pattern)
        except ValueError as err:
            raise ValueError(f"{shown} line {n}: {err}") from None
        rules.append(f"{'+' if rule_include else '-'} {pattern}")
    return tuple(rules)


class Filter:
    """An ordered rule list; first match wins, no match means included."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._cache: dict[bytes, bool] = {}
        self._files = self._combine([(i, r, r.file_regex) for i, r in enumerate(self.rules)])
        self._dirs = self._combine([(i, r, r.dir_regex) for i, r in enumerate(self.rules)])

    @staticmethod
    def _combine(rules: list[tuple[int, Rule, bytes | None]]) -> tuple[re.Pattern[bytes] | None, dict[str, int]]:
        rules = [(i, r, rx) for i, r, rx in rules if rx is not None]
        if not rules:
            return None, {}
        # One alternation tried in rule order: the first alternative that can
        # match the whole path is the first matching rule.
        groups = {f"r{i}": i for i, _, _ in rules}
        rx = b"|".join(b"(?P<r%d>%s)" % (i, rx) for i, _, rx in rules)
        return re.compile(rx, re.DOTALL), groups

    @classmethod
    def parse(cls, rules: Sequence[str]) -> Filter:
        """Rules written as rsync filter rules: ``"- *.iso"``, ``"+ */binary-amd64/**"``."""
        parsed = []
        for text in rules:
            include, pattern = _split_rule(text)
            file_rx, dir_rx = compile_pattern(pattern)
            parsed.append(Rule(include, pattern, file_rx, dir_rx))
        return cls(parsed)

    @classmethod
    def from_lists(cls, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Filter:
        """The config's shorthand: includes first, as rsync reads ``--include`` before a broader ``--exclude``."""
        return cls.parse([f"+ {p}" for p in include] + [f"- {p}" for p in exclude])

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"Filter({[str(r) for r in self.rules]!r})"

    def match(self, path: bytes, is_dir: bool) -> Rule | None:
        """The first rule matching ``path`` itself, or None."""
        regex, groups = self._dirs if is_dir else self._files
        if regex is None:
            return None
        m = regex.fullmatch(b"/" + path)
        return None if m is None else self.rules[groups[m.lastgroup]]

    def excluded(self, path: bytes, is_dir: bool) -> bool:
        """True when the first rule matching ``path`` itself excludes it (parents not checked)."""
        regex, groups = self._dirs if is_dir else self._files
        if regex is None:
            return False
        m = regex.fullmatch(b"/" + path)
        return m is not None and not self.rules[groups[m.lastgroup]].include

    def excluded_path(self, path: bytes, kind_is_dir: bool) -> bool:
        """True when ``path`` or any directory above it is excluded."""
        if not self.rules:
            return False
        parent, sep, _ = path.rpartition(b"/")
        if sep and self._dir_excluded(parent):
            return True
        return self.excluded(path, kind_is_dir)

    def _dir_excluded(self, d: bytes) -> bool:
        cache = self._cache
        hit = cache.get(d)
        if hit is not None:
            return hit
        # Walk up to the nearest cached ancestor, then decide downwards.
        chain = [d]
        parent = d
        known = False
        while True:
            parent, sep, _ = parent.rpartition(b"/")
            if not sep:
                break
            hit = cache.get(parent)
            if hit is not None:
                known = hit
                break
            chain.append(parent)
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for p in reversed(chain):
            known = known or self.excluded(p, True)
            cache[p] = known
        return known


__all__ = ["Filter", "Rule", "compile_pattern", "parse_rule", "read_rule_file"]
