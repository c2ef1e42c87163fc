"""rsync-style include/exclude rules: a table of cases, properties, and real rsync as the oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.filters import Filter, compile_pattern

# (rules, path, is_dir, excluded_path)
CASES = [
    (["- *.iso"], b"a/b/x.iso", False, True),
    (["- *.iso"], b"x.iso", False, True),
    (["- *.iso"], b"a/b/x.iso.sig", False, False),
    (["- *.iso"], b"a/x.iso/y", False, True),  # a directory named x.iso takes its tree along
    (["- /tmp/"], b"tmp", True, True),
    (["- /tmp/"], b"tmp/f", False, True),
    (["- /tmp/"], b"tmp", False, False),  # a file is not matched by a dir-only rule
    (["- /tmp/"], b"a/tmp", True, False),  # anchored: only at the top
    (["- tmp/"], b"a/tmp", True, True),
    (["- pool/**/*.deb"], b"pool/main/h/hello/hello_1.deb", False, True),
    (["- pool/**/*.deb"], b"pool/x.deb", False, False),  # '**' needs its surrounding slashes
    (["- pool/**/*.deb"], b"mirror/pool/main/x.deb", False, True),  # unanchored
    (["- /pool/**/*.deb"], b"mirror/pool/main/x.deb", False, False),
    (["- dists/*/main/binary-arm64/"], b"dists/bookworm/main/binary-arm64", True, True),
    (["- dists/*/main/binary-arm64/"], b"dists/bookworm/main/binary-arm64/Packages.xz", False, True),
    (["- dists/*/main/binary-arm64/"], b"dists/bookworm/main/binary-amd64/Packages.xz", False, False),
    (["- dists/*/main/binary-arm64/"], b"dists/a/b/main/binary-arm64", True, False),  # '*' stops at '/'
    (["- sub/foo"], b"x/sub/foo", False, True),  # an inner slash still matches at any depth
    (["- sub/foo"], b"xsub/foo", False, False),  # ... but only at a component boundary
    (["- a?c"], b"abc", False, True),
    (["- a?c"], b"a/c", False, False),
    (["- [ab]*"], b"d/bcd", False, True),
    (["- [!ab]*"], b"a/bcd", False, False),
    (["- [a-c]x"], b"bx", False, True),
    (["- [[:digit:]]*"], b"9lives", False, True),
    (["- [[:digit:]]*"], b"lives", False, False),
    (["- \\*"], b"*", False, True),
    (["- \\*"], b"x", False, False),
    (["- dir/***"], b"dir", True, True),
    (["- dir/***"], b"dir", False, False),  # the 'dir' part is dir-only, as in rsync
    (["- **/a"], b"a", False, True),  # a leading '**' also matches at the top
    (["- /**/a"], b"a", False, False),
    (["- dir/***"], b"dir/a/b", False, True),
    (["- dir/***"], b"dirx", False, False),
    (["+ */binary-amd64/**", "- */binary-*/**"], b"dists/main/binary-amd64/Packages", False, False),
    (["+ */binary-amd64/**", "- */binary-*/**"], b"dists/main/binary-arm64/Packages", False, True),
    (["- *", "+ keep"], b"keep", False, True),  # first match wins
    (["+ keep", "- *"], b"keep", False, False),
    (["+ keep", "- *"], b"keep/inner", False, True),  # 'keep/inner' hits '- *'
    ([], b"anything", False, False),
    ([b"- caf\xc3\xa9".decode()], "café".encode(), False, True),
]


@pytest.mark.parametrize(("rules", "path", "is_dir", "expected"), CASES)
def test_rsync_examples(rules: list[str], path: bytes, is_dir: bool, expected: bool) -> None:
    assert Filter.parse(rules).excluded_path(path, is_dir) is expected


def test_from_lists_puts_includes_first() -> None:
    f = Filter.from_lists(include=["*/binary-amd64/**"], exclude=["*/binary-*/**", "*.iso"])
    assert [str(r) for r in f.rules] == ["+ */binary-amd64/**", "- */binary-*/**", "- *.iso"]
    assert not f.excluded_path(b"dists/x/binary-amd64/Packages", False)
    assert f.excluded_path(b"dists/x/binary-i386/Packages", False)
    assert f.excluded_path(b"cd/debian.iso", False)


def test_bool_and_empty_filter() -> None:
    assert not Filter.parse([])
    assert not Filter.from_lists()
    assert Filter.parse(["- x"])


def test_non_utf8_names() -> None:
    f = Filter.parse(["- *.bin"])
    assert f.excluded_path(b"\xff\xfe/\x80.bin", False)
    assert not f.excluded_path(b"\xff\xfe/\x80.txt", False)


@pytest.mark.parametrize("rule", ["- [abc", "- x[", "- [[:nope:]]", "- ", "- /", "+ a[\\", "? x", "*.iso"])
def test_invalid_rules_are_value_errors_naming_the_rule(rule: str) -> None:
    with pytest.raises(ValueError) as info:
        Filter.parse([rule])
    assert rule.split(" ", 1)[-1] in str(info.value) or rule in str(info.value)


def test_match_reports_the_deciding_rule() -> None:
    f = Filter.parse(["+ *.deb", "- pool/"])
    assert str(f.match(b"pool", True)) == "- pool/"
    assert f.match(b"pool", False) is None
    assert str(f.match(b"a/x.deb", False)) == "+ *.deb"


def test_many_paths_are_fast_enough_to_cache() -> None:
    f = Filter.from_lists(include=["*/binary-amd64/**"], exclude=["*/binary-*/**", "*.iso", "/tmp/"])
    paths = [b"dists/d%d/main/binary-%s/f%d" % (i % 50, b"amd64" if i % 3 else b"arm64", i) for i in range(100_000)]
    excluded = sum(f.excluded_path(p, False) for p in paths)
    assert excluded == sum(1 for i in range(100_000) if not i % 3)
    assert len(f._cache) < 1000  # one entry per directory, not per path


# -- properties -----------------------------------------------------------------

_COMPONENTS = st.sampled_from([b"a", b"b", b"ab", b"x.iso", b"main", b"pool", b"c.d"])
_PATHS = st.lists(_COMPONENTS, min_size=1, max_size=5).map(b"/".join)
_PATTERN_PARTS = ["a", "b", "*", "**", "?", "*.iso", "[ab]", "main", "pool", "c.d", "[!a]*", "a*", "***", "?*"]
_PATTERNS = st.builds(
    lambda anchor, parts, trailing: ("/" if anchor else "") + "/".join(parts) + ("/" if trailing else ""),
    st.booleans(),
    st.lists(st.sampled_from(_PATTERN_PARTS), min_size=1, max_size=3),
    st.booleans(),
)
_RULES = st.lists(st.tuples(st.sampled_from("+-"), _PATTERNS).map(" ".join), max_size=4)


def _naive(f: Filter, path: bytes, is_dir: bool) -> bool:
    parts = path.split(b"/")
    for i in range(1, len(parts)):
        if _first_match_excludes(f, b"/".join(parts[:i]), True):
            return True
    return _first_match_excludes(f, path, is_dir)


def _first_match_excludes(f: Filter, path: bytes, is_dir: bool) -> bool:
    for rule in f.rules:
        if rule.matches(path, is_dir):
            return not rule.include
    return False


@given(_RULES, st.lists(st.tuples(_PATHS, st.booleans()), min_size=1, max_size=20))
def test_excluded_path_is_first_match_over_ancestors(rules: list[str], paths: list[tuple[bytes, bool]]) -> None:
    f = Filter.parse(rules)
    for path, is_dir in paths:  # several paths per filter so the parent cache is exercised
        assert f.excluded_path(path, is_dir) == _naive(f, path, is_dir)


_LITERAL = st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(st.lists(_LITERAL, min_size=1, max_size=3))
def test_literal_pattern_matches_itself(parts: list[bytes]) -> None:
    # No wildcards: the pattern is the name, whatever bytes it holds.
    pattern = b"/".join(parts)
    if any(c in pattern for c in b"*?[\\") or pattern.endswith(b"/"):
        return
    f = Filter.parse(["- " + os.fsdecode(pattern)])
    assert f.excluded(pattern, False)
    assert f.excluded(b"top/" + pattern, False)


# -- real rsync as the oracle ---------------------------------------------------

RSYNC = shutil.which("rsync")
# The rsync source tree and its (path, is_dir) entries.
Tree = tuple[Path, set[tuple[bytes, bool]]]

_TREE_FILES = [
    "a/x.iso",
    "a/b/x.iso",
    "a/b/keep.txt",
    "ab",
    "c.d/main/pool/a",
    "main/a/b",
    "main/x.iso/a",
    "pool/main/b/c.d",
    "pool/b",
    "b/a/ab",
    "x.iso",
]


@pytest.fixture(scope="module")
def rsync_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    src = tmp_path_factory.mktemp("src")
    entries: set[tuple[bytes, bool]] = set()
    for name in _TREE_FILES:
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(name)
        parts = name.split("/")
        for i in range(1, len(parts)):
            entries.add(("/".join(parts[:i]).encode(), True))
        entries.add((name.encode(), False))
    return src, entries


def _rsync_transfers(src: Path, dst: Path, args: list[str]) -> set[bytes]:
    out = subprocess.run(
        [RSYNC, "-a", "--dry-run", "--out-format=%n", *args, f"{src}/", f"{dst}/"],
        check=True,
        capture_output=True,
    ).stdout
    names = {line.rstrip(b"/") for line in out.splitlines() if line and line != b"./"}
    return names


def _ours(f: Filter, entries: set[tuple[bytes, bool]]) -> set[bytes]:
    return {p for p, is_dir in entries if not f.excluded_path(p, is_dir)}


def _check_against_rsync(tree: Tree, tmp: Path, include: list[str], exclude: list[str]) -> None:
    src, entries = tree
    dst = tmp / "dst"
    dst.mkdir(exist_ok=True)
    args = [f"--include={p}" for p in include] + [f"--exclude={p}" for p in exclude]
    expected = _rsync_transfers(src, dst, args)
    assert _ours(Filter.from_lists(include, exclude), entries) == expected, args


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@pytest.mark.parametrize(
    ("include", "exclude"),
    [
        ([], ["*.iso"]),
        ([], ["/main/"]),
        ([], ["main/"]),
        ([], ["a/b"]),
        ([], ["b/*"]),
        ([], ["pool/**/c.d"]),
        ([], ["pool/**"]),
        ([], ["**/a"]),
        ([], ["a/**/b"]),
        ([], ["a/***"]),
        ([], ["/**/a"]),
        ([], ["**a"]),
        ([], ["a/***/"]),
        ([], ["**/"]),
        ([], ["***"]),
        ([], ["[ab]"]),
        ([], ["?"]),
        (["*/", "*.iso"], ["*"]),
        (["a/b/**"], ["a/*/**"]),
        (["keep.txt"], ["a/b/*"]),
    ],
)
def test_matches_rsync_on_a_tree(rsync_tree: Tree, tmp_path: Path, include: list[str], exclude: list[str]) -> None:
    _check_against_rsync(rsync_tree, tmp_path, include, exclude)


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_PATTERNS, max_size=2), st.lists(_PATTERNS, min_size=1, max_size=2))
def test_random_rules_match_rsync(rsync_tree: Tree, tmp_path: Path, include: list[str], exclude: list[str]) -> None:
    _check_against_rsync(rsync_tree, tmp_path, include, exclude)


def test_compile_pattern_dir_only() -> None:
    assert compile_pattern("x/")[0] is None
    assert compile_pattern("x")[0] is not None


# -- ordered rules (the `filter` key) against rsync's --filter ----------------------

_NAMES = st.sampled_from(["a", "b", "ab", "x.iso", "main", "pool", "c.d", "keep"])
_TREES = st.lists(st.lists(_NAMES, min_size=1, max_size=4), min_size=1, max_size=14)


def _make_tree(base: Path, paths: list[list[str]]) -> set[tuple[bytes, bool]]:
    """Files at ``paths`` (a path that would need a file as a directory, or
    that is a directory already, is left out); the (path, is_dir) entries."""
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for parts in paths:
        p = tuple(parts)
        if p in dirs or p in files or any(p[:i] in files for i in range(1, len(p))):
            continue
        files.add(p)
        dirs.update(p[:i] for i in range(1, len(p)))
    for p in sorted(dirs, key=len):
        (base / "/".join(p)).mkdir(exist_ok=True)
    for p in files:
        (base / "/".join(p)).write_text("/".join(p))
    return {("/".join(p).encode(), False) for p in files} | {("/".join(p).encode(), True) for p in dirs}


def _rsync_keeps(src: Path, dst: Path, args: list[str]) -> set[bytes]:
    return _rsync_transfers(src, dst, args)


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TREES, st.lists(st.tuples(st.sampled_from("+-"), _PATTERNS).map(" ".join), min_size=1, max_size=5))
def test_ordered_rules_match_rsync_filter(tmp_path_factory: pytest.TempPathFactory, paths: list[list[str]],
                                          rules: list[str]) -> None:
    """Random trees and random ordered rule lists (interleaved '+' and '-'):
    the paths a Filter keeps are the ones rsync copies with the same
    ``--filter`` rules, in the same order."""
    base = tmp_path_factory.mktemp("ordered")
    src, dst = base / "src", base / "dst"
    src.mkdir()
    dst.mkdir()
    entries = _make_tree(src, paths)
    expected = _rsync_keeps(src, dst, [f"--filter={r}" for r in rules])
    assert _ours(Filter.parse(rules), entries) == expected, rules
    shutil.rmtree(base)


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@pytest.mark.parametrize("rules", [
    ["+ a/", "- *"],  # the directory is kept, its contents are not (they match '- *')
    ["+ a/", "+ a/**", "- *"],
    ["+ /pool/", "+ /pool/main/***", "- /pool/*", "- x.iso"],
    ["- *.iso", "+ /main/***", "- /*"],
    ["+ */", "+ *.iso", "- *"],  # every directory, only the ISOs
    ["- b/", "+ b", "- *"],
    ["+ keep.txt", "- a/b/*", "+ a/", "- a"],
    ["- /a/b/", "+ /a/***", "- *"],
])
def test_ordered_rule_examples_match_rsync(rsync_tree: Tree, tmp_path: Path, rules: list[str]) -> None:
    src, entries = rsync_tree
    (tmp_path / "dst").mkdir()
    expected = _rsync_keeps(src, tmp_path / "dst", [f"--filter={r}" for r in rules])
    assert _ours(Filter.parse(rules), entries) == expected


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
def test_config_rules_match_rsync_with_the_same_options(rsync_tree: Tree, tmp_path: Path) -> None:
    """include, include_from, filter, exclude, exclude_from of a [node] and a
    [mirror:NAME] give the rules rsync applies with the options in the
    order sync.ini documents: includes (mirror's, node's), filters, excludes."""
    from syncd import config

    src, entries = rsync_tree
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "inc.txt").write_text("# which to keep\nkeep.txt\n; and\n\n- pool/main/\n")
    (tmp_path / "exc.txt").write_text("*.iso\n+ a/x.iso\nc.d/\n")
    (tmp_path / "mexc.txt").write_text("/b/\n")
    ini = tmp_path / "sync.ini"
    ini.write_text(
        f"[node]\nname = p\nroot = {root}\nstate_dir = {tmp_path / 'state'}\n"
        f"include = ab\ninclude_from = {tmp_path / 'inc.txt'}\n"
        "filter =\n    - main/a/\n    + main/\n    + main/***\n"
        f"exclude = /main/x.iso/\nexclude_from = {tmp_path / 'exc.txt'}\n"
        "[mirror:m]\nhost = h\ninclude = b/a/ab\nfilter = - /pool/b\n"
        f"exclude_from = {tmp_path / 'mexc.txt'}\n"
    )
    cfg = config.load(ini)
    rules = cfg.filter_rules(cfg.mirrors[0])
    args = [
        "--include=b/a/ab",  # the mirror's includes, then the node's
        "--include=ab", f"--include-from={tmp_path / 'inc.txt'}",
        "--filter=- /pool/b",  # the mirror's filter, then the node's
        "--filter=- main/a/", "--filter=+ main/", "--filter=+ main/***",
        f"--exclude-from={tmp_path / 'mexc.txt'}",  # the mirror's excludes, then the node's
        "--exclude=/main/x.iso/", f"--exclude-from={tmp_path / 'exc.txt'}",
    ]
    (tmp_path / "dst").mkdir()
    expected = _rsync_keeps(src, tmp_path / "dst", args)
    assert _ours(Filter.parse(rules), entries) == expected, rules
