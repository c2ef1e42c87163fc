"""``syncd status``: this node, then every downstream of the tree below it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from syncd.manifest import META_HELD_BACK, Manifest
from tests.nodes import SYNCD, Node, make_node

pytest_plugins = ["tests.sshd"]


def syncd(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(SYNCD + ["-c", str(node.ini), *args], capture_output=True, text=True, timeout=120)


def status(node: Node) -> dict:
    proc = syncd(node, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_shows_the_whole_tree(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary")
    tier1 = make_node(tmp_path, "tier1")
    tier2 = make_node(tmp_path, "tier2")
    gone = make_node(tmp_path, "gone")
    primary.mirrors = [(tier1, {}), (gone, {"port": dead_port(), "retries": 1, "connect_timeout": 5})]
    tier1.mirrors = [(tier2, {})]
    tier2.write()
    gone.write()
    tier1.write(sshd)
    primary.write(sshd)
    (primary.root / "pool").mkdir()
    for i in range(3):
        (primary.root / "pool" / f"p{i}.deb").write_bytes(os.urandom(10_000))
    proc = syncd(primary, "run", "--once")
    assert proc.returncode != 0  # "gone" is unreachable
    assert "tier1: generation none" in proc.stdout, proc.stdout + proc.stderr

    report = status(primary)
    gen = report["generation"]
    assert gen >= 1 and report["upstream"] is None
    # Today's keys are all still there.
    for key in ("node", "root", "generation", "generation_age_s", "files", "dirs", "symlinks", "total_size",
                "tombstones", "mirrors"):
        assert key in report
    t1, dead = report["mirrors"]
    assert (t1["name"], t1["generation"], t1["lag_generations"], t1["lag_seconds"]) == ("tier1", gen, 0, 0.0)
    assert t1["last_success"] and t1["last_error"] is None
    assert t1["files_sent"] == 3 and t1["bytes_sent"] > 30_000
    (t2,) = t1["below"]
    assert (t2["name"], t2["generation"], t2["lag_generations"], t2["ok"]) == ("tier2", gen, 0, True)
    assert t2["files_sent"] == 3 and t2["bytes_sent"] > 30_000 and t2["below"] == []
    assert dead["name"] == "gone" and dead["generation"] is None and dead["lag_generations"] is None
    assert dead["last_error"] and dead["last_error_at"] and dead["last_success"] is None and dead["below"] == []

    # A new generation on the primary, not pushed yet: the tree lags by one,
    # for as long as the generation is old.
    (primary.root / "pool" / "p9.deb").write_bytes(b"new")
    assert syncd(primary, "scan", "-q").returncode == 0
    report = status(primary)
    assert report["generation"] == gen + 1
    t1 = report["mirrors"][0]
    assert t1["lag_generations"] == 1 and t1["lag_seconds"] >= 0
    with Manifest.open(primary.state, "primary") as m:
        assert m.generation == gen + 1
    assert t1["below"][0]["lag_generations"] == 1 and t1["below"][0]["lag_seconds"] >= 0

    text = syncd(primary, "status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"node primary: generation {gen + 1}")
    t1_line = next(i for i, line in enumerate(lines) if line.startswith("  tier1 "))
    assert f"generation {gen} (lag 1, " in lines[t1_line] and "last success" in lines[t1_line]
    assert "(3 files," in lines[t1_line]
    assert lines[t1_line + 1].startswith("    tier2 ") and f"generation {gen} (lag 1" in lines[t1_line + 1]
    assert any(line.startswith("  gone ") and "never synced" in line and "last error" in line for line in lines)

    # The tier-1 sees its own part of the tree: itself a mirror of the primary.
    report = status(tier1)
    assert report["upstream"] == "primary" and report["generation"] == gen
    assert report["mirrors"][0]["name"] == "tier2" and report["mirrors"][0]["lag_generations"] == 0


def test_status_shows_held_back_and_prewarm(tmp_path: Path) -> None:
    node = make_node(tmp_path, "edge")
    node.write()
    with Manifest.open(node.state, "edge") as m:
        m.set_meta(META_HELD_BACK, json.dumps({
            "generation": 5, "upstream": "tier1", "at_ns": 1_700_000_000_000_000_000, "findings": 2,
            "first": ["dists/stable/InRelease: bad signature"], "kinds": ["bad-signature"],
        }))
    # A prewarm that runs: its PID lives, and started before the progress file said.
    runner = subprocess.Popen(["sleep", "60"])
    try:
        (node.state / "prewarm.json").write_text(json.dumps({
            "mirror": "edge-9", "phase": "staging", "bytes_done": 10, "nested": {"x": 1}, "pid": runner.pid,
            "started": time.time() + 0.5,
        }))
        report = status(node)
        assert report["held_back"]["generation"] == 5 and report["held_back"]["at"] == "2023-11-14T22:13:20Z"
        assert report["prewarm"]["mirror"] == "edge-9" and report["prewarm"]["running"] is True
        text = syncd(node, "status").stdout
        assert "held back: generation 5 from tier1 at 2023-11-14T22:13:20Z: 2 finding(s), first: dists/" in text
        assert f"prewarm in progress: bytes_done 10, mirror edge-9, phase staging, pid {runner.pid}, started 20" in text
    finally:
        runner.kill()
        runner.wait()
    # The same file once that process is gone (a Ctrl-C, a kill -9): not in progress.
    report = status(node)
    assert report["prewarm"]["running"] is False
    text = syncd(node, "status").stdout
    assert f"prewarm interrupted (process {runner.pid} is gone): bytes_done 10" in text
    assert "'syncd prewarm edge-9' resumes it" in text
    # A PID that lives but started after the prewarm did is another process.
    (node.state / "prewarm.json").write_text(json.dumps({"mirror": "edge-9", "phase": "staging",
                                                         "pid": os.getpid(), "started": 1_000_000}))
    assert status(node)["prewarm"]["running"] is False

    # Whatever a prewarm left behind, status still answers.
    (node.state / "prewarm.json").write_text("{not json")
    report = status(node)
    assert "not a JSON object" in report["prewarm"]["error"]
    (node.state / "prewarm.json").write_text(json.dumps({"phase": "done", "mirror": "edge-9"}))
    assert "last prewarm: mirror edge-9, phase done" in syncd(node, "status").stdout
    (node.state / "prewarm.json").unlink()
    with Manifest.open(node.state, "edge") as m:
        m.delete_meta(META_HELD_BACK)
    report = status(node)
    assert report["held_back"] is None and report["prewarm"] is None
    assert "held back" not in syncd(node, "status").stdout


def test_status_times_are_iso_8601_in_the_zone_tz_says(tmp_path: Path) -> None:
    node = make_node(tmp_path, "edge")
    node.write()
    with Manifest.open(node.state, "edge") as m:
        m.set_meta(META_HELD_BACK, json.dumps({"generation": 5, "upstream": "tier1",
                                               "at_ns": 1_700_000_000_000_000_000, "findings": 1}))
    (node.state / "prewarm.json").write_text(json.dumps({"mirror": "e", "phase": "done",
                                                         "started": 1_700_000_000, "updated": 1_700_000_060.5}))
    # POSIX TZ strings: no tzdata needed.  "XYZ-5:30" is 5 h 30 min east of UTC.
    for tz, at, started, updated in [
        ("UTC0", "2023-11-14T22:13:20Z", "2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z"),
        ("XYZ-5:30", "2023-11-15T03:43:20+05:30", "2023-11-15T03:43:20+05:30", "2023-11-15T03:44:20+05:30"),
        ("ABC+7", "2023-11-14T15:13:20-07:00", "2023-11-14T15:13:20-07:00", "2023-11-14T15:14:20-07:00"),
    ]:
        proc = subprocess.run(SYNCD + ["-c", str(node.ini), "status"], capture_output=True, text=True,
                              env={**os.environ, "TZ": tz}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"held back: generation 5 from tier1 at {at}:" in proc.stdout, proc.stdout
        assert f"last prewarm: mirror e, phase done, started {started}, updated {updated}" in proc.stdout
        proc = subprocess.run(SYNCD + ["-c", str(node.ini), "status", "--json"], capture_output=True, text=True,
                              env={**os.environ, "TZ": tz}, timeout=60)
        assert json.loads(proc.stdout)["held_back"]["at"] == at
