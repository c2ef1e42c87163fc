"""Names from the wire: checked once, before anything touches the disk.

A name is a normal relative path in bytes, ``/``-separated, compared byte for
byte by both ends: nothing is normalized, so a non-normal name is refused.
"""

from __future__ import annotations

from ..errors import UnsafePathError
from ..manifest import fspath

MAX_PATH = 4096
MAX_COMPONENT = 255

# Control characters would break a one-line message (a name may hold "\n").
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def show(path: bytes) -> str:
    """``path`` for a one-line message: undecodable and control bytes as \\xNN."""
    return fspath(path).translate(_CONTROL)


def validate_name(path: bytes) -> bytes:
    """Return ``path`` unchanged if it is a safe, normal relative name.

    Refused (UnsafePathError): empty, absolute, a ``.`` or ``..`` or empty
    component (``a//b``, trailing ``/``), a NUL byte, over 4096 bytes, or a
    component over 255 bytes.  Nothing is normalized: both ends must agree on
    every name byte for byte, so a non-normal name is an error, not a variant.
    """
    if not isinstance(path, bytes):
        raise UnsafePathError(f"unsafe path {path!r}: not bytes")
    reason = _name_problem(path)
    if reason:
        raise UnsafePathError(f"unsafe path {show(path)!r}: {reason}")
    return path


def _name_problem(path: bytes) -> str | None:
    if not path:
        return "empty name"
    if len(path) > MAX_PATH:
        return f"longer than {MAX_PATH} bytes"
    if b"\0" in path:
        return "contains NUL"
    if path[0] == 0x2F:
        return "absolute"
    for comp in path.split(b"/"):
        if not comp:
            return "empty component"
        if comp == b"." or comp == b"..":
            return f"'{comp.decode()}' component"
        if len(comp) > MAX_COMPONENT:
            return f"component longer than {MAX_COMPONENT} bytes"
    return None


