"""What verification reports: one ``Finding`` per reason a group must not be published."""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass


class FindingKind(enum.StrEnum):
    HASH_MISMATCH = "hash_mismatch"
    MISSING_FILE = "missing_file"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED_KEY = "expired_key"
    REVOKED_KEY = "revoked_key"
    MISSING_SIGNATURE = "missing_signature"
    INDEX_MISMATCH = "index_mismatch"
    MALFORMED_INDEX = "malformed_index"
    ERROR = "error"


@dataclass(frozen=True, order=True)
class Finding:
    """One reason the group must not be published; ``path`` is the relative path."""

    path: str
    kind: FindingKind
    message: str


def os_finding(name: str, err: OSError) -> Finding:
    """A file that could not be read: ``missing_file`` when it is not there, else ``error``."""
    if err.errno == errno.ENOENT:
        return Finding(name, FindingKind.MISSING_FILE, f"{name}: missing")
    return Finding(name, FindingKind.ERROR, f"{name}: cannot read: {err.strerror or err}")


def hash_mismatch(name: str, got: bytes, expected: bytes) -> Finding:
    """A file whose SHA-256 is not the one the sender's manifest gives."""
    return Finding(name, FindingKind.HASH_MISMATCH,
                   f"{name}: SHA-256 {got.hex()} differs from the manifest's {expected.hex()}")
