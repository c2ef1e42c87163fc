"""The files of one push, onto its channel: whole (zstd where a sample
shrinks), as a delta against a signature the agent sent, or many small
files bundled in one message ("files", protocol 1.1)."""

from __future__ import annotations

import itertools
import logging
import os
import stat
from typing import Any, Callable, Iterable, Iterator

from ..compress import compress_if_smaller, compressor, named_compressed, should_compress
from ..errors import ProtocolError, SyncdError
from ..manifest import Entry, fspath
from ..sparse import data_extents, has_holes, payload
from .link import Channel

log = logging.getLogger(__package__)

CHUNK = 1 << 20
# Files up to this size travel together, in bundles of about BUNDLE_BYTES
# ("files", protocol 1.1): one message and one stream for many small files.
BUNDLE_FILE_MAX = 64 * 1024
BUNDLE_BYTES = 1 << 20
BUNDLE_FILES = 512
# A delta against a basis the agent chose by name or size goes only when
# samples of the new file find its blocks (delta_pays).
PAYS_SAMPLES = 16
PAYS_MIN = 2
PAYS_SAMPLE_MIN = 64 << 10


class FileSender:
    """Sends one push's files on ``ch``, each on a stream of its own.

    It also keeps what the agent said of how a file may go: the offset a
    file sent whole may resume from (:meth:`offer_resume`), and the other
    file of the edge a delta is against (:meth:`use_basis`).  Made at the
    push's ``begin``: its buffers are that push's.
    """

    def __init__(self, ch: Channel, root: bytes, mirror: str, features: set[str],
                 check_stop: Callable[[], None]) -> None:
        self.ch = ch
        self.root = root
        self.mirror = mirror
        # Holes are not sent: only where the agent takes a sparse payload.
        self.sparse = "sparse" in features
        self.check_stop = check_stop
        self.last_stream = 0  # the stream number the last file went on
        self._resume: dict[bytes, int] = {}  # path -> the offset the agent offered to resume from
        self._basis: dict[bytes, bytes] = {}  # a delta against another file of the edge: path -> that file
        self._read_buf = memoryview(bytearray(CHUNK))  # a sparse file's data is read into it
        self._bundle: list[Entry] = []
        self._bundle_bytes = 0
        # The bundle's bytes, read straight into place (no bytes object per
        # file, no join per bundle); reused once a bundle is sent, which
        # the writer does before it returns.
        self._bundle_buf = bytearray(BUNDLE_BYTES + BUNDLE_FILE_MAX + 1)

    def offer_resume(self, path: bytes, offset: int) -> None:
        self._resume[path] = offset

    def use_basis(self, path: bytes, basis: bytes) -> None:
        self._basis[path] = basis

    def forget_basis(self, path: bytes) -> None:
        self._basis.pop(path, None)

    def _next_stream(self) -> int:
        self.last_stream += 1
        return self.last_stream

    def open_source(self, entry: Entry) -> int:
        """An fd on the file to send, still the regular file of the scan's size."""
        try:
            fd = os.open(self.root + b"/" + entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise SyncdError(
                f"{fspath(entry.path)}: cannot read on this node ({err.strerror}); rescan and push again"
            ) from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            os.close(fd)
            raise SyncdError(f"{fspath(entry.path)}: changed since the last scan; rescan and push again")
        return fd

    # -- small files travel together ("files", protocol 1.1)

    def bundle_add(self, entry: Entry) -> list[Entry]:
        """Add a small file to the bundle; the files sent, when that filled it."""
        start = self._bundle_bytes
        fd = self.open_source(entry)
        try:
            # One byte more than the scan saw: a file grown since is caught.
            with memoryview(self._bundle_buf) as buf:
                got = os.preadv(fd, [buf[start:start + entry.size + 1]], 0)
        finally:
            os.close(fd)
        if got != entry.size:
            raise SyncdError(f"{fspath(entry.path)}: changed since the last scan; rescan and push again")
        self._bundle.append(entry)
        self._bundle_bytes += got
        if self._bundle_bytes >= BUNDLE_BYTES or len(self._bundle) >= BUNDLE_FILES:
            return self.bundle_flush()
        return []

    def bundle_flush(self) -> list[Entry]:
        """Send the bundle so far; the files it held."""
        bundle, size = self._bundle, self._bundle_bytes
        self._bundle, self._bundle_bytes = [], 0
        if not bundle:
            return []
        self.check_stop()
        stream = self._next_stream()
        with memoryview(self._bundle_buf) as buf:
            self._send_bundle(stream, bundle, buf[:size])
        return bundle

    def _send_bundle(self, stream: int, bundle: list[Entry], payload: Any) -> None:
        how = "whole"
        if any(not named_compressed(e.path) for e in bundle) and should_compress(b"", payload):
            packed = compress_if_smaller(payload)
            if packed is not None:
                payload, how = packed, "zstd"
        w = self.ch.writer
        w.message({"type": "files", "stream": stream, "how": how,
                   "items": [[e.path, e.size, e.sha256] for e in bundle]})
        w.data(stream, payload)
        w.end(stream)

    # -- one file

    def send_file(self, entry: Entry, need: str, signature: bytes | None) -> None:
        """``entry``'s file on a stream of its own: as a delta against
        ``signature`` (``need`` "delta") where that pays, else whole."""
        w = self.ch.writer
        stream = self._next_stream()
        fd = self.open_source(entry)
        try:
            header: dict[str, Any] = {"type": "file", "stream": stream, "path": entry.path, "size": entry.size,
                                      "sha256": entry.sha256}
            sparse = self.sparse and has_holes(os.fstat(fd))
            if sparse:
                header["sparse"] = True
            sig = None
            if need == "delta":
                from ..delta import decode_signature  # numpy: imported by the first delta

                sig = decode_signature(signature)
                basis = self._basis.pop(entry.path, None)
                if basis is not None and not delta_pays(sig, fd, entry.size):
                    log.debug("%s: %s shares too little with %s on the mirror; sending it whole",
                              self.mirror, fspath(entry.path), fspath(basis))
                    sig = None
            if sig is not None:
                self._send_delta(stream, header, sig, fd)
            else:
                self._send_whole(stream, header, entry, fd, sparse)
            w.end(stream)
        finally:
            os.close(fd)

    def _send_delta(self, stream: int, header: dict, sig: Any, fd: int) -> None:
        from ..delta import iter_delta

        w = self.ch.writer
        w.message(dict(header, how="delta"))
        for piece in iter_delta(sig, chunks(fd)):
            self.check_stop()
            w.data(stream, piece)
            if len(piece) < CHUNK:
                # Mostly copy ops, standing for megabytes: sent now, the
                # edge rebuilds while the rest is matched.
                w.flush()

    def _send_whole(self, stream: int, header: dict, entry: Entry, fd: int, sparse: bool) -> None:
        w = self.ch.writer
        # A retry after a failure (retry_whole) starts from 0: its offer was used.
        offset = self._resume.pop(entry.path, 0)
        if not 0 <= offset <= entry.size:
            raise ProtocolError(f"needs: resume of {fspath(entry.path)} at {offset}, "
                                f"beyond its {entry.size} bytes")
        if offset:
            header["offset"] = offset
            log.info("%s: %s resumed from byte %d of %d", self.mirror, fspath(entry.path), offset, entry.size)
        if sparse:
            first_data = next(data_extents(fd, offset, entry.size), (offset, 0))[0]
            first = os.pread(fd, CHUNK, first_data)
            pieces: Iterable[Any] = payload(fd, offset, entry.size, self._read_buf, name=fspath(entry.path))
        else:
            first = os.pread(fd, CHUNK, offset)
            pieces = itertools.chain([first], chunks(fd, offset + len(first)))
        if not should_compress(entry.path, first):
            w.message(dict(header, how="whole"))
            for chunk in pieces:
                self.check_stop()
                w.data(stream, chunk)
            return
        w.message(dict(header, how="zstd"))
        cobj = compressor()
        for chunk in pieces:
            self.check_stop()
            out = cobj.compress(chunk)
            if out:
                w.data(stream, out)
        w.data(stream, cobj.flush())


def delta_pays(sig: Any, fd: int, size: int) -> bool:
    """Whether a delta against ``sig``'s file, a basis the agent chose by
    its name or size, saves enough to send: a block of it is found in at
    least PAYS_MIN of PAYS_SAMPLES samples spread evenly over the new file
    (16 samples of 64 KiB for a 64 MiB file: docs/performance.md,
    "Per-file costs").  Unrelated
    data then goes whole, zstd-compressed where that pays, instead of as a
    delta of literals that costs the search and compresses nothing."""
    from ..delta import samples_matching

    length = min(size, max(PAYS_SAMPLE_MIN, 8 * sig.block_size))
    count = 1 if size <= length else PAYS_SAMPLES
    offsets = [i * (size - length) // max(1, count - 1) for i in range(count)]
    found = samples_matching(sig, (os.pread(fd, length, offset) for offset in offsets))
    return found >= min(PAYS_MIN, count)


def chunks(fd: int, offset: int = 0) -> Iterator[bytes]:
    while True:
        chunk = os.pread(fd, CHUNK, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk
