"""What a prewarm sends: this node's objects (one per content), what the
edge holds of each, and the work items the streams take."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, MirrorConfig
from ..errors import ProtocolError
from ..filters import Filter
from ..lock import StateLock
from ..manifest import KIND_FILE, Manifest
from ..partial import contains
from ..push import filter_rules
from ..scan import scan
from .conn import StageConn

# Small files travel in batches of about this many bytes per work item.
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
HAVE_BATCH = 1000


@dataclass(frozen=True)
class Obj:
    sha256: bytes
    size: int
    path: bytes
    mtime_ns: int
    generation: int  # the newest generation among the paths holding this content


def work_items(objs: list[Obj], states: list[list], range_size: int, streams: int = 1) -> list[list[tuple]]:
    """Work items: lists of (sha256, size, path, offset, length, run), large objects first.

    A large object the edge holds nothing of, and no larger than one
    stream's share of the work, is one item: its ranges in order on one
    stream (``run``), which the stager hashes on arrival instead of reading
    the object back.  A larger one, or one with ranges already there, is cut
    into one item per range, so that every stream carries some of it."""
    runs: list[list[tuple]] = []
    big: list[list[tuple]] = []
    small: list[list[tuple]] = []
    batch: list[tuple] = []
    batch_bytes = 0
    order = sorted(range(len(objs)), key=lambda i: -objs[i].size)
    todo = sum(objs[i].size for i in order if states[i][0] not in ("staged", "published"))
    share = todo / max(1, streams)
    for i in order:
        o = objs[i]
        state, ranges = states[i]
        if state in ("staged", "published"):
            continue
        if o.size > range_size:
            done = [tuple(r) for r in ranges] if state == "partial" else []
            whole_run = state == "none" and o.size <= share
            pieces = [(o.sha256, o.size, o.path, off, min(range_size, o.size - off), whole_run)
                      for off in range(0, o.size, range_size)
                      if not contains(done, off, min(range_size, o.size - off))]
            if whole_run:
                runs.append(pieces)
            else:
                big.extend([p] for p in pieces)
            continue
        batch.append((o.sha256, o.size, o.path, 0, o.size, False))
        batch_bytes += o.size
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            small.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        small.append(batch)
    return runs + big + small


def snapshot(cfg: Config, mirror: MirrorConfig) -> tuple[int, list[Obj]]:
    """This node's generation and its live files (one per content) under the lock."""
    cfg.node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    flt = Filter.parse(filter_rules(cfg, mirror))
    with StateLock(cfg.node.state_dir, "prewarm"), Manifest.open(cfg.node.state_dir, cfg.node.name) as m:
        # As run --once: only a node that publishes by itself scans its root.
        if m.get_meta("upstream") is None:
            scan(cfg.node.root, m, workers=cfg.node.hash_workers)
        objs: dict[bytes, Obj] = {}
        for e in m.entries(include_deleted=False):
            if e.kind != KIND_FILE or e.sha256 is None:
                continue
            if flt and flt.excluded_path(e.path, False):
                continue
            known = objs.get(e.sha256)
            if known is None or known.generation < e.generation:
                objs[e.sha256] = Obj(e.sha256, e.size, e.path, e.mtime_ns, e.generation)
        return m.generation, list(objs.values())


def query_edge(conn: StageConn, node: str, objs: list[Obj], generation: int) -> tuple[list[Obj], list[list]]:
    """The objects the coming push will ask for, and the edge's state of each,
    asked on the first stream's session before it sends anything.

    An edge that holds an older generation of this node gets an incremental
    push: only content stamped after it (what it already has is no concern
    of a prewarm, and staging more would leave objects no push consumes).
    """
    held = conn.welcome.get("generation")
    if (isinstance(held, int) and not isinstance(held, bool) and held <= generation
            and conn.welcome.get("upstream") == node):
        objs = [o for o in objs if o.generation > held]
    states: list[list] = []
    for start in range(0, len(objs), HAVE_BATCH):
        batch = objs[start:start + HAVE_BATCH]
        conn.writer.message({"type": "have", "batch": start,
                             "objects": [[o.sha256, o.size, o.path, o.mtime_ns] for o in batch]})
        conn.writer.flush()
        answer = conn.message("have").get("objects")
        if not isinstance(answer, list) or len(answer) != len(batch):
            raise ProtocolError("have: the answer does not match the question")
        states.extend(answer)
    return objs, states
