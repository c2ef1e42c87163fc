"""Nodes for tests, benchmarks and the demo: a root, a state_dir and a sync.ini each.

A primary lists its downstreams as ``[mirror:NAME]`` over a real sshd on
127.0.0.1; the downstream's agent is this checkout's ``syncd agent`` run by
sshd through ``remote_command``, exactly as in production.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYNCD = [sys.executable, "-m", "syncd"]


@dataclass
class Node:
    name: str
    base: Path
    mirrors: list[tuple["Node", dict[str, Any]]] = field(default_factory=list)
    node_keys: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def ini(self) -> Path:
        return self.base / "sync.ini"

    def agent_command(self) -> str:
        return " ".join(shlex.quote(x) for x in SYNCD + ["agent", "--config", str(self.ini)])

    def wait_agent_ended(self, timeout: float = 30.0) -> None:
        """Wait until no agent of this node runs any more (see wait_agents_ended)."""
        wait_agents_ended(self.ini, timeout)

    def write(self, ssh: Any = None, port: int | None = None, known_hosts: Path | None = None) -> Path:
        lines = ["[node]", f"name = {self.name}", f"root = {self.root}", f"state_dir = {self.state}"]
        lines += [f"{k} = {v}" for k, v in self.node_keys.items()]
        for down, keys in self.mirrors:
            values = {
                "host": ssh.host,
                "port": port or ssh.port,
                "user": ssh.user,
                "identity_file": ssh.identity_file,
                "known_hosts": known_hosts or ssh.known_hosts,
                "remote_command": down.agent_command(),
                "retry_delay": "0.05",
            }
            values.update(keys)  # a test's own keys win (a dead port, a via, ...)
            lines += ["", f"[mirror:{down.name}]"] + [f"{k} = {v}" for k, v in values.items()]
        self.ini.write_text("\n".join(lines) + "\n")
        return self.ini


def wait_until(check, timeout: float = 30, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def agents_running(ini: Path) -> list[int]:
    """PIDs of the ``syncd agent`` processes (``--stage`` ones too) run with
    ``--config ini``: sshd's children, seen through /proc."""
    want = os.fsencode(ini)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"agent" in argv and want in argv:
            pids.append(int(entry.name))
    return pids


def wait_agents_ended(ini: Path, timeout: float = 30.0) -> None:
    """Wait until the agents run with ``--config ini`` have exited.

    A push that failed, or a killed prewarm, returns as soon as the upstream
    dropped its sessions; the agent then winds down on its own a moment later
    (takes back the new, still empty directories it made for the push, turns
    an unfinished run into a partial file, releases its lock).  A test that
    looks at the node meanwhile would race with it.
    """
    wait_until(lambda: not agents_running(ini), timeout, f"the agents of {ini} to exit")


def make_node(base: Path, name: str, **node_keys: str) -> Node:
    node = Node(name, base / name, node_keys=dict(node_keys))
    node.root.mkdir(parents=True)
    return node


def tree_listing(root: Path) -> dict[str, tuple]:
    """What a client reading the tree sees: kinds, modes, mtimes, contents."""
    out: dict[str, tuple] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, rootb).decode("utf-8", "backslashreplace")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(full, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, digest)
    return out


def rsync_differences(primary: Path, mirror: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """What rsync itself would change to make ``mirror`` equal ``primary``.

    ``rsync -rlptHSnci --delete``: an itemized dry run comparing contents by
    checksum, modes, file, directory and symlink times, hard links and
    sparse files, exactly as mirror operators audit a mirror.  ``exclude``
    names paths the mirror owns itself (its trace file), as rsync patterns.
    """
    argv = ["rsync", "-rlptHSnci", "--delete"] + [f"--exclude={p}" for p in exclude]
    proc = subprocess.run(argv + [f"{primary}/", f"{mirror}/"], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(errors="backslashreplace").splitlines()


def assert_same_tree(primary: Path, mirror: Path, exclude: tuple[str, ...] = ()) -> None:
    """``mirror`` equals ``primary`` as rsync sees it: the oracle prints nothing."""
    diff = rsync_differences(primary, mirror, exclude)
    assert not diff, f"rsync -rlptHSnci --delete {primary}/ {mirror}/ would change:\n" + "\n".join(diff[:60])
