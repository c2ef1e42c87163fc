"""The index formats a signature's trust flows through: Debian ``Release`` (and
the signed text of ``InRelease``), RPM ``repomd.xml``, apt's by-hash names.

Pure parsing of bytes a hostile peer may have written: every path is checked
to stay inside the tree, sizes are capped by the caller (MAX_INDEX_BYTES),
and XML entity tricks are refused before any expansion.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.parsers import expat

from syncd.errors import IndexFormatError

log = logging.getLogger(__name__)

# Debian's largest InRelease is a few MB: an index larger than this is refused
# unread, whatever a hostile peer sends.
MAX_INDEX_BYTES = 64 << 20

# apt fetches indices by digest (Acquire-By-Hash): the name is the claim.
BY_HASH_RE = re.compile(r"(?:^|/)by-hash/SHA256/[0-9a-f]{64}$")


@dataclass(frozen=True)
class IndexEntry:
    """A file an index names: path relative to the index's base, size, digest."""

    path: str
    size: int | None
    digest: bytes
    algo: str = "sha256"


@dataclass(frozen=True)
class Release:
    """A parsed Debian Release (or InRelease's signed text).

    ``fields`` keeps field names as written; ``sha256`` is None when the
    file has no SHA256 field.
    """

    fields: dict[str, str]
    sha256: tuple[IndexEntry, ...] | None


# -- clearsigned text ------------------------------------------------------------

_CLEAR_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_SIG_BEGIN = b"-----BEGIN PGP SIGNATURE-----"
_SIG_END = b"-----END PGP SIGNATURE-----"


def clearsigned_shape(data: bytes) -> str | None:
    """Why ``data`` is not one clean clearsigned message, or None.

    Text outside the armor is never covered by the signature; apt refuses it
    (a parser that read it would trust unsigned lines), and so do we.
    """
    stripped = data.strip()
    if not stripped.startswith(_CLEAR_BEGIN):
        return "not clearsigned" if _CLEAR_BEGIN not in data else "text before the signed message"
    if data.count(_CLEAR_BEGIN) != 1 or data.count(_SIG_END) != 1:
        return "more than one signed message"
    if not stripped.endswith(_SIG_END):
        return "text after the signature"
    return None


def clearsigned_body(data: bytes) -> bytes:
    """The text of a clearsigned message, without checking the signature.

    For chain checks when no keyring is configured.  Raises IndexFormatError
    when ``data`` is not one clearsigned message.
    """
    problem = clearsigned_shape(data)
    if problem:
        raise IndexFormatError(problem)
    lines = data.strip().split(b"\n")
    i = 1
    while i < len(lines) and lines[i].rstrip(b"\r"):  # armor headers ("Hash: SHA512")
        i += 1
    body = []
    for line in lines[i + 1:]:
        line = line.rstrip(b"\r")
        if line == _SIG_BEGIN:
            return b"\n".join(body) + b"\n"
        body.append(line[2:] if line.startswith(b"- ") else line)
    raise IndexFormatError("no signature block")


# -- Debian Release ----------------------------------------------------------------

_FIELD_RE = re.compile(r"([^\s:#-][^\s:]*):[ \t]*(.*)")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_SIZE_RE = re.compile(r"[0-9]{1,19}")


def _check_relpath(path: str, what: str) -> str:
    if (not path or path.startswith("/") or "\0" in path or "\\" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise IndexFormatError(f"{what}: unsafe path {path[:200]!r}")
    return path


def parse_release(text: bytes | str) -> Release:
    """Parse a Release file's single deb822 paragraph.

    Raises IndexFormatError on anything but well-formed fields, SHA256 lines
    of ``hex64 size relpath`` with a safe relative path, and blank lines at
    the end.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise IndexFormatError(f"not UTF-8 at byte {err.start}") from err
    fields: dict[str, str] = {}
    lower: set[str] = set()
    name: str | None = None
    values: list[str] = []
    ended = False

    def flush() -> None:
        if name is not None:
            fields[name] = "\n".join(values)

    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        # deb822 whitespace is space and tab; str.strip would eat U+00A0 too.
        if not line.strip(" \t"):
            ended = name is not None or ended
            continue
        if ended:
            raise IndexFormatError(f"line {lineno}: more than one paragraph")
        if line[0] in " \t":
            if name is None:
                raise IndexFormatError(f"line {lineno}: continuation line before any field")
            values.append(line.strip(" \t"))
            continue
        m = _FIELD_RE.fullmatch(line)
        if not m:
            raise IndexFormatError(f"line {lineno}: not a field: {line[:80]!r}")
        flush()
        name, first = m.group(1), m.group(2).strip(" \t")
        if name.lower() in lower:
            raise IndexFormatError(f"line {lineno}: field {name} repeated")
        lower.add(name.lower())
        values = [first] if first else []
    flush()
    sha = None
    for key, value in fields.items():
        if key.lower() == "sha256":
            sha = tuple(_parse_sha256_line(v) for v in value.split("\n") if v)
    return Release(fields, sha)


def _parse_sha256_line(line: str) -> IndexEntry:
    parts = line.split()
    if len(parts) != 3 or not _HEX64_RE.fullmatch(parts[0]) or not _SIZE_RE.fullmatch(parts[1]):
        raise IndexFormatError(f"SHA256 line {line[:120]!r}: expected 'sha256 size path'")
    return IndexEntry(_check_relpath(parts[2], "SHA256"), int(parts[1]), bytes.fromhex(parts[0]))


def render_release(fields: Mapping[str, str], sha256: Sequence[IndexEntry] | None) -> str:
    """A Release file's text: ``fields`` (single-line values) then the SHA256 list."""
    out = [f"{k}: {v}" for k, v in fields.items()]
    if sha256 is not None:
        out.append("SHA256:")
        width = max((len(str(e.size)) for e in sha256), default=0)
        out.extend(f" {e.digest.hex()} {e.size:>{width}} {e.path}" for e in sha256)
    return "\n".join(out) + "\n"


# -- RPM repomd.xml ----------------------------------------------------------------

_REPOMD_ALGOS = {"sha256": "sha256", "sha": "sha1", "sha1": "sha1", "sha224": "sha224",
                 "sha384": "sha384", "sha512": "sha512"}


def parse_repomd(data: bytes) -> tuple[IndexEntry, ...]:
    """The ``<data>`` entries of an RPM ``repomd.xml``, paths relative to the repo root.

    A DOCTYPE or entity declaration is refused before any expansion
    (billion laughs, external entities).  Entries with an ``xml:base`` or a
    URL as location point outside the tree and are left out.  Raises
    IndexFormatError; md5 and unknown checksum types are errors too.
    """
    entries: list[IndexEntry] = []
    stack: list[str] = []
    cur: dict | None = None
    text: list[str] = []

    def refuse(*_: object) -> None:
        raise IndexFormatError("DOCTYPE or entity declarations are not allowed")

    def start(tag: str, attrs: dict) -> None:
        nonlocal cur
        local = tag.rpartition("}")[2]
        if not stack and local != "repomd":
            raise IndexFormatError(f"root element is <{local}>, not <repomd>")
        stack.append(local)
        text.clear()
        if stack == ["repomd", "data"]:
            cur = {"type": attrs.get("type", "?")}
        elif cur is not None and len(stack) == 3:
            plain = {k.rpartition("}")[2]: v for k, v in attrs.items()}
            if local == "checksum":
                cur["algo"] = plain.get("type", "")
            elif local == "location":
                cur["href"] = plain.get("href")
                cur["base"] = plain.get("base")

    def end(tag: str) -> None:
        nonlocal cur
        local = stack.pop()
        if cur is not None and len(stack) == 2:
            if local == "checksum":
                cur["digest"] = "".join(text).strip()
            elif local == "size":
                cur["size"] = "".join(text).strip()
        elif cur is not None and local == "data":
            entry = _repomd_entry(cur)
            if entry is not None:
                entries.append(entry)
            cur = None
        text.clear()

    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise IndexFormatError(f"not well-formed XML: {err}") from err
    return tuple(entries)


def _repomd_entry(d: dict) -> IndexEntry | None:
    kind = d["type"]
    href = d.get("href")
    if not href or "digest" not in d:
        raise IndexFormatError(f"<data type={kind!r}> lacks a location or checksum")
    if d.get("base") or "://" in href:
        log.debug("repomd.xml: %s at %s%s is outside the tree; not checked", kind, d.get("base") or "", href)
        return None
    algo = _REPOMD_ALGOS.get(d.get("algo", "").lower())
    if algo is None:
        raise IndexFormatError(f"<data type={kind!r}>: checksum type {d.get('algo')!r} not accepted")
    digest = d["digest"]
    if not re.fullmatch(r"[0-9a-fA-F]+", digest) or len(digest) != 2 * hashlib.new(algo).digest_size:
        raise IndexFormatError(f"<data type={kind!r}>: {algo} checksum {digest[:140]!r} malformed")
    size = d.get("size")
    if size is not None and not _SIZE_RE.fullmatch(size):
        raise IndexFormatError(f"<data type={kind!r}>: size {size[:40]!r} malformed")
    return IndexEntry(_check_relpath(href, f"<data type={kind!r}> location"),
                      int(size) if size is not None else None, bytes.fromhex(digest), algo)
