"""A real OpenSSH sshd on 127.0.0.1 for tests, benchmarks and the demo.

Owns everything a throwaway sshd needs: host and client keys made with
ssh-keygen, ``authorized_keys``, ``sshd_config``, ``known_hosts``, the process
and its teardown by PID.  Usable two ways:

* as a pytest plugin (``pytest_plugins = ["tests.sshd"]``): fixtures ``sshd``
  (one per session), ``sshd_factory`` (servers with their own options, stopped
  after the test);
* as a plain module: ``start_sshd(workdir) -> SshServer``; call ``stop()``.
"""

from __future__ import annotations

import getpass
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import types
from dataclasses import dataclass, field

try:
    import pytest
except ImportError:  # a script calling start_sshd() without the test extras
    pytest = None

log = logging.getLogger(__name__)

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/usr/bin:/sbin") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
HOST = "127.0.0.1"


def _keygen(path: pathlib.Path, kind: str = "ed25519", comment: str = "syncd-test") -> pathlib.Path:
    """A passphrase-less key pair at ``path`` / ``path.pub``."""
    if not path.exists():
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _public_key(path: pathlib.Path) -> str:
    """'type base64' of a .pub file, comment dropped."""
    kind, blob = pathlib.Path(f"{path}.pub").read_text().split()[:2]
    return f"{kind} {blob}"


@dataclass
class SshServer:
    """A running sshd and the client-side files that reach it."""

    host: str
    port: int
    user: str
    identity_file: pathlib.Path
    known_hosts: pathlib.Path
    workdir: pathlib.Path
    config_file: pathlib.Path
    log_file: pathlib.Path
    host_keys: list[pathlib.Path]
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def host_pattern(self) -> str:
        return f"[{self.host}]:{self.port}" if self.port != 22 else self.host

    def known_hosts_line(self, key: pathlib.Path) -> str:
        return f"{self.host_pattern} {_public_key(key)}\n"

    def wrong_known_hosts(self, path: pathlib.Path | None = None) -> pathlib.Path:
        """A known_hosts naming this host with a key it does not have.

        Same key type as the server's preferred host key (ed25519), so a client
        sees a *changed* key, not merely an unknown type.
        """
        other = _keygen(self.workdir / "impostor_host_ed25519")
        path = path or self.workdir / "known_hosts.wrong"
        path.write_text(self.known_hosts_line(other))
        return path

    def empty_known_hosts(self, path: pathlib.Path | None = None) -> pathlib.Path:
        path = path or self.workdir / "known_hosts.empty"
        path.write_text("")
        return path

    def other_client_key(self) -> pathlib.Path:
        """A client key that is not in authorized_keys."""
        return _keygen(self.workdir / "stranger_ed25519")

    def known_hosts_for(self, port: int) -> pathlib.Path:
        """A known_hosts trusting this server's keys when reached on ``port``
        (a relay in front of it)."""
        path = self.workdir / f"known_hosts.{port}"
        pattern = f"[{self.host}]:{port}"
        path.write_text("".join(f"{pattern} {_public_key(k)}\n" for k in self.host_keys))
        return path

    def mirror_via(self, port: int, remote_command: str = "cat", **overrides) -> types.SimpleNamespace:
        """A mirror reaching this server through a relay listening on ``port``."""
        overrides.setdefault("known_hosts", self.known_hosts_for(port))
        return self.mirror(remote_command, port=port, **overrides)

    def mirror(self, remote_command: str = "cat", **overrides) -> types.SimpleNamespace:
        """A duck-typed mirror for ``syncd.transport.open_session``."""
        attrs = dict(
            name="test-mirror",
            host=self.host,
            port=self.port,
            user=self.user,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            remote_command=remote_command,
            connect_timeout=10.0,
            keepalive=15,
        )
        attrs.update(overrides)
        return types.SimpleNamespace(**attrs)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        # sshd -D is the listener; sessions it forked end with their connections.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> SshServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_config(workdir: pathlib.Path, port: int, host_keys: list[pathlib.Path],
                  authorized_keys: pathlib.Path, rekey_limit: str | None,
                  extra: list[str]) -> pathlib.Path:
    lines = [
        f"ListenAddress {HOST}",
        f"Port {port}",
        f"PidFile {workdir / 'sshd.pid'}",
        *(f"HostKey {k}" for k in host_keys),
        f"AuthorizedKeysFile {authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # CI runs the suite as root.
        "PermitRootLogin prohibit-password",
        # The temp dir's modes are not sshd's business in a test.
        "StrictModes no",
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel DEBUG1",
        # Parallel streams and quick reconnect tests must not hit the defaults.
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "ClientAliveInterval 0",
    ]
    if os.environ.get("PYTHONPATH"):
        # sshd gives a session a fresh environment: without this, the agent
        # of a checkout run by PYTHONPATH (a worktree) would be the copy
        # installed in the venv.
        lines.append(f"SetEnv PYTHONPATH={os.environ['PYTHONPATH']}")
    if rekey_limit:
        lines.append(f"RekeyLimit {rekey_limit}")
    lines += extra
    path = workdir / "sshd_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_listening(proc: subprocess.Popen, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                # A banner means sshd itself answers, not some other listener.
                s.settimeout(2)
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_sshd(workdir: str | os.PathLike | None = None, *, rekey_limit: str | None = None,
               extra_config: list[str] | None = None, timeout: float = 20.0) -> SshServer:
    """Start sshd on a free 127.0.0.1 port with fresh keys under ``workdir``.

    ``rekey_limit`` is sshd's RekeyLimit value (e.g. ``"1M"``), so tests can
    make the server rekey in the middle of a transfer.
    """
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="syncd-sshd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Privilege separation needs this directory; a fresh CI machine may lack it.
    pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_keys = [
        _keygen(workdir / "ssh_host_ed25519_key", "ed25519"),
        _keygen(workdir / "ssh_host_ecdsa_key", "ecdsa"),
    ]
    identity = _keygen(workdir / "client_ed25519")
    authorized = workdir / "authorized_keys"
    authorized.write_text(_public_key(identity) + "\n")
    os.chmod(authorized, 0o600)
    log_file = workdir / "sshd.log"

    last_error = ""
    for _attempt in range(5):
        # Another process may grab the port between probing and binding: retry.
        port = _free_port()
        config = _write_config(workdir, port, host_keys, authorized, rekey_limit, extra_config or [])
        with open(log_file, "ab") as logf:
            proc = subprocess.Popen(
                [SSHD, "-D", "-E", str(log_file), "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        if _wait_listening(proc, port, time.monotonic() + timeout):
            break
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last_error = log_file.read_text(errors="replace")[-2000:]
    else:
        raise RuntimeError(f"sshd did not start; log tail:\n{last_error}")

    server = SshServer(
        host=HOST,
        port=port,
        user=getpass.getuser(),
        identity_file=identity,
        known_hosts=workdir / "known_hosts",
        workdir=workdir,
        config_file=config,
        log_file=log_file,
        host_keys=host_keys,
        process=proc,
    )
    server.known_hosts.write_text("".join(server.known_hosts_line(k) for k in host_keys))
    log.debug("sshd pid %d listening on %s:%d", proc.pid, HOST, port)
    return server


def _fixture(*args, **kwargs):
    return pytest.fixture(*args, **kwargs) if pytest else (lambda f: f)


@_fixture(scope="session")
def sshd(tmp_path_factory) -> SshServer:
    """One sshd for the whole test session (default options)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@_fixture()
def sshd_factory(tmp_path_factory):
    """``make(**start_sshd_options) -> SshServer``; all stopped after the test."""
    started: list[SshServer] = []

    def make(**options) -> SshServer:
        server = start_sshd(tmp_path_factory.mktemp("sshd"), **options)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()
