"""Verification of a generation before it is published: SHA-256 and OpenPGP.

The package's modules, lower first (each imports only those above it):

- ``findings``: what a check reports (``Finding``, ``FindingKind``).
- ``hashing``: SHA-256 of many files in parallel (``hash_files``, ``check_hashes``).
- ``index``: the index formats (Release/InRelease, repomd.xml, by-hash names).
- ``gpg``: the node's keyring and gpg's verdict on a signature (``Keyring``).
- ``group``: one group's verification, the agent's gate (``verify_index_group``).

The names other modules use are re-exported here.
"""

from __future__ import annotations

from .findings import Finding, FindingKind
from .gpg import Keyring, SigOutcome, SigResult, keyring_stamp
from .group import (
    DEFAULT_CLEARSIGNED,
    DEFAULT_DEBIAN_RELEASE,
    DEFAULT_DETACHED_SUFFIXES,
    DEFAULT_REQUIRE_SIGNED,
    GroupReport,
    SignaturePlan,
    plan_signatures,
    verify_index_group,
    verify_index_group_report,
    verify_tree_group,
)
from .hashing import DEFAULT_BUFFER, check_hashes, default_workers, hash_files, sha256_file
from .index import IndexEntry, Release, clearsigned_body, parse_release, parse_repomd, render_release

__all__ = [
    "DEFAULT_BUFFER", "DEFAULT_CLEARSIGNED", "DEFAULT_DEBIAN_RELEASE", "DEFAULT_DETACHED_SUFFIXES",
    "DEFAULT_REQUIRE_SIGNED", "Finding", "FindingKind", "GroupReport", "IndexEntry", "Keyring", "Release",
    "SigOutcome", "SigResult", "SignaturePlan", "check_hashes", "clearsigned_body", "default_workers",
    "hash_files", "keyring_stamp", "parse_release", "parse_repomd", "plan_signatures", "render_release",
    "sha256_file", "verify_index_group", "verify_index_group_report", "verify_tree_group",
]
