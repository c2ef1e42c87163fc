"""Tiers: run --once on the primary covers the whole tree, tier by tier."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.nodes import SYNCD, Node, assert_same_tree, make_node, tree_listing

pytest_plugins = ["tests.sshd"]


def dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(SYNCD + ["-c", str(node.ini), "run", "--once", *args],
                          capture_output=True, text=True, timeout=300)


def fill(root: Path, version: str) -> None:
    (root / "pool").mkdir(exist_ok=True)
    (root / "pool" / f"pkg-{version}.deb").write_bytes(os.urandom(50_000))
    (root / "Release").write_text(f"Version: {version}\n")


class Tree:
    """primary -> {tier1-a -> {edge-a1, edge-a2}, tier1-b -> {edge-b1}}."""

    def __init__(self, base: Path, ssh, **primary_mirror_keys) -> None:  # noqa: ANN001
        self.ssh = ssh
        self.primary = make_node(base, "primary", max_delete="100%")
        self.t1a = make_node(base, "tier1-a", max_delete="100%")
        self.t1b = make_node(base, "tier1-b", max_delete="100%")
        self.edges = {n: make_node(base, n, max_delete="100%") for n in ("edge-a1", "edge-a2", "edge-b1")}
        self.primary.mirrors = [(self.t1a, dict(primary_mirror_keys.get("tier1-a", {}))),
                                (self.t1b, dict(primary_mirror_keys.get("tier1-b", {})))]
        self.t1a.mirrors = [(self.edges["edge-a1"], {}), (self.edges["edge-a2"], {})]
        self.t1b.mirrors = [(self.edges["edge-b1"], {})]
        for n in self.edges.values():
            n.write()
        self.t1a.write(ssh)
        self.t1b.write(ssh)
        self.primary.write(ssh)

    def all(self) -> list[Node]:
        return [self.t1a, self.t1b, *self.edges.values()]


def test_run_once_cascades_through_tiers(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    t = Tree(tmp_path, sshd)
    fill(t.primary.root, "1")
    proc = run_once(t.primary)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for node in t.all():
        assert tree_listing(node.root) == tree_listing(t.primary.root), node.name
        assert_same_tree(t.primary.root, node.root)
    lines = proc.stdout.splitlines()
    # Tier by tier: each tier-1, then its edges indented under it.
    assert lines[0].startswith("tier1-a: generation none -> 1")
    assert lines[1].startswith("  edge-a1: generation none -> 1")
    assert lines[2].startswith("  edge-a2: generation none -> 1")
    assert lines[3].startswith("tier1-b: generation none -> 1")
    assert lines[4].startswith("  edge-b1: generation none -> 1")
    # The next generation flows the same way, and a no-op still checks the tree.
    fill(t.primary.root, "2")
    assert run_once(t.primary).returncode == 0
    for node in t.all():
        assert tree_listing(node.root) == tree_listing(t.primary.root), node.name
        assert_same_tree(t.primary.root, node.root)
    again = run_once(t.primary)
    assert again.returncode == 0 and "FAILED" not in again.stdout
    for node in t.all():
        assert_same_tree(t.primary.root, node.root)


def test_failing_mirror_is_reported_and_does_not_block_siblings(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    t = Tree(tmp_path, sshd, **{"tier1-a": {"port": dead_port(), "retries": 1}})
    fill(t.primary.root, "1")
    proc = run_once(t.primary)
    assert proc.returncode == 1
    assert "tier1-a: FAILED" in proc.stdout
    assert tree_listing(t.t1b.root) == tree_listing(t.primary.root)
    assert_same_tree(t.primary.root, t.t1b.root)
    assert tree_listing(t.edges["edge-b1"].root) == tree_listing(t.primary.root)
    assert_same_tree(t.primary.root, t.edges["edge-b1"].root)
    assert list(t.edges["edge-a1"].root.iterdir()) == []  # not reached


def test_failing_edge_below_a_tier1_fails_the_primary_run(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    t = Tree(tmp_path, sshd)
    t.t1b.mirrors = [(t.edges["edge-b1"], {"port": dead_port(), "retries": 1})]
    t.t1b.write(sshd)
    fill(t.primary.root, "1")
    proc = run_once(t.primary)
    assert proc.returncode == 1, proc.stdout
    assert "  edge-b1: FAILED" in proc.stdout
    assert tree_listing(t.edges["edge-a2"].root) == tree_listing(t.primary.root)
    assert_same_tree(t.primary.root, t.edges["edge-a2"].root)


def test_failover_pushes_to_edges_directly_while_their_tier1_is_down(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary", max_delete="100%")
    t1 = make_node(tmp_path, "tier1", max_delete="100%")
    edge = make_node(tmp_path, "edge", max_delete="100%")
    t1.mirrors = [(edge, {})]
    edge.write()
    t1.write(sshd)
    down = {"port": dead_port(), "retries": 1}
    primary.mirrors = [(t1, down), (edge, {"via": "tier1"})]
    primary.write(sshd)
    fill(primary.root, "1")
    proc = run_once(primary)
    # tier1 is down: the run fails, but the edge was served directly and is current.
    assert proc.returncode == 1
    assert "tier1: FAILED" in proc.stdout
    assert "(failover: tier1 failed) edge: generation none -> 1" in proc.stdout
    assert tree_listing(edge.root) == tree_listing(primary.root)
    assert_same_tree(primary.root, edge.root)
    # tier1 comes back: it takes its edge again (nothing left to send there).
    primary.mirrors = [(t1, {}), (edge, {"via": "tier1"})]
    primary.write(sshd)
    fill(primary.root, "2")
    proc = run_once(primary)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failover" not in proc.stdout
    assert proc.stdout.splitlines()[1].startswith("  edge: generation 1 -> 2")
    assert tree_listing(edge.root) == tree_listing(primary.root)
    assert_same_tree(primary.root, edge.root)


def test_no_cascade_flag(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    t = Tree(tmp_path, sshd)
    fill(t.primary.root, "1")
    assert run_once(t.primary, "--no-cascade").returncode == 0
    assert tree_listing(t.t1a.root) == tree_listing(t.primary.root)
    assert_same_tree(t.primary.root, t.t1a.root)
    assert list(t.edges["edge-a1"].root.iterdir()) == []


@pytest.mark.parametrize("text,fragment", [
    ("host = h\nvia = nowhere\n", "[mirror:e] via: no [mirror:nowhere]"),
    ("host = h\n[mirror:t]\nhost = h\nvia = e\n[mirror:x]\nhost = h\nvia = t\n",
     "[mirror:x] via: t must be a direct downstream"),
])
def test_via_must_name_a_direct_mirror(tmp_path: Path, text: str, fragment: str) -> None:
    from syncd import config
    from syncd.errors import ConfigError

    root = tmp_path / "r"
    root.mkdir()
    ini = tmp_path / "sync.ini"
    ini.write_text(f"[node]\nname = p\nroot = {root}\nstate_dir = {tmp_path}/s\n[mirror:e]\n{text}")
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        config.load(ini)
