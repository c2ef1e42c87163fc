"""Issue 7: nothing goes live on an edge before SHA-256 and GPG say so.

A primary pushes a Debian-like repository to an edge over the session sshd;
the edge's ``[verify] keyring`` holds the Good and Expired public keys (see
tests/gpgkeys.py).  Real gpg, real files, real agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from syncd import config as configmod
from syncd.errors import EXIT_FAILURE
from syncd.manifest import META_HELD_BACK, Manifest
from syncd.push import push_with_retries
from syncd.scan import scan
from syncd.verify import parse_release
from tests.gpgkeys import COMPONENT, EXPIRED, OTHER, SUITE, Keys, build_release, keys  # noqa: F401
from tests.nodes import SYNCD, Node, assert_same_tree, make_node, tree_listing

pytest_plugins = ["tests.sshd"]

INDEX = [f"{SUITE}/Release", f"{SUITE}/InRelease", f"{SUITE}/Release.gpg",
         f"{SUITE}/{COMPONENT}/Packages", f"{SUITE}/{COMPONENT}/Packages.gz"]


def add_section(node: Node, section: str, **values: object) -> None:
    """nodes.Node writes [node] and [mirror:*]; the tests add [verify] here."""
    text = node.ini.read_text() + f"\n[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    node.ini.write_text(text)


class Pair:
    """A primary without a keyring, and an edge that verifies with one."""

    def __init__(self, base: Path, ssh, keys: Keys, *, edge_keyring: bool = True) -> None:  # noqa: ANN001
        self.ssh = ssh
        self.keys = keys
        self.primary = make_node(base, "primary", max_delete="100%")
        self.edge = make_node(base, "edge")
        self.primary.mirrors.append((self.edge, {}))
        self.edge.write()
        if edge_keyring:
            add_section(self.edge, "verify", keyring=keys.keyring)
        self.primary.write(ssh)

    def cli(self, *args: str, node: Node | None = None) -> subprocess.CompletedProcess:
        node = node or self.primary
        return subprocess.run(SYNCD + ["-c", str(node.ini), *args], capture_output=True, text=True, timeout=300)

    def push(self):  # noqa: ANN201
        cfg = configmod.load(self.primary.ini)
        with Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
            scan(cfg.node.root, m)
            return push_with_retries(cfg, cfg.mirrors[0], m)

    def edge_meta(self, key: str) -> str | None:
        with Manifest.open(self.edge.state, "edge", create=False) as m:
            return m.get_meta(key)

    def held_back(self) -> dict | None:
        raw = self.edge_meta(META_HELD_BACK)
        return json.loads(raw) if raw else None

    def in_sync(self) -> bool:
        """As a client lists it, and as rsync sees it (directory and symlink times included)."""
        assert_same_tree(self.primary.root, self.edge.root)
        return tree_listing(self.primary.root) == tree_listing(self.edge.root)


@pytest.fixture
def pair(tmp_path: Path, sshd, keys: Keys) -> Pair:  # noqa: ANN001, F811
    return Pair(tmp_path, sshd, keys)


def served(root: Path, paths: list[str]) -> dict[str, bytes | None]:
    return {p: (root / p).read_bytes() if (root / p).exists() else None for p in paths}


def first_release(pair: Pair) -> dict[str, bytes]:
    pool = build_release(pair.primary.root, pair.keys, 1)
    (pair.primary.root / "README").write_text("version 1\n")
    r = pair.push()
    assert r.ok, r.error
    assert pair.in_sync()
    assert pair.held_back() is None
    return pool


def test_bad_signature_held_back_then_a_good_release_recovers(pair: Pair) -> None:
    pool1 = first_release(pair)
    gen1 = pair.edge_meta("upstream_generation")
    before = served(pair.edge.root, INDEX + sorted(pool1))
    p = pair.primary.root
    # Release 2: new packages, one old package gone, a data file replaced,
    # and an InRelease whose signed text was altered after signing.
    pool2 = build_release(p, pair.keys, 2)
    os.unlink(p / sorted(pool1)[0])
    (p / "README").write_text("version 2\n")
    inrelease = p / SUITE / "InRelease"
    inrelease.write_bytes(inrelease.read_bytes().replace(b"Version: 2", b"Version: 9"))
    r = pair.push()
    assert not r.ok
    assert "held back" in r.error and "BAD signature" in r.error
    e = pair.edge.root
    # The previous release is still served whole: indices, every old package.
    assert served(e, INDEX + sorted(pool1)) == before
    assert (e / "README").read_text() == "version 1\n"  # a replacement waits too
    # Pure additions went live: nothing served names them yet.
    assert all((e / rel).read_bytes() == data for rel, data in pool2.items())
    held = pair.held_back()
    assert held["kinds"] and "bad_signature" in held["kinds"]
    assert pair.edge_meta("upstream_generation") == gen1
    staged = sorted(os.listdir(pair.edge.state / "staging"))
    assert staged  # the held-back index files wait in staging
    # The pusher recorded the failure, and `status` shows it.
    st = pair.cli("status", "--json")
    mirror = json.loads(st.stdout)["mirrors"][0]
    assert "held back" in mirror["last_error"] and mirror["generation"] != json.loads(st.stdout)["generation"]

    # The archive re-signs release 2: it publishes, and only the new
    # signature crosses the wire (the rest was staged by the failed push).
    pair.keys.sign_release(p)
    r = pair.push()
    assert r.ok, r.error
    # InRelease; Release.gpg only if signed in another second (a signature
    # stamps its time; an ed25519 signature is otherwise deterministic).
    assert 1 <= r.files_sent <= 2
    assert pair.in_sync()
    assert pair.held_back() is None
    assert not os.listdir(pair.edge.state / "staging")


def test_release_sha256_list_not_matching_packages_held_back(pair: Pair) -> None:
    pool1 = first_release(pair)
    before = served(pair.edge.root, INDEX + sorted(pool1))
    # Packages regenerated, Release still listing the old one, properly signed.
    build_release(pair.primary.root, pair.keys, 2, stale_release=True)
    # The primary checks its own chain first and refuses.
    proc = pair.cli("run", "--once")
    assert proc.returncode == EXIT_FAILURE
    assert "refusing to push" in proc.stderr and "--no-verify" in proc.stderr
    assert served(pair.edge.root, INDEX + sorted(pool1)) == before
    # Forced past its own check, the edge holds it back all the same.
    proc = pair.cli("run", "--once", "--no-verify")
    assert proc.returncode == EXIT_FAILURE
    # Said once: in run --once's report (its log repeated it before issue 28).
    assert "held back" in proc.stdout and "held back" not in proc.stderr
    assert f"{COMPONENT}/Packages" in proc.stdout and "in dists/stable/Release" in proc.stdout
    assert "index_mismatch" in pair.held_back()["kinds"]
    assert served(pair.edge.root, INDEX + sorted(pool1)) == before
    # Fixed at the source: the next run verifies and publishes.
    build_release(pair.primary.root, pair.keys, 2)
    proc = pair.cli("run", "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pair.in_sync()


@pytest.mark.parametrize("case, kind", [
    ("unknown", "unknown_key"),
    ("expired", "expired_key"),
    ("missing", "missing_signature"),
])
def test_signature_outcomes_held_back(pair: Pair, case: str, kind: str) -> None:
    pool1 = first_release(pair)
    before = served(pair.edge.root, INDEX + sorted(pool1))
    uid = {"unknown": OTHER, "expired": EXPIRED}.get(case)
    build_release(pair.primary.root, None if case == "missing" else pair.keys, 2,
                  **({"uid": uid} if uid else {}))
    r = pair.push()
    assert not r.ok and "held back" in r.error
    assert kind in pair.held_back()["kinds"], pair.held_back()
    # "missing" deletes InRelease and Release.gpg: a deletion waits too.
    assert served(pair.edge.root, INDEX + sorted(pool1)) == before
    # (No oracle: the edge stays on release 1 on purpose.  The tests above
    # run it once a good release has come.)


def check_chain(root: Path) -> str | None:
    """What apt with by-hash would trip on, or None: Release -> Packages
    (fetched by hash) -> every pool file it lists, at its size."""
    base = root / SUITE
    try:
        release = parse_release((base / "Release").read_bytes())
    except FileNotFoundError:
        return None
    for entry in release.sha256 or ():
        if not entry.path.endswith("/Packages"):
            continue
        by_hash = base / os.path.dirname(entry.path) / "by-hash/SHA256" / entry.digest.hex()
        try:
            data = by_hash.read_bytes()
        except FileNotFoundError:
            return f"{by_hash} missing"
        if hashlib.sha256(data).digest() != entry.digest:
            return f"{by_hash}: wrong content"
        for stanza in data.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
            if "Filename" not in fields:
                continue
            try:
                size = os.stat(root / fields["Filename"]).st_size
            except FileNotFoundError:
                return f"{fields['Filename']} missing"
            if size != int(fields["Size"]):
                return f"{fields['Filename']}: {size} bytes, Packages says {fields['Size']}"
    return None


def test_edge_is_consistent_at_every_moment_of_a_push(pair: Pair) -> None:
    first_release(pair)
    p = pair.primary.root
    # Release 2 brings 30 MB of packages and drops one of release 1.
    build_release(p, pair.keys, 2, pool={f"b/big{i}.deb": 2 << 20 for i in range(15)})
    os.unlink(p / "pool/main/p/pkg1_0.deb")
    stop = threading.Event()
    seen: set[bytes] = set()
    problems: list[str] = []
    checks = [0]

    def reader() -> None:
        release = pair.edge.root / SUITE / "Release"
        while not stop.is_set():
            try:
                before = release.read_bytes()
            except FileNotFoundError:
                continue
            problem = check_chain(pair.edge.root)
            # A check that straddled the switch to a new Release compared two
            # releases, as no client would; a check within one must pass.
            if release.read_bytes() == before:
                checks[0] += 1
                seen.add(hashlib.sha256(before).digest())
                if problem:
                    problems.append(problem)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        r = pair.push()
    finally:
        stop.set()
        t.join()
    assert r.ok, r.error
    assert problems == []
    assert len(seen) == 2 and checks[0] > 2  # the reader watched release 1 turn into release 2
    assert pair.in_sync()


def test_a_new_mirror_fed_during_the_scan_gets_nothing_of_a_refused_release(pair: Pair) -> None:
    # The first run --once pushes to a new mirror while it scans (fed the rows
    # if its scan is the slower); the primary's own check of its release comes
    # after the scan, and refuses: that push never commits, nothing is published.
    build_release(pair.primary.root, pair.keys, 1)
    build_release(pair.primary.root, pair.keys, 2, stale_release=True)  # Release lists the old Packages
    (pair.primary.root / "README").write_text("version 1\n")
    proc = pair.cli("-v", "run", "--once")
    assert proc.returncode == EXIT_FAILURE
    assert "refusing to push" in proc.stderr
    pair.edge.wait_agent_ended()  # its new directories, made ahead, are taken back as it ends
    assert tree_listing(pair.edge.root) == {}
    st = pair.cli("status", "--json")
    mirror = json.loads(st.stdout)["mirrors"][0]
    assert mirror["generation"] is None and not mirror["last_error"]  # the push was not what failed
    # Fixed at the source: the next run publishes.
    build_release(pair.primary.root, pair.keys, 2)
    proc = pair.cli("-v", "run", "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pair.in_sync()
