"""A session to a stage-only agent (``syncd agent --stage``) and how it is opened."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
from typing import Any, Callable

from ..config import MirrorConfig
from ..errors import ConnectionLostError, ProtocolError, RemoteError, SyncdError, UsageError
from ..protocol import PROTOCOL_VERSION, FrameReader, FrameType, FrameWriter, negotiate
from ..session import open_openssh_session, openssh_error


def stage_mirror(mirror: MirrorConfig, io_timeout: float | None = None) -> MirrorConfig:
    """The mirror with ``remote_command`` running the stage-only agent mode.

    The mode is ``agent --stage``: the token ``agent`` of the configured
    command gets ``--stage`` after it, so the same key, user and known_hosts
    reach it.
    """
    words = shlex.split(mirror.remote_command)
    if "agent" not in words:
        raise UsageError(
            f"[mirror:{mirror.name}] remote_command {mirror.remote_command!r} has no 'agent' word: "
            "cannot derive the stage-only command ('agent --stage') for prewarm"
        )
    i = words.index("agent")
    words.insert(i + 1, "--stage")
    changes: dict[str, Any] = {"remote_command": " ".join(shlex.quote(w) for w in words)}
    if io_timeout is not None:
        changes["io_timeout"] = io_timeout
    return dataclasses.replace(mirror, **changes)


def session_factory(transport: str = "auto") -> Callable:
    """``open_session`` for the stage streams: ``openssh``, ``paramiko`` or
    ``auto`` (OpenSSH when its client is installed)."""
    if transport == "auto":
        transport = "openssh" if shutil.which("ssh") else "paramiko"
    if transport == "openssh":
        return open_openssh_session
    if transport == "paramiko":
        from ..transport import open_session  # paramiko: imported when chosen

        return open_session
    raise UsageError(f"--transport: {transport!r} is not auto, openssh or paramiko")


class StageConn:
    """A stage-only session: frames both ways, byte counters."""

    def __init__(self, mirror: MirrorConfig, open_session: Callable, role: str, node: str) -> None:
        self.session = open_session(mirror)
        self.sent = 0

        def send_all(data: Any) -> None:
            self.sent += memoryview(data).nbytes
            self.session.send_all(data)

        self.writer = FrameWriter(send_all)
        self.reader = FrameReader(self.session.recv)
        self.can_send_file = hasattr(self.session, "send_file")
        self.writer.hello()
        self.writer.message({"type": "hello", "node": node, "mirror": mirror.name, "role": role})
        try:
            self.writer.flush()
            negotiate(PROTOCOL_VERSION, self.reader.read_hello())
            self.welcome = self.message("welcome")
        except (ProtocolError, ConnectionLostError) as err:
            raise openssh_error(self.session, err) from None
        features = self.welcome.get("features")
        self.features = {f for f in features if isinstance(f, str)} if isinstance(features, list) else set()

    def send_file(self, fd: int, offset: int, length: int) -> int:
        """``length`` bytes of a file into the session: straight from the file
        where the session can (splice), else read and sent.  Returns how many
        went; fewer only when the file is shorter."""
        got = 0
        if self.can_send_file:
            try:
                got = self.session.send_file(fd, offset, length)
            except NotImplementedError:
                self.can_send_file = False
            self.sent += got
        if got < length:
            rest = os.pread(fd, length - got, offset + got)
            self.sent += len(rest)
            self.session.send_all(rest)
            got += len(rest)
        return got

    def message(self, expect: str | None = None) -> dict:
        frame = self.reader.read_frame()
        if frame is None:
            raise ConnectionLostError(f"{self.session.label}: the stager closed the connection")
        if frame.kind is not FrameType.MESSAGE or not isinstance(frame.payload, dict):
            raise ProtocolError(f"{self.session.label}: expected a message, got a {frame.kind.name} frame")
        msg = frame.payload
        if msg.get("type") == "error":
            raise RemoteError(f"{self.session.label}: stager: {msg.get('message')}")
        if expect is not None and msg.get("type") != expect:
            raise ProtocolError(f"{self.session.label}: expected {expect!r}, got {msg.get('type')!r}")
        return msg

    def close(self) -> None:
        try:
            self.writer.message({"type": "bye"})
            self.writer.flush()
        except SyncdError:
            pass
        self.session.close()


class Resumed:
    """A session handed on mid-stream: what the last reader had read ahead
    comes first."""

    def __init__(self, session: Any, head: bytes) -> None:
        self._session = session
        self._head = head

    def recv(self, n: int = 1 << 20) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._session.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
