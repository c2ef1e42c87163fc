"""One node pushes to one downstream over a real sshd: issue 4's behaviours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from syncd import config as configmod
from syncd.errors import EXIT_FAILURE, ScanError
from syncd.manifest import Manifest
from syncd.push import PushResult, push_tree, push_with_retries
from syncd.scan import ScanFeed, scan
from tests.nodes import SYNCD, Node, assert_same_tree, make_node, tree_listing
from tests.relay import Relay

pytest_plugins = ["tests.sshd"]


class Pair:
    """A primary and one edge over the shared sshd."""

    def __init__(self, base: Path, ssh, **mirror_keys: str) -> None:  # noqa: ANN001
        self.ssh = ssh
        self.primary = make_node(base, "primary", max_delete="100%")
        self.edge = make_node(base, "edge")
        self.primary.mirrors.append((self.edge, dict(mirror_keys)))
        self.edge.write()
        self.primary.write(ssh)

    def rewrite(self, port: int | None = None, known_hosts: Path | None = None, **node_keys: str) -> None:
        self.primary.node_keys.update(node_keys)
        self.primary.write(self.ssh, port=port, known_hosts=known_hosts)

    def cli(self, *args: str, node: Node | None = None) -> subprocess.CompletedProcess:
        node = node or self.primary
        return subprocess.run(SYNCD + ["-c", str(node.ini), *args], capture_output=True, text=True, timeout=300)

    def push(self, **kw):  # noqa: ANN003, ANN201 - in-process, to read the result's counters
        cfg = configmod.load(self.primary.ini)
        try:
            with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
                scan(cfg.node.root, m)
                return push_with_retries(cfg, cfg.mirrors[0], m, **kw)
        finally:
            # Over when the edge's agent is: it closes its manifest (and its
            # WAL file goes) after the push returned, and a test may next
            # remove or edit the edge's state.
            self.edge.wait_agent_ended()

    def in_sync(self) -> bool:
        """The edge equals the primary: as a client lists it, and as rsync
        sees it (directory and symlink times, root's own included)."""
        assert_same_tree(self.primary.root, self.edge.root)
        return tree_listing(self.primary.root) == tree_listing(self.edge.root)


@pytest.fixture
def pair(tmp_path: Path, sshd) -> Pair:  # noqa: ANN001
    return Pair(tmp_path, sshd)


def populate(root: Path) -> None:
    (root / "pool/main/h/hello").mkdir(parents=True)
    (root / "pool/main/h/hello/hello_1.0.deb").write_bytes(os.urandom(200_000))
    (root / "dists/stable/main/binary-amd64").mkdir(parents=True)
    (root / "dists/stable/main/binary-amd64/Packages").write_text("Package: hello\n" * 500)
    (root / "dists/stable/Release").write_text("Origin: test\n")
    (root / "empty-dir").mkdir()
    (root / "README").write_text("a mirror\n")
    os.chmod(root / "README", 0o640)
    os.symlink("dists/stable", root / "current")


def test_full_sync_then_idempotent(pair: Pair) -> None:
    populate(pair.primary.root)
    first = pair.push()
    assert first.ok, first.error
    assert first.full and first.held_before is None
    assert pair.in_sync()
    again = pair.push()
    assert again.ok and again.files_sent == 0
    assert again.bytes_sent < 200  # a handshake and a goodbye, nothing else
    # Nothing temporary was left in the served tree, nor in staging.
    assert not list((pair.edge.state / "staging").iterdir())


def start_subscribed(cfg: configmod.Config, m: Manifest, feed: ScanFeed) -> tuple[threading.Thread, list]:
    """push_tree in a thread, once its push has subscribed to ``feed``."""
    results: list[PushResult] = []
    pushing = threading.Thread(target=lambda: results.extend(push_tree(cfg, m, feed=feed)))
    pushing.start()
    deadline = time.monotonic() + 30
    while not feed.subscribers and pushing.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feed.subscribers == 1
    return pushing, results


def fed_push(pair: Pair, *, fail: BaseException | None = None) -> PushResult:
    """In process: the push starts, subscribes to the scan's feed, and only
    then does the scan run (so the rows really are fed, not read back)."""
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        feed = ScanFeed(parties=1)
        pushing, results = start_subscribed(cfg, m, feed)
        try:
            result = scan(cfg.node.root, m, feed=feed)
            if fail is not None:
                raise fail
            feed.finish(result)
        except BaseException as err:
            feed.fail(err)
            if err is not fail:
                raise
        finally:
            pushing.join()
    pair.edge.wait_agent_ended()  # as in Pair.push: a failed push's agent takes back its new directories
    return results[0]


def test_a_new_mirror_is_fed_the_rows_while_the_scan_runs(pair: Pair) -> None:
    populate(pair.primary.root)
    for i in range(1200):  # more than one entries batch, in many directories
        d = pair.primary.root / "pool" / f"d{i % 40}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(b"%d" % i * (i % 7))
    r = fed_push(pair)
    assert r.ok, r.error
    assert r.fed and r.full and r.generation == 1
    assert "(full comparison, fed by the scan)" in r.summary()
    assert pair.in_sync()
    # The edge recorded what an ordinary push records: the next run moves nothing.
    with Manifest.open(pair.edge.state, "edge", create=False) as m:
        assert m.generation == 1 and m.get_meta("upstream_generation") == "1"
    assert not list((pair.edge.state / "staging").iterdir())
    again = pair.push()
    assert again.ok and again.files_sent == 0 and not again.full


def test_a_fed_push_that_falls_behind_while_another_waits_is_pushed_after_the_scan(
        tmp_path: Path, sshd, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from syncd import scan as scan_mod
    from syncd import scanfeed

    pair = Pair(tmp_path, sshd, bwlimit="400k")  # a slow link: it takes rows only between files
    populate(pair.primary.root)
    for i in range(6000):  # more rows than the 4 entries batches a push has in flight
        (pair.primary.root / f"f{i}").write_bytes(b"%d" % i * 20)
    monkeypatch.setattr(scanfeed, "FEED_QUEUE", 1)
    monkeypatch.setattr(scan_mod, "FEED_BATCH", 10)
    monkeypatch.setattr(scanfeed, "FEED_STALL", 0.05)
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        feed = ScanFeed(parties=2)
        pushing, results = start_subscribed(cfg, m, feed)
        waiter = threading.Thread(target=feed.wait)  # another push, waiting for the scan's end
        waiter.start()
        feed.finish(scan(cfg.node.root, m, feed=feed))
        pushing.join()
        waiter.join()
    r = results[0]
    assert r.ok, r.error
    assert not r.fed and r.full and r.attempts == 1  # let go, then pushed after the scan
    assert pair.in_sync()


def test_a_new_mirror_whose_agent_speaks_1_3_waits_for_the_scan(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    # An edge still on protocol 1.3 cannot take a begin without a generation:
    # its pusher declines the feed (the scan does not wait for it) and pushes
    # once the scan has committed, as before 1.4.
    old_agent = tmp_path / "agent_1_3.py"
    old_agent.write_text(
        "import sys\n"
        "from syncd import protocol\n"
        "from syncd.agent import session as agent\n"
        "agent.PROTOCOL_VERSION = (1, 3)\n"
        "protocol.FrameWriter.hello.__defaults__ = ((1, 3),)\n"
        "from syncd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    edge_ini = tmp_path / "edge" / "sync.ini"
    pair = Pair(tmp_path, sshd, remote_command=f"{sys.executable} {old_agent} agent --config {edge_ini}")
    assert pair.edge.ini == edge_ini
    populate(pair.primary.root)
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        feed = ScanFeed(parties=1)
        results: list[PushResult] = []
        pushing = threading.Thread(target=lambda: results.extend(push_tree(cfg, m, feed=feed)))
        pushing.start()
        deadline = time.monotonic() + 30
        while feed.wanted and not feed.subscribers and time.monotonic() < deadline:
            time.sleep(0.01)  # the push has decided before the scan starts
        assert not feed.subscribers and not feed.wanted  # it declined: no rows are kept for it
        feed.finish(scan(cfg.node.root, m, feed=feed))
        pushing.join()
    r = results[0]
    assert r.ok, r.error
    assert not r.fed and r.full and r.generation == 1 and r.attempts == 1
    assert "fed by the scan" not in r.summary()
    assert pair.in_sync()
    with Manifest.open(pair.edge.state, "edge", create=False) as em:
        assert em.get_meta("upstream_generation") == "1"


def test_a_fed_push_whose_scan_fails_publishes_nothing(pair: Pair) -> None:
    populate(pair.primary.root)
    r = fed_push(pair, fail=ScanError("the release does not check out"))
    assert not r.ok and "scan failed" in r.error
    assert tree_listing(pair.edge.root) == {}
    with Manifest.open(pair.primary.state, "primary", create=False) as m:
        assert m.acknowledged() == set() and not m.downstreams()  # nothing recorded of it
    # The next run converges.
    proc = pair.cli("run", "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pair.in_sync()


def test_a_known_mirror_waits_for_the_scan_while_a_new_one_is_fed(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    pair = Pair(tmp_path, sshd)
    populate(pair.primary.root)
    assert pair.cli("run", "--once").returncode == 0
    (pair.primary.root / "added").write_text("new")
    (pair.primary.root / "README").unlink()
    late = make_node(tmp_path, "late")
    late.write()
    pair.primary.mirrors.append((late, {}))
    pair.primary.write(sshd)
    proc = pair.cli("run", "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "edge: generation 1 -> 2: 1 new, 1 delete" in proc.stdout
    assert "late: generation none -> 2 (full comparison" in proc.stdout  # fed if the scan was slower
    assert tree_listing(late.root) == tree_listing(pair.primary.root) == tree_listing(pair.edge.root)
    assert_same_tree(pair.primary.root, late.root)
    assert_same_tree(pair.primary.root, pair.edge.root)


@pytest.mark.parametrize("size", [0, 1499, 1501, 70_000])
def test_a_small_file_changed_since_the_scan_fails_the_push_and_goes_nowhere(pair: Pair, size: int) -> None:
    # The bundled small files are read straight into the bundle's buffer,
    # one byte more than the scan saw: a file grown, shrunk or emptied since
    # is refused in so many words, and the edge publishes nothing of it.
    root = pair.primary.root
    (root / "pool").mkdir()
    for i in range(6):
        (root / "pool" / f"p{i}.deb").write_bytes(bytes([i]) * 1500)
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan(cfg.node.root, m)
        (root / "pool/p3.deb").write_bytes(b"x" * size)
        result = push_with_retries(cfg, cfg.mirrors[0], m)
    assert not result.ok
    assert "pool/p3.deb: changed since the last scan" in result.error
    assert not (pair.edge.root / "pool/p3.deb").exists()
    # Rescanned, it goes.
    assert pair.push().ok
    assert pair.in_sync()


def test_every_kind_of_change(pair: Pair) -> None:
    populate(pair.primary.root)
    (pair.primary.root / "dir-to-file").mkdir()
    (pair.primary.root / "dir-to-file/x").write_text("x")
    (pair.primary.root / "file-to-dir").write_text("f")
    assert pair.push().ok
    r = pair.primary.root
    (r / "README").write_text("edited in place\n")  # content
    os.chmod(r / "dists/stable/Release", 0o600)  # mode
    os.utime(r / "pool/main/h/hello/hello_1.0.deb", ns=(10**18, 10**18))  # mtime
    os.unlink(r / "current")
    os.symlink("pool", r / "current")  # symlink retarget
    shutil.move(r / "empty-dir", r / "moved-dir")  # directory rename
    (r / "new-empty").mkdir()
    shutil.rmtree(r / "dir-to-file")
    (r / "dir-to-file").write_text("now a file")
    os.unlink(r / "file-to-dir")
    (r / "file-to-dir").mkdir()
    (r / "file-to-dir/inside").write_text("i")
    with open(r / "dists/stable/main/binary-amd64/Packages", "a") as fh:
        fh.write("Package: more\n" * 100)  # append
    result = pair.push()
    assert result.ok, result.error
    assert pair.in_sync()
    counts = result.counts()
    assert counts["delete"] >= 2 and counts["dir"] >= 2 and counts["link"] == 1 and counts["meta"] >= 1


def test_directory_symlink_and_root_times_follow_the_primary(pair: Pair) -> None:
    # What a rename or an unlink does to a directory's mtime on the edge is
    # put back to the primary's, in directories the primary's scan saw no
    # change in (files rewritten in place), in root itself, and for a
    # symlink whose only change is its own mtime.
    populate(pair.primary.root)
    assert pair.push().ok
    assert pair.in_sync()
    r = pair.primary.root
    (r / "dists/stable/Release").write_text("Origin: test\nSuite: stable\n")  # in place: dists/stable/ keeps its time
    (r / "README").write_text("edited in place\n")
    os.utime(r / "current", ns=(10**18, 10**18), follow_symlinks=False)  # the link's own time only
    result = pair.push()
    assert result.ok, result.error
    assert {i.path: i.action for i in result.items}[b"current"] == "meta"
    assert pair.in_sync()
    assert os.lstat(pair.edge.root / "current").st_mtime_ns == 10**18
    # Root's own time alone is a generation, and it reaches the edge.
    os.utime(r, ns=(2 * 10**18, 2 * 10**18))
    result = pair.push()
    assert result.ok and result.generation == 3 and result.files_sent == 0, result.error
    assert os.stat(pair.edge.root).st_mtime_ns == 2 * 10**18
    assert pair.in_sync()
    with Manifest.open(pair.edge.state, "edge", create=False) as m:
        assert m.root_row().mtime_ns == 2 * 10**18


def test_rename_of_big_file_moves_almost_nothing(pair: Pair) -> None:
    big = os.urandom(64 << 20)
    (pair.primary.root / "isos").mkdir()
    (pair.primary.root / "isos/old.iso").write_bytes(big)
    assert pair.push().ok
    os.rename(pair.primary.root / "isos/old.iso", pair.primary.root / "isos/new.iso")
    result = pair.push()
    assert result.ok, result.error
    assert result.bytes_sent < 0.01 * len(big)
    assert result.counts()["copy"] == 1 and result.files_sent == 0
    assert pair.in_sync()


def test_a_local_copy_that_no_longer_matches_is_sent_whole(pair: Pair) -> None:
    # The edge's file was changed by hand (same size, its manifest unaware):
    # the copy made by a staging thread fails its SHA-256, the agent says
    # "failed" with retry_whole, and the pusher sends the file whole.
    data = os.urandom(3 << 20)
    (pair.primary.root / "a.iso").write_bytes(data)
    assert pair.push().ok
    edge_a = pair.edge.root / "a.iso"
    st = edge_a.stat()
    edge_a.write_bytes(os.urandom(len(data)))
    os.utime(edge_a, ns=(st.st_atime_ns, st.st_mtime_ns))
    (pair.primary.root / "b.iso").write_bytes(data)
    result = pair.push()
    assert result.ok, result.error
    assert result.files_sent == 1 and result.bytes_sent > len(data) // 2
    assert (pair.edge.root / "b.iso").read_bytes() == data
    # (No oracle: the edge's a.iso was changed behind its manifest on purpose,
    # and an ordinary push does not look at it; a full comparison repairs it.)


def test_edit_in_big_file_goes_as_delta(pair: Pair) -> None:
    data = bytearray(os.urandom(8 << 20))
    (pair.primary.root / "big").write_bytes(data)
    assert pair.push().ok
    data[4_000_000:4_000_100] = b"Z" * 100
    data[6_000_000:6_000_000] = b"inserted" * 100
    (pair.primary.root / "big").write_bytes(data)
    result = pair.push()
    assert result.ok and result.counts()["delta"] == 1
    assert result.bytes_sent < 0.02 * len(data)
    assert pair.in_sync()


def test_odd_names(pair: Pair) -> None:
    root = os.fsencode(pair.primary.root)
    for name in (b"with space", b"new\nline", b"caf\xe9", b"\xff\xfe.bin", b"-rf", b"*"):
        with open(root + b"/" + name, "wb") as fh:
            fh.write(name * 3)
    os.mkdir(root + b"/d\x80ir")
    with open(root + b"/d\x80ir/f\x81", "wb") as fh:
        fh.write(b"deep")
    assert pair.push().ok
    assert pair.in_sync()


def test_planted_symlink_on_edge_is_not_written_through(pair: Pair, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    (pair.primary.root / "pool").mkdir()
    (pair.primary.root / "pool/pkg.deb").write_text("package")
    (pair.primary.root / "leaf").write_text("leaf")
    # Someone planted links on the edge before the first sync.
    os.symlink(outside, pair.edge.root / "pool")
    os.symlink(outside / "canary", pair.edge.root / "leaf")
    before = tree_listing(outside)
    result = pair.push()
    assert tree_listing(outside) == before
    assert (outside / "canary").read_text() == "untouched"
    assert not (outside / "pkg.deb").exists()
    # Both planted links were replaced (unlinked, never followed) by what the
    # primary has there: a real directory and a real file.
    assert result.ok, result.error
    assert not os.path.islink(pair.edge.root / "pool") and (pair.edge.root / "pool").is_dir()
    assert not os.path.islink(pair.edge.root / "leaf")
    assert pair.in_sync()


def test_wrong_host_key_refused_nothing_written(pair: Pair) -> None:
    populate(pair.primary.root)
    pair.rewrite(known_hosts=pair.ssh.wrong_known_hosts(pair.primary.base / "bad_known_hosts"))
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    assert "host key" in proc.stdout.lower() or "host key" in proc.stderr.lower()
    assert list(pair.edge.root.iterdir()) == []
    assert not pair.edge.state.exists()


def test_unreachable_host_is_one_line_and_retried(pair: Pair) -> None:
    populate(pair.primary.root)
    with Relay("127.0.0.1", 1) as dead:  # nothing listens behind it
        port = dead.port
    pair.rewrite(port=port)
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    assert "FAILED after 3 attempt(s)" in proc.stdout
    assert proc.stderr.count("retry") == 2


def test_deletion_guard(pair: Pair) -> None:
    for i in range(20):
        (pair.primary.root / f"f{i}").write_text(str(i))
    assert pair.push().ok
    for i in range(5):
        os.unlink(pair.primary.root / f"f{i}")
    pair.rewrite(max_delete="10%")
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    assert "plan deletes 5 of 20 entries" in proc.stdout
    assert len(list(pair.edge.root.iterdir())) == 20  # nothing changed
    proc = pair.cli("run", "--once", "--force-deletes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pair.in_sync()


def test_dry_run_changes_nothing_and_itemizes(pair: Pair) -> None:
    populate(pair.primary.root)
    assert pair.push().ok
    (pair.primary.root / "added").write_text("new")
    os.rename(pair.primary.root / "pool/main/h/hello/hello_1.0.deb", pair.primary.root / "hello.deb")
    before = tree_listing(pair.edge.root)
    proc = pair.cli("run", "--once", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "edge: new    added" in lines
    assert "edge: copy   hello.deb  (from pool/main/h/hello/hello_1.0.deb)" in lines
    assert "edge: delete pool/main/h/hello/hello_1.0.deb" in lines
    assert tree_listing(pair.edge.root) == before  # (a dry run leaves the edge behind on purpose)
    assert not list((pair.edge.state / "staging").iterdir())


def test_filters_partial_mirror(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    pair = Pair(tmp_path, sshd, exclude="*.iso binary-arm64/")
    r = pair.primary.root
    (r / "dists/main/binary-amd64").mkdir(parents=True)
    (r / "dists/main/binary-arm64").mkdir(parents=True)
    (r / "dists/main/binary-amd64/Packages").write_text("amd64")
    (r / "dists/main/binary-arm64/Packages").write_text("arm64")
    (r / "big.iso").write_bytes(b"iso")
    # The edge has an ISO of its own, which its filter excludes: never deleted.
    (pair.edge.root / "local.iso").write_text("kept")
    assert pair.push().ok
    e = pair.edge.root
    assert (e / "dists/main/binary-amd64/Packages").read_text() == "amd64"
    assert not (e / "dists/main/binary-arm64").exists()
    assert not (e / "big.iso").exists()
    assert (e / "local.iso").read_text() == "kept"
    # rsync with the same rules finds nothing else to change (directory times included).
    assert_same_tree(pair.primary.root, e, exclude=("*.iso", "binary-arm64/"))


def test_lost_edge_manifest_full_comparison_sends_nothing(pair: Pair) -> None:
    populate(pair.primary.root)
    assert pair.push().ok
    shutil.rmtree(pair.edge.state)
    (pair.edge.root / "stray").write_text("not on the primary")
    result = pair.push()
    assert result.ok and result.full
    assert result.files_sent == 0  # recognized by size, mtime and a local re-hash
    assert pair.in_sync()  # and the stray file went


def test_edge_edit_by_hand_is_repaired_on_full_comparison(pair: Pair) -> None:
    populate(pair.primary.root)
    assert pair.push().ok
    (pair.edge.root / "README").write_text("vandalized\n")
    shutil.rmtree(pair.edge.state)
    result = pair.push()
    assert result.ok and result.files_sent == 1
    assert pair.in_sync()


def test_corrupt_leftover_in_staging_is_caught_and_resent(pair: Pair) -> None:
    """An object left in staging by an earlier session (as a power cut could
    leave one) is trusted by name when planning but re-hashed at commit, even
    when a stager's log of checked objects names it: that log is from another
    boot, and goes."""
    import hashlib

    data = os.urandom(300_000)
    (pair.primary.root / "pkg.deb").write_bytes(data)
    staging = pair.edge.state / "staging"
    staging.mkdir(parents=True)
    name = hashlib.sha256(data).hexdigest()
    (staging / name).write_bytes(b"not the content" * 100)
    (staging / ("verified." + "0" * 32)).write_text(name + "\n")
    first = pair.push()
    assert not first.ok and "differs from its SHA-256" in first.error
    assert not (staging / ("verified." + "0" * 32)).exists()
    assert not (pair.edge.root / "pkg.deb").exists()
    second = pair.push()
    assert second.ok, second.error
    assert second.files_sent == 1
    assert pair.in_sync()


def test_unchanged_symlink_below_root_is_left_alone(pair: Pair) -> None:
    (pair.primary.root / "dists/stable").mkdir(parents=True)
    os.symlink("stable", pair.primary.root / "dists/current")
    os.symlink("dists", pair.primary.root / "top")
    assert pair.push().ok
    before = os.lstat(pair.edge.root / "dists/current").st_ino
    (pair.primary.root / "other").write_text("a change elsewhere")
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan(cfg.node.root, m)
        # A full comparison lists every row, the unchanged links included.
        result = push_with_retries(cfg, cfg.mirrors[0], m, force_full=True)
    assert result.ok, result.error
    assert result.counts()["link"] == 0, [i.line() for i in result.items]
    assert os.lstat(pair.edge.root / "dists/current").st_ino == before
    assert pair.in_sync()


def test_agent_that_cannot_start_is_quoted(pair: Pair) -> None:
    """A mirror whose own config is broken: the pusher's one line says why,
    from the agent's stderr, instead of a bare handshake error."""
    populate(pair.primary.root)
    shutil.rmtree(pair.edge.root)
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    line = next(ln for ln in proc.stdout.splitlines() if "FAILED" in ln)
    assert "agent stderr:" in line and str(pair.edge.root) in line, line


def test_fed_rows_are_cut_into_a_batch_when_the_scan_pauses() -> None:
    from syncd.push import _CUT, _batches

    rows = [1, 2, _CUT, 3, _CUT, _CUT, 4, 5, 6, _CUT]
    assert list(_batches(rows, 2)) == [[1, 2], [3], [4, 5], [6]]


def test_batches_stay_inside_their_byte_budget() -> None:
    # Long names (and hard links' first names) cut a batch before its count.
    from syncd.push import _batches

    sizes = [3, 3, 3, 9, 1, 1, 1, 1]
    got = list(_batches(range(len(sizes)), 5, size=lambda i: sizes[i], budget=7))
    assert got == [[0, 1], [2], [3], [4, 5, 6, 7]]


def test_open_in_background_waits_for_the_import_not_the_connection(tmp_path: Path) -> None:
    """run --once overlaps a mirror's handshake with its scan: the opener
    thread imports the transport first (the caller waits for that alone, so
    that its own imports do not stretch it), never the connection; channel()
    then waits for the connection and raises what it met."""
    from syncd.errors import ConnectionLostError
    from syncd.push import Link

    (tmp_path / "root").mkdir()
    ini = tmp_path / "sync.ini"
    ini.write_text(f"[node]\nname = p\nroot = {tmp_path / 'root'}\nstate_dir = {tmp_path / 'state'}\n\n"
                   "[mirror:m]\nhost = 127.0.0.1\nport = 9\n")
    mirror = configmod.load(ini).mirrors[0]
    started, release = threading.Event(), threading.Event()

    def slow_open(m):  # noqa: ANN001, ANN202 - a handshake that takes its time, then fails
        started.set()
        release.wait(10)
        raise ConnectionLostError(f"{m.host}: connection refused")

    link = Link(mirror, slow_open)
    t = time.monotonic()
    link.open_in_background()
    assert time.monotonic() - t < 1.0
    assert started.wait(5)
    release.set()
    with pytest.raises(ConnectionLostError, match="connection refused"):
        link.channel()
    link.close()
