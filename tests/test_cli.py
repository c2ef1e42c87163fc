"""The command line as rsync users type it: options before or after the
command, -v/-q, --full, -i's legend, and each error said once."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from syncd import logs
from syncd.cli import build_parser, main
from syncd.errors import EXIT_CONFIG, EXIT_FAILURE
from tests.nodes import SYNCD, assert_same_tree, make_node
from tests.relay import Relay
from tests.test_push import Pair, populate

pytest_plugins = ["tests.sshd"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(SYNCD + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_c_v_q_before_or_after_the_command(tmp_path: Path) -> None:
    node = make_node(tmp_path, "edge")
    node.write()
    other = make_node(tmp_path, "other")
    other.write()
    assert run("-c", str(node.ini), "scan", "-q").returncode == 0
    for argv in (["status", "-c", str(node.ini)], ["-c", str(node.ini), "status"],
                 ["status", "--config", str(node.ini), "--json"], ["-v", "status", "-q", "-c", str(node.ini)]):
        proc = run(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert "edge" in proc.stdout, argv
    # After the command wins over before it, as a later option does.
    proc = run("-c", str(other.ini), "status", "-c", str(node.ini))
    assert proc.returncode == 0 and proc.stdout.startswith("node edge:"), proc.stdout + proc.stderr
    # $SYNCD_CONFIG when neither is given.
    proc = run("status", env={**os.environ, "SYNCD_CONFIG": str(node.ini)})
    assert proc.stdout.startswith("node edge:"), proc.stderr


@pytest.mark.parametrize(("argv", "level"), [
    ([], logging.WARNING),
    (["-v"], logging.INFO),
    (["-v", "@", "-v"], logging.DEBUG),  # -v before and after the command add up
    (["@", "-vv"], logging.DEBUG),
    (["@", "-q"], logging.ERROR),
    (["-qqq"], logging.ERROR),  # errors are never hidden
    (["-vv", "@", "-q"], logging.INFO),
])
def test_v_and_q_move_the_level(tmp_path: Path, argv: list[str], level: int) -> None:
    node = make_node(tmp_path, "edge")
    node.write()
    at = argv.index("@") if "@" in argv else len(argv)
    full = argv[:at] + ["-c", str(node.ini), "scan"] + argv[at + 1:]
    try:
        assert main(full) == 0
        assert logging.getLogger("syncd").level == level
    finally:
        logs.setup(logging.WARNING)


def test_level_for() -> None:
    assert logs.level_for("info", 0) == logging.INFO
    assert logs.level_for("info", 1) == logging.DEBUG
    assert logs.level_for("info", -1) == logging.WARNING
    assert logs.level_for("debug", 5) == logging.DEBUG
    assert logs.level_for("error", -3) == logging.ERROR


def test_daemon_only_options_and_itemize_legend(tmp_path: Path) -> None:
    node = make_node(tmp_path, "edge")
    node.write()
    for flag in ("--full", "-i", "--dry-run"):
        proc = run("-c", str(node.ini), "run", flag)
        assert proc.returncode == EXIT_CONFIG
        assert proc.stderr.strip().endswith("--dry-run, --force-deletes, --full, --mirror and -i go with --once")
        assert len(proc.stderr.strip().splitlines()) == 1
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for legend in (">f+++++++++ new file", ">f.st...... changed file", "cd+++++++++ new directory",
                   "*deleting", "cL+++++++++ new symlink", ".f...p..... mode only"):
        assert legend in text, legend


def test_a_failed_push_is_said_once(pair: Pair) -> None:
    """run --once reports a failed push on stdout; its log does not say it again."""
    populate(pair.primary.root)
    with Relay("127.0.0.1", 1) as dead:
        port = dead.port
    pair.rewrite(port=port)
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    both = proc.stdout + proc.stderr
    assert both.count("FAILED after 3 attempt(s)") == 1, both
    # (ssh's own label, "user@host:port", is said once in the message too)
    assert both.count(f"127.0.0.1:{port}: cannot connect") == 3, both  # the two retries' warnings and the report


def test_full_comparison_on_demand(pair: Pair) -> None:
    """run --once --full compares every path: drift no generation lists (a
    file added on the edge by hand) goes, as the scheduled reconcile does."""
    populate(pair.primary.root)
    assert pair.cli("run", "--once").returncode == 0
    (pair.edge.root / "stray").write_text("not the primary's")
    proc = pair.cli("run", "--once")
    assert proc.returncode == 0 and "(full comparison)" not in proc.stdout
    assert (pair.edge.root / "stray").exists()  # an incremental push lists only changes
    proc = pair.cli("run", "--once", "--full", "-i")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(full comparison)" in proc.stdout
    assert "edge: *deleting   stray" in proc.stdout.splitlines()
    assert not (pair.edge.root / "stray").exists()
    assert_same_tree(pair.primary.root, pair.edge.root)


@pytest.fixture
def pair(tmp_path: Path, sshd) -> Pair:  # noqa: ANN001
    return Pair(tmp_path, sshd)
