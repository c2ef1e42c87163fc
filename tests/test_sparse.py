"""Sparse files, as rsync -S keeps them: holes found by SEEK_DATA/SEEK_HOLE
are not sent, stay holes on the edge, and the SHA-256 covers the zeros.

The pure parts (the extent stream, its validation, the hashing of holes, the
zero detection) get property tests; the rest runs a real push over sshd,
through a relay that counts the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import ProtocolError
from syncd.sparse import EXTENT, ZERO_BLOCK, Decoder, data_extents, hash_zeros, logical_sha256, payload, zero_runs
from tests.nodes import SYNCD, assert_same_tree, make_node, wait_agents_ended
from tests.relay import Relay

pytest_plugins = ["tests.sshd"]

MiB = 1 << 20
GiB = 1 << 30


# -- pure: the extent stream -------------------------------------------------------


@st.composite
def extents(draw, max_size: int = 1 << 16):  # noqa: ANN001, ANN201
    """A size and data extents inside it, in order, not touching (a hole between)."""
    size = draw(st.integers(0, max_size))
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))))
    out = []
    for a, b in zip(cuts[::2], cuts[1::2]):
        if b > a:
            out.append((a, draw(st.binary(min_size=b - a, max_size=b - a))))
    return size, out


def logical(size: int, exts: list[tuple[int, bytes]]) -> bytes:
    buf = bytearray(size)
    for off, data in exts:
        buf[off:off + len(data)] = data
    return bytes(buf)


def encode(exts: list[tuple[int, bytes]]) -> bytes:
    return b"".join(EXTENT.pack(off, len(data)) + data for off, data in exts)


def decode(start: int, end: int, stream: bytes, cuts: list[int]) -> tuple[bytes, list]:
    """Feed ``stream`` split at ``cuts``; the content rebuilt and the events."""
    out = bytearray()
    events: list = []
    h = hashlib.sha256()

    def data(view: memoryview) -> None:
        out.extend(view)
        h.update(view)
        events.append(("data", len(view)))

    def hole(n: int) -> None:
        out.extend(bytes(n))
        hash_zeros(h, n)
        events.append(("hole", n))

    dec = Decoder(start, end, data, hole)
    prev = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        c = min(c, len(stream))
        dec.feed(stream[prev:c])
        prev = max(prev, c)
    dec.finish()
    assert h.digest() == hashlib.sha256(out).digest()
    return bytes(out), events


@given(extents(), st.lists(st.integers(0, 1 << 17), max_size=8))
def test_decoder_rebuilds_the_logical_content_whatever_the_split(case, cuts) -> None:  # noqa: ANN001
    size, exts = case
    content, events = decode(0, size, encode(exts), cuts)
    assert content == logical(size, exts)
    # Holes are reported as such, never as data: only the extents' bytes are data.
    assert sum(n for kind, n in events if kind == "data") == sum(len(d) for _, d in exts)


@given(extents(), st.data())
def test_decoder_refuses_what_breaks_the_bounds(case, data) -> None:  # noqa: ANN001
    size, exts = case
    bad = data.draw(st.sampled_from(["beyond", "overlap", "empty", "truncated", "before_start"]))
    stream = bytearray(encode(exts))
    if bad == "beyond":
        stream += EXTENT.pack(size, 1) + b"x"
    elif bad == "overlap":
        if not exts:
            return
        off, d = exts[-1]
        stream += EXTENT.pack(off + len(d) - 1, 1) + b"x"
    elif bad == "empty":
        stream += EXTENT.pack(size, 0)
    elif bad == "truncated":
        if not exts:
            return
        stream = stream[:-1]
    else:
        if not exts or exts[0][0] == 0:
            return
        with pytest.raises(ProtocolError):
            decode(exts[0][0] + 1, size, bytes(stream), [])
        return
    with pytest.raises(ProtocolError):
        decode(0, size, bytes(stream), data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))


def test_decoder_refuses_a_huge_extent_before_calling_anything() -> None:
    calls: list = []
    dec = Decoder(0, 100, calls.append, calls.append)
    with pytest.raises(ProtocolError, match="beyond the announced end"):
        dec.feed(EXTENT.pack(50, (1 << 64) - 1))
    assert calls == []


@given(st.integers(0, 5 * (1 << 20)))
def test_hash_zeros_equals_hashing_real_zeros(n: int) -> None:
    h = hashlib.sha256()
    hash_zeros(h, n)
    assert h.digest() == hashlib.sha256(bytes(n)).digest()


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=10), st.randoms())
def test_zero_runs_marks_exactly_the_zero_blocks(runs, rnd) -> None:  # noqa: ANN001
    blocks = []
    for zero, n in runs:
        for _ in range(n):
            if zero:
                blocks.append(bytes(ZERO_BLOCK))
            else:
                b = bytearray(ZERO_BLOCK)
                b[rnd.randrange(ZERO_BLOCK)] = rnd.randrange(1, 256)
                blocks.append(bytes(b))
    data = b"".join(blocks)
    found = zero_runs(memoryview(data))
    pos = 0
    for start, end, zero in found:
        assert start == pos and end > start
        assert (data[start:end].count(0) == end - start) == zero
        for i in range(start, end, ZERO_BLOCK):  # runs are maximal: each block agrees
            assert (data[i:i + ZERO_BLOCK].count(0) == ZERO_BLOCK) == zero
        pos = end
    assert pos == len(data)
    assert all(a[2] != b[2] for a, b in zip(found, found[1:]))


# -- the file side: extents of a real sparse file ------------------------------------


def make_sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off, data in writes:
            fh.seek(off)
            fh.write(data)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_payload_of_a_real_sparse_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "f"
    writes = [(1 * MiB, os.urandom(5000)), (9 * MiB + 17, os.urandom(70_000)), (20 * MiB - 3, b"end")]
    make_sparse(path, 20 * MiB, writes)
    expected = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        exts = list(data_extents(fd, 0, 20 * MiB))
        assert sum(n for _, n in exts) < 1 * MiB  # the kernel knows where the data is
        h = hashlib.sha256()
        stream = b"".join(bytes(p) for p in payload(fd, 0, 20 * MiB, memoryview(bytearray(MiB)), h))
        assert h.digest() == hashlib.sha256(expected).digest()
        assert logical_sha256(fd, 0, 20 * MiB, memoryview(bytearray(MiB))).digest() == h.digest()
        # A range in the middle: offsets stay absolute.
        content, _ = decode(8 * MiB, 12 * MiB, b"".join(bytes(p) for p in payload(
            fd, 8 * MiB, 12 * MiB, memoryview(bytearray(MiB)))), [])
        assert content == expected[8 * MiB:12 * MiB]
    finally:
        os.close(fd)
    assert len(stream) < 1 * MiB


@st.composite
def write_ops(draw):  # noqa: ANN001, ANN201
    """Writes and holes, data made of zero and non-zero 4 KiB-ish pieces."""
    ops = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            ops.append(("skip", draw(st.integers(1, 3 * ZERO_BLOCK + 7))))
        else:
            zero = draw(st.booleans())
            n = draw(st.integers(1, 3 * ZERO_BLOCK + 5))
            ops.append(("write", bytes(n) if zero else draw(st.binary(min_size=n, max_size=n))))
    return ops


@given(write_ops(), st.booleans(), st.booleans(), st.sampled_from([0, ZERO_BLOCK, 3]))
def test_sparse_writer_writes_the_logical_content(tmp_path_factory, ops, find_zeros, pooled, start) -> None:  # noqa: ANN001
    from syncd.fsops import BufferPool, SparseWriter

    expected = bytearray(start)
    for kind, arg in ops:
        expected += bytes(arg) if kind == "skip" else arg
    path = tmp_path_factory.mktemp("w") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    pool = BufferPool(write_behind=True) if pooled else None
    try:
        os.ftruncate(fd, len(expected))
        w = SparseWriter(fd, start, pool, find_zeros=find_zeros)
        for kind, arg in ops:
            w.skip(arg) if kind == "skip" else w.write(arg)
        w.close()
        assert w.pos == len(expected)
    finally:
        os.close(fd)
        if pool is not None:
            pool.close()
    assert path.read_bytes() == bytes(expected)


def test_copies_keep_holes(tmp_path: Path) -> None:
    from syncd.fsops import BufferPool, SafeRoot, copy_extents

    root = tmp_path / "root"
    root.mkdir()
    src = root / "src"
    make_sparse(src, 64 * MiB, [(MiB, os.urandom(MiB)), (40 * MiB + 5, os.urandom(100_000))])
    want = hashlib.sha256(src.read_bytes()).digest()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    pool = BufferPool(write_behind=True)
    try:
        with SafeRoot(root) as safe:
            total, digest = safe.copy_into(b"src", dfd, b"hashed", pool)
        assert (total, digest) == (64 * MiB, want)
        s, d = os.open(src, os.O_RDONLY), os.open(tmp_path / "kernel", os.O_WRONLY | os.O_CREAT, 0o600)
        copy_extents(s, d, 64 * MiB)
        os.close(s)
        os.close(d)
    finally:
        os.close(dfd)
        pool.close()
    for name in ("hashed", "kernel"):
        copy = tmp_path / name
        assert copy.read_bytes() == src.read_bytes()
        assert allocated(copy) <= 1.1 * allocated(src) + 64 * 1024, (name, allocated(src), allocated(copy))


# -- pushes over sshd -------------------------------------------------------------------


class Pair:
    def __init__(self, base: Path, ssh, relay: Relay, **mirror_keys: str) -> None:  # noqa: ANN001
        self.primary = make_node(base, "primary", max_delete="100%")
        self.edge = make_node(base, "edge")
        self.primary.mirrors.append((self.edge, {"retries": "1", **mirror_keys}))
        self.edge.write()
        self.primary.write(ssh, port=relay.port, known_hosts=ssh.known_hosts_for(relay.port))
        self.relay = relay

    def run_once(self, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
        """``run --once``; and the bytes it sent up the wire."""
        self.relay.reset_counts()
        proc = subprocess.run(SYNCD + ["-c", str(self.primary.ini), "run", "--once", *extra],
                              capture_output=True, text=True, timeout=600)
        wait_agents_ended(self.edge.ini)
        return proc, self.relay.counts()["up"]


def same_tree(primary: Path, mirror: Path) -> None:
    """The oracle, rsync -rlptHSnci --delete, silent (root's own time included)."""
    assert_same_tree(primary, mirror)


@pytest.fixture
def pair(tmp_path: Path, sshd) -> Pair:  # noqa: ANN001
    with Relay(sshd.host, sshd.port) as relay:
        yield Pair(tmp_path, sshd, relay)


def test_a_1_gib_file_with_4_mib_of_data_stays_sparse_and_sends_the_data(pair: Pair) -> None:
    big = pair.primary.root / "disk.img"
    rnd = [os.urandom(MiB) for _ in range(4)]
    make_sparse(big, GiB, [(0, rnd[0]), (300 * MiB, rnd[1]), (700 * MiB + 4096, rnd[2]), (GiB - MiB, rnd[3])])
    (pair.primary.root / "hole.img").touch()
    os.truncate(pair.primary.root / "hole.img", 64 * MiB)  # all hole
    tail = pair.primary.root / "tail.img"
    make_sparse(tail, 48 * MiB, [(48 * MiB - 10_000, os.urandom(10_000))])  # data only at its end
    proc, sent = pair.run_once()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mirror = pair.edge.root
    for name in ("disk.img", "hole.img", "tail.img"):
        src, dst = pair.primary.root / name, mirror / name
        assert os.path.getsize(dst) == os.path.getsize(src)
        assert allocated(dst) <= 1.1 * allocated(src) + 64 * 1024, (name, allocated(src), allocated(dst))
    assert hashlib.sha256(big.read_bytes()).digest() == hashlib.sha256((mirror / "disk.img").read_bytes()).digest()
    assert (mirror / "tail.img").read_bytes() == tail.read_bytes()
    # About the data (4 MiB + 10 KB), not the 1.1 GiB of sizes.
    assert sent < 8 * MiB, sent
    print(f"sparse: primary {allocated(big)} B allocated, mirror {allocated(mirror / 'disk.img')} B; "
          f"{sent} B up the wire for {GiB + 112 * MiB} B of files")
    same_tree(pair.primary.root, mirror)


# -- resuming a whole file inside it ----------------------------------------------------


def staging_names(pair: Pair) -> list[str]:
    return sorted(p.name for p in (pair.edge.state / "staging").iterdir())


def test_a_256_mib_file_cut_at_60_percent_resumes_from_its_prefix(pair: Pair) -> None:
    size = 256 * MiB
    data = os.urandom(size)  # incompressible: the bytes on the wire are the file's
    (pair.primary.root / "big.iso").write_bytes(data)
    pair.relay.set_cut(int(0.6 * size), None)
    cut, first = pair.run_once()
    pair.relay.set_cut(None, None)
    assert cut.returncode != 0 and pair.relay.cuts == 1, cut.stdout + cut.stderr
    # What arrived is kept as the object's partial file, with its records.
    partial = [n for n in staging_names(pair) if n.startswith("partial.")]
    assert len(partial) == 2 and partial[1].endswith(".ranges"), staging_names(pair)
    assert not (pair.edge.root / "big.iso").exists()

    ok, second = pair.run_once()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    print(f"resume: first push {first} B up (cut), second push {second} B up, file {size} B")
    assert second < 0.45 * size, (first, second)
    assert (pair.edge.root / "big.iso").read_bytes() == data
    same_tree(pair.primary.root, pair.edge.root)
    assert staging_names(pair) == []


def test_a_resumed_file_whose_partial_bytes_are_wrong_still_arrives_right(pair: Pair) -> None:
    size = 24 * MiB
    data = os.urandom(size)
    (pair.primary.root / "big.iso").write_bytes(data)
    pair.relay.set_cut(int(0.7 * size), None)
    cut, _ = pair.run_once()
    pair.relay.set_cut(None, None)
    assert cut.returncode != 0
    staging = pair.edge.state / "staging"
    partial = next(p for p in staging.iterdir() if p.name.startswith("partial.") and "." not in p.name[8:])
    # Its recorded prefix is damaged on the edge's disk (bit rot, a stray writer).
    with open(partial, "r+b") as fh:
        fh.seek(3 * MiB)
        fh.write(b"\xff" * 4096)
    ok, second = pair.run_once()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (pair.edge.root / "big.iso").read_bytes() == data
    assert second > size  # found wrong by the whole file's SHA-256 at the end: sent again whole
    same_tree(pair.primary.root, pair.edge.root)
    assert staging_names(pair) == []


def test_a_file_changed_between_the_cut_and_the_rerun_arrives_as_it_is_now(pair: Pair) -> None:
    size = 24 * MiB
    (pair.primary.root / "big.iso").write_bytes(os.urandom(size))
    pair.relay.set_cut(int(0.6 * size), None)
    cut, _ = pair.run_once()
    pair.relay.set_cut(None, None)
    assert cut.returncode != 0
    # Same name and size, other content: the partial file is another object's.
    now = os.urandom(size)
    (pair.primary.root / "big.iso").write_bytes(now)
    ok, _ = pair.run_once()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (pair.edge.root / "big.iso").read_bytes() == now
    same_tree(pair.primary.root, pair.edge.root)
    # The old content's partial file waits (a prewarm may go on with it)
    # until it is days old; then the next agent removes it.
    stale = [p for p in (pair.edge.state / "staging").iterdir() if p.name.startswith("partial.")]
    assert len(stale) == 2
    for p in stale:
        os.utime(p, (time.time() - 3 * 24 * 3600,) * 2)
    again, _ = pair.run_once()
    assert again.returncode == 0
    assert staging_names(pair) == []


def test_a_sparse_file_edited_goes_as_a_delta_and_stays_sparse(pair: Pair) -> None:
    img = pair.primary.root / "vm.img"
    make_sparse(img, 256 * MiB, [(0, os.urandom(2 * MiB)), (100 * MiB, os.urandom(2 * MiB))])
    proc, _ = pair.run_once()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Edited in place: in its data, and in a hole (which becomes data).
    with open(img, "r+b") as fh:
        for off in (4096, 100 * MiB + 8192, 200 * MiB):
            fh.seek(off)
            fh.write(os.urandom(4096))
    proc, sent = pair.run_once()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 delta" in proc.stdout, proc.stdout
    assert sent < 2 * MiB, sent  # the edits and the copy ops, not the file
    dst = pair.edge.root / "vm.img"
    assert dst.read_bytes() == img.read_bytes()
    # The rebuilt file leaves its runs of zeros unwritten (rsync -S's receiver does the same).
    assert allocated(dst) <= 1.1 * allocated(img) + 64 * 1024, (allocated(img), allocated(dst))
    same_tree(pair.primary.root, pair.edge.root)


def test_a_renamed_and_copied_sparse_file_keeps_its_holes(pair: Pair) -> None:
    img = pair.primary.root / "a.img"
    make_sparse(img, 128 * MiB, [(MiB, os.urandom(MiB)), (64 * MiB, os.urandom(3 * MiB))])
    proc, _ = pair.run_once()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    os.rename(img, pair.primary.root / "b.img")
    subprocess.run(["cp", "--sparse=always", "-p", str(pair.primary.root / "b.img"),
                    str(pair.primary.root / "c.img")], check=True)
    subprocess.run(["cp", "--sparse=always", "-p", str(pair.primary.root / "b.img"),
                    str(pair.primary.root / "d.img")], check=True)
    proc, sent = pair.run_once()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sent < MiB, sent  # copied on the edge from the file it has
    for name in ("b.img", "c.img", "d.img"):
        src, dst = pair.primary.root / name, pair.edge.root / name
        assert dst.read_bytes() == src.read_bytes()
        assert allocated(dst) <= 1.1 * allocated(src) + 64 * 1024, (name, allocated(src), allocated(dst))
    same_tree(pair.primary.root, pair.edge.root)


@pytest.mark.parametrize("streams", ["1", "2"])  # 1: the file goes as a run; 2: as ranges into a partial file
def test_prewarm_keeps_holes_and_sends_only_the_data(pair: Pair, streams: str) -> None:
    img = pair.primary.root / "disk.img"
    # 64 ranges of 4 MiB, most of them all hole; one extent across a range boundary.
    make_sparse(img, 256 * MiB, [(10 * MiB, os.urandom(MiB)), (16 * MiB - 4096, os.urandom(8192)),
                                 (255 * MiB, os.urandom(MiB))])
    (pair.primary.root / "small-sparse").touch()
    os.truncate(pair.primary.root / "small-sparse", 3 * MiB)  # one whole object, all hole
    pair.relay.reset_counts()
    proc = subprocess.run(SYNCD + ["-c", str(pair.primary.ini), "prewarm", "edge", "--streams", streams],
                          capture_output=True, text=True, timeout=600)
    wait_agents_ended(pair.edge.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sent = pair.relay.counts()["up"]
    assert sent < 4 * MiB, sent
    for name in ("disk.img", "small-sparse"):
        src, dst = pair.primary.root / name, pair.edge.root / name
        assert dst.read_bytes() == src.read_bytes()
        assert allocated(dst) <= 1.1 * allocated(src) + 64 * 1024, (name, allocated(src), allocated(dst))
    same_tree(pair.primary.root, pair.edge.root)


@pytest.fixture
def slow_pair(tmp_path: Path, sshd) -> Pair:  # noqa: ANN001
    # Throttled, so that a signal sent at a byte count lands mid-file.
    with Relay(sshd.host, sshd.port, rate_up=40e6) as relay:
        yield Pair(tmp_path, sshd, relay)


@pytest.mark.parametrize("how", ["kill -9 of run --once", "SIGTERM of the daemon"])
def test_a_push_stopped_at_60_percent_resumes_from_its_prefix(slow_pair: Pair, how: str) -> None:
    pair = slow_pair
    size = 64 * MiB
    data = os.urandom(size)
    (pair.primary.root / "big.iso").write_bytes(data)
    pair.relay.reset_counts()
    argv = ["run", "--once"] if how.startswith("kill") else ["run"]
    proc = subprocess.Popen(SYNCD + ["-c", str(pair.primary.ini), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while pair.relay.counts()["up"] < 0.6 * size and time.monotonic() < deadline:
            assert proc.poll() is None, "the push ended before the signal: the test would prove nothing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL if how.startswith("kill") else signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = pair.relay.counts()["up"]
    wait_agents_ended(pair.edge.ini)
    assert not (pair.edge.root / "big.iso").exists()
    ok, second = pair.run_once()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    print(f"resume after {how}: {first} B up before, {second} B after, file {size} B")
    assert second < 0.45 * size, (first, second)
    assert (pair.edge.root / "big.iso").read_bytes() == data
    same_tree(pair.primary.root, pair.edge.root)
    assert staging_names(pair) == []


# -- what the agent takes from a hostile or broken sender -----------------------------


def agent_edge(tmp_path: Path):  # noqa: ANN201
    node = make_node(tmp_path, "edge")
    node.write()
    return node


def plan_one(peer, path: bytes, data: bytes) -> dict:  # noqa: ANN001
    from tests.test_agent import begin, row

    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(path, data)]}, {"type": "entries_end"})
    needs = peer.message()
    assert needs["type"] == "needs" and peer.message()["type"] == "planned"
    return needs


@pytest.mark.parametrize("case", ["beyond the size", "overlapping", "out of order", "empty extent",
                                  "cut inside an extent", "offset never offered"])
def test_a_hostile_sparse_payload_or_offset_is_refused_and_nothing_is_left(tmp_path: Path, case: str) -> None:
    from tests.test_agent import Peer

    edge = agent_edge(tmp_path)
    data = bytes(2 * MiB)
    peer = Peer(edge.ini)
    assert set(peer.welcome["features"]) >= {"sparse", "resume"}
    plan_one(peer, b"f", data)
    msg = {"type": "file", "stream": 1, "path": b"f", "how": "whole", "size": len(data),
           "sha256": hashlib.sha256(data).digest(), "sparse": True}
    payload_ = {
        "beyond the size": EXTENT.pack(2 * MiB - 10, 11) + bytes(11),
        "overlapping": EXTENT.pack(0, 100) + bytes(100) + EXTENT.pack(99, 10) + bytes(10),
        "out of order": EXTENT.pack(MiB, 10) + bytes(10) + EXTENT.pack(0, 10) + bytes(10),
        "empty extent": EXTENT.pack(5, 0),
        "cut inside an extent": EXTENT.pack(0, 100) + bytes(50),
        "offset never offered": b"",
    }[case]
    if case == "offset never offered":
        msg["offset"] = MiB
    peer.send(msg)
    peer.w.data(1, payload_)
    peer.w.end(1)
    peer.w.flush()
    answer = peer.message()
    assert answer["type"] == "error", answer
    assert "\n" not in answer["message"]
    assert ("was not offered" if case == "offset never offered" else "sparse payload") in answer["message"]
    peer.finish()
    wait_agents_ended(edge.ini)
    assert list(edge.root.iterdir()) == []
    assert [p.name for p in (edge.state / "staging").iterdir()] == []


def test_the_agent_offers_the_prefix_of_a_cut_run_and_checks_the_whole_file(tmp_path: Path) -> None:
    from tests.test_agent import Peer, begin

    edge = agent_edge(tmp_path)
    data = os.urandom(12 * MiB)
    sha = hashlib.sha256(data).digest()
    peer = Peer(edge.ini)
    needs = plan_one(peer, b"big", data)
    assert "resume" not in needs  # nothing to resume from yet
    peer.send({"type": "file", "stream": 1, "path": b"big", "how": "whole", "size": len(data), "sha256": sha})
    peer.w.data(1, data[:7 * MiB])
    peer.w.flush()
    peer.finish()  # the link drops
    wait_agents_ended(edge.ini)
    staging = edge.state / "staging"
    names = sorted(p.name for p in staging.iterdir())
    assert names == [f"partial.{sha.hex()}", f"partial.{sha.hex()}.ranges"], names

    peer = Peer(edge.ini)
    needs = plan_one(peer, b"big", data)
    [[path, offset]] = needs["resume"]
    assert path == b"big" and 5 * MiB <= offset <= 7 * MiB
    # The rest from the offset on, as a sparse payload this time.
    peer.send({"type": "file", "stream": 1, "path": b"big", "how": "whole", "size": len(data), "sha256": sha,
               "offset": offset, "sparse": True})
    peer.w.data(1, EXTENT.pack(offset, len(data) - offset) + data[offset:])
    peer.w.end(1)
    peer.w.flush()
    assert peer.message() == {"type": "staged", "path": b"big"}
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    peer.finish()
    assert (edge.root / "big").read_bytes() == data
    wait_agents_ended(edge.ini)
    assert list(staging.iterdir()) == []

    # Offered again after another cut, but the pusher sends it from 0 (it
    # does not resume): the run starts over, and the result is right.
    data2 = os.urandom(12 * MiB)
    sha2 = hashlib.sha256(data2).digest()
    peer = Peer(edge.ini)
    peer.send(begin(2), {"type": "entries", "batch": 1, "rows": [[b"big2", 0, len(data2), 1, 0o644, sha2, None,
                                                                   0, 2]]}, {"type": "entries_end"})
    peer.message(), peer.message()
    peer.send({"type": "file", "stream": 1, "path": b"big2", "how": "whole", "size": len(data2), "sha256": sha2})
    peer.w.data(1, data2[:9 * MiB])
    peer.w.flush()
    peer.finish()
    wait_agents_ended(edge.ini)
    peer = Peer(edge.ini)
    peer.send(begin(2), {"type": "entries", "batch": 1, "rows": [[b"big2", 0, len(data2), 1, 0o644, sha2, None,
                                                                   0, 2]]}, {"type": "entries_end"})
    needs = peer.message()
    assert needs["resume"][0][1] > 0
    assert peer.message()["type"] == "planned"
    peer.send({"type": "file", "stream": 1, "path": b"big2", "how": "whole", "size": len(data2), "sha256": sha2})
    peer.w.data(1, data2)
    peer.w.end(1)
    peer.w.flush()
    assert peer.message() == {"type": "staged", "path": b"big2"}
    peer.send({"type": "commit", "generation": 2})
    assert peer.message()["type"] == "committed"
    peer.finish()
    assert (edge.root / "big2").read_bytes() == data2


def test_two_streams_of_one_large_content_never_share_a_run(tmp_path: Path) -> None:
    """A second stream for the same content (no plan asks for it) must not
    write into the first one's run: the object named is the right one."""
    from tests.test_agent import Peer

    edge = agent_edge(tmp_path)
    data = os.urandom(10 * MiB)
    sha = hashlib.sha256(data).digest()
    peer = Peer(edge.ini)
    plan_one(peer, b"big", data)
    for stream in (1, 2):
        peer.send({"type": "file", "stream": stream, "path": b"big", "how": "whole", "size": len(data),
                   "sha256": sha})
    junk = os.urandom(len(data))
    for at in range(0, len(data), MiB):
        peer.w.data(1, data[at:at + MiB])
        peer.w.data(2, junk[at:at + MiB])
    peer.w.end(1)
    peer.w.end(2)
    peer.w.flush()
    answers = [peer.message(), peer.message()]
    assert {a["type"] for a in answers} == {"staged", "failed"}, answers
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    peer.finish()
    assert (edge.root / "big").read_bytes() == data


def test_prewarm_from_a_sibling_relays_sparse_ranges(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    from tests.test_prewarm import Site

    site = Site(tmp_path, sshd)
    with Relay(sshd.host, sshd.port) as to_sib, Relay(sshd.host, sshd.port) as to_edge:
        site.add_mirror("sib", to_sib)
        edge = site.add_mirror("edge", to_edge)
        img = site.primary / "root" / "disk.img"
        make_sparse(img, 128 * MiB, [(5 * MiB, os.urandom(MiB)), (127 * MiB, os.urandom(MiB))])
        first = site.run_once("--mirror", "sib")
        assert first.returncode == 0, first.stdout + first.stderr
        to_sib.reset_counts()
        to_edge.reset_counts()
        done = site.prewarm("edge", "--from", "sib", "--streams", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        # Down from the sibling and up to the edge: the data, not the holes.
        assert to_sib.counts()["down"] < 4 * MiB + (4 << 20), to_sib.counts()  # (and the probe's sample)
        assert to_edge.counts()["up"] < 4 * MiB, to_edge.counts()
        dst = edge / "root" / "disk.img"
        assert dst.read_bytes() == img.read_bytes()
        assert allocated(dst) <= 1.1 * allocated(img) + 64 * 1024, (allocated(img), allocated(dst))
