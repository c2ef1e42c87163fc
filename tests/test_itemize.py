"""``run --once -i``: rsync's own ``-i`` output is the oracle.

The same change set, seen two ways: what syncd's agent reports for each
change (``run --once --dry-run -i``, then the real push with ``-i``), and
what ``rsync -rlptHni --delete PRIMARY/ EDGE/`` prints for the same two
trees.  The sets of (itemize string, path) must be equal, but for the
differences the ``run --help`` legend and the README document:

- a file whose content is the same but whose time changed: syncd knows the
  content by SHA-256 and says ``.f..t......``; rsync without --checksum
  cannot know and says ``>f..t......`` (rsync --checksum says ``.f..t......``,
  and this test holds syncd to that);
- the root itself (rsync's ``./``) is not itemized.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from syncd.plan import Item, itemize
from tests.nodes import SYNCD, assert_same_tree, make_node

pytest_plugins = ["tests.sshd"]

RSYNC = shutil.which("rsync")
T0 = 1_600_000_000  # whole seconds: rsync compares times to the second
T1 = T0 + 86_400


def _settime(path: Path, t: int) -> None:
    os.utime(path, ns=(t * 10**9, t * 10**9), follow_symlinks=False)


def _build(root: Path) -> None:
    files = {
        "README": b"a mirror\n",
        "pool/a.deb": b"a" * 1000,
        "pool/b.deb": b"b" * 1000,
        "pool/same-size.deb": b"1" * 500,
        "pool/touched.deb": b"t" * 300,
        "pool/mode.deb": b"m" * 200,
        "pool/mode-time.deb": b"n" * 200,
        "pool/renamed.iso": os.urandom(100_000),
        "pool/big.img": os.urandom(300_000),
        "gone/x": b"x",
        "gone/sub/y": b"y",
        "dir-mode/f": b"f",
        "becomes-dir": b"a file for now",
        "becomes-file/in": b"in a directory for now",
        "dists/stable/Release": b"Origin: test\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        os.chmod(root / name, 0o644)
    os.symlink("stable", root / "dists/current")
    os.symlink("a.deb", root / "pool/latest")
    os.symlink("README", root / "old-link")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            _settime(Path(dirpath) / name, T0)
    _settime(root, T0)


def _change(root: Path) -> None:
    (root / "pool/new.deb").write_bytes(b"new")
    (root / "newdir/deeper").mkdir(parents=True)
    (root / "newdir/deeper/f").write_bytes(b"f")
    (root / "pool/a.deb").write_bytes(b"A" * 1500)  # content and size
    (root / "pool/same-size.deb").write_bytes(b"2" * 500)  # content, same size
    os.chmod(root / "pool/mode.deb", 0o600)  # mode only: its time is left as it was
    os.chmod(root / "pool/mode-time.deb", 0o640)
    os.chmod(root / "dir-mode", 0o750)
    os.rename(root / "pool/renamed.iso", root / "pool/renamed-2.iso")  # a local copy on the edge
    with open(root / "pool/big.img", "r+b") as fh:  # a delta
        fh.seek(150_000)
        fh.write(b"edited" * 100)
    shutil.rmtree(root / "gone")
    (root / "old-link").unlink()
    os.symlink("pool", root / "new-link")
    (root / "dists/current").unlink()
    os.symlink("stable/Release", root / "dists/current")  # retargeted
    (root / "becomes-dir").unlink()
    (root / "becomes-dir").mkdir()
    (root / "becomes-dir/inside").write_bytes(b"in")
    shutil.rmtree(root / "becomes-file")
    (root / "becomes-file").write_bytes(b"a file now")
    (root / "README").unlink()
    (root / "README").write_bytes(b"a mirror\n")  # same content, new file: same bytes, a new time only
    os.chmod(root / "README", 0o644)
    changed = ["pool/new.deb", "newdir/deeper/f", "newdir/deeper", "newdir", "pool/a.deb", "pool/same-size.deb",
               "pool/mode-time.deb", "pool/touched.deb", "pool/big.img", "new-link", "dists/current",
               "becomes-dir/inside", "becomes-dir", "becomes-file", "README", "pool/latest", "pool", "dists", "."]
    for name in changed:
        _settime(root / name, T1)


def _syncd_set(stdout: str) -> set[tuple[str, str]]:
    out = set()
    for line in stdout.splitlines():
        m = re.fullmatch(r"edge: ([<>ch.][fdL][.+ cstp]{9}|\*deleting  ) (.+)", line)
        if m:  # (else the report's summary lines)
            out.add((m.group(1), m.group(2).split(" -> ")[0].split(" => ")[0]))
    return out


def _rsync_set(primary: Path, edge: Path, *extra: str) -> set[tuple[str, str]]:
    proc = subprocess.run([RSYNC, "-rlptHni", *extra, "--delete", f"{primary}/", f"{edge}/"],
                          capture_output=True, text=True, check=True)
    return {(line[:11], line[12:].split(" -> ")[0].split(" => ")[0]) for line in proc.stdout.splitlines()}


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
def test_itemize_equals_rsyncs_own(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary", max_delete="100%")
    edge = make_node(tmp_path, "edge")
    primary.mirrors.append((edge, {}))
    edge.write()
    primary.write(sshd)
    _build(primary.root)

    def syncd(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(SYNCD + ["-c", str(primary.ini), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    first = syncd("run", "--once", "-i")
    # A new mirror: everything is new, as rsync says of an empty destination.
    assert ("cd+++++++++", "pool/") in _syncd_set(first.stdout)
    assert (">f+++++++++", "pool/a.deb") in _syncd_set(first.stdout)
    assert ("cL+++++++++", "dists/current") in _syncd_set(first.stdout)
    assert_same_tree(primary.root, edge.root)  # both trees equal before the change set

    _change(primary.root)
    expected = _rsync_set(primary.root, edge.root)
    by_checksum = _rsync_set(primary.root, edge.root, "-c")
    # What the change set must show, rsync's way (a sanity check of the oracle itself).
    for line in [(">f+++++++++", "pool/new.deb"), ("cd+++++++++", "newdir/"), (">f.st......", "pool/a.deb"),
                 (">f..t......", "pool/same-size.deb"), (".f...p.....", "pool/mode.deb"),
                 (">f..tp.....", "pool/mode-time.deb"), (".d...p.....", "dir-mode/"),
                 (">f+++++++++", "pool/renamed-2.iso"), ("*deleting  ", "pool/renamed.iso"),
                 ("*deleting  ", "gone/"), ("*deleting  ", "gone/sub/y"), ("cL+++++++++", "new-link"),
                 ("cLc.t......", "dists/current"), (".L..t......", "pool/latest"), (".d..t......", "pool/"), (">f..t......", "README"),
                 ("cd+++++++++", "becomes-dir/"), (">f+++++++++", "becomes-dir/inside"),
                 ("*deleting  ", "becomes-file/in"), (">f+++++++++", "becomes-file")]:
        assert line in expected, (line, sorted(expected))
    # The documented differences.
    expected.discard((".d..t......", "./"))
    assert (".f..t......", "README") in by_checksum and (".f..t......", "pool/touched.deb") in by_checksum
    for flags, path in sorted(expected):
        # Where rsync --checksum finds the content the same, syncd says what it says.
        same = next((f for f, p in by_checksum if p == path and f.startswith(".f")), None)
        if flags.startswith(">f") and same is not None:
            expected.remove((flags, path))
            expected.add((same, path))

    dry = _syncd_set(syncd("run", "--once", "--dry-run", "-i").stdout)
    assert dry == expected, f"syncd only: {sorted(dry - expected)}\nrsync only: {sorted(expected - dry)}"
    real = syncd("run", "--once", "-i")
    assert _syncd_set(real.stdout) == expected
    assert "edge: cLc.t...... dists/current -> stable/Release" in real.stdout.splitlines()
    assert "edge: cd+++++++++ newdir/" in real.stdout.splitlines()
    assert_same_tree(primary.root, edge.root)  # the push did what it said
    # Nothing to do: nothing itemized.
    assert _syncd_set(syncd("run", "--once", "-i").stdout) == set()


def test_itemize_of_each_kind(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    os.chmod(f, 0o644)
    _settime(f, T0)
    st = os.lstat(f)
    common = dict(size=5, mtime_ns=T0 * 10**9, mode=0o644)
    assert itemize("f", None, **common) == ">f+++++++++"
    assert itemize("d", st, **common) == "cd+++++++++"  # a file where a directory goes: made anew
    assert itemize("f", st, **common) == ".f........."
    assert itemize("f", st, **common, transfer=True) == ">f........."
    assert itemize("f", st, **{**common, "size": 6}, transfer=True) == ">f.s......."
    assert itemize("f", st, **{**common, "mtime_ns": T1 * 10**9, "mode": 0o600}) == ".f..tp....."
    os.symlink("f", tmp_path / "l")
    _settime(tmp_path / "l", T0)
    lst = os.lstat(tmp_path / "l")
    assert itemize("L", lst, **{**common, "mode": 0o600}, target_changed=True) == "cLc........"
    assert itemize("L", lst, **{**common, "mtime_ns": 1}) == ".L..t......"


def test_items_from_the_wire() -> None:
    item = Item.from_wire(["dir", b"a/b", None, None, None, "cd+++++++++/"], 0, "d", None)
    assert item.itemized() == "cd+++++++++ a/b/"
    item = Item.from_wire(["delete", b"gone", None, None, None, "*deleting  /"], 0, None, None)
    assert item.itemized() == "*deleting   gone/"
    item = Item.from_wire(["link", b"l", None, None, None, "cL+++++++++"], 0, "L", b"t")
    assert item.itemized() == "cL+++++++++ l -> t"
    # An agent that does not itemize (five fields): what the pusher knows, '?' for the rest.
    assert Item.from_wire(["new", b"x", "whole", None, None], 3, "f", None).itemized() == ">f????????? x"
    assert Item.from_wire(["delete", b"x", None, None, None], 0, None, None).itemized() == "*deleting   x"
    for bad in ("", ">f+++", "xx+++++++++", ">f+++++++++//", 7, ">f++++++++\n"):
        with pytest.raises(ValueError):
            Item.from_wire(["new", b"x", "whole", None, None, bad], 0, "f", None)


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
def test_hard_links_itemize_as_rsync_h_does(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    """A file of three names: one is received, the others are linked to it
    (``hf+++++++++ NAME => FIRST``), as rsync -H prints them.  Which name
    comes first is each tool's own choice: the test holds the rest to rsync."""
    primary = make_node(tmp_path, "primary", max_delete="100%")
    edge = make_node(tmp_path, "edge")
    primary.mirrors.append((edge, {}))
    edge.write()
    primary.write(sshd)
    (primary.root / "pool").mkdir()
    (primary.root / "pool/other").write_bytes(b"o")
    run = [*SYNCD, "-c", str(primary.ini), "run", "--once", "-i"]
    assert subprocess.run(run, capture_output=True, text=True, timeout=300).returncode == 0
    (primary.root / "pool/a").write_bytes(b"linked")
    os.link(primary.root / "pool/a", primary.root / "pool/b")
    os.link(primary.root / "pool/a", primary.root / "c")
    for p in ("pool/a", "pool", "."):
        _settime(primary.root / p, T1)
    expected = _rsync_set(primary.root, edge.root)
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = _syncd_set(proc.stdout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("edge: hf")]
    firsts = {ln.rsplit(" => ", 1)[1] for ln in lines}
    assert len(lines) == 2 and len(firsts) == 1, proc.stdout
    (first,) = firsts
    assert (">f+++++++++", first) in got

    def shape(items: set[tuple[str, str]]) -> set[tuple[str, str]]:
        # The name received and the names linked to it, whichever is first.
        return {(">f+++++++++" if f == "hf+++++++++" else f, p) for f, p in items}

    expected.discard((".d..t......", "./"))
    assert shape(got) == shape(expected), (sorted(got), sorted(expected))
    assert_same_tree(primary.root, edge.root)
