"""The unit files: what systemd itself says of them, and what they point at."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "systemd").glob("*.service")) + sorted((REPO / "systemd").glob("*.timer"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path, unit: str) -> None:
    """``systemd-analyze verify`` prints nothing: no unknown key, no bad value.
    It checks that ExecStart's program exists, so the copies name this
    checkout's syncd where the installed units name /usr/bin/syncd."""
    syncd = Path(sys.executable).parent / "syncd"
    assert syncd.exists(), syncd
    for u in UNITS:
        (tmp_path / u.name).write_text(u.read_text().replace("/usr/bin/syncd", str(syncd)))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / unit)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_documentation_names_what_the_install_steps_install(unit: str) -> None:
    text = (REPO / "systemd" / unit).read_text()
    docs = [d for line in re.findall(r"(?m)^Documentation=(.*)$", text) for d in line.split()]
    if unit.endswith(".timer") and not docs:
        return  # its service documents it
    assert docs, f"{unit}: no Documentation="
    readme = (REPO / "README.md").read_text()
    for doc in docs:
        m = re.fullmatch(r"file:///usr/share/doc/syncd/(.+)", doc)
        assert m, f"{unit}: {doc}: only the installed doc directory exists offline"
        assert (REPO / m.group(1)).is_file(), doc
        # The README's install steps put it there.
        assert re.search(rf"install .*{re.escape(m.group(1))}.* /usr/share/doc/syncd/", readme), doc


def test_the_daemon_unit_needs_no_v() -> None:
    """The daemon logs its scans and pushes at its default level: the unit
    runs it without -v."""
    (execstart,) = re.findall(r"(?m)^ExecStart=(.*)$", (REPO / "systemd/syncd.service").read_text())
    assert execstart.split() == ["/usr/bin/syncd", "run"]
