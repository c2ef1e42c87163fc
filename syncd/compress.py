"""The zstd policy: when bytes travel compressed, and the codec's settings.

One place for what the pusher, the prewarm streams, the stager serving a
source's ranges and the bundles of small files decide alike: a payload goes
as zstd only when a sample of it shrinks by a tenth or more at level 1, and
never when it is small or named as compressed already.  The receiving ends
(the agent, the stager) decompress through :func:`decompressing_writer`.

zstandard is imported at its first use, not with this module: an agent or
a stager whose session carries nothing compressed does not pay for it
(docs/performance.md, "Start-up").
"""

from __future__ import annotations

from typing import Any, Callable

#: Names of files compressed already: zstd does not shrink them, and a new
#: version shares next to no bytes with an old one (a delta against another
#: file's blocks does not pay either: syncd.agent's basis choice asks too).
COMPRESSED_SUFFIXES = (b".gz", b".xz", b".bz2", b".zst", b".lz4", b".deb", b".udeb", b".rpm", b".zip",
                       b".jpg", b".png", b".7z", b".lzma", b".squashfs", b".whl")
LEVEL = 1
#: Compressed, a sample must be below this share of its size.
MIN_GAIN = 0.9
#: Below this many bytes of sample the bytes saved do not pay for the attempt.
MIN_SAMPLE = 4096
#: How much of a sample is tried.
SAMPLE = 256 * 1024
#: The decompressor hands on what it makes in pieces of about this size.
WRITE_SIZE = 1 << 20


def named_compressed(path: bytes) -> bool:
    """Whether ``path``'s name says its bytes are compressed already."""
    return path.lower().endswith(COMPRESSED_SUFFIXES)


def should_compress(path: bytes, sample: Any) -> bool:
    """Whether the bytes of ``path``, of which ``sample`` is the start, go as zstd.

    ``path`` may be empty (a bundle of several files, whose names the caller
    has looked at itself)."""
    if len(sample) < MIN_SAMPLE or named_compressed(path):
        return False
    head = sample[:SAMPLE]
    return len(_zstd().ZstdCompressor(level=LEVEL).compress(head)) < MIN_GAIN * len(head)


def compressor() -> Any:
    """A streaming compressor (``compress(chunk)``, then ``flush()``) at the policy's level."""
    return _zstd().ZstdCompressor(level=LEVEL).compressobj()


def compress_if_smaller(payload: Any) -> bytes | None:
    """``payload`` compressed whole, when that saves what the policy asks; else None."""
    packed = _zstd().ZstdCompressor(level=LEVEL).compress(payload)
    return packed if len(packed) < MIN_GAIN * len(payload) else None


class _Sink:
    """What zstandard's stream writer writes to: only a ``write``."""

    def __init__(self, write: Callable[[Any], Any]) -> None:
        self.write = write


def decompressing_writer(write: Callable[[Any], Any]) -> Any:
    """A writer whose ``write`` takes zstd bytes and hands what they decompress
    to ``write`` (``flush()`` at the end hands on the rest)."""
    return _zstd().ZstdDecompressor().stream_writer(_Sink(write), write_size=WRITE_SIZE)


def _zstd() -> Any:
    # Imported at the first use, not with this module (the module's docstring says why).
    import zstandard

    return zstandard
