"""Latency through two hops: a file renamed into place on the primary, until it
is readable and whole on a tier-2 edge.

    python scripts/bench.py latency [--files 20] [--size 65536] [--timeout 30]

Two tools over the same sshd on 127.0.0.1, each with its own three trees:

- syncd: the daemon on the primary (``syncd -c primary.ini run``) and on the
  tier-1 (``syncd -c tier1.ini run``); the primary's push cascades through
  the tier-1 to the edge.  Both daemons are started after one ``run --once``
  (so the tier-1 knows it is a mirror) and measured from their READY=1,
  received on a notification socket of this script (``$NOTIFY_SOCKET``).
- lsyncd (rsyncssh mode, delay 0): one lsyncd primary -> tier-1 and one
  tier-1 -> tier-2, measured after both logged the end of their start-up sync.

Each of the files is written under a temporary name in its directory and
renamed into place, one at a time; the clock starts right after the rename.
The edge is polled every 5 ms until the file has the right size and SHA-256.
Every process this script starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchutil import SYNCD, table, write_ini

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.sshd import start_sshd  # noqa: E402

POLL = 0.005  # seconds between looks at the edge
READY_TIMEOUT = 60.0  # seconds a daemon or lsyncd gets to start (its initial sync included)


class Procs:
    """Child processes, each stopped by its own PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: pathlib.Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs.pop())


def tail(path: pathlib.Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


def sha256(path: pathlib.Path) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").digest()
    except OSError:
        return None


def measure(src: pathlib.Path, edge: pathlib.Path, files: int, size: int, timeout: float, tag: str) -> list[float | None]:
    """Seconds from each rename on ``src`` to the whole file on ``edge`` (None: timed out)."""
    (src / "incoming").mkdir(exist_ok=True)
    out: list[float | None] = []
    for i in range(files):
        data = os.urandom(size)
        digest = hashlib.sha256(data).digest()
        name = f"incoming/{tag}-{i:03d}.deb"
        tmp = src / f"incoming/.{tag}-{i:03d}.deb.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, src / name)
        t0 = time.monotonic()
        target = edge / name
        got = None
        while time.monotonic() - t0 < timeout:
            try:
                st = os.stat(target)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_size == size and sha256(target) == digest:
                got = time.monotonic() - t0
                break
            time.sleep(POLL)
        out.append(got)
        # Let the tools settle between files: each file is a fresh change.
        time.sleep(0.2)
    return out


def row(tool: str, lat: list[float | None], note: str = "") -> list[object]:
    done = [x for x in lat if x is not None]
    if not done:
        return [tool, "n/a", "n/a", f"0/{len(lat)}", note]
    lost = len(lat) - len(done)
    return [tool, f"{statistics.median(done):.3f}", f"{max(done):.3f}", f"{len(done)}/{len(lat)}",
            note or (f"{lost} not seen within the timeout" if lost else "")]


# -- syncd -------------------------------------------------------------------------------


def run_syncd(work: pathlib.Path, ssh, procs: Procs, args) -> list[object]:  # noqa: ANN001
    tool = "syncd (daemons on primary and tier-1)"
    base = work / "syncd"
    roots = {n: base / n / "root" for n in ("primary", "tier1", "tier2")}
    for r in roots.values():
        r.mkdir(parents=True)
    states = {n: base / n / "state" for n in roots}

    def mirror(ini: pathlib.Path) -> dict:
        return dict(host=ssh.host, port=ssh.port, user=ssh.user, identity_file=ssh.identity_file,
                    known_hosts=ssh.known_hosts, remote_command=f"{SYNCD} agent --config {ini}")

    node = {"max_delete": "100%"}
    t2 = write_ini(base / "tier2.ini", "tier2", roots["tier2"], states["tier2"], extra_node=node)
    t1 = write_ini(base / "tier1.ini", "tier1", roots["tier1"], states["tier1"], extra_node=node,
                   mirrors={"tier2": mirror(t2)})
    p = write_ini(base / "primary.ini", "primary", roots["primary"], states["primary"], extra_node=node,
                  mirrors={"tier1": mirror(t1)})
    (roots["primary"] / "README").write_text("latency bench\n")
    first = subprocess.run([SYNCD, "-c", str(p), "run", "--once"], capture_output=True, text=True, timeout=120)
    if first.returncode != 0:
        return [tool, "n/a", "n/a", "0", f"n/a: run --once failed: {first.stderr.strip()[-300:]}"]

    sock_path = base / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    started: list = []
    try:
        for name, ini in (("tier1", t1), ("primary", p)):
            env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
            log = base / f"{name}.log"
            started.append((name, log, procs.start([SYNCD, *(["-v"] if args.debug else []), "-c", str(ini), "run"], log, env=env)))
        ready = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while ready < len(started):
            for name, log, proc in started:
                if proc.poll() is not None:
                    return [tool, "n/a", "n/a", "0",
                            f"n/a: {name} daemon exited {proc.returncode}: {tail(log, 300)}"]
            left = deadline - time.monotonic()
            if left <= 0:
                return [tool, "n/a", "n/a", "0", "n/a: no READY=1 from the daemons within "
                        f"{READY_TIMEOUT:.0f} s"]
            sock.settimeout(min(left, 0.5))
            try:
                msg = sock.recv(4096).decode(errors="replace")
            except socket.timeout:
                continue
            if "READY=1" in msg.split("\n"):
                ready += 1
        lat = measure(roots["primary"], roots["tier2"], args.files, args.size, args.timeout, "s")
        return row(tool, lat)
    finally:
        # Stopped before the socket closes: their STOPPING=1 still has a listener.
        for _, _, proc in started:
            procs.stop(proc)
        sock.close()


# -- lsyncd ------------------------------------------------------------------------------


def run_lsyncd(work: pathlib.Path, ssh, procs: Procs, args) -> list[object]:  # noqa: ANN001
    tool = "lsyncd rsyncssh, delay 0 (two lsyncds)"
    lsyncd = shutil.which("lsyncd")
    if lsyncd is None or shutil.which("rsync") is None or shutil.which("ssh") is None:
        return [tool, "n/a", "n/a", "0", "n/a: lsyncd, rsync or ssh is not installed (apt install lsyncd)"]
    base = work / "lsyncd"
    roots = {n: base / n for n in ("primary", "tier1", "tier2")}
    for r in roots.values():
        r.mkdir(parents=True)
    # One ssh config for every ssh lsyncd and rsync start: host, port, key, known_hosts.
    ssh_cfg = base / "ssh_config"
    ssh_cfg.write_text(
        "Host bench-sshd\n"
        f"  HostName {ssh.host}\n  Port {ssh.port}\n  User {ssh.user}\n"
        f"  IdentityFile {ssh.identity_file}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {ssh.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    started = []
    try:
        for a, b in (("primary", "tier1"), ("tier1", "tier2")):
            conf = base / f"{a}-{b}.lua"
            log = base / f"{a}-{b}.log"
            conf.write_text(
                "settings {\n"
                f'  logfile = "{log}",\n  statusFile = "{base / (a + "-" + b + ".status")}",\n'
                "  nodaemon = true,\n  insist = false,\n}\n"
                "sync {\n  default.rsyncssh,\n"
                f'  source = "{roots[a]}",\n  host = "bench-sshd",\n  targetdir = "{roots[b]}",\n'
                "  delay = 0,\n"
                f'  rsync = {{ archive = true, rsh = "ssh -F {ssh_cfg}" }},\n'
                f'  ssh = {{ _extra = {{ "-F", "{ssh_cfg}" }} }},\n'
                "}\n"
            )
            started.append((f"{a}->{b}", log, procs.start([lsyncd, str(conf)], base / f"{a}-{b}.out")))
        deadline = time.monotonic() + READY_TIMEOUT
        for name, log, proc in started:
            while "finished" not in (log.read_text(errors="replace") if log.exists() else ""):
                if proc.poll() is not None:
                    return [tool, "n/a", "n/a", "0", f"n/a: lsyncd {name} exited {proc.returncode}: "
                            f"{tail(log, 200)} {tail(base / (name.replace('->', '-') + '.out'), 200)}"]
                if time.monotonic() > deadline:
                    return [tool, "n/a", "n/a", "0", f"n/a: lsyncd {name} did not finish its start-up sync"]
                time.sleep(0.05)
        lat = measure(roots["primary"], roots["tier2"], args.files, args.size, args.timeout, "l")
        return row(tool, lat)
    finally:
        for _, _, proc in started:
            procs.stop(proc)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py latency", description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--size", type=int, default=64 * 1024, help="bytes per file")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one file on the edge")
    ap.add_argument("--only", choices=("syncd", "lsyncd"), help="run one tool only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, trees)")
    ap.add_argument("--debug", action="store_true", help="debug logs from the syncd daemons (with --keep)")
    args = ap.parse_args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="syncd-bench-latency-"))
    procs = Procs()
    ssh = start_sshd(work / "ssh")
    rows = []
    try:
        if args.only in (None, "syncd"):
            rows.append(run_syncd(work, ssh, procs, args))
        if args.only in (None, "lsyncd"):
            rows.append(run_lsyncd(work, ssh, procs, args))
    finally:
        procs.stop_all()
        ssh.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"latency: rename on the primary -> whole on tier 2, through tier 1 ({args.files} files of "
          f"{args.size} bytes, one at a time, polled every {POLL * 1000:.0f} ms)")
    print(table(["tool", "median s", "max s", "files", "note"], rows, left=(0, -1)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
