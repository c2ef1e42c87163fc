"""The delta engine: rolling sums, signatures, deltas and patches, round trips."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.delta import (
    DeltaParams,
    DeltaStats,
    Patcher,
    Signature,
    block_size_for,
    decode_signature,
    delta_bytes,
    iter_delta,
    make_signature,
    join_signatures,
    patch_bytes,
    signature_of_reader,
)
from syncd.delta import format as fmt
from syncd.delta.encode import PIECE_SIZE
from syncd.delta.rollsum import Roller, block_sums, weak_sum
from syncd.errors import DeltaFormatError, PatchMismatchError

#: Parameters small enough that every window, read and literal splits.
TINY = DeltaParams(
    window_min=1, window_max=3, read_ahead=1, max_literal=5, bail_run=50, probe_every=7, probe_window=2,
    copy_stream=1,
)
SMALL = DeltaParams(
    window_min=16, window_max=64, read_ahead=10, max_literal=100, bail_run=400, probe_every=100, probe_window=40,
    copy_stream=150,
)
PARAMS = st.sampled_from([DeltaParams(), SMALL, TINY])
BLOCK_SIZES = st.sampled_from([1, 2, 3, 7, 16, 64, 100])


def ref_weak(block: bytes) -> int:
    """rsync's weak sum straight from its definition."""
    n = len(block)
    a = sum(block) & 0xFFFF
    b = sum((n - i) * x for i, x in enumerate(block)) & 0xFFFF
    return a | b << 16


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def patch_pieces(old: bytes, pieces, expected: bytes | None = None) -> bytes:
    out = bytearray()

    def read_old(offset: int, length: int) -> bytes:
        assert 0 <= offset and length > 0 and offset + length <= len(old)
        return old[offset : offset + length]

    patcher = Patcher(read_old, len(old), out.extend)
    for piece in pieces:
        patcher.feed(piece)
    patcher.finish(expected)
    return bytes(out)


def pseudo_random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- rolling checksum ---------------------------------------------------------


def test_weak_sum_known_answers():
    assert weak_sum(b"") == 0
    assert weak_sum(b"abc") == 294 | 586 << 16
    # a = 32640, b = 256*32640 - sum(i*i) = 2796160 = 43648 mod 2**16
    assert weak_sum(bytes(range(256))) == 32640 | 43648 << 16
    assert weak_sum(b"\xff" * 70000) == ref_weak(b"\xff" * 70000)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.binary(min_size=n, max_size=300), st.just(n))))
def test_block_sums_match_definition(case):
    data, length = case
    n = len(data) // length
    arr = np.frombuffer(data, dtype=np.uint8, count=n * length).reshape(n, length)
    assert block_sums(arr).tolist() == [ref_weak(data[i * length : (i + 1) * length]) for i in range(n)]


@given(st.binary(max_size=300), st.integers(1, 50))
def test_rolling_sums_match_definition_at_every_offset(data, length):
    sums = Roller(length).sums(np.frombuffer(data, dtype=np.uint8))
    assert sums.tolist() == [ref_weak(data[k : k + length]) for k in range(len(data) - length + 1)]


def test_rolling_sums_wrap_past_64k_offsets():
    data = pseudo_random(70_000 + 1500, seed=1)
    roller = Roller(1500)
    sums = roller.sums(np.frombuffer(data, dtype=np.uint8))
    for k in (0, 1, 65_535, 65_536, 65_537, 70_000):
        assert sums[k] == ref_weak(data[k : k + 1500])
    # The ramp is reused between calls of different sizes.
    small = roller.sums(np.frombuffer(data[:3000], dtype=np.uint8))
    assert small.tolist() == sums[:1501].tolist()


# -- signatures ---------------------------------------------------------------


def test_block_size_for():
    assert block_size_for(0) == 700
    assert block_size_for(490_000) == 700
    assert block_size_for(1 << 20) == 1024
    assert block_size_for(256 << 20) == 16384
    assert block_size_for(10 << 30) == 103_616
    assert block_size_for(128 << 30) == 1 << 17
    assert block_size_for((128 << 30) + 1) == (1 << 17) + 8
    assert block_size_for(1 << 40) == 1 << 20
    assert block_size_for(1 << 50) == 1 << 20
    assert all(block_size_for(n) % 8 == 0 for n in (1 << 20, 5_000_000, 123_456_789))
    with pytest.raises(ValueError):
        block_size_for(-1)


@given(
    st.binary(max_size=2000),
    BLOCK_SIZES,
    st.integers(fmt.MIN_STRONG_LEN, fmt.MAX_STRONG_LEN),
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_signature_streams_and_round_trips(data, block_size, strong_len, cuts):
    whole = make_signature(data, block_size=block_size, strong_len=strong_len)
    streamed = make_signature(iter(split(data, cuts)), block_size=block_size, strong_len=strong_len)
    assert streamed == whole
    assert whole.file_size == len(data)
    assert whole.block_count == -(-len(data) // block_size)
    assert decode_signature(whole.encode()) == whole
    for i in range(whole.block_count):
        block = data[i * block_size : (i + 1) * block_size]
        assert int(whole.weak[i]) == ref_weak(block)


@given(st.binary(max_size=5000), st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_signature_of_reader_equals_make_signature(data, reads):
    # A reader that hands out fewer bytes than asked, in varying amounts.
    at = 0
    sizes = iter(reads * 10_000)

    def readinto(view: memoryview) -> int:
        nonlocal at
        n = min(len(view), next(sizes), len(data) - at)
        view[:n] = data[at : at + n]
        at += n
        return n

    got = signature_of_reader(readinto, file_size=len(data))
    assert got == make_signature(data)
    assert got.encode() == make_signature(data).encode()


@given(st.binary(max_size=5000), BLOCK_SIZES, st.integers(0, 5000))
def test_signatures_of_parts_join_into_the_whole(data, block_size, cut):
    # Parts cut at a block boundary, each read with the whole file's blocks.
    at = min(cut, len(data)) // block_size * block_size
    parts = [make_signature(data[:at], block_size=block_size),
             make_signature(data[at:], block_size=block_size)]
    assert join_signatures(parts) == make_signature(data, block_size=block_size)
    with pytest.raises(ValueError):
        join_signatures([])
    if at % block_size == 0 and len(data) > at + 1 and block_size > 1:
        ragged = make_signature(data[:at + 1], block_size=block_size)
        with pytest.raises(ValueError):
            join_signatures([ragged, make_signature(data[at + 1:], block_size=block_size)])


def test_signature_of_reader_records_what_was_read():
    data = pseudo_random(3 << 20)
    view_at = [0]

    def readinto(view: memoryview) -> int:
        n = min(len(view), len(data) - view_at[0])
        view[:n] = data[view_at[0] : view_at[0] + n]
        view_at[0] += n
        return n

    # The file shrank after its stat: the signature is of the bytes read.
    got = signature_of_reader(readinto, file_size=5 << 20)
    assert got == make_signature(data, block_size=got.block_size)
    assert got.file_size == len(data)


def test_a_long_match_streams_copy_ops():
    old = pseudo_random(1 << 20)
    sig = make_signature(old, block_size=256)
    pieces = list(iter_delta(sig, [old], params=DeltaParams(copy_stream=64 << 10)))
    # 16 copies of 64 KiB, each sent as soon as it is complete, and the end.
    assert len(pieces) >= 16
    assert all(len(p) < 64 for p in pieces)
    assert patch_bytes(old, b"".join(pieces)) == old


def test_signature_block_size_choice():
    data = pseudo_random(1 << 20)
    assert make_signature(data).block_size == 1024
    assert make_signature([data[:10], data[10:]]).block_size == 1024
    assert make_signature(iter([data]), file_size=len(data)).block_size == 1024
    with pytest.raises(ValueError):
        make_signature(iter([data]))
    with pytest.raises(ValueError):
        make_signature(data, block_size=0)
    with pytest.raises(ValueError):
        make_signature(data, strong_len=17)


def test_signature_encoding_known_answer():
    sig = make_signature(b"abcd", block_size=3, strong_len=2)
    header = fmt.SIG_HEADER.pack(b"sydS", 1, 2, 0, 3, 2, 4)
    import xxhash

    rows = (
        (294 | 586 << 16).to_bytes(4, "little")
        + xxhash.xxh3_128_digest(b"abc")[:2]
        + ref_weak(b"d").to_bytes(4, "little")
        + xxhash.xxh3_128_digest(b"d")[:2]
    )
    assert sig.encode() == header + rows


def _sig_header(**kw) -> bytes:
    fields = dict(magic=b"sydS", version=1, strong_len=4, reserved=0, block_size=8, count=2, file_size=16)
    fields.update(kw)
    return fmt.SIG_HEADER.pack(*fields.values())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"sydS",
        _sig_header(magic=b"XXXX") + bytes(16),
        _sig_header(version=2) + bytes(16),
        _sig_header(reserved=1) + bytes(16),
        _sig_header(strong_len=0) + bytes(8),
        _sig_header(strong_len=17) + bytes(42),
        _sig_header(block_size=0) + bytes(16),
        _sig_header(block_size=fmt.MAX_BLOCK_SIZE + 1, count=1) + bytes(8),
        _sig_header(count=1 << 40, file_size=8 << 40),
        _sig_header(count=3) + bytes(24),
        _sig_header(file_size=17) + bytes(16),
        _sig_header() + bytes(15),
        _sig_header() + bytes(17),
    ],
)
def test_decode_signature_rejects_hostile_input(data):
    with pytest.raises(DeltaFormatError):
        decode_signature(data)


def test_decode_signature_block_limit():
    sig = make_signature(bytes(1000), block_size=10)
    assert decode_signature(sig.encode(), max_blocks=100).block_count == 100
    with pytest.raises(DeltaFormatError):
        decode_signature(sig.encode(), max_blocks=99)


@given(st.binary(max_size=300), st.integers(0, 400), st.binary(max_size=8))
def test_decode_signature_fuzz_raises_only_format_errors(data, cut, junk):
    wire = make_signature(data, block_size=16, strong_len=4).encode()
    for candidate in (wire[:cut], wire[:cut] + junk, junk + wire[cut:]):
        try:
            decode_signature(candidate)
        except DeltaFormatError:
            pass


# -- round trips --------------------------------------------------------------


SIZES = [0, 1, 2, 3, 7, 15, 100, 1000, 4096]


@pytest.mark.parametrize("block_size", [1, 7, 64, 700])
def test_round_trip_every_pair_of_sizes(block_size):
    rng = random.Random(block_size)
    files = [bytes(rng.getrandbits(8) for _ in range(n)) for n in SIZES]
    files += [files[-1][:n] for n in (block_size, 2 * block_size, 3 * block_size)]
    for old in files:
        sig = make_signature(old, block_size=block_size)
        for new in files:
            for params in (DeltaParams(), TINY):
                assert patch_bytes(old, delta_bytes(sig, new, params=params)) == new


def mutate(old: bytes, ops) -> bytes:
    data = bytearray(old)
    for kind, where, size, payload in ops:
        at = where % (len(data) + 1)
        if kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at : at + size]
        elif kind == "overwrite":
            data[at : at + len(payload)] = payload
        elif kind == "append":
            data += payload
        elif kind == "truncate":
            del data[at:]
        elif kind == "move":
            piece = bytes(data[at : at + size])
            del data[at : at + size]
            to = (where * 7919) % (len(data) + 1)
            data[to:to] = piece
    return bytes(data)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "overwrite", "append", "truncate", "move"]),
        st.integers(0, 10_000),
        st.integers(0, 300),
        st.binary(max_size=40),
    ),
    max_size=6,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 3000),
    st.integers(0, 2**32 - 1),
    MUTATIONS,
    BLOCK_SIZES,
    PARAMS,
    st.lists(st.integers(0, 5000), max_size=6),
    st.lists(st.integers(0, 5000), max_size=6),
    st.booleans(),
)
def test_round_trip_mutations(size, seed, ops, block_size, params, new_cuts, delta_cuts, low_entropy):
    old = pseudo_random(size, seed)
    if low_entropy:
        old = bytes(b & 3 for b in old)
    new = mutate(old, ops)
    sig = make_signature(iter(split(old, new_cuts)), block_size=block_size, strong_len=16)
    stats = DeltaStats()
    delta = b"".join(iter_delta(sig, split(new, new_cuts), stats=stats, params=params))
    assert stats.new_size == len(new)
    assert stats.matched_bytes + stats.literal_bytes == len(new)
    assert stats.delta_size == len(delta)
    expected = hashlib.sha256(new).digest()
    assert patch_pieces(old, split(delta, delta_cuts), expected) == new


@given(st.integers(0, 2000), st.integers(0, 2**32 - 1), MUTATIONS, st.sampled_from([2, 3, 4, 7, 8]), PARAMS)
def test_round_trip_truncated_strong_sums(size, seed, ops, strong_len, params):
    old = pseudo_random(size, seed)
    new = mutate(old, ops)
    sig = decode_signature(make_signature(old, block_size=16, strong_len=strong_len).encode())
    delta = delta_bytes(sig, new, params=params)
    try:
        assert patch_bytes(old, delta) == new
    except PatchMismatchError:
        # A short strong sum may collide; the SHA-256 guard must catch it.
        assert strong_len < 8


def test_delta_encoding_known_answer():
    old = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(32))
    new = old[:256] + b"XYZ" + old[256:]
    sig = make_signature(old, block_size=256)
    delta = delta_bytes(sig, new, embed_sha256=False)
    assert delta.hex() == (
        "7379644401"  # "sydD", version 1
        "41" "00" "0001"  # COPY offset 0 (1 byte), length 256 (2 bytes)
        "50" "03" "58595a"  # LITERAL 3 bytes "XYZ"
        "45" "0001" "0003"  # COPY offset 256, length 768 (merged blocks 1-3)
        "61" "0304"  # END, new size 1027 (2 bytes), no digest
    )
    with_sha = delta_bytes(sig, new)
    assert with_sha[:-35] == delta[:-3]
    assert with_sha[-35:] == bytes.fromhex("650304") + hashlib.sha256(new).digest()


# -- behaviour ----------------------------------------------------------------


def test_identical_file_is_one_copy():
    old = pseudo_random(100_000 + 123)
    stats = DeltaStats()
    delta = delta_bytes(make_signature(old), old, stats=stats)
    assert (stats.copy_ops, stats.literal_ops, stats.matched_bytes) == (1, 0, len(old))
    assert len(delta) < 50


def test_insertion_sends_only_the_insert():
    old = pseudo_random(1 << 20)
    new = old[: 500_000] + b"x" * 1000 + old[500_000:]
    stats = DeltaStats()
    delta = delta_bytes(make_signature(old), new, stats=stats)
    # The block holding the insertion point goes too: 488 * 1024 < 500_000.
    assert stats.literal_bytes == 1000 + 1024
    assert len(delta) < 2024 + 80  # ops, header and the embedded SHA-256
    assert patch_bytes(old, delta) == new


@pytest.mark.parametrize("block_size", [7, 700, 1024, 4096])
def test_append_sends_only_the_appended_bytes(block_size):
    old = pseudo_random(100_003, seed=8)
    for appended in (b"", b"x", pseudo_random(5000, seed=9)):
        stats = DeltaStats()
        delta = delta_bytes(make_signature(old, block_size=block_size), old + appended, stats=stats)
        assert (stats.literal_bytes, stats.copy_ops) == (len(appended), 1)
        assert patch_bytes(old, delta) == old + appended


def test_unrelated_file_bails_out_with_large_literals():
    old = pseudo_random(1 << 20, seed=1)
    new = pseudo_random(3 << 20, seed=2)
    stats = DeltaStats()
    params = DeltaParams(bail_run=256 << 10, probe_every=512 << 10, probe_window=64 << 10)
    delta = delta_bytes(make_signature(old), new, stats=stats, params=params)
    assert stats.bailed_out and stats.bailout_offset <= 512 << 10
    assert stats.rolled_bytes < 1 << 20
    assert stats.literal_ops <= 4
    assert patch_bytes(old, delta) == new


def test_search_resumes_after_bail_out():
    old = pseudo_random(1 << 20, seed=3)
    new = pseudo_random(1 << 20, seed=4) + old
    stats = DeltaStats()
    params = DeltaParams(bail_run=128 << 10, probe_every=128 << 10, probe_window=8 << 10)
    delta = delta_bytes(make_signature(old), new, stats=stats, params=params)
    assert stats.bailed_out and stats.resumed >= 1
    assert stats.matched_bytes > len(old) - (256 << 10)
    assert patch_bytes(old, delta) == new


def test_old_file_smaller_than_a_block_sends_literals():
    stats = DeltaStats()
    new = pseudo_random(5000)
    delta = delta_bytes(make_signature(b"tiny", block_size=700), new, stats=stats)
    assert stats.literal_bytes == 5000 and not stats.bailed_out
    assert patch_bytes(b"tiny", delta) == new


def test_pieces_are_bounded():
    old = pseudo_random(1 << 20, seed=5)
    new = pseudo_random(5 << 20, seed=6)
    pieces = list(iter_delta(make_signature(old), [new]))
    assert len(pieces) > 4
    assert max(len(p) for p in pieces) <= PIECE_SIZE + 64


def test_delta_streams_while_reading():
    import itertools

    old = pseudo_random(1 << 20, seed=10)
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield pseudo_random(64 << 10, seed=100 + i)

    pieces = list(itertools.islice(iter_delta(make_signature(old), endless()), 20))
    assert sum(len(p) for p in pieces) > 19 << 20
    # 20 pieces of about 1 MiB out, within a read-ahead and a window of input.
    assert len(consumed) * (64 << 10) < (20 << 20) + (8 << 20)


def test_encoder_memory_is_bounded_by_the_window():
    import tracemalloc

    old = pseudo_random(256 << 10, seed=7)
    sig = make_signature(old, block_size=1024)
    params = DeltaParams(read_ahead=256 << 10, window_max=64 << 10)

    def stream(total: int):
        # The old file shifted by one byte per round: matches everywhere, never aligned.
        for i in range(total // len(old)):
            yield old[i % 7 :] + old[: i % 7]

    peaks = []
    for total in (4 << 20, 16 << 20):
        tracemalloc.start()
        stats = DeltaStats()
        for _ in iter_delta(sig, stream(total), stats=stats, params=params):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert stats.new_size == total
    assert peaks[1] < peaks[0] * 1.5 + (256 << 10)
    assert peaks[1] < 8 << 20


def test_iter_delta_accepts_any_buffers():
    old = pseudo_random(10_000)
    new = old[:5000] + b"new" + old[5000:]
    sig = make_signature([memoryview(old), bytearray(old[:0])], block_size=64)
    chunks = [memoryview(new)[:100], bytearray(new[100:200]), np.frombuffer(new[200:], dtype=np.uint8)]
    assert patch_bytes(old, b"".join(iter_delta(sig, chunks)), hashlib.sha256(new).digest()) == new
    for chunks in ([memoryview(new)[1:]], [memoryview(b"." + new)[1:]], [new[:-1], memoryview(new)[-1:]]):
        delta = b"".join(iter_delta(sig, chunks))
        assert patch_bytes(old, delta, hashlib.sha256(b"".join(chunks)).digest()) == b"".join(chunks)
    with pytest.raises(ValueError):
        list(iter_delta(sig, [new], new_sha256=b"short"))


# -- patcher checks -----------------------------------------------------------


OLD = pseudo_random(5000, seed=9)
NEW = OLD[:1000] + b"inserted" + OLD[1500:] + b"appended"
SIG = make_signature(OLD, block_size=100)


def _delta(*ops: bytes) -> bytes:
    return fmt.encode_delta_header() + b"".join(ops)


def test_patcher_checks_expected_digest():
    delta = delta_bytes(SIG, NEW, embed_sha256=False)
    assert patch_pieces(OLD, [delta], hashlib.sha256(NEW).digest()) == NEW
    with pytest.raises(PatchMismatchError):
        patch_pieces(OLD, [delta], hashlib.sha256(b"other").digest())
    # With nothing to compare against, finish returns the digest for the caller.
    out = bytearray()
    p = Patcher(lambda o, n: OLD[o : o + n], len(OLD), out.extend)
    p.feed(delta)
    assert p.finish() == hashlib.sha256(NEW).digest()


def test_patch_against_a_different_old_file_is_a_mismatch():
    delta = delta_bytes(SIG, NEW)
    other = bytearray(OLD)
    other[10] ^= 1
    with pytest.raises(PatchMismatchError):
        patch_bytes(bytes(other), delta)
    with pytest.raises(PatchMismatchError):
        patch_pieces(OLD, [delta_bytes(SIG, NEW, embed_sha256=False)], hashlib.sha256(NEW + b"!").digest())


def test_patcher_rejects_short_reads_of_the_old_file():
    delta = delta_bytes(SIG, NEW)
    p = Patcher(lambda o, n: OLD[o : o + n - 1], len(OLD), lambda b: None)
    with pytest.raises(PatchMismatchError):
        p.feed(delta)


@pytest.mark.parametrize(
    "delta",
    [
        b"",
        b"syd",
        b"XXXX\x01" + fmt.encode_end(0, None),
        b"sydD\x02" + fmt.encode_end(0, None),
        _delta(),
        _delta(b"\x00"),
        _delta(b"\x53"),
        _delta(b"\x6f" + bytes(40)),
        _delta(fmt.encode_copy(4990, 11), fmt.encode_end(11, None)),
        _delta(fmt.encode_copy(5000, 1), fmt.encode_end(1, None)),
        _delta(fmt.encode_copy(2**64 - 1, 2**64 - 1), fmt.encode_end(0, None)),
        _delta(fmt.encode_copy(0, 0), fmt.encode_end(0, None)),
        _delta(bytes([fmt.OP_LITERAL | 2]) + (fmt.MAX_LITERAL + 1).to_bytes(4, "little")),
        _delta(bytes([fmt.OP_LITERAL, 0]), fmt.encode_end(0, None)),
        _delta(fmt.encode_literal_header(10) + b"short"),
        _delta(fmt.encode_end(0, None), b"garbage"),
        _delta(fmt.encode_copy(0, 10)),
    ],
)
def test_patcher_rejects_hostile_deltas(delta):
    reads = []

    def read_old(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        assert offset + length <= len(OLD)
        return OLD[offset : offset + length]

    p = Patcher(read_old, len(OLD), lambda b: None)
    with pytest.raises(DeltaFormatError):
        p.feed(delta)
        p.finish()
    with pytest.raises(DeltaFormatError):
        p.feed(b"more")


def test_patcher_output_limit():
    delta = _delta(*[fmt.encode_copy(0, len(OLD))] * 1000, fmt.encode_end(1000 * len(OLD), None))
    p = Patcher(lambda o, n: OLD[o : o + n], len(OLD), lambda b: None, max_output=20_000)
    with pytest.raises(DeltaFormatError):
        p.feed(delta)


def test_patcher_size_mismatch_with_end_op():
    with pytest.raises(PatchMismatchError):
        patch_bytes(OLD, _delta(fmt.encode_copy(0, 10), fmt.encode_end(11, None)))


def test_patcher_large_copies_are_read_in_bounded_pieces():
    old = bytes(3 << 20)
    reads = []

    def read_old(offset: int, length: int) -> bytes:
        reads.append(length)
        return old[offset : offset + length]

    p = Patcher(read_old, len(old), lambda b: None)
    p.feed(delta_bytes(make_signature(old, block_size=4096), old))
    p.finish()
    assert max(reads) <= 1 << 20 and sum(reads) == len(old)


@given(st.data())
def test_patcher_fuzz_only_typed_errors(data):
    delta = bytearray(delta_bytes(SIG, NEW, params=SMALL))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(delta)))
        if kind == "flip" and at < len(delta):
            delta[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del delta[at:]
        else:
            delta[at:at] = data.draw(st.binary(min_size=1, max_size=9))
    cuts = data.draw(st.lists(st.integers(0, len(delta)), max_size=4))
    try:
        out = patch_pieces(OLD, split(bytes(delta), cuts))
    except (DeltaFormatError, PatchMismatchError):
        return
    assert out == NEW


def test_truncation_at_every_point_is_detected():
    delta = delta_bytes(SIG, NEW, params=SMALL)
    for cut in range(len(delta)):
        with pytest.raises((DeltaFormatError, PatchMismatchError)):
            patch_pieces(OLD, [delta[:cut]])


def test_signature_type_is_exported():
    assert isinstance(make_signature(b"x", block_size=1), Signature)
