#!/usr/bin/env python3
"""syncd prewarm beside an ``rsync -a`` initial copy over the same sshd (issue 6's measure).

    python scripts/bench.py prewarm [--small N] [--small-mib M] [--big K] [--big-mib M]
                                    [--streams 1,2,4] [--rounds N] [--rtt MS] [--sibling] [--dir DIR]
                                    [--keep]

One sshd on 127.0.0.1 with a counting relay in front of it (tests/sshd.py,
tests/relay.py); every tool connects through the relay with aes128-gcm.  The
tree: N files of M MiB (default 400 x 1 MiB) and K files of M MiB (default
2 x 100 MiB), random bytes (nothing to compress).

Rows: ``rsync -a`` into an empty directory, then ``syncd prewarm`` of a new,
empty edge with each ``--streams`` value (0: prewarm's own default), forced to read from this node
(``--from self``); with ``--sibling``, one more prewarm whose source is an
edge filled by an earlier row (relayed through this node).  The primary's
root is scanned once before the first row, untimed: the daemon keeps the
manifest current, so a prewarm normally starts with nothing to hash.  Each
row starts after ``sync``.  After each row the copy is compared with the
source (path, kind, mode, size, SHA-256), outside the timing.

``--rounds N`` (default 3) runs every row N times, in alternation (rsync, then
each prewarm, then rsync again ...), each into a new empty directory or edge,
and reports each row's median and every round's time: on a shared 2-core VM
one run of the same copy varies by 20% or more between minutes, so a single
round cannot tell 5% apart.  Nothing is deleted before the end (freeing a
large tree slows the next file creations of either tool for a minute).
``--rtt MS`` makes the relay hold each direction for MS/2: a link with a
round-trip time, where one SSH stream is held back by its channel window
(OpenSSH's 2 MiB: about 100 MB/s at 20 ms) and more streams are what fill it.
Target: prewarm wall time no worse than rsync's, better with streams > 1
(both read on the medians; the rounds won are shown beside them).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import sys
import tempfile

from benchutil import (REPO, SYNCD, SshRig, compare_trees, human, listing, median, run_measured, table,
                       write_ini)

sys.path.insert(0, str(REPO))



def make_tree(root: pathlib.Path, small: int, small_mib: int, big: int, big_mib: int) -> int:
    total = 0
    for i in range(small):
        d = root / "pool" / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        data = os.urandom(small_mib << 20)
        (d / f"pkg{i:04d}.deb").write_bytes(data)
        total += len(data)
    (root / "iso").mkdir(parents=True, exist_ok=True)
    for i in range(big):
        with open(root / "iso" / f"image{i}.iso", "wb") as fh:
            for _ in range(big_mib):
                fh.write(os.urandom(1 << 20))
        total += big_mib << 20
    return total


class Bench(SshRig):
    def __init__(self, work: pathlib.Path, rtt: float) -> None:
        super().__init__(work, rtt)
        # label -> one dict per round (wall None: failed), in the order first run
        self.runs: dict[str, list[dict]] = {}

    def counted(self, argv: list[str]):  # noqa: ANN201
        os.sync()
        self.relay.reset_counts()
        m = run_measured(argv)
        return m, self.settled_counts()

    def primary_ini(self, src: pathlib.Path, edges: list[str]) -> pathlib.Path:
        mirrors = {}
        for name in edges:
            edge_ini = write_ini(self.work / f"{name}.ini", name, self.work / name / "root", self.work / name / "state")
            (self.work / name / "root").mkdir(parents=True, exist_ok=True)
            command = " ".join(shlex.quote(x) for x in [sys.executable, "-m", "syncd", "agent", "--config",
                                                         str(edge_ini)])
            mirrors[name] = dict(host=self.sshd.host, port=self.relay.port, user=self.sshd.user,
                                 identity_file=self.sshd.identity_file, known_hosts=self.known_hosts,
                                 remote_command=command)
        return write_ini(self.work / "primary.ini", "primary", src, self.work / "state-primary", mirrors=mirrors)

    def row(self, tool: str, m, counts: dict, expected: dict, dst: pathlib.Path, note: str = "") -> None:  # noqa: ANN001
        runs = self.runs.setdefault(tool, [])
        if m.returncode:
            print(f"  {tool} FAILED ({m.returncode}):\n{m.stdout[-2000:]}{m.stderr[-3000:]}")
            runs.append(dict(wall=None, up=counts["up"], down=counts["down"], rss=None, note=(note + " FAILED").strip()))
            return
        problems, mtimes = compare_trees(expected, listing(dst))
        verdict = "equal" if not problems else "DIFFERS: " + "; ".join(problems[:3])
        if mtimes and not problems:
            verdict += f" ({mtimes} mtimes differ)"
        print(f"  round {len(runs) + 1}: {tool}: {m.wall:.2f} s, copy {verdict}")
        runs.append(dict(wall=m.wall, up=counts["up"], down=counts["down"], rss=m.maxrss,
                         note=(note + " " + verdict).strip()))

    def report(self) -> str:
        rows = []
        for tool, runs in self.runs.items():
            walls = [r["wall"] for r in runs if r["wall"] is not None]
            notes = sorted({r["note"] for r in runs})
            rss = [r["rss"] for r in runs if r["rss"] is not None]
            rows.append([tool, f"{median(walls):.2f}" if len(walls) == len(runs) else "FAILED",
                         " ".join(f"{w:.2f}" for w in walls), human(median([r["up"] for r in runs])),
                         human(median([r["down"] for r in runs])), f"{max(rss) / 2**20:.0f} MB" if rss else "",
                         "; ".join(notes)])
        return table(["tool", "median s", "rounds s", "up", "down", "peak RSS", "note"], rows, left=(0, 2, -1))

    def medians(self) -> dict[str, float]:
        """label -> median wall, for the rows that never failed."""
        return {tool: median([r["wall"] for r in runs]) for tool, runs in self.runs.items()
                if runs and all(r["wall"] is not None for r in runs)}

    def won(self, tool: str, against: str) -> str:
        """In how many rounds ``tool`` was faster than ``against``."""
        pairs = [(a["wall"], b["wall"]) for a, b in zip(self.runs.get(tool, []), self.runs.get(against, []))
                 if a["wall"] is not None and b["wall"] is not None]
        return f"{sum(1 for a, b in pairs if a < b)} of {len(pairs)} rounds"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py prewarm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=400)
    ap.add_argument("--small-mib", type=int, default=1)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--big-mib", type=int, default=100)
    ap.add_argument("--streams", default="0,1,2,4", help="0: the default chosen by prewarm")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every row this many times, alternating, and report medians (default 3)")
    ap.add_argument("--sibling", action="store_true", help="also prewarm one edge from another edge")
    ap.add_argument("--rtt", type=float, default=0.0,
                    help="milliseconds of round-trip time the relay adds (half each way; default 0)")
    ap.add_argument("--dir", type=pathlib.Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    streams = [int(s) for s in args.streams.split(",") if s]
    work = pathlib.Path(tempfile.mkdtemp(prefix="syncd-bench-prewarm-", dir=args.dir))
    src = work / "src"
    src.mkdir()
    print(f"work dir {work}")
    size = make_tree(src, args.small, args.small_mib, args.big, args.big_mib)
    print(f"tree: {args.small} x {args.small_mib} MiB + {args.big} x {args.big_mib} MiB = {human(size)}")
    expected = listing(src)
    bench = Bench(work, args.rtt / 1000)
    if args.rtt:
        print(f"link: the relay adds {args.rtt:g} ms of round-trip time (a copying relay, not splice)")
    try:
        rounds = range(1, args.rounds + 1)
        edges = [f"edge{n}-r{r}" for r in rounds for n in streams] + (["edge-sib"] if args.sibling else [])
        ini = bench.primary_ini(src, edges)
        scan = run_measured([SYNCD, "-c", str(ini), "scan", "-q"]).check()
        print(f"  untimed scan of the primary: {scan.wall:.2f} s")

        for r in rounds:
            dst = work / f"rsync-dst-r{r}"
            dst.mkdir()
            m, counts = bench.counted(["rsync", "-a", "-e", bench.ssh_command(), f"{src}/",
                                       f"{bench.sshd.user}@{bench.sshd.host}:{dst}/"])
            bench.row("rsync -a", m, counts, expected, dst)
            for n in streams:
                # 0: no --streams, the default chosen from the link and the cores.
                flag = ["--streams", str(n)] if n else []
                m, counts = bench.counted([sys.executable, "-m", "syncd", "-c", str(ini), "prewarm",
                                           f"edge{n}-r{r}", *flag, "--from", "self"])
                chosen = next((ln.split("stream(s)")[0].split()[-1] for ln in m.stdout.splitlines()
                               if "prewarmed to generation" in ln), "?")
                label = f"syncd prewarm --streams {n}" if n else "syncd prewarm (default streams)"
                bench.row(label, m, counts, expected, work / f"edge{n}-r{r}" / "root",
                          note="" if n else f"{chosen} stream(s);")
        if args.sibling:
            m, counts = bench.counted([sys.executable, "-m", "syncd", "-c", str(ini), "prewarm",
                                       "edge-sib", "--streams", str(max(streams))])
            chosen = next((ln.split(" from ")[1].split()[0] for ln in m.stdout.splitlines()
                           if "prewarmed to generation" in ln), "?")
            bench.row(f"syncd prewarm --streams {max(streams)} (probed)", m, counts, expected,
                      work / "edge-sib" / "root", note=f"source {chosen};")
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(bench.report())
    med = bench.medians()
    base = med.get("rsync -a")
    if base:
        print()
        for tool, wall in med.items():
            if tool != "rsync -a":
                print(f"  {tool}: {wall / base:.2f}x rsync's wall time (median of {len(bench.runs[tool])}; "
                      f"faster than rsync in {bench.won(tool, 'rsync -a')})")
    one = "syncd prewarm --streams 1"
    if one in med:
        for tool, wall in med.items():
            if tool.startswith("syncd prewarm --streams ") and tool != one and "probed" not in tool:
                print(f"  {tool} against --streams 1: {wall / med[one]:.2f}x (faster in {bench.won(tool, one)})")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
