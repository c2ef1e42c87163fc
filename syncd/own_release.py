"""The node's own-release check: a primary does not push an index group its
own mirrors would hold back (``run --once``, the daemon, ``syncd verify``).

Ties the node (its config and manifest) to syncd.verify, which knows
neither.  A passed check is remembered in the manifest per generation and
verify settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from .config import Config
from .errors import VerifyError
from .manifest import KIND_FILE, Manifest
from .plan import IndexMatcher
from .verify import DEFAULT_REQUIRE_SIGNED, Finding, Keyring, keyring_stamp, verify_tree_group

log = logging.getLogger(__name__)

META_RELEASE_CHECKED = "release_checked"
# A passed check is trusted this long: a signature or a key can expire
# without a new generation, and a mirror that was down gets the old one later.
RELEASE_CHECK_LIFETIME = 3600.0


def node_keyring(cfg: Config) -> Keyring | None:
    """The node's Keyring over its private GNUPGHOME, or None without ``[verify] keyring``."""
    if cfg.verify.keyring is None:
        return None
    return Keyring(cfg.verify.keyring, cfg.verify.gnupghome or cfg.node.state_dir / "gnupg")


def check_own_index_group(cfg: Config, manifest: Manifest) -> tuple[list[Finding], int]:
    """Findings on the node's own index group (signatures, Release/repomd
    chains), and how many index files it has."""
    matcher = IndexMatcher(cfg.node.index_patterns)
    rels = [os.fsdecode(e.path) for e in manifest.entries() if e.kind == KIND_FILE and matcher(e.path)]
    keyring = node_keyring(cfg)
    try:
        findings = verify_tree_group(
            cfg.node.root, rels, keyring=keyring,
            require_signed=cfg.verify.require_signed or DEFAULT_REQUIRE_SIGNED, workers=cfg.node.hash_workers,
        )
    finally:
        if keyring is not None:
            keyring.close()
    return findings, len(rels)


def _release_check_key(cfg: Config, manifest: Manifest) -> str:
    """What a passed check of the node's own index group depended on: the
    generation (the scan just brought it up to date with the tree) and the
    verify settings, the keyring's stat data included."""
    keyring = cfg.verify.keyring
    try:
        ring = keyring_stamp(keyring) if keyring is not None else None
    except OSError:
        ring = {"path": str(keyring)}  # unreadable now: the check itself says so
    return json.dumps([manifest.generation, ring, list(cfg.verify.require_signed or DEFAULT_REQUIRE_SIGNED),
                       list(cfg.node.index_patterns)], default=str)


def refuse_broken_release(cfg: Config, manifest: Manifest) -> None:
    """A primary does not push a release its own mirrors would hold back.

    A generation that passed once is not checked again with the same verify
    settings: listing the index files of an unchanged tree costs time on
    every no-op run (docs/performance.md, "Hashing and signatures").
    """
    key = _release_check_key(cfg, manifest)
    now = time.time()
    try:
        kept = json.loads(manifest.get_meta(META_RELEASE_CHECKED) or "null")
        fresh = kept["key"] == key and 0 <= now - kept["at"] < RELEASE_CHECK_LIFETIME
    except (ValueError, TypeError, KeyError):
        fresh = False
    if fresh:
        return
    findings, _ = check_own_index_group(cfg, manifest)
    if not findings:
        manifest.set_meta(META_RELEASE_CHECKED, json.dumps({"key": key, "at": now}))
        return
    for f in findings[1:]:  # the first is in the error itself: said once
        log.error("verify: %s", f.message)
    raise VerifyError(
        f"{cfg.node.name}: refusing to push: {len(findings)} finding(s) in this node's own index group, "
        f"first: {findings[0].message} (rerun with --no-verify to push anyway)"
    )
