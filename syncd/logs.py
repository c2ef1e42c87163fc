"""Where syncd's log goes and how it looks, and at which level.

One handler on stderr.  Under systemd (``JOURNAL_STREAM`` names the stream
stderr is) each line starts with its syslog priority as ``<N>``, the prefix
journald reads (sd-daemon(3)), and carries no time: the journal stamps it.
Elsewhere a line is ``TIME LEVEL LOGGER: message``.

The level: the daemon (``syncd run``) starts from ``[node] log_level``
(default ``info``: one line per scan and per push); the other commands
print their report on stdout and start from ``warning``, so that the report
is not said twice; the agent's stderr is read by its pusher, which quotes
its last line in an error.  Each ``-v`` moves one step towards ``debug``,
each ``-q`` one towards ``error``; errors are never hidden.
"""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities, for journald's "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_STEPS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)

# The loggers of syncd's own modules; libraries (paramiko, apscheduler,
# watchdog) log at WARNING and above whatever syncd's level.
_OURS = "syncd"


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``: the priority prefix on every line, for a
    multi-line record (a traceback) becomes one journal entry per line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The agent's stderr reaches its pusher, which quotes the last line after
# an error of its own: the pusher's log gives the time.
AGENT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (systemd.exec(5),
    ``$JOURNAL_STREAM``: its device and inode), not merely inherited from a
    unit by a child that redirected it."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def level_for(base: str, verbosity: int) -> int:
    """``base`` (a LEVELS name) moved ``verbosity`` steps: -v's count minus -q's."""
    i = _STEPS.index(LEVELS[base]) - verbosity
    return _STEPS[max(0, min(len(_STEPS) - 1, i))]


def setup(level: int, *, agent: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(AGENT_FORMAT if agent else PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    set_level(level)


def set_level(level: int) -> None:
    """syncd's own level (the daemon's config is read after the command line)."""
    logging.getLogger(_OURS).setLevel(level)


__all__ = ["LEVELS", "JournalFormatter", "level_for", "set_level", "setup", "stderr_is_journal"]
