"""sd_notify without systemd: a datagram socket the test binds stands in for it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from syncd import notify


@pytest.fixture()
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status(listener: socket.socket) -> None:
    assert notify.ready("watching /srv/mirror") is True
    assert received(listener) == ["READY=1", "STATUS=watching /srv/mirror"]


def test_each_helper_sends_its_assignment(listener: socket.socket) -> None:
    assert notify.watchdog()
    assert received(listener) == ["WATCHDOG=1"]
    assert notify.stopping()
    assert received(listener) == ["STOPPING=1"]
    assert notify.status("pushing generation 7\nto tier1")
    assert received(listener) == ["STATUS=pushing generation 7 to tier1"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    got = received(listener)
    assert got[0] == "RELOADING=1"
    key, value = got[1].split("=")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"syncd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert received(sock) == ["READY=1"]


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False


def test_a_gone_socket_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.status("x") is False


def test_malformed_assignment_is_refused(listener: socket.socket) -> None:
    with pytest.raises(ValueError):
        notify.notify("READY")
    with pytest.raises(ValueError):
        notify.notify("STATUS=a\nREADY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 30.0
    # Meant for another process (our parent): not ours to ping.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert notify.watchdog_interval() is None


def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The daemon's main loop calls notify(); a full queue must not stop it."""
    import socket as socketmod
    import threading

    from syncd import notify

    path = tmp_path / "notify.sock"
    receiver = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    done = threading.Event()

    def flood() -> None:
        for i in range(5000):  # far more than an unread datagram queue holds
            notify.status(f"generation {i}")
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(20), "notify() blocked on a receiver that does not read"
    receiver.close()
