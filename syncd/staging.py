"""``state_dir/staging``: its names, and the cleanup of what dead writers left.

The push agent and the prewarm stagers write into one staging directory,
side by side (several stagers, at most one push agent holding the state
lock).  Every name says who wrote it and what it is:

- ``<sha256hex>``: an object, whole and checked against its SHA-256;
- ``tmp.PID.N``: a push agent's file being received or made (and its
  ``tmp.PID.seen``, a full comparison's listed paths beyond memory);
- ``stage.PID.N``: a stager's whole object being received;
- ``trash.PID.N``: a file replaced or deleted at publish, parked until the
  agent has answered ``committed``;
- ``run.PID.<sha256hex>`` and ``partial.<sha256hex>`` (with their
  ``.ranges``): objects that arrived in part (syncd.partial);
- ``verified.<boot id>``: the objects checked during this boot (:class:`VerifiedLog`).

A writer's PID in the name is what lets another process tell its files from
a dead one's: :func:`clean` leaves a live writer's alone.
"""

from __future__ import annotations

import logging
import os
import time

from .fsops import unlink_at
from .partial import PARTIAL_MAX_AGE, RANGES_SUFFIX, promote_run

TMP_PREFIX = "tmp."
STAGE_PREFIX = "stage."
TRASH_PREFIX = "trash."
#: The kinds of name (what precedes the first dot) that carry their writer's PID.
WRITERS = ("tmp", "stage", "trash", "run")
OBJECT_NAME_LENGTH = 64  # a SHA-256 in hex

log = logging.getLogger(__name__)


def staged_objects(staging_fd: int) -> set[str]:
    """Names of the objects in staging (regular files named by a SHA-256)."""
    names = set()
    with os.scandir(staging_fd) as it:
        for entry in it:
            if len(entry.name) == OBJECT_NAME_LENGTH and entry.is_file(follow_symlinks=False):
                names.add(entry.name)
    return names


def alive(pid: int) -> bool:
    """Whether process ``pid`` may still write: it exists and is no zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process, alive
    # A killed agent stays a zombie until sshd reaps it, which the next
    # session may start before: it writes nothing any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def clean(staging_fd: int, *, stale: bool = False, everything: bool = False) -> None:
    """Remove what writers that are gone left in staging.

    Another agent or a stager may be writing into staging right now: its
    ``tmp.*``, ``stage.*``, ``trash.*`` and ``run.*`` files are left alone
    while its process lives; this process's own trash is freed by its owner
    after the commit.  A dead writer's run becomes the object's partial
    file (its recorded ranges serve a resumed push or prewarm).

    With ``stale`` (an agent starting), also the ``verified`` logs of other
    boots and partial files nobody went on with for :data:`PARTIAL_MAX_AGE`.
    With ``everything`` (an agent after its commit), also this process's own
    temporaries, every run, every object and every ``verified`` log: the
    objects still staged were kept for a held-back generation that the
    commit superseded.  Young partial files stay in any case.
    """
    me = os.getpid()
    for entry in os.scandir(staging_fd):
        if not _kept(staging_fd, entry, me, stale=stale or everything, everything=everything):
            unlink_at(staging_fd, entry.name)


def _kept(staging_fd: int, entry: os.DirEntry, me: int, *, stale: bool, everything: bool) -> bool:
    """Whether :func:`clean` leaves ``entry`` (a dead writer's run it hands on, and keeps)."""
    name = entry.name
    kind, _, rest = name.partition(".")
    if kind in WRITERS:
        digits = rest.partition(".")[0]
        pid = int(digits) if digits.isdigit() else None
        if pid is not None and pid != me and alive(pid):
            return True  # another live process is writing it
        if kind == "run" and not everything:
            if not name.endswith(RANGES_SUFFIX):
                promote_run(staging_fd, name)
                return True
            # The records of a run that is gone (named, or never made) serve nothing.
            return _exists(staging_fd, name[:-len(RANGES_SUFFIX)])
        # This process's trash is freed after its commit, its temporaries with everything.
        return pid == me and (kind == "trash" or not everything)
    if not stale:
        return True
    if kind == "verified":
        return not everything and rest == boot_id()  # an older boot's log is void
    if kind == "partial":
        # Kept for a resumed push or prewarm, unless nobody went on with it
        # for days: its file changed before it was finished.
        try:
            return entry.stat(follow_symlinks=False).st_mtime > time.time() - PARTIAL_MAX_AGE
        except FileNotFoundError:
            return True
    return not everything


def _exists(staging_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=staging_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


# -- staged objects checked in this boot ------------------------------------------

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
