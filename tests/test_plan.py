"""Planning, the pure part: index classification, publish order, the deletion guard."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import DeletionGuardError
from syncd.plan import DEFAULT_INDEX_PATTERNS, IndexMatcher, check_deletions, deletion_order

COMPONENT = st.binary(min_size=1, max_size=8).filter(lambda b: b"/" not in b and b"\0" not in b)
PATHS = st.lists(COMPONENT, min_size=1, max_size=5).map(lambda parts: b"/".join(parts))


@given(st.lists(PATHS, max_size=30, unique=True))
def test_deletion_order_puts_everything_before_its_parent(paths: list[bytes]) -> None:
    order = deletion_order(paths)
    assert sorted(order) == sorted(paths)
    position = {p: i for i, p in enumerate(order)}
    for p in paths:
        for q in paths:
            if q.startswith(p + b"/"):
                assert position[q] < position[p], (q, p)


@given(deleting=st.integers(0, 10_000), live=st.integers(0, 10_000),
       share=st.floats(0.0, 1.0, allow_nan=False), force=st.booleans())
def test_deletion_guard_refuses_exactly_above_the_share(deleting: int, live: int, share: float, force: bool) -> None:
    refuse = not force and deleting > 0 and live > 0 and share < 1.0 and deleting > share * live
    if refuse:
        with pytest.raises(DeletionGuardError, match="nothing was changed"):
            check_deletions(deleting, live, share, force=force, where="edge")
    else:
        check_deletions(deleting, live, share, force=force, where="edge")


INDEX = [
    b"dists/stable/Release", b"dists/stable/InRelease", b"dists/stable/Release.gpg",
    b"dists/stable/main/binary-amd64/Packages", b"dists/stable/main/binary-amd64/Packages.xz",
    b"dists/stable/main/source/Sources.gz", b"dists/stable/main/Contents-amd64.gz",
    b"dists/stable/main/i18n/Translation-en.bz2",
    b"dists/stable/main/binary-amd64/by-hash/SHA256/0123abcd",
    b"fedora/39/x86_64/repodata/repomd.xml", b"fedora/39/x86_64/repodata/repomd.xml.asc",
    b"simple/index.html", b"simple/requests/index.html", b"releases/1.0/SHA256SUMS",
    b"releases/1.0/SHA256SUMS.gpg",
]
DATA = [
    b"pool/main/h/hello/hello_2.10-3_amd64.deb", b"fedora/39/x86_64/Packages/h/hello-2.10.rpm",
    b"README", b"releases/1.0/debian-12.iso", b"simple/requests/requests-2.31.tar.gz",
    b"dists/stable/main/binary-amd64/Packages-old/readme.txt",
]


@pytest.mark.parametrize("path", INDEX)
def test_index_files_are_recognized(path: bytes) -> None:
    assert IndexMatcher()(path)


@pytest.mark.parametrize("path", DATA)
def test_data_files_are_not_index_files(path: bytes) -> None:
    assert not IndexMatcher()(path)


@given(prefix=st.lists(COMPONENT, max_size=4))
def test_a_name_pattern_matches_at_any_depth(prefix: list[bytes]) -> None:
    path = b"/".join(prefix + [b"InRelease"])
    assert IndexMatcher()(path)
    assert not IndexMatcher()(path + b".orig.txt")


def test_custom_patterns_replace_the_defaults() -> None:
    matcher = IndexMatcher(("index.json", "meta/*.yaml"))
    assert matcher(b"a/b/index.json") and matcher(b"x/meta/v1.yaml")
    assert not matcher(b"dists/stable/Release") and not matcher(b"x/meta/sub/v1.yaml")
    assert "Release" in DEFAULT_INDEX_PATTERNS
