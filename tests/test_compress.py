"""The one zstd policy (syncd.compress) that the pusher, the prewarm streams,
the stager serving a source and the bundles all ask."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import compress


def test_small_samples_and_compressed_names_go_as_they_are() -> None:
    text = b"Package: p\nVersion: 1\n\n" * 1000
    assert compress.should_compress(b"dists/Packages", text)
    assert not compress.should_compress(b"dists/Packages", text[:compress.MIN_SAMPLE - 1])
    assert compress.should_compress(b"dists/Packages", text[:compress.MIN_SAMPLE])
    assert not compress.should_compress(b"pool/a.DEB", text)  # the name says so, whatever the bytes
    assert not compress.should_compress(b"", os.urandom(1 << 16))  # a sample that does not shrink
    assert compress.named_compressed(b"x.tar.XZ") and not compress.named_compressed(b"x.tar")


def test_a_bundle_goes_compressed_only_when_that_saves_a_tenth() -> None:
    assert compress.compress_if_smaller(os.urandom(1 << 16)) is None
    text = b"abc" * 10_000
    packed = compress.compress_if_smaller(text)
    assert packed is not None and len(packed) < 0.9 * len(text)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=8))
def test_what_the_compressor_makes_the_decompressing_writer_gives_back(pieces: list[bytes]) -> None:
    cobj = compress.compressor()
    wire = b"".join(cobj.compress(p) for p in pieces) + cobj.flush()
    out = bytearray()
    writer = compress.decompressing_writer(out.extend)
    for i in range(0, len(wire), 777):
        writer.write(wire[i:i + 777])
    writer.flush()
    assert bytes(out) == b"".join(pieces)
