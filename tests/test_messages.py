"""The wire's messages as types (syncd.messages): every valid message decodes
and encodes back to itself, through the codec too; anything else is a
ProtocolError and nothing but one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import messages
from syncd.errors import ProtocolError
from syncd.manifest import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry
from syncd.messages import Item, Row, decode
from syncd.plan import ACTIONS
from syncd.protocol import decode_value, encode_value

I64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
U = st.integers(min_value=0, max_value=(1 << 63) - 1)
SHA = st.binary(min_size=32, max_size=32)
_COMPONENT = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
NAME = st.lists(_COMPONENT, min_size=1, max_size=4).map(b"/".join)
MODE = st.integers(min_value=0, max_value=0o7777)
TARGET = st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)


@st.composite
def rows(draw, path=NAME) -> list:  # noqa: ANN001
    kind = draw(st.sampled_from([KIND_FILE, KIND_DIR, KIND_SYMLINK]))
    deleted = draw(st.sampled_from([0, 1]))
    sha = draw(SHA) if kind == KIND_FILE and not deleted else draw(st.none() | SHA)
    target = draw(TARGET) if kind == KIND_SYMLINK and not deleted else draw(st.none() | TARGET)
    return [draw(path), kind, draw(U), draw(I64), draw(MODE), sha, target, deleted, draw(I64)]


def _optional(draw, out: dict, key: str, value) -> None:  # noqa: ANN001
    if draw(st.booleans()):
        out[key] = draw(value)


@st.composite
def hellos(draw) -> dict:  # noqa: ANN001
    out = {"type": "hello"}
    _optional(draw, out, "node", st.text(max_size=10))
    _optional(draw, out, "mirror", st.text(max_size=10))
    return out


@st.composite
def begins(draw) -> dict:  # noqa: ANN001
    full = draw(st.booleans())
    out: dict = {"type": "begin", "generation": draw(st.none() | I64) if full else draw(I64)}
    out["full"] = full  # the pusher always sends it
    _optional(draw, out, "dry_run", st.booleans())
    _optional(draw, out, "filter", st.lists(st.sampled_from(
        ["- *.iso", "+ pool/**", "- /project/trace/", "+ a?c", "- *~", "include dists/", "exclude *.tmp"]),
        max_size=4))
    _optional(draw, out, "max_delete_ppm", st.integers(min_value=0, max_value=1_000_000))
    for key in ("force_deletes", "fuzzy", "hardlinks", "itemize"):
        _optional(draw, out, key, st.booleans())
    return out


@st.composite
def entries(draw) -> dict:  # noqa: ANN001
    batch = draw(st.lists(rows(), max_size=6))
    out = {"type": "entries", "batch": draw(I64), "rows": batch}
    if batch and draw(st.booleans()):
        named = draw(st.lists(st.integers(min_value=0, max_value=len(batch) - 1), unique=True, max_size=len(batch)))
        out["links"] = [[i, draw(NAME), draw(st.integers(min_value=2, max_value=9))] for i in named]
    return out


@st.composite
def files(draw) -> dict:  # noqa: ANN001
    out = {"type": "file", "stream": draw(I64), "path": draw(NAME),
           "how": draw(st.sampled_from(["whole", "zstd", "delta"])), "size": draw(U), "sha256": draw(st.binary())}
    _optional(draw, out, "sparse", st.booleans())
    _optional(draw, out, "offset", I64)
    return out


@st.composite
def bundles(draw) -> dict:  # noqa: ANN001
    items = draw(st.lists(st.tuples(NAME, st.integers(min_value=0, max_value=1 << 20), SHA).map(list),
                          min_size=1, max_size=8))
    return {"type": "files", "stream": draw(I64), "how": draw(st.sampled_from(["whole", "zstd"])), "items": items}


@st.composite
def commits(draw) -> dict:  # noqa: ANN001
    out: dict = {"type": "commit", "generation": draw(I64)}
    if draw(st.booleans()):
        out["root"] = draw(st.none() | st.tuples(MODE, I64, I64).map(
            lambda t: [b"", KIND_DIR, 0, t[1], t[0], None, None, 0, t[2]]))
    return out


VALID = st.one_of(hellos(), begins(), entries(), files(), bundles(), commits(),
                  st.sampled_from(["entries_end", "cascade", "abort", "bye"]).map(lambda t: {"type": t}))

# Any value of the codec, for the hostile ones.
VALUES = st.recursive(
    st.none() | st.booleans() | I64 | st.binary(max_size=40) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(VALID)
def test_a_valid_message_decodes_and_encodes_back_to_itself(msg: dict) -> None:
    decoded = decode(msg)
    assert decoded.to_wire() == msg
    # and through the codec: the same value, so the same bytes for the same key order
    assert decode(decode_value(encode_value(msg))).to_wire() == decode_value(encode_value(msg))
    assert decode(decoded.to_wire()) == decoded


@settings(max_examples=600, deadline=None)
@given(VALID, st.data())
def test_a_changed_message_is_a_protocol_error_or_still_a_message(msg: dict, data: st.DataObject) -> None:
    hostile = dict(msg)
    keys = sorted(k for k in hostile if k != "type")
    how = data.draw(st.sampled_from(["drop", "replace", "add", "nest"]))
    if how == "drop" and keys:
        del hostile[data.draw(st.sampled_from(keys))]
    elif how == "replace" and keys:
        hostile[data.draw(st.sampled_from(keys))] = data.draw(VALUES)
    elif how == "nest" and isinstance(hostile.get("rows"), list) and hostile["rows"]:
        row = list(hostile["rows"][0])
        row[data.draw(st.integers(min_value=0, max_value=len(row) - 1))] = data.draw(VALUES)
        hostile["rows"] = [row] + hostile["rows"][1:]
    else:
        hostile[data.draw(st.text(max_size=8))] = data.draw(VALUES)
    try:
        decode(hostile)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_any_value_is_a_message_or_a_protocol_error(value) -> None:  # noqa: ANN001
    try:
        decode(value)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(messages.TO_AGENT)), st.dictionaries(st.text(max_size=10), VALUES, max_size=6))
def test_any_keys_under_a_known_type_are_a_message_or_a_protocol_error(kind: str, rest: dict) -> None:
    try:
        decode({**rest, "type": kind})
    except ProtocolError:
        pass


@pytest.mark.parametrize("msg, error", [
    ([1, 2], "a MESSAGE frame without a 'type'"),
    ({"type": 7}, "a MESSAGE frame without a 'type'"),
    ({"type": "put"}, "unknown message type 'put'"),
    ({"type": "begin", "generation": True}, "'begin' message: field 'generation' missing or not int"),
    ({"type": "begin", "generation": 1, "max_delete_ppm": 1_000_001},
     "begin: max_delete_ppm is not an integer from 0 to 1000000"),
    ({"type": "begin", "generation": 1, "filter": "- *"}, "begin: filter is not a list of rules"),
    ({"type": "entries", "batch": 1, "rows": [[b"a"]]}, "entries: a row is not a list of 9 fields"),
    ({"type": "entries", "batch": 1, "rows": [[b"../x", 0, 0, 0, 0, b"s" * 32, None, 0, 1]]},
     "unsafe path '../x': '..' component"),
    ({"type": "entries", "batch": 1, "rows": [[b"x", 0, 0, 0, 0o10000, b"s" * 32, None, 0, 1]]},
     "entries: x: size or mode out of range"),
    ({"type": "entries", "batch": 1, "rows": [[b"x", 2, 0, 0, 0, None, b"", 0, 1]]},
     "entries: x: a symlink without a valid target"),
    ({"type": "entries", "batch": 1, "rows": [], "links": [[0, b"a", 2]]}, "entries: bad links entry [0, b'a', 2]"),
    ({"type": "file", "stream": 1, "path": b"a", "how": "gzip", "size": 1, "sha256": b""},
     "file a: unknown encoding 'gzip'"),
    ({"type": "file", "stream": 1, "path": b"a", "how": "whole", "size": 1, "sha256": b"", "offset": "1"},
     "file a: offset is not an integer"),
    ({"type": "files", "stream": 1, "how": "whole", "items": []}, "files: 0 items, outside [1, 4096]"),
    ({"type": "files", "stream": 1, "how": "whole", "items": [[b"a", 17 << 20, b"s" * 32]]},
     f"files: {17 << 20} bytes, above {16 << 20}"),
    ({"type": "commit", "generation": 3, "root": [b"x", 1, 0, 0, 0o755, None, None, 0, 3]},
     "commit: root is not a row of 9 fields with the empty path"),
    ({"type": "commit", "generation": 3, "root": [b"", 0, 0, 0, 0o755, None, None, 0, 3]},
     "commit: root is not a live directory"),
])
def test_invalid_messages_say_why_in_one_line(msg, error: str) -> None:  # noqa: ANN001
    with pytest.raises(ProtocolError) as caught:
        decode(msg)
    assert str(caught.value) == error


def test_a_begin_without_a_generation_is_a_full_comparisons_only() -> None:
    assert decode({"type": "begin", "generation": None, "full": True}).generation is None
    with pytest.raises(ProtocolError, match="field 'generation'"):
        decode({"type": "begin", "generation": None, "full": False})


def test_links_name_their_rows() -> None:
    row = [b"a", KIND_FILE, 3, 0, 0o644, b"s" * 32, None, 0, 1]
    msg = decode({"type": "entries", "batch": 1, "rows": [row, [b"b", *row[1:]]], "links": [[1, b"a", 2]]})
    assert [(r.path, r.link, r.names) for r in msg.rows] == [(b"a", None, 1), (b"b", b"a", 2)]


@given(rows())
def test_a_manifest_entry_goes_on_the_wire_as_the_row_it_decodes_to(raw: list) -> None:
    path, kind, size, mtime_ns, mode, sha, target, deleted, gen = raw
    parent, _, name = path.rpartition(b"/")
    entry = Entry(parent, name, kind, size, mtime_ns, 0, mode, 0, sha, target, gen, deleted, 0, 1)
    assert Row.wire(entry) == raw == Row.from_wire(Row.wire(entry)).to_wire()


@given(st.sampled_from(ACTIONS), NAME, st.sampled_from([None, "whole", "delta", "copy", "later"]),
       st.none() | NAME, st.none() | I64, st.none() | st.just(">f+++++++++"))
def test_an_item_is_five_fields_or_six_with_its_flags(action: str, path: bytes, need, source, sig, flags) -> None:  # noqa: ANN001
    item = Item(action, path, need, source, sig, flags)
    wire = item.to_wire()
    assert len(wire) == (5 if flags is None else 6)
    assert Item.from_wire(wire) == item
    assert decode_value(encode_value(item)) == list(item)  # a tuple travels as a list


@pytest.mark.parametrize("raw", [[], "x", ["new", b"a", None, None], ["nope", b"a", None, None, None],
                                 ["new", "a", None, None, None], ["new", b"a", None, None, None, None, None]])
def test_a_bad_item_is_a_protocol_error(raw) -> None:  # noqa: ANN001
    with pytest.raises(ProtocolError):
        Item.from_wire(raw)


def test_field_says_which_key_of_which_message() -> None:
    assert messages.field({"type": "x", "n": 3}, "n", int) == 3
    for bad in ({"type": "x"}, {"type": "x", "n": True}, {"type": "x", "n": "3"}):
        with pytest.raises(ProtocolError, match=r"^'x' message: field 'n' missing or not int$"):
            messages.field(bad, "n", int)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=16) | st.sampled_from(["+ ", "- ", "+ [", "- \\", "- **/[a-", "include "]).flatmap(
    lambda head: st.text(max_size=8).map(lambda tail: head + tail)), max_size=4))
def test_any_filter_rules_are_a_begin_or_a_protocol_error(rules: list[str]) -> None:
    try:
        decode({"type": "begin", "generation": 1, "filter": rules})
    except ProtocolError:
        pass


# -- a stage-only agent's messages (docs/protocol.md, section 7) -----------------------


@st.composite
def stage_messages(draw) -> dict:  # noqa: ANN001
    kind = draw(st.sampled_from(["hello", "have", "put", "get", "bye", "agent"]))
    out: dict = {"type": kind}
    if kind == "hello":
        out["role"] = draw(st.sampled_from(["edge", "source"]))
        _optional(draw, out, "node", st.text(max_size=8))
        _optional(draw, out, "mirror", st.text(max_size=8))
    elif kind == "have":
        out["objects"] = draw(st.lists(st.tuples(SHA, U, NAME, I64).map(list), max_size=5))
        _optional(draw, out, "batch", I64)
    elif kind == "put":
        size = draw(st.integers(min_value=0, max_value=1 << 40))
        offset = draw(st.integers(min_value=0, max_value=size))
        out.update(stream=draw(I64), sha256=draw(SHA), size=size, offset=offset,
                   length=draw(st.integers(min_value=0, max_value=size - offset)),
                   how=draw(st.sampled_from(["whole", "zstd"])))
        _optional(draw, out, "digest", st.sampled_from(messages.RANGE_DIGESTS))
        _optional(draw, out, "run", st.booleans())
        _optional(draw, out, "sparse", st.booleans())
    elif kind == "get":
        out.update(stream=draw(I64), path=draw(NAME), sha256=draw(st.binary(max_size=40)), offset=draw(I64),
                   length=draw(I64))
        _optional(draw, out, "digest", st.sampled_from(messages.RANGE_DIGESTS))
        _optional(draw, out, "sparse", st.booleans())
    return out


@settings(max_examples=300, deadline=None)
@given(stage_messages())
def test_a_valid_stager_message_decodes_and_encodes_back_to_itself(msg: dict) -> None:
    assert decode(msg, messages.TO_STAGER).to_wire() == msg


@settings(max_examples=300, deadline=None)
@given(stage_messages(), st.data())
def test_a_changed_stager_message_is_a_protocol_error_or_still_a_message(msg: dict, data: st.DataObject) -> None:
    hostile = dict(msg)
    keys = sorted(k for k in hostile if k != "type")
    if keys and data.draw(st.booleans()):
        del hostile[data.draw(st.sampled_from(keys))]
    elif keys:
        hostile[data.draw(st.sampled_from(keys))] = data.draw(VALUES)
    try:
        decode(hostile, messages.TO_STAGER)
    except ProtocolError:
        pass


@pytest.mark.parametrize("msg, error", [
    ({"type": "hello", "role": "sink"}, "hello: unknown role 'sink'"),
    ({"type": "have", "objects": {}}, "have: objects is not a list"),
    ({"type": "have", "objects": [[b"s" * 31, 1, b"a", 0]]}, "have: an object is not [sha256, size, path, mtime_ns]"),
    ({"type": "put", "stream": 1, "sha256": b"s" * 32, "size": 4, "offset": 2, "length": 3, "how": "whole"},
     "put: bad object name or range"),
    ({"type": "put", "stream": 1, "sha256": b"s" * 32, "size": 4, "offset": 0, "length": 4, "how": "lz4"},
     "put: unknown encoding 'lz4'"),
    ({"type": "get", "stream": 1, "path": b"a", "sha256": b"", "offset": 0, "length": 1, "digest": "md5"},
     "get: unknown digest 'md5'"),
    ({"type": "begin", "generation": 1}, "unknown message type 'begin'"),
])
def test_invalid_stager_messages_say_why_in_one_line(msg: dict, error: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(msg, messages.TO_STAGER)
    assert str(caught.value) == error
