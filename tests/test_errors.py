"""Errors across the wire: an agent's error keeps its class, so whether the
pusher retries it is the class's ``retryable``, as for a local error."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from syncd import config as configmod
from syncd import errors
from syncd.errors import WIRE_KINDS, RemoteError, SyncdError, error_from_wire
from syncd.lock import StateLock
from syncd.manifest import Manifest
from syncd.push import push_with_retries
from syncd.scan import scan
from tests.nodes import assert_same_tree, make_node, tree_listing

pytest_plugins = ["tests.sshd"]


def _family(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _family(sub)
    return out


def test_every_error_class_round_trips_through_its_kind() -> None:
    classes = _family(SyncdError)
    # Every class defined in syncd.errors: a new one must be given a kind.
    defined = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, SyncdError)]
    assert set(defined) <= set(classes)
    for cls in classes:
        sent = cls("disk is on fire")
        # What the agent sends (agent.py, prewarm/stager.py: _send_error).
        wire = {"type": "error", "kind": type(sent).__name__, "message": str(sent)}
        got = error_from_wire(wire)
        assert type(got) is cls, cls
        assert (got.retryable, got.exit_status) == (sent.retryable, sent.exit_status)
        assert str(got) == "agent: disk is on fire"
    assert set(WIRE_KINDS.values()) == set(classes)


@given(kind=st.one_of(st.none(), st.integers(), st.text(), st.lists(st.text())), message=st.text())
def test_a_kind_not_known_is_a_remote_error_with_the_agents_text(kind, message) -> None:  # noqa: ANN001
    wire = {"type": "error", "message": message}
    if kind is not None:
        wire["kind"] = kind
    got = error_from_wire(wire)
    if not (isinstance(kind, str) and kind in WIRE_KINDS):
        assert type(got) is RemoteError and not got.retryable
    assert str(got) == f"agent: {message}"


# An agent run by sshd exactly as in production (syncd.cli.main), but for a
# fault: its first attempt at the node's lock (at ``begin``) raises KIND.
_FAULTY_AGENT = """
import sys
from pathlib import Path

from syncd import errors, lock
from syncd.cli import main

kind, marker = sys.argv[1], Path(sys.argv[2])
real_acquire = lock.StateLock.acquire

def acquire(self):
    if self.purpose == "agent" and not marker.exists():
        marker.touch()
        raise getattr(errors, kind)("injected at the lock")
    return real_acquire(self)

lock.StateLock.acquire = acquire
sys.exit(main(sys.argv[3:]))
"""

# The agent's own lock wait, short: another push holds its lock.
_IMPATIENT_AGENT = """
import sys

from syncd.agent import session as agent
from syncd.cli import main

agent.AGENT_LOCK_WAIT = 0.2
sys.exit(main(sys.argv[1:]))
"""


def _push_through(tmp_path: Path, sshd, script: str, *args: str):  # noqa: ANN001, ANN202
    """Push a small tree to an edge whose remote_command runs ``script``."""
    primary = make_node(tmp_path, "primary")
    edge = make_node(tmp_path, "edge")
    (tmp_path / "agent.py").write_text(script)
    argv = [sys.executable, str(tmp_path / "agent.py"), *args, "agent", "--config", str(edge.ini)]
    primary.mirrors.append((edge, {"remote_command": " ".join(shlex.quote(a) for a in argv), "retries": "3"}))
    edge.write()
    primary.write(sshd)
    (primary.root / "pool").mkdir()
    (primary.root / "pool" / "a.deb").write_bytes(os.urandom(5000))
    (primary.root / "README").write_text("a mirror\n")
    cfg = configmod.load(primary.ini)
    try:
        with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
            scan(cfg.node.root, m)
            return primary, edge, push_with_retries(cfg, cfg.mirrors[0], m)
    finally:
        edge.wait_agent_ended()


def test_a_retryable_error_from_the_agent_is_retried(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    marker = tmp_path / "faulted"
    primary, edge, result = _push_through(tmp_path, sshd, _FAULTY_AGENT, "ConnectionLostError", str(marker))
    assert marker.exists()  # the first session failed, by the agent's word
    assert result.ok and result.attempts == 2, result.error
    assert tree_listing(primary.root) == tree_listing(edge.root)
    assert_same_tree(primary.root, edge.root)


def test_the_agents_lock_timeout_is_final(tmp_path: Path, sshd) -> None:  # noqa: ANN001
    edge_state = tmp_path / "edge" / "state"
    edge_state.mkdir(parents=True)
    with StateLock(edge_state, "another push"):
        _, edge, result = _push_through(tmp_path, sshd, _IMPATIENT_AGENT)
    assert not result.ok and result.attempts == 1
    assert result.error.startswith("agent: ") and f"locked by PID {os.getpid()}" in result.error
    assert not (edge.root / "pool").exists()
