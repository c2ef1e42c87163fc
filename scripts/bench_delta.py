#!/usr/bin/env python3
"""Delta engine beside librsync's rdiff, on the same file pairs, in one run.

    python scripts/bench.py delta [--size-mib N] [--dir DIR] [--keep] [--no-verify]

Cases (old file: N MiB of random bytes):
  changed    1% of the 4 KiB blocks overwritten at random
  inserted   1,000 bytes inserted in the middle
  unrelated  a different random file of the same size

Each tool runs in its own process, so peak RSS is per measurement (read by
/usr/bin/time).  Throughput is new-file MB per second of signature + delta time
(both tools read old and new from the page cache).  syncd's delta is then
patched in the same process and checked against the new file's SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHUNK = 1 << 20
CASES = ("changed", "inserted", "unrelated")
#: Extra syncd rows: the delta with its SHA-256 computed and embedded (the
#: push layer normally passes the manifest's digest to the patcher instead),
#: and the unrelated case with the bail-out disabled (pure rolling speed).
VARIANTS = ("default", "sha", "no-bail")
EXTRA = {"changed": "sha", "unrelated": "no-bail"}


def make_files(directory: str, size: int) -> dict[str, str]:
    import numpy as np

    rng = np.random.default_rng(20261122)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    paths = {name: os.path.join(directory, name) for name in ("old", *CASES)}
    old.tofile(paths["old"])

    changed = old.copy()
    blocks = size // 4096
    picked = rng.choice(blocks, size=max(1, blocks // 100), replace=False)
    for b in picked:
        changed[b * 4096 : (b + 1) * 4096] = rng.integers(0, 256, 4096, dtype=np.uint8)
    changed.tofile(paths["changed"])
    del changed

    mid = size // 2
    with open(paths["inserted"], "wb") as f:
        f.write(old[:mid].tobytes())
        f.write(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
        f.write(old[mid:].tobytes())

    rng.integers(0, 256, size, dtype=np.uint8).tofile(paths["unrelated"])
    return paths


def run_measured(argv: list[str]) -> tuple[float, int, bytes]:
    """Run a command; return wall seconds, peak RSS in bytes, stdout.

    Peak RSS comes from /usr/bin/time, not from wait4 here: Linux carries a
    parent's high-water mark into a forked child, and this process held the
    generated files in memory.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv], stdout=subprocess.PIPE)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
        rss_kib = int(rss_file.read().split()[-1])
    return wall, rss_kib * 1024, proc.stdout


def rdiff_case(old: str, new: str, directory: str, block: int | None) -> dict:
    sig = os.path.join(directory, "rdiff.sig")
    delta = os.path.join(directory, "rdiff.delta")
    for path in (sig, delta):
        if os.path.exists(path):
            os.unlink(path)
    bs = [] if block is None else ["-b", str(block)]
    t_sig, rss_sig, _ = run_measured(["rdiff", *bs, "signature", old, sig])
    t_delta, rss_delta, _ = run_measured(["rdiff", "delta", sig, new, delta])
    return {
        "seconds": t_sig + t_delta,
        "delta_bytes": os.path.getsize(delta),
        "rss": max(rss_sig, rss_delta),
        "block": block if block is not None else "default",
    }


def read_chunks(path: str):
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return
            yield chunk


def worker(old: str, new: str, verify: bool, variant: str) -> int:
    """One syncd measurement, in its own process; prints a JSON line."""
    from syncd.delta import DeltaParams, DeltaStats, Patcher, iter_delta, make_signature

    params = DeltaParams(bail_run=1 << 62) if variant == "no-bail" else DeltaParams()
    embed = variant == "sha"

    size = os.path.getsize(old)
    t0 = time.perf_counter()
    sig = make_signature(read_chunks(old), file_size=size)
    t1 = time.perf_counter()
    stats = DeltaStats()
    delta_size = 0
    pieces_path = os.path.join(os.path.dirname(new), "syncd.delta")
    with open(pieces_path, "wb") as out:
        for piece in iter_delta(sig, read_chunks(new), stats=stats, params=params, embed_sha256=embed):
            delta_size += len(piece)
            out.write(piece)
    t2 = time.perf_counter()
    result = {
        "sig_seconds": t1 - t0,
        "delta_seconds": t2 - t1,
        "delta_bytes": delta_size,
        "block": sig.block_size,
        "bailed_out": stats.bailed_out,
        "matched": stats.matched_bytes,
        "literal": stats.literal_bytes,
    }
    if verify:
        # The push layer has the new file's SHA-256 from its manifest; here it
        # is computed outside the timed part.
        want = hashlib.sha256()
        for chunk in read_chunks(new):
            want.update(chunk)
        fd = os.open(old, os.O_RDONLY)
        sink = hashlib.sha256()
        patcher = Patcher(lambda off, n: os.pread(fd, n, off), size, sink.update)
        t3 = time.perf_counter()
        for chunk in read_chunks(pieces_path):
            patcher.feed(chunk)
        try:
            patcher.finish(want.digest())
            result["verified"] = True
        except Exception:
            result["verified"] = False
        result["patch_seconds"] = time.perf_counter() - t3
        os.close(fd)
    print(json.dumps(result))
    return 0


def syncd_case(old: str, new: str, verify: bool, variant: str = "default") -> dict:
    here = os.path.abspath(__file__)
    argv = [sys.executable, here, "--worker", old, new, "--variant", variant] + ([] if verify else ["--no-verify"])
    _, rss, out = run_measured(argv)
    result = json.loads(out)
    result["seconds"] = result["sig_seconds"] + result["delta_seconds"]
    result["rss"] = rss
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py delta", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="where to put the test files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the test files")
    parser.add_argument("--no-verify", action="store_true", help="skip patching syncd's delta back")
    parser.add_argument("--worker", nargs=2, metavar=("OLD", "NEW"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker, verify=not args.no_verify, variant=args.variant)
    if shutil.which("rdiff") is None:
        print("bench.py delta: rdiff not found (Debian package rdiff)", file=sys.stderr)
        return 2

    size = args.size_mib << 20
    directory = tempfile.mkdtemp(prefix="syncd-bench-delta-", dir=args.dir)
    try:
        t = time.perf_counter()
        paths = make_files(directory, size)
        print(f"# {args.size_mib} MiB files generated in {time.perf_counter() - t:.1f} s in {directory}")
        print(f"# load average before: {os.getloadavg()[0]:.2f} (machine shared: ratios matter, not absolutes)")
        rows = []
        for case in CASES:
            ours = syncd_case(paths["old"], paths[case], verify=not args.no_verify)
            block = ours["block"]
            same = rdiff_case(paths["old"], paths[case], directory, block)
            default = rdiff_case(paths["old"], paths[case], directory, None)
            note = "bailed out" if ours["bailed_out"] else ""
            if "verified" in ours:
                note = ", ".join(filter(None, [note, "patch ok" if ours["verified"] else "PATCH MISMATCH"]))
            group = [(case, "syncd", block, ours, note)]
            if case in EXTRA:
                variant = EXTRA[case]
                extra = syncd_case(paths["old"], paths[case], verify=False, variant=variant)
                group.append((case, f"syncd {variant}", block, extra, "bailed out" if extra["bailed_out"] else ""))
            group.append((case, "rdiff -b", block, same, ""))
            group.append((case, "rdiff", "default", default, ""))
            rows.append(group)
        print()
        header = f"{'case':<10} {'tool':<15} {'block':>7} {'MB/s':>8} {'delta bytes':>13} {'vs rdiff -b':>11} {'peak RSS MB':>11}  note"
        print(header)
        print("-" * len(header))
        for group in rows:
            ref = next(r for _, tool, _, r, _ in group if tool == "rdiff -b")
            for case, tool, block, r, note in group:
                mbps = size / r["seconds"] / 1e6
                ratio = r["delta_bytes"] / ref["delta_bytes"]
                print(
                    f"{case:<10} {tool:<15} {block!s:>7} {mbps:8.0f} {r['delta_bytes']:13,d} {ratio:11.4f} "
                    f"{r['rss'] / 1e6:11.1f}  {note}"
                )
        print()
        for case, tool, _, r, _ in (row for group in rows for row in group):
            if tool.startswith("syncd"):
                extra = f", patch {r['patch_seconds']:.2f} s" if "patch_seconds" in r else ""
                print(f"# {case}: {tool} signature {r['sig_seconds']:.2f} s, delta {r['delta_seconds']:.2f} s{extra}")
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
