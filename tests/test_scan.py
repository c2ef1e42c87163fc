"""The incremental scan: each kind of change, races, and a model-based property."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from syncd import scan as scan_mod
from syncd import scanfeed
from syncd.manifest import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry, Manifest
from syncd.scan import ADDED, DELETED, META, MODIFIED, RELINKED, FeedClosed, ScanFeed, scan
from tests.nodes import wait_until


class Tree:
    """A root and its manifest, scanned on demand; records what each scan reported."""

    def __init__(self, base: Path, workers: int = 2) -> None:
        self.root = base / "root"
        self.root.mkdir()
        self.state = base / "state"
        self.workers = workers
        self.manifest = Manifest.open(self.state, "test")

    def scan(self) -> dict[bytes, str]:
        seen: dict[bytes, str] = {}
        self.last = scan(self.root, self.manifest, workers=self.workers,
                         on_change=lambda kind, path: seen.__setitem__(path, kind))
        return seen

    def fed_scan(self) -> list[tuple]:
        """A full scan feeding one subscriber on another thread: the rows it was fed."""
        feed = ScanFeed(parties=1)
        sub = feed.subscribe()
        got: list[tuple] = []
        failed: list[BaseException] = []

        def consume() -> None:
            try:
                while rows := feed.take(sub):
                    got.extend(rows)
            except BaseException as err:  # noqa: BLE001 - checked below
                failed.append(err)

        reader = threading.Thread(target=consume)
        reader.start()
        try:
            self.last = scan(self.root, self.manifest, workers=self.workers, feed=feed)
            feed.finish(self.last)
        except BaseException as err:
            feed.fail(err)
            raise
        finally:
            reader.join()
        assert not failed
        return got

    def p(self, rel: str | bytes) -> bytes:
        return os.fsencode(self.root) + b"/" + (rel if isinstance(rel, bytes) else rel.encode())


@pytest.fixture
def tree(tmp_path: Path):  # noqa: ANN201
    t = Tree(tmp_path)
    yield t
    t.manifest.close()


def test_first_scan_then_nothing(tree: Tree) -> None:
    (tree.root / "a").write_bytes(b"alpha")
    (tree.root / "d").mkdir()
    (tree.root / "d" / "b").write_bytes(b"beta" * 100_000)
    (tree.root / "empty").mkdir()
    os.symlink("d/b", tree.root / "l")
    assert tree.scan() == {b"a": ADDED, b"d": ADDED, b"d/b": ADDED, b"empty": ADDED, b"l": ADDED}
    assert tree.manifest.generation == 1
    entry = tree.manifest.lookup(b"d/b")
    assert entry.sha256 == hashlib.sha256(b"beta" * 100_000).digest()
    assert tree.manifest.lookup(b"empty").kind == KIND_DIR
    assert tree.manifest.lookup(b"l").target == b"d/b"
    assert tree.scan() == {}
    assert tree.manifest.generation == 1  # nothing changed: no new generation
    assert tree.last.files_hashed == 0


def test_each_kind_of_change(tree: Tree) -> None:
    for name in ("edit", "same", "mode", "touch", "old", "ctime"):
        (tree.root / name).write_bytes(name.encode() * 10)
    os.symlink("edit", tree.root / "link")
    (tree.root / "gone").mkdir()
    (tree.root / "gone" / "inside").write_bytes(b"x")
    tree.scan()
    g = tree.manifest.generation

    (tree.root / "edit").write_bytes(b"different length")
    # Same size, new content, mtime put back: only ctime (and the hash) tells.
    st0 = os.stat(tree.root / "same")
    (tree.root / "same").write_bytes(b"SAME" * 10)
    os.utime(tree.root / "same", ns=(st0.st_atime_ns, st0.st_mtime_ns))
    os.chmod(tree.root / "mode", 0o600)
    os.utime(tree.root / "touch", ns=(1_000_000_000, 1_000_000_000))
    os.rename(tree.root / "old", tree.root / "new")
    os.unlink(tree.root / "link")
    os.symlink("same", tree.root / "link")
    shutil.rmtree(tree.root / "gone")
    (tree.root / "fresh-empty").mkdir()
    # ctime alone (a chmod to the same mode): row refreshed, no change reported.
    os.chmod(tree.root / "ctime", stat.S_IMODE(os.stat(tree.root / "ctime").st_mode))

    seen = tree.scan()
    seen = {k: v for k, v in seen.items() if k != b""}
    assert seen == {
        b"edit": MODIFIED,
        b"same": MODIFIED,
        b"mode": META,
        b"touch": META,
        b"old": DELETED,
        b"new": ADDED,
        b"link": RELINKED,
        b"gone": DELETED,
        b"gone/inside": DELETED,
        b"fresh-empty": ADDED,
    }
    assert tree.manifest.generation == g + 1
    assert tree.manifest.lookup(b"same").sha256 == hashlib.sha256(b"SAME" * 10).digest()
    assert tree.manifest.lookup(b"mode").mode == 0o600
    assert tree.manifest.lookup(b"old").deleted == 1
    assert tree.manifest.lookup(b"old").generation == g + 1
    assert tree.manifest.lookup(b"ctime").generation == g
    # The tombstone keeps its hash: the push finds the rename by it.
    assert tree.manifest.lookup(b"old").sha256 == tree.manifest.lookup(b"new").sha256
    assert tree.scan() == {}


def test_kind_changes(tree: Tree) -> None:
    (tree.root / "x").write_bytes(b"file")
    (tree.root / "y").mkdir()
    (tree.root / "y" / "child").write_bytes(b"c")
    tree.scan()
    os.unlink(tree.root / "x")
    (tree.root / "x").mkdir()
    shutil.rmtree(tree.root / "y")
    (tree.root / "y").write_bytes(b"now a file")
    seen = tree.scan()
    assert seen[b"x"] == ADDED and tree.manifest.lookup(b"x").kind == KIND_DIR
    assert seen[b"y"] == ADDED and tree.manifest.lookup(b"y").kind == KIND_FILE
    assert seen[b"y/child"] == DELETED


def test_non_utf8_and_odd_names_kept_exactly(tree: Tree) -> None:
    names = [b"caf\xe9", b"new\nline", b"sp ace", b"\xff\xfe", b"-dash", b"x" * 255]
    for n in names:
        with open(tree.p(n), "wb") as fh:
            fh.write(n)
    os.mkdir(tree.p(b"dir\x80"))
    with open(tree.p(b"dir\x80/f\x81"), "wb") as fh:
        fh.write(b"deep")
    tree.scan()
    live = {e.path: e for e in tree.manifest.entries()}
    assert set(live) == set(names) | {b"dir\x80", b"dir\x80/f\x81"}
    for n in names:
        assert live[n].sha256 == hashlib.sha256(n).digest()


def test_roots_own_mode_and_mtime_are_recorded_and_a_change_is_a_generation(tree: Tree) -> None:
    (tree.root / "a").write_bytes(b"a")
    tree.scan()
    g = tree.manifest.generation
    st0 = os.stat(tree.root)
    own = tree.manifest.root_row()
    assert (own.kind, own.mode, own.mtime_ns) == (KIND_DIR, stat.S_IMODE(st0.st_mode), st0.st_mtime_ns)
    assert tree.scan() == {} and tree.manifest.generation == g
    os.utime(tree.root, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert tree.scan() == {b"": META}
    assert tree.manifest.generation == g + 1
    assert tree.manifest.root_row().mtime_ns == 1_600_000_000_000_000_000
    assert tree.manifest.root_row().generation == g + 1
    os.chmod(tree.root, 0o750)
    assert tree.scan() == {b"": META} and tree.manifest.root_row().mode == 0o750
    # A partial scan that lists root sees it too.
    os.utime(tree.root, ns=(1_600_000_001_000_000_000, 1_600_000_001_000_000_000))
    scan(tree.root, tree.manifest, dirs=[b""])
    assert tree.manifest.root_row().mtime_ns == 1_600_000_001_000_000_000
    assert b"" not in [e.path for e in tree.manifest.entries(include_deleted=True)]


def test_a_manifest_from_before_the_roots_row_gains_it_without_a_generation(tree: Tree) -> None:
    (tree.root / "a").write_bytes(b"a")
    tree.scan()
    g = tree.manifest.generation
    with tree.manifest.writer() as w:  # as a manifest written before root had a row
        w._raw.execute("DELETE FROM entries WHERE parent = x'' AND name = x''")
    assert tree.manifest.root_row() is None
    assert tree.scan() == {} and tree.manifest.generation == g
    assert tree.manifest.root_row().mtime_ns == os.stat(tree.root).st_mtime_ns


def test_a_symlinks_own_mtime_is_recorded_and_a_change_is_metadata(tree: Tree) -> None:
    os.symlink("target", tree.root / "l")
    tree.scan()
    g = tree.manifest.generation
    assert tree.manifest.lookup(b"l").mtime_ns == os.lstat(tree.root / "l").st_mtime_ns
    os.utime(tree.root / "l", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000), follow_symlinks=False)
    assert tree.scan() == {b"l": META}
    assert tree.manifest.lookup(b"l").mtime_ns == 1_500_000_000_000_000_000
    assert tree.manifest.lookup(b"l").generation == g + 1


def test_reappearing_path_revives_tombstone(tree: Tree) -> None:
    (tree.root / "f").write_bytes(b"1")
    tree.scan()
    os.unlink(tree.root / "f")
    assert tree.scan() == {b"f": DELETED, b"": META}  # root's mtime changed with its entries
    (tree.root / "f").write_bytes(b"1")
    seen = tree.scan()
    assert seen[b"f"] == ADDED
    assert tree.manifest.lookup(b"f").deleted == 0


def test_special_files_not_mirrored(tree: Tree) -> None:
    os.mkfifo(tree.root / "fifo")
    (tree.root / "f").write_bytes(b"x")
    assert set(tree.scan()) == {b"f"}


def test_file_changing_while_hashed_is_rehashed(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tree.root / "growing"
    target.write_bytes(b"a" * 1000)
    real_readv = os.readv
    calls = {"n": 0}

    def readv_and_append(fd, bufs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:  # a writer appends while the first read is under way
            with open(target, "ab") as fh:
                fh.write(b"b" * 500)
        return real_readv(fd, bufs)

    monkeypatch.setattr(scan_mod.os, "readv", readv_and_append)
    tree.workers = 1
    tree.scan()
    entry = tree.manifest.lookup(b"growing")
    assert entry.sha256 == hashlib.sha256(b"a" * 1000 + b"b" * 500).digest()
    assert entry.size == 1500


def test_file_that_never_settles_is_left_for_next_scan(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tree.root / "busy"
    target.write_bytes(b"a")
    (tree.root / "calm").write_bytes(b"c")
    real_readv = os.readv

    def readv_and_append(fd, bufs):  # noqa: ANN001, ANN202
        # Each hashing attempt's first read sees a writer append.
        if os.lseek(fd, 0, os.SEEK_CUR) == 0 and os.fstat(fd).st_ino == os.stat(target).st_ino:
            with open(target, "ab") as fh:
                fh.write(b"more")
        return real_readv(fd, bufs)

    monkeypatch.setattr(scan_mod.os, "readv", readv_and_append)
    tree.workers = 1
    seen = tree.scan()
    assert b"busy" not in seen and seen[b"calm"] == ADDED
    assert tree.manifest.lookup(b"busy") is None
    assert tree.last.unstable == [b"busy"]
    monkeypatch.setattr(scan_mod.os, "readv", real_readv)
    assert tree.scan() == {b"busy": ADDED}


def test_file_vanishing_before_hash(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root / "keep").write_bytes(b"k")
    (tree.root / "flee").write_bytes(b"f")
    real = scan_mod.hash_file

    def vanish_first(path: bytes):  # noqa: ANN202
        if path.endswith(b"/flee"):
            os.unlink(path)
        return real(path)

    monkeypatch.setattr(scan_mod, "hash_file", vanish_first)
    assert tree.scan() == {b"keep": ADDED}
    assert tree.manifest.lookup(b"flee") is None


def scanned_then_locked(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory ``locked`` (with ``f`` and ``sub/g``) is scanned, then can no longer be listed."""
    (tree.root / "locked" / "sub").mkdir(parents=True)
    (tree.root / "locked" / "f").write_bytes(b"x")
    (tree.root / "locked" / "sub" / "g").write_bytes(b"y")
    tree.scan()
    real = os.scandir
    locked = tree.p("locked")

    def refuse(path):  # noqa: ANN001, ANN202
        if path == locked:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", refuse)


def test_unreadable_directory_keeps_its_rows(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    scanned_then_locked(tree, monkeypatch)
    assert tree.scan() == {}
    assert tree.last.unreadable == [b"locked"]
    assert tree.manifest.lookup(b"locked/sub/g").deleted == 0


def test_killed_scan_commits_nothing(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root / "a").write_bytes(b"a")
    tree.scan()
    (tree.root / "b").write_bytes(b"b")

    def die(*args):  # noqa: ANN002, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "_hash_batch", die)
    with pytest.raises(KeyboardInterrupt):
        tree.scan()
    assert tree.manifest.generation == 1
    assert tree.manifest.lookup(b"b") is None


# -- the feed: rows for a push that runs during the scan ---------------------


def assert_fed_rows_are_the_manifest(fed: list[tuple], m: Manifest) -> None:
    """Every live row exactly once, as committed, each directory before what it holds."""
    live = {e.path: tuple(e) for e in m.entries()}
    seen: set[bytes] = set()
    for row in fed:
        e = Entry(*row)
        assert e.path not in seen, f"{e.path!r} fed twice"
        assert not e.deleted
        assert live.get(e.path) == tuple(e), f"{e.path!r} fed as {e}, committed as {live.get(e.path)}"
        assert not e.parent or e.parent in seen, f"{e.path!r} fed before its directory"
        seen.add(e.path)
    assert seen == set(live)


def test_feed_gives_every_live_row_once_its_final(tree: Tree) -> None:
    (tree.root / "d" / "e").mkdir(parents=True)
    (tree.root / "d" / "e" / "f").write_bytes(b"x" * 5000)
    (tree.root / "top").write_bytes(b"t")
    os.symlink("top", tree.root / "d" / "link")
    fed = tree.fed_scan()
    assert_fed_rows_are_the_manifest(fed, tree.manifest)
    # Again with nothing changed (rows read back, with their hashes), and
    # after a change of each kind.
    assert_fed_rows_are_the_manifest(tree.fed_scan(), tree.manifest)
    (tree.root / "top").write_bytes(b"u")
    os.chmod(tree.root / "d", 0o700)
    os.unlink(tree.root / "d" / "link")
    os.symlink("d", tree.root / "d" / "link")
    shutil.rmtree(tree.root / "d" / "e")
    assert_fed_rows_are_the_manifest(tree.fed_scan(), tree.manifest)


def test_feed_never_gives_a_directory_that_vanished_before_its_listing(
        tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root / "gone" / "sub").mkdir(parents=True)
    (tree.root / "gone" / "sub" / "f").write_bytes(b"f")
    (tree.root / "stay").write_bytes(b"s")
    real = os.scandir
    gone = tree.p("gone")

    def vanish(path):  # noqa: ANN001, ANN202
        if path == gone:
            shutil.rmtree(path)  # listed by its parent, gone before its own listing
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", vanish)
    fed = tree.fed_scan()
    assert [Entry(*r).path for r in fed] == [b"stay"]
    assert_fed_rows_are_the_manifest(fed, tree.manifest)


def test_feed_gives_the_rows_an_unreadable_directory_keeps(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root / "open").write_bytes(b"o")
    scanned_then_locked(tree, monkeypatch)
    fed = tree.fed_scan()
    assert tree.last.unreadable == [b"locked"]
    assert_fed_rows_are_the_manifest(fed, tree.manifest)


def test_feed_keeps_the_old_row_of_a_file_still_changing(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root / "busy").write_bytes(b"v1")
    tree.scan()
    (tree.root / "busy").write_bytes(b"v2 longer")
    monkeypatch.setattr(scan_mod, "hash_file", lambda path: None)  # never settles
    fed = tree.fed_scan()
    assert tree.last.unstable == [b"busy"]
    assert_fed_rows_are_the_manifest(fed, tree.manifest)
    assert Entry(*fed[0]).size == 2  # the row it keeps


def test_feed_replays_for_a_late_subscriber_and_drops_once_all_decided() -> None:
    feed = ScanFeed(parties=2)
    feed.put([("", b"a")])
    late = feed.subscribe()  # first party: gets what came so far
    assert late is not None and list(late.batches) == [[("", b"a")]]
    feed.decline()  # second party: nobody else will come
    assert feed.subscribe() is None  # too late now
    feed.put([("", b"b")])
    assert feed.take(late) == [("", b"a")]
    assert feed.take(late) == [("", b"b")]
    assert feed.take(late, timeout=0.01) is None  # nothing yet
    feed.finish(scan_mod.ScanResult(generation=1, previous_generation=0))
    assert feed.take(late) == []
    assert feed.wait().generation == 1


def test_feed_replay_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanfeed, "FEED_REPLAY", 10)
    feed = ScanFeed(parties=1)
    for i in range(3):
        feed.put([("", b"%d" % j) for j in range(5)])
    assert not feed.wanted
    assert feed.subscribe() is None


def test_feed_waits_for_a_slow_subscriber_and_never_for_one_that_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanfeed, "FEED_QUEUE", 2)
    feed = ScanFeed(parties=1)
    sub = feed.subscribe()
    done = threading.Event()

    def produce() -> None:
        for i in range(5):
            feed.put([("", b"%d" % i)])
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: len(sub.batches) == 2, 5, "two batches queued")
    time.sleep(0.1)
    assert not done.is_set() and len(sub.batches) == 2  # bounded: the scan waits
    feed.leave(sub)
    producer.join(5)
    assert done.is_set()


def test_feed_keeps_feeding_the_others_when_one_push_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two pushes in step hold equal queues: the one that leaves is the one let go.
    monkeypatch.setattr(scanfeed, "FEED_QUEUE", 2)
    feed = ScanFeed(parties=2)
    a, b = feed.subscribe(), feed.subscribe()
    got: list[tuple] = []

    def consume() -> None:
        while rows := feed.take(a):
            got.extend(rows)

    reader = threading.Thread(target=consume)
    reader.start()
    feed.leave(b)
    for i in range(20):  # far more than a queue holds: nobody waits for b
        feed.put([("", b"%d" % i)])
    feed.finish(scan_mod.ScanResult(generation=1, previous_generation=0))
    reader.join(5)
    assert [r[1] for r in got] == [b"%d" % i for i in range(20)]


def test_feed_gives_a_batch_once_to_each_push_whoever_leaves_or_joins_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanfeed, "FEED_QUEUE", 1)
    feed = ScanFeed(parties=3)
    slow, other = feed.subscribe(), feed.subscribe()
    feed.put([("", b"0")])  # both queues full now
    seen = {id(other): feed.take(other), id(slow): []}  # other keeps up
    putting = threading.Thread(target=feed.put, args=([("", b"1")],))
    putting.start()  # waits for slow's queue
    # Batch 1 is in the replay once put holds it (put keeps the lock until it waits).
    wait_until(lambda: len(feed._replay) == 2, 5, "the put of batch 1")
    late = feed.subscribe()  # joins during the wait: gets both batches from the replay
    feed.leave(slow)
    putting.join(5)
    assert not putting.is_alive()
    feed.finish(scan_mod.ScanResult(generation=1, previous_generation=0))
    for sub in (other, late):
        rows = list(seen.get(id(sub), []))
        while batch := feed.take(sub):
            rows += batch
        assert [r[1] for r in rows] == [b"0", b"1"]


def test_feed_lets_a_slow_push_go_while_another_waits_for_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanfeed, "FEED_QUEUE", 1)
    monkeypatch.setattr(scanfeed, "FEED_STALL", 0.1)
    feed = ScanFeed(parties=2)
    slow = feed.subscribe()
    feed.put([("", b"0")])
    # Nobody waits for the scan's end: the scan waits for the slow push.
    putting = threading.Thread(target=feed.put, args=([("", b"1")],))
    putting.start()
    time.sleep(0.3)
    assert putting.is_alive()
    # Another push now waits for the end: the slow one is let go.
    waiter = threading.Thread(target=feed.wait)
    waiter.start()
    putting.join(5)
    assert not putting.is_alive()
    with pytest.raises(scan_mod.FeedLeft):
        feed.take(slow)
    feed.finish(scan_mod.ScanResult(generation=1, previous_generation=0))
    waiter.join(5)


def test_feed_failure_reaches_every_push() -> None:
    feed = ScanFeed(parties=2)
    sub = feed.subscribe()
    feed.decline()
    feed.put([("", b"a")])
    feed.fail(OSError("disk on fire"))
    with pytest.raises(FeedClosed, match="disk on fire"):
        feed.take(sub)  # not the rows still queued: nothing more is sent
    with pytest.raises(FeedClosed):
        feed.wait()


# -- the model-based property ---------------------------------------------

NAMES = st.sampled_from([b"a", b"b", b"c\xff", b"d d", b"e.tmp"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: b"/".join(parts))

OPS = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=300)),
    st.tuples(st.just("append"), PATHS, st.binary(min_size=1, max_size=50)),
    st.tuples(st.just("same_size_edit"), PATHS, st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("mkdir"), PATHS, st.just(b"")),
    st.tuples(st.just("remove"), PATHS, st.just(b"")),
    st.tuples(st.just("symlink"), PATHS, NAMES),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([b"\x01", b"\x02"])),
    st.tuples(st.just("rename"), PATHS, PATHS),
    st.tuples(st.just("scan"), st.just(b""), st.just(b"")),
)


def apply(root: bytes, op: tuple) -> None:
    kind, rel, arg = op
    path = root + b"/" + rel
    parent = os.path.dirname(path)
    try:
        if kind == "write":
            os.makedirs(parent, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(arg)
        elif kind == "append":
            with open(path, "ab") as fh:
                fh.write(arg)
        elif kind == "same_size_edit":
            st0 = os.lstat(path)
            if stat.S_ISREG(st0.st_mode) and st0.st_size:
                with open(path, "r+b") as fh:
                    fh.write(bytes([(fh.read(1)[0] + 1) % 256]))
                os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        elif kind == "mkdir":
            os.makedirs(path, exist_ok=True)
        elif kind == "remove":
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        elif kind == "symlink":
            os.makedirs(parent, exist_ok=True)
            os.symlink(arg, path)
        elif kind == "chmod":
            if not os.path.islink(path):
                os.chmod(path, 0o600 if arg == b"\x01" else 0o755)
        elif kind == "rename":
            dst = root + b"/" + arg
            if not (dst + b"/").startswith(path + b"/"):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.rename(path, dst)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, OSError):
        pass  # an op that makes no sense on the current tree is a no-op


def walk(root: bytes) -> dict[bytes, tuple]:
    """A fresh, independent walk: what the manifest must say."""
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == b"." else rel_dir + b"/" + name
            st0 = os.lstat(full)
            perm = stat.S_IMODE(st0.st_mode)
            if stat.S_ISLNK(st0.st_mode):
                out[rel] = (KIND_SYMLINK, os.readlink(full))
            elif stat.S_ISDIR(st0.st_mode):
                out[rel] = (KIND_DIR, perm, st0.st_mtime_ns)
            else:
                with open(full, "rb") as fh:
                    out[rel] = (KIND_FILE, perm, st0.st_mtime_ns, st0.st_size, hashlib.sha256(fh.read()).digest())
    return out


def from_manifest(m: Manifest) -> dict[bytes, tuple]:
    out = {}
    for e in m.entries():
        if e.kind == KIND_SYMLINK:
            out[e.path] = (KIND_SYMLINK, e.target)
        elif e.kind == KIND_DIR:
            out[e.path] = (KIND_DIR, e.mode, e.mtime_ns)
        else:
            out[e.path] = (KIND_FILE, e.mode, e.mtime_ns, e.size, e.sha256)
    return out


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=25), workers=st.sampled_from([1, 2]))
def test_manifest_equals_fresh_walk_after_random_mutations(ops: list, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree(Path(tmp), workers=workers)
        try:
            root = os.fsencode(tree.root)
            generation = 0
            for n, op in enumerate(ops + [("scan", b"", b"")]):
                if op[0] == "scan":
                    if n % 2:
                        tree.scan()
                    else:  # the same scan, feeding a push meanwhile
                        assert_fed_rows_are_the_manifest(tree.fed_scan(), tree.manifest)
                    assert from_manifest(tree.manifest) == walk(root)
                    assert tree.manifest.generation in (generation, generation + 1)
                    assert (tree.manifest.generation > generation) == (tree.last.changes > 0)
                    generation = tree.manifest.generation
                else:
                    apply(root, op)
            # And a scan of an unchanged tree changes nothing.
            tree.scan()
            assert tree.last.changes == 0
        finally:
            tree.manifest.close()


def touched_dirs(op: tuple, root: bytes) -> set[bytes]:
    """What a watcher reports for one op: the directories whose entries changed.

    Conservatively every ancestor of each path involved (a superset of the
    parents that inotify names), never the untouched rest of the tree.  A
    path through a symlinked directory changes the directory it points to,
    which the watcher names by its own path: that one's ancestors count too.
    """
    kind, rel, arg = op
    paths = [rel] + ([arg] if kind == "rename" else [])
    root = os.path.realpath(root)
    out: set[bytes] = set()
    for p in paths:
        real = os.path.realpath(os.path.dirname(root + b"/" + p))
        if real == root or real.startswith(root + b"/"):
            p = (real[len(root) + 1:] + b"/" if real != root else b"") + os.path.basename(p)
            parts = p.split(b"/")
            for i in range(len(parts)):
                out.add(b"/".join(parts[:i]))
        parts = p.split(b"/")
        for i in range(len(parts)):
            out.add(b"/".join(parts[:i]))
    return out


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=25))
@example(ops=[("write", b"b", b""), ("symlink", b"c\xff", b"a"), ("write", b"a/a", b""),
              ("write", b"c\xff/a", b"")])  # a dirty "directory" that is a symlink to one
@example(ops=[("write", b"a/a", b""), ("symlink", b"b", b"a"), ("scan", b"", b""), ("write", b"a", b""),
              ("write", b"b/a", b"")])  # a file written through a symlinked directory
def test_partial_scans_of_touched_dirs_equal_a_fresh_walk(ops: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree(Path(tmp), workers=1)
        try:
            root = os.fsencode(tree.root)
            tree.scan()
            dirty: set[bytes] = set()
            for op in ops + [("scan", b"", b"")]:
                if op[0] == "scan":
                    scan(tree.root, tree.manifest, workers=1, dirs=dirty)
                    assert from_manifest(tree.manifest) == walk(root)
                    dirty = set()
                else:
                    dirty |= touched_dirs(op, root)
                    apply(root, op)
                    dirty |= touched_dirs(op, root)
        finally:
            tree.manifest.close()


def test_partial_scan_reads_only_the_dirs_it_is_given(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("a", "b", "c"):
        (tree.root / d).mkdir()
        (tree.root / d / "f").write_text(d)
    tree.scan()
    listed: list[bytes] = []
    real = os.scandir

    def spy(path):  # noqa: ANN001, ANN202
        listed.append(path)
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", spy)
    (tree.root / "b" / "g").write_text("new")
    result = scan(tree.root, tree.manifest, dirs=[b"b"])
    assert result.counts[ADDED] == 1
    assert listed == [tree.p("b")]


def test_feed_hands_rows_over_as_they_come_not_only_in_full_batches(
        tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tree of a few large files makes few rows a second: each goes out
    # within FEED_FLUSH, not when 500 have gathered or the scan ends.
    for i in range(5):
        (tree.root / f"f{i}").write_bytes(b"%d" % i)
    monkeypatch.setattr(scan_mod, "FEED_FLUSH", 0.0)
    feed = ScanFeed(parties=1)
    sub = feed.subscribe()
    tree.last = scan(tree.root, tree.manifest, workers=1, feed=feed)
    feed.finish(tree.last)
    sizes = []
    while batch := feed.take(sub):
        sizes.append(len(batch))
    assert sum(sizes) == 5 and max(sizes) == 1
