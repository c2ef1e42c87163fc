"""The byte format of signatures and deltas: magics, versions, limits, layouts.

Every integer is little-endian with a fixed width; ``docs/delta-format.md``
describes each byte.  This module only packs and names things: the encoder,
the patcher and the signature decoder share it so that the limits a reader
enforces are the same ones a writer respects.
"""

from __future__ import annotations

import struct

SIG_MAGIC = b"sydS"
DELTA_MAGIC = b"sydD"
VERSION = 1

#: Signature header: magic, version, strong_len, reserved (0), block_size,
#: block_count, file_size.
SIG_HEADER = struct.Struct("<4sBBHIQQ")
#: Delta header: magic, version.  Kept this small on purpose: a delta of a
#: small edit is a few dozen bytes, and the basis is checked by the copies'
#: bounds and the final SHA-256, not by header fields.
DELTA_HEADER = struct.Struct("<4sB")

# Op codes.  The low bits choose the width of each integer argument, so an
# op costs what its numbers need (as librsync's commands do):
# width code 0, 1, 2, 3 means 1, 2, 4, 8 bytes, little-endian, unsigned.
OP_COPY = 0x40  # | offset_code << 2 | length_code; args: offset, length
OP_LITERAL = 0x50  # | length_code (0..2); args: length, then that many bytes
OP_END = 0x60  # | size_code | END_HAS_SHA; args: new size, then the SHA-256 if flagged
END_HAS_SHA = 0x04
WIDTHS = (1, 2, 4, 8)


def width_code(value: int) -> int:
    """Smallest width code whose width holds ``value``."""
    if value < 0x100:
        return 0
    if value < 0x10000:
        return 1
    if value < 0x100000000:
        return 2
    return 3


def op_arg_size(op: int) -> int | None:
    """Bytes of fixed-width arguments after an op code; None for an unknown op."""
    kind = op & 0xF0
    if kind == OP_COPY:
        return WIDTHS[(op >> 2) & 3] + WIDTHS[op & 3]
    if kind == OP_LITERAL and op & 0x0F <= 2:
        return WIDTHS[op & 3]
    if kind == OP_END and op & 0x0F <= 7:
        return WIDTHS[op & 3] + (32 if op & END_HAS_SHA else 0)
    return None


#: Largest block a signature may declare.  rsync stops at 128 KiB; the wire
#: allows more so tests and callers can experiment, but never enough for one
#: block to dominate memory.
MAX_BLOCK_SIZE = 1 << 20
#: Largest payload of one literal op: the patcher streams literals through,
#: the encoder keeps at most this much pending.
MAX_LITERAL = 1 << 20
#: Strong checksum bytes kept per block (xxh3-128 truncated, as rsync truncates
#: its strong sums).  Below 8 bytes the encoder also checks weak sums on
#: every aligned match, since a short strong sum alone is too easy to collide.
MIN_STRONG_LEN = 2
MAX_STRONG_LEN = 16
#: Default cap on the blocks a decoded signature may claim: twice what
#: block_size_for ever chooses, and about 64 MiB of signature and lookup
#: arrays in the sender's memory.
DEFAULT_MAX_BLOCKS = 1 << 21


def byte_view(buf) -> memoryview:
    """A flat view of any buffer's bytes (callers pass bytes, memoryviews, arrays)."""
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def encode_copy(offset: int, length: int) -> bytes:
    oc, lc = width_code(offset), width_code(length)
    return (
        bytes((OP_COPY | oc << 2 | lc,))
        + offset.to_bytes(WIDTHS[oc], "little")
        + length.to_bytes(WIDTHS[lc], "little")
    )


def encode_literal_header(length: int) -> bytes:
    lc = width_code(length)
    return bytes((OP_LITERAL | lc,)) + length.to_bytes(WIDTHS[lc], "little")


def encode_end(new_size: int, sha256: bytes | None) -> bytes:
    sc = width_code(new_size)
    op = OP_END | sc | (END_HAS_SHA if sha256 is not None else 0)
    return bytes((op,)) + new_size.to_bytes(WIDTHS[sc], "little") + (sha256 or b"")


def encode_delta_header() -> bytes:
    return DELTA_HEADER.pack(DELTA_MAGIC, VERSION)
