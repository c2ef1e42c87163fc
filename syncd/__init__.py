"""syncd: incremental mirror synchronization daemon."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from typing import Iterator

__version__ = "0.1.0"

# The delta engine uses numpy's element-wise kernels, never BLAS.  OpenBLAS
# otherwise starts a thread per core at numpy's import, and those threads
# spin: on the 2-core benchmark host they took 0.1-0.3 s of CPU from the
# push they sat beside.  An operator's own setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def import_in_background(*names: str) -> threading.Thread | None:
    """Import modules in a daemon thread while the caller waits on something
    else (the network), so that their first use does not pay for it; None
    when all are imported already.  Join the thread before the process may
    exit: an interpreter must not end in the middle of an import."""
    missing = [n for n in names if n not in sys.modules]
    if not missing:
        return None

    def run() -> None:
        import importlib

        for name in missing:
            importlib.import_module(name)

    thread = threading.Thread(target=run, name="import-" + ",".join(missing), daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (reference counting still frees
    almost everything a push makes).  A push keeps tens of thousands of rows
    alive, and each full collection walks them all: in a 5,000-file initial
    copy they took 0.15-0.23 s of the agent's one-threaded commit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
