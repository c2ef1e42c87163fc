"""The link to one downstream: its session, the frames both ways, a send rate limit.

A :class:`Link` is opened on first use and kept between pushes; its
:class:`Channel` carries the frames, a reader thread draining the agent's
answers into an inbox so that neither side can block the other on a full
channel.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from ..config import MirrorConfig
from ..errors import ConnectionLostError, ProtocolError, SyncdError, error_from_wire
from ..protocol import PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate

OPEN_IMPORT_WAIT = 1.0  # s: Link.open_in_background waits at most this for its thread's import


def quoting_stderr(err: SyncdError, tail: str) -> SyncdError:
    """``err`` with the agent's last stderr line quoted, unless that line
    says what ``err`` says already (the agent logs the error it sends)."""
    last = tail.splitlines()[-1]
    said = last.partition(": ")[2]
    if said and said in str(err):
        return type(err)(str(err))
    return type(err)(f"{err} (agent stderr: {last})")


class _TokenBucket:
    """A send rate limit in bytes per second, with one second of burst."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.last = time.monotonic()

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


class SignatureArrived:
    """In the inbox: the signature stream ``stream`` is complete."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream


class Channel:
    """Frames both ways over a session; a thread reads the agent's answers."""

    def __init__(self, session: Any, bwlimit: int = 0) -> None:
        self.session = session
        self.sent = 0
        self.received = 0
        bucket = _TokenBucket(bwlimit) if bwlimit else None

        def send_all(data: Any) -> None:
            n = memoryview(data).nbytes
            if bucket is not None:
                bucket.take(n)
            self.sent += n
            session.send_all(data)

        def recv(n: int) -> bytes:
            data = session.recv(n)
            self.received += len(data)
            return data

        self.writer = FrameWriter(send_all)
        self.reader = FrameReader(recv)
        self.version = PROTOCOL_VERSION  # what both sides speak, set by the handshake
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[int, list[bytes]] = {}
        self.signatures: dict[int, bytes] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read_loop, name="push-reader", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            for frame in self.reader:
                if frame.kind is FrameType.MESSAGE:
                    if not isinstance(frame.payload, dict) or not isinstance(frame.payload.get("type"), str):
                        raise ProtocolError("the agent sent a MESSAGE without a 'type'")
                    self.inbox.put(frame.payload)
                elif frame.kind is FrameType.DATA:
                    self.streams.setdefault(frame.stream, []).append(frame.payload)
                else:
                    self.signatures[frame.stream] = b"".join(self.streams.pop(frame.stream, []))
                    # 1.3: it may follow the needs naming it; the main thread
                    # hears of it in order with the messages.
                    self.inbox.put(SignatureArrived(frame.stream))
            self.inbox.put(ConnectionLostError("the agent closed the connection"))
        except BaseException as err:  # handed to the main thread, which raises it
            self.inbox.put(err)

    def next_message(self, timeout: float | None = None) -> dict:
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionLostError(f"no answer from the agent in {timeout:.0f} s") from None
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, SignatureArrived):
            return item
        if item.get("type") == "error":
            raise error_from_wire(item)
        return item


class Link:
    """A session to one mirror's agent, opened on first use and kept between pushes.

    The daemon keeps one per downstream, and a cascading agent one per
    downstream of its own for as long as its own session lasts: a push then
    costs neither an SSH handshake nor the start of a remote interpreter.
    Anything that goes wrong mid-push drops the link (``drop``); the next
    push opens a new one.
    """

    def __init__(self, mirror: MirrorConfig, open_session: Callable[[MirrorConfig], Any] | None = None) -> None:
        self.mirror = mirror
        # None: syncd.transport's, imported by the first open (paramiko's
        # import then runs in open_in_background's thread).
        self._open_session = open_session
        self._session: Any = None
        self._ch: Channel | None = None
        self.stderr_tail = ""
        self._opener: threading.Thread | None = None
        self._early_error: BaseException | None = None

    def open_in_background(self) -> None:
        """Start the SSH handshake and the agent now, in a thread: ``run
        --once`` overlaps them with its scan.  The first :meth:`channel`
        waits for it, and raises what it met (once: a retry opens anew).

        Returns once the thread has imported the transport (paramiko): the
        caller's own imports and scan, which want the GIL as much, would
        stretch that import and the handshake after it, and on a new
        connection's path that is the whole run's (docs/performance.md,
        "Start-up": the TCP connect comes sooner, a no-op ``run --once``
        ends sooner).
        """
        imported = threading.Event()

        def opener() -> None:
            try:
                self._session_opener()
                imported.set()
                self.channel()
            except BaseException as err:  # handed to channel()
                self._early_error = err
            finally:
                imported.set()

        self._opener = threading.Thread(target=opener, name=f"connect-{self.mirror.name}", daemon=True)
        self._opener.start()
        imported.wait(OPEN_IMPORT_WAIT)

    def _session_opener(self) -> Callable[[MirrorConfig], Any]:
        """The function that opens a session: syncd.transport's unless one was given."""
        if self._open_session is None:
            from ..transport import open_session

            self._open_session = open_session
        return self._open_session

    def channel(self) -> Channel:
        if self._opener is not None and self._opener is not threading.current_thread():
            opener, self._opener = self._opener, None
            opener.join()
            err, self._early_error = self._early_error, None
            if err is not None:
                raise err
        if self._ch is None:
            self.stderr_tail = ""  # what an earlier session said is not this one's
            session = self._session_opener()(self.mirror)
            try:
                ch = Channel(session, self.mirror.bwlimit)
                ch.writer.hello()
                ch.writer.flush()
                ch.version = negotiate(PROTOCOL_VERSION, ch.reader.read_hello())
                ch.start()
            except BaseException as err:
                session.close()
                tail = session.stderr_tail().strip() if hasattr(session, "stderr_tail") else ""
                if isinstance(err, (ProtocolError, ConnectionLostError)) and tail:
                    self.stderr_tail = ""  # quoted here; run() must not quote it again
                    # An agent that could not start says why (a broken config
                    # on the mirror, a missing root): quote its last line.
                    raise quoting_stderr(err, tail) from err
                raise
            self._session, self._ch = session, ch
        return self._ch

    def close(self) -> None:
        """End the session politely (``bye``), as at a daemon's stop or reload."""
        if self._opener is not None:
            # Still connecting (run --once's scan failed first): let it finish,
            # so that the session it opens is closed here, not left behind.
            self._opener.join(self.mirror.connect_timeout + 5)
            self._opener = None
            self._early_error = None
        if self._ch is not None:
            try:
                self._ch.writer.message({"type": "bye"})
                self._ch.writer.flush()
            except (OSError, SyncdError):
                pass
        self.drop()

    def drop(self) -> None:
        if self._session is not None:
            if hasattr(self._session, "stderr_tail"):
                self.stderr_tail = self._session.stderr_tail().strip()
            self._session.close()
        self._session = self._ch = None
