"""Debian-style trace files: when this mirror last completed a sync.

Debian's mirror tooling (ftpsync) leaves a small text file per mirror under
``project/trace/`` in the served tree, and mirror checkers fetch it over HTTP
to see how fresh a mirror is.  They read the first line as the date, in the
format of ``date -u``; the ``Key: value`` lines after it are informative.
syncd writes the same file for a node, after each generation it commits::

    Sun Nov 22 12:45:03 UTC 2026
    Date: Sun, 22 Nov 2026 12:45:03 +0000
    Date-Started: Sun, 22 Nov 2026 12:45:02 +0000
    Archive serial: 42
    Creator: syncd 0.1.0
    Running on host: mirror1.example.net
    Upstream-mirror: primary
    Generation: 42

The path is ``[node] trace_dir`` (default ``project/trace``) relative to
root, plus the node's name; nothing is written unless ``[node] trace`` is on.
The file is written in ``state_dir/staging`` and renamed into root through
``SafeRoot.publish``, so a reader never sees it partial (docs/design.md,
"The agent's staging"), and a temporary left by a killed agent is a ``tmp.*`` name the agent
removes at its next start.

The trace file is not in the manifest (the upstream does not have it), so
the agent must not delete it in a full comparison: ``protects`` says which
paths to keep.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from . import __version__
from .errors import SyncdError

if TYPE_CHECKING:
    from .config import Config
    from .fsops import SafeRoot

log = logging.getLogger(__name__)

# English names, whatever the locale: checkers parse them.
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def trace_path(cfg: "Config") -> bytes:
    """The trace file's path relative to root."""
    return os.fsencode(f"{cfg.node.trace_dir}/{cfg.node.name}")


def protects(cfg: "Config", path: bytes) -> bool:
    """True if deleting ``path`` (relative to root) would remove this node's trace file.

    The trace file itself and every directory above it: a full comparison
    against an upstream without ``project/`` must not take the trace with it.
    """
    if not cfg.node.trace:
        return False
    mine = trace_path(cfg)
    return path == mine or mine.startswith(path + b"/")


def date_u(t: float) -> str:
    """``t`` as ``LC_ALL=C date -u`` prints it: ``Sun Nov  2 09:05:01 UTC 2026``."""
    tm = time.gmtime(t)
    return (f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} UTC {tm.tm_year}")


def rfc2822(t: float) -> str:
    tm = time.gmtime(t)
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000")


def render(*, generation: int, upstream: str, started: float, finished: float, host: str | None = None) -> bytes:
    """The trace file's content (times in seconds since the epoch)."""
    lines = [
        date_u(finished),
        f"Date: {rfc2822(finished)}",
        f"Date-Started: {rfc2822(started)}",
        f"Archive serial: {generation}",
        f"Creator: syncd {__version__}",
        f"Running on host: {host if host is not None else socket.getfqdn()}",
        f"Upstream-mirror: {upstream}",
        f"Generation: {generation}",
    ]
    return ("\n".join(_one_line(x) for x in lines) + "\n").encode("utf-8")


def _one_line(text: str) -> str:
    # A name from the wire must not add lines a checker would misread.  Only
    # line breaks go: the runs of spaces ``date -u`` prints (``Mon Dec  7``)
    # are what checkers compare against.
    return " ".join(text.splitlines()) if text else text


def write(root: "SafeRoot", staging_fd: int, rel: bytes, content: bytes) -> None:
    """Write ``content`` to ``rel`` in root: staged, fsynced, renamed into place."""
    tmp = f"tmp.trace.{os.getpid()}.{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=staging_fd)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)  # whatever the umask: the file is served
            os.fsync(fd)
        finally:
            os.close(fd)
        root.publish(staging_fd, tmp.encode(), rel)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=staging_fd)
        except FileNotFoundError:
            pass
        raise
    parent = rel.rpartition(b"/")[0]
    root.sync_dir(parent)


def after_commit(cfg: "Config", root: "SafeRoot", staging_fd: int, *, generation: int, upstream: str,
                 started_monotonic: float) -> bool:
    """Write this node's trace file once a generation is published, if enabled.

    The agent calls it at the end of its commit, after the last change of
    any other entry of root and before it puts the directories' times back
    (its own directory's among them) and records the generation.  A failure
    is logged, not raised: everything is published already, and a stale
    trace only makes the mirror look older.  Returns True if the trace was
    written.
    """
    if not cfg.node.trace:
        return False
    now = time.time()
    started = now - max(0.0, time.monotonic() - started_monotonic)
    rel = trace_path(cfg)
    try:
        write(root, staging_fd, rel, render(generation=generation, upstream=upstream, started=started,
                                            finished=now))
    except (OSError, SyncdError) as err:
        log.warning("%s: cannot write trace file %s: %s", cfg.node.name, os.fsdecode(rel), err)
        return False
    return True


__all__ = ["after_commit", "date_u", "protects", "render", "rfc2822", "trace_path", "write"]
