"""The manifest's schema and its plain values: table declarations and DDL,
kinds, meta keys, the entry row, and path helpers (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


SCHEMA_VERSION = 2
# Version 1 had no dev and nlink: an ALTER TABLE adds them (defaults: device
# unknown, a single name; the next scan fills them in without re-hashing).
MIGRATIONS = {
    1: (
        "ALTER TABLE entries ADD COLUMN dev INTEGER DEFAULT 0 NOT NULL",
        "ALTER TABLE entries ADD COLUMN nlink INTEGER DEFAULT 1 NOT NULL",
        "CREATE INDEX entries_by_inode ON entries (dev, ino) WHERE nlink > 1",
    ),
}
MANIFEST_NAME = "manifest.db"
# Meta keys a mirror keeps about verification (values are JSON): why its
# last generation was held back, and that ``syncd verify --repair`` found
# files its upstream must repair (a full comparison on the next push).
META_HELD_BACK = "held_back"
META_REPAIR = "repair_requested"

KIND_FILE = 0
KIND_DIR = 1
KIND_SYMLINK = 2
KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink"}
KIND_LETTERS = {KIND_FILE: "f", KIND_DIR: "d", KIND_SYMLINK: "L"}  # rsync's, in its %i

class Schema:
    """The tables, declared with SQLAlchemy Core, built on first use.

    Importing SQLAlchemy costs about 0.2 s; a scan or an agent session on an
    existing manifest never needs it (their hot paths use the driver
    connection), so neither pays for it.
    """

    _built = None

    @classmethod
    def get(cls):  # noqa: ANN206
        if cls._built is None:
            cls._built = cls._build()
        return cls._built

    @staticmethod
    def _build():  # noqa: ANN205
        import types

        from sqlalchemy import Column, Index, Integer, LargeBinary, MetaData, String, Table, text

        metadata = MetaData()

        meta_table = Table(
            "meta",
            metadata,
            Column("key", String, primary_key=True),
            Column("value", String, nullable=False),
        )

        entries_table = Table(
            "entries",
            metadata,
            Column("parent", LargeBinary, primary_key=True),
            Column("name", LargeBinary, primary_key=True),
            Column("kind", Integer, nullable=False),
            Column("size", Integer, nullable=False),
            Column("mtime_ns", Integer, nullable=False),
            Column("ctime_ns", Integer, nullable=False),
            Column("mode", Integer, nullable=False),  # permission bits (st_mode & 0o7777)
            Column("ino", Integer, nullable=False),
            Column("sha256", LargeBinary),  # files only
            Column("target", LargeBinary),  # symlinks only
            Column("generation", Integer, nullable=False),
            Column("deleted", Integer, nullable=False),
            # Last, as ALTER TABLE adds them to a version 1 manifest: both
            # kinds of manifest then have the same columns in the same order.
            Column("dev", Integer, nullable=False, server_default=text("0")),
            Column("nlink", Integer, nullable=False, server_default=text("1")),  # 1 for directories
            sqlite_with_rowid=False,
        )
        Index("entries_by_generation", entries_table.c.generation)
        # Only the names of files with more than one: a tree without hard
        # links pays nothing for it.
        Index("entries_by_inode", entries_table.c.dev, entries_table.c.ino,
              sqlite_where=entries_table.c.nlink > 1)
        Index("entries_by_sha256", entries_table.c.sha256)

        generations_table = Table(
            "generations",
            metadata,
            Column("generation", Integer, primary_key=True),
            Column("created_ns", Integer, nullable=False),
            Column("changes", Integer, nullable=False),
        )

        downstreams_table = Table(
            "downstreams",
            metadata,
            Column("name", String, primary_key=True),
            Column("generation", Integer),  # acknowledged: the downstream holds it, verified
            Column("acked_ns", Integer),
            Column("last_success_ns", Integer),
            Column("last_error", String),
            Column("last_error_ns", Integer),
            Column("bytes_sent", Integer, nullable=False, default=0),
            Column("files_sent", Integer, nullable=False, default=0),
        )
        return types.SimpleNamespace(
            metadata=metadata, meta=meta_table, entries=entries_table,
            generations=generations_table, downstreams=downstreams_table,
        )


# The DDL that Schema (SQLAlchemy Core, the schema's declaration) compiles to
# for SQLite, pinned here so that creating a manifest does not import
# SQLAlchemy (0.15 s, on the path of a new mirror's first push);
# tests/test_manifest.py keeps the two equal.
SCHEMA_DDL = (
    "CREATE TABLE downstreams (name VARCHAR NOT NULL, generation INTEGER, acked_ns INTEGER, "
    "last_success_ns INTEGER, last_error VARCHAR, last_error_ns INTEGER, bytes_sent INTEGER NOT NULL, "
    "files_sent INTEGER NOT NULL, PRIMARY KEY (name))",
    "CREATE TABLE entries (parent BLOB NOT NULL, name BLOB NOT NULL, kind INTEGER NOT NULL, "
    "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, mode INTEGER NOT NULL, "
    "ino INTEGER NOT NULL, sha256 BLOB, target BLOB, generation INTEGER NOT NULL, deleted INTEGER NOT NULL, "
    "dev INTEGER DEFAULT 0 NOT NULL, nlink INTEGER DEFAULT 1 NOT NULL, "
    "PRIMARY KEY (parent, name)) WITHOUT ROWID",
    "CREATE INDEX entries_by_generation ON entries (generation)",
    "CREATE INDEX entries_by_inode ON entries (dev, ino) WHERE nlink > 1",
    "CREATE INDEX entries_by_sha256 ON entries (sha256)",
    "CREATE TABLE generations (generation INTEGER NOT NULL, created_ns INTEGER NOT NULL, "
    "changes INTEGER NOT NULL, PRIMARY KEY (generation))",
    'CREATE TABLE meta ("key" VARCHAR NOT NULL, value VARCHAR NOT NULL, PRIMARY KEY ("key"))',
)


def compiled_ddl() -> list[str]:
    """What SQLAlchemy compiles Schema to, whitespace collapsed (the test's side of SCHEMA_DDL)."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialect = sqlite.dialect()
    out = []
    for table in Schema.get().metadata.sorted_tables:
        out.append(str(CreateTable(table).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: i.name):
            out.append(str(CreateIndex(index).compile(dialect=dialect)))
    return [" ".join(sql.split()).replace("( ", "(").replace(" )", ")") for sql in out]


# The downstreams table's columns besides ``name`` (record_downstream checks against them).
DOWNSTREAM_COLUMNS = frozenset({
    "generation", "acked_ns", "last_success_ns", "last_error", "last_error_ns", "bytes_sent", "files_sent",
})

ENTRY_COLUMNS = (
    "parent, name, kind, size, mtime_ns, ctime_ns, mode, ino, sha256, target, generation, deleted, dev, nlink"
)
#: The root's own row is (b"", b""); every entry of the tree has a name.
NOT_ROOT_SQL = "name != x''"
# A live file or symlink with more than one name (the condition of
# entries_by_inode first, spelled so that SQLite sees that the index covers it).
LINKED_SQL = f"e.nlink > 1 AND e.kind IN ({KIND_FILE}, {KIND_SYMLINK}) AND e.deleted = 0"


class Entry(NamedTuple):
    parent: bytes
    name: bytes
    kind: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    ino: int
    sha256: bytes | None
    target: bytes | None
    generation: int
    deleted: int
    dev: int
    nlink: int  # a file's (or symlink's) names on this node: hard links; 1 for directories

    @property
    def path(self) -> bytes:
        return join(self.parent, self.name)


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


@dataclass
class Stats:
    generation: int
    files: int
    dirs: int
    symlinks: int
    total_size: int
    tombstones: int
    generation_created_ns: int | None


def set_pragmas(dbapi_conn, _record=None) -> None:  # noqa: ANN001 - also a DBAPI callback
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a killed process (the invariant); only a
    # power cut may lose the last commit, never consistency.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def fspath(path: bytes) -> str:
    """A path for humans and logs: undecodable bytes shown as \\xNN."""
    return path.decode("utf-8", "backslashreplace")
