#!/usr/bin/env python3
"""syncd push beside ``rsync -a --delete`` over the same sshd, in one run (issue 4's measure).

    python scripts/bench.py push [--small N] [--big K] [--big-mib M] [--noop-files N] [--rounds N]
                                 [--scan-first] [--syncd-first] [--no-context] [--dir DIR] [--keep] [--seed S]

One sshd on 127.0.0.1 with a counting relay in front of it (tests/sshd.py,
tests/relay.py); both tools connect through the relay with aes128-gcm, so
"bytes on the wire" are the TCP bytes each tool's SSH connection carried.
rsync syncs SRC to DST1; syncd syncs SRC to DST2 with ``syncd -c primary.ini
run --once``, which scans the primary's root before it pushes: the scan is part
of syncd's cost as rsync's file-list walk is part of rsync's (``--scan-first``
also runs ``syncd scan -q`` before it, timed together).

Steps:
  initial      (``--rounds`` times, default 3, alternating; the medians are
               compared) copy of a mirror-like tree: N small files (default 5,000, 1-64 KiB,
               pool/main/x/pkg/*.deb), dists/stable/.../Packages(.gz), Release,
               and K files of M MiB (default 4 x 64 MiB)
  incremental  20 small files edited in place, 1,000 bytes inserted in the middle
               of one big file, 1 MiB appended to another, the third renamed,
               the fourth edited in three 4 KiB places and renamed (a respun
               image under a new version number), 100 small files added, 50
               deleted, Packages and Release rewritten
  no-op        the same tree again, nothing changed
  noop-100k    a separate tree of --noop-files small files (default 100,000):
               an untimed-for-the-target initial copy, then a no-op resync

Each tool's run starts after ``sync`` (no dirty pages left by the other); rsync
runs first in every step (``--syncd-first`` swaps).  The relay splices in the
kernel (next to no CPU taken from the tools it measures).  After each step DST1 and DST2 are compared with SRC (path, kind, mode, size,
SHA-256; mtime differences are counted and reported), outside the timing.
syncd's output and -v log of each step are kept in WORK/logs (see --keep).
The initial copy runs in rounds because one run of it varies by 20% or more
between minutes on a shared 2-core VM (the page cache's first touches, the
file system's recent deletions), too much for a 1.2x target read from one
pair; nothing is deleted between rounds.
Targets: incremental bytes at most half of rsync's, incremental and no-op wall
time no worse than rsync's, initial copy within 1.2x of rsync's wall time.

Context (not a target; ``--no-context`` skips it): in each round of the
initial copy rsync also runs with what syncd guarantees and ``rsync -a``
does not, into new mirrors of their own: ``--checksum-choice=sha1`` (a
strong whole-file checksum computed on both ends, where ``-a`` uses xxh128;
rsync offers no SHA-256) and that with ``--fsync`` (every file on disk before
rsync goes on; syncd makes staged files durable before any is published).
The report gives their medians beside syncd's.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchutil import (
    CIPHER, REPO, SYNCD, Measured, Pool, SshRig, compare_trees, flat_tree, human, listing, median, run_measured,
    table, write_file, write_ini,
)

sys.path.insert(0, str(REPO))

# run --once logs its scan's summary at INFO ("scan: ... hashed in X s").
_SCAN_SECONDS = re.compile(r"scan: .*hashed in ([0-9.]+) s")
SYLLABLES = ("ab", "bel", "cor", "da", "el", "fu", "gri", "ho", "ix", "jo", "ka", "lu", "mo", "nex",
             "op", "pra", "qu", "ri", "sol", "tu", "ur", "vo", "wi", "xen", "yo", "zed")


# -- the mirror-like tree ------------------------------------------------------


class MirrorTree:
    """A seeded Debian-like tree and the mutations of the incremental step."""

    def __init__(self, root: pathlib.Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.pool = Pool(seed + 7)
        self.debs: list[pathlib.Path] = []
        self.bigs: list[pathlib.Path] = []
        self._next_pkg = 0

    def _pkg_name(self) -> str:
        self._next_pkg += 1
        n = self._next_pkg
        name = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 3))) + str(n)
        return ("lib" + name) if self.rng.random() < 0.2 else name

    def _add_deb(self) -> pathlib.Path:
        name = self._pkg_name()
        section = name[:4] if name.startswith("lib") else name[0]
        version = f"{self.rng.randint(0, 9)}.{self.rng.randint(0, 30)}-{self.rng.randint(1, 5)}"
        d = self.root / "pool" / "main" / section / name
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}_{version}_amd64.deb"
        write_file(path, self.pool.take(self.rng.randint(1024, 64 * 1024)))
        self.debs.append(path)
        return path

    def generate(self, small: int, big: int, big_mib: int) -> int:
        for _ in range(small):
            self._add_deb()
        iso = self.root / "cdimage" / "release" / "current" / "amd64"
        iso.mkdir(parents=True, exist_ok=True)
        for i in range(big):
            path = iso / f"debian-12.{i}.0-amd64-netinst.iso"
            write_file(path, self.rng.randbytes(big_mib << 20))
            self.bigs.append(path)
        self.write_indices()
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def write_indices(self) -> None:
        """Packages, Packages.gz and Release, as a mirror's index group."""
        dists = self.root / "dists" / "stable"
        binary = dists / "main" / "binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        stanzas = []
        for p in sorted(self.debs):
            pkg, version = p.name.split("_")[:2]
            stanzas.append(
                f"Package: {pkg}\nVersion: {version}\nArchitecture: amd64\n"
                f"Filename: {p.relative_to(self.root)}\nSize: {p.stat().st_size}\n"
                f"SHA256: {hashlib.sha256(p.name.encode()).hexdigest()}\n"
                f"Description: the {pkg} package\n")
        packages = "\n".join(stanzas).encode()
        write_file(binary / "Packages", packages)
        write_file(binary / "Packages.gz", gzip.compress(packages, 6, mtime=0))
        lines = ["Origin: Debian", "Suite: stable", f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}",
                 "SHA256:"]
        for f in ("Packages", "Packages.gz"):
            data = (binary / f).read_bytes()
            lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data):>10} main/binary-amd64/{f}")
        write_file(dists / "Release", ("\n".join(lines) + "\n").encode())

    def mutate(self) -> list[str]:
        done = []
        for path in self.rng.sample(self.debs, min(20, len(self.debs))):
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.seek(self.rng.randrange(0, max(1, size - 16)))
                f.write(self.rng.randbytes(16))
        done.append("20 small files edited in place (16 bytes each)")
        if len(self.bigs) >= 1:
            data = self.bigs[0].read_bytes()
            mid = len(data) // 2
            write_file(self.bigs[0], data[:mid] + self.rng.randbytes(1000) + data[mid:])
            del data
            done.append(f"1,000 bytes inserted in the middle of {self.bigs[0].name}")
        if len(self.bigs) >= 2:
            with open(self.bigs[1], "ab") as f:
                f.write(self.rng.randbytes(1 << 20))
            done.append(f"1 MiB appended to {self.bigs[1].name}")
        if len(self.bigs) >= 3:
            new = self.bigs[2].with_name("debian-12.99.0-amd64-netinst.iso")
            os.rename(self.bigs[2], new)
            done.append(f"{self.bigs[2].name} renamed to {new.name}")
            self.bigs[2] = new
        if len(self.bigs) >= 4:
            old = self.bigs[3]
            data = bytearray(old.read_bytes())
            for i in (1, 2, 3):
                at = i * len(data) // 4
                data[at:at + 4096] = self.rng.randbytes(4096)
            new = old.with_name(old.name.replace(".0-amd64", ".1-amd64"))
            write_file(new, bytes(data))
            del data
            old.unlink()
            done.append(f"{old.name} edited in three 4 KiB places and renamed to {new.name}")
            self.bigs[3] = new
        for _ in range(100):
            self._add_deb()
        done.append("100 small files added")
        victims = self.rng.sample(self.debs[:-100], min(50, max(0, len(self.debs) - 100)))
        for path in victims:
            path.unlink()
            self.debs.remove(path)
        done.append(f"{len(victims)} small files deleted")
        self.write_indices()
        done.append("Packages, Packages.gz, Release rewritten")
        return done


# -- the two tools -------------------------------------------------------------


class Bench(SshRig):
    def __init__(self, work: pathlib.Path, scan_first: bool) -> None:
        self.scan_first = scan_first
        self.rows: list[dict] = []
        self.context: list[dict] = []  # rsync given syncd's guarantees (not a target)
        self.syncd_missing = _syncd_push_missing()
        super().__init__(work)

    def _counted(self, run) -> tuple[list[Measured], dict[str, int]]:
        # Neither tool pays for the other's write-back: start each with no dirty pages.
        os.sync()
        self.relay.reset_counts()
        results = run()
        return results, self.settled_counts()

    def _rsync_argv(self, src: pathlib.Path, dst: pathlib.Path, options: tuple[str, ...] = ()) -> list[str]:
        return ["rsync", "-a", "--delete", *options, "-e", self.ssh_command(), f"{src}/",
                f"{self.sshd.user}@{self.sshd.host}:{dst}/"]

    def rsync(self, step: str, src: pathlib.Path, dst: pathlib.Path) -> dict:
        argv = self._rsync_argv(src, dst)
        (m,), counts = self._counted(lambda: [run_measured(argv).check()])
        row = dict(step=step, tool=rsync_tool(), wall=m.wall, up=counts["up"], down=counts["down"], note="")
        self.rows.append(row)
        return row

    def rsync_context(self, options: tuple[str, ...], src: pathlib.Path, dst: pathlib.Path) -> dict:
        """One context run of the initial copy: rsync with ``options`` too
        (kept apart from the rows the targets compare)."""
        tool = rsync_tool(options)
        argv = self._rsync_argv(src, dst, options)
        (m,), _counts = self._counted(lambda: [run_measured(argv)])
        if m.returncode:
            # rsync's own cause comes first; its last line is the generic "rsync error: ..."
            lines = [ln for ln in m.stderr.strip().splitlines() if ln.strip()]
            cause = next((ln for ln in lines if not ln.startswith("rsync error:")), None) or \
                (lines[-1] if lines else f"exit status {m.returncode}")
            row = dict(tool=tool, wall=None, note=f"failed: {cause[:120]}")
        else:
            row = dict(tool=tool, wall=m.wall, note="")
        self.context.append(row)
        return row

    def syncd_configs(self, tag: str, src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
        # The incremental step deletes on purpose; with small --small values it
        # is more than the default deletion guard (10% of the tree) allows.
        node = {"max_delete": "50%"}
        edge = write_ini(self.work / f"edge-{tag}.ini", "edge", dst, self.work / f"state-edge-{tag}", extra_node=node)
        return write_ini(
            self.work / f"primary-{tag}.ini", "primary", src, self.work / f"state-primary-{tag}", extra_node=node,
            mirrors={"edge": dict(
                host=self.sshd.host, port=self.relay.port, user=self.sshd.user,
                identity_file=self.sshd.identity_file, known_hosts=self.known_hosts,
                remote_command=f"{SYNCD} agent --config {edge}",
            )},
        )

    def syncd(self, step: str, ini: pathlib.Path) -> dict:
        tool = "syncd scan + run --once" if self.scan_first else "syncd run --once"
        if self.syncd_missing:
            row = dict(step=step, tool=tool, wall=None, up=None, down=None,
                       note="n/a (syncd run --once not available, see below)")
            self.rows.append(row)
            return row

        def measured() -> list[Measured]:
            done = []
            if self.scan_first:
                done.append(run_measured([SYNCD, "-c", str(ini), "scan", "-q"]))
                if done[-1].returncode:
                    return done
            done.append(run_measured([SYNCD, "-v", "-c", str(ini), "run", "--once"]))
            return done

        results, counts = self._counted(measured)
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"syncd-{step.replace(' ', '_')}.log").write_text(
            "".join(f"$ {' '.join(m.argv)}\n{m.stdout}{m.stderr}" for m in results))
        failed = next((m for m in results if m.returncode), None)
        if failed:
            tail = (failed.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
            what = "run --once" if failed.argv[-1] == "--once" else "scan"
            row = dict(step=step, tool=tool, wall=None, up=counts["up"], down=counts["down"],
                       note=f"FAILED: {what} exited {failed.returncode}: {tail.split(': ', 1)[-1][:100]}")
            print(f"  syncd failed; stderr tail:\n{failed.stderr[-3000:]}")
        else:
            wall = sum(m.wall for m in results)
            parts = [] if len(results) == 1 else [
                f"{m.argv[-2] if m.argv[-1] == '--once' else 'scan'} {m.wall:.2f} s" for m in results]
            scanned = _SCAN_SECONDS.search(results[-1].stderr)
            if scanned:
                parts.append(f"its scan {float(scanned.group(1)):.2f} s in-process")
            parts.append(f"peak RSS {max(m.maxrss for m in results) / 2**20:.0f} MB")
            row = dict(step=step, tool=tool, wall=wall, up=counts["up"], down=counts["down"], note=", ".join(parts))
        self.rows.append(row)
        return row

    def both(self, step: str, src: pathlib.Path, dst: pathlib.Path, ini: pathlib.Path,
             syncd_first: bool) -> None:
        if syncd_first:
            self.syncd(step, ini)
            self.rsync(step, src, dst)
        else:
            self.rsync(step, src, dst)
            self.syncd(step, ini)

    def verify(self, step: str, src: pathlib.Path, dsts: dict[str, pathlib.Path]) -> bool:
        expected = listing(src)
        ok = True
        for tool, dst in dsts.items():
            problems, mtimes = compare_trees(expected, listing(dst))
            if problems:
                ok = False
                print(f"  VERIFY {step}: {tool}'s copy differs from the source:")
                for p in problems:
                    print(f"    {p}")
            else:
                extra = f" ({mtimes} files with another mtime)" if mtimes else ""
                print(f"  verify {step}: {tool}'s copy equals the source ({len(expected)} entries){extra}")
        return ok


def _syncd_push_missing() -> str | None:
    """Why ``syncd run --once`` cannot be used yet, or None when it can."""
    for argv in ([SYNCD, "run", "--help"], [SYNCD, "agent", "--help"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except OSError as err:
            return f"{argv[0]}: {err.strerror}"
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
            return f"`syncd {argv[1]} --help`: {lines[-1][:160]}"
    return None


# -- report --------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else human(n)


def report(rows: list[dict]) -> str:
    out = []
    by_step: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_step.setdefault(r["step"], {})["rsync" if r["tool"].startswith("rsync") else "syncd"] = r
    for r in rows:
        total = None if r["up"] is None else r["up"] + r["down"]
        ratio_t = ratio_b = ""
        if r["tool"].startswith("syncd"):
            base = by_step[r["step"]].get("rsync")
            if base and r["wall"] is not None:
                ratio_t = f"{r['wall'] / base['wall']:.2f}x"
            if base and total is not None and r["wall"] is not None:
                base_total = base["up"] + base["down"]
                ratio_b = f"{total / base_total:.2f}x" if base_total else ""
        out.append([r["step"], r["tool"], "n/a" if r["wall"] is None else f"{r['wall']:.2f}",
                    _fmt_bytes(r["up"]), _fmt_bytes(r["down"]), _fmt_bytes(total), ratio_t, ratio_b, r["note"]])
    return table(["step", "tool", "wall s", "bytes up", "bytes down", "total bytes",
                  "time syncd/rsync", "bytes syncd/rsync", "note"], out, left=(0, 1, -1))


def merge_rounds(rows: list[dict], step: str) -> list[dict]:
    """The rows of ``step`` (one per tool and round) as one row per tool: the
    median wall time and bytes, every round's time in the note."""
    merged: dict[str, list[dict]] = {}
    for r in rows:
        if r["step"] == step:
            merged.setdefault(r["tool"], []).append(r)
    out, done = [], set()
    for r in rows:
        if r["step"] != step:
            out.append(r)
            continue
        if r["tool"] in done:
            continue
        done.add(r["tool"])
        runs = merged[r["tool"]]
        walls = [x["wall"] for x in runs]
        ok = all(w is not None for w in walls)
        counted = [x for x in runs if x["up"] is not None]
        note = f"median of {len(runs)} rounds: " + " ".join("failed" if w is None else f"{w:.2f}" for w in walls)
        if runs[0]["note"]:
            note += "; " + runs[0]["note"]
        out.append(dict(step=step, tool=r["tool"], wall=median(walls) if ok else None,
                        up=median([x["up"] for x in counted]) if counted else None,
                        down=median([x["down"] for x in counted]) if counted else None, note=note,
                        rounds=walls))
    return out


# rsync with what syncd guarantees and plain -a does not (the report's context):
# a strong whole-file checksum on both ends, then also every file on disk.
CONTEXT_OPTIONS = (("--checksum-choice=sha1",), ("--checksum-choice=sha1", "--fsync"))


def rsync_tool(options: tuple[str, ...] = ()) -> str:
    """The name an rsync run (plain, or a context run with ``options``) is reported and looked up under."""
    return " ".join(("rsync -a --delete", *options))


def context_lines(context: list[dict], rows: list[dict]) -> list[str]:
    """The initial copy's context runs beside syncd's median."""
    syncd = next((r for r in rows if r["step"] == "initial" and not r["tool"].startswith("rsync")), None)
    lines = []
    for options in CONTEXT_OPTIONS:
        tool = rsync_tool(options)
        runs = [r for r in context if r["tool"] == tool]
        if not runs:
            continue
        failed = next((r["note"] for r in runs if r["wall"] is None), None)
        if failed:
            lines.append(f"  {tool}: {failed}")
            continue
        walls = [r["wall"] for r in runs]
        m = median(walls)
        ratio = f"; syncd/this {syncd['wall'] / m:.2f}x" if syncd and syncd["wall"] is not None else ""
        lines.append(f"  {tool}: {m:.2f} s (median of {len(walls)}: "
                     f"{' '.join(f'{w:.2f}' for w in walls)}){ratio}")
    return lines


def targets(rows: list[dict]) -> list[str]:
    pairs: dict[str, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault(r["step"], {})["rsync" if r["tool"].startswith("rsync") else "syncd"] = r
    lines = []

    def check(step: str, what: str, limit: float, label: str) -> None:
        p = pairs.get(step, {})
        s, r = p.get("syncd"), p.get("rsync")
        if not s or not r or s["wall"] is None:
            lines.append(f"  {label}: n/a")
            return
        if what == "bytes":
            value = (s["up"] + s["down"]) / max(1, r["up"] + r["down"])
        else:
            value = s["wall"] / r["wall"]
        lines.append(f"  {label}: {value:.2f}x (limit {limit}x) {'met' if value <= limit else 'NOT met'}")
        if what == "wall" and s.get("rounds") and r.get("rounds") and None not in s["rounds"] + r["rounds"]:
            ratios = [a / b for a, b in zip(s["rounds"], r["rounds"])]
            lines.append(f"    (medians of {len(ratios)} rounds; each round: "
                         f"{' '.join(f'{x:.2f}x' for x in ratios)})")

    check("incremental", "bytes", 0.5, "incremental bytes syncd/rsync <= 0.5")
    check("incremental", "wall", 1.0, "incremental wall syncd/rsync <= 1")
    check("no-op", "wall", 1.0, "no-op wall syncd/rsync <= 1")
    noop_big = next((s for s in pairs if s.startswith("no-op ") and s != "no-op"), None)
    if noop_big:
        check(noop_big, "wall", 1.0, f"{noop_big} wall syncd/rsync <= 1")
    check("initial", "wall", 1.2, "initial wall syncd/rsync <= 1.2")
    return lines


# -- main ----------------------------------------------------------------------


def evict(root: pathlib.Path) -> None:
    """Drop the files below ``root`` from the page cache (written back first)."""
    os.sync()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def context(bench: Bench, src: pathlib.Path, work: pathlib.Path, r: int) -> bool:
    """One round's context runs, each into a new mirror; whether each copy is whole."""
    ok = True
    for i, options in enumerate(CONTEXT_OPTIONS, 1):
        tool = rsync_tool(options)
        if any(row["tool"] == tool and row["wall"] is None for row in bench.context):
            continue  # failed in an earlier round (an rsync without the option): once is enough
        dst = work / f"dst-rsync-context{i}-r{r}"
        dst.mkdir()
        row = bench.rsync_context(options, src, dst)
        print(f"  context: {row['tool']}: " + (row["note"] if row["wall"] is None else f"{row['wall']:.2f} s"))
        if row["wall"] is not None:
            ok &= bench.verify(f"initial (context {i})", src, {"rsync": dst})
    return ok


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py push", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=5000, help="small files in the mirror tree (default 5,000)")
    ap.add_argument("--big", type=int, default=4, help="big files in the mirror tree (default 4)")
    ap.add_argument("--big-mib", type=int, default=64, help="size of each big file in MiB (default 64)")
    ap.add_argument("--noop-files", type=int, default=100_000,
                    help="files in the separate no-op tree (default 100,000; 0 skips that step)")
    ap.add_argument("--scan-first", action="store_true",
                    help="run `syncd scan -q` before `run --once` (timed together); run --once scans by itself")
    ap.add_argument("--syncd-first", action="store_true", help="run syncd before rsync in each step")
    ap.add_argument("--cold-mirrors", action="store_true",
                    help="before each step, drop both mirrors' files from the page cache (posix_fadvise), so "
                         "that neither tool reads its old copies from memory because of how it wrote them "
                         "(syncd writes large files around the cache, rsync through it)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the initial copy, alternating rsync and syncd, each into new mirrors; "
                         "its row shows the medians and every round (default 3)")
    ap.add_argument("--no-context", action="store_true",
                    help="skip the initial copy's context runs (rsync with --checksum-choice=sha1, "
                         "and with --fsync too)")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--dir", help="work directory parent (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    work = pathlib.Path(tempfile.mkdtemp(prefix="syncd-bench-push-", dir=args.dir))
    bench = None
    ok = True
    try:
        bench = Bench(work, args.scan_first)
        print(f"sshd pid {bench.sshd.pid} on {bench.sshd.host}:{bench.sshd.port}, relay on port {bench.relay.port}, "
              f"cipher {CIPHER}; work dir {work}")
        if bench.syncd_missing:
            print(f"syncd side unavailable: {bench.syncd_missing}")

        src, dst1, dst2 = work / "src", work / "dst-rsync", work / "dst-syncd"
        for d in (src, dst1, dst2):
            d.mkdir()
        dsts = {"rsync": dst1} if bench.syncd_missing else {"rsync": dst1, "syncd": dst2}
        tree = MirrorTree(src, args.seed)
        t0 = time.perf_counter()
        size = tree.generate(args.small, args.big, args.big_mib)
        print(f"mirror tree: {args.small} small files + {args.big} x {args.big_mib} MiB, {human(size)} "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        ini = bench.syncd_configs("mirror", src, dst2)

        for step in ("initial", "incremental", "no-op"):
            if step == "incremental":
                for line in tree.mutate():
                    print(f"  mutation: {line}")
            print(f"== {step}")
            if args.cold_mirrors:
                for d in dsts.values():
                    evict(d)
            bench.both(step, src, dst1, ini, args.syncd_first)
            ok &= bench.verify(step, src, dsts)
            if step == "initial" and not args.no_context:
                ok &= context(bench, src, work, 1)
            # More rounds of the initial copy, alternating, each into new
            # mirrors with a new primary state (so each is fed by a full
            # scan, as the first); the later steps go on from the first round.
            for r in range(2, args.rounds + 1) if step == "initial" else ():
                print(f"== {step}, round {r}")
                rdst1, rdst2 = work / f"dst-rsync-r{r}", work / f"dst-syncd-r{r}"
                for d in (rdst1, rdst2):
                    d.mkdir()
                bench.both(step, src, rdst1, bench.syncd_configs(f"mirror-r{r}", src, rdst2), args.syncd_first)
                ok &= bench.verify(step, src, {"rsync": rdst1} if bench.syncd_missing else
                                   {"rsync": rdst1, "syncd": rdst2})
                if not args.no_context:
                    ok &= context(bench, src, work, r)
            if step == "initial" and args.rounds > 1:
                bench.rows = merge_rounds(bench.rows, step)

        if args.noop_files > 0:
            nsrc, ndst1, ndst2 = work / "noop-src", work / "noop-dst-rsync", work / "noop-dst-syncd"
            for d in (nsrc, ndst1, ndst2):
                d.mkdir()
            t0 = time.perf_counter()
            nsize = flat_tree(nsrc, args.noop_files, seed=args.seed + 100, max_size=2048)
            print(f"no-op tree: {args.noop_files} files, {human(nsize)} (generated in {time.perf_counter() - t0:.1f} s)")
            nini = bench.syncd_configs("noop", nsrc, ndst2)
            label = f"{args.noop_files // 1000}k" if args.noop_files >= 1000 else str(args.noop_files)
            ndsts = {"rsync": ndst1} if bench.syncd_missing else {"rsync": ndst1, "syncd": ndst2}
            for step in (f"initial {label} (setup)", f"no-op {label}"):
                print(f"== {step}")
                bench.both(step, nsrc, ndst1, nini, args.syncd_first)
                ok &= bench.verify(step, nsrc, ndsts)

        print()
        print(f"push benchmark: syncd beside rsync -a --delete, one sshd, relay-counted TCP bytes "
              f"(up = to the mirror), {CIPHER}")
        print(report(bench.rows))
        print()
        print("targets:")
        for line in targets(bench.rows):
            print(line)
        if bench.context:
            print()
            print("context, not a target: the initial copy by rsync given what syncd guarantees")
            for line in context_lines(bench.context, bench.rows):
                print(line)
        if bench.syncd_missing:
            print(f"\nsyncd rows n/a: syncd run --once not available: {bench.syncd_missing}")
        if not ok:
            print("\nVERIFY FAILED: a copy differs from its source (see above)")
        return 0 if ok else 1
    finally:
        if bench:
            bench.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
