"""Throughput of the final verify pass (syncd.verify.hash_files) beside sha256sum.

    python scripts/bench.py verify [--size-mib N] [--small-kib K] [--dir DIR] [--repeat R] [--sweep]

Creates N MiB of files (about 60% in 100 MiB files, the rest in 1 MiB files
or --small-kib, as a mirror's ISOs and packages), reads them once so the page cache holds
them, then hashes the same files with hash_files (1 and 2 workers), with
hashlib.file_digest in one thread, and with one `sha256sum` process over all
of them.  Best of R round-robin rounds; the machine may be shared, so
compare ratios.
"cores used" is CPU seconds over wall seconds: about 2 for workers=2 when
both cores are free.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from syncd.verify import default_workers, hash_files

MiB = 1 << 20


def make_files(root: Path, size_mib: int, small_kib: int = 1024) -> list[Path]:
    big = max(0, (size_mib * 6 // 10) // 100)
    small = (size_mib - 100 * big) * 1024 // small_kib
    chunk = os.urandom(4 * MiB)
    paths = []
    for i in range(big):
        p = root / f"iso/big{i:02d}.iso"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            for j in range(25):
                # Distinct content per 4 MiB so no layer can shortcut repeats.
                f.write(i.to_bytes(4, "little") + j.to_bytes(4, "little") + chunk[8:])
        paths.append(p)
    for i in range(small):
        p = root / f"pool/{i % 16:x}/pkg{i:05d}.deb"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(i.to_bytes(8, "little") + chunk[8 + i % 1000: small_kib * 1024 + i % 1000])
        paths.append(p)
    return paths


def warm(paths: list[Path]) -> None:
    buf = bytearray(MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cpu_seconds() -> float:
    # This process's threads plus finished children (sha256sum).
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (all threads and children), and fn's result."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, cpu_seconds() - c0, result


def run_sha256sum(paths: list[Path]) -> dict[Path, bytes]:
    out = subprocess.run(["sha256sum", "--", *map(str, paths)], capture_output=True, check=True).stdout
    digests = {}
    for line in out.decode().splitlines():
        hexd, _, name = line.partition("  ")
        digests[Path(name)] = bytes.fromhex(hexd)
    return digests


def run_file_digest(paths: list[Path]) -> dict[Path, bytes]:
    digests = {}
    for p in paths:
        with open(p, "rb") as f:
            digests[p] = hashlib.file_digest(f, "sha256").digest()
    return digests


def run_hash_files(paths: list[Path], workers: int, buffer_size: int = MiB) -> dict[Path, bytes]:
    return dict(hash_files(paths, workers=workers, buffer_size=buffer_size))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py verify", description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="total size of the files (default 1024)")
    ap.add_argument("--dir", type=Path, default=None, help="where to create them (default: a temp dir)")
    ap.add_argument("--small-kib", type=int, default=1024, help="size of the small files (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all measures, best kept (default 3)")
    ap.add_argument("--sweep", action="store_true", help="also compare buffer sizes with 1 worker")
    args = ap.parse_args(argv)
    if shutil.which("sha256sum") is None:
        print("bench verify: sha256sum not found", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="syncd-bench-verify-", dir=args.dir)
    try:
        root = Path(tmp)
        paths = make_files(root, args.size_mib, args.small_kib)
        total = sum(p.stat().st_size for p in paths)
        warm(paths)
        big = sum(1 for p in paths if p.stat().st_size > 10 * MiB)
        print(f"{len(paths)} files ({big} x 100 MiB, {len(paths) - big} x {args.small_kib} KiB), "
              f"{total / MiB:.0f} MiB, "
              f"page cache warm; cores: {os.cpu_count()}, default workers: {default_workers()}; "
              f"best of {args.repeat} rounds")

        measures = [("sha256sum (one process)", lambda: run_sha256sum(paths)),
                    ("hashlib.file_digest, 1 thread", lambda: run_file_digest(paths)),
                    ("hash_files workers=1", lambda: run_hash_files(paths, 1)),
                    ("hash_files workers=2", lambda: run_hash_files(paths, 2))]
        if args.sweep:
            for kib in (64, 1024, 4096):
                measures.append((f"hash_files workers=1 buf={kib}K",
                                 lambda kib=kib: run_hash_files(paths, 1, kib * 1024)))
        # Round-robin, best of the rounds: load from others shifts during a
        # run, and should not favour whichever method ran in a quiet moment.
        best = {label: (float("inf"), 0.0) for label, _ in measures}
        ref = None
        for _ in range(args.repeat):
            for label, fn in measures:
                t, c, got = timed(fn)
                if ref is None:
                    ref = got
                elif got != ref:
                    print(f"bench verify: {label} disagrees with sha256sum", file=sys.stderr)
                    return 1
                best[label] = min(best[label], (t, c))
        rows = [(label, *best[label]) for label, _ in measures]

        base = rows[0][1]
        print(f"{'method':<34} {'seconds':>8} {'MB/s':>8} {'vs sha256sum':>13} {'cores used':>11}")
        for label, t, c in rows:
            print(f"{label:<34} {t:8.3f} {total / t / 1e6:8.0f} {base / t:12.2f}x {c / t:11.2f}")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine lowers "
              "the 2-worker figure)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
