"""How a range travels between prewarm's ends: its digest.

Both ends (the streams of ``syncd prewarm`` and the stage-only agent)
decide the same way from these; its compression is syncd.compress's, as
for every push.
"""

from __future__ import annotations

import hashlib
from typing import Any

import xxhash


def range_hasher(digest: str) -> Any:
    """A new hasher for a range's digest (one of messages.RANGE_DIGESTS)."""
    if digest == "xxh3-128":
        return xxhash.xxh3_128()
    return hashlib.sha256()


def digest_key(digest: str) -> str:
    """The END trailer's key that carries a range's digest."""
    return "xxh3_128" if digest == "xxh3-128" else "sha256"
