"""Block signatures of the edge's old copy: building, encoding, decoding.

A signature is, per block of ``block_size`` bytes (the last one may be
shorter), the 32-bit weak rolling sum and the first ``strong_len`` bytes of
the block's xxh3-128.  It is built from a stream of buffers of any sizes in
bounded memory, and decoded from the wire with every length checked before
anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import xxhash

from syncd.errors import DeltaFormatError

from . import format as fmt
from .rollsum import block_sums

__all__ = ["Signature", "block_size_for", "make_signature", "signature_of_reader", "join_signatures",
           "decode_signature"]

#: rsync's smallest default block and its largest (protocol 30 and later).
MIN_AUTO_BLOCK = 700
MAX_AUTO_BLOCK = 1 << 17
MAX_AUTO_BLOCKS = 1 << 20
#: Bytes hashed per numpy call while building a signature.
_BATCH = 4 << 20


def block_size_for(file_size: int) -> int:
    """Block size for a file: about its square root, as rsync chooses it.

    Rounded down to a multiple of 8 and clamped to [700, 128 KiB]: small
    files keep blocks large enough that per-block overhead stays small, huge
    files keep one literal block small.  Past 128 GiB, where rsync would let
    the block count grow without end, blocks grow instead so a signature
    stays under ``MAX_AUTO_BLOCKS`` blocks (up to 1 TiB files).
    """
    if file_size < 0:
        raise ValueError(f"file size must be >= 0, got {file_size}")
    size = max(MIN_AUTO_BLOCK, min(MAX_AUTO_BLOCK, math.isqrt(file_size) & ~7))
    if file_size > size * MAX_AUTO_BLOCKS:
        per_block = -(-file_size // MAX_AUTO_BLOCKS)
        size = min(fmt.MAX_BLOCK_SIZE, (per_block + 7) & ~7)
    return size


class Signature:
    """The signature of one old file: block sums plus the header fields.

    ``weak`` is a uint32 array of ``block_count`` sums; ``strong`` holds the
    truncated strong sums back to back, ``strong_len`` bytes each.
    """

    __slots__ = ("block_size", "strong_len", "file_size", "weak", "strong")

    def __init__(self, block_size: int, strong_len: int, file_size: int, weak: np.ndarray, strong: bytes) -> None:
        self.block_size = block_size
        self.strong_len = strong_len
        self.file_size = file_size
        self.weak = weak
        self.strong = strong

    @property
    def block_count(self) -> int:
        return int(self.weak.size)

    @property
    def full_blocks(self) -> int:
        """Blocks of exactly ``block_size`` bytes (all but a short last one)."""
        return self.file_size // self.block_size

    @property
    def tail_size(self) -> int:
        """Length of the short last block, 0 when there is none."""
        return self.file_size % self.block_size

    def strong_of(self, index: int) -> bytes:
        n = self.strong_len
        return self.strong[index * n : (index + 1) * n]

    def encode(self) -> bytes:
        n = self.block_count
        header = fmt.SIG_HEADER.pack(
            fmt.SIG_MAGIC, fmt.VERSION, self.strong_len, 0, self.block_size, n, self.file_size
        )
        rows = np.empty((n, 4 + self.strong_len), dtype=np.uint8)
        rows[:, :4] = self.weak.astype("<u4").view(np.uint8).reshape(n, 4)
        rows[:, 4:] = np.frombuffer(self.strong, dtype=np.uint8).reshape(n, self.strong_len)
        return header + rows.tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return (
            (self.block_size, self.strong_len, self.file_size, self.strong)
            == (other.block_size, other.strong_len, other.file_size, other.strong)
            and np.array_equal(self.weak, other.weak)
        )

    def __repr__(self) -> str:
        return (
            f"Signature(block_size={self.block_size}, strong_len={self.strong_len}, "
            f"file_size={self.file_size}, blocks={self.block_count})"
        )


def _check_params(block_size: int, strong_len: int) -> None:
    if not 1 <= block_size <= fmt.MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [1, {fmt.MAX_BLOCK_SIZE}], got {block_size}")
    if not fmt.MIN_STRONG_LEN <= strong_len <= fmt.MAX_STRONG_LEN:
        raise ValueError(f"strong_len must be in [{fmt.MIN_STRONG_LEN}, {fmt.MAX_STRONG_LEN}], got {strong_len}")


def _sum_blocks(buf: bytes, count: int, length: int, strong_len: int, weak_out: list, strong_out: list) -> None:
    arr = np.frombuffer(buf, dtype=np.uint8, count=count * length).reshape(count, length)
    weak_out.append(block_sums(arr))
    view = memoryview(buf)
    digest = xxhash.xxh3_128_digest
    strong_out.append(b"".join([digest(view[i * length : (i + 1) * length])[:strong_len] for i in range(count)]))


def make_signature(
    chunks: Iterable,
    *,
    block_size: int | None = None,
    strong_len: int = 16,
    file_size: int | None = None,
) -> Signature:
    """Signature of the old file given as buffers of any sizes.

    The block size comes from ``block_size``, else from ``file_size`` (the
    streaming caller's stat), else from the total length when ``chunks`` is a
    single buffer or a list or tuple of them.  The header records the bytes
    actually read, so a file that changed size while being read yields a
    signature of what was read (and a patch against it fails its SHA-256).
    """
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    if block_size is None:
        if file_size is None:
            if not isinstance(chunks, (list, tuple)):
                raise ValueError("make_signature over a stream needs block_size or file_size")
            file_size = sum(fmt.byte_view(c).nbytes for c in chunks)
        block_size = block_size_for(file_size)
    _check_params(block_size, strong_len)

    batch = max(1, _BATCH // block_size) * block_size
    weak_parts: list[np.ndarray] = []
    strong_parts: list[bytes] = []
    pending: list = []
    pending_len = 0
    total = 0
    for chunk in chunks:
        view = fmt.byte_view(chunk)
        if not view.nbytes:
            continue
        pending.append(view)
        pending_len += view.nbytes
        total += view.nbytes
        if pending_len >= batch:
            buf = b"".join(pending)
            count = len(buf) // block_size
            _sum_blocks(buf, count, block_size, strong_len, weak_parts, strong_parts)
            rest = buf[count * block_size :]
            pending, pending_len = ([rest], len(rest)) if rest else ([], 0)
    buf = b"".join(pending)
    count = len(buf) // block_size
    if count:
        _sum_blocks(buf, count, block_size, strong_len, weak_parts, strong_parts)
    if len(buf) % block_size:
        tail = buf[count * block_size :]
        _sum_blocks(tail, 1, len(tail), strong_len, weak_parts, strong_parts)
    weak = np.concatenate(weak_parts) if weak_parts else np.zeros(0, dtype=np.uint32)
    return Signature(block_size, strong_len, total, weak.astype(np.uint32, copy=False), b"".join(strong_parts))


def signature_of_reader(
    readinto: Callable[[memoryview], int], *, file_size: int, strong_len: int = 16,
    block_size: int | None = None,
) -> Signature:
    """Signature of the old file read by ``readinto`` (fills the buffer it is
    given as far as it can, like ``RawIOBase.readinto``; 0 at the end).

    The same signature as :func:`make_signature` of the same bytes, built in
    one reused buffer: no per-read allocation and no joining of reads.
    ``block_size`` (default: the one for ``file_size``) lets a part of a
    larger file be read with that file's blocks (see :func:`join_signatures`).
    """
    if block_size is None:
        block_size = block_size_for(file_size)
    _check_params(block_size, strong_len)
    batch = max(1, _BATCH // block_size) * block_size
    buf = bytearray(batch)
    view = memoryview(buf)
    weak_parts: list[np.ndarray] = []
    strong_parts: list[bytes] = []
    total = 0
    at_end = False
    while not at_end:
        filled = 0
        while filled < batch:
            n = readinto(view[filled:])
            if not n:
                at_end = True
                break
            filled += n
        total += filled
        count = filled // block_size
        if count:
            _sum_blocks(view[: count * block_size], count, block_size, strong_len, weak_parts, strong_parts)
        if filled % block_size:  # only at the end: a batch is whole blocks
            tail = view[count * block_size : filled]
            _sum_blocks(tail, 1, len(tail), strong_len, weak_parts, strong_parts)
            at_end = True
    weak = np.concatenate(weak_parts) if weak_parts else np.zeros(0, dtype=np.uint32)
    return Signature(block_size, strong_len, total, weak.astype(np.uint32, copy=False), b"".join(strong_parts))


def join_signatures(parts: list[Signature]) -> Signature:
    """The signature of a file from those of consecutive parts of it, each
    cut at a block boundary (all but the last a whole number of blocks) and
    built with the same block size and strong length."""
    if not parts:
        raise ValueError("no parts to join")
    first = parts[0]
    for part in parts:
        if (part.block_size, part.strong_len) != (first.block_size, first.strong_len):
            raise ValueError("parts of one signature need one block size and strong length")
    for part in parts[:-1]:
        if part.file_size % part.block_size:
            raise ValueError("only the last part may end inside a block")
    weak = np.concatenate([p.weak for p in parts]).astype(np.uint32, copy=False)
    return Signature(first.block_size, first.strong_len, sum(p.file_size for p in parts), weak,
                     b"".join(p.strong for p in parts))


def decode_signature(data, *, max_blocks: int = fmt.DEFAULT_MAX_BLOCKS) -> Signature:
    """Parse a signature's wire form; DeltaFormatError on anything hostile.

    Every header field is checked against the limits and against the length
    of ``data`` before an array is built, so a header claiming 2**40 blocks
    costs nothing.
    """
    view = fmt.byte_view(data)
    if view.nbytes < fmt.SIG_HEADER.size:
        raise DeltaFormatError(f"signature truncated: {view.nbytes} bytes, header needs {fmt.SIG_HEADER.size}")
    magic, version, strong_len, reserved, block_size, count, file_size = fmt.SIG_HEADER.unpack_from(view)
    if magic != fmt.SIG_MAGIC:
        raise DeltaFormatError(f"not a syncd signature (magic {magic!r})")
    if version != fmt.VERSION:
        raise DeltaFormatError(f"unsupported signature version {version}")
    if reserved:
        raise DeltaFormatError("signature header reserved field is not zero")
    if not fmt.MIN_STRONG_LEN <= strong_len <= fmt.MAX_STRONG_LEN:
        raise DeltaFormatError(
            f"signature strong_len {strong_len} outside [{fmt.MIN_STRONG_LEN}, {fmt.MAX_STRONG_LEN}]"
        )
    if not 1 <= block_size <= fmt.MAX_BLOCK_SIZE:
        raise DeltaFormatError(f"signature block size {block_size} outside [1, {fmt.MAX_BLOCK_SIZE}]")
    if count > max_blocks:
        raise DeltaFormatError(f"signature claims {count} blocks, limit is {max_blocks}")
    if count != -(-file_size // block_size):
        raise DeltaFormatError(
            f"signature claims {count} blocks for {file_size} bytes in blocks of {block_size}"
        )
    row = 4 + strong_len
    expected = fmt.SIG_HEADER.size + count * row
    if view.nbytes != expected:
        raise DeltaFormatError(f"signature is {view.nbytes} bytes, its header implies {expected}")
    if count == 0:
        return Signature(block_size, strong_len, file_size, np.zeros(0, dtype=np.uint32), b"")
    rows = np.frombuffer(view, dtype=np.uint8, offset=fmt.SIG_HEADER.size).reshape(count, row)
    weak = np.ascontiguousarray(rows[:, :4]).view("<u4").reshape(count).astype(np.uint32)
    strong = np.ascontiguousarray(rows[:, 4:]).tobytes()
    return Signature(block_size, strong_len, file_size, weak, strong)
