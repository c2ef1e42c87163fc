"""The SSH session that runs the remote agent: the only module importing paramiko
(with syncd.gcm, its one-copy path for channel data, which only this module imports).

``open_session(mirror)`` connects to a downstream, checks its host key against
``known_hosts`` only, authenticates, runs ``remote_command`` on an exec channel
and returns a ``Session``: a plain byte stream (``send_all``, ``recv``,
``recv_exactly``, ``close_write``, ``exit_status``, ``stderr_tail``, ``close``).
``LocalSession`` offers the same API over a local subprocess's pipes, and
``open_openssh_session`` over the OpenSSH client (both in syncd.session,
which imports no paramiko).

Every paramiko, socket or EOF failure is translated here into the errors of
``syncd.errors``: a refused or unknown host key is ``HostKeyError``, a refused
key ``AuthenticationError``, anything that a plain retry may cure
``ConnectionLostError``.  Nothing paramiko raises escapes this module.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import pathlib
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _declined(name: str) -> Iterator[None]:
    """``import name`` fails inside the block (unless it is already imported),
    and works again after it."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


# paramiko.config imports invoke (with asyncio and unittest.mock: see
# docs/performance.md, "Importing paramiko") only for ssh_config's "Match
# exec", and paramiko 4 made invoke a dependency.  syncd never reads an
# ssh_config (a mirror's settings come from sync.ini), so invoke is declined
# while paramiko is imported, and only then: paramiko's SSHConfig in this
# process cannot run "Match exec"; anything else may still import invoke.
with _declined("invoke"):
    import paramiko
from paramiko.hostkeys import InvalidHostKey  # noqa: E402
from paramiko.pkey import UnknownKeyType  # noqa: E402
from paramiko.ssh_exception import (  # noqa: E402
    AuthenticationException,
    BadHostKeyException,
    IncompatiblePeer,
    NoValidConnectionsError,
    SSHException,
)

from syncd import gcm  # noqa: E402
from syncd import session as _session  # noqa: E402
from syncd.errors import (  # noqa: E402
    AuthenticationError,
    ConnectionLostError,
    HostKeyError,
    TransportError,
)
from syncd.session import (  # noqa: E402
    _STDERR_SETTLE,
    PREFERRED_CIPHERS,
    RECV_BLOCK,
    MirrorLike,
    _StreamBase,
    _TailBuffer,
)

log = logging.getLogger(__name__)

# The sessions without paramiko live in syncd.session; named here too, so
# that syncd.transport offers every kind of session.
LocalSession = _session.LocalSession
open_openssh_session = _session.open_openssh_session
openssh_error = _session.openssh_error

# A 64 MiB window with 1 MiB packets: paramiko receives at its fastest with
# these, and small packets in a large window halve it (docs/performance.md,
# "SSH transfer rates").
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 1024 * 1024


class _Packetizer(gcm.GcmPacketizer):
    """paramiko's Packetizer (channel data built by syncd.gcm where it may),
    starting no rekey itself.

    paramiko's own rekey every 512 MiB can stall 30 s and fail when it meets
    a channel close (paramiko issue #822).  The server's RekeyLimit still
    rekeys, and paramiko answers that correctly.
    """

    REKEY_BYTES = 1 << 62
    REKEY_PACKETS = 1 << 62


def _transport_factory(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
    """``SSHClient.connect``'s transport: ``kwargs`` are what this paramiko's
    client passes (paramiko 3 and 4 add ``gss_kex`` and ``gss_deleg_creds``)."""
    # paramiko leaves Nagle on: a small packet sent while the one before is
    # unacknowledged then waits for the peer's delayed ACK (40 ms on Linux),
    # twice in the handshake (the auth request, the channel open) and on
    # every small request of a push.  Its own writes are whole packets.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not TCP (a proxy's socketpair): nothing to wait for
    transport = paramiko.Transport(
        sock,
        default_window_size=WINDOW_SIZE,
        default_max_packet_size=MAX_PACKET_SIZE,
        packetizer_class=_Packetizer,
        **kwargs,
    )
    options = transport.get_security_options()
    known = tuple(options.ciphers)
    first = tuple(c for c in PREFERRED_CIPHERS if c in known)
    options.ciphers = first + tuple(c for c in known if c not in first)
    return transport


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Invariant 5: a host key not in known_hosts is refused, never learned."""

    def __init__(self, label: str, known_hosts: pathlib.Path) -> None:
        self.label = label
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key) -> None:
        raise HostKeyError(
            f"{self.label}: host key {key.get_name()} {key.fingerprint} is not in "
            f"{self.known_hosts} (no entry for {hostname}); refusing to connect"
        )


def _label(mirror: MirrorLike) -> str:
    return f"{_user(mirror)}@{mirror.host}:{_port(mirror)}"


def _user(mirror: MirrorLike) -> str:
    return mirror.user or getpass.getuser()


def _port(mirror: MirrorLike) -> int:
    return int(mirror.port or 22)


def open_session(mirror: MirrorLike) -> Session:
    """Connect to ``mirror`` and start its ``remote_command``.

    Raises HostKeyError (unknown or changed key: never retried),
    AuthenticationError, ConnectionLostError (retryable) or TransportError.
    Nothing but the SSH handshake reaches a host whose key is not trusted.
    """
    label = _label(mirror)
    known_hosts = pathlib.Path(mirror.known_hosts or "~/.ssh/known_hosts").expanduser()
    identity, pkey = _load_identity(label, mirror.identity_file)
    client = paramiko.SSHClient()
    # Only the configured file: never ~/.ssh/known_hosts behind the operator's back.
    if known_hosts.exists():
        try:
            client.get_host_keys().load(str(known_hosts))
        except (OSError, SSHException, ValueError, InvalidHostKey) as err:
            raise HostKeyError(f"{label}: cannot read known_hosts {known_hosts}: {err}") from err
    client.set_missing_host_key_policy(_RefuseUnknownHost(label, known_hosts))
    timeout = float(mirror.connect_timeout)
    _connect(client, mirror, label, known_hosts, identity, pkey, timeout)
    transport = client.get_transport()
    try:
        if mirror.keepalive:
            transport.set_keepalive(int(mirror.keepalive))
        channel = transport.open_session(timeout=timeout)
        channel.exec_command(mirror.remote_command)
        # Optional: a link that dies silently (no RST) is otherwise only
        # noticed after TCP gives up, many minutes later.
        io_timeout = getattr(mirror, "io_timeout", None)
        if io_timeout:
            channel.settimeout(float(io_timeout))
    except (OSError, EOFError, SSHException) as err:
        client.close()
        raise ConnectionLostError(
            f"{label}: cannot start {mirror.remote_command!r}: {_describe(err)}"
        ) from None
    log.debug("%s: connected, cipher %s, running %r", label,
              transport.remote_cipher, mirror.remote_command)
    return Session(label, client, transport, channel)


def _load_identity(label: str, identity: "pathlib.Path | str | None") -> tuple[pathlib.Path | None, paramiko.PKey | None]:
    """The identity file's path and key, or (None, None) without one.

    Loaded before connecting so a bad key file is a clear, permanent error,
    not a failed login that looks retryable.
    """
    if identity is None:
        return None, None
    identity = pathlib.Path(identity).expanduser()
    try:
        return identity, paramiko.PKey.from_path(identity)
    except (OSError, ValueError, TypeError, SSHException, UnknownKeyType) as err:
        raise TransportError(
            f"{label}: identity_file {identity} is not a usable private key "
            f"(missing, unreadable, passphrase-protected or unknown type): {err}"
        ) from None


def _connect(client: paramiko.SSHClient, mirror: MirrorLike, label: str, known_hosts: pathlib.Path,
             identity: pathlib.Path | None, pkey: paramiko.PKey | None, timeout: float) -> None:
    """``client.connect``, each of paramiko's failures translated (the client closed)."""
    try:
        client.connect(
            mirror.host,
            port=_port(mirror),
            username=_user(mirror),
            pkey=pkey,
            # An explicit identity means that key only, like IdentitiesOnly.
            allow_agent=pkey is None,
            look_for_keys=pkey is None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            transport_factory=_transport_factory,
        )
    except HostKeyError:
        client.close()
        raise
    except BadHostKeyException as err:
        client.close()
        raise HostKeyError(
            f"{label}: host key {err.key.get_name()} {err.key.fingerprint} differs from "
            f"{err.expected_key.fingerprint} in {known_hosts}; refusing to connect "
            "(changed host key)"
        ) from None
    except AuthenticationException as err:
        client.close()
        how = f"identity_file {identity}" if identity else "ssh-agent and default keys"
        raise AuthenticationError(f"{label}: authentication refused ({how}): {err}") from None
    except IncompatiblePeer as err:
        client.close()
        raise TransportError(f"{label}: no common SSH algorithms: {err}") from None
    except SSHException as err:
        transport = client.get_transport()
        keys_exhausted = (transport is not None and transport.is_active()
                          and not transport.is_authenticated()
                          and "authentication methods" in str(err))
        client.close()
        if keys_exhausted:
            # Not an AuthenticationException in paramiko, but the same answer.
            raise AuthenticationError(
                f"{label}: no key to offer (no identity_file, no ssh-agent, no ~/.ssh/id_*)"
            ) from None
        raise ConnectionLostError(f"{label}: cannot connect: {_describe(err)}") from None
    except (NoValidConnectionsError, socket.gaierror, OSError, EOFError) as err:
        client.close()
        raise ConnectionLostError(f"{label}: cannot connect: {_describe(err)}") from None
    except BaseException:
        client.close()
        raise


def _describe(err: BaseException) -> str:
    if isinstance(err, socket.timeout):
        return "timed out (no progress within the timeout)"
    text = str(err) or type(err).__name__
    return text


class Session(_StreamBase):
    """A remote command's stdin/stdout as a byte stream, over one SSH channel.

    One thread may send while another receives; each direction is meant for
    one thread at a time.  The remote's stderr is drained by a background
    thread into a bounded tail, so a chatty agent never stalls the channel.
    """

    def __init__(self, label: str, client: paramiko.SSHClient,
                 transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        self.label = label
        self._client = client
        self._transport = transport
        self._channel = channel
        packetizer = transport.packetizer
        self._fast = isinstance(packetizer, gcm.GcmPacketizer) and packetizer.fast
        self._stderr = _TailBuffer()
        self._closed = False
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name=f"stderr {label}", daemon=True
        )
        self._stderr_thread.start()

    @property
    def cipher(self) -> str:
        return self._transport.local_cipher

    def _drain_stderr(self) -> None:
        try:
            while data := self._channel.recv_stderr(65536):
                self._stderr.add(data)
        except (OSError, EOFError, SSHException):
            pass

    def _lost(self, what: str, err: BaseException | None = None) -> ConnectionLostError:
        detail = f": {_describe(err)}" if err is not None else ""
        return ConnectionLostError(f"{self.label}: connection lost while {what}{detail}"
                                   + self._stderr_hint())

    def send_all(self, buf: bytes | bytearray | memoryview) -> None:
        """Send all of ``buf``; ConnectionLostError if the peer or link goes away."""
        view = memoryview(buf).cast("B")
        try:
            while view:
                sent = self._send_packet(view)
                if sent == 0:
                    raise self._lost("sending (remote closed its input)")
                view = view[sent:]
        except ConnectionLostError:
            raise
        except (OSError, EOFError, SSHException) as err:
            raise self._lost("sending", err) from None
        # paramiko drops packets silently once the transport has died.
        if not self._transport.is_active():
            raise self._lost("sending")

    def _send_packet(self, view: memoryview) -> int:
        """One packet of ``view`` (as much as the window and the packet size
        allow); the bytes sent, 0 once the channel has ended."""
        if self._fast:
            return gcm.send_channel_data(self._transport, self._channel, view)
        return self._channel.send(view)

    def recv(self, n: int = RECV_BLOCK) -> bytes:
        """Up to ``n`` bytes; b'' only at the remote's real end of output."""
        try:
            data = self._channel.recv(n)
        except (OSError, EOFError, SSHException) as err:
            raise self._lost("receiving", err) from None
        if not data and not self._channel.eof_received:
            # A channel closed without the remote's EOF: the link died.
            raise self._lost("receiving")
        return data

    def close_write(self) -> None:
        """Tell the remote command its stdin has ended."""
        try:
            self._channel.shutdown_write()
        except (OSError, EOFError, SSHException) as err:
            raise self._lost("closing the write side", err) from None

    def exit_status(self, timeout: float | None = None) -> int:
        """The remote command's exit status (-1 when killed by a signal)."""
        if not self._channel.status_event.wait(timeout):
            if not self._transport.is_active():
                raise self._lost("waiting for the exit status")
            raise ConnectionLostError(
                f"{self.label}: no exit status within {timeout} s" + self._stderr_hint()
            )
        status = self._channel.exit_status
        if status == -1 and not self._transport.is_active():
            # The channel was closed by the link dying, not by an exit.
            raise self._lost("waiting for the exit status")
        # The command is gone: let the drain catch up so stderr_tail() is whole.
        self._stderr_thread.join(_STDERR_SETTLE)
        return status

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._channel.close()
        except (OSError, EOFError, SSHException):
            pass
        # paramiko's transport thread polls its socket every 0.1 s for the
        # stop flag; ending the socket first lets it go at once (the channel
        # close above is already in the kernel's send buffer).
        try:
            self._transport.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self._client.close()
        self._stderr_thread.join(5)
