#!/usr/bin/env python3
"""Benchmarks, side by side with the tools syncd replaces, in one run.

    python scripts/bench.py NAME [options]     NAME: scan, delta, verify, ...
    python scripts/bench.py list

Each NAME lives in scripts/bench_NAME.py and exposes ``main(argv) -> int``;
it prints one table of ratios (syncd beside rsync, rdiff, find, sha256sum ...).
Benchmarks report; tests assert behaviour.
"""

from __future__ import annotations

import compileall
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip())
        print("available:", ", ".join(names))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"bench.py: unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    # Bytecode as an install leaves it: with stale .pyc files (an edited
    # checkout run with PYTHONDONTWRITEBYTECODE set, or a read-only one),
    # every syncd started would compile the changed modules again, 5-20 ms
    # a start that no installed syncd pays.
    compileall.compile_dir(str(HERE.parent / "syncd"), quiet=1)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    module = importlib.import_module(f"bench_{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
