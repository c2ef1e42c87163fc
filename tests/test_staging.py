"""The staging directory's cleanup (syncd.staging.clean), which the push agent
and the prewarm stagers share: a dead writer's files go, a live one's stay."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from syncd.staging import VerifiedLog, alive, boot_id, clean, staged_objects, verified_this_boot

DEAD = 999_999_999  # above any pid_max: no such process
HEX = "ab" * 32
HEX2 = "cd" * 32


def _fill(staging: Path, names: list[str]) -> None:
    for name in names:
        (staging / name).write_bytes(b"x")


def _left(staging: Path) -> set[str]:
    return {p.name for p in staging.iterdir()}


def _clean(staging: Path, **kw: bool) -> None:
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        clean(fd, **kw)
    finally:
        os.close(fd)


def test_a_dead_writers_files_go_and_its_runs_become_partial_files(tmp_path: Path) -> None:
    (tmp_path / f"run.{DEAD}.{HEX}").write_bytes(b"\0" * 10)
    (tmp_path / f"run.{DEAD}.{HEX}.ranges").write_bytes(b"0 4\n")
    _fill(tmp_path, [f"tmp.{DEAD}.1", f"stage.{DEAD}.2", f"trash.{DEAD}.3", f"tmp.{DEAD}.seen",
                     f"run.{DEAD}.{HEX2}.ranges", HEX2])
    _clean(tmp_path)
    # The run's records go with it; the records of a run that is gone serve nothing.
    assert _left(tmp_path) == {f"partial.{HEX}", f"partial.{HEX}.ranges", HEX2}
    assert (tmp_path / f"partial.{HEX}.ranges").read_bytes() == b"0 4\n"


def test_a_live_writers_files_stay(tmp_path: Path) -> None:
    live = os.getppid()
    names = [f"tmp.{live}.1", f"stage.{live}.2", f"trash.{live}.3", f"run.{live}.{HEX}",
             f"run.{live}.{HEX}.ranges"]
    _fill(tmp_path, names)
    _clean(tmp_path)
    _clean(tmp_path, stale=True)
    assert _left(tmp_path) == set(names)


def test_a_zombie_writes_nothing_any_more(tmp_path: Path) -> None:
    # A killed agent stays a zombie until sshd reaps it: its files are a dead writer's.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(child.pid)
        _fill(tmp_path, [f"tmp.{child.pid}.1", f"stage.{child.pid}.1"])
        _clean(tmp_path)
        assert _left(tmp_path) == set()
    finally:
        child.wait()


def test_own_files_stay_until_everything_goes_but_the_trash(tmp_path: Path) -> None:
    me = os.getpid()
    _fill(tmp_path, [f"tmp.{me}.1", f"trash.{me}.2", HEX])
    _clean(tmp_path, stale=True)
    assert _left(tmp_path) == {f"tmp.{me}.1", f"trash.{me}.2", HEX}
    _clean(tmp_path, everything=True)
    assert _left(tmp_path) == {f"trash.{me}.2"}  # freed by its owner after the commit


def test_stale_logs_and_partial_files_go_only_when_asked(tmp_path: Path) -> None:
    old_boot = "verified." + "0" * 32
    this_boot = "verified." + boot_id()
    _fill(tmp_path, [old_boot, this_boot, f"partial.{HEX}", f"partial.{HEX2}", HEX, "odd-name"])
    days_ago = time.time() - 3 * 24 * 3600
    os.utime(tmp_path / f"partial.{HEX2}", (days_ago, days_ago))
    _clean(tmp_path)  # a stager: dead writers only
    assert len(_left(tmp_path)) == 6
    _clean(tmp_path, stale=True)  # an agent starting
    assert _left(tmp_path) == {this_boot, f"partial.{HEX}", HEX, "odd-name"}
    _clean(tmp_path, everything=True)  # an agent after its commit: young partial files stay
    assert _left(tmp_path) == {f"partial.{HEX}"}


def test_staged_objects_are_the_files_named_by_a_sha256(tmp_path: Path) -> None:
    _fill(tmp_path, [HEX, f"tmp.{DEAD}.1", "x" * 63])
    (tmp_path / HEX2).mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert staged_objects(fd) == {HEX}
    finally:
        os.close(fd)


def test_verified_log_is_per_boot_and_ignores_torn_lines(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert verified_this_boot(fd) == set()
        log = VerifiedLog(fd)
        log.add("a" * 64)
        log.add("b" * 64)
        log.close()
        with open(tmp_path / f"verified.{boot_id()}", "ab") as fh:
            fh.write(b"c" * 30)  # a torn last line (a killed writer)
        # Another boot's log says nothing about this one.
        (tmp_path / ("verified." + "0" * 32)).write_bytes(b"d" * 64 + b"\n")
        assert verified_this_boot(fd) == {"a" * 64, "b" * 64}
    finally:
        os.close(fd)
