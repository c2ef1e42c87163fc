"""syncd.verify with real gpg, real files: hashing, signatures, Release/repomd chains."""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import IndexFormatError, VerifyError
from syncd.verify import (
    FindingKind,
    IndexEntry,
    Keyring,
    SigOutcome,
    check_hashes,
    clearsigned_body,
    hash_files,
    parse_release,
    parse_repomd,
    plan_signatures,
    render_release,
    sha256_file,
    verify_index_group,
    verify_index_group_report,
)

PAST = "20200101T000000"


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--no-tty",
                           "--passphrase", "", "--pinentry-mode", "loopback", *args],
                          input=input, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"gpg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def fingerprint(home: Path, uid: str) -> str:
    out = gpg(home, "--with-colons", "--list-keys", uid).decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def kill_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


class Signer:
    """A GNUPGHOME holding the secret keys the tests sign with."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def sign(self, uid: str, src: Path, out: Path, *, clear: bool = False, faked: str | None = None,
             sig_expire: str | None = None) -> None:
        args = ["-u", uid, "-o", str(out)]
        if faked:
            args += ["--faked-system-time", faked]
        if sig_expire:
            args += ["--default-sig-expire", sig_expire]
        args += ["--clearsign"] if clear else ["--armor", "--detach-sign"]
        gpg(self.home, *args, str(src))


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    home = tmp_path_factory.mktemp("signer")
    os.chmod(home, 0o700)
    try:
        gpg(home, "--quick-gen-key", "Good <good@test>", "ed25519", "sign", "never")
        gpg(home, "--quick-gen-key", "Other <other@test>", "ed25519", "sign", "never")
        gpg(home, "--faked-system-time", PAST, "--quick-gen-key", "Expired <expired@test>", "ed25519", "sign", "1d")
        gpg(home, "--faked-system-time", PAST, "--quick-gen-key", "Old <old@test>", "ed25519", "sign", "never")
        gpg(home, "--quick-gen-key", "Revoked <revoked@test>", "ed25519", "sign", "never")
        s = Signer(home)
        # Signed while the keys were still usable.
        release = home / "probe"
        release.write_text("probe\n")
        s.sign("expired@test", release, home / "expired.asc", faked="20200101T010000")
        s.sign("revoked@test", release, home / "revoked.asc")
        rev = (home / "openpgp-revocs.d" / f"{fingerprint(home, 'revoked@test')}.rev").read_text()
        gpg(home, "--import", input=rev.replace(":-----BEGIN", "-----BEGIN").encode())
        yield s
    finally:
        kill_agent(home)


@pytest.fixture(scope="module")
def keyring_file(signer, tmp_path_factory):
    """Binary keyring as Debian ships them: every test key except Other's."""
    d = tmp_path_factory.mktemp("kr")
    path = d / "archive-keyring.gpg"
    path.write_bytes(gpg(signer.home, "--export", "good@test", "expired@test", "old@test", "revoked@test"))
    return path


@pytest.fixture(scope="module")
def keyring(keyring_file, tmp_path_factory):
    kr = Keyring(keyring_file, tmp_path_factory.mktemp("node") / "gnupg")
    yield kr
    kr.close()


def write(root: Path, rel: str, data: bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def debian_repo(root: Path, signer: Signer, uid: str = "good@test") -> dict[str, Path]:
    files = {}
    packages = b"".join(b"Package: p%d\nVersion: 1.%d\nFilename: pool/main/p/p%d_1_all.deb\n\n" % (i, i, i)
                        for i in range(50))
    for rel, data in (("dists/stable/main/binary-amd64/Packages", packages),
                      ("dists/stable/main/binary-amd64/Release", b"Archive: stable\nComponent: main\n"),
                      ("dists/stable/main/binary-amd64/Packages.gz", gzip.compress(packages, mtime=0)),
                      ("pool/main/p/p0_1_all.deb", b"!<arch>\n" + os.urandom(3000))):
        files[rel] = write(root, rel, data)
    entries = [IndexEntry(rel[len("dists/stable/"):], len(p.read_bytes()), hashlib.sha256(p.read_bytes()).digest())
               for rel, p in files.items() if rel.startswith("dists/")]
    # Named but not mirrored: apt tolerates it, so do we.
    entries.append(IndexEntry("main/binary-i386/Packages", 0, hashlib.sha256(b"").digest()))
    release = render_release({"Origin": "Test", "Suite": "stable", "Codename": "test"}, entries)
    files["dists/stable/Release"] = write(root, "dists/stable/Release", release.encode())
    files["dists/stable/InRelease"] = root / "dists/stable/InRelease"
    files["dists/stable/Release.gpg"] = root / "dists/stable/Release.gpg"
    signer.sign(uid, files["dists/stable/Release"], files["dists/stable/InRelease"], clear=True)
    signer.sign(uid, files["dists/stable/Release"], files["dists/stable/Release.gpg"])
    return files


def repomd_xml(entries: list[tuple[str, str, str, int]]) -> bytes:
    data = "".join(
        f'<data type="{kind}"><checksum type="{algo}">{digest}</checksum>'
        f'<location href="{href}"/><size>{size}</size></data>'
        for kind, href, (algo, digest), size in ((e[0], e[1], e[2], e[3]) for e in entries))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<repomd xmlns="http://linux.duke.edu/metadata/repo" '
            f'xmlns:rpm="http://linux.duke.edu/metadata/rpm"><revision>1</revision>{data}</repomd>\n').encode()


def rpm_repo(root: Path, signer: Signer) -> dict[str, Path]:
    files = {}
    entries = []
    for kind in ("primary", "filelists", "other"):
        data = gzip.compress(f"<{kind}>{'x' * 500}</{kind}>".encode(), mtime=0)
        digest = hashlib.sha256(data).hexdigest()
        rel = f"el9/repodata/{digest}-{kind}.xml.gz"
        files[rel] = write(root, rel, data)
        entries.append((kind, f"repodata/{digest}-{kind}.xml.gz", ("sha256", digest), len(data)))
    files["el9/repodata/repomd.xml"] = write(root, "el9/repodata/repomd.xml", repomd_xml(entries))
    files["el9/repodata/repomd.xml.asc"] = root / "el9/repodata/repomd.xml.asc"
    signer.sign("good@test", files["el9/repodata/repomd.xml"], files["el9/repodata/repomd.xml.asc"])
    return files


@pytest.fixture()
def deb(tmp_path, signer):
    return debian_repo(tmp_path / "deb", signer)


@pytest.fixture()
def rpm(tmp_path, signer):
    return rpm_repo(tmp_path / "rpm", signer)


def kinds(findings):
    return sorted((f.path, f.kind) for f in findings)


# -- hashing -------------------------------------------------------------------


def test_sha256_file_matches_hashlib_for_awkward_sizes(tmp_path):
    for size in (0, 1, 4095, 4096, 65537, (1 << 20) + 3):
        p = tmp_path / f"f{size}"
        data = os.urandom(size)
        p.write_bytes(data)
        assert sha256_file(p, buffer=4096) == hashlib.sha256(data).digest()
        assert sha256_file(p) == hashlib.sha256(data).digest()
        with open(p, "rb", buffering=0) as f:
            f.read(1)
            assert sha256_file(f.fileno(), buffer=bytearray(1000)) == hashlib.sha256(data[1:]).digest()
            assert not f.closed


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_hash_files_equals_hashlib_over_many_files(tmp_path, workers):
    expected = {}
    for i in range(120):
        data = os.urandom(i * 997 % 70000)
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        expected[p] = hashlib.sha256(data).digest()
    missing = tmp_path / "nope"
    got = dict(hash_files([*expected, missing], workers=workers, buffer_size=8192))
    assert isinstance(got.pop(missing), FileNotFoundError)
    assert got == expected


def test_hash_files_closed_early_stops_cleanly(tmp_path):
    paths = []
    for i in range(50):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 10000)
        paths.append(p)
    before = threading.active_count()
    it = hash_files(iter(paths), workers=2)
    first = next(it)
    it.close()
    assert first[1] == hashlib.sha256(b"x" * 10000).digest()
    assert threading.active_count() == before


def test_hash_files_passes_on_the_callers_iterator_error(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")

    def items():
        yield p
        raise ValueError("listing failed")

    with pytest.raises(ValueError, match="listing failed"):
        list(hash_files(items(), workers=2))


def test_check_hashes_reports_mismatch_missing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbb")
    findings = check_hashes({a: hashlib.sha256(b"aaa").digest(), b: hashlib.sha256(b"xxx").digest(),
                             tmp_path / "c": b"\0" * 32})
    assert kinds(findings) == [(str(b), FindingKind.HASH_MISMATCH), (str(tmp_path / "c"), FindingKind.MISSING_FILE)]


# -- keyring -----------------------------------------------------------------------


def test_keyring_home_is_private_and_imported_once(keyring_file, tmp_path):
    home = tmp_path / "state" / "gnupg"
    with Keyring(keyring_file, home) as kr:
        assert oct(home.stat().st_mode & 0o777) == "0o700"
        assert len(kr.fingerprints()) == 4
        assert kr.refresh() is False
        os.utime(keyring_file)  # touched, same bytes: no re-import
        assert kr.refresh() is False


def agents_for(home: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=False).stdout
    # Zombies are reaped by init, not by us: only live agents count.
    return [line for line in out.splitlines() if str(home) in line and "gpg-agent" in line and "Z" not in line[:3]]


def test_verifying_starts_no_gpg_agent(keyring_file, deb, tmp_path):
    home = tmp_path / "home"
    kr = Keyring(keyring_file, home)
    try:
        assert verify_index_group(deb, keyring=kr) == []
        assert agents_for(home) == []
    finally:
        kr.close()


def test_keyring_reimports_when_file_changes_and_drops_removed_keys(signer, tmp_path):
    path = tmp_path / "k.asc"
    path.write_bytes(gpg(signer.home, "--armor", "--export", "good@test", "other@test"))
    with Keyring(path, tmp_path / "home") as kr:
        assert len(kr.fingerprints()) == 2
        path.write_bytes(gpg(signer.home, "--armor", "--export", "other@test"))
        assert kr.refresh() is True
        assert kr.fingerprints() == [fingerprint(signer.home, "other@test")]
    # A new process over the same home trusts the stamp.
    with Keyring(path, tmp_path / "home") as kr:
        assert kr.fingerprints() == [fingerprint(signer.home, "other@test")]


def test_keyring_from_keybox(signer, tmp_path):
    kbx = tmp_path / "keyring.kbx"
    shutil.copy(signer.home / "pubring.kbx", kbx)
    with Keyring(kbx, tmp_path / "home") as kr:
        assert fingerprint(signer.home, "good@test") in kr.fingerprints()


def test_keyring_without_keys_is_an_error(signer, tmp_path):
    junk = tmp_path / "junk.gpg"
    junk.write_bytes(b"not a key\n")
    with pytest.raises(VerifyError, match="junk.gpg"):
        Keyring(junk, tmp_path / "home").close()
    kill_agent(tmp_path / "home")
    with pytest.raises(VerifyError, match="absent.gpg"):
        Keyring(tmp_path / "absent.gpg", tmp_path / "home2")


# -- signature outcomes --------------------------------------------------------------


def test_good_clearsigned_gives_the_signed_text(keyring, deb, signer):
    res = keyring.verify_clearsigned(deb["dists/stable/InRelease"], name="dists/stable/InRelease")
    assert res.outcome is SigOutcome.GOOD
    assert res.fingerprint == fingerprint(signer.home, "good@test")
    assert res.content == deb["dists/stable/Release"].read_bytes()
    assert "dists/stable/InRelease" in res.message
    assert keyring.verify_detached(deb["dists/stable/Release.gpg"], deb["dists/stable/Release"]).good


def test_outcomes_for_retired_and_foreign_keys(keyring, signer, tmp_path):
    data = signer.home / "probe"
    cases = {
        "other.asc": (lambda out: signer.sign("other@test", data, out), SigOutcome.UNKNOWN_KEY),
        "expsig.asc": (lambda out: signer.sign("old@test", data, out, faked="20200101T010000", sig_expire="1d"),
                       SigOutcome.EXPIRED_SIG),
    }
    for name, (make, outcome) in cases.items():
        make(tmp_path / name)
        res = keyring.verify_detached(tmp_path / name, data)
        assert res.outcome is outcome, res
        assert res.fingerprint
    assert keyring.verify_detached(signer.home / "expired.asc", data).outcome is SigOutcome.EXPIRED_KEY
    res = keyring.verify_detached(signer.home / "revoked.asc", data)
    assert res.outcome is SigOutcome.REVOKED_KEY
    assert res.fingerprint == fingerprint(signer.home, "revoked@test")


def test_sha1_signature_is_bad(keyring, signer, tmp_path):
    data = signer.home / "probe"
    gpg(signer.home, "-u", "good@test", "--digest-algo", "SHA1", "--armor", "--detach-sign",
        "-o", str(tmp_path / "sha1.asc"), str(data))
    res = keyring.verify_detached(tmp_path / "sha1.asc", data)
    assert res.outcome is SigOutcome.BAD
    assert "SHA1" in res.message


def test_unsigned_and_garbage(keyring, deb, tmp_path):
    res = keyring.verify_clearsigned(deb["dists/stable/Release"])
    assert res.outcome is SigOutcome.MISSING
    junk = tmp_path / "junk.sig"
    junk.write_bytes(b"\x89garbage")
    assert keyring.verify_detached(junk, deb["dists/stable/Release"]).outcome is SigOutcome.BAD
    # An inline-signed message is not a detached signature of anything.
    res = keyring.verify_detached(deb["dists/stable/InRelease"], deb["dists/stable/Release"])
    assert res.outcome in (SigOutcome.BAD, SigOutcome.ERROR)


def test_text_outside_clearsigned_armor_is_refused(keyring, deb, tmp_path):
    body = deb["dists/stable/InRelease"].read_bytes()
    for name, data in (("before", b"Origin: Evil\n\n" + body), ("after", body + b"SHA256:\n x 1 y\n"),
                       ("twice", body + body),
                       ("two signature blocks",
                        body + b"Origin: Evil\n" + body[body.index(b"-----BEGIN PGP SIGNATURE"):])):
        p = tmp_path / name
        p.write_bytes(data)
        assert keyring.verify_clearsigned(p).outcome is SigOutcome.BAD, name


def test_two_signatures_one_unknown_is_good(keyring, signer, deb, tmp_path):
    out = tmp_path / "InRelease"
    gpg(signer.home, "-u", "good@test", "-u", "other@test", "--clearsign", "-o", str(out),
        str(deb["dists/stable/Release"]))
    assert keyring.verify_clearsigned(out).good


# -- the entry point --------------------------------------------------------------------


def test_good_release_and_repomd_give_no_findings(keyring, deb, rpm):
    files = {**deb, **rpm}
    expected = {rel: hashlib.sha256(p.read_bytes()).digest() for rel, p in files.items()}
    report = verify_index_group_report(files, keyring=keyring, expected_sha256=expected)
    assert report.findings == []
    assert report.checked["dists/stable/InRelease"] == 3
    assert report.absent["dists/stable/Release"] == 1
    assert report.checked["el9/repodata/repomd.xml"] == 3
    assert verify_index_group(files, keyring=None) == []


def flip(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x01
    p.write_bytes(bytes(data))


def crc24(data: bytes) -> int:
    """OpenPGP's armor checksum (RFC 4880, 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def damage_armored_signature(p: Path, how: str) -> None:
    """Change an armored signature so that it no longer verifies, whatever its bytes.

    Flipping a byte of the armor text is not that: gpg skips a character
    that is not base64 ('A' ^ 1 is '@'), and a skipped zero digit near the
    end can leave the decoded signature as it was, which then verifies
    (seen about once in 40 runs).  So either a bit of the signature value
    itself changes, armored again with a matching checksum (gpg: BADSIG),
    or a base64 digit in the middle of the body becomes another base64
    digit, the checksum kept (gpg: CRC error, no signature found).
    """
    lines = p.read_bytes().decode("ascii").split("\n")
    start = lines.index("") + 1  # after the armor headers
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("="))
    if how == "value":
        packet = bytearray(base64.b64decode("".join(lines[start:end])))
        packet[-3] ^= 0x01  # in the last MPI: the signature's s
        body = base64.b64encode(bytes(packet)).decode()
        lines[start:end + 1] = [body[i:i + 64] for i in range(0, len(body), 64)] + [
            "=" + base64.b64encode(crc24(bytes(packet)).to_bytes(3, "big")).decode()]
    else:
        line = lines[start]
        mid = len(line) // 2
        lines[start] = line[:mid] + ("B" if line[mid] != "B" else "C") + line[mid + 1:]
    p.write_bytes("\n".join(lines).encode("ascii"))


@pytest.mark.parametrize("how", ["value", "armor"])
def test_damaged_signatures_are_bad(keyring, deb, how):
    damage_armored_signature(deb["dists/stable/Release.gpg"], how)
    text = deb["dists/stable/InRelease"].read_bytes()
    deb["dists/stable/InRelease"].write_bytes(text.replace(b"Suite: stable", b"Suite: stablE"))
    assert kinds(verify_index_group(deb, keyring=keyring)) == [
        ("dists/stable/InRelease", FindingKind.BAD_SIGNATURE),
        ("dists/stable/Release.gpg", FindingKind.BAD_SIGNATURE),
    ]


def test_release_tampered_after_signing_is_bad(keyring, deb):
    with open(deb["dists/stable/Release"], "ab") as f:
        f.write(b" " + b"0" * 64 + b" 1 extra\n")
    assert kinds(verify_index_group(deb, keyring=keyring)) == [("dists/stable/Release.gpg", FindingKind.BAD_SIGNATURE)]


def test_signed_by_unknown_expired_revoked_keys(keyring, signer, tmp_path):
    for uid, faked, kind in (("other@test", None, FindingKind.UNKNOWN_KEY),
                             ("expired@test", "20200101T010000", FindingKind.EXPIRED_KEY)):
        root = tmp_path / uid
        files = debian_repo(root, signer)
        for rel, clear in (("dists/stable/InRelease", True), ("dists/stable/Release.gpg", False)):
            files[rel].unlink()
            signer.sign(uid, files["dists/stable/Release"], files[rel], clear=clear, faked=faked)
        assert kinds(verify_index_group(files, keyring=keyring)) == [
            ("dists/stable/InRelease", kind), ("dists/stable/Release.gpg", kind)], uid
    # The revoked key can no longer sign: reuse a signature it made before.
    files = {"x.tar.gz": signer.home / "probe", "x.tar.gz.asc": signer.home / "revoked.asc"}
    assert kinds(verify_index_group(files, keyring=keyring)) == [("x.tar.gz.asc", FindingKind.REVOKED_KEY)]


def test_many_detached_signatures_one_bad(keyring, signer, tmp_path):
    files = {}
    for i in range(12):
        rel = f"src/pkg-{i}.tar.gz"
        files[rel] = write(tmp_path, rel, os.urandom(2000))
        files[rel + ".asc"] = tmp_path / (rel + ".asc")
        signer.sign("good@test", files[rel], files[rel + ".asc"])
    assert verify_index_group(files, keyring=keyring) == []
    flip(files["src/pkg-7.tar.gz"], 100)
    assert kinds(verify_index_group(files, keyring=keyring)) == [("src/pkg-7.tar.gz.asc", FindingKind.BAD_SIGNATURE)]


def test_missing_signature(keyring, deb, rpm):
    del deb["dists/stable/InRelease"], deb["dists/stable/Release.gpg"], rpm["el9/repodata/repomd.xml.asc"]
    assert kinds(verify_index_group({**deb, **rpm}, keyring=keyring)) == [
        ("dists/stable/Release", FindingKind.MISSING_SIGNATURE),
        ("el9/repodata/repomd.xml", FindingKind.MISSING_SIGNATURE),
    ]
    # Without a keyring there are no signature checks at all.
    assert verify_index_group({**deb, **rpm}, keyring=None) == []


def test_inrelease_alone_signs_release(keyring, deb):
    del deb["dists/stable/Release.gpg"]
    assert verify_index_group(deb, keyring=keyring) == []


def test_component_release_is_covered_by_the_suite_release(keyring, deb, tmp_path):
    # main/binary-amd64/Release has no signature and no SHA256 list: fine when
    # the signed suite Release names it, not otherwise.
    comp = "dists/stable/main/binary-amd64/Release"
    assert verify_index_group(deb, keyring=keyring) == []
    stray = write(tmp_path, "dists/other/main/Release", b"Archive: other\n")
    assert kinds(verify_index_group({**deb, "dists/other/main/Release": stray}, keyring=keyring)) == [
        ("dists/other/main/Release", FindingKind.MALFORMED_INDEX),
        ("dists/other/main/Release", FindingKind.MISSING_SIGNATURE),
    ]
    del deb["dists/stable/InRelease"], deb["dists/stable/Release.gpg"]
    # One finding for the root cause, not one per file it names.
    assert kinds(verify_index_group(deb, keyring=keyring)) == [("dists/stable/Release", FindingKind.MISSING_SIGNATURE)]
    assert comp in deb


def test_unsigned_releases_naming_each_other_cover_nothing(keyring, tmp_path):
    a, b = tmp_path / "a/Release", tmp_path / "b/Release"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text(f"SHA256:\n {'0' * 64} 1 ../b/Release\n")
    b.write_text(f"SHA256:\n {'0' * 64} 1 ../a/Release\n")
    found = kinds(verify_index_group({"x/a/Release": a, "x/b/Release": b}, keyring=keyring))
    assert ("x/a/Release", FindingKind.MISSING_SIGNATURE) in found
    assert ("x/b/Release", FindingKind.MISSING_SIGNATURE) in found


def test_release_must_match_inrelease_when_it_has_no_detached_signature(keyring, deb):
    del deb["dists/stable/Release.gpg"]
    with open(deb["dists/stable/Release"], "ab") as f:
        f.write(b"Label: unsigned addition\n")
    assert ("dists/stable/Release", FindingKind.INDEX_MISMATCH) in kinds(verify_index_group(deb, keyring=keyring))


def test_orphan_signature_and_required_patterns(keyring, deb, tmp_path):
    orphan = {"dists/stable/Release.gpg": deb["dists/stable/Release.gpg"]}
    assert kinds(verify_index_group(orphan, keyring=keyring)) == [
        ("dists/stable/Release.gpg", FindingKind.MISSING_FILE)]
    blob = write(tmp_path, "iso/x.iso", b"iso")
    assert verify_index_group({"iso/x.iso": blob}, keyring=keyring) == []
    assert kinds(verify_index_group({"iso/x.iso": blob}, keyring=keyring, require_signed=["iso/*.iso"])) == [
        ("iso/x.iso", FindingKind.MISSING_SIGNATURE)]


def test_release_sha256_mismatch_is_index_mismatch(keyring, deb):
    # Staged Packages differs from what the (good, signed) Release lists.
    write(deb["dists/stable/main/binary-amd64/Packages"].parent, "Packages", b"Package: evil\n")
    findings = verify_index_group(deb, keyring=keyring)
    assert kinds(findings) == [("dists/stable/main/binary-amd64/Packages", FindingKind.INDEX_MISMATCH)] * 2
    assert "dists/stable/Release says" in findings[0].message + findings[1].message
    assert "dists/stable/InRelease says" in findings[0].message + findings[1].message
    # Same size, different bytes: caught by the digest.
    p = deb["dists/stable/main/binary-amd64/Packages.gz"]
    flip(p, 20)
    assert ("dists/stable/main/binary-amd64/Packages.gz", FindingKind.INDEX_MISMATCH) in kinds(
        verify_index_group(deb, keyring=None))


def test_by_hash_files_must_hash_to_their_name(tmp_path):
    data = b"Package: x\n"
    good = f"dists/s/main/binary-amd64/by-hash/SHA256/{hashlib.sha256(data).hexdigest()}"
    bad = f"dists/s/main/binary-amd64/by-hash/SHA256/{hashlib.sha256(b'other').hexdigest()}"
    files = {good: write(tmp_path, good, data), bad: write(tmp_path, bad, data)}
    assert kinds(verify_index_group(files, keyring=None)) == [(bad, FindingKind.INDEX_MISMATCH)]


def test_manifest_mismatch_and_missing(deb):
    expected = {rel: hashlib.sha256(p.read_bytes()).digest() for rel, p in deb.items()}
    expected["pool/main/p/p0_1_all.deb"] = b"\0" * 32
    expected["pool/main/q/gone.deb"] = b"\0" * 32
    assert kinds(verify_index_group(deb, keyring=None, expected_sha256=expected)) == [
        ("pool/main/p/p0_1_all.deb", FindingKind.HASH_MISMATCH),
        ("pool/main/q/gone.deb", FindingKind.MISSING_FILE),
    ]


def test_repomd_checksum_mismatch(keyring, rpm):
    gz = next(rel for rel in rpm if rel.endswith("primary.xml.gz"))
    flip(rpm[gz], 30)
    assert kinds(verify_index_group(rpm, keyring=keyring)) == [(gz, FindingKind.INDEX_MISMATCH)]


def test_malformed_release_and_hostile_repomd(keyring, signer, tmp_path):
    files = {}
    files["dists/a/Release"] = write(tmp_path, "dists/a/Release", b"Origin: X\nthis is not a field\n")
    files["dists/b/Release"] = write(tmp_path, "dists/b/Release", b"Origin: X\nSuite: b\n")
    files["dists/c/Release"] = write(tmp_path, "dists/c/Release",
                                     b"SHA256:\n " + b"0" * 64 + b" 1 ../../../etc/passwd\n")
    bomb = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>\n'
            b'<repomd><data type="primary"><location href="&lol2;"/></data></repomd>')
    files["r/repodata/repomd.xml"] = write(tmp_path, "r/repodata/repomd.xml", bomb)
    files["s/repodata/repomd.xml"] = write(tmp_path, "s/repodata/repomd.xml", b"<repomd><data")
    for rel in list(files):
        files[rel + ".asc"] = tmp_path / (rel + ".asc")
        signer.sign("good@test", files[rel], files[rel + ".asc"])
    assert kinds(verify_index_group(files, keyring=keyring)) == [
        (rel, FindingKind.MALFORMED_INDEX) for rel in sorted(files) if not rel.endswith(".asc")]


# -- plans and parsers ---------------------------------------------------------------------


def test_plan_signatures_pairs_and_requirements():
    plan = plan_signatures([
        "dists/s/InRelease", "dists/s/Release", "dists/s/Release.gpg", "dists/t/Release",
        "repodata/repomd.xml", "repodata/repomd.xml.asc", "foo.tar.gz", "foo.tar.gz.asc",
        "keys/archive.gpg", "other/repodata/repomd.xml", "dists/u/Release.gpg",
    ])
    assert plan.detached == {"dists/s/Release.gpg": "dists/s/Release", "foo.tar.gz.asc": "foo.tar.gz",
                             "repodata/repomd.xml.asc": "repodata/repomd.xml"}
    assert plan.orphans == {"dists/u/Release.gpg": "dists/u/Release"}
    assert plan.clearsigned == ("dists/s/InRelease",)
    assert plan.unsigned == ("dists/t/Release", "other/repodata/repomd.xml")


def test_clearsigned_body_unescapes_dashes():
    msg = (b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: X\n- -dash\n"
           b"-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n")
    assert clearsigned_body(msg) == b"Origin: X\n-dash\n"
    with pytest.raises(IndexFormatError):
        clearsigned_body(b"Origin: X\n")


def test_repomd_other_checksum_types():
    import hashlib as h
    xml = repomd_xml([("primary", "repodata/p.xml.gz", ("sha512", h.sha512(b"").hexdigest()), 0),
                      ("other", "repodata/o.xml.gz", ("sha", h.sha1(b"").hexdigest()), 0)])
    assert [(e.algo, e.path) for e in parse_repomd(xml)] == [("sha512", "repodata/p.xml.gz"),
                                                             ("sha1", "repodata/o.xml.gz")]
    with pytest.raises(IndexFormatError, match="md5"):
        parse_repomd(repomd_xml([("primary", "repodata/p", ("md5", h.md5(b"").hexdigest()), 0)]))
    with pytest.raises(IndexFormatError, match="root element"):
        parse_repomd(b"<html/>")


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_+-.~", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
_entry = st.builds(IndexEntry,
                   path=st.lists(_segment, min_size=1, max_size=4).map("/".join),
                   size=st.integers(0, 2**40),
                   digest=st.binary(min_size=32, max_size=32))
_field_name = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(lambda s: s.lower() != "sha256")
_field_value = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=30)


@given(fields=st.dictionaries(_field_name, _field_value, max_size=8).filter(
           lambda d: len({k.lower() for k in d}) == len(d)),
       entries=st.lists(_entry, max_size=20))
def test_release_round_trip(fields, entries):
    rel = parse_release(render_release(fields, entries).encode())
    assert rel.sha256 == tuple(entries)
    assert {k: v for k, v in rel.fields.items() if k != "SHA256"} == fields


@given(st.binary(max_size=400))
def test_release_parser_never_crashes(data):
    try:
        parse_release(data)
    except IndexFormatError:
        pass


@given(st.binary(max_size=400))
def test_repomd_parser_never_crashes(data):
    try:
        parse_repomd(b"<repomd>" + data)
    except IndexFormatError:
        pass


_repomd_entry = st.tuples(
    st.sampled_from(["primary", "filelists", "other", "updateinfo", "modules"]),
    st.lists(_segment, min_size=1, max_size=3).map(lambda parts: "repodata/" + "/".join(parts)),
    st.sampled_from(["sha256", "sha512", "sha1", "sha384"]),
    st.integers(0, 2**40),
    st.randoms(use_true_random=False))


@given(st.lists(_repomd_entry, max_size=10))
def test_repomd_round_trip(raw):
    rows = [(kind, href, (algo, r.randbytes(hashlib.new(algo).digest_size).hex()), size)
            for kind, href, algo, size, r in raw]
    got = parse_repomd(repomd_xml(rows))
    assert [(e.path, e.algo, e.digest.hex(), e.size) for e in got] == [
        (href, algo, digest, size) for _, href, (algo, digest), size in rows]


def test_own_release_check_is_kept_per_generation_and_settings(tmp_path, monkeypatch, keyring_file):
    """run --once checks the node's own index group once per generation and
    verify settings; a failed check is never kept."""
    from types import SimpleNamespace

    from syncd import own_release as verifymod
    from syncd.errors import VerifyError
    from syncd.manifest import Manifest

    calls = []
    outcome = {"findings": []}
    monkeypatch.setattr(verifymod, "check_own_index_group",
                        lambda cfg, m: (calls.append(m.generation) or outcome["findings"], 0))
    ring = tmp_path / "ring.gpg"
    ring.write_bytes(keyring_file.read_bytes())
    cfg = SimpleNamespace(
        node=SimpleNamespace(name="primary", index_patterns=("Release",)),
        verify=SimpleNamespace(keyring=ring, require_signed=None),
    )
    with Manifest.open(tmp_path / "state", "primary") as m:
        verifymod.refuse_broken_release(cfg, m)
        verifymod.refuse_broken_release(cfg, m)
        assert calls == [0]
        m.set_meta("generation", "1")
        verifymod.refuse_broken_release(cfg, m)
        assert calls == [0, 1]
        monkeypatch.setattr(verifymod, "RELEASE_CHECK_LIFETIME", 0.0)  # a pass expires: checked again
        verifymod.refuse_broken_release(cfg, m)
        assert calls == [0, 1, 1]
        monkeypatch.setattr(verifymod, "RELEASE_CHECK_LIFETIME", 3600.0)
        calls.pop()
        ring.write_bytes(ring.read_bytes() + b"\n")  # the keyring changed: checked again
        verifymod.refuse_broken_release(cfg, m)
        assert calls == [0, 1, 1]
        outcome["findings"] = [SimpleNamespace(message="dists/stable/Release: bad signature")]
        ring.write_bytes(ring.read_bytes() + b"\n")
        for _ in range(2):  # refused, and not remembered as passed
            with pytest.raises(VerifyError, match="refusing to push"):
                verifymod.refuse_broken_release(cfg, m)
        assert calls == [0, 1, 1, 1, 1]


def test_gpg_that_hangs_is_stopped_and_reported(keyring_file, deb, tmp_path, monkeypatch):
    """A gpg that never answers (a stalled home, say) is killed after
    GPG_TIMEOUT: the check is an error naming it, not a hang."""
    import shutil
    import time

    from syncd.verify import gpg as verifymod

    real = shutil.which("gpg")
    hanging = tmp_path / "gpg-hangs-on-verify"
    hanging.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --verify|--decrypt) exec sleep 60;; esac; done\n'
        f'exec {real} "$@"\n'
    )
    hanging.chmod(0o755)
    monkeypatch.setattr(verifymod, "GPG_TIMEOUT", 1.0)
    ring = Keyring(keyring_file, tmp_path / "home", gpgbinary=str(hanging))
    try:
        started = time.monotonic()
        got = ring.verify_detached(deb["dists/stable/Release.gpg"], deb["dists/stable/Release"])
        assert time.monotonic() - started < 20
        assert got.outcome is SigOutcome.ERROR and "no answer in 1 s" in got.message, got
        # The same keyring still works when gpg answers.
        ring._gpg.gpgbinary = real
        assert ring.verify_detached(deb["dists/stable/Release.gpg"], deb["dists/stable/Release"]).outcome is SigOutcome.GOOD
    finally:
        ring.close()


# -- gpg run directly, against python-gnupg's own calls ------------------------------


def python_gnupg_verdict(keyring, sig: Path, data: Path | None):
    """What the verdict was when python-gnupg ran gpg (the library's own
    verify_file and verify, over the same home with the same options)."""
    import gnupg

    from syncd.verify.gpg import _verdict

    lib = gnupg.GPG(gpgbinary=keyring._gpg.gpgbinary, gnupghome=str(keyring.home),
                    options=list(keyring._gpg.options))
    if data is None:
        result = lib.verify(sig.read_bytes(), extra_args=["--output", "-"])
        return _verdict(sig.name, result.stderr or "", detached=False), result.data
    result = lib.verify_file(str(sig), data_filename=os.path.abspath(data))
    return _verdict(sig.name, result.stderr or "", detached=True), None


def test_gpg_command_line_is_python_gnupgs(keyring):
    import gnupg

    lib = gnupg.GPG(gpgbinary=keyring._gpg.gpgbinary, gnupghome=str(keyring.home),
                    options=list(keyring._gpg.options))
    for args in (["--import"], ["--verify", "-", "/x/Release"], ["--verify", "--output", "-"], ["--list-config"]):
        assert keyring._gpg.argv(args) == lib.make_args(args, False)


def test_verdicts_are_those_through_python_gnupg(keyring, signer, deb, tmp_path):
    """Every outcome, clearsigned text included, is what it was when python-gnupg
    ran gpg: good, unknown key, expired key and signature, revoked key, a
    damaged signature, garbage, an inline-signed file given as a signature."""
    data = signer.home / "probe"
    signer.sign("other@test", data, tmp_path / "other.asc")
    signer.sign("old@test", data, tmp_path / "expsig.asc", faked="20200101T010000", sig_expire="1d")
    damaged = tmp_path / "damaged.asc"
    damaged.write_bytes(deb["dists/stable/Release.gpg"].read_bytes())
    damage_armored_signature(damaged, "value")
    garbage = tmp_path / "garbage.sig"
    garbage.write_bytes(b"\x89garbage")
    detached = [(deb["dists/stable/Release.gpg"], deb["dists/stable/Release"]), (tmp_path / "other.asc", data),
                (tmp_path / "expsig.asc", data), (signer.home / "expired.asc", data),
                (signer.home / "revoked.asc", data), (damaged, deb["dists/stable/Release"]),
                (garbage, data), (deb["dists/stable/InRelease"], deb["dists/stable/Release"])]
    seen = set()
    for sig, signed in detached:
        ours = keyring.verify_detached(sig, signed, name=sig.name)
        theirs, _ = python_gnupg_verdict(keyring, sig, signed)
        assert ours == theirs, sig
        seen.add(ours.outcome)
    for clear in (deb["dists/stable/InRelease"],):
        ours = keyring.verify_clearsigned(clear, name=clear.name)
        theirs, text = python_gnupg_verdict(keyring, clear, None)
        assert (ours.outcome, ours.message, ours.key_id, ours.fingerprint) == (
            theirs.outcome, theirs.message, theirs.key_id, theirs.fingerprint)
        assert ours.content == text == deb["dists/stable/Release"].read_bytes()
        seen.add(ours.outcome)
    assert seen >= {SigOutcome.GOOD, SigOutcome.UNKNOWN_KEY, SigOutcome.EXPIRED_SIG, SigOutcome.EXPIRED_KEY,
                    SigOutcome.REVOKED_KEY, SigOutcome.BAD}


def test_a_gpg_that_cannot_run_is_a_clear_error(keyring_file, tmp_path):
    with pytest.raises(VerifyError, match=r"cannot run gpg: .*no-such-gpg"):
        Keyring(keyring_file, tmp_path / "home", gpgbinary=str(tmp_path / "no-such-gpg"))


def test_a_keyring_import_that_hangs_is_stopped(keyring_file, tmp_path, monkeypatch):
    """Every gpg call has a timeout, the import too: a clear error, not a hang."""
    from syncd.verify import gpg as gpgmod

    real = shutil.which("gpg")
    hanging = tmp_path / "gpg-hangs-on-import"
    hanging.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --import) exec sleep 60;; esac; done\n'
        f'exec {real} "$@"\n'
    )
    hanging.chmod(0o755)
    monkeypatch.setattr(gpgmod, "GPG_TIMEOUT", 1.0)
    with pytest.raises(VerifyError, match=r"archive-keyring.gpg: gpg gave no answer in 1 s"):
        Keyring(keyring_file, tmp_path / "home", gpgbinary=str(hanging))
