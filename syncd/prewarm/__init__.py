"""``syncd prewarm NAME``: fill a new or stale downstream before it takes traffic.

Two phases.  Phase 1 stages content on the edge, in parallel: N worker
processes (a process each, since a stream in Python keeps a core busy), each
with its own SSH connection (OpenSSH's ``ssh`` when installed, else
paramiko) to a stage-only receiver on the edge (``syncd agent --stage``,
``stager``).  The objects the edge lacks (by SHA-256) are cut into
ranges, large files first so one ISO is spread over every stream, small
files batched; workers take the next item from a shared queue, so a slow
stream never holds the others back.  The bytes come from this node's root,
or, when a sibling mirror already holds this node's generation and probes
faster, from that mirror's stage-only server (each worker then relays one
range at a time from the source to the edge).

Phase 2 is an ordinary push (``push_with_retries``): everything it would ask
for is already staged, so it moves almost nothing, publishes in the safe
order and records the manifest, generation and trace exactly as an
incremental push does.  Phase 1 is only an accelerator: whatever it failed to
stage, phase 2 sends.

Resuming needs no state on this node: the edge's staging area is the state.
Staged objects are found by content; ranges of a large object that were
verified and recorded are not sent again.

Progress goes to ``state_dir/prewarm.json`` (read by ``status``), to a rich
progress bar when stdout is a terminal, and to the log every few seconds.

The modules:

- ``driver``: the run (:func:`prewarm`, ``syncd prewarm``): snapshot,
  source, staging attempts, the push;
- ``sources``: the probes of the sibling mirrors, the streams a link wants;
- ``pieces``: this node's objects, the edge's state of each, the work items;
- ``streams``: the stream workers (processes), their shared queue and counters;
- ``conn``: a session to a stage-only agent;
- ``progress``: prewarm.json, the progress bar, the log;
- ``result``: the result and the probe table;
- ``stager`` (with ``put``): the stage-only agent itself, the edge's end;
- ``codec``: a range's digest, which both ends share (its compression is syncd.compress's).

The two ends start apart: the edge's stage-only agent (``syncd agent
--stage``, one per stream) imports ``stager`` and what it needs, not the
driver's push, scan and multiprocessing.  So the names below are loaded
from their modules at first use (PEP 562), not by this file: that saves
each stager's start the time docs/performance.md ("Start-up") gives.
Every module logs as ``syncd.prewarm``.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "prewarm": "driver", "cmd_prewarm": "driver",
    "PrewarmResult": "result", "Probe": "result", "probe_table": "result", "SELF": "result",
    "link_rtt": "sources", "default_streams": "sources", "LAN_RTT": "sources",
    "stage_mirror": "conn", "session_factory": "conn",
    "Obj": "pieces",
    "PROGRESS_FILE": "progress",
    "Stager": "stager", "serve_stage_stdio": "stager", "FEATURES": "stager",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
