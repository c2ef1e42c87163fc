"""The status report as data: this node, then each downstream of the tree below it.

``syncd status`` renders it (as text, or as JSON: the field names and their
order are the JSON keys).  Direct mirrors come from the manifest's
downstreams (what each acknowledged, and its last result); the mirrors below
them from meta ``last_tree``, the report of the last push through the tree:
as fresh as that push, and marked with its time (``as_of``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config, MirrorConfig
from .manifest import META_HELD_BACK, Manifest

log = logging.getLogger(__name__)

# prewarm.PROGRESS_FILE, written (and rewritten as it goes) by a prewarm in
# progress; named here so that status does not pay for prewarm's imports.
PREWARM_PROGRESS = "prewarm.json"


@dataclass
class TreeMirror:
    """A mirror below a direct one, as the last push through the tree left it."""

    name: str
    generation: int | None
    lag_generations: int | None
    lag_seconds: float | None
    ok: bool
    last_success: str | None
    last_error: Any  # the agent's text, kept as the report holds it
    bytes_sent: int
    files_sent: int
    failover_from: Any
    as_of: str | None
    below: list[TreeMirror]


@dataclass
class MirrorStatus:
    """A direct mirror, from what it acknowledged and its last push's result."""

    name: str
    host: str
    generation: int | None
    lag_generations: int | None
    lag_seconds: float | None
    last_success: str | None
    last_error: str | None
    last_error_at: str | None
    bytes_sent: int
    files_sent: int
    via: str | None
    below: list[TreeMirror]


@dataclass
class NodeStatus:
    node: str
    root: str
    upstream: str | None
    generation: int
    generation_age_s: float | None
    files: int
    dirs: int
    symlinks: int
    total_size: int
    tombstones: int
    #: meta ``held_back`` as the agent wrote it, plus ``at`` (ISO time).
    held_back: dict | None
    #: prewarm.json's keys as they are, or ``{"error": ...}``; plus
    #: ``running``: whether the prewarm that wrote it still runs.
    prewarm: dict | None
    mirrors: list[MirrorStatus]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def iso(ns: int | float | None) -> str | None:
    """ISO 8601 in the local time zone as ``TZ`` (or /etc/localtime) gives it,
    with its offset; ``Z`` for UTC."""
    if ns is None:
        return None
    text = datetime.fromtimestamp(ns / 1e9, timezone.utc).astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def node_status(cfg: Config) -> NodeStatus:
    """Read this node's manifest (which must exist) into its report."""
    with Manifest.open(cfg.node.state_dir, cfg.node.name, create=False) as manifest:
        return _Report(cfg, manifest, time.time_ns()).build()


class _Report:
    """One report's reading of the manifest, at one moment (``now_ns``)."""

    def __init__(self, cfg: Config, manifest: Manifest, now_ns: int) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.now_ns = now_ns
        self.stats = manifest.stats()

    def build(self) -> NodeStatus:
        stats, manifest = self.stats, self.manifest
        acked = {d["name"]: d for d in manifest.downstreams()}
        tree = {str(r.get("mirror")): r for r in (self._loads("last_tree") or []) if isinstance(r, dict)}
        held_back = self._loads(META_HELD_BACK)
        return NodeStatus(
            node=self.cfg.node.name,
            root=str(self.cfg.node.root),
            upstream=manifest.get_meta("upstream"),
            generation=stats.generation,
            generation_age_s=(
                round((self.now_ns - stats.generation_created_ns) / 1e9, 3) if stats.generation_created_ns else None
            ),
            files=stats.files,
            dirs=stats.dirs,
            symlinks=stats.symlinks,
            total_size=stats.total_size,
            tombstones=stats.tombstones,
            held_back=(
                dict(held_back, at=iso(held_back.get("at_ns") if isinstance(held_back.get("at_ns"), int) else None))
                if isinstance(held_back, dict) else None
            ),
            prewarm=prewarm_progress(self.cfg.node.state_dir),
            mirrors=[self._mirror(m, acked.get(m.name, {}), tree.get(m.name) or {}) for m in self.cfg.mirrors],
        )

    def _mirror(self, m: MirrorConfig, d: dict, last: dict) -> MirrorStatus:
        held = d.get("generation")
        lag_g, lag_s = self._lag(held)
        last_push = max((t for t in (d.get("last_success_ns"), d.get("last_error_ns")) if t is not None),
                        default=None)
        return MirrorStatus(
            name=m.name,
            host=f"{m.host}:{m.port}",
            generation=held,
            lag_generations=lag_g,
            lag_seconds=lag_s,
            last_success=iso(d.get("last_success_ns")),
            last_error=d.get("last_error"),
            last_error_at=iso(d.get("last_error_ns")),
            bytes_sent=d.get("bytes_sent") or 0,
            files_sent=d.get("files_sent") or 0,
            via=m.via,
            below=self._below(last.get("below"), last_push),
        )

    def _below(self, raw_results: object, as_of: int | None) -> list[TreeMirror]:
        """A ``last_tree`` subtree, nested the same way."""
        out = []
        for r in raw_results if isinstance(raw_results, list) else []:
            if not isinstance(r, dict):
                continue
            ok = r.get("ok") is True
            gen = r.get("generation") if isinstance(r.get("generation"), int) else None
            before = r.get("held_before") if isinstance(r.get("held_before"), int) else None
            held = gen if ok else before
            lag_g, lag_s = self._lag(held)
            out.append(TreeMirror(
                name=str(r.get("mirror")),
                generation=held,
                lag_generations=lag_g,
                lag_seconds=lag_s,
                ok=ok,
                last_success=iso(as_of) if ok else None,
                last_error=None if ok else r.get("error"),
                bytes_sent=int(r.get("bytes_sent") or 0),
                files_sent=int(r.get("files_sent") or 0),
                failover_from=r.get("failover_from"),
                as_of=iso(as_of),
                below=self._below(r.get("below"), as_of),
            ))
        return out

    def _lag(self, held: int | None) -> tuple[int | None, float | None]:
        """Generations behind, and for how long: since this node made the
        first generation the downstream lacks."""
        if held is None:
            return None, None
        current = self.stats.generation
        if held >= current:
            return 0, 0.0
        lacked = self.manifest.first_generation_after(held)
        return current - held, None if lacked is None else round((self.now_ns - lacked) / 1e9, 3)

    def _loads(self, key: str) -> Any:
        """Meta ``key``'s JSON, whatever it holds; None when unset or not JSON."""
        text = self.manifest.get_meta(key)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            log.warning("%s: meta %s is not valid JSON; ignored", self.manifest.path, key)
            return None


def prewarm_progress(state_dir: Path) -> dict | None:
    """A prewarm's progress file as it is (its keys shown as they are), None
    when there is none, ``{"error": ...}`` when it cannot be read."""
    progress = Path(state_dir) / PREWARM_PROGRESS
    try:
        text = progress.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        return {"error": f"{progress}: {err.strerror or err}"}
    try:
        state = json.loads(text)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        return {"error": f"{progress}: not a JSON object"}
    state["running"] = state.get("phase") not in ("done", "failed") and _alive(state.get("pid"), state.get("started"))
    return state


def _alive(pid: object, started: object) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started``
    (seconds since the epoch): a prewarm stopped by Ctrl-C or kill -9 leaves
    its progress file behind, and its PID may since be another process's."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        return True  # nothing to tell a reused PID by
    # starttime, field 22 of stat(5): clock ticks after boot (the fields
    # after the command's ")" start at field 3).
    began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return began <= started + 1.0  # btime is whole seconds


__all__ = ["MirrorStatus", "NodeStatus", "TreeMirror", "iso", "node_status", "prewarm_progress"]

