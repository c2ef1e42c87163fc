"""The syncd wire format: handshake, frames and the value codec.

This module owns bytes-in, values-out: the version handshake, the framing of a
byte stream into MESSAGE / DATA / END frames, and the compact binary encoding of
control-message values.  It does no I/O of its own: ``FrameWriter`` and
``FrameReader`` are handed ``send_all`` / ``recv`` callables (an SSH session, a
pipe, a test buffer).  The message schemas built on top of this live with their
users; every byte here is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncd.errors import ProtocolError

log = logging.getLogger(__name__)

MAGIC = b"SYNCD"
#: (major, minor).  Peers talk when majors are equal; the lower minor wins.
PROTOCOL_VERSION = (1, 4)
# 1.1: bundles of small files ("files"); 1.2: need "copy"; 1.3: signature
# streams follow the "needs" naming them, each as soon as it is computed;
# 1.4: "begin" may leave the generation to "commit" (a push fed by a scan).
HELLO_SIZE = len(MAGIC) + 2

#: Files (agent) or objects (stager) open at once on one session: each may
#: hold a 1 MiB write buffer.  A pusher sends one at a time, so this only
#: bounds a hostile peer's memory.
MAX_OPEN_STREAMS = 64
#: Frame bodies above this are refused before anything is allocated for them.
DEFAULT_MAX_BODY = 4 * 1024 * 1024
#: Value nesting deeper than this is refused (it guards the decoder's recursion).
DEFAULT_MAX_DEPTH = 32

_HELLO = struct.Struct(">5sBB")
_HEADER = struct.Struct(">BII")
HEADER_SIZE = _HEADER.size

# Value tags.  Fixed-width integers keep encoding and decoding to one
# struct call per item: control messages are small, clarity wins over bytes.
T_NONE = 0x00
T_FALSE = 0x01
T_TRUE = 0x02
T_INT = 0x03
T_BYTES = 0x04
T_STR = 0x05
T_LIST = 0x06
T_DICT = 0x07

_U8 = struct.Struct(">B")
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_TAG_U32 = struct.Struct(">BI")
_TAG_I64 = struct.Struct(">Bq")
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 1


class FrameType(enum.IntEnum):
    MESSAGE = 1
    DATA = 2
    END = 3


@dataclass(slots=True)
class Frame:
    """One decoded frame.

    ``payload`` is the decoded value for MESSAGE and END (None for an END with an
    empty body) and the raw bytes for DATA (a memoryview from a reader with
    ``reuse_data`` or ``bodies``).
    """

    kind: FrameType
    stream: int
    payload: Any


# ---------------------------------------------------------------- handshake


def hello_bytes(version: tuple[int, int] = PROTOCOL_VERSION) -> bytes:
    major, minor = version
    return _HELLO.pack(MAGIC, major, minor)


def parse_hello(data: bytes) -> tuple[int, int]:
    """The peer's (major, minor) from its 7 hello bytes."""
    if len(data) != HELLO_SIZE:
        raise ProtocolError(f"handshake: expected {HELLO_SIZE} bytes, got {len(data)}")
    magic, major, minor = _HELLO.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(
            f"handshake: peer is not a syncd agent (got {bytes(data)!r}; "
            "a shell banner or a wrong remote_command?)"
        )
    return major, minor


def negotiate(ours: tuple[int, int], theirs: tuple[int, int]) -> tuple[int, int]:
    """The version both sides speak, or ProtocolError naming both."""
    if ours[0] != theirs[0]:
        raise ProtocolError(
            f"incompatible protocol: we speak {ours[0]}.{ours[1]}, "
            f"peer speaks {theirs[0]}.{theirs[1]}"
        )
    return ours[0], min(ours[1], theirs[1])


# ---------------------------------------------------------------- values


def encode_value(value: Any) -> bytes:
    """Encode one value: None, bool, int (signed 64-bit), bytes, str, list, dict."""
    parts: list[bytes] = []
    _encode(value, parts.append, 0)
    return b"".join(parts)


def _encode(value: Any, out: Callable[[bytes], None], depth: int) -> None:
    if depth > DEFAULT_MAX_DEPTH:
        raise ProtocolError(f"value nested deeper than {DEFAULT_MAX_DEPTH}")
    # bool before int: bool is an int subclass.
    if value is None:
        out(b"\x00")
    elif value is True:
        out(b"\x02")
    elif value is False:
        out(b"\x01")
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ProtocolError(f"int {value} does not fit in 64 bits")
        out(_TAG_I64.pack(T_INT, value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = value if isinstance(value, bytes) else bytes(value)
        out(_TAG_U32.pack(T_BYTES, len(raw)))
        out(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out(_TAG_U32.pack(T_STR, len(raw)))
        out(raw)
    elif isinstance(value, (list, tuple)):
        out(_TAG_U32.pack(T_LIST, len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        out(_TAG_U32.pack(T_DICT, len(value)))
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"dict key {key!r} is not a str")
            raw = key.encode("utf-8")
            if len(raw) > 0xFFFF:
                raise ProtocolError("dict key longer than 65535 bytes")
            out(_U16.pack(len(raw)))
            out(raw)
            _encode(item, out, depth + 1)
    else:
        raise ProtocolError(f"cannot encode {type(value).__name__}")


def decode_value(data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one value filling ``data``; ProtocolError on anything else."""
    # Over bytes, not a view: a bytes value is then one slice, not a view
    # and a copy of it.  The reader hands bytes; anything else is copied once.
    raw = data if type(data) is bytes else bytes(data)
    decoder = _Decoder(raw, max_depth)
    value = decoder.value(0)
    if decoder.pos != len(raw):
        raise ProtocolError(f"{len(raw) - decoder.pos} trailing bytes after value")
    return value


class _Decoder:
    """Recursive-descent decoder; every length is checked against what is left
    before it is used, so no declared size can make it allocate or loop beyond
    the input it was given.

    The checks of an int, a bytes value or a tag are inline, and ``_need``
    is called there only to raise: decoding the rows of a listing
    ("entries", nine values a row) was a tenth of the agent main thread's
    CPU in a full push, at three method calls per int and six per bytes value.
    """

    __slots__ = ("data", "pos", "end", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.max_depth = max_depth

    def _need(self, n: int, what: str) -> None:
        if self.end - self.pos < n:
            raise ProtocolError(
                f"truncated value: {what} needs {n} bytes, {self.end - self.pos} left"
            )

    def _u32(self, what: str) -> int:
        self._need(4, what)
        (n,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return n

    def _span(self, what: str) -> int:
        """Step over a u32 length and the ``what`` bytes it announces; where they start."""
        pos = self.pos
        if self.end - pos < 4:
            self._need(4, what + " length")
        (n,) = _U32.unpack_from(self.data, pos)
        self.pos = pos = pos + 4
        if self.end - pos < n:
            self._need(n, what)
        self.pos = pos + n
        return pos

    def _text(self, start: int, what: str) -> str:
        """The UTF-8 text from ``start`` to ``pos``."""
        try:
            return str(self.data[start:self.pos], "utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(f"{what} is not valid UTF-8: {err.reason}") from err

    def value(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise ProtocolError(f"value nested deeper than {self.max_depth}")
        data, pos = self.data, self.pos
        if pos >= self.end:
            self._need(1, "tag")
        tag = data[pos]
        self.pos = pos = pos + 1
        # The commonest first: a row of "entries" is mostly ints and bytes.
        if tag == T_INT:
            if self.end - pos < 8:
                self._need(8, "int")
            self.pos = pos + 8
            return _I64.unpack_from(data, pos)[0]
        if tag == T_BYTES:
            start = self._span("bytes")
            return data[start:self.pos]
        if tag == T_NONE:
            return None
        if tag == T_LIST:
            count = self._u32("list count")
            # Every item takes at least one byte: a larger count is a lie.
            self._need(count, "list items")
            value = self.value
            depth += 1
            return [value(depth) for _ in range(count)]
        if tag == T_STR:
            return self._text(self._span("str"), "str")
        if tag == T_FALSE:
            return False
        if tag == T_TRUE:
            return True
        if tag == T_DICT:
            count = self._u32("dict count")
            self._need(count * 3, "dict items")  # u16 key length + tag, at least
            result: dict[str, Any] = {}
            for _ in range(count):
                self._need(2, "dict key length")
                (klen,) = _U16.unpack_from(data, self.pos)
                self.pos += 2
                self._need(klen, "dict key")
                start = self.pos
                self.pos += klen
                key = self._text(start, "dict key")
                if key in result:
                    raise ProtocolError(f"duplicate dict key {key!r}")
                result[key] = self.value(depth + 1)
            return result
        raise ProtocolError(f"unknown value tag 0x{tag:02x} at offset {pos - 1}")


# ---------------------------------------------------------------- frames


def frame_header(kind: FrameType, stream: int, length: int) -> bytes:
    try:
        return _HEADER.pack(kind, stream, length)
    except struct.error as err:
        raise ProtocolError(f"bad frame header ({kind!r}, stream {stream}, length {length}): {err}") from None


def handshake(writer: FrameWriter, reader: FrameReader,
              version: tuple[int, int] = PROTOCOL_VERSION) -> tuple[int, int]:
    """Send our hello, read the peer's, return the version both speak.

    Both sides may call this at once: neither waits for the other before
    sending.  A client that wants to pipeline its first requests behind the
    hello calls ``writer.hello()`` and ``reader.read_hello()`` itself.
    """
    writer.hello(version)
    writer.flush()
    return negotiate(version, reader.read_hello())


class FrameWriter:
    """Writes frames through ``send_all``, batching small ones.

    Small frames accumulate in a buffer that goes out in one write once it
    passes ``flush_threshold`` or on ``flush()``: a thousand requests cost a
    few writes, not a thousand round trips.  The caller flushes before it waits
    for an answer.  Large DATA bodies are handed to ``send_all`` as memoryview
    slices of the caller's buffer, never copied into ours.
    """

    def __init__(
        self,
        send_all: Callable[[Any], None],
        *,
        max_body: int = DEFAULT_MAX_BODY,
        flush_threshold: int = 256 * 1024,
    ) -> None:
        self._send_all = send_all
        self.max_body = max_body
        self.flush_threshold = flush_threshold
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet handed to ``send_all``."""
        return len(self._buf)

    def hello(self, version: tuple[int, int] = PROTOCOL_VERSION) -> None:
        self._buf += hello_bytes(version)

    def message(self, value: Any, stream: int = 0) -> None:
        self._small(FrameType.MESSAGE, stream, encode_value(value))

    def end(self, stream: int, value: Any = None) -> None:
        self._small(FrameType.END, stream, b"" if value is None else encode_value(value))

    def data(self, stream: int, chunk: bytes | bytearray | memoryview) -> None:
        """One payload chunk; split into several DATA frames above ``max_body``."""
        view = memoryview(chunk).cast("B")
        total = len(view)
        if total == 0:
            return
        for start in range(0, total, self.max_body):
            piece = view[start:start + self.max_body]
            # Copying a small body is cheaper than a separate write for it.
            if len(piece) < self.flush_threshold:
                self._buf += frame_header(FrameType.DATA, stream, len(piece))
                self._buf += piece
                self._maybe_flush()
            else:
                self._buf += frame_header(FrameType.DATA, stream, len(piece))
                self.flush()
                self._send_all(piece)

    def data_from(self, stream: int, length: int, send_body: Callable[[], None]) -> None:
        """One DATA frame whose body ``send_body`` sends itself, straight
        after the header (from a file, without passing through Python)."""
        if length > self.max_body:
            raise ProtocolError(f"DATA frame body of {length} bytes exceeds the limit of {self.max_body}")
        self._buf += frame_header(FrameType.DATA, stream, length)
        self.flush()
        send_body()

    def flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._send_all(buf)

    def _small(self, kind: FrameType, stream: int, body: bytes) -> None:
        if len(body) > self.max_body:
            raise ProtocolError(
                f"{kind.name} frame body of {len(body)} bytes exceeds the limit of {self.max_body}"
            )
        self._buf += frame_header(kind, stream, len(body))
        self._buf += body
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._buf) >= self.flush_threshold:
            self.flush()


class BodyPool:
    """Buffers for DATA bodies that outlive the next read, recycled.

    A reader given ``bodies`` reads each DATA body into a buffer taken from
    here (the body is a memoryview of its first bytes), for a caller that
    hands bodies on to other threads; whoever is done with a body gives it
    back.  A fresh 1 MiB ``bytearray`` per frame cost its memset and page
    faults (glibc maps and unmaps a block that large each time): a fifth of
    the agent main thread's CPU in a bulk push.

    Memory stays bounded: at most ``limit`` buffers wait here (plus one per
    thread giving back at the same moment), each of ``size`` bytes or of the
    largest body that needed more.  A body never given back is simply
    garbage, and a buffer is reused only once nothing refers to its bytes
    any more (:meth:`give_back` checks), so a consumer that keeps a view by
    mistake costs an allocation, never a body overwritten under it.
    """

    def __init__(self, size: int = 1 << 20, limit: int = 8) -> None:
        self.size = max(size, 1)
        self.limit = limit
        self._free: list[bytearray] = []

    def take(self, length: int) -> memoryview:
        """A view of ``length`` bytes to read a body into (its old bytes, not zeroes)."""
        try:
            buf = self._free.pop()  # atomic: the reader takes, the consumers' threads give back
        except IndexError:
            buf = None
        if buf is None or len(buf) < length:
            # A body larger than the buffer popped: that one is dropped, so
            # the pool follows the frames' sizes (max_body at most).
            buf = bytearray(max(length, self.size))
        return memoryview(buf)[:length]

    def give_back(self, body: Any) -> None:
        """``body`` (a view from :meth:`take`; anything else is ignored) is
        done with: its view is released and its buffer kept for the next
        body, unless a view of it is still alive somewhere."""
        if not isinstance(body, memoryview):
            return
        try:
            buf = body.obj
            body.release()  # BufferError while something holds a buffer of this very view
            if type(buf) is not bytearray or len(buf) < self.size:
                return  # not one of ours
            # Still exported (a slice or a cast of the body alive): a
            # bytearray cannot be resized then.  Shrinking by one byte and
            # growing back moves and reallocates nothing.
            buf.append(buf.pop())
        except (BufferError, ValueError):  # ValueError: given back before (released)
            return
        if len(self._free) < self.limit:
            self._free.append(buf)

    def clear(self) -> None:
        """Let go of the buffers kept (between pushes)."""
        self._free.clear()


class FrameReader:
    """Parses frames out of a ``recv(n)`` byte stream.

    Reads in blocks of ``block_size`` and cuts frames out of its own buffer, so
    a run of small frames costs one ``recv``, not two per frame.  A declared
    body above ``max_body`` is refused before a byte of it is read.
    """

    def __init__(
        self,
        recv: Callable[[int], bytes],
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_depth: int = DEFAULT_MAX_DEPTH,
        block_size: int = 1024 * 1024,
        recv_into: Callable[[memoryview], int] | None = None,
        reuse_data: bool = False,
        bodies: BodyPool | None = None,
    ) -> None:
        self._recv = recv
        # Optional: read into a given buffer.  A DATA body that is not yet
        # buffered then goes from the kernel straight into its own object:
        # one copy instead of three, and no fresh 1 MiB chunk per read.
        self._recv_into = recv_into
        # With recv_into: a DATA body is a memoryview of one buffer that the
        # next read_frame overwrites (for a caller done with each body before
        # it reads on): no allocation per frame, whose pages the kernel would
        # fault in and zero each time (a fifth of a receiver's CPU at 1 MiB
        # frames).
        self._reuse = reuse_data and recv_into is not None
        # With recv_into: each DATA body is a memoryview of a buffer of
        # ``bodies`` (instead of reuse_data's one buffer), for a caller that
        # hands bodies on and gives each back to the pool once done with it.
        self._bodies = bodies if recv_into is not None else None
        self._scratch = bytearray()
        self._chunk = bytearray(block_size) if recv_into is not None else None
        self.max_body = max_body
        self.max_depth = max_depth
        self.block_size = block_size
        self._buf = bytearray()
        self._pos = 0
        self._body_left = 0  # of a DATA body read_frame(lazy=True) left in the stream

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available; False when the stream ends first."""
        while self._available() < need:
            if self._pos:
                # Compact only when more is needed: what is left is less
                # than one frame, so the move is cheap.
                del self._buf[:self._pos]
                self._pos = 0
            if self._chunk is not None:
                # Into the same chunk every time, then appended: no new
                # object per read.
                with memoryview(self._chunk) as view:
                    n = self._recv_into(view)
                    if not n:
                        return False
                    self._buf += view[:n]
                continue
            chunk = self._recv(max(self.block_size, need - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        # Through a view: one copy out of the buffer, not two.  The view is
        # released at once so the buffer may be resized again.
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos:self._pos + n])
        self._pos += n
        return out

    def _read_data(self, length: int) -> bytes:
        """A DATA body.  A body larger than the buffer is gathered from the
        received chunks and joined once, instead of passing through the
        buffer (which would copy every byte twice more)."""
        have = self._available()
        if self._bodies is not None:
            return self._read_data_to(self._bodies.take(length), have)
        if self._reuse:
            return self._read_data_to(self._reused(length), have)
        if have >= length:
            return self._take(length)
        if self._recv_into is not None:
            return self._read_data_into(length, have)
        parts: list[bytes | memoryview] = [self._take(have)] if have else []
        self._buf.clear()
        self._pos = 0
        need = length - have
        while need:
            chunk = self._recv(max(self.block_size, need))
            if not chunk:
                raise ProtocolError(
                    f"stream ended inside a DATA frame body ({length - need} of {length} bytes)"
                )
            if len(chunk) > need:
                # The next frame starts inside this chunk: keep its tail.
                view = memoryview(chunk)
                parts.append(view[:need])
                self._buf += view[need:]
                need = 0
            else:
                parts.append(chunk)
                need -= len(chunk)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _read_data_into(self, length: int, have: int) -> bytearray:
        body = bytearray(length)
        with memoryview(body) as view:
            self._read_data_to(view, have)
        return body

    def _recv_rest(self, body: memoryview, got: int) -> None:
        """Fill ``body`` from ``got`` on, straight from the stream."""
        while got < len(body):
            n = self._recv_into(body[got:])
            if not n:
                raise ProtocolError(f"stream ended inside a DATA frame body ({got} of {len(body)} bytes)")
            got += n

    def _reused(self, length: int) -> memoryview:
        if len(self._scratch) < length:
            # A new buffer, not a resize: the caller may still hold a view
            # of the old one (it must not use it, but it may not have let go).
            self._scratch = bytearray(max(length, self.block_size))
        return memoryview(self._scratch)[:length]

    def _read_data_to(self, body: memoryview, have: int) -> memoryview:
        """Fill ``body`` with the DATA body: what is buffered, then the rest
        straight from the stream."""
        take = min(have, len(body))
        with memoryview(self._buf) as buffered:
            body[:take] = buffered[self._pos:self._pos + take]
        self._pos += take
        self._recv_rest(body, take)
        return body

    def read_hello(self) -> tuple[int, int]:
        if not self._fill(HELLO_SIZE):
            got = self._take(self._available())
            raise ProtocolError(f"handshake: stream ended after {len(got)} bytes ({got!r})")
        return parse_hello(self._take(HELLO_SIZE))

    def read_frame(self, lazy: bool = False) -> Frame | None:
        """The next frame, or None when the stream ends cleanly between frames.

        With ``lazy``, a DATA frame comes with its body left in the stream
        (``payload`` is its length): the caller reads it with
        :meth:`read_body_into` or :meth:`read_body` before the next frame."""
        if self._body_left:
            raise ProtocolError(f"{self._body_left} bytes of a DATA body left unread")
        if not self._fill(HEADER_SIZE):
            left = self._available()
            if left:
                raise ProtocolError(f"stream ended inside a frame header ({left} of {HEADER_SIZE} bytes)")
            return None
        kind, stream, length = _HEADER.unpack_from(self._buf, self._pos)
        try:
            kind = FrameType(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame type 0x{kind:02x}") from None
        if length > self.max_body:
            raise ProtocolError(
                f"{kind.name} frame declares {length} bytes, above the limit of {self.max_body}"
            )
        self._pos += HEADER_SIZE
        if kind is FrameType.DATA:
            if lazy:
                self._body_left = length
                return Frame(kind, stream, length)
            return Frame(kind, stream, self._read_data(length))
        if not self._fill(length):
            raise ProtocolError(
                f"stream ended inside a {kind.name} frame body ({self._available()} of {length} bytes)"
            )
        if kind is FrameType.END and length == 0:
            return Frame(kind, stream, None)
        # A copy, not a view: a view would pin the buffer against resizing,
        # and control messages are small.
        return Frame(kind, stream, decode_value(self._take(length), max_depth=self.max_depth))

    def __iter__(self):
        while (frame := self.read_frame()) is not None:
            yield frame

    def read_body_into(self, view: memoryview) -> int:
        """Up to ``len(view)`` bytes of the lazy DATA body into ``view``: from
        what is buffered, else straight from the stream into the caller's
        buffer (no copy through ours).  0 once the body is read."""
        n = min(len(view), self._body_left)
        if not n:
            return 0
        have = self._available()
        if have:
            n = min(n, have)
            with memoryview(self._buf) as buffered:
                view[:n] = buffered[self._pos:self._pos + n]
            self._pos += n
        elif self._recv_into is not None:
            n = self._recv_into(view[:n])
        else:
            chunk = self._recv(n)
            n = len(chunk)
            view[:n] = chunk
        if not n:
            raise ProtocolError(f"stream ended inside a DATA frame body ({self._body_left} bytes missing)")
        self._body_left -= n
        return n

    def read_body(self) -> bytes | memoryview:
        """The rest of the lazy DATA body, as read_frame would have returned it."""
        length, self._body_left = self._body_left, 0
        return self._read_data(length)

    def detach(self) -> bytes:
        """The bytes read from the stream but not yet parsed, handed over to
        whoever reads the stream next (this reader is done with it)."""
        rest = self._take(self._available())
        self._buf.clear()
        self._pos = 0
        return rest
