"""Prewarming a new edge over a real sshd (issue 6).

The edges' ``remote_command`` is ``syncd agent``; prewarm derives the
stage-only ``syncd agent --stage`` from it for its parallel streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

from syncd.staging import boot_id, verified_this_boot
from syncd.manifest import Manifest
from syncd.protocol import FrameReader, FrameType, FrameWriter
from syncd.transport import LocalSession
from tests.nodes import SYNCD, assert_same_tree, tree_listing, wait_agents_ended
from tests.relay import Relay

pytest_plugins = ["tests.sshd"]

PREWARM = [sys.executable, "-m", "syncd"]


class Site:
    """A primary and its downstreams, each reached through its own relay."""

    def __init__(self, base: Path, ssh) -> None:  # noqa: ANN001
        self.base = base
        self.ssh = ssh
        self.primary = self.node("primary", max_delete="100%")
        self.mirrors: list[tuple[str, Relay, dict]] = []

    def node(self, name: str, **keys: str) -> Path:
        d = self.base / name
        (d / "root").mkdir(parents=True)
        lines = ["[node]", f"name = {name}", f"root = {d / 'root'}", f"state_dir = {d / 'state'}"]
        lines += [f"{k} = {v}" for k, v in keys.items()]
        (d / "sync.ini").write_text("\n".join(lines) + "\n")
        return d

    def add_mirror(self, name: str, relay: Relay, **keys: str) -> Path:
        d = self.node(name)
        self.mirrors.append((name, relay, keys))
        self.write_primary()
        return d

    def write_primary(self) -> None:
        d = self.primary
        lines = ["[node]", "name = primary", f"root = {d / 'root'}", f"state_dir = {d / 'state'}",
                 "max_delete = 100%"]
        for name, relay, keys in self.mirrors:
            command = " ".join(shlex.quote(x) for x in [sys.executable, "-m", "syncd", "agent", "--config",
                                                         str(self.base / name / "sync.ini")])
            values = {"host": self.ssh.host, "port": relay.port, "user": self.ssh.user,
                      "identity_file": self.ssh.identity_file, "known_hosts": self.ssh.known_hosts_for(relay.port),
                      "remote_command": command, "retry_delay": "0.05", **keys}
            lines += ["", f"[mirror:{name}]"] + [f"{k} = {v}" for k, v in values.items()]
        (d / "sync.ini").write_text("\n".join(lines) + "\n")

    def prewarm(self, name: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(PREWARM + ["-c", str(self.primary / "sync.ini"), "prewarm", name, *extra],
                              capture_output=True, text=True, timeout=timeout)

    def run_once(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(SYNCD + ["-c", str(self.primary / "sync.ini"), "run", "--once", *extra],
                              capture_output=True, text=True, timeout=120)

    def in_sync(self, name: str) -> bool:
        """As a client lists it, and as rsync sees it (directory and symlink times included)."""
        assert_same_tree(self.primary / "root", self.base / name / "root")
        return tree_listing(self.primary / "root") == tree_listing(self.base / name / "root")

    def generation(self, name: str) -> tuple[int, int]:
        with Manifest.open(self.primary / "state", "primary") as m:
            ours = m.generation
        with Manifest.open(self.base / name / "state", name) as m:
            return ours, int(m.get_meta("upstream_generation") or -1)


def fill(root: Path, *, big: int, big_mib: int, small: int, small_kib: int, seed: int = 5) -> int:
    rng = random.Random(seed)
    total = 0
    (root / "iso").mkdir()
    for i in range(big):
        data = rng.randbytes(big_mib << 20)
        (root / f"iso/big{i}.iso").write_bytes(data)
        total += len(data)
    (root / "pool/main").mkdir(parents=True)
    for i in range(small):
        data = rng.randbytes(small_kib << 10)
        (root / f"pool/main/p{i:03d}.deb").write_bytes(data)
        total += len(data)
    (root / "dists/stable").mkdir(parents=True)
    text = b"".join(b"Package: p%03d\nVersion: 1.0\n\n" % i for i in range(small))
    (root / "dists/stable/Packages").write_bytes(text)
    (root / "dists/stable/Release").write_bytes(b"Origin: test\n")
    os.symlink("dists/stable", root / "current")
    (root / "empty").mkdir()
    return total + len(text) + 13


@pytest.fixture
def site(tmp_path: Path, sshd) -> Site:  # noqa: ANN001
    return Site(tmp_path, sshd)


def test_prewarm_empty_edge_then_run_once_moves_almost_nothing(site: Site) -> None:
    with Relay(site.ssh.host, site.ssh.port) as relay:
        edge = site.add_mirror("edge", relay)
        size = fill(site.primary / "root", big=1, big_mib=9, small=12, small_kib=300)
        done = site.prewarm("edge", "--streams", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "self (primary) *" in done.stdout  # no other mirror: this node is the source
        # One login per stream: the first stream's session also asked what the
        # edge holds, and then carried the push (the stager's "agent").
        assert relay.connections_accepted == 2
        assert site.in_sync("edge")
        ours, held = site.generation("edge")
        assert held == ours
        assert sorted(p.name for p in (edge / "state/staging").iterdir()) == []
        progress = json.loads((site.primary / "state/prewarm.json").read_text())
        assert progress["phase"] == "done" and progress["bytes_total"] >= size - 4096
        assert progress["files_done"] == progress["files_total"]

        relay.reset_counts()
        again = site.run_once()
        assert again.returncode == 0, again.stdout + again.stderr
        moved = relay.counts()
        assert moved["up"] + moved["down"] < 64 * 1024, moved  # a handshake, nothing else
        assert site.in_sync("edge")

        # A stale edge: only what changed since the generation it holds is staged.
        root = site.primary / "root"
        (root / "pool/main/new.deb").write_bytes(os.urandom(700_000))
        (root / "pool/main/p000.deb").write_bytes(os.urandom(300 << 10))
        (root / "pool/main/p001.deb").unlink()
        relay.reset_counts()
        stale = site.prewarm("edge", "--transport", "paramiko")
        assert stale.returncode == 0, stale.stdout + stale.stderr
        assert relay.counts()["up"] < 1_000_000 + 200_000
        assert site.in_sync("edge")
        assert not any((edge / "state/staging").iterdir())  # nothing staged that no push consumed


def test_a_stager_without_features_still_gets_the_edge_filled(site: Site) -> None:
    """A stager of before features (no runs, no XXH3, no hand-over): ranges
    carry SHA-256 digests, and the push logs in on its own."""
    old = site.base / "old_stager.py"
    old.write_text("import sys\nimport syncd.prewarm.stager as s\ns.FEATURES = ()\n"
                   "from syncd.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    with Relay(site.ssh.host, site.ssh.port) as relay:
        command = " ".join(shlex.quote(x) for x in [sys.executable, str(old), "agent", "--config",
                                                     str(site.base / "edge" / "sync.ini")])
        edge = site.add_mirror("edge", relay, remote_command=command)
        fill(site.primary / "root", big=1, big_mib=9, small=12, small_kib=300)
        done = site.prewarm("edge", "--streams", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert site.in_sync("edge")
        ours, held = site.generation("edge")
        assert held == ours
        assert relay.connections_accepted == 3  # two streams, and the push's own login
        assert sorted(p.name for p in (edge / "state/staging").iterdir()) == []


def test_kill_9_at_60_percent_then_resume_sends_under_half(site: Site) -> None:
    # Throttled so the kill lands mid-transfer; the rerun goes through the same relay.
    with Relay(site.ssh.host, site.ssh.port, rate_up=40e6) as relay:
        edge = site.add_mirror("edge", relay)
        size = fill(site.primary / "root", big=2, big_mib=48, small=64, small_kib=512)
        proc = subprocess.Popen(PREWARM + ["-c", str(site.primary / "sync.ini"), "prewarm", "edge",
                                           "--streams", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while relay.counts()["up"] < 0.6 * size and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "prewarm finished before the kill: the test would prove nothing"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        staging = edge / "state/staging"
        # A large file was cut in the middle: its verified ranges are on record.
        assert any(p.name.endswith(".ranges") for p in staging.iterdir())
        assert not (edge / "root/iso").exists()  # nothing published before the push

        # The killed workers' stagers wind down: each turns its unfinished
        # run into a partial file, which the rerun then resumes from.
        wait_agents_ended(edge / "sync.ini")
        relay.reset_counts()
        again = site.prewarm("edge", "--streams", "2")
        assert again.returncode == 0, again.stdout + again.stderr
        resent = relay.counts()["up"]
        assert resent < size / 2, (resent, size)
        assert site.in_sync("edge")
        ours, held = site.generation("edge")
        assert held == ours
        assert list(staging.iterdir()) == []


def test_source_selection_picks_the_faster_sibling(site: Site) -> None:
    with Relay(site.ssh.host, site.ssh.port) as fast, \
            Relay(site.ssh.host, site.ssh.port, rate_down=1.5e6) as slow, \
            Relay(site.ssh.host, site.ssh.port) as to_edge:
        site.add_mirror("sib-fast", fast)
        site.add_mirror("sib-slow", slow)
        edge = site.add_mirror("edge", to_edge)
        size = fill(site.primary / "root", big=1, big_mib=6, small=8, small_kib=200)
        first = site.run_once("--mirror", "sib-fast,sib-slow")
        assert first.returncode == 0, first.stdout + first.stderr
        fast.reset_counts()
        slow.reset_counts()
        done = site.prewarm("edge", "--streams", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        table = done.stdout
        assert "sib-fast *" in table and "sib-slow *" not in table, table
        # The content came down from the fast sibling, not from the slow one.
        assert fast.counts()["down"] > size
        assert slow.counts()["down"] < (4 << 20) + (256 << 10)  # at most the probe's sample
        assert site.in_sync("edge")
        assert not any((edge / "state/staging").iterdir())

        forced = site.prewarm("edge", "--from", "sib-slow")  # already full: probes, then nothing to do
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert "sib-slow *" in forced.stdout


def _stager(tmp_path: Path) -> tuple[LocalSession, FrameWriter, FrameReader, Path]:
    node = tmp_path / "edge"
    (node / "root").mkdir(parents=True, exist_ok=True)
    ini = node / "sync.ini"
    ini.write_text(f"[node]\nname = edge\nroot = {node / 'root'}\nstate_dir = {node / 'state'}\n")
    code = ("import sys; from syncd import config; from syncd.prewarm.stager import serve_stage_stdio; "
            "sys.exit(serve_stage_stdio(config.load(sys.argv[1])))")
    session = LocalSession([sys.executable, "-c", code, str(ini)])
    w = FrameWriter(session.send_all)
    r = FrameReader(session.recv)
    w.hello()
    w.message({"type": "hello", "node": "t", "mirror": "edge", "role": "edge"})
    w.flush()
    r.read_hello()
    assert r.read_frame().payload["type"] == "welcome"
    return session, w, r, node / "state/staging"


def _put(w: FrameWriter, r: FrameReader, stream: int, sha: bytes, size: int, off: int, data: bytes,
         digest: bytes | None = None, *, xxh3: bool = False, run: bool = False) -> dict:
    msg = {"type": "put", "stream": stream, "sha256": sha, "size": size, "offset": off,
           "length": len(data), "how": "whole"}
    if xxh3:
        msg["digest"] = "xxh3-128"
    if run:
        msg["run"] = True
    w.message(msg)
    w.data(stream, data)
    if xxh3:
        w.end(stream, {"xxh3_128": digest or xxhash.xxh3_128(data).digest()})
    else:
        w.end(stream, {"sha256": digest or hashlib.sha256(data).digest()})
    w.flush()
    frame = r.read_frame()
    assert frame.kind is FrameType.MESSAGE
    return frame.payload


def _have(w: FrameWriter, r: FrameReader, sha: bytes, size: int) -> list:
    w.message({"type": "have", "batch": 0, "objects": [[sha, size, b"iso/x", 0]]})
    w.flush()
    return r.read_frame().payload["objects"][0]


def _leftovers(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir() if p.name.startswith(("run.", "partial.", "stage.")))


def test_a_run_is_named_by_the_hash_taken_as_it_arrived(tmp_path: Path) -> None:
    session, w, r, staging = _stager(tmp_path)
    try:
        mib = 1 << 20
        good = os.urandom(3 * mib)
        sha = hashlib.sha256(good).digest()
        for i in range(3):
            ack = _put(w, r, i + 1, sha, len(good), i * mib, good[i * mib:(i + 1) * mib], xxh3=True, run=True)
            assert ack["type"] == "put_ok" and ack["staged"] is (i == 2)
        assert (staging / sha.hex()).read_bytes() == good
        assert _leftovers(staging) == []
        # Ranges that each match their XXH3 but make other content: never named.
        other = os.urandom(3 * mib)
        for i in range(3):
            ack = _put(w, r, 10 + i, sha[::-1], len(other), i * mib, other[i * mib:(i + 1) * mib], xxh3=True,
                       run=True)
            assert ack["type"] == "put_ok" and ack["staged"] is False
        assert not (staging / sha[::-1].hex()).exists()
        assert _leftovers(staging) == []
        # A range that does not match its XXH3 is refused.
        bad = _put(w, r, 20, sha, len(good), 0, good[:mib], digest=b"\0" * 16, xxh3=True)
        assert bad["type"] == "put_failed"
    finally:
        session.close()


@pytest.mark.parametrize("how", ["bad range, then bye", "kill -9"])
def test_an_unfinished_run_leaves_its_recorded_prefix_to_resume_from(tmp_path: Path, how: str) -> None:
    session, w, r, staging = _stager(tmp_path)
    mib = 1 << 20
    good = os.urandom(3 * mib)
    sha = hashlib.sha256(good).digest()
    try:
        assert _put(w, r, 1, sha, len(good), 0, good[:mib], xxh3=True, run=True)["type"] == "put_ok"
        if how == "kill -9":
            session._proc.kill()
            session._proc.wait()
        else:
            bad = _put(w, r, 2, sha, len(good), mib, good[mib:2 * mib], digest=b"\0" * 16, xxh3=True, run=True)
            assert bad["type"] == "put_failed"
            w.message({"type": "bye"})
            w.flush()
            session._proc.wait(30)
    finally:
        session.close()
    session, w, r, staging = _stager(tmp_path)
    try:
        # The next stager finds the first range recorded, as a partial object.
        assert _have(w, r, sha, len(good)) == ["partial", [[0, mib]]]
        assert not any(p.name.startswith("run.") for p in staging.iterdir())
        # ... and the rest, sent as ranges, completes it (read back and checked).
        assert _put(w, r, 1, sha, len(good), mib, good[mib:2 * mib], xxh3=True)["staged"] is False
        assert _put(w, r, 2, sha, len(good), 2 * mib, good[2 * mib:], xxh3=True, run=True)["staged"] is True
        assert (staging / sha.hex()).read_bytes() == good
        assert _leftovers(staging) == []
    finally:
        session.close()


def test_stager_never_names_an_unverified_object(tmp_path: Path) -> None:
    session, w, r, staging = _stager(tmp_path)
    try:
        good = os.urandom(3 << 20)
        sha = hashlib.sha256(good).digest()
        half = len(good) // 2
        # A range whose bytes do not match its digest is refused, not recorded.
        bad = _put(w, r, 1, sha, len(good), 0, good[:half], digest=b"\0" * 32)
        assert bad["type"] == "put_failed"
        # Ranges that each match their digest but assemble into other content:
        # never renamed to the object's name, and the partial is discarded.
        forged = bytes(half)
        assert _put(w, r, 2, sha, len(good), 0, forged)["staged"] is False
        last = _put(w, r, 3, sha, len(good), half, good[half:])
        assert last["type"] == "put_ok" and last["staged"] is False
        assert not (staging / sha.hex()).exists()
        assert not any(p.name.startswith("partial.") for p in staging.iterdir())
        # The same ranges, honest this time, in reverse order: staged when the last one lands.
        assert _put(w, r, 4, sha, len(good), half, good[half:])["staged"] is False
        w.message({"type": "have", "batch": 1, "objects": [[sha, len(good), b"iso/x", 0]]})
        w.flush()
        have = r.read_frame().payload
        assert have["objects"] == [["partial", [[half, len(good) - half]]]]
        assert _put(w, r, 5, sha, len(good), 0, good[:half])["staged"] is True
        assert (staging / sha.hex()).read_bytes() == good
        # Beside it only this boot's log of checked objects, which names it.
        assert sorted(p.name for p in staging.iterdir()) == sorted([sha.hex(), "verified." + boot_id()])
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert verified_this_boot(fd) == {sha.hex()}
        finally:
            os.close(fd)
    finally:
        session.close()


def test_an_unknown_host_key_is_refused(site: Site) -> None:
    with Relay(site.ssh.host, site.ssh.port) as relay:
        site.add_mirror("edge", relay, known_hosts=site.ssh.wrong_known_hosts(site.base / "wrong_known_hosts"))
        (site.primary / "root/f").write_bytes(b"x" * 1000)
        for transport in ("openssh", "paramiko"):
            done = site.prewarm("edge", "--transport", transport)
            assert done.returncode != 0
            assert "host key" in done.stderr.lower(), done.stderr
        assert not (site.base / "edge/state").exists()  # nothing reached the edge's agent


def test_lost_links_are_retried_and_resume(site: Site) -> None:
    with Relay(site.ssh.host, site.ssh.port) as relay:
        edge = site.add_mirror("edge", relay, retries="30")
        size = fill(site.primary / "root", big=2, big_mib=12, small=24, small_kib=640)
        # Every connection is cut after 6 MB: only resuming what arrived can finish.
        relay.set_cut(6_000_000, None)
        done = site.prewarm("edge", "--streams", "2")
        relay.set_cut(None, None)
        assert done.returncode == 0, done.stdout + done.stderr
        assert relay.cuts >= 2
        assert relay.counts()["up"] < 2 * size
        assert site.in_sync("edge")
        assert not any((edge / "state/staging").iterdir())


def test_link_rtt_confirms_a_slow_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    # The RTT that picks the default streams: a first handshake slowed by a
    # moment's delay is checked with two more, and the fastest counts; a
    # fast first one is taken at once; no answer is None.
    import socket

    from syncd.prewarm import sources as pw
    from syncd.config import MirrorConfig

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    real = socket.create_connection
    calls: list[int] = []

    slow = {1}  # the calls that are slowed

    def slowed(address, timeout=None):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) in slow:
            time.sleep(0.05)
        return real(address, timeout=timeout)

    mirror = MirrorConfig(name="m", host="127.0.0.1", port=port, user="u", identity_file=None,
                          known_hosts=Path("/nonexistent"), remote_command="syncd agent", schedule="",
                          connect_timeout=2.0, keepalive=0)
    try:
        monkeypatch.setattr(pw.socket, "create_connection", slowed)
        assert pw.link_rtt(mirror) < pw.LAN_RTT
        assert len(calls) == 2  # the second, fast, settles it
        calls.clear()
        slow.update({2, 3})  # slow every time: a WAN, after three
        assert pw.link_rtt(mirror) >= 0.05
        assert len(calls) == 3
        calls.clear()
        monkeypatch.setattr(pw.socket, "create_connection", real)
        assert pw.link_rtt(mirror) < pw.LAN_RTT
        assert pw.default_streams(pw.link_rtt(mirror)) == max(1, min(4, pw._cores()))
    finally:
        listener.close()
    assert pw.link_rtt(mirror) is None  # nothing listens there any more
