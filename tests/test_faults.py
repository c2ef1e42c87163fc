"""Faults mid-push: cut links and kill -9 on either end.

Throughout, a reader on the edge checks invariant 1: every file it can open
has exactly one of the contents the primary ever published at that path
(old or new, never torn), and no temporary name ever appears in root.  After
each fault a plain rerun converges.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.nodes import SYNCD, assert_same_tree, make_node, tree_listing
from tests.relay import Relay

pytest_plugins = ["tests.sshd"]


class EdgeReader(threading.Thread):
    """Reads every file of the edge in a loop and records any torn view."""

    def __init__(self, root: Path, allowed: dict[str, set[str]]) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.allowed = allowed
        self.problems: list[str] = []
        self.reads = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, self.root)
                    if rel not in self.allowed:
                        self.problems.append(f"unexpected name in root: {rel}")
                        continue
                    try:
                        with open(full, "rb") as fh:
                            digest = hashlib.sha256(fh.read()).hexdigest()
                    except FileNotFoundError:
                        continue
                    self.reads += 1
                    if digest not in self.allowed[rel]:
                        self.problems.append(f"torn or unverified content at {rel}")

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(10)
        return self.problems


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Setup:
    def __init__(self, base: Path, ssh, relay: Relay, retries: int = 1) -> None:  # noqa: ANN001
        self.primary = make_node(base, "primary", max_delete="100%")
        self.edge = make_node(base, "edge")
        self.primary.mirrors.append((self.edge, {"retries": str(retries)}))
        self.edge.write()
        self.primary.write(ssh, port=relay.port, known_hosts=ssh.known_hosts_for(relay.port))
        self.allowed: dict[str, set[str]] = {}
        rng = random.Random(7)
        self.files = {f"pool/f{i:02d}": rng.randbytes(rng.choice([3000, 300_000, 1_500_000])) for i in range(16)}
        (self.primary.root / "pool").mkdir()
        self.write_version()

    def write_version(self) -> None:
        for rel, data in self.files.items():
            (self.primary.root / rel).write_bytes(data)
            self.allowed.setdefault(rel, set()).add(sha(data))

    def new_version(self) -> None:
        # Fresh content of the same sizes: the push moves megabytes, so a
        # cut or a kill at a byte count lands mid-transfer, not after it.
        rng = random.Random(len(self.allowed["pool/f00"]))
        for rel in list(self.files):
            self.files[rel] = rng.randbytes(len(self.files[rel]))
        self.write_version()

    def run_once(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(SYNCD + ["-c", str(self.primary.ini), "run", "--once", *extra],
                              capture_output=True, text=True, timeout=timeout)

    def in_sync(self) -> bool:
        """As a client lists it, and as rsync sees it (directory times included)."""
        assert_same_tree(self.primary.root, self.edge.root)
        return tree_listing(self.primary.root) == tree_listing(self.edge.root)


@pytest.fixture
def relay(sshd):  # noqa: ANN001, ANN201
    with Relay(sshd.host, sshd.port) as r:
        yield r


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cut_link_at_random_point_then_rerun_converges(tmp_path: Path, sshd, relay, seed: int) -> None:  # noqa: ANN001
    s = Setup(tmp_path, sshd, relay)
    assert s.run_once().returncode == 0
    s.new_version()
    reader = EdgeReader(s.edge.root, s.allowed)
    reader.start()
    cut = random.Random(seed).randrange(2_000, 6_000_000)
    relay.set_cut(cut, None)
    failed = s.run_once()
    relay.set_cut(None, None)
    assert failed.returncode != 0 and relay.cuts == 1  # the cut landed mid-push
    ok = s.run_once()
    problems = reader.stop()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert s.in_sync()
    assert problems == []
    assert reader.reads > 0
    assert "FAILED" in failed.stdout


def test_retries_resume_where_they_stopped(tmp_path: Path, sshd, relay) -> None:  # noqa: ANN001
    s = Setup(tmp_path, sshd, relay, retries=30)
    total = sum(len(d) for d in s.files.values())
    # Every connection is cut after 4 MB: only resuming can finish.
    relay.set_cut(4_000_000, None)
    proc = s.run_once()
    relay.set_cut(None, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s.in_sync()
    assert relay.cuts >= 1
    assert relay.counts()["up"] < 2 * total


def _kill_when(relay: Relay, threshold: int, pick, proc: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while relay.counts()["up"] < threshold and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the push finished before the kill: the test would prove nothing"
    pick()


def test_kill_9_of_the_pusher_mid_push(tmp_path: Path, sshd, relay) -> None:  # noqa: ANN001
    s = Setup(tmp_path, sshd, relay)
    assert s.run_once().returncode == 0
    s.new_version()
    reader = EdgeReader(s.edge.root, s.allowed)
    reader.start()
    relay.reset_counts()
    proc = subprocess.Popen(SYNCD + ["-c", str(s.primary.ini), "run", "--once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(relay, 3_000_000, lambda: proc.send_signal(signal.SIGKILL), proc)
    proc.wait()
    ok = s.run_once()
    problems = reader.stop()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert s.in_sync() and problems == []


def test_kill_9_of_the_agent_mid_push(tmp_path: Path, sshd, relay) -> None:  # noqa: ANN001
    s = Setup(tmp_path, sshd, relay)
    assert s.run_once().returncode == 0
    s.new_version()
    reader = EdgeReader(s.edge.root, s.allowed)
    reader.start()
    relay.reset_counts()
    proc = subprocess.Popen(SYNCD + ["-c", str(s.primary.ini), "run", "--once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def kill_agent() -> None:
        out = subprocess.run(["pgrep", "-f", f"agent --config {s.edge.ini}"], capture_output=True, text=True)
        for pid in out.stdout.split():
            os.kill(int(pid), signal.SIGKILL)

    _kill_when(relay, 3_000_000, kill_agent, proc)
    out, err = proc.communicate(timeout=120)
    ok = s.run_once()
    problems = reader.stop()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert s.in_sync() and problems == []
