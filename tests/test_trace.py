"""Trace files: written by the agent after each commit, Debian ftpsync style."""

from __future__ import annotations

import os
import subprocess
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from syncd import __version__, config, trace
from syncd.manifest import Manifest
from tests.nodes import SYNCD, assert_same_tree, make_node

pytest_plugins = ["tests.sshd"]


def run_once(ini: Path) -> subprocess.CompletedProcess:
    return subprocess.run(SYNCD + ["-c", str(ini), "run", "--once"], capture_output=True, text=True, timeout=120)


def fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines()[1:])


def date_u_of(t: float) -> str:
    return subprocess.run(["date", "-u", "-d", f"@{int(t)}"], capture_output=True, text=True,
                          env={"LC_ALL": "C", "PATH": os.environ["PATH"]}, check=True).stdout.strip()


@pytest.mark.parametrize("t", [0, 1_700_000_000, 1_800_003_661.9, 1_767_225_599])
def test_first_line_is_what_date_u_prints(t: float) -> None:
    assert trace.date_u(t) == date_u_of(t)


# 2026-12-07 and 2026-12-17: a one-digit day is padded by two spaces, whatever today is.
@pytest.mark.parametrize("t", [1_796_634_723, 1_797_498_723])
def test_rendered_first_line_is_what_date_u_prints(t: float) -> None:
    text = trace.render(generation=1, upstream="primary", started=t - 5, finished=t, host="h").decode()
    assert text.splitlines()[0] == date_u_of(t)


def test_render_has_the_ftpsync_fields() -> None:
    text = trace.render(generation=7, upstream="primary\nInjected: x", started=1_700_000_000,
                        finished=1_700_000_005, host="m1.example.net").decode()
    lines = text.splitlines()
    assert lines[0] == trace.date_u(1_700_000_005)
    f = fields(text)
    assert parsedate_to_datetime(f["Date"]).timestamp() == 1_700_000_005
    assert parsedate_to_datetime(f["Date-Started"]).timestamp() == 1_700_000_000
    assert f["Archive serial"] == "7" and f["Generation"] == "7"
    assert f["Creator"] == f"syncd {__version__}"
    assert f["Running on host"] == "m1.example.net"
    # A name from the wire cannot add a line of its own.
    assert f["Upstream-mirror"] == "primary Injected: x" and len(lines) == 8


def test_trace_keys(tmp_path: Path) -> None:
    node = make_node(tmp_path, "n")
    node.write()
    cfg = config.load(node.ini)
    assert cfg.node.trace is False and cfg.node.trace_dir == "project/trace"
    node.node_keys = {"trace": "yes", "trace_dir": "project/trace/"}
    node.write()
    cfg = config.load(node.ini)
    assert cfg.node.trace is True and trace.trace_path(cfg) == b"project/trace/n"
    for bad in ("../trace", "/srv/trace", "a//b", "a/./b"):
        node.node_keys = {"trace": "yes", "trace_dir": bad}
        node.write()
        proc = subprocess.run(SYNCD + ["-c", str(node.ini), "status"], capture_output=True, text=True)
        assert proc.returncode == 2 and "[node] trace_dir" in proc.stderr, (bad, proc.stderr)
    node.node_keys = {"trace": "maybe"}
    node.write()
    proc = subprocess.run(SYNCD + ["-c", str(node.ini), "status"], capture_output=True, text=True)
    assert proc.returncode == 2 and "[node] trace:" in proc.stderr


def test_agent_writes_trace_per_node_and_keeps_it_in_a_full_comparison(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary", max_delete="100%")
    tier1 = make_node(tmp_path, "tier1", trace="yes", max_delete="100%")
    tier2 = make_node(tmp_path, "tier2", trace="yes", max_delete="100%")
    quiet = make_node(tmp_path, "quiet")  # trace off: the default
    primary.mirrors = [(tier1, {}), (quiet, {})]
    tier1.mirrors = [(tier2, {})]
    for n in (tier2, quiet):
        n.write()
    tier1.write(sshd)
    primary.write(sshd)
    (primary.root / "pool").mkdir()
    (primary.root / "pool" / "a.deb").write_bytes(os.urandom(20_000))
    before = time.time()
    proc = run_once(primary.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Manifest.open(primary.state, "primary") as m:
        gen = m.generation

    t1 = (tier1.root / "project" / "trace" / "tier1").read_text()
    t2 = (tier2.root / "project" / "trace" / "tier2").read_text()
    for text, upstream in ((t1, "primary"), (t2, "tier1")):
        f = fields(text)
        assert f["Upstream-mirror"] == upstream
        assert f["Generation"] == str(gen) == f["Archive serial"]
        assert f["Running on host"]
        finished = parsedate_to_datetime(f["Date"]).timestamp()
        assert int(before) <= finished and parsedate_to_datetime(f["Date-Started"]).timestamp() <= finished
        assert text.splitlines()[0] == trace.date_u(finished)
    assert oct((tier1.root / "project" / "trace" / "tier1").stat().st_mode & 0o777) == "0o644"
    # Each node's trace is its own: a tier-1's is not pushed on to its edges.
    assert not (tier2.root / "project" / "trace" / "tier1").exists()
    assert not (quiet.root / "project").exists()
    for n in (tier1, tier2):
        assert not [p for p in (n.state / "staging").iterdir() if p.name.startswith("tmp.")]
    # The trace file is each mirror's own, and so are the directories made
    # only to hold it (the primary has no project/): rsync compares the rest.
    assert_same_tree(primary.root, quiet.root)
    for n in (tier1, tier2):
        assert_same_tree(primary.root, n.root, exclude=("/project/",))

    # A full comparison (the tier-1 forgot which generation it holds) deletes
    # what the primary does not have, but not the tier-1's own trace file.
    (tier1.root / "stray.txt").write_text("not from upstream\n")
    with Manifest.open(tier1.state, "tier1") as m:
        m.delete_meta("upstream_generation")
    (primary.root / "pool" / "b.deb").write_bytes(os.urandom(20_000))
    dry = subprocess.run(SYNCD + ["-c", str(primary.ini), "run", "--once", "--dry-run", "--mirror", "tier1"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned = [line for line in dry.stdout.splitlines() if line.startswith("tier1: ") and "stray.txt" in line]
    assert planned, dry.stdout
    assert "project" not in dry.stdout, dry.stdout
    proc = run_once(primary.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "full comparison" in proc.stdout
    assert not (tier1.root / "stray.txt").exists()
    with Manifest.open(primary.state, "primary") as m:
        gen2 = m.generation
    assert fields((tier1.root / "project" / "trace" / "tier1").read_text())["Generation"] == str(gen2)
    assert fields((tier2.root / "project" / "trace" / "tier2").read_text())["Generation"] == str(gen2)
    assert_same_tree(primary.root, quiet.root)
    for n in (tier1, tier2):
        assert_same_tree(primary.root, n.root, exclude=("/project/",))


def test_a_trace_written_into_the_primarys_own_trace_directory_leaves_its_time_alone(
        tmp_path: Path, sshd) -> None:  # noqa: ANN001
    # A Debian archive carries project/trace/ itself (the master's trace
    # files): each mirror's trace goes in beside them, and the directory
    # gets the primary's mtime back after the write.  Only each node's own
    # file differs from the primary.
    primary = make_node(tmp_path, "primary")
    tier1 = make_node(tmp_path, "tier1", trace="yes")
    tier2 = make_node(tmp_path, "tier2", trace="yes")
    primary.mirrors = [(tier1, {})]
    tier1.mirrors = [(tier2, {})]
    tier2.write()
    tier1.write(sshd)
    primary.write(sshd)
    (primary.root / "project" / "trace").mkdir(parents=True)
    (primary.root / "project" / "trace" / "master").write_text("Mon Dec  7 00:00:00 UTC 2026\n")
    (primary.root / "pool").mkdir()
    (primary.root / "pool" / "a.deb").write_bytes(os.urandom(20_000))
    for round_ in range(2):
        proc = run_once(primary.ini)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tier1.root / "project" / "trace" / "tier1").exists()
        assert_same_tree(primary.root, tier1.root, exclude=("/project/trace/tier1",))
        assert_same_tree(primary.root, tier2.root, exclude=("/project/trace/tier2",))
        (primary.root / "pool" / f"b{round_}.deb").write_bytes(os.urandom(20_000))
