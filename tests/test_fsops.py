"""The agent's safe filesystem layer: names, symlinks planted on the edge, type changes, fds."""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import UnsafePathError
from syncd.fsops import DIRECT_ALIGN, BufferPool, DirectWriter, SafeRoot, fsync_dir, sha256_around_cache, validate_name

# -- validate_name ----------------------------------------------------------------

_COMPONENT = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
_NAME = st.lists(_COMPONENT, min_size=1, max_size=8).map(b"/".join).filter(lambda p: len(p) <= 4096)


@given(_NAME)
def test_valid_names_are_returned_unchanged(name: bytes) -> None:
    assert validate_name(name) is name


def _bad(kind: str, parts: list[bytes]) -> bytes:
    good = b"/".join(parts)
    return {
        "absolute": b"/" + good,
        "dotdot": b"/".join([*parts, b"..", *parts]),
        "dot": b"/".join([b".", *parts]),
        "empty": b"/".join([*parts, b"", *parts]),
        "trailing": good + b"/",
        "nul": good + b"\0x",
        "long_component": good + b"/" + b"c" * 256,
        "long_path": b"/".join([b"d" * 200] * 21),
    }[kind]


_BAD_KINDS = ["absolute", "dotdot", "dot", "empty", "trailing", "nul", "long_component", "long_path"]


@given(st.sampled_from(_BAD_KINDS), st.lists(_COMPONENT, min_size=1, max_size=3))
def test_each_kind_of_bad_name_is_refused(kind: str, parts: list[bytes]) -> None:
    with pytest.raises(UnsafePathError):
        validate_name(_bad(kind, parts))


@pytest.mark.parametrize(
    "name", [b"", b"/", b"..", b".", b"a/../b", b"./a", b"a/.", b"a//b", b"a/", b"a\0b", b"x" * 256]
)
def test_bad_names_table(name: bytes) -> None:
    with pytest.raises(UnsafePathError):
        validate_name(name)


def test_limits_are_inclusive() -> None:
    assert validate_name(b"c" * 255)
    long = b"/".join([b"d" * 255] * 16)  # 16*255 + 15 = 4095
    assert validate_name(long)
    with pytest.raises(UnsafePathError):
        validate_name(long + b"/dd")


def test_message_is_one_line_and_shows_raw_bytes() -> None:
    with pytest.raises(UnsafePathError) as info:
        validate_name(b"/etc/\xff\nx")
    msg = str(info.value)
    assert "\n" not in msg and "\\xff" in msg and "\\x0a" in msg


def test_non_bytes_refused() -> None:
    with pytest.raises(UnsafePathError):
        validate_name("a/b")  # type: ignore[arg-type]


# -- fixtures ------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside root with a canary file: nothing may ever change it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "canary").write_bytes(b"canary")
    (d / "x").write_bytes(b"outside x")
    (d / "sub").mkdir()
    (d / "sub" / "deep").write_bytes(b"deep")
    os.chmod(d / "canary", 0o640)
    return d


def _snapshot(d: Path) -> dict[str, tuple[int, int, bytes | None]]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st_.st_mode) else None
            snap[os.path.relpath(p, d)] = (st_.st_mode, st_.st_mtime_ns, data)
    snap["."] = (os.lstat(d).st_mode, os.lstat(d).st_mtime_ns, None)
    return snap


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    s = tmp_path / "staging"
    s.mkdir()
    return s


def _stage(staging: Path, name: str, data: bytes) -> None:
    (staging / name).write_bytes(data)


# -- symlinks planted on the edge ------------------------------------------------------


def _attempts(sr: SafeRoot, staging: Path, sfd: int, rel: bytes) -> list[tuple[str, object]]:
    """Run every SafeRoot operation on ``rel``, collecting outcomes (exceptions included)."""
    results: list[tuple[str, object]] = []

    def attempt(what: str, fn) -> None:  # noqa: ANN001
        try:
            results.append((what, fn()))
        except (UnsafePathError, OSError) as err:
            results.append((what, err))

    attempt("set_meta", lambda: sr.set_meta(rel, mode=0o777, mtime_ns=123_000_000_000))
    attempt("open_read", lambda: os.close(sr.open_read(rel)))
    attempt("open_dir", lambda: os.close(sr.open_dir(rel)))
    attempt("open_dir_create", lambda: os.close(sr.open_dir(rel + b"/new", create=True)))
    attempt("lstat", lambda: sr.lstat(rel))
    attempt("copy_into", lambda: sr.copy_into(rel, sfd, b"copied"))
    attempt("ensure_dir_below", lambda: sr.ensure_dir(rel + b"/newdir", 0o777))
    attempt("remove_below", lambda: sr.remove(rel + b"/canary"))
    attempt("remove_below_dir", lambda: sr.remove(rel + b"/sub"))
    # Last: where it succeeds it replaces the leaf, changing what the others see.
    _stage(staging, "staged", b"NEW CONTENT")
    attempt("publish", lambda: sr.publish(sfd, b"staged", rel))
    return results


@pytest.mark.parametrize("link_target_kind", ["dir", "file"])
def test_leaf_symlink_to_outside_is_never_followed(
    root: Path, staging: Path, outside: Path, link_target_kind: str
) -> None:
    target = outside if link_target_kind == "dir" else outside / "canary"
    os.symlink(target, root / "link")
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            results = dict(_attempts(sr, staging, sfd, b"link"))
        finally:
            os.close(sfd)
        assert _snapshot(outside) == before
        assert isinstance(results["open_read"], UnsafePathError)
        assert isinstance(results["copy_into"], UnsafePathError)
        assert isinstance(results["open_dir"], UnsafePathError)
        assert not (staging / "copied").exists()
        # publish replaced the symlink itself with the staged file (and says what is there now)
        assert stat.S_ISREG(results["publish"].st_mode) and results["publish"].st_size == len(b"NEW CONTENT")
        assert (root / "link").read_bytes() == b"NEW CONTENT" and not (root / "link").is_symlink()
    assert _snapshot(outside) == before


def test_symlink_leaf_set_meta_and_remove(root: Path, outside: Path) -> None:
    os.symlink(outside / "canary", root / "link")
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        sr.set_meta(b"link", mode=0o777, mtime_ns=5_000_000_000)
        assert os.lstat(root / "link").st_mtime_ns == 5_000_000_000
        assert _snapshot(outside) == before
        assert sr.remove(b"link") is True
        assert not os.path.lexists(root / "link")
    assert _snapshot(outside) == before


def test_symlink_leaf_ensure_dir_replaces_link(root: Path, outside: Path) -> None:
    os.symlink(outside, root / "link")
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        sr.ensure_dir(b"link", 0o750)
    assert (root / "link").is_dir() and not (root / "link").is_symlink()
    assert stat.S_IMODE(os.lstat(root / "link").st_mode) == 0o750
    assert _snapshot(outside) == before


@pytest.mark.parametrize("parent", [b"pool", b"pool/main"])
def test_parent_component_symlink_to_outside_is_never_followed(
    root: Path, staging: Path, outside: Path, parent: bytes
) -> None:
    # root/pool -> outside (or root/pool/main -> outside): pool/x would land in outside/x.
    link = root / os.fsdecode(parent)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, link)
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in (b"x", b"canary", b"sub", b"sub/deep", b"new/deeper"):
                rel = parent + b"/" + name
                results = dict(_attempts(sr, staging, sfd, rel))
                assert _snapshot(outside) == before, (rel, results)
                refused = ("publish", "set_meta", "open_read", "open_dir", "open_dir_create", "copy_into")
                for what in (*refused, "ensure_dir_below"):
                    assert isinstance(results[what], UnsafePathError), (rel, what, results[what])
                assert results["lstat"] is None
                assert results["remove_below"] is False and results["remove_below_dir"] is False
                assert sr.remove(rel) is False
                assert "pool" in str(results["publish"])
        finally:
            os.close(sfd)
    assert _snapshot(outside) == before
    assert link.is_symlink()  # refused, not replaced


def test_parent_component_that_is_a_file_is_unsafe(root: Path, staging: Path) -> None:
    (root / "f").write_bytes(b"file")
    _stage(staging, "s", b"data")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(UnsafePathError, match="not a directory"):
                sr.publish(sfd, b"s", b"f/x")
        finally:
            os.close(sfd)
        assert sr.lstat(b"f/x") is None
        assert sr.remove(b"f/x") is False
    assert (root / "f").read_bytes() == b"file"


def test_removing_a_tree_holding_symlinks_to_outside_leaves_outside_alone(
    root: Path, outside: Path
) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"f")
    os.symlink(outside, root / "d" / "dirlink")
    os.symlink(outside / "canary", root / "d" / "e" / "filelink")
    os.symlink(outside / "missing", root / "d" / "e" / "dangling")
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        assert sr.remove(b"d") is True
        assert sr.remove(b"d") is False  # a retried delete is done
    assert not (root / "d").exists()
    assert _snapshot(outside) == before


def test_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    with SafeRoot(tmp_path / "via") as sr:
        sr.ensure_dir(b"a", 0o755)
    assert (real / "a").is_dir()


# -- publish ---------------------------------------------------------------------------


def test_publish_replaces_atomically(root: Path, staging: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "f").write_bytes(b"old")
    old_ino = os.lstat(root / "a" / "f").st_ino
    _stage(staging, "f.tmp", b"new")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            staged_ino = os.lstat(staging / "f.tmp").st_ino
            sr.publish(sfd, b"f.tmp", b"a/f")
        finally:
            os.close(sfd)
    st_ = os.lstat(root / "a" / "f")
    assert st_.st_ino == staged_ino != old_ino
    assert (root / "a" / "f").read_bytes() == b"new"
    assert os.listdir(root / "a") == ["f"]  # no temporary name in root
    assert not (staging / "f.tmp").exists()


def test_publish_creates_parents(root: Path, staging: Path) -> None:
    _stage(staging, "s", b"x")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr.publish(sfd, b"s", b"p/q/r/file")
        finally:
            os.close(sfd)
    assert (root / "p" / "q" / "r" / "file").read_bytes() == b"x"


def test_publish_dir_to_file_type_change(root: Path, staging: Path, outside: Path) -> None:
    (root / "t" / "inner").mkdir(parents=True)
    (root / "t" / "inner" / "f").write_bytes(b"f")
    os.symlink(outside, root / "t" / "escape")
    before = _snapshot(outside)
    _stage(staging, "s", b"now a file")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr.publish(sfd, b"s", b"t")
        finally:
            os.close(sfd)
    assert (root / "t").read_bytes() == b"now a file"
    assert _snapshot(outside) == before


def test_type_changes_below_a_cached_parent(root: Path, staging: Path, outside: Path) -> None:
    # The parent's fd comes from the SafeRoot's cache, lent without a dup; a
    # type change drops the cache (closing those fds) in the middle of the
    # call: the call goes on with an fd of its own, and the next calls walk
    # afresh.
    (root / "a" / "t" / "inner").mkdir(parents=True)
    os.symlink(outside, root / "a" / "t" / "escape")
    (root / "a" / "x").write_bytes(b"a file where a directory goes")
    before = _snapshot(outside)
    for name in ("s1", "s2", "s3"):
        _stage(staging, name, name.encode())
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr.publish(sfd, b"s1", b"a/first")  # caches a/
            sr.publish(sfd, b"s2", b"a/t")  # a directory there: removed, then the rename
            sr.ensure_dir(b"a/x", 0o750)  # a file there: unlinked, then the mkdir
            sr.publish(sfd, b"s3", b"a/x/last")
            assert sr.set_meta(b"a/x", mode=None, mtime_ns=1_000_000_000_000_000_000) is not None
        finally:
            os.close(sfd)
    assert (root / "a" / "t").read_bytes() == b"s2"
    assert stat.S_IMODE(os.lstat(root / "a" / "x").st_mode) == 0o750
    assert (root / "a" / "x" / "last").read_bytes() == b"s3"
    assert os.lstat(root / "a" / "x").st_mtime_ns == 1_000_000_000_000_000_000
    assert sorted(os.listdir(root / "a")) == ["first", "t", "x"]
    assert _snapshot(outside) == before


def test_publish_staged_symlink(root: Path, staging: Path) -> None:
    (root / "l").write_bytes(b"was a file")
    os.symlink("../elsewhere", staging / "sl")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr.publish(sfd, b"sl", b"l")
        finally:
            os.close(sfd)
    assert os.readlink(root / "l") == "../elsewhere"


def test_publish_non_utf8_name(root: Path, staging: Path) -> None:
    _stage(staging, "s", b"x")
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr.publish(sfd, b"s", b"\xff\xfe/\x80name")
        finally:
            os.close(sfd)
        assert sr.lstat(b"\xff\xfe/\x80name").st_size == 1
    assert os.listdir(os.fsencode(root)) == [b"\xff\xfe"]


# -- ensure_dir / set_meta / remove / lstat -----------------------------------------------


def test_ensure_dir_creates_and_chmods(root: Path) -> None:
    with SafeRoot(root) as sr:
        sr.ensure_dir(b"a/b", 0o2750)
        sr.ensure_dir(b"a/b", 0o700)  # existing: only the mode changes
    assert stat.S_IMODE(os.lstat(root / "a" / "b").st_mode) == 0o700


def test_ensure_dir_file_to_dir_type_change(root: Path) -> None:
    (root / "x").write_bytes(b"file")
    with SafeRoot(root) as sr:
        sr.ensure_dir(b"x", 0o755)
    assert (root / "x").is_dir()


def test_set_meta_on_files_and_dirs(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"x")
    with SafeRoot(root) as sr:
        sr.set_meta(b"d/f", mode=0o600, mtime_ns=1_500_000_000_123_456_789)
        sr.set_meta(b"d", mode=0o711, mtime_ns=1_000_000_000_000_000_000)
        sr.set_meta(b"d/f", mode=None, mtime_ns=None)
        sr.set_meta(b"d/f", mode=0o000, mtime_ns=None)
        sr.set_meta(b"d/f", mode=0o644, mtime_ns=None)
    f = os.lstat(root / "d" / "f")
    assert stat.S_IMODE(f.st_mode) == 0o644 and f.st_mtime_ns == 1_500_000_000_123_456_789
    d = os.lstat(root / "d")
    assert stat.S_IMODE(d.st_mode) == 0o711 and d.st_mtime_ns == 1_000_000_000_000_000_000


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_set_meta_on_unreadable_entries_as_unprivileged_owner(root: Path) -> None:
    # An agent not running as root cannot open a mode-000 file or directory it
    # owns; set_meta must still restore its mode and mtime (O_PATH fallback).
    (root / "f").write_bytes(b"x")
    (root / "d").mkdir()
    for p in (root, root / "f", root / "d"):
        os.chown(p, 65534, 65534)
    os.chmod(root / "f", 0)
    os.chmod(root / "d", 0)
    sr = SafeRoot(root)  # opened as root: the path above root is not nobody's
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sr.set_meta(b"f", mode=0o640, mtime_ns=7_000_000_000)
            sr.set_meta(b"d", mode=0o750, mtime_ns=8_000_000_000)
            status = 0
        finally:
            os._exit(status)
    _, code = os.waitpid(pid, 0)
    sr.close()
    assert os.waitstatus_to_exitcode(code) == 0
    f, d = os.lstat(root / "f"), os.lstat(root / "d")
    assert (stat.S_IMODE(f.st_mode), f.st_mtime_ns) == (0o640, 7_000_000_000)
    assert (stat.S_IMODE(d.st_mode), d.st_mtime_ns) == (0o750, 8_000_000_000)


def test_set_meta_absent_is_file_not_found(root: Path) -> None:
    with SafeRoot(root) as sr, pytest.raises(FileNotFoundError):
        sr.set_meta(b"nope", mode=0o644, mtime_ns=None)


def test_missing_parent_error_names_the_whole_path(root: Path) -> None:
    with SafeRoot(root) as sr, pytest.raises(FileNotFoundError) as info:
        sr.open_read(b"no/such/\xfffile")
    assert info.value.errno == 2 and info.value.filename == "no/such/\\xfffile"


def test_remove_absent_returns_false(root: Path) -> None:
    with SafeRoot(root) as sr:
        assert sr.remove(b"nope") is False
        assert sr.remove(b"no/such/parent") is False


def test_remove_file_and_deep_tree(root: Path) -> None:
    (root / "f").write_bytes(b"x")
    deep = root / "t"
    p = deep
    for i in range(50):
        p = p / f"d{i}"
    p.mkdir(parents=True)
    (p / "leaf").write_bytes(b"x")
    for i in range(30):
        (deep / f"wide{i}").mkdir()
        (deep / f"wide{i}" / "f").write_bytes(b"x")
    with SafeRoot(root) as sr:
        assert sr.remove(b"f") is True
        assert sr.remove(b"t") is True
    assert os.listdir(root) == []


def test_lstat(root: Path, outside: Path) -> None:
    (root / "f").write_bytes(b"abc")
    os.symlink(outside, root / "l")
    with SafeRoot(root) as sr:
        assert sr.lstat(b"f").st_size == 3
        assert stat.S_ISLNK(sr.lstat(b"l").st_mode)
        assert sr.lstat(b"l/canary") is None
        assert sr.lstat(b"f/x") is None
        assert sr.lstat(b"absent") is None
        assert stat.S_ISDIR(sr.lstat(b"").st_mode)
        with pytest.raises(UnsafePathError):
            sr.lstat(b"../x")


def test_every_method_validates_names(root: Path, staging: Path) -> None:
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for bad in (b"/etc/passwd", b"../x", b"a/../../x", b"a\0b"):
                for call in (
                    lambda: sr.lstat(bad),
                    lambda: sr.open_dir(bad, create=True),
                    lambda: sr.open_read(bad),
                    lambda: sr.publish(sfd, b"s", bad),
                    lambda: sr.ensure_dir(bad, 0o755),
                    lambda: sr.set_meta(bad, mode=0o644, mtime_ns=None),
                    lambda: sr.remove(bad),
                    lambda: sr.copy_into(bad, sfd, b"c"),
                ):
                    with pytest.raises(UnsafePathError):
                        call()
        finally:
            os.close(sfd)
    assert os.listdir(root) == []


def test_open_read_refuses_fifo_and_reports_missing(root: Path) -> None:
    os.mkfifo(root / "fifo")
    (root / "d").mkdir()
    with SafeRoot(root) as sr:
        with pytest.raises(UnsafePathError, match="regular"):
            sr.open_read(b"fifo")
        with pytest.raises(FileNotFoundError):
            sr.open_read(b"missing")
        with pytest.raises(IsADirectoryError):
            sr.open_read(b"d")


# -- copy_into --------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("size", [0, 1, 65_537, 8 << 20])
def test_copy_into_copies_exactly(root: Path, staging: Path, size: int, pooled: bool) -> None:
    data = os.urandom(size)
    (root / "src").mkdir()
    (root / "src" / "f").write_bytes(data)
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            pool = BufferPool() if pooled else None
            assert sr.copy_into(b"src/f", sfd, b"copy", pool) == (size, hashlib.sha256(data).digest())
            with pytest.raises(FileExistsError):
                sr.copy_into(b"src/f", sfd, b"copy")  # O_EXCL: never overwrites
        finally:
            os.close(sfd)
    assert (staging / "copy").read_bytes() == data


def test_copy_into_refuses_symlinked_destination_name(root: Path, staging: Path, outside: Path) -> None:
    (root / "f").write_bytes(b"x")
    os.symlink(outside / "canary", staging / "copy")
    before = _snapshot(outside)
    with SafeRoot(root) as sr:
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(FileExistsError):
                sr.copy_into(b"f", sfd, b"copy")
        finally:
            os.close(sfd)
    assert _snapshot(outside) == before


# -- fds ----------------------------------------------------------------------------------


def test_no_fd_leaks(root: Path, staging: Path, outside: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "f").write_bytes(b"x" * 1000)
    os.symlink(outside, root / "pool")
    sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with SafeRoot(root) as sr:
            base = _fds()
            for i in range(3):
                _stage(staging, "s", b"y")
                sr.publish(sfd, b"s", b"b/c/f%d" % i)
                sr.ensure_dir(b"e/f", 0o755)
                sr.set_meta(b"a/f", mode=0o644, mtime_ns=10**18)
                sr.set_meta(b"e", mode=0o755, mtime_ns=10**18)
                sr.lstat(b"a/f")
                sr.lstat(b"pool/x")
                sr.copy_into(b"a/f", sfd, b"c%d" % i)
                os.close(sr.open_read(b"a/f"))
                os.close(sr.open_dir(b"a"))
                sr.sync_dir(b"b/c")
                for call in (
                    lambda: sr.publish(sfd, b"s", b"pool/x"),
                    lambda: sr.open_read(b"pool/x"),
                    lambda: sr.open_dir(b"pool/x", create=True),
                    lambda: sr.copy_into(b"pool/canary", sfd, b"z"),
                    lambda: sr.copy_into(b"a/f", sfd, b"c0"),
                    lambda: sr.open_read(b"nope"),
                    lambda: sr.set_meta(b"nope", mode=0o644, mtime_ns=None),
                ):
                    with pytest.raises((UnsafePathError, OSError)):
                        call()
                sr.remove(b"pool/x")
                sr.remove(b"b")
                sr.remove(b"e")
                assert _fds() == base
            fsync_dir(sr.fileno())
        assert _fds() == base - 1
    finally:
        os.close(sfd)


# -- property: any sequence of operations leaves the outside untouched -----------------

_OPS = st.sampled_from(
    ["publish", "ensure_dir", "set_meta", "remove", "copy_into", "open_read", "open_dir_create", "plant_link"]
)
_REL = st.lists(st.sampled_from([b"a", b"b", b"link", b"canary", b"sub"]), min_size=1, max_size=4).map(b"/".join)


@given(st.lists(st.tuples(_OPS, _REL), min_size=1, max_size=12))
def test_random_operations_never_touch_outside(ops: list[tuple[str, bytes]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, staging, outside = base / "root", base / "staging", base / "outside"
        for d in (root, staging, outside / "sub"):
            d.mkdir(parents=True)
        (outside / "canary").write_bytes(b"canary")
        (outside / "sub" / "canary").write_bytes(b"deep canary")
        os.symlink(outside, root / "link")
        before = _snapshot(outside)
        fds = _fds()
        sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with SafeRoot(root) as sr:
                for i, (op, rel) in enumerate(ops):
                    try:
                        if op == "publish":
                            (staging / "s").write_bytes(b"new")
                            sr.publish(sfd, b"s", rel)
                        elif op == "ensure_dir":
                            sr.ensure_dir(rel, 0o777)
                        elif op == "set_meta":
                            sr.set_meta(rel, mode=0o777, mtime_ns=10**9)
                        elif op == "remove":
                            sr.remove(rel)
                        elif op == "copy_into":
                            sr.copy_into(rel, sfd, b"c%d" % i)
                        elif op == "open_read":
                            os.close(sr.open_read(rel))
                        elif op == "open_dir_create":
                            os.close(sr.open_dir(rel, create=True))
                        elif op == "plant_link":
                            # Someone on the edge plants another escape hatch.
                            parent = root.joinpath(*[os.fsdecode(c) for c in rel.split(b"/")[:-1]])
                            inside = os.path.realpath(parent) == str(parent)  # no symlink on the way
                            if inside and parent.is_dir() and not os.path.lexists(root / os.fsdecode(rel)):
                                os.symlink(outside / "sub", root / os.fsdecode(rel))
                    except (UnsafePathError, OSError):
                        pass
                    assert _snapshot(outside) == before, (op, rel)
        finally:
            os.close(sfd)
        assert _fds() == fds


# -- DirectWriter and the verified log ---------------------------------------------

_CHUNKS = st.lists(st.integers(min_value=0, max_value=300_000), max_size=12)


@pytest.mark.parametrize("pooled,behind", [(True, False), (True, True), (False, False)])
@given(sizes=_CHUNKS, start_blocks=st.integers(min_value=0, max_value=3), misalign=st.booleans())
def test_direct_writer_writes_exactly_what_it_was_given(tmp_path_factory: pytest.TempPathFactory, pooled: bool,
                                                         behind: bool, sizes: list[int], start_blocks: int,
                                                         misalign: bool) -> None:
    # Any chunking, an aligned or unaligned start, O_DIRECT or not: the file
    # holds the bytes at their offsets, the buffer goes back to the pool, and
    # the fd ends with O_DIRECT off (the caller's later writes are ordinary).
    path = tmp_path_factory.mktemp("direct") / "f"
    offset = start_blocks * DIRECT_ALIGN + (123 if misalign else 0)
    data = os.urandom(sum(sizes))
    pool = BufferPool(64 * 1024, write_behind=behind) if pooled else None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = DirectWriter(fd, offset, pool)
        pos = 0
        for n in sizes:
            w.write(data[pos:pos + n])
            pos += n
        w.close()
        w.close()  # idempotent
        assert os.pread(fd, len(data) + 1, offset) == data
        assert os.fstat(fd).st_size == (offset + len(data) if data else 0)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        if pooled:
            # An unaligned start never takes one; writing behind, a second
            # buffer fills while the first is written.
            taken = 0 if misalign else (2 if behind and len(data) >= 64 * 1024 else 1)
            assert len(pool._free) == taken
    finally:
        os.close(fd)
        if pool is not None:
            pool.close()


def test_direct_writer_behind_reports_a_failed_write(tmp_path: Path) -> None:
    # The write runs in the pool's thread: its error reaches the writer's
    # caller at the next full buffer or at close, and the buffer comes back.
    pool = BufferPool(DIRECT_ALIGN * 4, write_behind=True)
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        w = DirectWriter(fd, 0, pool)
        with pytest.raises(OSError):
            w.write(b"x" * (DIRECT_ALIGN * 9))
            w.close()
        w.abandon()
        assert w._in_flight is None and w.buf is None
    finally:
        os.close(fd)
        pool.close()


@pytest.mark.parametrize("behind", [False, True])
def test_direct_writer_abandon_returns_the_buffer_and_writes_nothing_more(tmp_path: Path, behind: bool) -> None:
    pool = BufferPool(DIRECT_ALIGN * 4, write_behind=behind)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = DirectWriter(fd, 0, pool)
        w.write(b"x" * (DIRECT_ALIGN * 5 + 10))  # one buffer out, the rest held
        w.abandon()
        w.close()
        assert os.fstat(fd).st_size == DIRECT_ALIGN * 4
        assert len(pool._free) == (2 if behind else 1)
    finally:
        os.close(fd)
        pool.close()


def test_sha256_around_cache_reads_the_whole_file(tmp_path: Path) -> None:
    for size in (0, 1, DIRECT_ALIGN, 3 * (1 << 20) + 17):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert sha256_around_cache(fd, BufferPool()) == (hashlib.sha256(data).digest(), size)
        finally:
            os.close(fd)
