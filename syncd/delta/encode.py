"""The sender side: matching a new file against a signature into delta ops.

The search follows rsync's shape, tuned for mirrors where most of a changed
file is unchanged:

* Aligned mode.  After a match (and at the start) the next ``block_size``
  bytes are hashed with xxh3 alone and looked up; a changed block is tried
  once more one block further on, which settles in-place overwrites without
  rolling.  This runs at memory speed.
* Rolling mode.  Where aligned checks fail, the weak sum is computed at every
  offset of a window (numpy prefix sums), filtered through a bit table and
  the sorted weak sums, and only surviving offsets are hashed.  Windows grow
  from ``window_min`` to ``window_max`` while nothing matches and shrink back
  after a match.
* Bail-out.  Once ``bail_run`` bytes in a row have been rolled through with
  no match, the rest is sent as literals, and only a ``probe_window`` is
  rolled every ``probe_every`` bytes, so data that starts matching again
  late in the file is still found.

Memory is the signature's lookup tables plus one window of new data (at
most ``window_max + block_size`` bytes, the pending literal and the read-
ahead), whatever the file size.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from . import format as fmt
from .rollsum import Roller, block_sums, weak_sum
from .signature import Signature

__all__ = ["DeltaParams", "DeltaStats", "iter_delta", "delta_bytes", "samples_matching"]

log = logging.getLogger(__name__)

#: Encoded pieces are cut near this size so the transport can frame them.
PIECE_SIZE = 1 << 20
_PIECE_SLACK = 64
#: Below this strong length an aligned match is confirmed by its weak sum too.
_SHORT_STRONG = 8
#: Strong sums tried per sample by samples_matching, at most (a signature
#: whose weak sums hit everywhere costs no more than this).
_SAMPLE_TRIES = 256
#: Blocks checked at once where the new file follows the old one block by
#: block: from _RUN_START, doubling up to _RUN_BLOCKS while all match.
_RUN_START = 8
_RUN_BLOCKS = 256


@dataclass(frozen=True)
class DeltaParams:
    """Tuning of the search; defaults suit files from kilobytes to terabytes.

    Tests shrink these to force windows, reads and literals to split
    everywhere; callers normally leave them alone.
    """

    window_min: int = 16 << 10
    window_max: int = 1 << 20
    read_ahead: int = 4 << 20
    max_literal: int = fmt.MAX_LITERAL
    bail_run: int = 8 << 20
    probe_every: int = 8 << 20
    probe_window: int = 256 << 10
    #: A run of matched blocks goes out as a copy op every time it covers
    #: this much: the edge rebuilds the file while the rest is matched.
    copy_stream: int = 4 << 20

    def __post_init__(self) -> None:
        if not 1 <= self.window_min <= self.window_max:
            raise ValueError("need 1 <= window_min <= window_max")
        if not 1 <= self.max_literal <= fmt.MAX_LITERAL:
            raise ValueError(f"max_literal must be in [1, {fmt.MAX_LITERAL}]")
        if min(self.read_ahead, self.bail_run, self.probe_every, self.probe_window, self.copy_stream) < 1:
            raise ValueError("read_ahead, bail_run, probe_every, probe_window and copy_stream must be >= 1")


@dataclass
class DeltaStats:
    """What one delta did, filled in while it streams."""

    new_size: int = 0
    matched_bytes: int = 0
    literal_bytes: int = 0
    copy_ops: int = 0
    literal_ops: int = 0
    delta_size: int = 0
    #: Bytes whose weak sums were computed at every offset.
    rolled_bytes: int = 0
    bailed_out: bool = False
    #: Offset in the new file where the search first gave up, if it did.
    bailout_offset: int | None = None
    probes: int = 0
    #: Times a probe found matches again after a bail-out.
    resumed: int = 0


class _Index:
    """Lookup structures over a signature's full-size blocks.

    Blocks are found by a sorted array of 64-bit keys (the first 8 strong
    bytes, or the weak sum and up to 4 strong bytes when strong sums are
    short) rather than a dict: 12 bytes per block instead of about 120, so a
    million-block signature costs tens of megabytes, and lookups happen only
    off the fast path (the expected next block is compared directly).
    """

    def __init__(self, sig: Signature) -> None:
        self.sig = sig
        self.full = n = sig.full_blocks
        sl = sig.strong_len
        self.short_strong = sl < _SHORT_STRONG
        strong = np.frombuffer(sig.strong, dtype=np.uint8, count=n * sl).reshape(n, sl)
        if self.short_strong:
            prefix = np.zeros((n, 4), dtype=np.uint8)
            prefix[:, : min(sl, 4)] = strong[:, :4]
            keys = (sig.weak[:n].astype(np.uint64) << np.uint64(32)) | prefix.view(">u4").reshape(n).astype(np.uint64)
        else:
            keys = np.ascontiguousarray(strong[:, :8]).view(">u8").reshape(n).astype(np.uint64)
        # Stable, so among identical blocks the first wins, which keeps copies
        # of repeated content contiguous and mergeable.
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.order = order.astype(np.uint32)
        weaks = np.unique(sig.weak[:n])
        self.weaks = weaks
        bits = int(np.clip(int(max(n, 1) * 64 - 1).bit_length(), 16, 22))
        self.shift = np.uint32(32 - bits)
        self.table = np.zeros(1 << bits, dtype=bool)
        self.table[self._slot(weaks)] = True

    def find(self, h: bytes, weak: int | None = None) -> int | None:
        """First full block whose strong sum is h (and weak sum, for short strong sums)."""
        if self.short_strong:
            if weak is None:
                return None
            key = weak << 32 | int.from_bytes(h[:4].ljust(4, b"\0"), "big")
        else:
            key = int.from_bytes(h[:8], "big")
        keys, sig = self.keys, self.sig
        i = int(np.searchsorted(keys, key))
        while i < keys.size and keys[i] == key:
            idx = int(self.order[i])
            if sig.strong_of(idx) == h and (weak is None or int(sig.weak[idx]) == weak):
                return idx
            i += 1
        return None

    def _slot(self, sums: np.ndarray) -> np.ndarray:
        return (sums * np.uint32(0x9E3779B1)) >> self.shift

    def candidates(self, sums: np.ndarray) -> np.ndarray:
        """Offsets whose weak sum is one of the signature's, ascending."""
        hits = np.flatnonzero(self.table[self._slot(sums)])
        if hits.size == 0 or self.weaks.size == 0:
            return hits
        values = sums[hits]
        at = np.searchsorted(self.weaks, values)
        at[at == self.weaks.size] = 0
        return hits[self.weaks[at] == values]


class _Encoder:
    """One delta in progress: the window of new data, the pending ops, the search state.

    Positions (pos, lit) index ``data``, which holds the new file from
    offset ``base``; ``fill`` may slide it, so callers re-read them after it.
    """

    def __init__(
        self, sig: Signature, stats: DeltaStats, params: DeltaParams, new_sha256: bytes | None, embed: bool
    ) -> None:
        self.sig = sig
        self.B = sig.block_size
        self.sl = sig.strong_len
        self.stats = stats
        self.p = params
        self.index = _Index(sig)
        self.roller = Roller(self.B)
        self.given_sha = new_sha256
        self.sha = hashlib.sha256() if embed and new_sha256 is None else None
        self.chunks: Iterator | None = None
        self.eof = False
        self.data = b""
        self.view = memoryview(self.data)
        self.base = 0  # offset in the new file of data[0]
        self.pos = 0  # first byte of data not yet decided
        self.lit = 0  # start of the pending literal, data[lit:pos]
        self.copy_off = 0  # pending copy, merged while contiguous
        self.copy_len = 0
        self.next_idx: int | None = 0
        self.run_blocks = _RUN_START
        self.out: list[bytes] = []
        self.out_len = 0
        self.ready: list[bytes] = []
        # The search's mode (see the module docstring): aligned, rolling, or
        # bailed out (literals, and a probe window rolled now and then).
        self.searching = self.index.full > 0  # the signature has full blocks to find
        self.bailed = not self.searching
        self.rolling = False
        self.window = params.window_min
        self.unmatched = 0  # bytes rolled through since the last match
        self.next_probe = 0  # bailed out: where the next probe window starts

    # -- input --------------------------------------------------------------

    def fill(self, need: int) -> int:
        """Make ``need`` bytes available past pos (fewer only at EOF); return how many are."""
        avail = len(self.data) - self.pos
        if avail >= need or self.eof:
            return avail
        parts = [self.view[self.lit :]]
        got = avail
        want = need + self.p.read_ahead
        while got < want:
            try:
                chunk = next(self.chunks)
            except StopIteration:
                self.eof = True
                break
            view = fmt.byte_view(chunk)
            if not view.nbytes:
                continue
            if self.sha is not None:
                self.sha.update(view)
            parts.append(view)
            got += view.nbytes
        whole = parts[-1].obj
        if len(parts) == 2 and not parts[0].nbytes and type(whole) is bytes and len(whole) == parts[1].nbytes:
            self.data = parts[1].obj  # one whole bytes chunk: no copy
        else:
            self.data = b"".join(parts)
        self.view = memoryview(self.data)
        self.base += self.lit
        self.pos -= self.lit
        self.lit = 0
        return len(self.data) - self.pos

    # -- output -------------------------------------------------------------

    def put(self, piece: bytes) -> None:
        # The slack lets a full-size literal share a piece with its op header.
        if self.out_len + len(piece) > PIECE_SIZE + _PIECE_SLACK and self.out:
            self.ready.append(b"".join(self.out))
            self.out, self.out_len = [], 0
        self.out.append(piece)
        self.out_len += len(piece)

    def flush_copy(self) -> None:
        if self.copy_len:
            self.put(fmt.encode_copy(self.copy_off, self.copy_len))
            self.stats.copy_ops += 1
            self.copy_len = 0

    def emit_literal(self, end: int) -> None:
        """Send data[lit:end] as literal ops."""
        if end <= self.lit:
            return
        self.flush_copy()
        step = self.p.max_literal
        for start in range(self.lit, end, step):
            stop = min(end, start + step)
            self.put(fmt.encode_literal_header(stop - start))
            self.put(self.view[start:stop].tobytes())
            self.stats.literal_ops += 1
        self.stats.literal_bytes += end - self.lit
        self.lit = end

    def advance_literal(self, n: int) -> None:
        """Declare the next n bytes literal; send whole ops as they fill up."""
        self.pos += n
        if self.pos - self.lit >= self.p.max_literal:
            full = self.lit + (self.pos - self.lit) // self.p.max_literal * self.p.max_literal
            self.emit_literal(full)

    def emit_copy(self, at: int, old_off: int, length: int) -> None:
        """data[at:at+length] equals the old file at old_off; everything before it is literal."""
        self.emit_literal(at)
        if self.copy_len and self.copy_off + self.copy_len == old_off:
            self.copy_len += length
        else:
            self.flush_copy()
            self.copy_off, self.copy_len = old_off, length
        self.stats.matched_bytes += length
        self.pos = self.lit = at + length
        if self.copy_len >= self.p.copy_stream:
            # Out now, not when the run ends: a file that is mostly unchanged
            # is otherwise one copy op, sent only once all of it was matched.
            self.flush_copy()
            self.ready.append(b"".join(self.out))
            self.out, self.out_len = [], 0

    # -- matching -----------------------------------------------------------

    def strong(self, at: int, length: int) -> bytes:
        return xxhash.xxh3_128_digest(self.view[at : at + length])[: self.sl]

    def aligned(self, at: int, expected: int | None) -> int | None:
        """Index of the full block equal to data[at:at+B], checked by strong sum."""
        h = self.strong(at, self.B)
        idx = None
        if expected is not None and expected < self.index.full and self.sig.strong_of(expected) == h:
            idx = expected
        elif not self.index.short_strong:
            idx = self.index.find(h)
        if idx is not None and self.index.short_strong:
            if weak_sum(self.view[at : at + self.B]) != int(self.sig.weak[idx]):
                idx = None
        return idx

    def aligned_run(self) -> int:
        """How many full blocks from pos equal the old file's blocks
        next_idx, next_idx + 1, ... in order: the common case of a file
        mostly unchanged, checked many blocks to a call (their strong sums
        side by side) instead of block by block.  Only blocks already read
        are looked at; 0 leaves the decision to the block-by-block path."""
        B, sl, first = self.B, self.sl, self.next_idx
        # The batch doubles while whole batches match and starts small again
        # after a difference: a file changed every few blocks (an index
        # regenerated with entries added) does not hash blocks it then
        # looks at again one by one.
        n = min(self.index.full - first, (len(self.data) - self.pos) // B, self.run_blocks)
        if n < 2:
            return 0
        view, pos, digest = self.view, self.pos, xxhash.xxh3_128_digest
        got = b"".join([digest(view[pos + i * B : pos + (i + 1) * B])[:sl] for i in range(n)])
        want = self.sig.strong[first * sl : (first + n) * sl]
        if got == want:
            self.run_blocks = min(2 * self.run_blocks, _RUN_BLOCKS)
        else:
            self.run_blocks = _RUN_START
            same = np.frombuffer(got, dtype=np.uint8).reshape(n, sl) == np.frombuffer(want, dtype=np.uint8).reshape(n, sl)
            n = int(np.argmin(same.all(axis=1)))  # the first block that differs
            if n == 0:
                return 0
        if self.index.short_strong:  # short strong sums are confirmed by the weak ones too
            blocks = np.frombuffer(self.data, dtype=np.uint8, count=n * B, offset=pos).reshape(n, B)
            equal = block_sums(blocks) == self.sig.weak[first : first + n]
            if not equal.all():
                n = int(np.argmin(equal))
        return n

    def roll(self, window: int) -> bool:
        """Search one window of offsets from pos; on a match emit it and return True."""
        B = self.B
        avail = self.fill(window + B - 1)
        n = min(window, avail - B + 1)
        x = np.frombuffer(self.data, dtype=np.uint8, count=n + B - 1, offset=self.pos)
        sums = self.roller.sums(x)
        self.stats.rolled_bytes += n
        index = self.index
        for k in index.candidates(sums).tolist():
            h = self.strong(self.pos + k, B)
            idx = index.find(h, int(sums[k]) if index.short_strong else None)
            if idx is not None:
                self.emit_copy(self.pos + k, idx * B, B)
                self.next_idx = idx + 1
                return True
        self.advance_literal(n)
        self.next_idx = None
        return False

    def tail_matches(self, at: int) -> bool:
        """Whether data[at:at+r] is the old file's short last block of r bytes."""
        r = self.sig.tail_size
        last = self.sig.block_count - 1
        return self.strong(at, r) == self.sig.strong_of(last) and (
            not self.index.short_strong or weak_sum(self.view[at : at + r]) == int(self.sig.weak[last])
        )

    def tail(self) -> None:
        """At EOF with less than a block left: try the old file's short last block."""
        end = len(self.data)
        r = self.sig.tail_size
        if r and end - self.pos >= r and self.tail_matches(end - r):
            self.emit_copy(end - r, (self.sig.block_count - 1) * self.B, r)
        self.pos = end
        self.emit_literal(end)
        self.flush_copy()

    def run(self, chunks: Iterable) -> Iterator[bytes]:
        self.chunks = iter(chunks)
        B = self.B
        self.put(fmt.encode_delta_header())
        while True:
            if self.ready:
                yield from self._drain_ready()
            if self.bailed:
                if not self._probe():
                    break
                continue
            if not self.rolling and self._tail_follows():
                continue
            if self.fill(B) < B:
                break
            if not self.rolling:
                if self._aligned_match():
                    continue
                self.rolling = True
            self._roll_on()
        self.tail()
        new_size = self.base + len(self.data)
        self.stats.new_size = new_size
        digest = self.given_sha if self.sha is None else self.sha.digest()
        self.put(fmt.encode_end(new_size, digest))
        self.ready.append(b"".join(self.out))
        self.out, self.out_len = [], 0
        yield from self._drain_ready()

    def _probe(self) -> bool:
        """Bailed out: literals up to the next probe, where a probe window is
        rolled (a match resumes the search).  False at the end of the data."""
        p, B = self.p, self.B
        here = self.base + self.pos
        if not self.searching or here < self.next_probe:
            avail = self.fill(1)
            if avail == 0:
                return False
            step = avail if not self.searching else min(avail, self.next_probe - here)
            self.advance_literal(step)
            return True
        if self.fill(p.probe_window + B - 1) < B:
            return False
        self.stats.probes += 1
        if self.roll(p.probe_window):
            self.bailed, self.rolling, self.unmatched = False, False, 0
            self.window = p.window_min
            self.stats.resumed += 1
            log.debug("delta search resumed at offset %d", self.base + self.pos - B)
        else:
            self.next_probe = self.base + self.pos + p.probe_every
        return True

    def _tail_follows(self) -> bool:
        """Right after the old file's last full block: its short tail may
        follow with more data appended, the commonest growth of a file.
        True when it did (copied)."""
        r = self.sig.tail_size
        if self.next_idx != self.index.full or not r:
            return False
        if self.fill(r) >= r and self.tail_matches(self.pos):
            self.emit_copy(self.pos, (self.sig.block_count - 1) * self.B, r)
            self.next_idx = None
            return True
        return False

    def _aligned_match(self) -> bool:
        """Aligned mode: True when a copy was emitted at pos (a run of
        blocks, one block, or the block after an overwritten one)."""
        B = self.B
        if self.next_idx is not None:
            run = self.aligned_run()
            if run:
                first = self.next_idx
                self.emit_copy(self.pos, first * B, run * B)
                self.next_idx = first + run
                return True
        at = self.pos
        idx = self.aligned(at, self.next_idx)
        if idx is not None:
            self.emit_copy(at, idx * B, B)
            self.next_idx = idx + 1
            return True
        # An overwrite inside this block leaves the next one aligned.
        if self.fill(2 * B) >= 2 * B:
            at = self.pos  # fill may have moved the buffer
            expected = None if self.next_idx is None else self.next_idx + 1
            idx = self.aligned(at + B, expected)
            if idx is not None:
                self.advance_literal(B)
                self.emit_copy(at + B, idx * B, B)
                self.next_idx = idx + 1
                return True
        return False

    def _roll_on(self) -> None:
        """Rolling mode: one window rolled, the next one larger while nothing
        matches; bailed out after ``bail_run`` bytes without a match."""
        p, stats = self.p, self.stats
        before = self.base + self.pos
        if self.roll(self.window):
            self.rolling, self.unmatched, self.window = False, 0, p.window_min
            return
        self.unmatched += self.base + self.pos - before
        self.window = min(2 * self.window, p.window_max)
        if self.unmatched >= p.bail_run:
            self.bailed = True
            here = self.base + self.pos
            self.next_probe = here + p.probe_every
            if not stats.bailed_out:
                stats.bailed_out, stats.bailout_offset = True, here
            log.debug("delta search gave up at offset %d after %d unmatched bytes", here, self.unmatched)

    def _drain_ready(self) -> Iterator[bytes]:
        ready, self.ready = self.ready, []
        for piece in ready:
            self.stats.delta_size += len(piece)
            yield piece


def iter_delta(
    sig: Signature,
    new_chunks: Iterable,
    *,
    stats: DeltaStats | None = None,
    params: DeltaParams | None = None,
    new_sha256: bytes | None = None,
    embed_sha256: bool = False,
) -> Iterator[bytes]:
    """Encode the new file (buffers of any sizes) against ``sig``; yield delta pieces.

    Pieces are at most about ``PIECE_SIZE`` bytes each; their concatenation
    is the delta.  The END op carries the new file's SHA-256 when the caller
    passes it (``new_sha256``) or asks for it to be computed here
    (``embed_sha256``); the patcher then checks the rebuilt file against it.
    The push layer knows the digest from its manifest and gives it to
    ``Patcher.finish`` instead, so by default none is carried or computed.
    """
    if new_sha256 is not None and len(new_sha256) != 32:
        raise ValueError("new_sha256 must be a 32-byte SHA-256 digest")
    encoder = _Encoder(
        sig, stats if stats is not None else DeltaStats(), params or DeltaParams(), new_sha256, embed_sha256
    )
    return encoder.run(new_chunks)


def delta_bytes(
    sig: Signature,
    new,
    *,
    params: DeltaParams | None = None,
    stats: DeltaStats | None = None,
    embed_sha256: bool = True,
) -> bytes:
    """The whole delta of one in-memory new file (a convenience for tests).

    Unlike ``iter_delta`` it embeds the new file's SHA-256 by default, so
    ``patch_bytes`` checks the result without being told the digest.
    """
    return b"".join(iter_delta(sig, [new], params=params, stats=stats, embed_sha256=embed_sha256))


def samples_matching(sig: Signature, samples: Iterable) -> int:
    """How many of ``samples`` (buffers of the new file) hold at least one
    full block of the old file, found at any offset by weak and strong sum.

    A cheap look, before a delta, at whether the new file shares anything
    with the old one: a sender whose basis is only a guess (a file of a
    similar name) sends the file whole when no sample matches, instead of
    a delta of literals that zstd cannot shrink and that cost the search.
    """
    index = _Index(sig)
    B = sig.block_size
    if index.full == 0:
        return 0
    roller = Roller(B)
    found = 0
    for sample in samples:
        view = fmt.byte_view(sample)
        if view.nbytes < B:
            continue
        x = np.frombuffer(view, dtype=np.uint8)
        sums = roller.sums(x)
        for k in index.candidates(sums)[:_SAMPLE_TRIES].tolist():
            h = xxhash.xxh3_128_digest(view[k : k + B])[: sig.strong_len]
            if index.find(h, int(sums[k]) if index.short_strong else None) is not None:
                found += 1
                break
    return found
