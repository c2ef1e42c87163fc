"""The protocol's messages as types: decoded and validated once, at the boundary.

A MESSAGE frame's value (syncd.protocol) is a dict; :func:`decode` turns it
into one of the classes below, or raises ProtocolError with a one-line
reason.  Code behind the boundary reads typed fields and never checks a
dict's keys again.  Each class declares the keys it reads: a key it does not
know is ignored (that is how a minor version adds optional keys), and an
optional key that was absent stays absent when the message is encoded again
(``to_wire``), so that ``decode(m).to_wire() == m`` for every valid message.

The one shape of a manifest row on the wire is :class:`Row` (the pusher
sends ``Row.wire(entry)``), and the one shape of an agent's answer for a
path is :class:`Item`.  What the fields mean is docs/protocol.md, section 4.

What is checked here is what makes a message well formed: types, ranges,
names that pass :func:`fsops.validate_name`.  Whether the edge accepts a
well-formed request (the deletion guard, hard-link claims) is the agent's
policy (syncd.agent.policy).

A stage-only agent (``syncd agent --stage``, syncd.prewarm.stager) takes
messages of its own (:data:`TO_STAGER`, docs/protocol.md section 7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .errors import ProtocolError
from .filters import Filter
from .fsops import validate_name
from .manifest import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry, fspath, split

# What the agent will do with one path (an item's action).  LINK is a
# symlink; HLINK makes the path one more name of another path's file (a hard link).
NEW, DELTA, COPY, META, LINK, DELETE, DIR, HLINK = "new", "delta", "copy", "meta", "link", "delete", "dir", "hlink"
ACTIONS = (NEW, DELTA, COPY, META, LINK, DELETE, DIR, HLINK)
ROW_FIELDS = 9  # path, kind, size, mtime_ns, mode, sha256, target, deleted, generation
ITEM_FIELDS = 5  # action, path, need, source, sig_stream
# A bundle ("files", protocol 1.1) carries at most this many files and bytes.
BUNDLE_MAX_FILES = 4096
BUNDLE_MAX_BYTES = 16 << 20
# begin's deletion guard when it names none: a tenth of the tree.
DEFAULT_MAX_DELETE_PPM = 100_000


def is_int(value: Any) -> bool:
    """An integer of the codec (bool is no integer on the wire)."""
    return isinstance(value, int) and not isinstance(value, bool)


def field_error(msg_type: Any, key: str, kind: type) -> ProtocolError:
    return ProtocolError(f"{msg_type!r} message: field {key!r} missing or not {kind.__name__}")


def field(msg: dict, key: str, kind: type) -> Any:
    """``msg[key]``, which must be of ``kind`` (an int is not a bool)."""
    value = msg.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise field_error(msg.get("type"), key, kind)
    return value


def _check_numbers(where: str, size: Any, mtime_ns: Any, mode: Any, gen: Any) -> None:
    for name, value in (("size", size), ("mtime_ns", mtime_ns), ("mode", mode), ("generation", gen)):
        if not is_int(value):
            raise ProtocolError(f"{where}: {name} is not an integer")
    if size < 0 or not 0 <= mode <= 0o7777:
        raise ProtocolError(f"{where}: size or mode out of range")


# -- the row ----------------------------------------------------------------------


@dataclass(slots=True)
class Row:  # slots: a full comparison holds one per path until commit
    """One manifest entry on the wire: a list of :data:`ROW_FIELDS` fields."""

    path: bytes
    kind: int
    size: int
    mtime_ns: int
    mode: int
    sha256: bytes | None
    target: bytes | None
    deleted: int
    generation: int
    # Whether the path is an index file (syncd.agent.plan.is_index): asked up
    # to three times a row at commit, so classified once.
    index: bool | None = None
    # Hard links (an ``entries`` batch's ``links``): the first name of this
    # file's group (this row's own path for the first), and how many names it has.
    link: bytes | None = None
    names: int = 1

    @classmethod
    def from_wire(cls, raw: Any) -> "Row":
        if not isinstance(raw, list) or len(raw) != ROW_FIELDS:
            raise ProtocolError("entries: a row is not a list of 9 fields")
        path, kind, size, mtime_ns, mode, sha, target, deleted, gen = raw
        if not isinstance(path, bytes):
            raise ProtocolError("entries: path is not bytes")
        validate_name(path)
        if kind not in (KIND_FILE, KIND_DIR, KIND_SYMLINK):
            raise ProtocolError(f"entries: {fspath(path)}: unknown kind {kind!r}")
        _check_numbers(f"entries: {fspath(path)}", size, mtime_ns, mode, gen)
        if not deleted:
            if kind == KIND_FILE and not (isinstance(sha, bytes) and len(sha) == 32):
                raise ProtocolError(f"entries: {fspath(path)}: a file without a SHA-256")
            if kind == KIND_SYMLINK and not (isinstance(target, bytes) and target and b"\0" not in target):
                raise ProtocolError(f"entries: {fspath(path)}: a symlink without a valid target")
        return cls(path, kind, size, mtime_ns, mode & 0o7777, sha, target, 1 if deleted else 0, gen)

    @classmethod
    def root_from_wire(cls, raw: Any) -> "Row":
        """``commit``'s ``root``: the root's own row, a live directory at the empty path."""
        if not isinstance(raw, list) or len(raw) != ROW_FIELDS or raw[0] != b"":
            raise ProtocolError("commit: root is not a row of 9 fields with the empty path")
        _, kind, size, mtime_ns, mode, _sha, _target, deleted, gen = raw
        if kind != KIND_DIR or deleted:
            raise ProtocolError("commit: root is not a live directory")
        _check_numbers("commit: root", size, mtime_ns, mode, gen)
        return cls(b"", KIND_DIR, 0, mtime_ns, mode & 0o7777, None, None, 0, gen)

    def to_wire(self) -> list:
        return [self.path, self.kind, self.size, self.mtime_ns, self.mode, self.sha256, self.target, self.deleted,
                self.generation]

    @staticmethod
    def wire(e: Entry) -> list:
        """A manifest entry's wire form (what :meth:`from_wire` reads), without a Row between."""
        return [e.path, e.kind, e.size, e.mtime_ns, e.mode, e.sha256, e.target, e.deleted, e.generation]

    def manifest_row(self, st: os.stat_result | None) -> tuple:
        """The row this node records: the upstream's content and times, this
        node's own stat data (its inodes and link counts, as a scan here would)."""
        parent, name = split(self.path)
        ctime = st.st_ctime_ns if st else 0
        ino = st.st_ino if st else 0
        size = self.size if self.kind == KIND_FILE else (st.st_size if st and self.kind == KIND_SYMLINK else 0)
        return (parent, name, self.kind, size, self.mtime_ns, ctime, self.mode, ino,
                self.sha256 if self.kind == KIND_FILE else None,
                self.target if self.kind == KIND_SYMLINK else None, self.generation, self.deleted,
                st.st_dev if st else 0, st.st_nlink if st and self.kind != KIND_DIR else 1)

    def content(self) -> bytes:
        """What every name of one file (or symlink) has in common."""
        return b"f" + self.sha256 if self.kind == KIND_FILE else b"l" + self.target


class Item(NamedTuple):
    """What the agent will do with one path (``needs`` and ``planned``): a
    list of :data:`ITEM_FIELDS` fields on the wire, and a sixth, ``flags``,
    in a push that asked for it (begin's ``itemize``)."""

    action: str  # one of ACTIONS
    path: bytes
    need: str | None = None  # "whole", "delta", "copy", "later", or None: no bytes wanted
    source: bytes | None = None
    sig_stream: int | None = None
    flags: str | None = None  # rsync's %i of the change ('/' after a directory's), or not sent

    @classmethod
    def from_wire(cls, raw: Any) -> "Item":
        """An item's fields checked for what every item is (the need, the
        source and the flags mean something only beside the push's rows)."""
        if not isinstance(raw, list) or len(raw) not in (ITEM_FIELDS, ITEM_FIELDS + 1):
            raise ProtocolError("needs: an item is not a list of 5 or 6 fields")
        action, path = raw[0], raw[1]
        if action not in ACTIONS or not isinstance(path, bytes):
            raise ProtocolError(f"needs: bad item {raw!r:.80}")
        return cls(*raw)

    def to_wire(self) -> list:
        return list(self) if self.flags is not None else list(self[:ITEM_FIELDS])


# -- messages to the agent ----------------------------------------------------------


class Message:
    """A message as a type: fields set once, by its constructor, and read only.

    Plain classes with ``__slots__``, not dataclasses: an agent imports all
    of them at its start, where generating a frozen dataclass's methods cost
    half a millisecond each (docs/performance.md, "Start-up").  Two messages
    are equal when they are of one type and encode alike.
    """

    __slots__ = ("absent",)
    TYPE: ClassVar[str] = ""

    def __init__(self, *, absent: frozenset = frozenset()) -> None:
        #: Optional keys that were absent when decoded: encoded again, they stay so.
        self.absent = absent

    @classmethod
    def from_wire(cls, msg: dict) -> "Message":
        return cls()

    def to_wire(self) -> dict:
        return {"type": self.TYPE}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_wire() == self.to_wire()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_wire()!r})"

    def _with(self, out: dict, key: str, value: Any) -> None:
        if key not in self.absent:
            out[key] = value


def _absent(msg: dict, *keys: str) -> frozenset:
    return frozenset(k for k in keys if k not in msg)


class Hello(Message):
    """The pusher's node name and the name it gives this mirror."""

    __slots__ = ("node", "mirror")
    TYPE = "hello"

    def __init__(self, node: str | None = None, mirror: Any = None, *, absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.node = node  # None: none, or not a str
        self.mirror = mirror

    @classmethod
    def from_wire(cls, msg: dict) -> "Hello":
        node = msg.get("node")
        return cls(node if isinstance(node, str) else None, msg.get("mirror"),
                   absent=_absent(msg, "node", "mirror"))

    def to_wire(self) -> dict:
        out = super().to_wire()
        self._with(out, "node", self.node)
        self._with(out, "mirror", self.mirror)
        return out


class Begin(Message):
    __slots__ = ("generation", "full", "dry_run", "rules", "max_delete_ppm", "force_deletes", "fuzzy", "hardlinks",
                 "itemize", "filter")
    TYPE = "begin"
    KEYS: ClassVar[tuple[str, ...]] = ("full", "dry_run", "filter", "max_delete_ppm", "force_deletes", "fuzzy",
                                       "hardlinks", "itemize")

    def __init__(self, generation: int | None, *, full: bool = False, dry_run: bool = False,
                 rules: tuple[str, ...] = (), max_delete_ppm: int = DEFAULT_MAX_DELETE_PPM,
                 force_deletes: bool = False, fuzzy: bool = False, hardlinks: bool = False, itemize: bool = False,
                 filter: Filter | None = None, absent: frozenset = frozenset()) -> None:  # noqa: A002
        super().__init__(absent=absent)
        self.generation = generation  # None (1.4): a push fed by a running scan, only with ``full``
        self.full = full
        self.dry_run = dry_run
        self.rules = rules
        self.max_delete_ppm = max_delete_ppm
        self.force_deletes = force_deletes
        self.fuzzy = fuzzy
        self.hardlinks = hardlinks
        self.itemize = itemize
        self.filter = filter if filter is not None else Filter.parse(rules)  # the rules, compiled

    @classmethod
    def from_wire(cls, msg: dict) -> "Begin":
        rules = msg.get("filter") or []
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise ProtocolError("begin: filter is not a list of rules")
        ppm = msg.get("max_delete_ppm", DEFAULT_MAX_DELETE_PPM)
        if not is_int(ppm) or not 0 <= ppm <= 1_000_000:
            raise ProtocolError("begin: max_delete_ppm is not an integer from 0 to 1000000")
        try:
            compiled = Filter.parse(rules)
        except ValueError as err:
            raise ProtocolError(f"begin: {err}") from None
        generation = msg.get("generation")
        if generation is not None or not msg.get("full"):
            generation = field(msg, "generation", int)
        return cls(generation, full=bool(msg.get("full")), dry_run=bool(msg.get("dry_run")), rules=tuple(rules),
                   max_delete_ppm=ppm, force_deletes=bool(msg.get("force_deletes")), fuzzy=bool(msg.get("fuzzy")),
                   hardlinks=msg.get("hardlinks") is True, itemize=bool(msg.get("itemize")), filter=compiled,
                   absent=_absent(msg, *cls.KEYS))

    def to_wire(self) -> dict:
        out = super().to_wire()
        out["generation"] = self.generation
        for key, value in (("full", self.full), ("dry_run", self.dry_run), ("filter", list(self.rules)),
                           ("max_delete_ppm", self.max_delete_ppm), ("force_deletes", self.force_deletes),
                           ("fuzzy", self.fuzzy), ("hardlinks", self.hardlinks), ("itemize", self.itemize)):
            self._with(out, key, value)
        return out


class Entries(Message):
    """A batch of rows; ``links`` names the rows that are names of a file of several."""

    __slots__ = ("batch", "rows", "links")
    TYPE = "entries"

    def __init__(self, batch: int, rows: list[Row], links: list[tuple[int, bytes, int]] | None = None) -> None:
        super().__init__()
        self.batch = batch
        self.rows = rows
        self.links = links  # [index, first name, names], as sent

    @classmethod
    def from_wire(cls, msg: dict) -> "Entries":
        batch = field(msg, "batch", int)
        raw_rows = field(msg, "rows", list)
        links = _links(msg.get("links"), len(raw_rows))
        rows = [Row.from_wire(raw) for raw in raw_rows]
        for i, first, names in links or ():
            rows[i].link, rows[i].names = first, names
        return cls(batch, rows, links)

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "batch": self.batch, "rows": [row.to_wire() for row in self.rows]}
        if self.links is not None:
            out["links"] = [list(entry) for entry in self.links]
        return out


def _links(raw: Any, count: int) -> list[tuple[int, bytes, int]] | None:
    """An ``entries``' ``links``, each naming one of its ``count`` rows once."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ProtocolError("entries: links without a begin that announced them, or not a list")
    links = []
    named: set[int] = set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError("entries: a links entry is not a list of 3 fields")
        i, first, names = entry
        if not is_int(i) or not 0 <= i < count or i in named or not is_int(names) or not isinstance(first, bytes):
            raise ProtocolError(f"entries: bad links entry {entry!r:.80}")
        named.add(i)
        links.append((i, validate_name(first), names))
    return links


class EntriesEnd(Message):
    __slots__ = ()
    TYPE = "entries_end"


class File(Message):
    """Opens a stream carrying one file (``how``: whole, zstd or delta)."""

    __slots__ = ("stream", "path", "how", "size", "sha256", "sparse", "offset")
    TYPE = "file"

    def __init__(self, stream: int, path: bytes, how: str, size: int, sha256: bytes, *, sparse: bool = False,
                 offset: int = 0, absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.stream = stream
        self.path = path
        self.how = how
        self.size = size
        self.sha256 = sha256
        self.sparse = sparse
        self.offset = offset  # the file's bytes start here (a resume the agent offered)

    @classmethod
    def from_wire(cls, msg: dict) -> "File":
        stream = field(msg, "stream", int)
        path = validate_name(field(msg, "path", bytes))
        how = field(msg, "how", str)
        size = field(msg, "size", int)
        sha256 = field(msg, "sha256", bytes)
        if how not in ("whole", "zstd", "delta"):
            raise ProtocolError(f"file {fspath(path)}: unknown encoding {how!r}")
        if size < 0:
            raise ProtocolError(f"file {fspath(path)}: negative size")
        offset = msg.get("offset", 0)
        if not is_int(offset):
            raise ProtocolError(f"file {fspath(path)}: offset is not an integer")
        return cls(stream, path, how, size, sha256, sparse=msg.get("sparse") is True, offset=offset,
                   absent=_absent(msg, "sparse", "offset"))

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "stream": self.stream, "path": self.path, "how": self.how, "size": self.size,
               "sha256": self.sha256}
        self._with(out, "sparse", self.sparse)
        self._with(out, "offset", self.offset)
        return out


class Files(Message):
    """Opens a stream carrying a bundle of small files back to back (1.1)."""

    __slots__ = ("stream", "how", "items", "total")
    TYPE = "files"

    def __init__(self, stream: int, how: str, items: list[tuple[bytes, int, bytes]]) -> None:
        super().__init__()
        self.stream = stream
        self.how = how
        self.items = items  # path, size, SHA-256
        self.total = sum(size for _, size, _ in items)

    @classmethod
    def from_wire(cls, msg: dict) -> "Files":
        stream = field(msg, "stream", int)
        how = field(msg, "how", str)
        if how not in ("whole", "zstd"):
            raise ProtocolError(f"files: unknown encoding {how!r}")
        raw = field(msg, "items", list)
        if not 0 < len(raw) <= BUNDLE_MAX_FILES:
            raise ProtocolError(f"files: {len(raw)} items, outside [1, {BUNDLE_MAX_FILES}]")
        items = []
        for item in raw:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], bytes)
                    or not is_int(item[1]) or item[1] < 0 or not isinstance(item[2], bytes) or len(item[2]) != 32):
                raise ProtocolError("files: an item is not [path bytes, size int, sha256 32 bytes]")
            items.append((validate_name(item[0]), item[1], item[2]))
        bundle = cls(stream, how, items)
        if bundle.total > BUNDLE_MAX_BYTES:
            raise ProtocolError(f"files: {bundle.total} bytes, above {BUNDLE_MAX_BYTES}")
        return bundle

    def to_wire(self) -> dict:
        return {"type": self.TYPE, "stream": self.stream, "how": self.how, "items": [list(i) for i in self.items]}


class Commit(Message):
    __slots__ = ("generation", "root")
    TYPE = "commit"

    def __init__(self, generation: int, root: Row | None = None, *, absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.generation = generation
        self.root = root  # root's own mode and mtime

    @classmethod
    def from_wire(cls, msg: dict) -> "Commit":
        generation = field(msg, "generation", int)
        raw = msg.get("root")
        return cls(generation, None if raw is None else Row.root_from_wire(raw), absent=_absent(msg, "root"))

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "generation": self.generation}
        self._with(out, "root", None if self.root is None else self.root.to_wire())
        return out


class Cascade(Message):
    __slots__ = ()
    TYPE = "cascade"


class Abort(Message):
    __slots__ = ()
    TYPE = "abort"


class Bye(Message):
    __slots__ = ()
    TYPE = "bye"


#: What a push agent takes, by type.
TO_AGENT: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    Hello, Begin, Entries, EntriesEnd, File, Files, Commit, Cascade, Abort, Bye)}


# -- messages to a stage-only agent (docs/protocol.md, section 7) --------------------

#: How a range's END may carry its digest (``put``, ``get``: ``digest``).
RANGE_DIGESTS = ("sha256", "xxh3-128")


def _range_digest(msg: dict, what: str) -> str:
    digest = msg.get("digest", "sha256")
    if digest not in RANGE_DIGESTS:
        raise ProtocolError(f"{what}: unknown digest {digest!r}")
    return digest


class StageHello(Message):
    """A stage-only session's hello: its ``role``, ``edge`` or ``source``."""

    __slots__ = ("role", "node", "mirror")
    TYPE = "hello"

    def __init__(self, role: str, node: Any = None, mirror: Any = None, *, absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.role = role
        self.node = node
        self.mirror = mirror

    @classmethod
    def from_wire(cls, msg: dict) -> "StageHello":
        role = msg.get("role")
        if role not in ("edge", "source"):
            raise ProtocolError(f"hello: unknown role {role!r}")
        return cls(role, msg.get("node"), msg.get("mirror"), absent=_absent(msg, "node", "mirror"))

    def to_wire(self) -> dict:
        out = super().to_wire()
        self._with(out, "node", self.node)
        self._with(out, "mirror", self.mirror)
        out["role"] = self.role
        return out


class Have(Message):
    """What the edge holds of these objects: ``[sha256, size, path, mtime_ns]`` each."""

    __slots__ = ("objects", "batch")
    TYPE = "have"

    def __init__(self, objects: list[tuple[bytes, int, bytes, int]], batch: Any = None, *,
                 absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.objects = objects
        self.batch = batch  # echoed in the answer

    @classmethod
    def from_wire(cls, msg: dict) -> "Have":
        raw = msg.get("objects")
        if not isinstance(raw, list):
            raise ProtocolError("have: objects is not a list")
        objects = []
        for obj in raw:
            if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], bytes) and len(obj[0]) == 32
                    and isinstance(obj[1], int) and isinstance(obj[2], bytes) and isinstance(obj[3], int)):
                raise ProtocolError("have: an object is not [sha256, size, path, mtime_ns]")
            objects.append((obj[0], obj[1], validate_name(obj[2]), obj[3]))
        return cls(objects, msg.get("batch"), absent=_absent(msg, "batch"))

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "objects": [list(o) for o in self.objects]}
        self._with(out, "batch", self.batch)
        return out


class Put(Message):
    """Opens a stream carrying an object, or ``length`` bytes of it from ``offset``."""

    __slots__ = ("stream", "sha256", "size", "offset", "length", "how", "digest", "run", "sparse")
    TYPE = "put"

    def __init__(self, stream: int, sha256: bytes, size: int, offset: int, length: int, how: str,
                 digest: str = "sha256", *, run: bool = False, sparse: bool = False,
                 absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.stream = stream
        self.sha256 = sha256
        self.size = size
        self.offset = offset
        self.length = length
        self.how = how  # "whole" or "zstd"
        self.digest = digest  # of a range's END (one of RANGE_DIGESTS)
        self.run = run  # one of the object's ranges, in order on this session
        self.sparse = sparse

    @classmethod
    def from_wire(cls, msg: dict) -> "Put":
        stream = field(msg, "stream", int)
        sha256 = field(msg, "sha256", bytes)
        size = field(msg, "size", int)
        offset = field(msg, "offset", int)
        length = field(msg, "length", int)
        how = field(msg, "how", str)
        if len(sha256) != 32 or size < 0 or offset < 0 or length < 0 or offset + length > size:
            raise ProtocolError("put: bad object name or range")
        if how not in ("whole", "zstd"):
            raise ProtocolError(f"put: unknown encoding {how!r}")
        return cls(stream, sha256, size, offset, length, how, _range_digest(msg, "put"),
                   run=msg.get("run") is True, sparse=msg.get("sparse") is True,
                   absent=_absent(msg, "digest", "run", "sparse"))

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "stream": self.stream, "sha256": self.sha256, "size": self.size,
               "offset": self.offset, "length": self.length, "how": self.how}
        for key, value in (("digest", self.digest), ("run", self.run), ("sparse", self.sparse)):
            self._with(out, key, value)
        return out


class Get(Message):
    """Asks a source for ``length`` bytes of ``path`` from ``offset`` (of content ``sha256``)."""

    __slots__ = ("stream", "path", "sha256", "offset", "length", "digest", "sparse")
    TYPE = "get"

    def __init__(self, stream: int, path: bytes, sha256: bytes, offset: int, length: int, digest: str = "sha256",
                 *, sparse: bool = False, absent: frozenset = frozenset()) -> None:
        super().__init__(absent=absent)
        self.stream = stream
        self.path = path
        self.sha256 = sha256
        self.offset = offset
        self.length = length
        self.digest = digest
        self.sparse = sparse

    @classmethod
    def from_wire(cls, msg: dict) -> "Get":
        stream = field(msg, "stream", int)
        path = validate_name(field(msg, "path", bytes))
        sha256 = field(msg, "sha256", bytes)
        offset = field(msg, "offset", int)
        length = field(msg, "length", int)
        return cls(stream, path, sha256, offset, length, _range_digest(msg, "get"),
                   sparse=msg.get("sparse") is True, absent=_absent(msg, "digest", "sparse"))

    def to_wire(self) -> dict:
        out = {"type": self.TYPE, "stream": self.stream, "path": self.path, "sha256": self.sha256,
               "offset": self.offset, "length": self.length}
        self._with(out, "digest", self.digest)
        self._with(out, "sparse", self.sparse)
        return out


class BecomeAgent(Message):
    """Staging is done: the session goes on as a push agent's."""

    __slots__ = ()
    TYPE = "agent"


#: What a stage-only agent takes, by type.
TO_STAGER: dict[str, type[Message]] = {cls.TYPE: cls for cls in (StageHello, Have, Put, Get, Bye, BecomeAgent)}


def decode(value: Any, accepted: dict[str, type[Message]] = TO_AGENT) -> Message:
    """The message a MESSAGE frame's value is, of the ``accepted`` types."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError("a MESSAGE frame without a 'type'")
    cls = accepted.get(value["type"])
    if cls is None:
        raise ProtocolError(f"unknown message type {value['type']!r}")
    return cls.from_wire(value)


__all__ = ["BUNDLE_MAX_BYTES", "BUNDLE_MAX_FILES", "ITEM_FIELDS", "RANGE_DIGESTS", "ROW_FIELDS", "TO_AGENT",
           "TO_STAGER", "Abort", "Begin", "BecomeAgent", "Bye", "Cascade", "Commit", "Entries", "EntriesEnd", "File",
           "Files", "Get", "Have", "Hello", "Item", "Message", "Put", "Row", "StageHello", "decode", "field",
           "field_error", "is_int"]
