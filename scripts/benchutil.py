"""Helpers shared by the benchmark scripts and the demo: measured child
processes, seeded tree generators, tree listings, sync.ini writers, tables.

Only the standard library: the scripts run with the project's virtualenv but
must not depend on anything beyond what syncd itself installs.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent
#: The syncd under test: $SYNCD_BIN, else the one beside this interpreter, else the repository's venv.
SYNCD = os.environ.get("SYNCD_BIN") or (
    str(VENV_BIN / "syncd") if (VENV_BIN / "syncd").exists() else str(REPO / ".venv" / "bin" / "syncd"))


# -- measured child processes --------------------------------------------------


@dataclass
class Measured:
    argv: list[str]
    wall: float
    maxrss: int  # bytes
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Measured:
        if self.returncode:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited {self.returncode}: {self.stderr.strip()[-2000:]}")
        return self


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_measured(argv: list[str], *, stdout_to_null: bool = False, env: dict | None = None,
                 cwd: str | None = None) -> Measured:
    """Run ``argv``; wall seconds and the child's peak RSS.

    Linux carries a parent's RSS high-water mark into a forked child, so
    ``os.wait4`` on a child of this (Python, tree-generating) process reports
    at least this process's own peak.  The child therefore runs under
    ``/usr/bin/time -f %M`` (a small C program) when it is installed, and
    ``os.wait4`` is the fallback (``maxrss`` then includes ``own_maxrss()``).
    Output goes to temporary files, not pipes, so nothing has to be read while
    the child runs.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", prefix="rss-") as rss_file:
        full = [TIME, "-q", "-f", "%M", "-o", rss_file.name, *argv] if TIME else list(argv)
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if stdout_to_null else out,
                                stderr=err, env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen from waiting
        maxrss = usage.ru_maxrss * 1024
        if TIME:
            words = rss_file.read().split()
            if words and words[-1].isdigit():
                maxrss = int(words[-1]) * 1024
        out.seek(0)
        err.seek(0)
        return Measured(list(argv), wall, maxrss, proc.returncode,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def own_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# -- trees ---------------------------------------------------------------------


class Pool:
    """A seeded pool of random bytes; ``take(n)`` returns fresh-looking slices.

    Each call reads from a new pseudo-random offset, so files differ from one
    another (no accidental duplicates for rename detection to exploit) without
    generating every byte anew.
    """

    def __init__(self, seed: int, size: int = 32 << 20) -> None:
        self.rng = random.Random(seed)
        self.size = size
        self.data = self.rng.randbytes(size)
        self.view = memoryview(self.data)

    def take(self, n: int) -> bytes:
        if n <= 0:
            return b""
        if n > self.size // 2:
            return self.rng.randbytes(n)
        # A unique 16-byte prefix keeps equal-sized slices distinct.
        head = self.rng.randbytes(min(16, n))
        off = self.rng.randrange(0, self.size - n)
        return head + self.view[off:off + n - len(head)].tobytes()


def write_file(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def flat_tree(root: pathlib.Path, files: int, *, seed: int = 1, max_size: int = 8192,
              per_dir: int = 1000) -> int:
    """``files`` files of 0..max_size random bytes, ``per_dir`` per directory.
    Returns the bytes written."""
    pool = Pool(seed, 8 << 20)
    rng = random.Random(seed + 1)
    total = 0
    ndirs = max(1, -(-files // per_dir))
    made = 0
    for d in range(ndirs):
        dpath = root / f"d{d:04d}"
        dpath.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_dir, files - made)):
            n = rng.randint(0, max_size)
            write_file(dpath / f"f{i:05d}.bin", pool.take(n))
            total += n
        made += min(per_dir, files - made)
    return total


def listing(root: pathlib.Path) -> dict[str, tuple]:
    """path -> (kind, mode bits, size, sha256 or link target, mtime_ns) for a tree."""
    out: dict[str, tuple] = {}
    root = pathlib.Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "", None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, 0, os.readlink(full), None)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest(), st.st_mtime_ns)
            else:
                out[rel] = ("other", 0, 0, "", None)
    return out


def compare_trees(expected: dict[str, tuple], actual: dict[str, tuple]) -> tuple[list[str], int]:
    """Differences in content, kind, mode (fatal) and the count of mtime-only differences."""
    problems = []
    for p in sorted(expected.keys() - actual.keys())[:5]:
        problems.append(f"missing {p}")
    for p in sorted(actual.keys() - expected.keys())[:5]:
        problems.append(f"extra {p}")
    missing = len(expected.keys() - actual.keys())
    extra = len(actual.keys() - expected.keys())
    if missing > 5 or extra > 5:
        problems.append(f"({missing} missing, {extra} extra in all)")
    mtimes = 0
    for p in sorted(expected.keys() & actual.keys()):
        e, a = expected[p], actual[p]
        if e[:4] != a[:4]:
            if len(problems) < 10:
                problems.append(f"differs {p}: {e[:4]} != {a[:4]}")
        elif e[4] != a[4]:
            mtimes += 1
    return problems, mtimes


# -- configs -------------------------------------------------------------------


def write_ini(path: pathlib.Path, name: str, root: pathlib.Path, state_dir: pathlib.Path,
              mirrors: dict[str, dict[str, object]] | None = None, extra_node: dict | None = None) -> pathlib.Path:
    lines = ["[node]", f"name = {name}", f"root = {root}", f"state_dir = {state_dir}"]
    for k, v in (extra_node or {}).items():
        lines.append(f"{k} = {v}")
    for mname, keys in (mirrors or {}).items():
        lines += ["", f"[mirror:{mname}]"]
        lines += [f"{k} = {v}" for k, v in keys.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# -- output --------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def table(headers: list[str], rows: list[list[object]], left: tuple[int, ...] = (0,)) -> str:
    """A plain-text table: columns in ``left`` (negative counts from the end)
    flush left, the others (numbers) flush right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lefts = {i % len(headers) for i in left}
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in lefts else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


CIPHER = "aes128-gcm@openssh.com"


class SshRig:
    """One sshd on 127.0.0.1 with a byte-counting relay in front, shared by
    every tool a benchmark compares, so they cross the same link.  ``rtt``:
    the link's round-trip time in seconds (the relay holds each direction for
    half of it; 0: none, and the relay splices in the kernel)."""

    def __init__(self, work: pathlib.Path, rtt: float = 0.0) -> None:
        from tests.relay import Relay
        from tests.sshd import start_sshd

        self.work = work
        self.sshd = start_sshd(work / "ssh")
        try:
            self.relay = Relay(self.sshd.host, self.sshd.port, delay=rtt / 2)
            self.known_hosts = self.sshd.known_hosts_for(self.relay.port)
        except BaseException:
            self.sshd.stop()
            raise

    def stop(self) -> None:
        try:
            self.relay.stop()
        finally:
            self.sshd.stop()

    def settled_counts(self) -> dict[str, int]:
        """The relay's byte counts once they stop moving: it may still be
        pumping the last bytes of a connection the tool already closed."""
        import time

        last, deadline = None, time.monotonic() + 2
        while time.monotonic() < deadline:
            now = self.relay.counts()
            if now == last:
                break
            last = now
            time.sleep(0.05)
        return self.relay.counts()

    def ssh_command(self) -> str:
        """OpenSSH through the relay, as rsync's -e gets it: same key, host key check and cipher as syncd."""
        return (f"ssh -F /dev/null -p {self.relay.port} -i {self.sshd.identity_file} -o IdentitiesOnly=yes "
                f"-o UserKnownHostsFile={self.known_hosts} -o GlobalKnownHostsFile=/dev/null "
                f"-o StrictHostKeyChecking=yes -o BatchMode=yes -c {CIPHER}")
