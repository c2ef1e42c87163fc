#!/usr/bin/env python3
"""Scan beside find on the same tree, in one run (issue 2's measure).

    python scripts/bench.py scan [--files N] [--per-dir N] [--repeat R] [--dir DIR] [--keep]

Generates N files (default 100,000: 100 directories of 1,000 files of 0-8 KiB
random bytes), then runs, each as its own process:

  syncd first scan    ``syncd -c INI scan -q`` on an empty manifest: hashes everything
  syncd rescan        the same with nothing changed (median of R runs)
  syncd start-up      ``syncd --version``: the interpreter's share of each run
  find                ``find ROOT -printf '%s %T@\\n' > /dev/null`` warm (median of R runs)

Rescans and finds alternate, so a noisy neighbour hits both alike.  Peak RSS
is per process (``/usr/bin/time -f %M``, else ``os.wait4``).  "in-process" is
syncd's own timing from its summary line ("hashed in X s"); wall minus that is
the interpreter start-up, imports and manifest open/commit.
Target: no-change rescan within 3x of find, memory under 200 MB.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys
import tempfile
import time

from benchutil import SYNCD, TIME, flat_tree, human, median, own_maxrss, run_measured, table, write_ini

TARGET_RATIO = 3.0
TARGET_RSS = 200 << 20
_IN_PROCESS = re.compile(r"hashed in ([0-9.]+) s")


def _in_process(stdout: str) -> float | None:
    m = _IN_PROCESS.search(stdout)
    return float(m.group(1)) if m else None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="files in the tree (default 100,000)")
    ap.add_argument("--per-dir", type=int, default=1000, help="files per directory (default 1,000)")
    ap.add_argument("--repeat", type=int, default=3, help="rescans and finds to take the median of")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    work = pathlib.Path(tempfile.mkdtemp(prefix="syncd-bench-scan-", dir=args.dir))
    try:
        root = work / "root"
        state = work / "state"  # same filesystem as root, not inside it
        root.mkdir()
        t0 = time.perf_counter()
        size = flat_tree(root, args.files, per_dir=args.per_dir)
        print(f"tree: {args.files} files, {human(size)} in {root} (generated in {time.perf_counter() - t0:.1f} s)")
        ini = write_ini(work / "sync.ini", "bench", root, state)

        scan = [SYNCD, "-c", str(ini), "scan", "-q"]
        find = ["find", str(root), "-printf", r"%s %T@\n"]

        startup = run_measured([SYNCD, "--version"]).check()
        first = run_measured(scan).check()
        print(f"first scan:  {first.stdout.strip()}")
        run_measured(find, stdout_to_null=True).check()  # warm the dentry and inode caches

        rescans, finds = [], []
        for _ in range(max(1, args.repeat)):
            rescans.append(run_measured(scan).check())
            finds.append(run_measured(find, stdout_to_null=True).check())
        print(f"rescan:      {rescans[-1].stdout.strip()}")
        if "unchanged" not in rescans[-1].stdout:
            print("WARNING: the rescan reported changes on an unchanged tree", file=sys.stderr)

        find_wall = median([m.wall for m in finds])
        rescan_wall = median([m.wall for m in rescans])
        rescan_inproc = median([v for m in rescans if (v := _in_process(m.stdout)) is not None] or [float("nan")])

        def row(step: str, wall: float, rss: int, inproc: float | None) -> list[object]:
            return [step, f"{wall:.3f}", f"{rss / 2**20:.0f}", f"{wall / find_wall:.2f}x",
                    "" if inproc is None else f"{inproc:.3f}",
                    "" if inproc is None else f"{wall - inproc:.3f}"]

        rows = [
            row("syncd first scan (hash all)", first.wall, first.maxrss, _in_process(first.stdout)),
            row(f"syncd rescan, no change (median of {len(rescans)})", rescan_wall,
                max(m.maxrss for m in rescans), rescan_inproc),
            row("syncd start-up (--version)", startup.wall, startup.maxrss, None),
            row(f"find -printf '%s %T@' warm (median of {len(finds)})", find_wall,
                max(m.maxrss for m in finds), None),
        ]
        print()
        print(f"scan benchmark: {args.files} files, {human(size)}; all runs: "
              f"rescan {', '.join(f'{m.wall:.3f}' for m in rescans)} s, "
              f"find {', '.join(f'{m.wall:.3f}' for m in finds)} s")
        print(table(["step", "wall s", "peak RSS MB", "ratio to find", "in-process s",
                     "start-up+imports+open s"], rows))
        ratio = rescan_wall / find_wall
        rss = max(m.maxrss for m in (first, *rescans))
        print()
        print(f"target: no-change rescan within {TARGET_RATIO:.0f}x of find: {ratio:.2f}x "
              f"({'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
              f"peak RSS under {TARGET_RSS >> 20} MB: {rss / 2**20:.0f} MB "
              f"({'met' if rss < TARGET_RSS else 'NOT met'})")
        if TIME:
            print("(peak RSS per process from /usr/bin/time -f %M)")
        else:
            print(f"(peak RSS from os.wait4: includes this script's own {own_maxrss() / 2**20:.0f} MB "
                  "high-water mark, which Linux carries into each child)")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
