"""The receiver side: rebuilding the new file from the old one and a delta.

The patcher is a push parser: it is fed pieces of the delta split at any
byte boundary and writes output as soon as each op is known.  It never
buffers more than one op header, streams literals straight through, reads
copies from the old file in bounded pieces, and checks every copy against
the old file's size before reading.  The output's SHA-256 is checked at the
end, so a wrong old file or a corrupted delta is an error, never a
silently wrong file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from syncd.errors import DeltaFormatError, PatchMismatchError

from . import format as fmt

__all__ = ["Patcher", "patch_bytes"]

#: Largest single read_old call: a merged copy can span the whole old file.
COPY_READ = 1 << 20

_HEADER, _OPCODE, _ARGS, _LITERAL, _DONE, _FAILED = range(6)


class Patcher:
    """Incremental patch: ``feed`` delta pieces, then ``finish``.

    ``read_old(offset, length)`` must return exactly ``length`` bytes of the
    old file (it is only called inside ``[0, old_size)``); ``write`` receives
    the output in order.  ``max_output`` optionally bounds the rebuilt size.
    Any error leaves the patcher failed: the caller discards the output and
    resends the file whole.
    """

    def __init__(
        self,
        read_old: Callable[[int, int], bytes],
        old_size: int,
        write: Callable[[bytes | memoryview], object],
        *,
        max_output: int | None = None,
    ) -> None:
        if old_size < 0:
            raise ValueError("old_size must be >= 0")
        self._read_old = read_old
        self._old_size = old_size
        self._write = write
        self._max_output = max_output
        self._sha = hashlib.sha256()
        self._state = _HEADER
        self._need = fmt.DELTA_HEADER.size
        self._pending = bytearray()
        self._op = 0
        self._literal_left = 0
        self._written = 0
        self._end: tuple[int, bytes | None] | None = None

    @property
    def written(self) -> int:
        """Bytes of output written so far."""
        return self._written

    def feed(self, piece) -> None:
        """Consume the next bytes of the delta, writing whatever they complete."""
        if self._state == _FAILED:
            raise DeltaFormatError("patcher already failed")
        try:
            self._feed(fmt.byte_view(piece))
        except BaseException:
            self._state = _FAILED
            raise

    def _feed(self, view: memoryview) -> None:
        i, size = 0, view.nbytes
        while i < size:
            if self._state == _LITERAL:
                take = min(self._literal_left, size - i)
                self._emit(view[i : i + take])
                i += take
                self._literal_left -= take
                if not self._literal_left:
                    self._state, self._need = _OPCODE, 1
                continue
            if self._state == _DONE:
                raise DeltaFormatError(f"{size - i} bytes of garbage after the delta's END op")
            take = min(self._need - len(self._pending), size - i)
            self._pending += view[i : i + take]
            i += take
            if len(self._pending) == self._need:
                record = bytes(self._pending)
                self._pending.clear()
                self._record(record)

    def _record(self, record: bytes) -> None:
        if self._state == _HEADER:
            magic, version = fmt.DELTA_HEADER.unpack(record)
            if magic != fmt.DELTA_MAGIC:
                raise DeltaFormatError(f"not a syncd delta (magic {magic!r})")
            if version != fmt.VERSION:
                raise DeltaFormatError(f"unsupported delta version {version}")
            self._state, self._need = _OPCODE, 1
        elif self._state == _OPCODE:
            op = record[0]
            size = fmt.op_arg_size(op)
            if size is None:
                raise DeltaFormatError(f"unknown delta op 0x{op:02x} at output offset {self._written}")
            self._op = op
            self._state, self._need = _ARGS, size
        else:
            op = self._op
            kind = op & 0xF0
            if kind == fmt.OP_COPY:
                split = fmt.WIDTHS[(op >> 2) & 3]
                self._copy(int.from_bytes(record[:split], "little"), int.from_bytes(record[split:], "little"))
                self._state, self._need = _OPCODE, 1
            elif kind == fmt.OP_LITERAL:
                length = int.from_bytes(record, "little")
                if not 1 <= length <= fmt.MAX_LITERAL:
                    raise DeltaFormatError(f"literal of {length} bytes outside [1, {fmt.MAX_LITERAL}]")
                self._check_output(length)
                self._literal_left = length
                self._state = _LITERAL
            else:
                width = fmt.WIDTHS[op & 3]
                digest = record[width:] if op & fmt.END_HAS_SHA else None
                self._end = (int.from_bytes(record[:width], "little"), digest)
                self._state = _DONE

    def _check_output(self, length: int) -> None:
        if self._max_output is not None and self._written + length > self._max_output:
            raise DeltaFormatError(f"delta output exceeds the limit of {self._max_output} bytes")

    def _copy(self, offset: int, length: int) -> None:
        if length == 0 or offset > self._old_size or length > self._old_size - offset:
            raise DeltaFormatError(
                f"copy of {length} bytes at {offset} is outside the {self._old_size}-byte old file"
            )
        self._check_output(length)
        end = offset + length
        while offset < end:
            n = min(COPY_READ, end - offset)
            data = self._read_old(offset, n)
            if len(data) != n:
                raise PatchMismatchError(f"old file gave {len(data)} bytes at {offset}, expected {n}: it changed")
            self._emit(data)
            offset += n

    def _emit(self, data) -> None:
        self._sha.update(data)
        self._write(data)
        self._written += len(data)

    def finish(self, expected_sha256: bytes | None = None) -> bytes:
        """Check the output and return its SHA-256.

        DeltaFormatError when the delta stopped before its END op;
        PatchMismatchError when the output's size differs from the END op's,
        or its digest from the one the END op carries (if any) or from
        ``expected_sha256``.  The push layer passes the manifest's SHA-256
        here; with neither digest the caller must compare the returned one.
        """
        if self._state == _FAILED:
            raise DeltaFormatError("patcher already failed")
        if self._state != _DONE:
            self._state = _FAILED
            raise DeltaFormatError(f"delta truncated after {self._written} bytes of output")
        new_size, end_digest = self._end
        digest = self._sha.digest()
        if new_size != self._written:
            raise PatchMismatchError(f"patched {self._written} bytes, the delta promised {new_size}")
        if end_digest is not None and digest != end_digest:
            raise PatchMismatchError("patched file's SHA-256 differs from the delta's")
        if expected_sha256 is not None and digest != bytes(expected_sha256):
            raise PatchMismatchError("patched file's SHA-256 differs from the expected one")
        return digest


def patch_bytes(old, delta, expected_sha256: bytes | None = None) -> bytes:
    """Apply a whole delta to an in-memory old file (a convenience for tests)."""
    old_view = fmt.byte_view(old)
    out = bytearray()
    patcher = Patcher(lambda off, n: old_view[off : off + n], old_view.nbytes, out.extend)
    patcher.feed(delta)
    patcher.finish(expected_sha256)
    return bytes(out)
