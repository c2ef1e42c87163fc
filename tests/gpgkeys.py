"""Real OpenPGP keys and a Debian-like repository for the publishing tests.

The gpg helpers are test_verify's (imported, not copied); this module adds
a module-scoped signer with the keys the push tests need, and a builder
for a small apt repository: pool files, Packages (+ .gz and by-hash
copies, as Debian publishes them), a Release with its SHA256 list, and
InRelease + Release.gpg.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncd.verify import IndexEntry, render_release
from tests.test_verify import PAST, Signer, gpg, kill_agent

SUITE = "dists/stable"
COMPONENT = "main/binary-amd64"

GOOD = "good@test"
OTHER = "other@test"  # not in the edge's keyring: an unknown key
EXPIRED = "expired@test"  # in the keyring, expired since 2020


@dataclass
class Keys:
    signer: Signer
    keyring: Path  # binary public keyring the edge trusts: Good and Expired

    def sign_release(self, root: Path, uid: str = GOOD) -> None:
        release = root / SUITE / "Release"
        faked = "20200101T010000" if uid == EXPIRED else None
        for out, clear in ((root / SUITE / "InRelease", True), (root / SUITE / "Release.gpg", False)):
            if out.exists():
                out.unlink()
            self.signer.sign(uid, release, out, clear=clear, faked=faked)


def make_keys(base: Path) -> Keys:
    home = base / "signer"
    home.mkdir(mode=0o700)
    gpg(home, "--quick-gen-key", "Good <good@test>", "ed25519", "sign", "never")
    gpg(home, "--quick-gen-key", "Other <other@test>", "ed25519", "sign", "never")
    gpg(home, "--faked-system-time", PAST, "--quick-gen-key", "Expired <expired@test>", "ed25519", "sign", "1d")
    keyring = base / "archive-keyring.gpg"
    keyring.write_bytes(gpg(home, "--export", GOOD, EXPIRED))
    return Keys(Signer(home), keyring)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):  # noqa: ANN001, ANN201
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    base = tmp_path_factory.mktemp("keys")
    k = make_keys(base)
    yield k
    kill_agent(k.signer.home)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_release(root: Path, keys: Keys | None, version: int, *, pool: dict[str, int] | None = None,
                  uid: str = GOOD, stale_release: bool = False) -> dict[str, bytes]:
    """Write release ``version`` into ``root``; returns the pool files' names
    to their content.

    ``pool``: names (under pool/main/) to sizes; by default two small
    packages per version.  Old pool files are left in place (the caller
    deletes what it wants gone), old by-hash files too, as Debian keeps them.
    ``stale_release``: the Release keeps the SHA256 list of the Packages
    already there, as a half-finished archive run would.  ``keys`` None:
    no signatures at all.
    """
    pool = pool if pool is not None else {f"p/pkg{version}_{i}.deb": 3000 + i for i in range(2)}
    contents = {}
    stanzas = []
    for name, size in sorted(pool.items()):
        data = b"!<arch>\n" + os.urandom(size)
        rel = f"pool/main/{name}"
        p = root / rel
        if p.exists():
            data = p.read_bytes()
        else:
            _write(p, data)
        contents[rel] = data
        stanzas.append(f"Package: {Path(name).stem}\nVersion: {version}\nFilename: {rel}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    comp = root / SUITE / COMPONENT
    old = {n: (comp / n).read_bytes() for n in ("Packages", "Packages.gz") if (comp / n).exists()}
    packages = "\n".join(stanzas).encode()
    new = {"Packages": packages, "Packages.gz": gzip.compress(packages, mtime=0)}
    for name, data in new.items():
        _write(comp / name, data)
        _write(comp / "by-hash/SHA256" / hashlib.sha256(data).hexdigest(), data)
    listed = old if stale_release and old else new
    entries = [IndexEntry(f"{COMPONENT}/{n}", len(d), hashlib.sha256(d).digest()) for n, d in sorted(listed.items())]
    text = render_release({"Origin": "Test", "Suite": "stable", "Version": str(version)}, entries)
    _write(root / SUITE / "Release", text.encode())
    if keys is None:
        for name in ("InRelease", "Release.gpg"):
            if (root / SUITE / name).exists():
                (root / SUITE / name).unlink()
    else:
        keys.sign_release(root, uid)
    return contents
