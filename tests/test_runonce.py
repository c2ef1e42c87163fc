"""syncd.runonce and syncd.status without the command line around them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from syncd import config as configmod
from syncd.manifest import Manifest
from syncd.runonce import ReleaseGate, has_new_mirror, scan_node
from syncd.status import MirrorStatus, NodeStatus, TreeMirror, node_status
from tests.nodes import make_node

PACKAGES = b"Package: a\n"


def _release(root: Path, digest: str) -> None:
    (root / "dists/stable/main").mkdir(parents=True, exist_ok=True)
    (root / "dists/stable/main/Packages").write_bytes(PACKAGES)
    (root / "dists/stable/Release").write_text(f"Origin: test\nSHA256:\n {digest} {len(PACKAGES)} main/Packages\n")


def test_the_release_gate_checks_each_generation_once(tmp_path: Path) -> None:
    node = make_node(tmp_path, "primary")
    node.write()
    cfg = configmod.load(node.ini)
    refused: list[tuple[int, str]] = []
    gate = ReleaseGate(lambda gen, err: refused.append((gen, str(err))))
    _release(node.root, "0" * 64)  # names a Packages that does not match
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan_node(cfg, m)
        broken = m.generation
        assert not gate.allows(cfg, m) and not gate.allows(cfg, m)
        assert len(refused) == 1 and refused[0][0] == broken and "main/Packages" in refused[0][1]
        _release(node.root, hashlib.sha256(PACKAGES).hexdigest())
        scan_node(cfg, m)
        assert m.generation == broken + 1
        assert gate.allows(cfg, m) and len(refused) == 1


def test_a_partial_scan_takes_only_the_directories_named(tmp_path: Path) -> None:
    node = make_node(tmp_path, "primary")
    node.write()
    cfg = configmod.load(node.ini)
    (node.root / "a").mkdir()
    (node.root / "b").mkdir()
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan_node(cfg, m)
        (node.root / "a" / "x").write_text("x")
        (node.root / "b" / "y").write_text("y")
        result = scan_node(cfg, m, dirs={b"a"})
        assert result.entries >= 1
        assert m.lookup(b"a/x") is not None and m.lookup(b"b/y") is None


def test_new_mirrors_are_those_that_never_acknowledged(tmp_path: Path) -> None:
    primary = make_node(tmp_path, "primary")
    known, new, standby = (make_node(tmp_path, n) for n in ("known", "new", "standby"))

    class Ssh:  # the keys a [mirror:] section needs; nothing connects here
        host, port, user, identity_file, known_hosts = "127.0.0.1", 22, "nobody", tmp_path / "id", tmp_path / "kh"

    primary.mirrors = [(known, {}), (new, {}), (standby, {"via": "known"})]
    primary.write(Ssh)
    cfg = configmod.load(primary.ini)
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        m.record_downstream("known", generation=1, acked_ns=1, last_success_ns=1, last_error=None,
                            bytes_sent=0, files_sent=0)
        known_cfg, new_cfg, standby_cfg = cfg.mirrors
        assert has_new_mirror(m, cfg.mirrors)
        assert not has_new_mirror(m, [known_cfg, standby_cfg])  # a standby is not pushed to first


def test_status_is_data_whose_fields_are_the_json_keys(tmp_path: Path) -> None:
    node = make_node(tmp_path, "tier1")
    down = make_node(tmp_path, "tier2")

    class Ssh:
        host, port, user, identity_file, known_hosts = "127.0.0.1", 2222, "nobody", tmp_path / "id", tmp_path / "kh"

    node.mirrors = [(down, {})]
    node.write(Ssh)
    cfg = configmod.load(node.ini)
    (node.root / "f").write_text("f")
    with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        scan_node(cfg, m)  # generation 1
        (node.root / "g").write_text("g")
        scan_node(cfg, m)  # generation 2
        m.record_downstream("tier2", generation=1, acked_ns=1, last_success_ns=10**18, last_error=None,
                            bytes_sent=5, files_sent=1)
        m.set_meta("last_tree", json.dumps([{"mirror": "tier2", "ok": True, "generation": 1,
                                             "below": [{"mirror": "edge", "ok": False, "held_before": 1,
                                                        "error": "boom", "bytes_sent": "7"}]}]))
        made_second = m.first_generation_after(1)
        assert m.first_generation_after(2) is None
    report = node_status(cfg)
    assert isinstance(report, NodeStatus) and report.generation == 2 and report.files == 2
    (t2,) = report.mirrors
    assert isinstance(t2, MirrorStatus) and (t2.host, t2.generation, t2.lag_generations) == ("127.0.0.1:2222", 1, 1)
    assert t2.lag_seconds is not None and t2.lag_seconds >= 0 and made_second is not None
    (edge,) = t2.below
    assert isinstance(edge, TreeMirror)
    assert (edge.name, edge.ok, edge.generation, edge.last_error, edge.bytes_sent) == ("edge", False, 1, "boom", 7)
    assert edge.as_of == "2001-09-09T01:46:40Z"  # the last push's time, from the downstreams table
    as_json = report.to_json()
    assert list(as_json) == [f.name for f in dataclasses.fields(NodeStatus)]
    assert list(as_json["mirrors"][0]) == [f.name for f in dataclasses.fields(MirrorStatus)]
    assert list(as_json["mirrors"][0]["below"][0]) == [f.name for f in dataclasses.fields(TreeMirror)]
    json.dumps(as_json)  # all of it JSON
