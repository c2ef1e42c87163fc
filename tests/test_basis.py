"""A renamed and edited file goes as a delta against a file the plan deletes
or replaces (rsync's --fuzzy): the choice (pure), the agent's protocol, and
pushes over sshd with the bytes on the wire counted by the relay."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd import config as configmod
from syncd.basis import NAME_MIN, PER_DIR, Candidate, Candidates, best, closeness, similarity, stem
from syncd.delta import decode_signature, iter_delta, make_signature, samples_matching
from syncd.manifest import Manifest
from syncd.protocol import FrameType
from syncd.push import _delta_pays, push_tree, push_with_retries
from syncd.scan import scan
from tests.nodes import assert_same_tree, make_node
from tests.relay import Relay
from tests.test_agent import Peer, begin, push_one, row

pytest_plugins = ["tests.sshd"]

NAME = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)
DIGITS = st.integers(0, 10**6).map(lambda n: str(n).encode())


# -- the choice, pure ------------------------------------------------------------------


@given(NAME, NAME)
def test_similarity_is_symmetric_bounded_and_one_only_for_equal_names(a: bytes, b: bytes) -> None:
    s = similarity(a, b)
    assert s == similarity(b, a)
    assert 0.0 <= s <= 1.0
    assert (s == 1.0) == (a == b)
    assert similarity(a, a) == 1.0


@given(NAME, NAME, NAME)
def test_a_common_prefix_or_suffix_never_makes_names_less_alike(a: bytes, b: bytes, c: bytes) -> None:
    assert similarity(c + a, c + b) >= similarity(a, b)
    assert similarity(a + c, b + c) >= similarity(a, b)


@given(st.binary(max_size=20), DIGITS, DIGITS, st.binary(max_size=20), NAME)
def test_a_version_bump_is_at_least_as_alike_as_a_name_sharing_neither_end(
        head: bytes, v1: bytes, v2: bytes, tail: bytes, other: bytes) -> None:
    old, new = head + v1 + tail, head + v2 + tail
    assert stem(old) == stem(new)
    if other[:1] != new[:1] and other[-1:] != new[-1:]:
        assert similarity(new, old) >= similarity(new, other) == 0.0


def test_similarity_examples() -> None:
    assert similarity(b"image-1.2.iso", b"image-1.3.iso") == 12 / 13
    assert similarity(b"debian-12.3.1-amd64-netinst.iso", b"debian-12.3.0-amd64-netinst.iso") > \
        similarity(b"debian-12.3.1-amd64-netinst.iso", b"debian-12.0.0-amd64-netinst.iso") > NAME_MIN
    assert similarity(b"image-1.3.iso", b"README") < NAME_MIN
    assert stem(b"image-1.10.iso") == stem(b"image-2.9.iso") == b"image-0.0.iso"


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40))
def test_closeness_is_the_ratio_of_sizes(a: int, b: int) -> None:
    c = closeness(a, b)
    assert c == closeness(b, a) and 0.0 <= c <= 1.0
    assert (c == 1.0) == (a == b)


@given(NAME, st.integers(1, 1 << 30),
       st.lists(st.tuples(NAME, st.integers(1, 1 << 30)), max_size=30, unique_by=lambda t: t[0]))
def test_choose_returns_a_candidate_of_that_directory_and_never_the_file_itself(
        name: bytes, size: int, others: list[tuple[bytes, int]]) -> None:
    cands = Candidates()
    for n, s in others:
        cands.add(b"d", n, s)
    cands.add(b"elsewhere", name + b"x", size)
    chosen = cands.choose(b"d", name, size)
    names = {n for n, _ in others} - {name}
    assert chosen is None or chosen in names
    # The best name wins whenever it is similar enough, whatever the sizes.
    if chosen is not None:
        top = max((similarity(name, n) for n in names), default=0.0)
        assert similarity(name, chosen) == top or top < NAME_MIN


def test_choose_by_name_then_by_size() -> None:
    cands = [Candidate(b"image-1.2.iso", 100), Candidate(b"notes.txt", 64 << 20), Candidate(b"image-1.1.iso", 90)]
    assert best(b"image-1.3.iso", 64 << 20, cands) == b"image-1.2.iso"  # the name, not the size
    assert best(b"new-thing.bin", 63 << 20, cands) == b"notes.txt"  # no name is close: the size
    assert best(b"new-thing.bin", 1 << 30, cands) is None  # neither


def test_candidates_stay_bounded_and_still_find_a_version_among_thousands() -> None:
    cands = Candidates(limit=5_000)
    for i in range(10_000):
        cands.add(b"pool", f"pkg{i:05d}-data.bin".encode(), 1 << 20)  # one stem: at most PER_STEM of these
        cands.add(b"pool", f"other-{i}.{i % 7}.img".encode(), 1 << 20)
    cands.add(b"pool", b"image-1.2.iso", 64 << 20)
    assert cands.count <= PER_DIR + 2 * 4 + 1
    assert cands.choose(b"pool", b"image-1.3.iso", 64 << 20) == b"image-1.2.iso"
    full = Candidates(limit=3)
    for i in range(10):
        full.add(f"d{i}".encode(), b"x.iso", 1 << 20)
    assert full.count == 3 and full.choose(b"d9", b"y.iso", 1 << 20) is None


def edited(data: bytes, rng: random.Random, places: int = 3, size: int = 4096) -> bytes:
    out = bytearray(data)
    for i in range(places):
        at = (i + 1) * len(data) // (places + 1)
        out[at:at + size] = rng.randbytes(size)
    return bytes(out)


def test_samples_find_the_blocks_of_a_related_file_and_none_of_an_unrelated_one() -> None:
    rng = random.Random(3)
    old = rng.randbytes(4 << 20)
    sig = make_signature(old)
    new = edited(old, rng)
    samples = [new[i:i + (64 << 10)] for i in range(0, len(new), len(new) // 8)]
    assert samples_matching(sig, samples) == len(samples)
    assert samples_matching(sig, [rng.randbytes(64 << 10) for _ in range(8)]) == 0
    assert samples_matching(make_signature(b""), samples) == 0


@pytest.mark.parametrize("related", [True, False])
def test_a_delta_against_a_guessed_basis_pays_only_when_it_shares_blocks(tmp_path: Path, related: bool) -> None:
    rng = random.Random(4)
    old = rng.randbytes(3 << 20)
    new = edited(old, rng) if related else rng.randbytes(len(old))
    (tmp_path / "new").write_bytes(new)
    fd = os.open(tmp_path / "new", os.O_RDONLY)
    try:
        assert _delta_pays(make_signature(old), fd, len(new)) is related
    finally:
        os.close(fd)


# -- the agent's side of the protocol ------------------------------------------------


@pytest.fixture
def edge(tmp_path: Path):  # noqa: ANN201
    node = make_node(tmp_path, "edge")
    node.write()
    (tmp_path / "outside").mkdir()
    return node


def tombstone(path: bytes, data: bytes, gen: int) -> list:
    r = row(path, data, gen=gen)
    r[7] = 1
    return r


def until_planned(peer: Peer) -> tuple[list[dict], dict[int, bytes]]:
    """The agent's answers up to its "planned", and the signature streams
    of every delta item they name."""
    messages: list[dict] = []
    streams: dict[int, list[bytes]] = {}
    ended: dict[int, bytes] = {}
    while True:
        frame = peer.r.read_frame()
        assert frame is not None, peer.session.stderr_tail()
        if frame.kind is FrameType.MESSAGE:
            assert frame.payload["type"] != "error", frame.payload
            messages.append(frame.payload)
        elif frame.kind is FrameType.DATA:
            streams.setdefault(frame.stream, []).append(bytes(frame.payload))
        else:
            ended[frame.stream] = b"".join(streams.pop(frame.stream, []))
        answers = [m for m in messages if m["type"] in ("needs", "planned")]
        wanted = {i[4] for m in answers for i in m["items"] if i[2] == "delta"}
        if any(m["type"] == "planned" for m in answers) and wanted <= set(ended):
            return messages, ended


def iso_push(peer: Peer, gen: int, batches: list[list], *, full: bool = False, fuzzy: bool = True):  # noqa: ANN201
    peer.send({**begin(gen), "full": full, "fuzzy": fuzzy},
              *[{"type": "entries", "batch": n, "rows": rows} for n, rows in enumerate(batches, 1)],
              {"type": "entries_end"})
    return until_planned(peer)


def items_of(messages: list[dict], kind: str) -> list[list]:
    return [i for m in messages if m["type"] == kind for i in m["items"]]


def test_a_new_file_is_put_off_until_planned_then_goes_as_a_delta_against_the_old_version(edge) -> None:  # noqa: ANN001
    rng = random.Random(5)
    old = rng.randbytes(1 << 20)
    new = edited(old, rng)
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"iso/image-1.2.iso", old, [b"iso"])["type"] == "committed"
    assert peer.finish() == 0
    peer = Peer(edge.ini)
    assert "fuzzy" in peer.welcome["features"]
    # The new name comes first, the old one's deletion in a later batch:
    # the agent cannot know its basis at the first batch's end.
    messages, sigs = iso_push(peer, 2, [[row(b"iso/image-1.3.iso", new, gen=2)],
                                        [tombstone(b"iso/image-1.2.iso", old, 2)]])
    needs = items_of(messages, "needs")
    assert [b"iso/image-1.3.iso", "later"] in [i[1:3] for i in needs]
    (delta,) = [i for i in items_of(messages, "planned") if i[1] == b"iso/image-1.3.iso"]
    assert delta[:4] == ["delta", b"iso/image-1.3.iso", "delta", b"iso/image-1.2.iso"]
    body = b"".join(iter_delta(decode_signature(sigs[delta[4]]), [new]))
    assert len(body) < len(new) // 20
    peer.w.message({"type": "file", "stream": 1, "path": b"iso/image-1.3.iso", "how": "delta",
                    "size": len(new), "sha256": hashlib.sha256(new).digest()})
    peer.w.data(1, body)
    peer.w.end(1)
    peer.send({"type": "commit", "generation": 2})
    while (answer := peer.message())["type"] != "committed":
        assert answer["type"] == "staged", answer
    assert peer.finish() == 0
    assert (edge.root / "iso/image-1.3.iso").read_bytes() == new
    assert not (edge.root / "iso/image-1.2.iso").exists()


def test_without_fuzzy_a_file_is_never_put_off_but_a_basis_known_at_its_batch_end_is_used(edge) -> None:  # noqa: ANN001
    rng = random.Random(6)
    old = rng.randbytes(1 << 20)
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"iso/image-1.2.iso", old, [b"iso"])["type"] == "committed"
    assert peer.finish() == 0
    peer = Peer(edge.ini)
    new = edited(old, rng)
    messages, _ = iso_push(peer, 2, [[row(b"iso/image-1.3.iso", new, gen=2)],
                                     [tombstone(b"iso/image-1.2.iso", old, 2)]], fuzzy=False)
    assert [i[1:3] for i in items_of(messages, "needs") if i[1] == b"iso/image-1.3.iso"] == \
        [[b"iso/image-1.3.iso", "whole"]]
    # In the same batch as the deletion, the basis is known at its end: a delta.
    peer.send({"type": "abort"})
    assert peer.finish() == 0
    peer = Peer(edge.ini)
    messages, _ = iso_push(peer, 2, [[tombstone(b"iso/image-1.2.iso", old, 2),
                                      row(b"iso/image-1.3.iso", new, gen=2)]], fuzzy=False)
    assert [i[:4] for i in items_of(messages, "needs") if i[1] == b"iso/image-1.3.iso"] == \
        [["delta", b"iso/image-1.3.iso", "delta", b"iso/image-1.2.iso"]]
    peer.send({"type": "abort"})
    assert peer.finish() == 0


def test_new_files_that_choose_the_same_basis_share_its_signature(edge) -> None:  # noqa: ANN001
    rng = random.Random(13)
    old = rng.randbytes(1 << 20)
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"iso/image-1.2.iso", old, [b"iso"])["type"] == "committed"
    assert peer.finish() == 0
    peer = Peer(edge.ini)
    news = [b"iso/image-1.3.iso", b"iso/image-1.3-netinst.iso", b"iso/image-1.4.iso"]
    messages, sigs = iso_push(peer, 2, [[tombstone(b"iso/image-1.2.iso", old, 2)]
                                        + [row(p, edited(old, rng), gen=2) for p in news]])
    deltas = {i[1]: i for i in items_of(messages, "needs") if i[0] == "delta"}
    assert sorted(deltas) == sorted(news)
    assert {i[3] for i in deltas.values()} == {b"iso/image-1.2.iso"}
    assert len({i[4] for i in deltas.values()}) == 3  # a stream each, one signature for all
    assert len({sigs[i[4]] for i in deltas.values()}) == 1
    assert decode_signature(sigs[deltas[news[0]][4]]).file_size == len(old)
    peer.send({"type": "abort"})
    assert peer.finish() == 0


def test_a_full_comparison_finds_the_basis_among_the_unlisted_files(edge) -> None:  # noqa: ANN001
    rng = random.Random(7)
    old = rng.randbytes(1 << 20)
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"iso/image-1.2.iso", old, [b"iso"])["type"] == "committed"
    assert peer.finish() == 0
    peer = Peer(edge.ini)
    iso_dir = [b"iso", 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 2]
    messages, _ = iso_push(peer, 2, [[iso_dir, row(b"iso/image-1.3.iso", edited(old, rng), gen=2)]], full=True)
    planned = items_of(messages, "planned")
    assert ["delete", b"iso/image-1.2.iso", None, None, None] in planned
    assert [i[:4] for i in planned if i[1] == b"iso/image-1.3.iso"] == \
        [["delta", b"iso/image-1.3.iso", "delta", b"iso/image-1.2.iso"]]
    peer.send({"type": "abort"})
    assert peer.finish() == 0


@pytest.mark.parametrize("planted", ["symlink", "directory", "parent symlink", "fifo"])
def test_a_basis_swapped_for_something_else_before_it_is_read_is_never_followed(
        edge, tmp_path: Path, planted: str) -> None:  # noqa: ANN001
    # The old version is a regular file when the plan sees its deletion, and
    # something else by the time the agent opens it for the signature: the
    # open walks from root's fd without following anything, refuses what is
    # not a regular file, and the new file is asked for whole.
    rng = random.Random(8)
    old = rng.randbytes(1 << 20)
    new = edited(old, rng)
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"iso/image-1.2.iso", old, [b"iso"])["type"] == "committed"
    assert peer.finish() == 0
    outside = tmp_path / "outside"
    bait = new + b"bait"
    (outside / "image-1.2.iso").write_bytes(bait)  # what a followed link would offer
    peer = Peer(edge.ini)
    peer.send({**begin(2), "full": False, "fuzzy": True},
              {"type": "entries", "batch": 1, "rows": [row(b"iso/image-1.3.iso", new, gen=2)]},
              {"type": "entries", "batch": 2, "rows": [tombstone(b"iso/image-1.2.iso", old, 2)]})
    assert [peer.message()["type"] for _ in range(2)] == ["needs", "needs"]
    target = edge.root / "iso/image-1.2.iso"
    if planted == "parent symlink":
        os.rename(edge.root / "iso", edge.root / "iso.real")
        os.symlink(outside, edge.root / "iso")
    else:
        target.unlink()
        if planted == "symlink":
            os.symlink(outside / "image-1.2.iso", target)
        elif planted == "directory":
            target.mkdir()
            (target / "inside").write_bytes(old)
        else:
            os.mkfifo(target)
    peer.send({"type": "entries_end"})
    messages, sigs = until_planned(peer)
    (item,) = [i for i in items_of(messages, "planned") if i[1] == b"iso/image-1.3.iso"]
    if planted == "parent symlink" and item[2] == "delta":
        # The agent still holds the directory it walked into while planning
        # (now iso.real, inside root): it may read the old file there, never
        # the one behind the link.
        assert decode_signature(sigs[item[4]]).file_size == len(old)
    else:
        assert item[:3] == ["new", b"iso/image-1.3.iso", "whole"]
    peer.send({"type": "abort"})
    assert peer.finish() == 0
    assert (outside / "image-1.2.iso").read_bytes() == bait
    assert sorted(os.listdir(outside)) == ["image-1.2.iso"]


# -- pushes over sshd --------------------------------------------------------------------


def seeded(primary: Path, *mirrors: Path) -> None:
    """Each mirror starts as ``rsync -a`` copies the primary (as an operator
    seeds one): the directory times that only the first push into an empty
    mirror would set are right from the start, and the oracle judges what
    the pushes below change."""
    for mirror in mirrors:
        subprocess.run(["rsync", "-a", "--delete", f"{primary}/", f"{mirror}/"], check=True, timeout=120)


class Counted:
    """A primary and one edge, the edge reached through a counting relay."""

    def __init__(self, base: Path, ssh, relay: Relay) -> None:  # noqa: ANN001
        self.relay = relay
        self.primary = make_node(base, "primary", max_delete="100%")
        self.edge = make_node(base, "edge", max_delete="100%")
        self.primary.mirrors.append((self.edge, {}))
        self.edge.write()
        self.primary.write(ssh, port=relay.port, known_hosts=ssh.known_hosts_for(relay.port))

    def push(self, **kw):  # noqa: ANN003, ANN201
        """One push in process; the bytes the relay carried both ways, and its result."""
        cfg = configmod.load(self.primary.ini)
        self.relay.reset_counts()
        try:
            with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
                scan(cfg.node.root, m)
                result = push_with_retries(cfg, cfg.mirrors[0], m, **kw)
        finally:
            self.edge.wait_agent_ended()
        assert result.ok, result.error
        return sum(self.relay.counts().values()), result


@pytest.fixture
def counted(tmp_path: Path, sshd) -> Counted:  # noqa: ANN001
    with Relay(sshd.host, sshd.port) as relay:
        yield Counted(tmp_path, sshd, relay)


def test_a_64_mib_image_edited_in_three_places_and_renamed_goes_in_under_5_percent(counted: Counted) -> None:
    rng = random.Random(9)
    iso = counted.primary.root / "cdimage/release"
    iso.mkdir(parents=True)
    old = rng.randbytes(64 << 20)
    (iso / "debian-12.3.0-amd64-netinst.iso").write_bytes(old)
    (iso / "README").write_text("images\n")
    seeded(counted.primary.root, counted.edge.root)
    wire, _ = counted.push()
    assert wire < 1 << 20  # the seeded files are found in place, not sent
    (iso / "debian-12.3.0-amd64-netinst.iso").unlink()
    (iso / "debian-12.3.1-amd64-netinst.iso").write_bytes(edited(old, rng))
    wire, result = counted.push()
    assert wire < 0.05 * len(old), wire
    assert result.counts()["delta"] == 1 and result.counts()["delete"] == 1
    assert_same_tree(counted.primary.root, counted.edge.root)
    # The same, found by a full comparison (the old name is unlisted, not a tombstone).
    (iso / "debian-12.3.1-amd64-netinst.iso").rename(iso / "debian-12.3.2-amd64-netinst.iso")
    with open(iso / "debian-12.3.2-amd64-netinst.iso", "r+b") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(4096))
    wire, result = counted.push(force_full=True)
    assert wire < 0.05 * len(old), wire
    assert result.full and result.counts()["delta"] == 1
    assert_same_tree(counted.primary.root, counted.edge.root)


def test_a_basis_of_unrelated_data_still_gives_the_right_file(counted: Counted, caplog) -> None:  # noqa: ANN001
    rng = random.Random(10)
    d = counted.primary.root / "images"
    d.mkdir()
    (d / "disk-1.0.img").write_bytes(rng.randbytes(4 << 20))
    seeded(counted.primary.root, counted.edge.root)
    counted.push()
    (d / "disk-1.0.img").unlink()
    new = (b"a compressible new image " * 200_000)[: 5 << 20]
    (d / "disk-1.1.img").write_bytes(new)
    with caplog.at_level(logging.DEBUG, logger="syncd.push"):
        wire, result = counted.push()
    # The old version was the basis; sampled, it shares nothing: sent whole
    # (and zstd-compressed), not as a delta of literals.
    assert "images/disk-1.1.img shares too little with images/disk-1.0.img" in caplog.text
    assert wire < len(new) // 10
    assert (counted.edge.root / "images/disk-1.1.img").read_bytes() == new
    assert_same_tree(counted.primary.root, counted.edge.root)
    # Random bytes do not compress: the file goes whole, once.
    (d / "disk-1.1.img").unlink()
    new = rng.randbytes(4 << 20)
    (d / "disk-1.2.img").write_bytes(new)
    wire, result = counted.push()
    assert len(new) < wire < 1.1 * len(new)
    assert_same_tree(counted.primary.root, counted.edge.root)


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_symlink_or_directory_at_the_old_name_on_the_edge_is_not_a_basis(
        counted: Counted, tmp_path: Path, planted: str) -> None:
    rng = random.Random(11)
    d = counted.primary.root / "iso"
    d.mkdir()
    old = rng.randbytes(4 << 20)
    (d / "image-1.2.iso").write_bytes(old)
    seeded(counted.primary.root, counted.edge.root)
    counted.push()
    new = edited(old, rng)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bait.iso").write_bytes(new)  # a delta against it would cost nothing
    on_edge = counted.edge.root / "iso/image-1.2.iso"
    on_edge.unlink()
    if planted == "symlink":
        os.symlink(outside / "bait.iso", on_edge)
    else:
        on_edge.mkdir()
        (on_edge / "bait.iso").write_bytes(new)
    (d / "image-1.2.iso").unlink()
    (d / "image-1.3.iso").write_bytes(new)
    wire, _ = counted.push()
    assert wire > len(new)  # sent whole: nothing on the edge was used in its place
    assert (outside / "bait.iso").read_bytes() == new and os.listdir(outside) == ["bait.iso"]
    assert_same_tree(counted.primary.root, counted.edge.root)


def test_a_cascade_sends_the_delta_on_each_tier(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    primary = make_node(tmp_path, "primary", max_delete="100%")
    tier1 = make_node(tmp_path, "tier1", max_delete="100%")
    tier2 = make_node(tmp_path, "tier2", max_delete="100%")
    primary.mirrors = [(tier1, {})]
    tier1.mirrors = [(tier2, {})]
    tier2.write()
    tier1.write(sshd)
    primary.write(sshd)
    rng = random.Random(12)
    d = primary.root / "iso"
    d.mkdir()
    old = rng.randbytes(16 << 20)
    (d / "image-1.2.iso").write_bytes(old)

    def run_once():  # noqa: ANN202
        cfg = configmod.load(primary.ini)
        with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
            scan(cfg.node.root, m)
            (result,) = push_tree(cfg, m)
        for node in (tier1, tier2):
            node.wait_agent_ended()
        assert result.tree_ok(), result.report()
        return result

    seeded(primary.root, tier1.root, tier2.root)
    run_once()
    os.rename(d / "image-1.2.iso", d / "image-1.3.iso")
    with open(d / "image-1.3.iso", "r+b") as f:
        for at in (1 << 20, 8 << 20, 15 << 20):
            f.seek(at)
            f.write(rng.randbytes(4096))
    result = run_once()
    (below,) = result.below
    assert result.counts()["delta"] == 1
    assert result.bytes_sent + result.bytes_received < 0.05 * len(old)
    assert below.bytes_sent < 0.05 * len(old)  # tier1 -> tier2 (the agent reports what it sent)
    for node in (tier1, tier2):
        assert_same_tree(primary.root, node.root)
