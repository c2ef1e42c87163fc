"""The weak rolling checksum, vectorized: per block and at every offset.

It is rsync's: for a block x[0..L-1], ``a = sum(x[i])`` and
``b = sum((L - i) * x[i])``, both modulo 2**16, and the 32-bit value is
``a | b << 16``.  rsync's sums are kept (rather than a stronger rolling hash)
because they can be computed at every offset from two prefix sums, which is
the one form numpy evaluates without a per-byte Python loop, and a wrong
candidate only costs one xxh3 of a block.

All arithmetic is done in uint16 (or uint32) arrays and allowed to wrap:
wrapping is exactly the modulo 2**16 the definition asks for.
"""

from __future__ import annotations

import numpy as np


def block_sums(blocks: np.ndarray) -> np.ndarray:
    """Weak sums of each row of a (n, L) uint8 array, as uint32."""
    length = blocks.shape[1]
    a = blocks.sum(axis=1, dtype=np.uint32) & np.uint32(0xFFFF)
    # Weights (L - i) reduced mod 2**16; einsum accumulates in uint16, wrapping.
    weights = ((length - np.arange(length, dtype=np.int64)) & 0xFFFF).astype(np.uint16)
    b = np.einsum("ij,j->i", blocks, weights).astype(np.uint32)
    return a | (b << np.uint32(16))


def weak_sum(data) -> int:
    """Weak sum of one buffer (a block, possibly the short last one)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size == 0:
        return 0
    return int(block_sums(arr.reshape(1, -1))[0])


class Roller:
    """Weak sums at every offset of a buffer, for one fixed block length.

    Keeps its index ramp between calls so that rolling window after window
    allocates only the arrays of the window itself.
    """

    def __init__(self, block_len: int) -> None:
        self.block_len = block_len
        self._ramp = np.zeros(0, dtype=np.uint16)

    def _ramp_of(self, n: int) -> np.ndarray:
        if self._ramp.size < n:
            self._ramp = (np.arange(max(n, 2 * self._ramp.size), dtype=np.int64) & 0xFFFF).astype(np.uint16)
        return self._ramp[:n]

    def sums(self, x: np.ndarray) -> np.ndarray:
        """Weak sums of x[k:k+L] for k in 0..len(x)-L, as uint32."""
        L = self.block_len
        n = x.size - L + 1
        if n <= 0:
            return np.zeros(0, dtype=np.uint32)
        ramp = self._ramp_of(x.size + L)
        c1 = np.empty(x.size + 1, dtype=np.uint16)
        c1[0] = 0
        np.cumsum(x, dtype=np.uint16, out=c1[1:])
        c2 = np.empty(x.size + 1, dtype=np.uint16)
        c2[0] = 0
        np.cumsum(x * ramp[: x.size], dtype=np.uint16, out=c2[1:])
        a = c1[L : L + n] - c1[:n]
        # sum over m in [k, k+L) of (L - (m - k)) x[m] = (L + k) * a - sum m x[m]
        b = ramp[L : L + n] * a - (c2[L : L + n] - c2[:n])
        return a.astype(np.uint32) | (b.astype(np.uint32) << np.uint32(16))
