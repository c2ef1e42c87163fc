"""The SQLite manifest: every path's stat data, hashes and generation.

This is the only package that imports SQLAlchemy (in store.py and schema.py).  The schema is declared with
SQLAlchemy Core; the two hot paths (streaming every row to the scanner, and
writing a scan's changes) go through the driver connection, at 3-4x the speed
of Core for bulk rows (docs/performance.md, "Manifest writes").

Layout (``state_dir/manifest.db``, WAL mode):

- ``entries``: one row per path under root, keyed by ``(parent, name)`` as
  raw bytes (names need not be UTF-8).  ``parent`` is the directory's path
  relative to root (``b""`` for root itself), so rows sort directory by
  directory, the order in which the scanner walks.  ``generation`` is the
  node generation that last changed the row; a deletion keeps the row as a
  tombstone (``deleted = 1``) stamped with the deleting generation, so a
  downstream can be told about it by generation alone.
  The root itself has a row too, keyed ``(b"", b"")`` (the empty path, a
  directory): its mode and mtime are the tree's like any directory's, and a
  change to them is a change of the tree.  It is never an entry of the tree:
  the iterators, ``changes_since``, the counts and the statistics leave it
  out, :meth:`Manifest.root_row` reads it, and a push carries it in its
  ``commit`` (docs/protocol.md), never as a row to create or delete.  A
  manifest from before it simply gains it at its next scan.
  ``dev``, ``ino`` and ``nlink`` are the file's own on this node: the names
  of one file (hard links) share ``(dev, ino)``, found through
  ``entries_by_inode``, which holds only the rows with ``nlink > 1`` (see
  :meth:`Manifest.push_rows`).
- ``generations``: when each generation was made and how many changes it has.
- ``downstreams``: what each downstream has acknowledged, and its last result.
- ``meta``: schema version, node name, current generation.
"""

from .schema import (  # noqa: F401 - the package's names, as before the split
    DOWNSTREAM_COLUMNS,
    ENTRY_COLUMNS,
    Entry,
    KIND_DIR,
    KIND_FILE,
    KIND_LETTERS,
    KIND_NAMES,
    KIND_SYMLINK,
    MANIFEST_NAME,
    META_HELD_BACK,
    META_REPAIR,
    SCHEMA_DDL,
    SCHEMA_VERSION,
    Stats,
    LINKED_SQL,
    MIGRATIONS,
    NOT_ROOT_SQL,
    Schema,
    set_pragmas,
    compiled_ddl,
    fspath,
    join,
    split,
)
from .store import ROWS_PER_INSERT, Manifest, ManifestReader, ManifestWriter, RawConnection  # noqa: F401

# The old names of the declaration and the raw connection, which tests/test_manifest.py reads.
_Schema = Schema
_RawConnection = RawConnection

__all__ = [
    "Entry",
    "Manifest",
    "ManifestWriter",
    "Stats",
    "KIND_FILE",
    "KIND_DIR",
    "KIND_SYMLINK",
    "KIND_NAMES",
    "META_HELD_BACK",
    "META_REPAIR",
    "join",
    "split",
    "fspath",
]
