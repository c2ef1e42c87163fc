"""An object or a range of one arriving at the stage-only agent (:class:`Put`),
and an object arriving as its ranges in order on one session (:class:`Run`)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

from ..compress import decompressing_writer
from ..errors import ProtocolError, disk_full_as
from ..fsops import DIRECT_MIN, WRITEBACK_MIN, BufferPool, DirectWriter, SparseWriter, start_writeback, unlink_at
from ..messages import Put as PutMessage
from ..partial import PARTIAL_PREFIX, RangeLog
from ..protocol import FrameReader
from ..sparse import Decoder, hash_zeros
from ..staging import VerifiedLog
from .codec import digest_key, range_hasher


class Staging(Protocol):
    """What a :class:`Put` needs of the stager it arrives at (syncd.prewarm.stager.Stager)."""

    staging: Path
    staging_fd: int
    buffers: BufferPool
    verified: VerifiedLog | None

    def new_tmp(self) -> str: ...

    def run_for(self, sha: bytes, size: int, offset: int) -> Run | None: ...


class Put:
    """One object or range arriving on a stream."""

    def __init__(self, stager: Staging, msg: PutMessage) -> None:
        self.stager = stager
        self.sha256 = msg.sha256
        self.size = msg.size
        self.offset = msg.offset
        self.length = msg.length
        self.digest = msg.digest
        self.hex = self.sha256.hex()
        self.whole = self.offset == 0 and self.length == self.size
        sfd = stager.staging_fd
        self.run: Run | None = None
        if self.whole:
            self.name = stager.new_tmp()
            self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o600, dir_fd=sfd)
        else:
            if msg.run:
                self.run = stager.run_for(self.sha256, self.size, self.offset)
            if self.run is not None:
                self.name = self.run.name
                self.fd = os.open(self.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            else:
                self.name = PARTIAL_PREFIX + self.hex
                self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                  dir_fd=sfd)
                if os.fstat(self.fd).st_size != self.size:
                    # Every writer of this object sets the same size: concurrent
                    # stagers agree, and a stale larger file is cut to size.
                    os.ftruncate(self.fd, self.size)
        self.pos = self.offset
        pool = stager.buffers if self.length >= DIRECT_MIN else None
        # A sparse payload (syncd.sparse): only the range's data comes; its
        # holes are left unwritten (in a partial file, where older bytes may
        # lie, deallocated), and hashed as the zeros they read as.
        self.sparse = msg.sparse
        self.out: Any
        self._decoder = None
        write: Callable[[Any], Any] = self._write
        if self.sparse:
            if self.whole:
                os.ftruncate(self.fd, self.size)
            self.out = SparseWriter(self.fd, self.offset, pool, punch=self.run is None and not self.whole)
            self._decoder = Decoder(self.offset, self.offset + self.length, self._write, self._hole,
                                    name=f"put {self.hex}")
            write = self._decoder.feed
        else:
            self.out = DirectWriter(self.fd, self.offset, pool)
        self.hasher = hashlib.sha256() if self.whole else range_hasher(self.digest)
        self.chain = self.run.chain if self.run is not None else None
        if msg.how == "zstd":
            self._zw = decompressing_writer(write)
            self.feed = self._zw.write
        else:
            self._zw = None
            self.feed = write

    def receive(self, reader: FrameReader, length: int) -> None:
        """A DATA body of ``length`` bytes from ``reader`` (read lazily):
        raw bytes go from the stream straight into the aligned write buffer
        and are hashed there, with no copy in between."""
        space = self.out.space() if self._zw is None and self._decoder is None else None
        if space is None:
            self.feed(reader.read_body())
            return
        if self.pos + length > self.offset + self.length:
            raise ProtocolError(f"put {self.hex}: more bytes than the announced range")
        left = length
        while left:
            if not space:
                space = self.out.space()
            view = space[:left]
            n = reader.read_body_into(view)
            got = view[:n]
            self.hasher.update(got)
            if self.chain is not None:
                self.chain.update(got)
            space = space[n:]
            # The buffer may go out (and a new one come) here: the views of
            # the old one are not used again.
            del view, got
            self.out.advance(n)
            self.pos += n
            left -= n

    def _write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.pos + len(view) > self.offset + self.length:
            raise ProtocolError(f"put {self.hex}: more bytes than the announced range")
        self.hasher.update(view)
        if self.chain is not None:
            self.chain.update(view)
        with disk_full_as(self._disk_full):
            self.out.write(view)
        self.pos += len(view)
        return len(view)

    def _hole(self, n: int) -> None:
        hash_zeros(self.hasher, n)
        if self.chain is not None:
            hash_zeros(self.chain, n)
        with disk_full_as(self._disk_full):
            self.out.skip(n)
        self.pos += n

    def _disk_full(self) -> str:
        return f"disk full staging {self.hex} in {self.stager.staging}"

    def check(self, trailer: Any) -> bool:
        """True when the range (or whole object) arrived intact."""
        if self._zw is not None:
            self._zw.flush()
        if self._decoder is not None:
            self._decoder.finish()
        with disk_full_as(self._disk_full):
            self.out.close()
        digest = trailer.get(digest_key(self.digest)) if isinstance(trailer, dict) else None
        return self.pos == self.offset + self.length and (
            self.hasher.digest() == (self.sha256 if self.whole else digest))

    def commit(self) -> None:
        """Start the checked bytes' write-out, then name (whole) or record (range) them.

        No fdatasync: it made the stager's threads wait on the disk
        (docs/performance.md, "Writing to disk").  See syncd.prewarm.stager's
        docstring for why a record may go ahead of its bytes."""
        try:
            if self.length >= WRITEBACK_MIN:
                start_writeback(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        sfd = self.stager.staging_fd
        if self.whole:
            os.rename(self.name, self.hex, src_dir_fd=sfd, dst_dir_fd=sfd)
            self.stager.verified.add(self.hex)
            return
        # Written data first, then its record: a killed stager never records
        # a range it did not write (a power cut may; the whole-object check catches it).
        records = RangeLog(sfd, self.name)
        try:
            records.add(self.offset, self.length)
        finally:
            records.close()

    def discard(self) -> None:
        if self.run is not None:
            self.run.broken = True  # its hash took bytes that are not the object's
        self.out.abandon()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.whole:
            unlink_at(self.stager.staging_fd, self.name)


class Run:
    """An object arriving as its ranges in order on one session, into a file
    of this process's own (``run.PID.<sha256hex>``): it is hashed as it
    arrives, so naming it needs no read back.  Each range is recorded as in
    a partial file; a run that does not complete becomes the object's partial
    file (``promote_run``), from which a resumed prewarm goes on."""

    def __init__(self, sha256: bytes, size: int, name: str) -> None:
        self.sha256 = sha256
        self.size = size
        self.name = name
        self.chain = hashlib.sha256()
        self.pos = 0  # bytes checked so far, all in order from 0
        self.pending = 0  # ranges checked whose commit has not run yet
        self.broken = False
        self.done = False
        self.lock = threading.Lock()
