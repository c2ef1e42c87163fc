"""Hard links, as rsync -H keeps them: names of one file on the primary are
names of one file on every mirror below it, and the file's bytes travel once.

Each scenario over the real sshd ends with the oracle, ``rsync -rlptHSnci
--delete`` (``-H`` compares hard links), printing nothing.  Hostile groups go
to a real agent process through hand-made frames, as in test_agent.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import config as configmod
from syncd.errors import ProtocolError
from syncd.manifest import KIND_DIR, KIND_FILE, KIND_SYMLINK, MANIFEST_NAME, Manifest, join
from syncd.plan import LinkChecker
from syncd.push import push_with_retries
from syncd.scan import RELINKED, link_changed, scan
from tests.nodes import SYNCD, assert_same_tree, make_node, rsync_differences
from tests.relay import Relay
from tests.test_agent import Peer, assert_outside_untouched, edge, row  # noqa: F401 - edge is a fixture
from tests.test_push import Pair, fed_push

pytest_plugins = ["tests.sshd"]

MiB = 1 << 20


def one_file(root: Path, *names: str) -> None:
    """``names`` are exactly the names of one file under ``root``."""
    stats = [os.lstat(root / n) for n in names]
    assert len({(s.st_dev, s.st_ino) for s in stats}) == 1, names
    assert stats[0].st_nlink == len(names), (names, stats[0].st_nlink)


def replace(path: Path, data: bytes | None = None, *, like: Path | None = None) -> None:
    """Put a new file at ``path`` by rename, as a publisher does: new bytes,
    or a copy of ``like`` with its times (same content, a file of its own)."""
    tmp = path.with_name(path.name + ".tmp")
    if like is not None:
        shutil.copy2(like, tmp)
    else:
        tmp.write_bytes(data)
    os.rename(tmp, path)


@pytest.fixture
def pair(tmp_path: Path, sshd) -> Pair:  # noqa: ANN001
    return Pair(tmp_path, sshd)


def pushed(pair: Pair, **kw):  # noqa: ANN003, ANN201
    result = pair.push(**kw)
    assert result.ok, result.error
    return result


def group_of_three(root: Path, size: int = 64 * 1024) -> bytes:
    (root / "pool").mkdir()
    data = os.urandom(size)
    (root / "pool/a.iso").write_bytes(data)
    os.link(root / "pool/a.iso", root / "pool/b.iso")
    os.link(root / "pool/a.iso", root / "pool/c.iso")
    (root / "pool/single").write_text("one name")
    return data


def test_a_group_of_three_names_is_one_file_and_its_bytes_go_once(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    with Relay(sshd.host, sshd.port) as relay:
        pair = Pair(tmp_path, sshd)
        pair.rewrite(port=relay.port, known_hosts=sshd.known_hosts_for(relay.port))
        group_of_three(pair.primary.root, 4 * MiB)  # random: zstd cannot shrink it
        result = pushed(pair)
        wire = relay.counts()["up"]
        # A second push finds it all in place.
        again = pushed(pair)
    assert result.files_sent == 2  # the group's bytes, and the single file
    assert result.counts()["hlink"] == 2
    # About 4 MiB on the wire, not 12: the other names are linked on the mirror.
    assert 4 * MiB < wire < 4.5 * MiB, wire
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso")
    one_file(pair.edge.root, "pool/single")
    assert again.files_sent == 0 and not again.items
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_name_added_to_a_group_is_linked_without_bytes(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root, 2 * MiB)
    pushed(pair)
    (root / "mirror").mkdir()
    os.link(root / "pool/b.iso", root / "mirror/d.iso")  # the file has four names now
    result = pushed(pair)
    assert not result.full and result.files_sent == 0
    assert [i.line() for i in result.items if i.action == "hlink"] == ["hlink  mirror/d.iso => pool/a.iso"]
    assert result.bytes_sent < 64 * 1024
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso", "mirror/d.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


@pytest.mark.parametrize("how", ["new content", "same content and times"])
def test_a_link_broken_by_rewriting_one_name(pair: Pair, how: str) -> None:
    root = pair.primary.root
    group_of_three(root)
    pushed(pair)
    if how == "new content":
        replace(root / "pool/b.iso", os.urandom(1000))
    else:
        # Nothing but the file's identity changes: b.iso is a file of its own now.
        replace(root / "pool/b.iso", like=root / "pool/a.iso")
    result = pushed(pair)
    assert not result.full
    one_file(pair.edge.root, "pool/a.iso", "pool/c.iso")
    one_file(pair.edge.root, "pool/b.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_group_across_directories(pair: Pair) -> None:
    root = pair.primary.root
    for d in ("dists/stable", "pool/main/h", "by-name"):
        (root / d).mkdir(parents=True)
    (root / "pool/main/h/hello.deb").write_bytes(os.urandom(300_000))
    os.link(root / "pool/main/h/hello.deb", root / "by-name/hello.deb")
    os.link(root / "pool/main/h/hello.deb", root / "dists/stable/hello.deb")
    pushed(pair)
    one_file(pair.edge.root, "pool/main/h/hello.deb", "by-name/hello.deb", "dists/stable/hello.deb")
    assert_same_tree(pair.primary.root, pair.edge.root)
    # The first name (in path order) goes; the others stay one file.
    os.unlink(root / "by-name/hello.deb")
    pushed(pair)
    one_file(pair.edge.root, "pool/main/h/hello.deb", "dists/stable/hello.deb")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_rename_of_one_name(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root, 3 * MiB)
    pushed(pair)
    (root / "moved").mkdir()
    os.rename(root / "pool/b.iso", root / "moved/b.iso")
    result = pushed(pair)
    assert result.files_sent == 0 and result.bytes_sent < 64 * 1024
    one_file(pair.edge.root, "pool/a.iso", "moved/b.iso", "pool/c.iso")
    assert not (pair.edge.root / "pool/b.iso").exists()
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_removing_names_one_by_one(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root)
    pushed(pair)
    os.unlink(root / "pool/c.iso")
    pushed(pair)
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)
    os.unlink(root / "pool/a.iso")  # the group's first name
    pushed(pair)
    one_file(pair.edge.root, "pool/b.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_two_single_files_become_one_file(pair: Pair) -> None:
    root = pair.primary.root
    (root / "a").write_bytes(b"same bytes" * 1000)
    shutil.copy2(root / "a", root / "b")
    (root / "c").write_bytes(b"other bytes" * 1000)
    pushed(pair)
    one_file(pair.edge.root, "b")
    os.unlink(root / "b")
    os.link(root / "a", root / "b")  # a and b: one file
    os.unlink(root / "c")
    os.link(root / "a", root / "c")  # c: new content, by a link
    result = pushed(pair)
    assert result.files_sent == 0
    one_file(pair.edge.root, "a", "b", "c")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_the_mirrors_manifest_records_its_own_inodes(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root)
    pushed(pair)

    def recorded(path: str) -> tuple:
        with Manifest.open(pair.edge.state, "edge", create=False) as m:
            e = m.lookup(path.encode())
        return e.dev, e.ino, e.nlink, e.ctime_ns

    def actual(path: str) -> tuple:
        s = os.lstat(pair.edge.root / path)
        return s.st_dev, s.st_ino, s.st_nlink, s.st_ctime_ns

    for name in ("pool/a.iso", "pool/b.iso", "pool/c.iso", "pool/single"):
        assert recorded(name) == actual(name), name
    # A name removed: the push lists only that name, and the rows of the
    # others follow their file's new link count (and ctime).
    os.unlink(root / "pool/c.iso")
    pushed(pair)
    for name in ("pool/a.iso", "pool/b.iso"):
        assert recorded(name) == actual(name), name
        assert recorded(name)[2] == 2
    # So a full comparison finds nothing to do, nor to record again.
    assert not full_comparison(pair).items
    # One name made a file of its own by hand: a full comparison links it
    # again, and records every name anew (the first name's too, though a
    # full comparison keeps no row that is as recorded).
    replace(pair.edge.root / "pool/b.iso", like=pair.edge.root / "pool/a.iso")
    assert [i.line() for i in full_comparison(pair).items] == ["hlink  pool/b.iso => pool/a.iso"]
    for name in ("pool/a.iso", "pool/b.iso"):
        assert recorded(name) == actual(name), name
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_full_comparison_records_a_first_name_it_did_not_list_again(pair: Pair) -> None:
    # A full comparison keeps no row that is recorded as it is; the first
    # name was a file of one name, recorded so: once a name is linked to it,
    # its row is recorded anew all the same.
    root = pair.primary.root
    (root / "a").write_bytes(b"a" * 10_000)
    pushed(pair)
    os.link(root / "a", root / "b")
    assert [i.line() for i in full_comparison(pair).items] == ["hlink  b => a"]
    with Manifest.open(pair.edge.state, "edge", create=False) as m:
        e = m.lookup(b"a")
    st = os.lstat(pair.edge.root / "a")
    assert (e.ino, e.nlink, e.ctime_ns) == (st.st_ino, 2, st.st_ctime_ns)
    assert_same_tree(pair.primary.root, pair.edge.root)


def full_comparison(pair: Pair):  # noqa: ANN201
    cfg = configmod.load(pair.primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan(cfg.node.root, m)
        result = push_with_retries(cfg, cfg.mirrors[0], m, force_full=True)
    pair.edge.wait_agent_ended()
    assert result.ok and result.full, result.error
    return result


def test_a_full_comparison_repairs_groups(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root, MiB)
    pushed(pair)
    edge = pair.edge.root
    # Broken on the edge by hand, its manifest lost: the names are separate
    # files there, and one is linked to a stray name.
    replace(edge / "pool/b.iso", like=edge / "pool/a.iso")
    os.link(edge / "pool/c.iso", edge / "stray")
    shutil.rmtree(pair.edge.state)
    result = pushed(pair)
    assert result.full and result.files_sent == 0
    one_file(edge, "pool/a.iso", "pool/b.iso", "pool/c.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_group_whose_file_keeps_a_name_outside_it_gets_a_file_of_its_own(pair: Pair) -> None:
    # The edge's file has a name the group does not (made by hand, and not
    # removed by an incremental push): the group gets a copy, the other name
    # keeps the old file.
    root = pair.primary.root
    group_of_three(root)
    pushed(pair)
    os.link(pair.edge.root / "pool/a.iso", pair.edge.root / "pool/hand-made")
    os.link(root / "pool/a.iso", root / "pool/d.iso")
    pushed(pair)
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso", "pool/d.iso")
    one_file(pair.edge.root, "pool/hand-made")
    assert rsync_differences(pair.primary.root, pair.edge.root) == ["*deleting   pool/hand-made"]


def test_a_new_mirror_fed_by_the_scan_gets_the_groups(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root)
    for i in range(50):
        (root / f"f{i}").write_bytes(b"%d" % i)
    os.link(root / "f7", root / "pool/f7-again")
    result = fed_push(pair)
    assert result.ok and result.fed, result.error
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso")
    one_file(pair.edge.root, "f7", "pool/f7-again")
    assert_same_tree(pair.primary.root, pair.edge.root)
    assert pushed(pair).files_sent == 0


def test_a_name_the_mirror_excludes_is_no_name_there(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    pair = Pair(tmp_path, sshd, exclude="*.tmp")
    root = pair.primary.root
    (root / "a").write_bytes(b"x" * 5000)
    os.link(root / "a", root / "b")
    os.link(root / "a", root / "c.tmp")
    (root / "d").write_bytes(b"y" * 5000)
    os.link(root / "d", root / "d.tmp")
    pushed(pair)
    one_file(pair.edge.root, "a", "b")
    one_file(pair.edge.root, "d")
    assert not (pair.edge.root / "c.tmp").exists()
    assert rsync_differences(pair.primary.root, pair.edge.root, exclude=("*.tmp",)) == []


def test_dry_run_itemizes_hard_links(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root)
    pushed(pair)
    os.link(root / "pool/a.iso", root / "pool/e.iso")
    proc = pair.cli("run", "--once", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "edge: hlink  pool/e.iso => pool/a.iso" in proc.stdout.splitlines()
    assert not (pair.edge.root / "pool/e.iso").exists()


def test_the_deletion_guard_counts_each_name(pair: Pair) -> None:
    root = pair.primary.root
    group_of_three(root)
    for i in range(16):
        (root / f"f{i}").write_text(str(i))
    pushed(pair)
    os.unlink(root / "pool/b.iso")
    os.unlink(root / "pool/c.iso")
    pair.rewrite(max_delete="5%")
    proc = pair.cli("run", "--once")
    assert proc.returncode != 0
    # 21 entries: the directory, the group's three names, 17 files of one name.
    assert "plan deletes 2 of 21 entries" in proc.stdout, proc.stdout
    assert (pair.edge.root / "pool/c.iso").exists()
    pair.rewrite(max_delete="100%")
    assert pair.cli("run", "--once").returncode == 0
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_symlink_planted_at_a_first_name_is_not_followed(pair: Pair, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    root = pair.primary.root
    group_of_three(root)
    (pair.edge.root / "pool").mkdir()
    os.symlink(outside / "victim", pair.edge.root / "pool/a.iso")
    pushed(pair)
    assert (outside / "victim").read_text() == "untouched" and os.listdir(outside) == ["victim"]
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_symlink_of_several_names(pair: Pair) -> None:
    root = pair.primary.root
    (root / "iso").mkdir()
    (root / "iso/image-1.iso").write_bytes(b"image")
    os.symlink("image-1.iso", root / "iso/latest.iso")
    os.link(root / "iso/latest.iso", root / "iso/current.iso", follow_symlinks=False)
    os.link(root / "iso/latest.iso", root / "latest.iso", follow_symlinks=False)
    pushed(pair)
    one_file(pair.edge.root, "iso/latest.iso", "iso/current.iso", "latest.iso")
    assert os.readlink(pair.edge.root / "latest.iso") == "image-1.iso"
    assert_same_tree(pair.primary.root, pair.edge.root)
    # One name made a symlink of its own (same target), another added.
    os.unlink(root / "iso/current.iso")
    os.symlink("image-1.iso", root / "iso/current.iso")
    os.link(root / "iso/latest.iso", root / "iso/newest.iso", follow_symlinks=False)
    pushed(pair)
    one_file(pair.edge.root, "iso/latest.iso", "latest.iso", "iso/newest.iso")
    one_file(pair.edge.root, "iso/current.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_groups_cascade_through_two_tiers(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary", max_delete="100%")
    tier1 = make_node(tmp_path, "tier1", max_delete="100%")
    edge = make_node(tmp_path, "edge", max_delete="100%")
    primary.mirrors = [(tier1, {})]
    tier1.mirrors = [(edge, {})]
    edge.write()
    tier1.write(sshd)
    primary.write(sshd)

    def run_once() -> None:
        proc = subprocess_run(primary)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for node in (tier1, edge):
            assert_same_tree(primary.root, node.root)

    root = primary.root
    group_of_three(root)
    (root / "other").mkdir()
    os.link(root / "pool/a.iso", root / "other/x.iso")
    run_once()
    for node in (tier1, edge):
        one_file(node.root, "pool/a.iso", "pool/b.iso", "pool/c.iso", "other/x.iso")
    os.link(root / "pool/single", root / "other/single")  # a new group
    replace(root / "pool/c.iso", like=root / "pool/a.iso")  # a link broken, same bytes
    os.rename(root / "other/x.iso", root / "other/y.iso")  # a name renamed
    run_once()
    for node in (tier1, edge):
        one_file(node.root, "pool/a.iso", "pool/b.iso", "other/y.iso")
        one_file(node.root, "pool/single", "other/single")
        one_file(node.root, "pool/c.iso")


def subprocess_run(node):  # noqa: ANN001, ANN201
    import subprocess

    return subprocess.run(SYNCD + ["-c", str(node.ini), "run", "--once"], capture_output=True, text=True,
                          timeout=300)


# -- hostile groups, to a real agent process ---------------------------------------------


def begin_links() -> dict:
    return {"type": "begin", "generation": 1, "full": True, "filter": [], "max_delete_ppm": 1_000_000,
            "hardlinks": True}


def symlink_row(path: bytes, target: bytes) -> list:
    return [path, KIND_SYMLINK, 0, 1_700_000_000_000_000_000, 0o777, None, target, 0, 1]


def dir_row(path: bytes) -> list:
    return [path, KIND_DIR, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 1]


HOSTILE = {
    # a name linked to a file of other content
    "other content": ([row(b"a", b"A"), row(b"b", b"B")], [[0, b"a", 2], [1, b"a", 2]], "whose content differs"),
    # a link to a name outside root
    "outside root": ([row(b"b", b"x")], [[0, b"../outside/canary", 2]], "unsafe path"),
    "absolute": ([row(b"b", b"x")], [[0, b"/etc/passwd", 2]], "unsafe path"),
    # a link to a symlink of the push
    "to a symlink": ([symlink_row(b"s", b"../outside/canary"), row(b"b", b"x")], [[1, b"s", 2]],
                     "not the first name of a group"),
    "on a symlink": ([row(b"a", b"x"), symlink_row(b"s", b"a")], [[0, b"a", 2], [1, b"a", 2]],
                     "whose content differs"),
    "symlinks of other targets": ([symlink_row(b"s", b"a"), symlink_row(b"t", b"b")], [[0, b"s", 2], [1, b"s", 2]],
                                  "whose content differs"),
    "on a tombstone": ([row(b"a", b"x"), row(b"b", b"x")[:7] + [1, 1]], [[0, b"a", 2], [1, b"a", 2]],
                       "no live file"),
    "on a directory": ([row(b"a", b"x"), dir_row(b"d")], [[0, b"a", 2], [1, b"a", 2]], "no live file"),
    # a link to a name that is not in the push, or comes after
    "not in the push": ([row(b"b", b"x")], [[0, b"a", 2]], "not the first name of a group"),
    "first comes after": ([row(b"b", b"x"), row(b"c", b"x")], [[0, b"c", 2], [1, b"c", 2]],
                          "not the first name of a group"),
    # more or fewer names than announced
    "too many": ([row(b"a", b"x"), row(b"b", b"x"), row(b"c", b"x")], [[0, b"a", 2], [1, b"a", 2], [2, b"a", 2]],
                 "not the first name of a group"),
    "too few": ([row(b"a", b"x"), row(b"b", b"x")], [[0, b"a", 3], [1, b"a", 3]], "announced 3 names, 2 came"),
    "counts differ": ([row(b"a", b"x"), row(b"b", b"x")], [[0, b"a", 2], [1, b"a", 3]], "announced with 2"),
    "one name": ([row(b"a", b"x")], [[0, b"a", 1]], "a hard-link group of 1 name"),
    "index out of range": ([row(b"a", b"x")], [[5, b"a", 2]], "bad links entry"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_group_is_refused_with_one_line(edge, case: str) -> None:  # noqa: ANN001
    rows, links, words = HOSTILE[case]
    peer = Peer(edge.ini)
    peer.send(begin_links(), {"type": "entries", "batch": 1, "rows": rows, "links": links},
              {"type": "entries_end"})
    answer = peer.message()
    while answer["type"] in ("needs", "planned"):
        answer = peer.message()
    assert answer["type"] == "error", answer
    assert words in answer["message"] and "\n" not in answer["message"], answer
    assert peer.finish() != 0
    assert list(edge.root.iterdir()) == []
    assert_outside_untouched(edge)


def test_links_without_a_begin_that_announces_them_are_refused(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    begin = dict(begin_links(), hardlinks=False)
    peer.send(begin, {"type": "entries", "batch": 1, "rows": [row(b"a"), row(b"b")], "links": [[0, b"a", 2]]})
    answer = peer.message()
    assert answer["type"] == "error" and "links without a begin" in answer["message"], answer
    assert peer.finish() != 0


def test_a_group_is_published_whole_and_verified(edge) -> None:  # noqa: ANN001
    """By hand: the first name's bytes, the others linked at commit."""
    data = b"the bytes of three names"
    digest = hashlib.sha256(data).digest()
    peer = Peer(edge.ini)
    rows = [dir_row(b"d"), row(b"a", data), row(b"d/b", data), row(b"z", data)]
    peer.send(begin_links(), {"type": "entries", "batch": 1, "rows": rows,
                              "links": [[1, b"a", 3], [2, b"a", 3], [3, b"a", 3]]}, {"type": "entries_end"})
    needs = peer.message()
    assert [item[:3] for item in needs["items"]] == [
        ["dir", b"d", None], ["new", b"a", "whole"], ["hlink", b"d/b", None], ["hlink", b"z", None]]
    assert peer.message()["type"] == "planned"
    peer.send({"type": "file", "stream": 1, "path": b"a", "how": "whole", "size": len(data), "sha256": digest})
    peer.w.data(1, data)
    peer.w.end(1)
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "staged"
    committed = peer.message()
    assert committed["type"] == "committed" and committed["published"] == 3, committed
    peer.send({"type": "bye"})
    assert peer.finish() == 0
    one_file(edge.root, "a", "d/b", "z")
    assert (edge.root / "z").read_bytes() == data


# -- the scan: which changes of names are changes ----------------------------------------


def test_link_changed_table() -> None:
    # (old dev, ino, nlink) -> (new dev, ino, nlink)
    assert not link_changed(1, 5, 1, 1, 5, 1)  # one name, as before
    assert not link_changed(1, 5, 2, 1, 5, 3)  # a name came elsewhere: that name is the change
    assert not link_changed(1, 5, 3, 1, 5, 2)  # a name went elsewhere
    assert link_changed(1, 5, 1, 1, 5, 2)  # now one of several names
    assert link_changed(1, 5, 2, 1, 5, 1)  # no longer
    assert link_changed(1, 5, 2, 1, 6, 2)  # a name of another file now
    assert not link_changed(1, 5, 1, 1, 6, 1)  # a new file of one name, same content: no change
    assert link_changed(0, 5, 1, 1, 5, 2)  # a version 1 row of a linked file
    assert not link_changed(0, 5, 1, 1, 5, 1)


def test_an_old_manifest_is_upgraded_and_its_links_become_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"a" * 1000)
    os.link(root / "a", root / "b")
    (root / "c").write_bytes(b"c" * 1000)
    state = tmp_path / "state"
    with Manifest.open(state, "primary") as m:
        scan(root, m)
    # Back to what syncd with schema version 1 wrote: no dev, no nlink.
    db = sqlite3.connect(state / MANIFEST_NAME)
    db.executescript("DROP INDEX entries_by_inode; ALTER TABLE entries DROP COLUMN dev; "
                     "ALTER TABLE entries DROP COLUMN nlink; UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    db.close()
    with Manifest.open(state, "primary") as m:
        assert m.get_meta("schema_version") == "2"
        assert m.lookup(b"a").nlink == 1 and m.lookup(b"a").dev == 0
        changes: list[tuple[str, bytes]] = []
        result = scan(root, m, on_change=lambda kind, path: changes.append((kind, path)))
        assert result.files_hashed == 0  # filled in from stat data alone
        assert sorted(changes) == [(RELINKED, b"a"), (RELINKED, b"b")]
        dev = os.lstat(root).st_dev
        assert (m.lookup(b"a").nlink, m.lookup(b"a").dev) == (2, dev)
        assert (m.lookup(b"c").nlink, m.lookup(b"c").dev, m.lookup(b"c").generation) == (1, dev, 1)
        assert [(e.path, first, n) for e, first, n in m.push_rows(1)] == [(b"a", b"a", 2), (b"b", b"a", 2)]
    with Manifest.open(state, "primary") as m:  # opened again: nothing more to upgrade
        assert m.get_meta("schema_version") == "2"


# -- pure grouping logic -----------------------------------------------------------------

names = st.sampled_from([b"a", b"b", b"c", b"d/e", b"d/f", b"g/h/i", b"z"])


@st.composite
def groups(draw):  # noqa: ANN001, ANN201
    """A push as a sender makes it: paths in order, each a file of some group."""
    paths = sorted(draw(st.sets(names, min_size=1)), key=lambda p: p.rpartition(b"/")[::2])
    labels = draw(st.lists(st.integers(0, 3), min_size=len(paths), max_size=len(paths)))
    by_label: dict[int, list[bytes]] = {}
    for path, label in zip(paths, labels):
        by_label.setdefault(label, []).append(path)
    stream = []
    for path, label in zip(paths, labels):
        members = by_label[label]
        stream.append((path, members[0], len(members), bytes([label]) * 32))
    return stream


def feed(checker: LinkChecker, stream) -> None:  # noqa: ANN001
    for path, first, n, sha in stream:
        if n < 2:
            continue
        if path == first:
            checker.first(path, n, sha)
        else:
            checker.member(path, first, n, sha)
    checker.end()


@given(groups())
def test_the_link_checker_accepts_what_a_sender_makes(stream) -> None:  # noqa: ANN001
    feed(LinkChecker(), stream)


@given(groups(), st.data())
def test_the_link_checker_refuses_any_lie(stream, data) -> None:  # noqa: ANN001
    linked = [i for i, (_, _, n, _) in enumerate(stream) if n > 1]
    if not linked:
        return
    i = data.draw(st.sampled_from(linked))
    path, first, n, sha = stream[i]
    lie = data.draw(st.sampled_from(["content", "count", "drop", "twice", "order"]))
    if lie == "content":
        stream[i] = (path, first, n, b"\xff" * 32)
        if path == first:  # the others now differ from the first
            pass
    elif lie == "count":
        stream[i] = (path, first, n + 1, sha)
    elif lie == "drop":
        del stream[i]
    elif lie == "twice":
        stream.insert(i + 1, stream[i])
    else:  # the first name after another of its names
        j = next(k for k, s in enumerate(stream) if s[1] == first and s[0] != first)
        k = stream.index(next(s for s in stream if s[0] == first))
        stream[j], stream[k] = stream[k], stream[j]
    with pytest.raises(ProtocolError):
        feed(LinkChecker(), stream)


manifest_rows = st.lists(
    st.tuples(names, st.sampled_from([KIND_FILE, KIND_FILE, KIND_FILE, KIND_DIR]), st.integers(1, 2),
              st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 3)),
    unique_by=lambda r: r[0])


def reference(rows, since, keep):  # noqa: ANN001, ANN201
    """What push_rows yields, by a plain walk: (path, first, names), in push order."""
    linked = [r for r in rows if r.nlink > 1 and r.kind == KIND_FILE and not r.deleted and keep(r.path)]
    group: dict[tuple, list] = {}
    for r in sorted(linked, key=lambda r: (r.parent, r.name)):
        group.setdefault((r.dev, r.ino), []).append(r)
    wanted = set()
    for r in rows:
        if since is None and not r.deleted or since is not None and r.generation > since:
            wanted.add(r.path)
            if since is not None and r.nlink > 1 and r.kind == KIND_FILE and not r.deleted:
                wanted |= {m.path for m in group.get((r.dev, r.ino), [])}
    out = []
    for r in rows:
        if r.path not in wanted:
            continue
        members = group.get((r.dev, r.ino), []) if r in linked else []
        if len(members) < 2:
            out.append(((r.parent, r.name, 1), (r.path, None, 1)))
            continue
        # The first: an unchanged name where there is one, the least in path order.
        first = min(members, key=lambda m: (since is not None and m.generation > since, m.parent, m.name))
        least = members[0]
        key = (least.parent, least.name, 0) if r is first else (r.parent, r.name, 1)
        out.append((key, (r.path, first.path, len(members))))
    return [item for _, item in sorted(out)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest_rows, st.sampled_from([None, 0, 1, 2]), st.sampled_from([None, b"b", b"d/e"]))
def test_push_rows_groups_as_a_plain_walk_does(tmp_path_factory, raw, since, excluded) -> None:  # noqa: ANN001
    state = tmp_path_factory.mktemp("m")
    rows = []
    for path, kind, dev, ino, nlink, deleted, gen in raw:
        parent, _, name = path.rpartition(b"/")
        rows.append((parent, name, kind, 1, 1, 1, 0o644, ino, bytes([ino]) * 32 if kind == KIND_FILE else None,
                     None, gen, deleted, dev, nlink if kind == KIND_FILE else 1))
    keep = None if excluded is None else (lambda p: p != excluded)
    with Manifest.open(state, "p") as m:
        with m.writer() as w:
            w.upsert_many(rows)
            w.set_generation(3, len(rows))
        got = [(e.path, first, n) for e, first, n in m.push_rows(since, keep)]
        entries = list(m.entries(include_deleted=True))
    assert got == reference(entries, since, keep or (lambda p: True))
    assert all(join(e.parent, e.name) == e.path for e in entries)


def test_index_files_of_one_file_are_checked_as_what_they_will_be(pair: Pair) -> None:
    # Two architectures' Packages, one file (same bytes), listed by Release:
    # the gate checks the name to be linked against the staged content, not
    # against the old file still at that name.
    from syncd.verify import IndexEntry, render_release

    suite = pair.primary.root / "dists/stable"

    def release(version: int) -> None:
        for arch in ("amd64", "i386"):
            (suite / f"main/binary-{arch}").mkdir(parents=True, exist_ok=True)
        data = b"Package: hello\nVersion: %d\n" % version
        replace(suite / "main/binary-amd64/Packages", data)
        os.unlink(suite / "main/binary-i386/Packages") if version > 1 else None
        os.link(suite / "main/binary-amd64/Packages", suite / "main/binary-i386/Packages")
        entries = [IndexEntry(f"main/binary-{arch}/Packages", len(data), hashlib.sha256(data).digest())
                   for arch in ("amd64", "i386")]
        replace(suite / "Release", render_release({"Origin": "Test", "Version": str(version)}, entries).encode())

    release(1)
    pushed(pair)
    release(2)
    result = pushed(pair)
    assert result.counts()["hlink"] == 1
    one_file(pair.edge.root, "dists/stable/main/binary-amd64/Packages", "dists/stable/main/binary-i386/Packages")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_kill_9_of_the_agent_in_the_middle_of_a_group_then_a_rerun_converges(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    # The agent dies (SIGKILL) as it is about to rename one name of a group
    # into place: some names have the new file, some the old one.  Every
    # name is a whole file at every moment, and a plain rerun converges.
    marker = tmp_path / "kill-at"
    dying = tmp_path / "dying_agent.py"
    dying.write_text(
        "import os, signal, sys\n"
        "from syncd import fsops\n"
        "publish = fsops.SafeRoot.publish\n"
        "def dying(self, src_dir_fd, src_name, rel, park=None):\n"
        f"    marker = {str(marker)!r}\n"
        "    if os.path.exists(marker) and rel == open(marker, 'rb').read():\n"
        "        os.unlink(marker)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return publish(self, src_dir_fd, src_name, rel, park)\n"
        "fsops.SafeRoot.publish = dying\n"
        "from syncd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    edge_ini = tmp_path / "edge" / "sync.ini"
    pair = Pair(tmp_path, sshd, remote_command=f"{sys.executable} {dying} agent --config {edge_ini}", retries="1")
    root = pair.primary.root
    old = group_of_three(root, 2 * MiB)
    pushed(pair)
    new = os.urandom(2 * MiB)
    replace(root / "pool/a.iso", new)
    for name in ("b.iso", "c.iso", "d.iso"):
        if (root / "pool" / name).exists():
            os.unlink(root / "pool" / name)
        os.link(root / "pool/a.iso", root / "pool" / name)
    marker.write_bytes(b"pool/c.iso")
    killed = pair.push()
    assert not killed.ok and not marker.exists()
    contents = {n: hashlib.sha256((pair.edge.root / "pool" / n).read_bytes()).digest()
                for n in ("a.iso", "b.iso", "c.iso")}
    assert set(contents.values()) <= {hashlib.sha256(old).digest(), hashlib.sha256(new).digest()}
    assert contents["a.iso"] == hashlib.sha256(new).digest()  # the first name went first
    assert contents["c.iso"] == hashlib.sha256(old).digest()  # killed before it
    assert not [p for p in pair.edge.root.rglob("*") if p.name.startswith("tmp.")]
    result = pushed(pair)
    assert result.files_sent == 0  # the new bytes are on the edge already
    one_file(pair.edge.root, "pool/a.iso", "pool/b.iso", "pool/c.iso", "pool/d.iso")
    assert not [p for p in (pair.edge.state / "staging").iterdir() if p.name.startswith("tmp.")]
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_an_agent_without_the_feature_gets_each_name_as_a_file_of_its_own(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    # An agent from before hard links lists no "hardlinks" in its welcome:
    # the pusher names no groups (it would refuse them), and every name is
    # published with its content, as before.
    old_agent = tmp_path / "agent_without_links.py"
    old_agent.write_text(
        "import sys\n"
        "from syncd.agent import session as agent\n"
        "agent.FEATURES = tuple(f for f in agent.FEATURES if f != 'hardlinks')\n"
        "from syncd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    edge_ini = tmp_path / "edge" / "sync.ini"
    pair = Pair(tmp_path, sshd, remote_command=f"{sys.executable} {old_agent} agent --config {edge_ini}")
    data = group_of_three(pair.primary.root)
    result = fed_push(pair)  # the feed defers no rows either
    assert result.ok, result.error
    assert result.counts()["hlink"] == 0 and result.files_sent == 2
    for name in ("a.iso", "b.iso", "c.iso"):
        one_file(pair.edge.root, f"pool/{name}")
        assert (pair.edge.root / "pool" / name).read_bytes() == data
    os.link(pair.primary.root / "pool/a.iso", pair.primary.root / "pool/d.iso")
    assert pushed(pair).files_sent == 0  # its content is there: a local copy
    assert (pair.edge.root / "pool/d.iso").read_bytes() == data


def test_a_new_group_whose_first_name_goes_as_a_delta_against_a_basis(pair: Pair) -> None:
    # A respun image under a new version number, with a second name: its
    # first name goes as a delta against the image the push deletes (a
    # basis), the other name is linked to it.
    root = pair.primary.root
    (root / "iso").mkdir()
    data = bytearray(os.urandom(4 * MiB))
    (root / "iso/image-1.iso").write_bytes(data)
    pushed(pair)
    for at in (100_000, 2_000_000, 3_900_000):
        data[at:at + 4096] = os.urandom(4096)
    os.unlink(root / "iso/image-1.iso")
    (root / "iso/image-2.iso").write_bytes(data)
    os.link(root / "iso/image-2.iso", root / "iso/latest.iso")
    result = pushed(pair)
    assert result.counts()["delta"] == 1 and result.counts()["hlink"] == 1
    assert result.bytes_sent < 0.1 * len(data)
    one_file(pair.edge.root, "iso/image-2.iso", "iso/latest.iso")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_partial_scan_groups_a_new_name_at_once_or_at_the_next_full_scan(tmp_path: Path) -> None:
    # The daemon's partial scans list only the directories a watch saw
    # change: a new name elsewhere does not tell the old name's directory.
    root = tmp_path / "root"
    for d in ("d1", "d2", "d3"):
        (root / d).mkdir(parents=True)
    (root / "d1/a").write_bytes(b"a" * 100)
    (root / "d1/x").write_bytes(b"x" * 100)
    os.link(root / "d1/x", root / "d1/y")
    with Manifest.open(tmp_path / "state", "primary") as m:
        scan(root, m)
        held = m.generation
        os.link(root / "d1/x", root / "d2/z")  # a third name of a file of two: grouped at once
        os.link(root / "d1/a", root / "d3/b")  # a second name of a file of one
        scan(root, m, dirs=[b"d2", b"d3"])
        groups = {e.path: (first, n) for e, first, n in m.push_rows(held)}
        assert groups[b"d2/z"] == (b"d1/x", 3)
        assert groups[b"d3/b"] == (None, 1)  # d1/a's row does not know yet
        held = m.generation
        scan(root, m)  # the full scan: d1/a is one of two names now
        rows = [(e.path, first, n) for e, first, n in m.push_rows(held) if e.kind == KIND_FILE]
        # The first name is the one the mirror has as it is (unchanged since
        # the generation it holds), sent before the other.
        assert rows == [(b"d3/b", b"d3/b", 2), (b"d1/a", b"d3/b", 2)]


def test_a_generation_held_back_publishes_no_link_and_the_next_one_links(pair: Pair) -> None:
    # Release lists a Packages it does not match: the generation is held
    # back.  New data files at new paths go live as they always do (the
    # group's first name, as a file); its other names wait for a good one.
    from syncd.verify import IndexEntry, render_release

    suite = pair.primary.root / "dists/stable"
    (suite / "main").mkdir(parents=True)
    (pair.primary.root / "pool").mkdir()

    def release(packages: bytes, listed: bytes) -> None:
        replace(suite / "main/Packages", packages)
        entries = [IndexEntry("main/Packages", len(listed), hashlib.sha256(listed).digest())]
        replace(suite / "Release", render_release({"Origin": "Test"}, entries).encode())

    release(b"Package: a\n", b"Package: a\n")
    pushed(pair)
    (pair.primary.root / "pool/x.deb").write_bytes(os.urandom(100_000))
    os.link(pair.primary.root / "pool/x.deb", pair.primary.root / "pool/y.deb")
    release(b"Package: x\n", b"Package: something else\n")
    held = pair.push()
    assert not held.ok and "held back" in held.error, held.error
    assert (pair.edge.root / "pool/x.deb").exists() and not (pair.edge.root / "pool/y.deb").exists()
    release(b"Package: x\n", b"Package: x\n")
    result = pushed(pair)
    assert result.files_sent <= 2  # the index files; the group's bytes are there
    one_file(pair.edge.root, "pool/x.deb", "pool/y.deb")
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_long_names_of_one_file_fit_the_frames(pair: Pair) -> None:
    # 1,200 names of about 3,000 bytes, all of one file: a batch of 1,000
    # rows with their first names would be twice the 4 MiB frame limit.
    deep = pair.primary.root.joinpath(*[c * 250 for c in "abcdefghijk"])
    deep.mkdir(parents=True)
    first = deep / ("f" * 200 + "0000")
    first.write_bytes(b"one file")
    for i in range(1, 1200):
        os.link(first, deep / ("f" * 200 + f"{i:04d}"))
    result = pushed(pair)
    assert result.counts()["hlink"] == 1199
    assert os.lstat(pair.edge.root / first.relative_to(pair.primary.root)).st_nlink == 1200
    assert_same_tree(pair.primary.root, pair.edge.root)


def test_a_group_rewritten_in_place_keeps_every_directory_time(pair: Pair) -> None:
    # One file of names in three directories is rewritten in place: no
    # directory changes on the primary, so the push lists none; the edge
    # renames a new file in under every name, and puts each directory's
    # time back all the same.
    root = pair.primary.root
    for d in ("a", "b", "c"):
        (root / d).mkdir()
    (root / "a/f").write_bytes(os.urandom(100_000))
    os.link(root / "a/f", root / "b/f")
    os.link(root / "a/f", root / "c/f")
    (root / "b/plain").write_bytes(b"x" * 10)
    pushed(pair)
    with open(root / "a/f", "r+b") as fh:
        fh.write(os.urandom(4096))
    result = pushed(pair)
    assert not [i for i in result.items if i.action == "dir"]
    one_file(pair.edge.root, "a/f", "b/f", "c/f")
    one_file(pair.edge.root, "b/plain")
    assert_same_tree(pair.primary.root, pair.edge.root)
