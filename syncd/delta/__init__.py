"""The rsync algorithm as a pure library: signatures, deltas, patches.

The edge sends block signatures of its old copy (``make_signature``), the
sender streams a delta of the new file against them (``iter_delta``), and the
edge rebuilds the new file (``Patcher``), checked by SHA-256.  No I/O happens
here: everything takes buffers or iterators of buffers and yields bytes.
The byte format is in ``docs/delta-format.md``.
"""

from .encode import DeltaParams, DeltaStats, delta_bytes, iter_delta, samples_matching
from .patch import Patcher, patch_bytes
from .signature import (Signature, block_size_for, decode_signature, join_signatures, make_signature,
                        signature_of_reader)

__all__ = [
    "DeltaParams",
    "DeltaStats",
    "Patcher",
    "Signature",
    "block_size_for",
    "decode_signature",
    "delta_bytes",
    "iter_delta",
    "make_signature",
    "join_signatures",
    "signature_of_reader",
    "patch_bytes",
    "samples_matching",
]
