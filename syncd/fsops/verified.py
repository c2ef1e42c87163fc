"""The staged objects checked during this boot (``staging/verified.<boot id>``)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__package__)

VERIFIED_PREFIX = "verified."
_boot_id: str | None = None


def boot_id() -> str:
    """This boot's identity ("" where the kernel does not say)."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
                _boot_id = fh.read(64).strip().decode("ascii", "replace").replace("-", "")
        except OSError:
            _boot_id = ""
    return _boot_id


class VerifiedLog:
    """``staging/verified.<boot id>``: the staged objects whose bytes were
    checked against their SHA-256 name during this boot, one hex name a line.

    A push trusts such an object without reading it again: until the machine
    goes down, the kernel returns exactly the bytes that were checked
    (staging is syncd's own; nothing writes a named object after it is
    named).  A crash or power cut can lose unsynced bytes, but it also
    changes the boot id, so the log no longer applies and the push re-hashes
    as before.  A name is appended only after its rename, so the log never
    names an object that was not there; lines from concurrent writers are
    single O_APPEND writes.
    """

    def __init__(self, staging_fd: int) -> None:
        self.fd = -1
        if boot_id():
            try:
                self.fd = os.open(VERIFIED_PREFIX + boot_id(), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=staging_fd)
            except OSError as err:
                log.warning("staging log %s: %s; staged objects are re-hashed at publish",
                            VERIFIED_PREFIX + boot_id(), err.strerror)

    def add(self, hexname: str) -> None:
        """Log one name; best effort (an object not logged is only re-hashed)."""
        if self.fd >= 0:
            try:
                os.write(self.fd, hexname.encode("ascii") + b"\n")
            except OSError as err:
                log.warning("staging log %s: %s; objects staged from now on are re-hashed at publish",
                            VERIFIED_PREFIX + boot_id(), err.strerror)
                self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def verified_this_boot(staging_fd: int) -> set[str]:
    """The names :class:`VerifiedLog` holds for this boot (a torn line is ignored)."""
    if not boot_id():
        return set()
    try:
        fd = os.open(VERIFIED_PREFIX + boot_id(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
    except FileNotFoundError:
        return set()
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    return {line.decode("ascii", "replace") for line in data.split(b"\n") if len(line) == 64}
