"""``syncd verify [--repair]``: findings on a node's own tree, and their repair
by the upstream's next push."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncd.errors import EXIT_FAILURE
from syncd.manifest import META_REPAIR
from tests.gpgkeys import COMPONENT, SUITE, Keys, build_release, keys  # noqa: F401
from tests.test_verified_publish import Pair

pytest_plugins = ["tests.sshd"]


@pytest.fixture
def pair(tmp_path: Path, sshd, keys: Keys) -> Pair:  # noqa: ANN001, F811
    p = Pair(tmp_path, sshd, keys)
    build_release(p.primary.root, keys, 1, pool={f"p/pkg{i}.deb": 100_000 for i in range(4)})
    (p.primary.root / "README").write_text("a mirror\n")
    r = p.push()
    assert r.ok, r.error
    return p


def finding_lines(out: str) -> set[tuple[str, str]]:
    """(path, kind) from verify's one line per finding."""
    found = set()
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("hash_mismatch", "missing_file", "index_mismatch", "bad_signature"):
            found.add((rest.strip().split(":")[0], kind))
    return found


def test_clean_mirror_and_primary_verify(pair: Pair) -> None:
    proc = pair.cli("verify", node=pair.edge)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.splitlines()[-1]
    assert "mirror of primary" in last and "with signatures" in last and last.endswith(": 0 finding(s)")
    proc = pair.cli("verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(primary)" in proc.stdout


def test_findings_on_a_mirror_are_repaired_by_the_next_push(pair: Pair) -> None:
    e = pair.edge.root
    flipped, truncated, missing = (f"pool/main/p/pkg{i}.deb" for i in range(3))
    # Bit rot: one byte flipped, size and mtime as they were.
    st = os.stat(e / flipped)
    with open(e / flipped, "r+b") as fh:
        fh.seek(50_000)
        b = fh.read(1)
        fh.seek(50_000)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(e / flipped, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.truncate(e / truncated, 1000)
    os.unlink(e / missing)
    (e / "README").write_text("edited by hand\n")
    proc = pair.cli("verify", node=pair.edge)
    assert proc.returncode == EXIT_FAILURE
    assert finding_lines(proc.stdout) == {
        (flipped, "hash_mismatch"), (truncated, "hash_mismatch"), (missing, "missing_file"),
        ("README", "hash_mismatch"),
    }
    assert proc.stdout.splitlines()[-2].endswith(": 4 finding(s)")
    assert "verify --repair" in proc.stdout
    assert pair.edge_meta(META_REPAIR) is None  # without --repair: report only

    proc = pair.cli("verify", "--repair", node=pair.edge)
    assert proc.returncode == EXIT_FAILURE
    assert "4 file(s) marked; primary repairs them on its next push" in proc.stdout
    assert pair.edge_meta(META_REPAIR) is not None

    # Nothing changed on the primary: the edge's handshake asks for repair.
    r = pair.push()
    assert r.ok, r.error
    assert r.full and r.files_sent == 4
    assert pair.in_sync()
    assert pair.edge_meta(META_REPAIR) is None
    proc = pair.cli("verify", node=pair.edge)
    assert proc.returncode == 0, proc.stdout


def test_signature_and_chain_findings(pair: Pair) -> None:
    e = pair.edge.root
    packages = e / SUITE / COMPONENT / "Packages"
    packages.write_bytes(packages.read_bytes() + b"\nPackage: planted\n")
    inrelease = e / SUITE / "InRelease"
    inrelease.write_bytes(inrelease.read_bytes().replace(b"Suite: stable", b"Suite: stale"))
    proc = pair.cli("verify", node=pair.edge)
    assert proc.returncode == EXIT_FAILURE
    found = finding_lines(proc.stdout)
    assert (f"{SUITE}/InRelease", "bad_signature") in found  # the edited text no longer matches its signature
    assert (f"{SUITE}/{COMPONENT}/Packages", "index_mismatch") in found  # nor Packages the Release
    assert (f"{SUITE}/{COMPONENT}/Packages", "hash_mismatch") in found


def test_repair_on_a_primary_only_reports(pair: Pair) -> None:
    os.unlink(pair.primary.root / "README")
    proc = pair.cli("verify", "--repair")
    assert proc.returncode == EXIT_FAILURE
    assert finding_lines(proc.stdout) == {("README", "missing_file")}
    assert "nothing upstream to repair from" in proc.stdout


def test_verify_section_keys(tmp_path: Path, keys: Keys) -> None:  # noqa: F811
    from syncd import config as configmod
    from syncd.errors import ConfigError

    (tmp_path / "root").mkdir()
    base = f"[node]\nname = n\nroot = {tmp_path / 'root'}\nstate_dir = {tmp_path / 'state'}\n"
    ini = tmp_path / "sync.ini"
    ini.write_text(base + f"[verify]\nkeyring = {keys.keyring}\n")
    v = configmod.load(ini).verify
    assert (v.keyring, v.gnupghome, v.require_signed, v.schedule) == (keys.keyring, None, None, "30 4 * * *")
    ini.write_text(base + f"[verify]\nkeyring = {keys.keyring}\ngnupghome = {tmp_path / 'gh'}\n"
                   "require_signed = Release repomd.xml SHA256SUMS\nschedule = 0 3 * * 0\n")
    v = configmod.load(ini).verify
    assert v.gnupghome == tmp_path / "gh" and v.require_signed == ("Release", "repomd.xml", "SHA256SUMS")
    assert v.schedule == "0 3 * * 0"
    ini.write_text(base + "[verify]\nschedule = every day\n")
    with pytest.raises(ConfigError, match=r"\[verify\] schedule"):
        configmod.load(ini)
