"""The SQLite manifest: round trip, schema versions, downstream records, the lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncd.errors import LockedError, ManifestError, SchemaError
from syncd.lock import StateLock
from syncd.manifest import (KIND_DIR, KIND_FILE, KIND_SYMLINK, MANIFEST_NAME, ROWS_PER_INSERT, Entry, Manifest,
                            _RawConnection)


def rows() -> list[tuple]:
    return [
        (b"", b"dists", KIND_DIR, 0, 1, 2, 0o755, 10, None, None, 1, 0, 7, 1),
        (b"dists", b"Release", KIND_FILE, 5, 3, 4, 0o644, 11, b"\x01" * 32, None, 1, 0, 7, 1),
        (b"dists", b"\xffodd name\n", KIND_FILE, 0, 3, 4, 0o600, 12, b"\x02" * 32, None, 2, 0, 7, 1),
        (b"", b"link", KIND_SYMLINK, 5, 3, 4, 0o777, 13, None, b"dists", 2, 0, 7, 1),
        (b"", b"gone", KIND_FILE, 9, 3, 4, 0o644, 14, b"\x03" * 32, None, 2, 1, 7, 1),
    ]


def test_round_trip(tmp_path: Path) -> None:
    with Manifest.open(tmp_path, "primary") as m:
        assert m.generation == 0
        with m.writer() as w:
            w.upsert_many(rows())
            w.set_generation(2, 5)
    with Manifest.open(tmp_path, "primary") as m:
        assert m.generation == 2
        got = list(m.iter_entries())
        assert got == sorted(rows(), key=lambda r: (r[0], r[1]))
        live = [e.path for e in m.entries()]
        assert live == [b"dists", b"link", b"dists/Release", b"dists/\xffodd name\n"]
        assert m.lookup(b"dists/\xffodd name\n") == Entry(*rows()[2])
        assert m.lookup(b"nope") is None
        assert [e.path for e in m.changes_since(1)] == [b"gone", b"link", b"dists/\xffodd name\n"]
        stats = m.stats()
        assert (stats.generation, stats.files, stats.dirs, stats.symlinks, stats.total_size, stats.tombstones) == (
            2, 2, 1, 1, 5, 1)
        assert stats.generation_created_ns is not None
        # Live regular files only (no directory, link or tombstone), tested inside SQLite.
        assert sorted(m.live_files_matching(lambda p: True)) == [b"dists/Release", b"dists/\xffodd name\n"]
        assert m.live_files_matching(lambda p: p.endswith(b"Release")) == [b"dists/Release"]
        assert m.live_files_matching(lambda p: p in (b"gone", b"link", b"dists")) == []


def test_the_roots_own_row_is_no_entry_of_the_tree(tmp_path: Path) -> None:
    # Root's mode and mtime live in the row (b"", b""): read by root_row,
    # never listed, counted, planned or created as an entry.
    root = (b"", b"", KIND_DIR, 0, 7, 8, 0o755, 9, None, None, 3, 0, 7, 1)
    with Manifest.open(tmp_path, "primary") as m:
        assert m.root_row() is None
        with m.writer() as w:
            w.upsert_many(rows() + [root])
            w.set_generation(3, 6)
            assert [r[1] for r in w.rows_in(b"")] == [b"dists", b"gone", b"link"]
            assert w.root_row()[:8] == root[:8]
        assert m.root_row() == Entry(*root)
        assert b"" not in [e.path for e in m.entries(include_deleted=True)]
        assert [r[:2] for r in m.iter_entries()] == sorted((r[0], r[1]) for r in rows())
        assert [e.path for e in m.changes_since(1)] == [b"gone", b"link", b"dists/\xffodd name\n"]
        # Nor is it a row of a push, incremental or full.
        assert [e.path for e, _, _ in m.push_rows(1)] == [b"gone", b"link", b"dists/\xffodd name\n"]
        assert b"" not in [e.path for e, _, _ in m.push_rows(None)]
        stats = m.stats()
        assert (stats.dirs, stats.files, stats.symlinks) == (1, 2, 1)
        reader = m.reader()
        try:
            assert reader.live_count() == 4  # dists, link and the two files: not root
            assert not reader.empty()
        finally:
            reader.close()


@pytest.mark.parametrize("max_parameters", [None, 999])
def test_many_rows_in_one_flush_keep_the_last_of_each_path(tmp_path: Path, monkeypatch, max_parameters) -> None:  # noqa: ANN001
    # Rows go to SQLite up to ROWS_PER_INSERT at a time in one statement
    # each, fewer where the build allows fewer parameters (999 before SQLite
    # 3.32: set on the connection here, so that a statement too large fails);
    # a path given twice, even inside one statement, keeps its later row, as
    # it would row by row.
    if max_parameters is not None:
        def lowered(raw) -> int:  # noqa: ANN001
            raw._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, max_parameters)
            return max_parameters

        monkeypatch.setattr(_RawConnection, "max_parameters", lowered)
    count = ROWS_PER_INSERT * 3 + 7
    first = [(b"d", b"f%d" % i, KIND_FILE, i, 1, 2, 0o644, i, bytes([i % 256]) * 32, None, 1, 0, 3, 1)
             for i in range(count)]
    again = [(b"d", b"f%d" % i, KIND_FILE, i + 1, 1, 2, 0o600, i, None, None, 2, 0, 3, 1 + i % 2)
             for i in range(0, count, 5)]
    given = first[:40] + again[:3] + first[40:] + again[3:]
    with Manifest.open(tmp_path, "primary") as m:
        with m.writer() as w:
            w.upsert_many(given)
            w.set_generation(2, count)
    expected = {}
    for row in given:
        expected[row[:2]] = row
    assert sum(row[10] == 2 for row in expected.values()) == len(again)
    with Manifest.open(tmp_path, "primary") as m:
        assert list(m.iter_entries()) == sorted(expected.values(), key=lambda r: (r[0], r[1]))


def test_writer_rolls_back_on_error(tmp_path: Path) -> None:
    with Manifest.open(tmp_path, "primary") as m:
        with pytest.raises(RuntimeError):
            with m.writer() as w:
                w.upsert_many(rows())
                w.set_generation(2, 5)
                raise RuntimeError("killed")
        assert m.generation == 0
        assert list(m.iter_entries()) == []


def test_downstream_records(tmp_path: Path) -> None:
    with Manifest.open(tmp_path, "primary") as m:
        m.record_downstream("tier1", generation=3, acked_ns=5, last_success_ns=5)
        m.record_downstream("tier1", last_error="connection lost", last_error_ns=6)
        (d,) = m.downstreams()
        assert (d["name"], d["generation"], d["last_success_ns"], d["last_error"]) == (
            "tier1", 3, 5, "connection lost")


@pytest.mark.parametrize("version,word", [(99, "a newer"), (0, "an older")])
def test_schema_version_checked(tmp_path: Path, version: int, word: str) -> None:
    Manifest.open(tmp_path, "primary").close()
    db = sqlite3.connect(tmp_path / MANIFEST_NAME)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    db.commit()
    db.close()
    with pytest.raises(SchemaError, match=f"schema version {version} is from {word} syncd"):
        Manifest.open(tmp_path, "primary")


def test_not_a_manifest(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / MANIFEST_NAME)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    with pytest.raises(SchemaError, match="not a syncd manifest"):
        Manifest.open(tmp_path, "primary")


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ManifestError, match="cannot open manifest"):
        Manifest.open(tmp_path, "primary")


def test_missing_manifest_without_create(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest yet"):
        Manifest.open(tmp_path / "state", "primary", create=False)


def test_lock_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from syncd.lock import StateLock\n"
         "l = StateLock(sys.argv[1], 'daemon').acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"locked by PID {holder.pid} \(daemon\)"):
            StateLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released it with the process: no stale lock.
    deadline = time.monotonic() + 5
    while True:
        try:
            StateLock(tmp_path).acquire().release()
            break
        except LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_downstream_columns_match_the_schema(tmp_path: Path) -> None:
    from syncd.manifest import DOWNSTREAM_COLUMNS, _Schema

    assert DOWNSTREAM_COLUMNS == {c.name for c in _Schema.get().downstreams.columns} - {"name"}
    with Manifest.open(tmp_path, "primary") as m:
        m.record_downstream("new", last_error="unreachable", last_error_ns=1)
        (d,) = m.downstreams()
        assert (d["bytes_sent"], d["files_sent"], d["generation"]) == (0, 0, None)
        with pytest.raises(ValueError, match="no column"):
            m.record_downstream("new", nonsense=1)


def test_pinned_ddl_is_what_the_schema_compiles_to() -> None:
    """Manifests are created from SCHEMA_DDL (no SQLAlchemy import on that
    path); the schema's declaration stays _Schema."""
    from syncd.manifest import SCHEMA_DDL, compiled_ddl

    assert compiled_ddl() == list(SCHEMA_DDL)


def test_creating_a_manifest_does_not_import_sqlalchemy(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from syncd.manifest import Manifest; "
        f"m = Manifest.open({str(tmp_path)!r}, 'edge'); m.set_meta('x', '1'); "
        "m.record_downstream('d', generation=1); print(m.get_meta('x'), m.generation); m.close(); "
        "print('sqlalchemy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "0", "False"]
