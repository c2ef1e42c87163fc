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
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.nodes import SYNCD, agents_running, assert_same_tree, make_node, tree_listing
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


# -- kill -9 at random moments, of either end, round after round ---------------------


class TreeReader(threading.Thread):
    """Walks the edge without following anything and records what no client
    may see: a name the primary never had (a temporary), a regular file whose
    content is none of the versions ever written at that path on the
    primary (torn, or unverified), a symlink with a target it never had."""

    def __init__(self, root: Path, files: dict[str, set[str]], links: dict[str, set[str]],
                 dirs: set[str]) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.files, self.links, self.dirs = files, links, dirs
        self.problems: list[str] = []
        self.reads = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.005):
            for dirpath, dirnames, filenames in os.walk(self.root):
                for name in dirnames + filenames:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, self.root)
                    try:
                        st = os.lstat(full)
                        if stat.S_ISLNK(st.st_mode):
                            if os.readlink(full) not in self.links.get(rel, ()):
                                self.problems.append(f"unexpected symlink {rel} -> {os.readlink(full)}")
                        elif stat.S_ISDIR(st.st_mode):
                            if rel not in self.dirs:
                                self.problems.append(f"unexpected directory in root: {rel}")
                        elif rel not in self.files:
                            self.problems.append(f"unexpected name in root: {rel}")
                        else:
                            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                            try:
                                digest = hashlib.sha256()
                                while chunk := os.read(fd, 1 << 20):
                                    digest.update(chunk)
                            finally:
                                os.close(fd)
                            self.reads += 1
                            if digest.hexdigest() not in self.files[rel]:
                                self.problems.append(f"torn or unverified content at {rel}")
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # replaced or removed meanwhile

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(30)
        return self.problems


class ChangingPrimary:
    """A primary whose tree gets a mixed change set each round: new files (some
    of a few MiB, so that a push takes a while), edits in place (some large
    enough to go as deltas), deletions (now and then a whole directory), new
    directories (one left empty), a symlink made, retargeted or only touched,
    and the index files rewritten in place.  Every version of every path is
    registered before it is written, for the reader."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.files: dict[str, set[str]] = {}
        self.links: dict[str, set[str]] = {}
        self.dirs: set[str] = set()
        self.serial = 0
        for d in ("pool/a", "pool/b", "pool/c", "dists/stable"):
            self.mkdir(d)
        for i in range(24):
            self.write(f"pool/{'abc'[i % 3]}/p{i:02d}.deb", self.rng.choice([2_000, 40_000, 300_000]))
        self.index()
        self.link("current", "dists/stable")

    def mkdir(self, rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            self.dirs.add("/".join(parts[:i]))
        (self.root / rel).mkdir(parents=True, exist_ok=True)

    def write(self, rel: str, size: int) -> None:
        data = self.rng.randbytes(size)
        self.files.setdefault(rel, set()).add(hashlib.sha256(data).hexdigest())
        self.mkdir(rel.rpartition("/")[0]) if "/" in rel else None
        (self.root / rel).write_bytes(data)  # in place: the directory keeps its time

    def link(self, rel: str, target: str) -> None:
        self.links.setdefault(rel, set()).add(target)
        tmp = self.root / f"{rel}.new"
        os.symlink(target, tmp)
        os.rename(tmp, self.root / rel)

    def index(self) -> None:
        listing = sorted(str(p.relative_to(self.root)) for p in (self.root / "pool").rglob("*.deb"))
        text = "".join(f"Filename: {p}\n" for p in listing).encode()
        self.files.setdefault("dists/stable/Packages", set()).add(hashlib.sha256(text).hexdigest())
        (self.root / "dists/stable/Packages").write_bytes(text)
        release = b"Origin: test\nSHA256:\n %s %d Packages\n" % (hashlib.sha256(text).hexdigest().encode(), len(text))
        self.files.setdefault("dists/stable/Release", set()).add(hashlib.sha256(release).hexdigest())
        (self.root / "dists/stable/Release").write_bytes(release)

    def live_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in (self.root / "pool").rglob("*")
                      if p.is_file() and not p.is_symlink())

    def change(self) -> None:
        rng = self.rng
        self.serial += 1
        n = self.serial
        new_dir = f"pool/n{n}"
        self.mkdir(new_dir)
        self.mkdir(f"pool/empty{n}")
        for i in range(2):  # large new files, at paths the edge never had: live early
            self.write(f"{new_dir}/big{i}.iso", rng.randrange(1 << 20, 3 << 20))
        for i in range(6):
            self.write(f"pool/{rng.choice('abc')}/s{n}-{i}.deb", rng.randrange(100, 20_000))
        live = self.live_files()
        for rel in rng.sample(live, 3):  # edits in place (a large one goes as a delta)
            self.write(rel, rng.choice([5_000, 200_000, 1 << 20]))
        for rel in rng.sample([p for p in self.live_files() if "/n" not in p], 2):
            os.unlink(self.root / rel)
        if n % 3 == 0:  # a whole directory goes
            doomed = sorted(p for p in (self.root / "pool").iterdir() if p.name.startswith("n"))[0]
            shutil.rmtree(doomed)
        what = rng.choice(["retarget", "touch", "new"])
        if what == "retarget":
            self.link("current", rng.choice(["dists/stable", "pool", f"pool/n{n}"]))
        elif what == "touch":
            os.utime(self.root / "current", ns=(10**18 + n, 10**18 + n), follow_symlinks=False)
        else:
            self.link(f"pool/latest{n}.iso", f"n{n}/big0.iso")
        self.index()


def test_kill_9_at_random_moments_then_a_rerun_converges(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    """Rounds of: a mixed change set on the primary, ``run --once``, and kill -9
    at a random moment of that push, alternately of the pushing process group
    and of the edge's agent; then a plain rerun exits 0 and rsync finds the
    edge equal to the primary.  Eight such kills must land mid-push.  Two
    more rounds kill the agent the moment its commit has published the new
    Release, before its deletions and directory times: the rerun finds the
    index in place and needs nothing there, and still puts dists/stable/'s
    time back.  A reader on the edge never sees a torn file, an unverified
    one, or a temporary name.  The seed is printed (SYNCD_KILL_SEED replays
    one)."""
    seed = int(os.environ.get("SYNCD_KILL_SEED") or random.randrange(1 << 32))
    print(f"seed {seed}")
    rng = random.Random(seed)
    primary = make_node(tmp_path, "primary", max_delete="100%")
    edge = make_node(tmp_path, "edge")
    primary.mirrors.append((edge, {"retries": "1"}))
    edge.write()
    primary.write(sshd)
    tree = ChangingPrimary(primary.root, rng)
    release = edge.root / "dists/stable/Release"

    def run_once() -> subprocess.CompletedProcess:
        return subprocess.run(SYNCD + ["-c", str(primary.ini), "run", "--once"], capture_output=True, text=True,
                              timeout=120)

    def start() -> subprocess.Popen:
        return subprocess.Popen(SYNCD + ["-c", str(primary.ini), "run", "--once"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill_agents() -> list[int]:
        killed = []
        for pid in agents_running(edge.ini):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    first = run_once()
    assert first.returncode == 0, first.stdout + first.stderr
    reader = TreeReader(edge.root, tree.files, tree.links, tree.dirs)
    reader.start()
    try:
        # How long a round's push takes here and now, and how long of it its
        # agent lives: the random kills are drawn within those spans.
        tree.change()
        began = time.monotonic()
        proc = start()
        while not agents_running(edge.ini) and proc.poll() is None:
            time.sleep(0.002)
        agent_up = time.monotonic()
        assert proc.wait(120) == 0, proc.stdout.read()
        span, agent_span = time.monotonic() - began, time.monotonic() - agent_up
        assert_same_tree(primary.root, edge.root)
        landed: list[str] = []
        at_commit = 0
        rounds = 0
        while len(landed) < 8 or at_commit < 2:
            assert rounds < 18, f"seed {seed}: only {len(landed)} random kills of {rounds} rounds landed mid-push"
            rounds += 1
            tree.change()
            if len(landed) >= 8 or (rounds % 5 == 0 and at_commit < 2):
                target, delay = "agent at its commit", None
            else:
                target = "agent" if rounds % 2 else "pusher"
                delay = rng.uniform(0.0, 0.8 * (agent_span if target == "agent" else span))
            old_release = release.stat().st_ino
            proc = start()
            killed: list[int] = []
            if delay is None:
                while proc.poll() is None and release.stat().st_ino == old_release:
                    time.sleep(0.0005)
                killed = kill_agents()
            else:
                if target == "agent":  # the delay counts from the agent's start
                    while not agents_running(edge.ini) and proc.poll() is None:
                        time.sleep(0.002)
                time.sleep(delay)
                if proc.poll() is None:
                    if target == "pusher":
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = [proc.pid]
                    else:
                        killed = kill_agents()
            out = proc.communicate(timeout=120)[0].decode(errors="replace")
            if killed and delay is None:
                at_commit += 1
            elif killed:
                landed.append(f"{target} at {delay:.2f} s" + (" of its life" if target == "agent" else ""))
            edge.wait_agent_ended()
            again = run_once()
            assert again.returncode == 0, f"seed {seed}, round {rounds}: {out}\n{again.stdout}{again.stderr}"
            assert_same_tree(primary.root, edge.root)
            assert reader.problems == [], f"seed {seed}, round {rounds}: {reader.problems[:5]}"
            assert not (edge.state / "touched-dirs").exists()  # every directory has its time back
        print(f"{rounds} rounds; random kills that landed mid-push: {', '.join(landed)}; "
              f"{at_commit} at a commit")
    finally:
        problems = reader.stop()
    assert problems == [], f"seed {seed}: {problems[:5]}"
    assert reader.reads > 0
