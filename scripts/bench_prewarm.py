#!/usr/bin/env python3
"""syncd prewarm beside an ``rsync -a`` initial copy over the same sshd (issue 6's measure).

    python scripts/bench.py prewarm [--small N] [--small-mib M] [--big K] [--big-mib M]
                                    [--streams 1,2,4] [--sibling] [--dir DIR] [--keep]

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
Target: prewarm wall time no worse than rsync's, better with streams > 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import sys
import tempfile

from benchutil import REPO, SYNCD, SshRig, compare_trees, human, listing, run_measured, table, write_ini

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
    def __init__(self, work: pathlib.Path) -> None:
        super().__init__(work)
        self.rows: list[list[object]] = []

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
        if m.returncode:
            print(f"  {tool} FAILED ({m.returncode}):\n{m.stdout[-2000:]}{m.stderr[-3000:]}")
            self.rows.append([tool, "FAILED", human(counts["up"]), human(counts["down"]), "", note])
            return
        problems, mtimes = compare_trees(expected, listing(dst))
        verdict = "equal" if not problems else "DIFFERS: " + "; ".join(problems[:3])
        if mtimes and not problems:
            verdict += f" ({mtimes} mtimes differ)"
        print(f"  {tool}: {m.wall:.2f} s, copy {verdict}")
        self.rows.append([tool, f"{m.wall:.2f}", human(counts["up"]), human(counts["down"]),
                          f"{m.maxrss / 2**20:.0f} MB", (note + " " + verdict).strip()])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py prewarm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=400)
    ap.add_argument("--small-mib", type=int, default=1)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--big-mib", type=int, default=100)
    ap.add_argument("--streams", default="0,1,2,4", help="0: the default chosen by prewarm")
    ap.add_argument("--sibling", action="store_true", help="also prewarm one edge from another edge")
    ap.add_argument("--dir", type=pathlib.Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",") if s]
    work = pathlib.Path(tempfile.mkdtemp(prefix="syncd-bench-prewarm-", dir=args.dir))
    src = work / "src"
    src.mkdir()
    print(f"work dir {work}")
    size = make_tree(src, args.small, args.small_mib, args.big, args.big_mib)
    print(f"tree: {args.small} x {args.small_mib} MiB + {args.big} x {args.big_mib} MiB = {human(size)}")
    expected = listing(src)
    bench = Bench(work)
    try:
        edges = [f"edge{n}" for n in streams] + (["edge-sib"] if args.sibling else [])
        ini = bench.primary_ini(src, edges)
        scan = run_measured([SYNCD, "-c", str(ini), "scan", "-q"]).check()
        print(f"  untimed scan of the primary: {scan.wall:.2f} s")

        dst = work / "rsync-dst"
        dst.mkdir()
        m, counts = bench.counted(["rsync", "-a", "-e", bench.ssh_command(), f"{src}/",
                                   f"{bench.sshd.user}@{bench.sshd.host}:{dst}/"])
        bench.row("rsync -a", m, counts, expected, dst)
        for n in streams:
            # 0: no --streams, the default chosen from the link and the cores.
            flag = ["--streams", str(n)] if n else []
            m, counts = bench.counted([sys.executable, "-m", "syncd", "-c", str(ini), "prewarm",
                                       f"edge{n}", *flag, "--from", "self"])
            chosen = next((ln.split("stream(s)")[0].split()[-1] for ln in m.stdout.splitlines()
                           if "prewarmed to generation" in ln), "?")
            label = f"syncd prewarm --streams {n}" if n else f"syncd prewarm (default: {chosen} stream(s))"
            bench.row(label, m, counts, expected, work / f"edge{n}" / "root")
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
    print(table(["tool", "wall s", "up", "down", "peak RSS", "note"], bench.rows, left=(0, -1)))
    base = next((float(r[1]) for r in bench.rows if r[0] == "rsync -a" and r[1] != "FAILED"), None)
    if base:
        print()
        for r in bench.rows[1:]:
            if r[1] != "FAILED":
                print(f"  {r[0]}: {float(r[1]) / base:.2f}x rsync's wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
