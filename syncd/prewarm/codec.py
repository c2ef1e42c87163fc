"""How a range travels between prewarm's ends: its digest and its compression.

Both ends (the streams of ``syncd prewarm`` and the stage-only agent)
decide the same way from these.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import xxhash

from ..plan import COMPRESSED_SUFFIXES

# Compression, as the pusher decides it: zstd only where a sample shrinks.
ZSTD_LEVEL = 1
ZSTD_MIN_GAIN = 0.9
DIGESTS = ("sha256", "xxh3-128")


def range_hasher(digest: str) -> Any:
    """A new hasher for a range's digest (one of DIGESTS)."""
    if digest == "xxh3-128":
        return xxhash.xxh3_128()
    return hashlib.sha256()


def digest_key(digest: str) -> str:
    """The END trailer's key that carries a range's digest."""
    return "xxh3_128" if digest == "xxh3-128" else "sha256"


def zstd_pays(path: bytes, sample: bytes) -> bool:
    if len(sample) < 512 or path.lower().endswith(COMPRESSED_SUFFIXES):
        return False
    head = sample[: 256 * 1024]
    return len(_zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(head)) < ZSTD_MIN_GAIN * len(head)


def compressor() -> Any:
    """A streaming zstd compressor (``compress``, ``flush``)."""
    return _zstd().ZstdCompressor(level=ZSTD_LEVEL).compressobj()


def decompressing_writer(write: Callable[[Any], int], size: int) -> Any:
    """A zstd stream writer that hands what it decompresses to ``write``."""
    return _zstd().ZstdDecompressor().stream_writer(_Sink(write), write_size=size)


class _Sink:
    def __init__(self, write: Callable[[Any], int]) -> None:
        self.write = write


def _zstd() -> Any:
    # Imported at the first compressed range, not with the module: every
    # stage-only agent's start would pay for it (docs/performance.md,
    # "Start-up").
    import zstandard

    return zstandard
