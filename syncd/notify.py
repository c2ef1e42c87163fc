"""The systemd notification protocol (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd hands the service a datagram socket in
``$NOTIFY_SOCKET``: a filesystem path, or an abstract socket written with a
leading ``@``.  Each notification is one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` ...).
Outside systemd the variable is unset and every call here is a cheap no-op
returning False, so the daemon calls these unconditionally.

A failed send is logged and swallowed: losing a status line must never stop
a sync.  (A lost ``WATCHDOG=1`` is another matter, but systemd will notice
that by itself.)
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address() -> str | bytes | None:
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return None
    if raw.startswith("@"):
        # Linux abstract namespace: the name starts with a NUL byte on the wire.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock:... and other forms systemd added later are not supported here.
    log.debug("NOTIFY_SOCKET %r: unsupported address form, notifications disabled", raw)
    return None


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` assignments as one datagram; True if it was sent."""
    address = _address()
    if address is None or not assignments:
        return False
    for a in assignments:
        if "=" not in a or "\n" in a:
            raise ValueError(f"notify: {a!r} is not one KEY=VALUE line")
    payload = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait: a receiver that stopped reading fills its queue, and
            # a blocking send would then stop the daemon's main loop (pushes
            # included).  A status line dropped costs nothing.
            sock.sendto(payload, socket.MSG_DONTWAIT, address)
    except BlockingIOError:
        log.debug("sd_notify to %s: the receiver's queue is full; dropped %r",
                  os.environ.get("NOTIFY_SOCKET"), assignments)
        return False
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), err)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked for.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so that one
    late ping does not get the service killed.  ``$WATCHDOG_PID``, when set,
    names the process the watchdog is meant for; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", usec)
        return None
    if value <= 0:
        return None
    return value / 2e6


def ready(status: str | None = None) -> bool:
    """Start-up is done: systemd considers the unit started."""
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    """A reload (SIGHUP) begins; send ``ready()`` when it is done.

    ``MONOTONIC_USEC`` lets ``Type=notify-reload`` (systemd 253+) tell this
    reload from an earlier one; older systemd ignores it.
    """
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


__all__ = ["notify", "watchdog_interval", "ready", "stopping", "reloading", "status", "watchdog"]
