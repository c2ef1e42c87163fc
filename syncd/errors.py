"""The error hierarchy: every error syncd reports, with its exit status.

Lower layers translate foreign exceptions (OSError, sqlite, paramiko) into
these at their boundary (``raise X(...) from err``); ``cli.py`` is the one
place that turns them into a one-line message and an exit status.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Mapping

# Exit statuses.  0 is success; 1 a failed sync or a finding; 2 bad usage or
# configuration; 3 another process holds the lock (the README lists them).
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3


class SyncdError(Exception):
    """Base of all syncd errors.  ``str(err)`` is the one-line message."""

    exit_status = EXIT_FAILURE
    #: True when the same operation may succeed if simply tried again
    #: (a lost connection); False for a real answer (bad signature, bad path).
    retryable = False


class ConfigError(SyncdError):
    """sync.ini is missing, unreadable or invalid.  Message names file, section, key."""

    exit_status = EXIT_CONFIG


class UsageError(SyncdError):
    """The command line is wrong (unknown mirror name, bad option value)."""

    exit_status = EXIT_CONFIG


class LockedError(SyncdError):
    """Another process holds the state_dir lock."""

    exit_status = EXIT_LOCKED


class ManifestError(SyncdError):
    """The SQLite manifest cannot be opened, read or written."""


class SchemaError(ManifestError):
    """The manifest was written by an older or newer syncd schema."""


class ScanError(SyncdError):
    """Walking or hashing the tree failed in a way the scan cannot skip."""


class DeltaError(SyncdError):
    """Base of delta engine errors."""


class DeltaFormatError(DeltaError):
    """A signature or delta stream is malformed, truncated or exceeds limits."""


class PatchMismatchError(DeltaError):
    """A patched file's SHA-256 differs from the expected one: resend it whole."""


class ProtocolError(SyncdError):
    """The peer sent a frame or message that breaks the protocol."""


class UnsafePathError(ProtocolError):
    """A name from the wire is absolute, contains '..' or NUL, or escapes root."""


class TransportError(SyncdError):
    """The SSH session could not be set up or failed."""


class ConnectionLostError(TransportError):
    """The connection dropped or timed out; the operation may be retried."""

    retryable = True


class HostKeyError(TransportError):
    """The host key is unknown or differs from known_hosts: never retried."""


class AuthenticationError(TransportError):
    """The downstream refused our key."""


class VerifyError(SyncdError):
    """A SHA-256 or signature check failed."""


class DeletionGuardError(SyncdError):
    """A plan would delete more than the configured share of the tree."""


class IndexFormatError(VerifyError):
    """A Release, InRelease or repomd.xml is malformed or hostile (DOCTYPE, unsafe path)."""


class RemoteError(SyncdError):
    """The agent on a downstream reported an error; the message is the agent's."""


class DiskFullError(SyncdError):
    """No space left while staging or publishing: nothing partial was published."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class disk_full_as:  # noqa: N801 - used as a function-style context manager
    """Inside, a full disk (ENOSPC, EDQUOT) raises DiskFullError(message());
    any other OSError passes as it is.  A class, not a generator: it wraps
    two calls per staged file, and contextlib's machinery costs several
    times as much per use (docs/performance.md, "Per-file costs")."""

    __slots__ = ("message",)

    def __init__(self, message: Callable[[], str]) -> None:
        self.message = message

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(self.message()) from exc
        return False


class StoppedError(SyncdError):
    """A push ended early because the daemon is stopping; nothing half-done was published."""


#: An ``error`` message's ``kind`` (docs/protocol.md) to its class.  The kind
#: is the class's name, as the agent sends it (``type(err).__name__``), so
#: that the class's exit status and ``retryable`` survive the wire.
WIRE_KINDS: dict[str, type[SyncdError]] = {cls.__name__: cls for cls in (
    SyncdError, ConfigError, UsageError, LockedError, ManifestError, SchemaError, ScanError,
    DeltaError, DeltaFormatError, PatchMismatchError, ProtocolError, UnsafePathError,
    TransportError, ConnectionLostError, HostKeyError, AuthenticationError,
    VerifyError, IndexFormatError, DeletionGuardError, RemoteError, DiskFullError,
    StoppedError,
)}


def error_from_wire(message: Mapping[str, Any]) -> SyncdError:
    """The error an agent's ``error`` message reports, as its own class
    (``WIRE_KINDS``); RemoteError for a kind this syncd does not know (a
    newer peer's class) or none.  The text is the agent's, marked as such."""
    kind = message.get("kind")
    cls = WIRE_KINDS.get(kind, RemoteError) if isinstance(kind, str) else RemoteError
    return cls(f"agent: {message.get('message')}")
