"""Handshake, framing and value codec: round trips and hostile input."""

from __future__ import annotations

import ctypes
import struct
import tracemalloc
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import ProtocolError
from syncd.protocol import (
    DEFAULT_MAX_BODY,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    BodyPool,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    decode_value,
    encode_value,
    frame_header,
    handshake,
    hello_bytes,
    negotiate,
    parse_hello,
)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=40,
)


class Chunked:
    """A recv() over fixed bytes that returns them in the given piece sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.sizes = sizes or [1 << 20]
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        size = min(n, self.sizes[self.calls % len(self.sizes)])
        self.calls += 1
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out

    def into(self, view: memoryview) -> int:
        """recv_into: the same pieces, written into the caller's buffer."""
        out = self(len(view))
        view[:len(out)] = out
        return len(out)


def read_all(data: bytes, sizes: list[int] | None = None, **kw) -> list[Frame]:
    return list(FrameReader(Chunked(data, sizes or []), **kw))


# ---------------------------------------------------------------- values


@given(values)
def test_value_round_trip(value):
    assert decode_value(encode_value(value)) == value


def test_value_types_are_exact():
    assert decode_value(encode_value(True)) is True
    assert decode_value(encode_value(0)) == 0 and type(decode_value(encode_value(0))) is int
    assert decode_value(encode_value((1, b"x"))) == [1, b"x"]
    assert decode_value(encode_value(bytearray(b"ab"))) == b"ab"
    # bytes, not views of the input (which compare equal), from any input buffer.
    for raw in (encode_value([b"ab", {"k": b""}]), memoryview(encode_value([b"ab", {"k": b""}]))):
        got = decode_value(raw)
        assert type(got[0]) is bytes and type(got[1]["k"]) is bytes
    # Names travel as bytes even when they are not UTF-8.
    assert decode_value(encode_value({"path": b"caf\xe9/\xff"})) == {"path": b"caf\xe9/\xff"}


@pytest.mark.parametrize("bad", [1 << 63, -(1 << 63) - 1, 1.5, {1: 2}, object(), {"a": {3}}])
def test_unencodable_values_are_refused(bad):
    with pytest.raises(ProtocolError):
        encode_value(bad)


def test_encode_refuses_deep_nesting():
    value: list = []
    for _ in range(40):
        value = [value]
    with pytest.raises(ProtocolError, match="deeper"):
        encode_value(value)


@given(values, st.data())
def test_truncated_values_raise_protocol_error(value, data):
    raw = encode_value(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(ProtocolError):
        decode_value(raw[:cut])


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_protocol_error(raw):
    try:
        decode_value(raw)
    except ProtocolError:
        pass


def test_hostile_values():
    u32 = struct.Struct(">I").pack
    cases = {
        "huge bytes length": b"\x04" + u32(0xFFFFFFFF),
        "huge str length": b"\x05" + u32(0x7FFFFFFF) + b"abc",
        "list count beyond input": b"\x06" + u32(1_000_000_000) + b"\x00" * 10,
        "dict count beyond input": b"\x07" + u32(1_000_000) + b"\x00" * 30,
        "bad utf-8 str": b"\x05" + u32(2) + b"\xc3\x28",
        "bad utf-8 key": b"\x07" + u32(1) + b"\x00\x01\xff\x00",
        "duplicate key": b"\x07" + u32(2) + b"\x00\x01a\x00\x00\x01a\x00",
        "unknown tag": b"\x09",
        "trailing bytes": b"\x00\x00",
        "short int": b"\x03\x00\x00",
        "empty": b"",
    }
    for name, raw in cases.items():
        with pytest.raises(ProtocolError):
            decode_value(raw)
            pytest.fail(name)


def test_deep_nesting_is_refused_without_recursion_error():
    raw = (b"\x06" + struct.pack(">I", 1)) * 100_000 + b"\x00"
    with pytest.raises(ProtocolError, match="deeper"):
        decode_value(raw)


def test_hostile_counts_allocate_nothing_big():
    raw = b"\x06" + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_value(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


# ---------------------------------------------------------------- handshake


def test_hello_round_trip_and_negotiation():
    raw = hello_bytes((1, 3))
    assert raw == MAGIC + b"\x01\x03" and len(raw) == 7
    assert parse_hello(raw) == (1, 3)
    assert negotiate((1, 3), (1, 1)) == (1, 1)
    assert negotiate(PROTOCOL_VERSION, PROTOCOL_VERSION) == PROTOCOL_VERSION


def test_handshake_over_a_pipe_pair():
    import os
    import threading

    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    results = {}

    def side(name, rfd, wfd, version):
        reader = FrameReader(lambda n: os.read(rfd, n))
        writer = FrameWriter(lambda b: os.write(wfd, b))
        try:
            results[name] = handshake(writer, reader, version)
        except ProtocolError as err:
            results[name] = err

    threads = [threading.Thread(target=side, args=("a", a_read, a_write, (1, 4))),
               threading.Thread(target=side, args=("b", b_read, b_write, (1, 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for fd in (a_read, b_write, b_read, a_write):
        os.close(fd)
    assert results == {"a": (1, 2), "b": (1, 2)}


def test_stream_id_out_of_range_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        FrameWriter(lambda b: None).message({}, stream=1 << 32)


def test_incompatible_major_names_both_versions():
    with pytest.raises(ProtocolError, match=r"1\.0.*2\.5"):
        negotiate((1, 0), (2, 5))


@pytest.mark.parametrize("raw", [b"SSH-2.0", b"bash: syncd: not found\n", b"SYNCX\x01\x00"])
def test_hello_from_a_stranger_is_refused(raw):
    reader = FrameReader(Chunked(raw, []))
    with pytest.raises(ProtocolError, match="handshake"):
        reader.read_hello()


# ---------------------------------------------------------------- frames

frames = st.lists(
    st.one_of(
        st.tuples(st.just(FrameType.MESSAGE), st.integers(0, 2**32 - 1), values),
        st.tuples(st.just(FrameType.DATA), st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=3000)),
        st.tuples(st.just(FrameType.END), st.integers(0, 2**32 - 1), st.none() | values),
    ),
    max_size=25,
)


def write_frames(items, max_body=DEFAULT_MAX_BODY, flush_threshold=256 * 1024):
    sent: list[bytes] = []
    writer = FrameWriter(lambda b: sent.append(bytes(b)), max_body=max_body,
                         flush_threshold=flush_threshold)
    writer.hello()
    for kind, stream, payload in items:
        if kind is FrameType.MESSAGE:
            writer.message(payload, stream)
        elif kind is FrameType.DATA:
            writer.data(stream, payload)
        else:
            writer.end(stream, payload)
    writer.flush()
    return b"".join(sent), sent


@given(frames, st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(16, 1024))
def test_frame_stream_round_trip_at_any_split(items, sizes, max_body):
    raw, _ = write_frames(items, max_body=max(max_body, 1 << 16))
    reader = FrameReader(Chunked(raw, sizes), max_body=1 << 16)
    assert reader.read_hello() == PROTOCOL_VERSION
    assert [(f.kind, f.stream, f.payload) for f in reader] == [tuple(i) for i in items]


@given(frames, st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(16, 1024))
def test_frame_stream_round_trip_with_recv_into(items, sizes, max_body):
    """DATA bodies read straight into their own buffers parse the same."""
    raw, _ = write_frames(items, max_body=max(max_body, 1 << 16))
    chunked = Chunked(raw, sizes)
    reader = FrameReader(chunked, recv_into=chunked.into, max_body=1 << 16, block_size=64)
    assert reader.read_hello() == PROTOCOL_VERSION
    assert [(f.kind, f.stream, f.payload) for f in reader] == [tuple(i) for i in items]


@given(frames, st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(16, 1024),
       st.integers(8, 2000))
def test_frame_stream_round_trip_with_reused_data_buffer(items, sizes, max_body, block_size):
    """reuse_data: each DATA body is a view of one buffer, right until the next frame is read."""
    raw, _ = write_frames(items, max_body=max(max_body, 1 << 16))
    chunked = Chunked(raw, sizes)
    reader = FrameReader(chunked, recv_into=chunked.into, max_body=1 << 16, block_size=block_size,
                         reuse_data=True)
    assert reader.read_hello() == PROTOCOL_VERSION
    got = []
    for f in reader:
        if f.kind is FrameType.DATA:
            assert isinstance(f.payload, memoryview)
            got.append((f.kind, f.stream, bytes(f.payload)))  # copied before the next read
        else:
            got.append((f.kind, f.stream, f.payload))
    assert got == [tuple(i) for i in items]


@given(frames, st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(8, 2000),
       st.lists(st.integers(1, 900), min_size=1, max_size=6), st.booleans(), st.booleans())
def test_lazy_data_bodies_read_in_any_pieces(items, sizes, block_size, takes, use_into, whole):
    """read_frame(lazy=True): a DATA body stays in the stream, and
    read_body_into (in pieces of any size) or read_body gives exactly its bytes."""
    raw, _ = write_frames(items, max_body=1 << 16)
    chunked = Chunked(raw, sizes)
    reader = FrameReader(chunked, recv_into=chunked.into if use_into else None, max_body=1 << 16,
                         block_size=block_size, reuse_data=use_into)
    assert reader.read_hello() == PROTOCOL_VERSION
    got = []
    i = 0
    while (f := reader.read_frame(lazy=True)) is not None:
        if f.kind is FrameType.DATA:
            if whole:
                body = bytes(reader.read_body())
            else:
                body = bytearray()
                while True:
                    buf = bytearray(takes[i % len(takes)])
                    i += 1
                    n = reader.read_body_into(memoryview(buf))
                    if not n:
                        break
                    body += buf[:n]
            assert len(body) == f.payload
            got.append((f.kind, f.stream, bytes(body)))
        else:
            got.append((f.kind, f.stream, f.payload))
    assert got == [tuple(i) for i in items]


def test_a_lazy_body_must_be_read_before_the_next_frame():
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 500), (FrameType.END, 3, None)])
    reader = FrameReader(Chunked(raw, [700]))
    reader.read_hello()
    assert reader.read_frame(lazy=True).payload == 500
    with pytest.raises(ProtocolError, match="left unread"):
        reader.read_frame()
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 5000)])
    chunked = Chunked(raw[:-100], [700])
    reader = FrameReader(chunked, recv_into=chunked.into, block_size=64)
    reader.read_hello()
    reader.read_frame(lazy=True)
    with pytest.raises(ProtocolError, match="stream ended inside a DATA frame body"):
        while reader.read_body_into(memoryview(bytearray(4096))):
            pass


def test_reused_data_buffer_truncated_body():
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 5000)])
    chunked = Chunked(raw[:-100], [700])
    reader = FrameReader(chunked, recv_into=chunked.into, block_size=64, reuse_data=True)
    reader.read_hello()
    with pytest.raises(ProtocolError, match="stream ended inside a DATA frame body"):
        reader.read_frame()


# ---------------------------------------------------------------- recycled DATA bodies


@given(st.lists(st.tuples(st.binary(max_size=3000), st.booleans()), max_size=20),
       st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(8, 2000),
       st.integers(1, 2000), st.integers(0, 4), st.integers(0, 6))
def test_recycled_bodies_equal_the_bodies_sent(bodies, sizes, block_size, pool_size, limit, held):
    """With a BodyPool, every DATA body read equals the one sent, for any
    body sizes (empty, smaller or larger than the pool's buffers) and split
    points, while its consumer still holds up to ``held`` earlier bodies:
    a buffer not given back is never read into."""
    raw = bytearray(hello_bytes())
    for i, (body, after_message) in enumerate(bodies):
        if after_message:  # the body then starts in the reader's own buffer
            raw += frame_header(FrameType.MESSAGE, i, 1) + b"\x00"
        raw += frame_header(FrameType.DATA, i, len(body)) + body
    chunked = Chunked(bytes(raw), sizes)
    pool = BodyPool(pool_size, limit=limit)
    reader = FrameReader(chunked, recv_into=chunked.into, block_size=block_size, bodies=pool)
    assert reader.read_hello() == PROTOCOL_VERSION
    out: deque[tuple[int, memoryview]] = deque()
    got: list[tuple[int, bytes]] = []
    for f in reader:
        if f.kind is FrameType.DATA:
            assert isinstance(f.payload, memoryview)
            out.append((f.stream, f.payload))
            if len(out) > held:
                stream, body = out.popleft()
                got.append((stream, bytes(body)))
                pool.give_back(body)
    got += [(stream, bytes(body)) for stream, body in out]
    assert got == [(i, body) for i, (body, _) in enumerate(bodies)]


def test_a_body_given_back_is_read_into_again():
    raw = hello_bytes() + b"".join(frame_header(FrameType.DATA, 1, n) + c * n
                                   for n, c in ((100, b"a"), (40, b"b"), (300, b"c")))
    chunked = Chunked(raw, [])
    pool = BodyPool(256, limit=2)
    reader = FrameReader(chunked, recv_into=chunked.into, bodies=pool)
    reader.read_hello()
    first = reader.read_frame().payload
    buf = first.obj
    pool.give_back(first)
    second = reader.read_frame().payload
    assert second.obj is buf and bytes(second) == b"b" * 40
    pool.give_back(second)
    # Larger than the buffers so far: a buffer of its own, kept from then on.
    third = reader.read_frame().payload
    assert third.obj is not buf and len(third.obj) == 300 and bytes(third) == b"c" * 300
    big = third.obj
    pool.give_back(third)
    assert pool.take(10).obj is big


def test_a_buffer_still_viewed_is_not_reused():
    pool = BodyPool(64, limit=4)
    for hold in ("slice", "cast", "export"):
        body = pool.take(10)
        body[:] = b"0123456789"
        buf = body.obj
        # A consumer that kept (by mistake) a slice, a cast, or a buffer of the
        # body itself (as a C extension holding a Py_buffer would).
        kept = {"slice": lambda: body[2:5], "cast": lambda: body.cast("c")[2:5],
                "export": lambda: (ctypes.c_char * 3).from_buffer(body, 2)}[hold]()
        pool.give_back(body)
        other = pool.take(10)
        assert other.obj is not buf, hold
        other[:] = b"x" * 10
        assert bytes(kept) == b"234", hold
        pool.give_back(other)
        del kept  # now unreferenced, it is garbage: the pool did not keep it
        assert all(b is not buf for b in pool._free)


def test_a_body_given_back_twice_is_kept_once():
    pool = BodyPool(64, limit=4)
    body = pool.take(10)
    pool.give_back(body)
    pool.give_back(body)
    assert pool.take(10).obj is not pool.take(10).obj


def test_body_pool_keeps_at_most_its_limit():
    pool = BodyPool(16, limit=3)
    bodies = [pool.take(16) for _ in range(10)]
    bufs = [b.obj for b in bodies]
    for body in bodies:
        pool.give_back(body)
    again = [pool.take(16).obj for _ in range(10)]
    assert sum(any(a is b for b in bufs) for a in again) == 3
    pool.clear()
    assert all(pool.take(16).obj is not a for a in again)


def test_body_pool_ignores_what_it_did_not_hand_out():
    pool = BodyPool(16, limit=3)
    for other in (b"bytes", memoryview(b"x" * 32), memoryview(bytearray(4)), None):
        pool.give_back(other)
    assert pool._free == []


def test_recycled_body_truncated():
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 5000)])
    chunked = Chunked(raw[:-100], [700])
    reader = FrameReader(chunked, recv_into=chunked.into, block_size=64, bodies=BodyPool(1024))
    reader.read_hello()
    with pytest.raises(ProtocolError, match="stream ended inside a DATA frame body"):
        reader.read_frame()


def test_body_pool_needs_recv_into():
    # Without recv_into a body is gathered from recv's chunks, as before.
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 5000)])
    pool = BodyPool(1024)
    reader = FrameReader(Chunked(raw, [700]), bodies=pool)
    reader.read_hello()
    assert reader.read_frame().payload == b"x" * 5000


def test_recv_into_truncated_data_body():
    raw, _ = write_frames([(FrameType.DATA, 3, b"x" * 5000)])
    chunked = Chunked(raw[:-100], [700])
    reader = FrameReader(chunked, recv_into=chunked.into, block_size=64)
    reader.read_hello()
    with pytest.raises(ProtocolError, match="stream ended inside a DATA frame body"):
        reader.read_frame()


@given(st.binary(min_size=1, max_size=5000), st.integers(1, 1000))
def test_big_data_is_split_at_max_body(payload, max_body):
    raw, _ = write_frames([(FrameType.DATA, 7, payload)], max_body=max_body)
    reader = FrameReader(Chunked(raw, []), max_body=max_body)
    reader.read_hello()
    got = list(reader)
    assert all(f.kind is FrameType.DATA and f.stream == 7 and len(f.payload) <= max_body for f in got)
    assert b"".join(f.payload for f in got) == payload


def test_small_frames_are_batched_into_few_writes():
    items = [(FrameType.MESSAGE, 0, {"type": "stat", "path": b"pool/%d" % i}) for i in range(2000)]
    raw, writes = write_frames(items, flush_threshold=64 * 1024)
    assert len(writes) <= len(raw) // (64 * 1024) + 2


def test_big_data_goes_out_as_views_of_the_caller_buffer():
    sent = []
    writer = FrameWriter(sent.append)
    payload = bytearray(3 * 1024 * 1024)
    writer.data(1, payload)
    writer.flush()
    views = [s for s in sent if isinstance(s, memoryview)]
    assert views and views[0].obj is payload


def test_reader_reads_blocks_not_frames():
    raw, _ = write_frames([(FrameType.MESSAGE, 0, {"n": i}) for i in range(500)])
    recv = Chunked(raw, [])
    reader = FrameReader(recv)
    reader.read_hello()
    assert len(list(reader)) == 500
    assert recv.calls <= 3


def test_oversized_message_is_refused_by_the_writer():
    writer = FrameWriter(lambda b: None, max_body=100)
    with pytest.raises(ProtocolError, match="exceeds"):
        writer.message({"blob": b"x" * 200})


def test_huge_declared_length_is_refused_before_reading():
    raw = frame_header(FrameType.DATA, 1, 0xFFFFFFFF)
    recv = Chunked(raw + b"\x00" * 100, [])
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="limit"):
            FrameReader(recv).read_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024 + 64 * 1024  # the 1 MiB read block, not 4 GiB


@pytest.mark.parametrize(
    "raw, match",
    [
        (frame_header(FrameType.DATA, 1, 10) + b"abc", "inside a DATA frame body"),
        (frame_header(FrameType.MESSAGE, 0, 5)[:3], "inside a frame header"),
        (b"\x09" + b"\x00" * 8, "unknown frame type"),
        (b"\x00" + b"\x00" * 8, "unknown frame type"),
        (frame_header(FrameType.MESSAGE, 0, 2) + b"\x05\x00", "truncated"),
        (frame_header(FrameType.MESSAGE, 0, 1) + b"\x09", "unknown value tag"),
    ],
)
def test_hostile_frames(raw, match):
    with pytest.raises(ProtocolError, match=match):
        read_all(raw)


def test_clean_end_between_frames_is_none():
    raw = frame_header(FrameType.END, 3, 0)
    reader = FrameReader(Chunked(raw, [2]))
    assert reader.read_frame() == Frame(FrameType.END, 3, None)
    assert reader.read_frame() is None
    assert HEADER_SIZE == 9
