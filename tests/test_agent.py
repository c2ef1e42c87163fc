"""Hostile and broken input to the agent: nothing is written outside root, nothing torn is published.

These drive a real ``syncd agent`` process over its stdin/stdout with
hand-made frames, as a malicious or buggy upstream would.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.errors import ProtocolError
from syncd.manifest import Manifest
from syncd.protocol import PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate
from syncd.transport import LocalSession
from tests.nodes import SYNCD, make_node, tree_listing, wait_until


class Peer:
    """A hand-driven client of one agent process."""

    def __init__(self, ini: Path, version: tuple[int, int] = PROTOCOL_VERSION) -> None:
        self.session = LocalSession(SYNCD + ["agent", "--config", str(ini)])
        self.w = FrameWriter(self.session.send_all)
        self.r = FrameReader(self.session.recv)
        self.w.hello(version)
        self.w.message({"type": "hello", "node": "evil", "mirror": "edge"})
        self.w.flush()
        negotiate(version, self.r.read_hello())
        self.welcome = self.message()

    def message(self) -> dict:
        while True:
            frame = self.r.read_frame()
            assert frame is not None, f"agent closed; stderr: {self.session.stderr_tail()}"
            if frame.kind is FrameType.MESSAGE:
                return frame.payload

    def send(self, *messages: dict) -> None:
        for m in messages:
            self.w.message(m)
        self.w.flush()

    def finish(self) -> int:
        self.session.close_write()
        code = self.session.exit_status(timeout=30)
        self.session.close()
        return code


@pytest.fixture
def edge(tmp_path: Path):  # noqa: ANN201
    node = make_node(tmp_path, "edge")
    node.write()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("untouched")
    return node


def row(path: bytes, data: bytes = b"x", *, kind: int = 0, gen: int = 1) -> list:
    return [path, kind, len(data), 1_700_000_000_000_000_000, 0o644,
            hashlib.sha256(data).digest() if kind == 0 else None, None, 0, gen]


def begin(gen: int = 1) -> dict:
    return {"type": "begin", "generation": gen, "full": True, "filter": [], "max_delete_ppm": 1_000_000}


def plan_all(peer: Peer, rows: list, first: dict | None = None) -> tuple[dict, dict]:
    """``first`` (a plain ``begin()`` by default), one entries batch and
    entries_end: the agent's needs and planned."""
    peer.send(first or begin(), {"type": "entries", "batch": 1, "rows": rows}, {"type": "entries_end"})
    needs, planned = peer.message(), peer.message()
    assert (needs["type"], planned["type"]) == ("needs", "planned"), (needs, planned)
    return needs, planned


def assert_outside_untouched(edge) -> None:  # noqa: ANN001
    outside = edge.base.parent / "outside"
    assert sorted(os.listdir(outside)) == ["canary"]
    assert (outside / "canary").read_text() == "untouched"


@pytest.mark.parametrize("bad", [
    b"../outside/canary", b"/etc/passwd", b"a/../../outside/x", b"a\0b", b"./a", b"a//b", b"", b"a/",
])
def test_unsafe_names_in_entries_are_refused(edge, bad: bytes) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"ok", b"fine"), row(bad)]})
    answer = peer.message()
    assert answer["type"] == "error" and answer["kind"] == "UnsafePathError", answer
    assert peer.finish() != 0
    assert list(edge.root.iterdir()) == []
    assert_outside_untouched(edge)


def test_unsafe_name_in_file_message_is_refused(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"ok", b"fine")]})
    assert peer.message()["type"] == "needs"
    peer.send({"type": "file", "stream": 1, "path": b"../outside/canary", "how": "whole", "size": 4,
               "sha256": hashlib.sha256(b"evil").digest()})
    answer = peer.message()
    assert answer["type"] == "error" and answer["kind"] == "UnsafePathError"
    assert peer.finish() != 0
    assert_outside_untouched(edge)
    assert list(edge.root.iterdir()) == []


def test_oversized_frame_is_refused_without_allocating(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    # A MESSAGE header declaring 3 GiB.
    peer.session.send_all(struct.pack(">BII", 1, 0, 3 << 30))
    answer = peer.message()
    assert answer["type"] == "error" and "above the limit" in answer["message"]
    assert peer.finish() != 0


def test_garbage_frame_type(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    peer.session.send_all(b"\x7f" + b"\0" * 8)
    answer = peer.message()
    assert answer["type"] == "error" and "unknown frame type" in answer["message"]
    assert peer.finish() != 0


def test_truncated_stream_publishes_nothing_and_leaves_no_temp(edge) -> None:  # noqa: ANN001
    data = os.urandom(1 << 20)
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"big", data)]}, {"type": "entries_end"})
    needs = peer.message()
    assert needs["items"][0][2] == "whole"
    assert peer.message()["type"] == "planned"
    peer.send({"type": "file", "stream": 1, "path": b"big", "how": "whole", "size": len(data),
               "sha256": hashlib.sha256(data).digest()})
    peer.w.data(1, data[: len(data) // 2])
    peer.w.flush()
    peer.finish()  # the link drops half way through
    assert list(edge.root.iterdir()) == []
    assert [p.name for p in (edge.state / "staging").iterdir()] == []
    # And the next session starts clean and works.
    peer = Peer(edge.ini)
    assert peer.welcome["generation"] is None
    assert peer.finish() == 0


def test_wrong_content_is_failed_not_published(edge) -> None:  # noqa: ANN001
    good = b"the real content"
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"f", good)]}, {"type": "entries_end"})
    assert peer.message()["type"] == "needs"
    assert peer.message()["type"] == "planned"
    peer.send({"type": "file", "stream": 1, "path": b"f", "how": "whole", "size": len(good),
               "sha256": hashlib.sha256(good).digest()})
    peer.w.data(1, b"X" * len(good))
    peer.w.end(1)
    peer.w.flush()
    answer = peer.message()
    assert answer["type"] == "failed" and "SHA-256" in answer["error"]
    # A commit now is refused: the file never arrived whole.
    peer.send({"type": "commit", "generation": 1})
    answer = peer.message()
    assert answer["type"] == "error" and "never received" in answer["message"]
    peer.finish()
    assert list(edge.root.iterdir()) == []


def test_zstd_bomb_is_bounded(edge) -> None:  # noqa: ANN001
    import zstandard

    small = b"ok"
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"f", small)]}, {"type": "entries_end"})
    peer.message()
    peer.message()
    peer.send({"type": "file", "stream": 1, "path": b"f", "how": "zstd", "size": len(small),
               "sha256": hashlib.sha256(small).digest()})
    peer.w.data(1, bomb)
    peer.w.end(1)
    peer.w.flush()
    answer = peer.message()
    assert answer["type"] in ("failed", "error")
    peer.finish()
    assert list(edge.root.iterdir()) == []


def test_disk_full_is_one_line_and_publishes_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=2m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        node = make_node(mnt, "edge")
        node.write()
        data = os.urandom(3 << 20)
        peer = Peer(node.ini)
        peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"huge", data)]},
                  {"type": "entries_end"})
        peer.message()
        peer.message()
        peer.send({"type": "file", "stream": 1, "path": b"huge", "how": "whole", "size": len(data),
                   "sha256": hashlib.sha256(data).digest()})
        peer.w.data(1, data)
        peer.w.end(1)
        peer.w.flush()
        answer = peer.message()
        assert answer["type"] == "error" and "disk full" in answer["message"]
        assert "\n" not in answer["message"]
        peer.finish()
        assert list(node.root.iterdir()) == []
        # The partial temp file is gone at the next start.
        Peer(node.ini).finish()
        assert [p.name for p in (node.state / "staging").iterdir()] == []
    finally:
        for _ in range(50):
            if os.system(f"umount {mnt} 2>/dev/null") == 0:
                break
            time.sleep(0.1)


def test_disk_full_as_names_a_full_disk_and_passes_other_errors() -> None:
    import errno

    from syncd.errors import DiskFullError, disk_full_as

    for code in (errno.ENOSPC, errno.EDQUOT):
        with pytest.raises(DiskFullError, match="^disk full staging x$") as caught:
            with disk_full_as(lambda: "disk full staging x"):
                raise OSError(code, os.strerror(code))
        assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(PermissionError):
        with disk_full_as(lambda: "never asked"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(ValueError):
        with disk_full_as(lambda: "never asked"):
            raise ValueError("not an OSError")
    with disk_full_as(lambda: "never asked"):
        pass


def test_second_push_waits_for_the_first(edge) -> None:  # noqa: ANN001
    """Two pushes into one node (a reconcile meeting a cascade) queue, not fail.

    The lock is per push: both sessions are welcomed at once, the second
    push's begin waits until the first push ends.
    """
    import threading

    first = Peer(edge.ini)
    first.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"a", b"A")]})
    assert first.message()["type"] == "needs"  # the first push holds the lock now
    got: dict = {}

    def second_push() -> None:
        peer = Peer(edge.ini)
        got["welcome"] = peer.welcome
        peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"b", b"B")]})
        got["needs"] = peer.message()
        got["code"] = peer.finish()

    t = threading.Thread(target=second_push)
    t.start()
    wait_until(lambda: "welcome" in got, what="the second push's welcome")
    t.join(0.5)
    assert t.is_alive() and "needs" not in got  # welcomed, waiting to begin
    assert first.finish() == 0  # the first push ends (nothing committed)
    t.join(30)
    assert got["needs"]["type"] == "needs" and got["code"] == 0
    assert tree_listing(edge.root) == {}


def test_forced_command_serves_the_stage_mode_when_asked(edge, monkeypatch) -> None:  # noqa: ANN001
    """authorized_keys' command= runs plain `syncd agent`; a prewarm stream's
    request for `agent --stage` arrives in $SSH_ORIGINAL_COMMAND."""
    env = dict(os.environ, SSH_ORIGINAL_COMMAND="syncd agent --stage --config /x/sync.ini")
    session = LocalSession(SYNCD + ["agent", "--config", str(edge.ini)], env=env)
    w = FrameWriter(session.send_all)
    r = FrameReader(session.recv)
    w.hello()
    w.message({"type": "hello", "node": "p", "mirror": "edge", "role": "edge"})
    w.message({"type": "have", "batch": 1, "objects": []})  # a stager's message, unknown to the agent
    w.flush()
    negotiate(PROTOCOL_VERSION, r.read_hello())
    kinds = []
    while len(kinds) < 2:
        frame = r.read_frame()
        assert frame is not None, session.stderr_tail()
        kinds.append(frame.payload["type"])
    assert kinds == ["welcome", "have"]
    session.close_write()
    assert session.exit_status(timeout=30) == 0
    session.close()


def test_listed_paths_spill_to_disk_beyond_the_bound(tmp_path: Path) -> None:
    """A full comparison's listed paths: in memory up to the bound, then in
    a scratch file in staging, with the same answers; clear() removes it."""
    from syncd.agent.plan import PathSet

    seen = PathSet(limit=100, where=tmp_path)
    paths = [f"d{i % 7}/f{i}".encode() for i in range(25_000)]
    for p in paths[:100]:
        seen.add(p)
    assert not list(tmp_path.iterdir()) and paths[5] in seen
    for p in paths[100:]:
        seen.add(p)
    scratch = list(tmp_path.iterdir())
    assert [f.name.split(".")[0] for f in scratch] == ["tmp"]  # the agents' temp cleanup knows it
    assert all(p in seen for p in paths[::97]) and paths[-1] in seen
    assert b"d1/f3" not in seen and b"elsewhere" not in seen
    seen.clear()
    assert not list(tmp_path.iterdir())


def push_one(peer: Peer, gen: int, path: bytes, data: bytes, dirs: list[bytes]) -> dict:
    """One whole push over a kept session: the directories, then one file."""
    rows = [[d, 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, gen] for d in dirs]
    peer.send(begin(gen), {"type": "entries", "batch": 1, "rows": rows + [row(path, data, gen=gen)]})
    needs = peer.message()
    assert needs["type"] == "needs", needs
    peer.send({"type": "entries_end"})
    assert peer.message()["type"] == "planned"
    if any(item[2] == "whole" for item in needs["items"]):
        peer.w.message({"type": "file", "stream": gen, "path": path, "how": "whole", "size": len(data),
                        "sha256": hashlib.sha256(data).digest()})
        peer.w.data(gen, data)
        peer.w.end(gen)
        peer.w.flush()
        assert peer.message()["type"] == "staged"
    peer.send({"type": "commit", "generation": gen})
    return peer.message()


def test_kept_session_walks_afresh_after_the_tree_changed_under_it(edge) -> None:  # noqa: ANN001
    """Between two pushes of one session, a directory is replaced behind the
    agent's back: the second push lands in the directory that is there now,
    not in the old one through a directory fd kept from the first."""
    peer = Peer(edge.ini)
    assert push_one(peer, 1, b"a/b/one", b"first", [b"a", b"a/b"])["type"] == "committed"
    peer.send({"type": "hello", "node": "evil", "mirror": "edge"})
    assert peer.message()["type"] == "welcome"
    moved = edge.base / "moved-away"
    os.rename(edge.root / "a", moved)  # out of root, same filesystem: a kept fd would follow it
    (edge.root / "a" / "b").mkdir(parents=True)
    assert push_one(peer, 2, b"a/b/two", b"second", [b"a", b"a/b"])["type"] == "committed"
    assert (edge.root / "a" / "b" / "two").read_bytes() == b"second"
    assert not (moved / "b" / "two").exists()
    peer.send({"type": "bye"})
    assert peer.finish() == 0


def send_bundle(peer: Peer, stream: int, files: list[tuple[bytes, bytes]], *, body: bytes | None = None,
                sha: dict | None = None) -> None:
    items = [[p, len(d), (sha or {}).get(p, hashlib.sha256(d).digest())] for p, d in files]
    peer.w.message({"type": "files", "stream": stream, "how": "whole", "items": items})
    peer.w.data(stream, b"".join(d for _, d in files) if body is None else body)
    peer.w.end(stream)
    peer.w.flush()


def test_bundle_of_small_files_is_staged_and_published(edge) -> None:  # noqa: ANN001
    files = [(b"f%d" % i, os.urandom(i * 37)) for i in range(12)]  # f0 is empty
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(p, d) for p, d in files]})
    assert peer.message()["type"] == "needs"
    peer.send({"type": "entries_end"})
    assert peer.message()["type"] == "planned"
    send_bundle(peer, 1, files)
    staged = peer.message()
    assert staged["type"] == "staged" and sorted(staged["paths"]) == sorted(p for p, _ in files)
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    for p, d in files:
        assert (edge.root / p.decode()).read_bytes() == d


def test_bundle_file_with_wrong_content_is_failed_alone(edge) -> None:  # noqa: ANN001
    files = [(b"a", b"alpha"), (b"b", b"bravo"), (b"c", b"charlie")]
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(p, d) for p, d in files]})
    assert peer.message()["type"] == "needs"
    send_bundle(peer, 1, files, sha={b"b": hashlib.sha256(b"other").digest()})
    answers = [peer.message(), peer.message()]
    assert {a["type"] for a in answers} == {"failed", "staged"}
    failed = next(a for a in answers if a["type"] == "failed")
    assert failed["path"] == b"b" and failed["retry_whole"]
    assert sorted(next(a for a in answers if a["type"] == "staged")["paths"]) == [b"a", b"c"]
    peer.send({"type": "bye"})
    assert peer.finish() == 0
    assert list(edge.root.iterdir()) == []


@pytest.mark.parametrize("case", ["unsafe name", "too many bytes", "too few bytes", "bad item"])
def test_hostile_bundles_are_refused(edge, case: str) -> None:  # noqa: ANN001
    files = [(b"ok", b"fine"), (b"also", b"good")]
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(p, d) for p, d in files]})
    assert peer.message()["type"] == "needs"
    if case == "unsafe name":
        send_bundle(peer, 1, [(b"ok", b"fine"), (b"../outside/canary", b"evil")])
    elif case == "too many bytes":
        send_bundle(peer, 1, files, body=b"finegood" + b"X" * 100)
    elif case == "too few bytes":
        send_bundle(peer, 1, files, body=b"fine")
    else:
        peer.send({"type": "files", "stream": 1, "how": "whole", "items": [[b"ok", -1, b"x"]]})
    answer = peer.message()
    while answer["type"] == "staged":  # the whole first file may be acknowledged first
        answer = peer.message()
    assert answer["type"] == "error", answer
    assert peer.finish() != 0
    assert list(edge.root.iterdir()) == []
    assert_outside_untouched(edge)


def test_zstd_bomb_in_a_bundle_is_refused(edge) -> None:  # noqa: ANN001
    """A zstd bundle that inflates past the announced sizes is stopped there:
    an error, nothing published, no unbounded write."""
    import zstandard

    files = [(b"a", b"x" * 100), (b"b", b"y" * 100)]
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(p, d) for p, d in files]})
    assert peer.message()["type"] == "needs"
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))  # 64 MiB from a few KiB
    peer.w.message({"type": "files", "stream": 1, "how": "zstd",
                    "items": [[p, len(d), hashlib.sha256(d).digest()] for p, d in files]})
    peer.w.data(1, bomb)
    peer.w.end(1)
    peer.w.flush()
    answer = peer.message()
    while answer["type"] in ("staged", "failed"):
        answer = peer.message()
    assert answer["type"] == "error" and "more than the announced" in answer["message"], answer
    assert peer.finish() != 0
    assert list(edge.root.iterdir()) == []
    staged = sum(f.stat().st_size for f in (edge.state / "staging").iterdir() if f.is_file())
    assert staged < 1 << 20


@pytest.mark.parametrize("version", [(1, 1), (1, 2)])
def test_a_big_local_copy_is_acknowledged_from_protocol_1_2_on(edge, version: tuple[int, int]) -> None:  # noqa: ANN001
    # 1.2: the item says need "copy" and a staging thread copies the file,
    # then says "staged" like for a file received.  1.1: copied at once, need None.
    data = os.urandom(2 << 20)
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(b"a", data)]}, {"type": "entries_end"})
    assert peer.message()["items"][0][2] == "whole"
    assert peer.message()["type"] == "planned"
    peer.send({"type": "file", "stream": 1, "path": b"a", "how": "whole", "size": len(data),
               "sha256": hashlib.sha256(data).digest()})
    peer.w.data(1, data)
    peer.w.end(1)
    peer.send({"type": "commit", "generation": 1})
    assert peer.message() == {"type": "staged", "path": b"a"}
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0

    peer = Peer(edge.ini, version)
    peer.send({**begin(2), "full": False}, {"type": "entries", "batch": 1, "rows": [row(b"b", data, gen=2)]},
              {"type": "entries_end"})
    item = peer.message()["items"][0]
    assert item[:2] == ["copy", b"b"] and item[3] == b"a"
    if version >= (1, 2):
        assert item[2] == "copy"
        answers = [peer.message(), peer.message()]  # the copy's ack may come before or after "planned"
        assert {"type": "staged", "path": b"b"} in answers and {"type": "planned", "items": []} in answers
    else:
        assert item[2] is None
        assert peer.message()["type"] == "planned"
    peer.send({"type": "commit", "generation": 2})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    assert (edge.root / "b").read_bytes() == data


def test_new_directories_are_made_while_planning_and_recorded_at_commit(edge) -> None:  # noqa: ANN001
    # A thread makes a push's new directories (final mode) before the commit;
    # nothing else appears in root until then.
    data = b"content"
    d = [b"pool", 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 1]
    sub = [b"pool/main", 1, 0, 1_700_000_000_000_000_000, 0o750, None, None, 0, 1]
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [d, sub, row(b"pool/main/f", data)]},
              {"type": "entries_end"})
    assert peer.message()["type"] == "needs"
    assert peer.message()["type"] == "planned"
    def made() -> bool:  # made 0700, then given its mode
        try:
            return stat.S_IMODE((edge.root / "pool/main").stat().st_mode) == 0o750
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while not made() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert made()
    assert list((edge.root / "pool/main").iterdir()) == []
    peer.send({"type": "file", "stream": 1, "path": b"pool/main/f", "how": "whole", "size": len(data),
               "sha256": hashlib.sha256(data).digest()})
    peer.w.data(1, data)
    peer.w.end(1)
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "staged"
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    assert (edge.root / "pool/main/f").read_bytes() == data
    assert stat.S_IMODE((edge.root / "pool").stat().st_mode) == 0o755
    assert (edge.root / "pool").stat().st_mtime_ns == 1_700_000_000_000_000_000
    with Manifest.open(edge.state, "edge") as m:
        assert m.lookup(b"pool/main").mode == 0o750


def test_new_directories_of_a_push_that_never_commits_are_taken_back(edge) -> None:  # noqa: ANN001
    d = [b"pool", 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 1]
    sub = [b"pool/main", 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 1]
    peer = Peer(edge.ini)
    plan_all(peer, [d, sub, row(b"pool/main/f", b"data")])
    peer.finish()  # the link drops before any file or commit
    assert list(edge.root.iterdir()) == []


def test_too_many_open_files_is_an_error(edge) -> None:  # noqa: ANN001
    # Each open file may hold a write buffer: a peer may not open without bound.
    peer = Peer(edge.ini)
    plan_all(peer, [row(b"f%d" % i, b"%d" % i) for i in range(70)])
    for i in range(70):
        data = b"%d" % i
        peer.w.message({"type": "file", "stream": i + 1, "path": b"f%d" % i, "how": "whole",
                        "size": len(data), "sha256": hashlib.sha256(data).digest()})
    peer.w.flush()
    answer = peer.message()
    assert answer["type"] == "error" and "at once" in answer["message"]
    assert peer.finish() != 0
    assert list(edge.root.iterdir()) == []


def commit_one_file(edge, path: bytes, data: bytes, gen: int = 1) -> None:  # noqa: ANN001
    """Generation ``gen`` of the edge: the one file ``path``, sent whole."""
    peer = Peer(edge.ini)
    assert push_one(peer, gen, path, data, [])["type"] == "committed"
    assert peer.finish() == 0


@pytest.mark.parametrize("version", [(1, 2), (1, 3)])
def test_signatures_follow_the_needs_from_protocol_1_3_on(edge, version: tuple[int, int]) -> None:  # noqa: ANN001
    # 1.3: the needs naming a signature stream comes first, and the signature
    # (DATA..., END) as soon as it is computed; 1.2: signatures, then needs.
    old = os.urandom(256 * 1024)
    commit_one_file(edge, b"f", old)
    new = old[:1000] + b"inserted" + old[1000:]
    peer = Peer(edge.ini, version)
    peer.send({**begin(2), "full": False}, {"type": "entries", "batch": 1, "rows": [row(b"f", new, gen=2)]})
    order = []
    while True:
        frame = peer.r.read_frame()
        order.append((frame.kind, frame.stream))
        if frame.kind is FrameType.MESSAGE:
            needs = frame.payload
            if version < (1, 3):
                break
        elif frame.kind is FrameType.END:
            if version >= (1, 3):
                break
    assert needs["type"] == "needs"
    action, path, need, _, sig_stream = needs["items"][0]
    assert (action, path, need) == ("delta", b"f", "delta")
    kinds = [k for k, s in order if k is FrameType.MESSAGE or s == sig_stream]
    if version >= (1, 3):
        assert kinds[0] is FrameType.MESSAGE and kinds[-1] is FrameType.END
    else:
        assert kinds[0] is FrameType.DATA and kinds[-1] is FrameType.MESSAGE
    peer.send({"type": "abort"})
    assert peer.finish() == 0


def test_a_signature_that_cannot_be_read_asks_for_the_file_whole() -> None:
    # The signature thread's failure (the edge's copy unreadable) is not the
    # session's end: the item's file is asked for again, whole (1.3).
    from syncd.agent.receive import answer_failed
    from syncd.agent.signatures import Signatures
    from syncd.agent.wire import LockedWriter

    sent = bytearray()
    writer = LockedWriter(sent.extend)
    signatures = Signatures(writer, failed=lambda path, error: answer_failed(writer, path, error),
                            quiet=lambda: False)

    class Failed:
        def result(self) -> bytes:
            raise OSError(5, "Input/output error")

    signatures.signature_done(7, b"pool/x.deb", Failed())
    frames = list(FrameReader(_reader(bytes(sent))))
    assert len(frames) == 1 and frames[0].kind is FrameType.MESSAGE
    msg = frames[0].payload
    assert msg["type"] == "failed" and msg["path"] == b"pool/x.deb" and msg["retry_whole"] is True
    assert "Input/output error" in msg["error"]


def _reader(data: bytes):  # noqa: ANN202
    view = memoryview(data)
    at = [0]

    def recv(n: int) -> bytes:
        chunk = bytes(view[at[0]:at[0] + n])
        at[0] += len(chunk)
        return chunk

    return recv


def test_files_interleaved_in_frames_of_any_size_arrive_intact(edge) -> None:  # noqa: ANN001
    # The agent reads DATA bodies into recycled buffers that the staging
    # threads give back: streams interleaved frame by frame, frames from one
    # byte to 3 MiB, whole, zstd and a bundle, each file arrives intact.
    import random

    import zstandard

    rnd = random.Random(5)
    text = b"".join(b"Package: p%d\nVersion: 1.%d\n\n" % (i, i % 7) for i in range(200_000))
    files = {b"a": rnd.randbytes((5 << 20) + 3), b"b": rnd.randbytes(2 << 20), b"c": rnd.randbytes(777),
             b"d": text}
    bundle = [(b"e%d" % i, rnd.randbytes(rnd.randrange(200_000))) for i in range(10)]
    peer = Peer(edge.ini)
    plan_all(peer, [row(path, data) for path, data in list(files.items()) + bundle])
    bodies = {}
    for stream, (path, data) in enumerate(files.items(), 1):
        how = "zstd" if path == b"d" else "whole"
        peer.w.message({"type": "file", "stream": stream, "path": path, "how": how, "size": len(data),
                        "sha256": hashlib.sha256(data).digest()})
        bodies[stream] = zstandard.ZstdCompressor().compress(data) if how == "zstd" else data
    stream = len(files) + 1
    peer.w.message({"type": "files", "stream": stream, "how": "whole",
                    "items": [[p, len(d), hashlib.sha256(d).digest()] for p, d in bundle]})
    bodies[stream] = b"".join(d for _, d in bundle)
    sizes = [1, 3 << 20, 4096, 1 << 20, 65537, 7, (1 << 20) - 1]
    at = dict.fromkeys(bodies, 0)
    i = 0
    while at:
        for stream in list(at):
            piece = bodies[stream][at[stream]:at[stream] + sizes[i % len(sizes)]]
            i += 1
            if piece:
                peer.w.data(stream, piece)
                at[stream] += len(piece)
            else:
                peer.w.end(stream)
                del at[stream]
    peer.send({"type": "commit", "generation": 1})
    while (answer := peer.message())["type"] != "committed":
        assert answer["type"] == "staged", answer
    assert peer.finish() == 0
    for path, data in list(files.items()) + bundle:
        assert (edge.root / path.decode()).read_bytes() == data


def test_staging_threads_give_each_body_buffer_back() -> None:
    # Fed, dropped (a dead file, a failed session) or failed: the staging
    # thread gives the chunk's buffer back, unless a view of it is still
    # alive (here one kept by the consumer, or one in a kept traceback).
    from syncd.agent.receive import StagingThread
    from syncd.protocol import BodyPool

    class Inc:
        def __init__(self, dead: bool = False, keep: bool = False, fail: bool = False) -> None:
            self.dead, self.keep, self.fail, self.path = dead, keep, fail, b"f"
            self.fed: list[bytes] = []

        def feed(self, data: memoryview) -> None:
            self.fed.append(bytes(data))
            view = memoryview(data)[1:]
            if self.keep:
                self.kept = view
            if self.fail:
                raise ValueError("corrupt")  # its traceback holds ``view``

        def discard(self) -> None:
            pass

    def stage(inc: Inc, failure: Exception | None = None) -> bool:
        """Whether the chunk's buffer is back in the pool once it is staged."""
        fed = [] if inc.dead or failure else [b"0123456789"]
        pool = BodyPool(16, limit=4)
        fake = type("FakeAgent", (), {})()
        fake.bodies, fake.failure, fake.closing = pool, failure, False
        fake.errors = []
        fake.staging_failed = lambda inc, err: fake.errors.append(err)  # kept, with its traceback
        stager = StagingThread(fake, 0)
        stager.start()
        body = pool.take(10)
        body[:] = b"0123456789"
        buf = body.obj
        stager.put((inc, body))
        stager.put(None)
        stager.join()
        assert inc.fed == fed
        assert [type(e) for e in fake.errors] == ([ValueError] if inc.fail else [])
        return any(b is buf for b in pool._free)

    assert stage(Inc())
    assert stage(Inc(dead=True))
    assert stage(Inc(), failure=ProtocolError("the session failed"))
    assert not stage(Inc(keep=True))
    assert not stage(Inc(fail=True))


def test_large_replaced_and_deleted_files_are_freed_after_the_commit(edge) -> None:  # noqa: ANN001
    # A large file replaced, and one deleted, are moved aside into staging at
    # publish and unlinked after "committed" (here: at the session's end, or
    # a second later); a killed agent's leftovers go at the next session.
    big, gone = os.urandom(2 << 20), os.urandom(2 << 20)
    peer = Peer(edge.ini)
    plan_all(peer, [row(b"big", big), row(b"gone", gone)])
    for stream, (path, data) in enumerate([(b"big", big), (b"gone", gone)], 1):
        peer.w.message({"type": "file", "stream": stream, "path": path, "how": "whole", "size": len(data),
                        "sha256": hashlib.sha256(data).digest()})
        peer.w.data(stream, data)
        peer.w.end(stream)
    peer.send({"type": "commit", "generation": 1})
    answers = [peer.message() for _ in range(3)]
    assert answers[-1]["type"] == "committed"
    assert peer.finish() == 0
    staging = edge.state / "staging"
    (staging / "trash.999999999.1").write_bytes(b"left by a killed agent")

    new = os.urandom(2 << 20)
    peer = Peer(edge.ini)
    assert not (staging / "trash.999999999.1").exists()
    tombstone = row(b"gone", gone, gen=2)
    tombstone[7] = 1
    peer.send({**begin(2), "full": False},
              {"type": "entries", "batch": 1, "rows": [row(b"big", new, gen=2), tombstone]},
              {"type": "entries_end"})
    needs = peer.message()
    assert [i[:3] for i in needs["items"]][0][:2] == ["delta", b"big"]
    assert peer.message()["type"] == "planned"
    peer.w.message({"type": "file", "stream": 1, "path": b"big", "how": "whole", "size": len(new),
                    "sha256": hashlib.sha256(new).digest()})
    peer.w.data(1, new)
    peer.w.end(1)
    peer.send({"type": "commit", "generation": 2})
    while (answer := peer.message())["type"] != "committed":
        assert answer["type"] == "staged", answer
    # Committed, and both old files are still held in staging for a moment.
    assert len([p for p in staging.iterdir() if p.name.startswith("trash.")]) == 2
    assert (edge.root / "big").read_bytes() == new
    assert not (edge.root / "gone").exists()
    assert peer.finish() == 0
    assert [p.name for p in staging.iterdir() if p.name.startswith(("trash.", "tmp."))] == []


def test_a_large_signature_is_computed_in_two_halves(tmp_path: Path) -> None:
    # The two halves of a large old copy are read at once; joined, they are
    # the file's signature.  An unreadable copy fails the one Future.
    from concurrent.futures import ThreadPoolExecutor

    from syncd.agent.signatures import SIG_SPLIT_MIN, split_signature as _split_signature
    from syncd.delta import make_signature

    data = os.urandom(SIG_SPLIT_MIN + 123_457)
    (tmp_path / "old").write_bytes(data)
    with ThreadPoolExecutor(2) as pool:
        fd = os.open(tmp_path / "old", os.O_RDONLY)
        assert _split_signature(pool, fd, len(data)).result(timeout=60) == make_signature(data).encode()
        with pytest.raises(OSError):
            _split_signature(pool, os.open(tmp_path, os.O_RDONLY), SIG_SPLIT_MIN).result(timeout=60)


def send_whole(peer: Peer, stream: int, path: bytes, data: bytes) -> None:
    peer.w.message({"type": "file", "stream": stream, "path": path, "how": "whole", "size": len(data),
                    "sha256": hashlib.sha256(data).digest()})
    peer.w.data(stream, data)
    peer.w.end(stream)
    peer.w.flush()


def staged_paths(peer: Peer, n: int) -> set[bytes]:
    got: set[bytes] = set()
    while len(got) < n:
        m = peer.message()
        assert m["type"] == "staged", m
        got |= set(m["paths"]) if "paths" in m else {m["path"]}
    return got


def listing_settles(root: Path, want: set[str], timeout: float = 10) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}
        if got == want or time.monotonic() > deadline:
            return got


def test_new_data_files_go_live_during_the_push_and_the_rest_at_its_commit(edge) -> None:  # noqa: ANN001
    # Once the plan is complete, a new data file goes live as soon as it is
    # staged (durable, hashed, final mode and mtime); the index group, and a
    # content published under two paths, wait for the commit.
    files = {b"pool/a.deb": b"a" * 3000, b"pool/b.deb": b"b", b"dists/Release": b"Origin: test\n",
             b"twin1": b"same", b"twin2": b"same"}
    dirs = [[d, 1, 0, 1_700_000_000_000_000_000, 0o755, None, None, 0, 1] for d in (b"pool", b"dists")]
    peer = Peer(edge.ini)
    needs, _ = plan_all(peer, dirs + [row(p, d) for p, d in files.items()])
    wanted = [item[1] for item in needs["items"] if item[2] == "whole"]
    for i, path in enumerate(wanted):
        send_whole(peer, i + 1, path, files[path])
    assert staged_paths(peer, len(wanted)) == set(wanted)
    assert listing_settles(edge.root, {"pool/a.deb", "pool/b.deb"}) == {"pool/a.deb", "pool/b.deb"}
    assert (edge.root / "pool/a.deb").read_bytes() == files[b"pool/a.deb"]
    assert (edge.root / "pool/a.deb").stat().st_mtime_ns == 1_700_000_000_000_000_000
    with Manifest.open(edge.state, "edge") as m:
        assert m.generation == 0  # nothing recorded before the commit
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    for path, data in files.items():
        assert (edge.root / os.fsdecode(path)).read_bytes() == data
    with Manifest.open(edge.state, "edge") as m:
        early = m.lookup(b"pool/a.deb")
        assert early.ino == (edge.root / "pool/a.deb").stat().st_ino
    assert not list((edge.state / "staging").iterdir())


def test_a_plan_the_deletion_guard_will_refuse_publishes_nothing_early(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    plan_all(peer, [row(b"f%d" % i, b"%d" % i) for i in range(10)])
    for i in range(10):
        send_whole(peer, i + 1, b"f%d" % i, b"%d" % i)
    staged_paths(peer, 10)
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    # Generation 2 lists one new file and none of the ten: a guard of 10% refuses it.
    peer = Peer(edge.ini)
    _, planned = plan_all(peer, [row(b"new", b"new", gen=2)], dict(begin(2), max_delete_ppm=100_000))
    assert len(planned["items"]) == 10  # ten deletions
    send_whole(peer, 1, b"new", b"new")
    assert staged_paths(peer, 1) == {b"new"}
    time.sleep(0.2)  # longer than the early publisher's wait
    assert not (edge.root / "new").exists()
    peer.send({"type": "commit", "generation": 2})
    answer = peer.message()
    assert answer["type"] == "error" and answer["kind"] == "DeletionGuardError"
    peer.finish()
    assert not (edge.root / "new").exists()
    assert sorted(os.listdir(edge.root)) == sorted(f"f{i}" for i in range(10))


def test_files_staged_before_the_plan_ends_go_live_once_it_does_and_stay_if_the_push_is_cut(edge) -> None:  # noqa: ANN001
    files = {b"a.deb": b"a" * 5000, b"b.deb": b"b" * 7}
    peer = Peer(edge.ini)
    peer.send(begin(), {"type": "entries", "batch": 1, "rows": [row(p, d) for p, d in files.items()]})
    assert peer.message()["type"] == "needs"
    for i, (path, data) in enumerate(files.items()):
        send_whole(peer, i + 1, path, data)
    assert staged_paths(peer, 2) == set(files)
    time.sleep(0.2)
    assert listing_settles(edge.root, set(), timeout=0) == set()  # the plan is not complete yet
    peer.send({"type": "entries_end"})
    assert peer.message()["type"] == "planned"
    assert listing_settles(edge.root, {"a.deb", "b.deb"}) == {"a.deb", "b.deb"}
    peer.finish()  # cut before the commit: they stay, whole and verified, unrecorded
    assert (edge.root / "a.deb").read_bytes() == files[b"a.deb"]
    with Manifest.open(edge.state, "edge") as m:
        assert m.generation == 0
    # The next push finds them in place (a local re-hash) and asks for nothing.
    peer = Peer(edge.ini)
    needs, _ = plan_all(peer, [row(p, d) for p, d in files.items()])
    assert needs["items"] == []
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    with Manifest.open(edge.state, "edge") as m:
        assert m.generation == 1 and m.lookup(b"a.deb").sha256 == hashlib.sha256(files[b"a.deb"]).digest()


@pytest.mark.parametrize("case", ["1.3 peer", "not full", "negative commit", "entries_end twice"])
def test_protocol_1_4_begin_without_generation_is_checked(edge, case: str) -> None:  # noqa: ANN001
    peer = Peer(edge.ini, version=(1, 3) if case == "1.3 peer" else PROTOCOL_VERSION)
    first = dict(begin(), generation=None, full=case != "not full")
    peer.send(first, {"type": "entries", "batch": 1, "rows": [row(b"f", b"f")]})
    if case in ("1.3 peer", "not full"):
        answer = peer.message()
        assert answer["type"] == "error" and "generation" in answer["message"], answer
    else:
        assert peer.message()["type"] == "needs"
        peer.send({"type": "entries_end"})
        assert peer.message()["type"] == "planned"
        send_whole(peer, 1, b"f", b"f")
        assert staged_paths(peer, 1) == {b"f"}
        if case == "negative commit":
            peer.send({"type": "commit", "generation": -1})
            answer = peer.message()
            assert answer["type"] == "error" and "negative" in answer["message"], answer
        else:
            peer.send({"type": "entries_end"})
            answer = peer.message()
            assert answer["type"] == "error" and "entries_end twice" in answer["message"], answer
    assert peer.finish() != 0
    with Manifest.open(edge.state, "edge") as m:
        assert m.generation == 0


def test_protocol_1_4_commit_names_the_generation_begin_left_open(edge) -> None:  # noqa: ANN001
    peer = Peer(edge.ini)
    plan_all(peer, [row(b"f", b"f", gen=7)], dict(begin(), generation=None))
    send_whole(peer, 1, b"f", b"f")
    assert staged_paths(peer, 1) == {b"f"}
    peer.send({"type": "commit", "generation": 7})
    answer = peer.message()
    assert answer["type"] == "committed" and answer["generation"] == 7
    assert peer.finish() == 0
    with Manifest.open(edge.state, "edge") as m:
        assert m.generation == 7 and m.get_meta("upstream_generation") == "7"


ROOT_T = 1_650_000_000_000_000_000
POOL_T = 1_660_000_000_000_000_000


def root_row(gen: int, mtime_ns: int = ROOT_T) -> list:
    """commit's "root": root's own mode and mtime, as a row of the empty path."""
    return [b"", 1, 0, mtime_ns, 0o755, None, None, 0, gen]


def test_directories_a_push_cut_short_touched_get_their_times_back_at_the_next_commit(edge) -> None:  # noqa: ANN001
    pool = [b"pool", 1, 0, POOL_T, 0o755, None, None, 0, 1]
    peer = Peer(edge.ini)
    plan_all(peer, [pool, row(b"pool/old.deb", b"old")])
    send_whole(peer, 1, b"pool/old.deb", b"old")
    staged_paths(peer, 1)
    peer.send({"type": "commit", "generation": 1, "root": root_row(1)})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    assert (edge.root / "pool").stat().st_mtime_ns == POOL_T
    assert edge.root.stat().st_mtime_ns == ROOT_T
    with Manifest.open(edge.state, "edge") as m:
        assert m.root_row().mtime_ns == ROOT_T and m.root_row().generation == 1
    assert not (edge.state / "touched-dirs").exists()
    # Generation 2 adds a file to pool/ and does not list pool/ again (as for
    # a file rewritten in place upstream, which leaves the directory's time
    # as it was there).  The new file goes live early; the push is cut
    # before its commit, leaving pool/ and root with the time of the rename.
    data = b"new" * 1000
    new = row(b"pool/new.deb", data, gen=2)
    peer = Peer(edge.ini)
    plan_all(peer, [new], dict(begin(2), full=False))
    send_whole(peer, 1, b"pool/new.deb", data)
    staged_paths(peer, 1)
    assert listing_settles(edge.root, {"pool/old.deb", "pool/new.deb"}) == {"pool/old.deb", "pool/new.deb"}
    peer.finish()
    edge.wait_agent_ended()
    assert (edge.root / "pool").stat().st_mtime_ns != POOL_T
    # Recorded before the rename: pool/, and root above it (NUL-terminated).
    assert (edge.state / "touched-dirs").read_bytes() == b"pool\0\0"
    # The rerun finds the file in place and needs nothing, and its commit
    # still gives both their upstream's times back.
    peer = Peer(edge.ini)
    needs, _ = plan_all(peer, [new], dict(begin(2), full=False))
    assert needs["items"] == []
    peer.send({"type": "commit", "generation": 2, "root": root_row(2)})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    assert (edge.root / "pool").stat().st_mtime_ns == POOL_T
    assert edge.root.stat().st_mtime_ns == ROOT_T
    assert not (edge.state / "touched-dirs").exists()


def test_a_symlink_is_published_with_its_own_mtime_and_a_changed_one_is_set_in_place(edge) -> None:  # noqa: ANN001
    link = [b"current", 2, 5, 1_600_000_000_000_000_000, 0o777, None, b"dists", 0, 1]
    peer = Peer(edge.ini)
    needs, _ = plan_all(peer, [link])
    assert [item[0] for item in needs["items"]] == ["link"]
    peer.send({"type": "commit", "generation": 1})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    st = os.lstat(edge.root / "current")
    assert stat.S_ISLNK(st.st_mode) and st.st_mtime_ns == 1_600_000_000_000_000_000
    ino = st.st_ino
    peer = Peer(edge.ini)
    needs, _ = plan_all(peer, [link[:3] + [1_600_000_001_000_000_000] + link[4:8] + [2]], begin(2))
    assert [item[0] for item in needs["items"]] == ["meta"]
    peer.send({"type": "commit", "generation": 2})
    assert peer.message()["type"] == "committed"
    assert peer.finish() == 0
    st = os.lstat(edge.root / "current")
    assert (st.st_ino, st.st_mtime_ns) == (ino, 1_600_000_001_000_000_000)  # the same link, never followed
    assert os.readlink(edge.root / "current") == "dists"


@pytest.mark.parametrize("bad", [
    [b"x", 1, 0, 1, 0o755, None, None, 0, 1],  # a path
    [b"", 0, 0, 1, 0o755, b"\0" * 32, None, 0, 1],  # a file
    [b"", 1, 0, 1, 0o755, None, None, 1, 1],  # a tombstone
    [b"", 1, 0, 1, 0o10000, None, None, 0, 1],  # a mode out of range
    [b"", 1, 0, "1", 0o755, None, None, 0, 1],  # an mtime that is no integer
    [b"", 1, 0, 1, 0o755, None, None, 0],  # 8 fields
])
def test_a_bad_root_in_commit_is_refused_and_nothing_is_published(edge, bad: list) -> None:  # noqa: ANN001
    before = edge.root.stat().st_mtime_ns
    peer = Peer(edge.ini)
    plan_all(peer, [row(b"dists/Release", b"Origin: x\n")])
    send_whole(peer, 1, b"dists/Release", b"Origin: x\n")
    staged_paths(peer, 1)
    peer.send({"type": "commit", "generation": 1, "root": bad})
    answer = peer.message()
    assert answer["type"] == "error" and answer["kind"] == "ProtocolError" and "root" in answer["message"]
    assert peer.finish() != 0
    assert tree_listing(edge.root) == {} and edge.root.stat().st_mtime_ns == before


_NAME = st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.lists(_NAME, min_size=1, max_size=4).map(b"/".join), max_size=6), max_size=5),
       cut=st.integers(min_value=0, max_value=400))
def test_touched_dirs_are_closed_under_parents_and_survive_a_cut_record(batches: list, cut: int) -> None:
    import tempfile

    from syncd.agent.touched import TouchedDirs as _TouchedDirs

    with tempfile.TemporaryDirectory() as tmp:
        touched = _TouchedDirs(Path(tmp))
        want: set[bytes] = set()
        for batch in batches:
            touched.add(batch)
            for path in batch:
                parts = path.split(b"/")[:-1]
                want |= {b"/".join(parts[:i]) for i in range(len(parts) + 1)}
        assert touched.dirs() == want  # every parent, every ancestor, root (b"") included
        touched.close()
        again = _TouchedDirs(Path(tmp))
        again.load()
        assert again.dirs() == want
        record = Path(tmp, _TouchedDirs.NAME)
        if want:
            data = record.read_bytes()
            record.write_bytes(data[:cut])  # a kill in the middle of a write
            cut_short = _TouchedDirs(Path(tmp))
            cut_short.load()
            assert cut_short.dirs() <= want
            assert {d for d in data[:cut].split(b"\0")[:-1]} <= cut_short.dirs()
        again.clear()
        assert not record.exists() and again.dirs() == set()
