"""The daemon (`syncd run`) over a real sshd: watch, push, merge, stop, reload."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.nodes import SYNCD, Node, assert_same_tree, make_node, rsync_differences, tree_listing, wait_until

pytest_plugins = ["tests.sshd"]


class Daemon:
    def __init__(self, node: Node, *, journal: bool = False, args: tuple[str, ...] = ()) -> None:
        self.node = node
        self.log = node.base / "daemon.log"
        self.fh = open(self.log, "wb")
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            # As systemd connects a unit's stderr to the journal: JOURNAL_STREAM
            # names that stream's device and inode (systemd.exec(5)).
            st = os.fstat(self.fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        # No -v: the daemon logs a line per scan and per push by default.
        self.proc = subprocess.Popen(SYNCD + ["-c", str(node.ini), "run", *args],
                                     stdout=self.fh, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert self.proc.poll() is None, f"daemon exited: {self.text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in: {self.text()[-2000:]}"
            time.sleep(0.05)

    def pushes_to(self, mirror: str) -> int:
        return len(re.findall(rf"syncd.daemon: {re.escape(mirror)}: generation ", self.text()))

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.fh.close()


@pytest.fixture
def daemons():  # noqa: ANN201
    started: list[Daemon] = []

    def start(node: Node, **kw) -> Daemon:  # noqa: ANN003
        d = Daemon(node, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def publish(root: Path, rel: str, data: bytes) -> None:
    """As a mirror's archive tooling does: write aside, rename into place."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, path)


def three_tiers(base: Path, ssh, **keys) -> tuple[Node, Node, Node]:  # noqa: ANN001
    primary = make_node(base, "primary", max_delete="100%", **keys)
    tier1 = make_node(base, "tier1", max_delete="100%")
    tier2 = make_node(base, "tier2", max_delete="100%")
    primary.mirrors = [(tier1, {})]
    tier1.mirrors = [(tier2, {})]
    tier2.write()
    tier1.write(ssh)
    primary.write(ssh)
    return primary, tier1, tier2


def same(a: Node, b: Node) -> bool:
    """Equal as a client lists them, and as rsync sees them.  The listing
    alone can match a moment before a commit ends (new files go live early;
    directory times are put back last): waiting for rsync's silence waits
    for the commit."""
    if tree_listing(a.root) != tree_listing(b.root):
        return False
    try:
        return not rsync_differences(a.root, b.root)
    except AssertionError:  # rsync itself failed: a file vanished under it, mid-commit
        return False


def test_daemons_carry_a_file_from_primary_to_tier2(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    publish(primary.root, "dists/stable/Release", b"Origin: test\nSuite: stable\n")
    p = daemons(primary)
    daemons(tier1)  # a mirror's daemon: scheduled reconciles only; pushes arrive through its agent
    wait_until(lambda: same(primary, tier2), what="the initial sync to reach tier 2")
    publish(primary.root, "pool/main/h/hello_1.0.deb", os.urandom(100_000))
    wait_until(lambda: same(primary, tier2), what="the new file to reach tier 2")
    assert p.stop() == 0
    assert_same_tree(primary.root, tier1.root)
    assert_same_tree(primary.root, tier2.root)


def test_burst_of_writes_coalesces_into_few_pushes(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    p = daemons(primary)
    p.wait_log("daemon ready")
    wait_until(lambda: p.pushes_to("tier1") >= 1 or "tier1: generation" in p.text(), what="first push")
    before = p.pushes_to("tier1")
    for i in range(1000):
        publish(primary.root, f"burst/d{i % 10}/f{i:04d}", b"x" * (i % 100))
    wait_until(lambda: same(primary, tier2) and p.pushes_to("tier1") > before, timeout=60,
               what="the burst to reach tier 2")
    time.sleep(1)  # any straggling push would show by now
    pushes = p.pushes_to("tier1") - before
    assert 1 <= pushes <= 10, f"{pushes} pushes for one burst"


def test_push_arriving_during_a_push_is_merged_not_lost(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, _ = three_tiers(tmp_path, sshd)
    primary.mirrors = [(tier1, {"bwlimit": "2M"})]  # a slow link: the first push takes a while
    primary.write(sshd)
    p = daemons(primary)
    p.wait_log("daemon ready")
    publish(primary.root, "big.iso", os.urandom(6 << 20))
    wait_until(lambda: (tier1.state / "staging").exists() and any((tier1.state / "staging").iterdir()),
               what="the first push to be under way")
    publish(primary.root, "late.txt", b"written while the first push runs")
    wait_until(lambda: same(primary, tier1), timeout=60, what="both files on tier 1")
    assert (tier1.root / "late.txt").read_bytes() == b"written while the first push runs"


def test_sigterm_mid_push_leaves_mirrors_consistent(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    primary.mirrors = [(tier1, {"bwlimit": "2M"})]
    primary.write(sshd)
    publish(primary.root, "small.txt", b"v1")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier1), what="the first sync")
    before = tree_listing(tier1.root)
    publish(primary.root, "big.iso", os.urandom(8 << 20))
    wait_until(lambda: any(n.startswith(("tmp.", "run.")) for n in os.listdir(tier1.state / "staging")),
               what="the big file to be arriving")
    started = time.monotonic()
    assert p.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    # Nothing of the interrupted generation is visible, nothing partial.
    assert tree_listing(tier1.root) == before
    # And a plain rerun converges.
    proc = subprocess.run(SYNCD + ["-c", str(primary.ini), "run", "--once"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert same(primary, tier1) and same(primary, tier2)
    assert_same_tree(primary.root, tier2.root)


def test_sighup_reloads_the_config(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, _ = three_tiers(tmp_path, sshd)
    extra = make_node(tmp_path, "extra", max_delete="100%")
    extra.write()
    publish(primary.root, "a.txt", b"a")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier1), what="the first sync")
    assert list(extra.root.iterdir()) == []
    primary.mirrors.append((extra, {}))
    primary.write(sshd)
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log("config reloaded")
    wait_until(lambda: same(primary, extra), what="the new mirror to be filled")
    # A broken config on reload is refused, the daemon keeps running.
    primary.ini.write_text(primary.ini.read_text() + "\n[mirror:broken]\nport = x\n")
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log("reload refused")
    publish(primary.root, "b.txt", b"b")
    wait_until(lambda: same(primary, extra), what="pushes to go on after a refused reload")


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, _, _ = three_tiers(tmp_path, sshd)
    p = daemons(primary)
    p.wait_log("daemon ready")
    proc = subprocess.run(SYNCD + ["-c", str(primary.ini), "run"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "another syncd daemon" in proc.stderr and f"PID {p.proc.pid}" in proc.stderr


def test_without_watches_a_periodic_scan_carries_changes(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, _ = three_tiers(tmp_path, sshd, watch="no", scan_interval="0.5")
    p = daemons(primary)
    p.wait_log("scanning root every")
    publish(primary.root, "x.txt", b"x")
    wait_until(lambda: same(primary, tier1), what="the periodic scan to push")


def test_primary_daemon_does_not_push_a_release_failing_its_own_checks(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, _ = three_tiers(tmp_path, sshd)
    publish(primary.root, "dists/stable/Release", b"Origin: test\n")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier1), what="the first sync")
    good = tree_listing(tier1.root)
    # A Release whose SHA256 list names a Packages that does not match.
    publish(primary.root, "dists/stable/main/Packages", b"Package: a\n")
    publish(primary.root, "dists/stable/Release",
            b"Origin: test\nSHA256:\n " + b"0" * 64 + b" 11 main/Packages\n")
    p.wait_log("refusing to push")
    time.sleep(1)
    assert tree_listing(tier1.root) == good
    # The fixed release goes out.
    import hashlib

    digest = hashlib.sha256(b"Package: a\n").hexdigest().encode()
    publish(primary.root, "dists/stable/Release", b"Origin: test\nSHA256:\n " + digest + b" 11 main/Packages\n")
    wait_until(lambda: same(primary, tier1), what="the fixed release")


def _logins(ssh) -> int:  # noqa: ANN001
    return ssh.log_file.read_text(errors="replace").count("Accepted publickey")


def test_daemon_keeps_its_sessions_open_between_pushes(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    publish(primary.root, "first.txt", b"1")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier2), what="the first sync")
    logins = _logins(sshd)
    for i in range(5):
        publish(primary.root, f"pool/f{i}", os.urandom(1000))
        wait_until(lambda: same(primary, tier2), what=f"file {i} on tier 2")
    # Five pushes through two hops, and not one new SSH login: primary -> tier1
    # and tier1's cascade -> tier2 both reused their sessions.
    assert _logins(sshd) == logins
    assert p.pushes_to("tier1") >= 5


def test_a_lost_session_is_opened_again(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    publish(primary.root, "first.txt", b"1")
    daemons(primary)
    wait_until(lambda: same(primary, tier2), what="the first sync")
    # The mirror's agent dies between pushes (a reboot, an OOM kill).
    out = subprocess.run(["pgrep", "-f", f"agent --config {tier1.ini}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    publish(primary.root, "second.txt", b"2")
    wait_until(lambda: same(primary, tier2), what="the push after the agent died")


def test_metrics_listener(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    primary, tier1, _ = three_tiers(tmp_path, sshd, metrics_listen=f"127.0.0.1:{port}")
    publish(primary.root, "a.txt", b"a")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier1), what="the first sync")
    p.wait_log("syncd.daemon: tier1: generation")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    wait_until(lambda: 'syncd_pushes_total{mirror="tier1",result="ok"}' in scrape(), what="push metrics")
    text = scrape()
    assert 'syncd_mirror_lag_generations{mirror="tier1"} 0.0' in text
    assert "syncd_generation 1.0" in text
    assert 'syncd_push_bytes_total{mirror="tier1"}' in text


def test_the_daemon_logs_each_scan_and_push_without_v(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    """What systemd/syncd.service runs (no -v): one INFO line per scan and
    per push, in the plain format with a time outside systemd."""
    primary, tier1, tier2 = three_tiers(tmp_path, sshd)
    p = daemons(primary)
    p.wait_log("daemon ready")
    p.wait_log(r"INFO syncd.daemon: tier1: generation none -> 0 \(full comparison\)")
    publish(primary.root, "pool/a.deb", b"a" * 1000)
    p.wait_log(r"INFO syncd.daemon: tier1: generation 0 -> 1: ")
    lines = p.text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ", ln) for ln in lines), lines
    assert any(re.search(r"INFO syncd.daemon: primary: full scan: generation ", ln) for ln in lines), lines
    assert any(re.search(r"INFO syncd.daemon: primary: scan of \d+ dir\(s\): generation 0 -> 1: 2 added", ln)
               for ln in lines), "\n".join(lines)
    assert not any(" DEBUG " in ln for ln in lines)
    assert p.stop() == 0
    assert same(primary, tier2)


def test_log_level_and_q_quieten_the_daemon(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    primary, tier1, _ = three_tiers(tmp_path, sshd, log_level="warning")
    publish(primary.root, "a.txt", b"a")
    p = daemons(primary)
    wait_until(lambda: same(primary, tier1), what="the first sync")
    p.stop()
    assert "INFO" not in p.text()
    primary.node_keys["log_level"] = "info"
    primary.write(sshd)
    publish(primary.root, "b.txt", b"b")
    p = daemons(primary, args=("-q",))  # -q after the command: one step quieter than info
    wait_until(lambda: same(primary, tier1), what="the second sync")
    p.stop()
    assert "INFO" not in p.text()
    publish(primary.root, "c.txt", b"c")
    p = daemons(primary, args=("-v",))
    wait_until(lambda: same(primary, tier1), what="the third sync")
    p.wait_log(" DEBUG syncd")
    p.stop()


def test_under_systemd_the_log_is_in_journal_format(tmp_path: Path, sshd, daemons) -> None:  # noqa: ANN001
    """stderr is the journal stream: '<N>' syslog priorities (sd-daemon(3)),
    no time (the journal stamps it); an error is priority 3, once."""
    primary, tier1, _ = three_tiers(tmp_path, sshd)
    gone = make_node(tmp_path, "gone")
    gone.write()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    primary.mirrors.append((gone, {"port": dead, "retries": 1, "connect_timeout": 5}))
    primary.write(sshd)
    publish(primary.root, "a.txt", b"a")
    p = daemons(primary, journal=True)
    p.wait_log(r"(?m)^<6>syncd.daemon: tier1: generation none -> 1")
    p.wait_log(r"(?m)^<3>syncd.daemon: gone: FAILED after 1 attempt\(s\): ")
    p.stop()
    lines = p.text().splitlines()
    assert all(re.match(r"<[2-7]>\S+: ", ln) for ln in lines), lines
    # One line per failed push, each followed by when it is tried again.
    failed = len([ln for ln in lines if "gone: FAILED" in ln])
    assert 1 <= failed <= len([ln for ln in lines if ln.startswith("<4>syncd.daemon: gone: next attempt")]) + 1
