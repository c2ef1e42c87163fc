"""The state_dir lock: one writer of a manifest at a time.

An ``flock`` on ``state_dir/lock`` whose content is the holder's PID, so the
refusal can say who holds it.  The kernel drops the lock when its holder dies
(kill -9 included): there is never a stale lock to clean by hand.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import LockedError, ManifestError


class StateLock:
    def __init__(self, state_dir: Path, purpose: str = "syncd", *, wait: float = 0.0,
                 name: str = "lock") -> None:
        self.path = Path(state_dir) / name
        self.purpose = purpose
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "StateLock":
        """Take the lock; with ``wait``, keep trying that many seconds first."""
        import time

        deadline = time.monotonic() + self.wait
        while True:
            try:
                return self._try()
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _try(self) -> "StateLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise ManifestError(f"{self.path}: cannot open lock file: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
            os.close(fd)
            who = f"PID {holder[0]}" if holder else "another process"
            what = f" ({' '.join(holder[1:])})" if len(holder) > 1 else ""
            raise LockedError(f"{self.path.parent}: manifest is locked by {who}{what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Leave the file in place: unlinking it would race with a waiter
            # that opened the old inode.
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StateLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
