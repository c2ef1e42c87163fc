"""Sessions that need no paramiko: a local subprocess's pipes, and the OpenSSH client.

prewarm's streams run through ``ssh`` (open_openssh_session); importing this
module instead of syncd.transport spares them paramiko's import before their
first login (docs/performance.md, "Importing paramiko").  syncd.transport
re-exports every name here.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import getpass
import os
import pathlib
import subprocess
import threading
from typing import Any, Callable, Protocol

from syncd.errors import AuthenticationError, ConnectionLostError, HostKeyError, SyncdError, TransportError

# Writes and reads of at most this much: the number of calls stays low
# without handing anyone one huge object to re-slice.
SEND_SLICE = 1024 * 1024
RECV_BLOCK = 1024 * 1024
STDERR_TAIL_BYTES = 16 * 1024
# How long an exited command's last stderr may take to arrive (a grandchild
# holding the pipe open must not hang us).
_STDERR_SETTLE = 2.0

# GCM first: it is the fastest cipher on CPUs with AES instructions and needs
# no separate MAC.  ChaCha20 is not offered by paramiko at all.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


class MirrorLike(Protocol):
    name: str
    host: str
    port: int
    user: str
    identity_file: pathlib.Path | None
    known_hosts: pathlib.Path
    remote_command: str
    connect_timeout: float
    keepalive: int
    # Optional attribute ``io_timeout`` (seconds, None: wait forever): a send
    # or recv that makes no progress for that long is a ConnectionLostError.
    # Set it above the longest the agent may legitimately stay silent.


class _TailBuffer:
    """Keeps the last ``limit`` bytes written to it."""

    def __init__(self, limit: int = STDERR_TAIL_BYTES) -> None:
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._chunks.append(data)
            self._size += len(data)
            while self._size - len(self._chunks[0]) >= self.limit:
                self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)[-self.limit:]
        return data.decode("utf-8", errors="replace")


class _StreamBase:
    """What Session and LocalSession share: exact reads and the context manager."""

    label: str
    _stderr: _TailBuffer

    def recv(self, n: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stderr_tail(self) -> str:
        """The last of what the remote (or local) command wrote to stderr."""
        return self._stderr.text()

    def recv_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ConnectionLostError if the stream ends first."""
        first = self.recv(n)
        if len(first) == n:
            return first
        parts = bytearray(first)
        while len(parts) < n:
            chunk = self.recv(n - len(parts))
            if not chunk:
                raise ConnectionLostError(
                    f"{self.label}: stream ended after {len(parts)} of {n} bytes"
                    + self._stderr_hint()
                )
            parts += chunk
        return bytes(parts)

    def _stderr_hint(self) -> str:
        tail = self.stderr_tail().strip()
        return f"; remote stderr: {tail[-500:]}" if tail else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSession(_StreamBase):
    """The Session API over a local subprocess's pipes (no SSH).

    For tests, and for an agent on the same host.  ``command`` is a shell
    string (like a remote command) or an argument list.
    """

    def __init__(self, command: str | list[str], *, label: str | None = None,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> None:
        args = command.split() if isinstance(command, str) else list(command)
        self.label = label or f"local:{args[0] if args else '?'}"
        self._stderr = _TailBuffer()
        self._closed = False
        try:
            self._proc = subprocess.Popen(
                command if isinstance(command, str) else args,
                shell=isinstance(command, str),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=env,
                cwd=cwd,
            )
        except OSError as err:
            raise TransportError(f"{self.label}: cannot start {command!r}: {err}") from err
        self._stdout_fd = self._proc.stdout.fileno()
        self._stdin_fd = self._proc.stdin.fileno()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        fd = self._proc.stderr.fileno()
        try:
            while data := os.read(fd, 65536):
                self._stderr.add(data)
        except OSError:
            pass

    def send_all(self, buf: bytes | bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        fd = self._stdin_fd
        try:
            start = 0
            while start < len(view):
                start += os.write(fd, view[start:start + SEND_SLICE])
        except (OSError, ValueError) as err:
            raise ConnectionLostError(
                f"{self.label}: pipe closed while sending: {err}" + self._stderr_hint()
            ) from None

    def send_file(self, fd: int, offset: int, length: int) -> int:
        """Send ``length`` bytes of file ``fd`` from ``offset`` without
        copying them through this process (splice(2) into the pipe).  Returns
        how many went; fewer when the file is shorter.  NotImplementedError
        where splice is not available (the caller then reads and sends)."""
        splice = getattr(os, "splice", None)
        if splice is None:
            raise NotImplementedError("os.splice")
        sent = 0
        try:
            while sent < length:
                n = splice(fd, self._stdin_fd, length - sent, offset_src=offset + sent)
                if n == 0:
                    break
                sent += n
        except OSError as err:
            if sent == 0 and err.errno in (errno.EINVAL, errno.ENOSYS):
                raise NotImplementedError(f"splice: {err}") from None
            if err.errno in (errno.EPIPE, errno.EBADF):
                raise ConnectionLostError(
                    f"{self.label}: pipe closed while sending: {err}" + self._stderr_hint()
                ) from None
            raise
        return sent

    def recv(self, n: int = RECV_BLOCK) -> bytes:
        try:
            return os.read(self._stdout_fd, n)
        except OSError as err:
            raise ConnectionLostError(f"{self.label}: pipe failed while receiving: {err}") from None

    def close_write(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def exit_status(self, timeout: float | None = None) -> int:
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ConnectionLostError(
                f"{self.label}: no exit status within {timeout} s" + self._stderr_hint()
            ) from None
        self._stderr_thread.join(_STDERR_SETTLE)
        # Match SSH, where a command killed by a signal has no exit status.
        return status if status >= 0 else -1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr_thread.join(5)
        self._proc.stderr.close()


# -- the OpenSSH client as a transport (prewarm's parallel streams) ----------------


def open_openssh_session(mirror: MirrorLike) -> "LocalSession":
    """A session through the OpenSSH client binary instead of paramiko.

    Each prewarm stream is one process; with paramiko that process spends
    most of its core packetizing and encrypting in Python, while ``ssh``
    encrypts in C at a higher rate (docs/performance.md, "SSH transfer
    rates").  The same promises as syncd.transport: only the mirror's
    ``known_hosts`` is trusted and an unknown key is refused
    (StrictHostKeyChecking), the mirror's key only, no prompts, no user
    ssh_config, GCM ciphers first.
    """
    user = mirror.user or getpass.getuser()
    known = os.path.expanduser(str(mirror.known_hosts or "~/.ssh/known_hosts"))
    argv = ["ssh", "-F", "/dev/null", "-T", "-x", "-a", "-p", str(mirror.port or 22), "-l", user,
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no", "-o", "Compression=no",
            "-o", f"ConnectTimeout={max(1, int(mirror.connect_timeout))}",
            "-c", ",".join(PREFERRED_CIPHERS)]
    if mirror.keepalive:
        argv += ["-o", f"ServerAliveInterval={int(mirror.keepalive)}", "-o", "ServerAliveCountMax=4"]
    if mirror.identity_file is not None:
        argv += ["-i", os.path.expanduser(str(mirror.identity_file)), "-o", "IdentitiesOnly=yes"]
    argv += [mirror.host, mirror.remote_command]
    session = LocalSession(argv, label=f"{user}@{mirror.host}:{mirror.port or 22}")
    for fd in (session._stdin_fd, session._stdout_fd):
        grow_pipe(fd)
    return session


def openssh_error(session: "LocalSession", err: SyncdError) -> SyncdError:
    """What an ssh client that exited before the handshake meant, from its stderr."""
    session.close()
    tail = session.stderr_tail().strip()
    last = tail.splitlines()[-1] if tail else str(err)
    if "Host key verification failed" in tail or "REMOTE HOST IDENTIFICATION HAS CHANGED" in tail:
        return HostKeyError(f"{session.label}: host key refused: {last}")
    if "Permission denied" in tail:
        return AuthenticationError(f"{session.label}: {last}")
    if tail:
        said = str(err)
        # The session's own errors name it already.
        said = said if said.startswith(f"{session.label}: ") else f"{session.label}: {said}"
        return ConnectionLostError(f"{said} ({last})")
    return err


# -- the remote end: fds 0 and 1 -------------------------------------------------


def grow_pipe(fd: int) -> None:
    """Let sshd hand us 1 MiB per read instead of the default 64 KiB pipe.

    A full 64 KiB pipe stalls sshd, which then withholds the SSH window from
    the pusher, which capped a push (docs/performance.md, "SSH transfer rates").
    """
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass  # not a pipe (a socket, a file in tests), or above pipe-max-size


def stdio() -> tuple[Callable[[int], bytes], Callable[[Any], None], Callable[[memoryview], int]]:
    """``recv``, ``send_all`` and ``recv_into`` over fds 0 and 1: the SSH
    exec channel of a remote end."""
    grow_pipe(0)
    grow_pipe(1)

    def recv(n: int) -> bytes:
        return os.read(0, n)

    def send_all(data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(1, view)
            view = view[n:]

    def recv_into(view: memoryview) -> int:
        return os.readv(0, [view])

    return recv, send_all, recv_into
