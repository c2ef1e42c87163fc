"""Where a prewarm's bytes come from: this node, or a sibling mirror that
holds its generation and probes faster; and how many streams carry them."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from ..config import Config, MirrorConfig
from ..errors import ConnectionLostError, SyncdError, UsageError
from ..protocol import FrameType
from .conn import StageConn, stage_mirror
from .pieces import Obj
from .result import SELF, Probe, human, probe_table

log = logging.getLogger(__package__)

PROBE_BYTES = 4 << 20
# A throughput sample stops after this long, whatever has arrived.
PROBE_SECONDS = 1.5
# Below this TCP handshake time a link is a LAN: one stream's window fills it.
LAN_RTT = 0.002


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def link_rtt(mirror: MirrorConfig, confirm: int = 2) -> float | None:
    """A TCP handshake to the mirror's SSH port, in seconds (None: no answer).

    One below LAN_RTT is taken as it is; a slower one may be a delay of the
    moment (a busy host or proxy: seen in one round of three through the
    benchmark's relay on loopback, which then chose 4 streams instead of 2),
    so ``confirm`` more are made and the fastest counts.
    """
    best = None
    for _ in range(1 + confirm):
        started = time.monotonic()
        try:
            with socket.create_connection((mirror.host, int(mirror.port or 22)),
                                          timeout=min(float(mirror.connect_timeout), 5.0)):
                took = time.monotonic() - started
        except OSError:
            return best
        best = took if best is None else min(best, took)
        if best < LAN_RTT:
            break
    return best


def default_streams(rtt: float | None = None) -> int:
    """Streams from the link and the cores.

    A stream's SSH channel window (2 MiB in OpenSSH) caps it at about
    window / RTT: 40 MB/s at 50 ms.  On such a link (RTT from 2 ms) more
    streams fill the pipe: two per core, at most 4 (beyond that the edge's
    disk and the handshakes gain nothing).  On a LAN one stream is not
    limited by its window, only by CPU: one stream per core, at most 4
    (docs/performance.md, "Prewarm").
    """
    n = _cores()
    if rtt is not None and rtt < LAN_RTT:
        return max(1, min(4, n))
    return max(1, min(4, 2 * n))


def streams_for(mirror: MirrorConfig) -> int:
    """The streams of a prewarm of ``mirror`` when none were asked for."""
    rtt = link_rtt(mirror)
    streams = default_streams(rtt)
    log.info("%s: %d stream(s) (link RTT %s, %d cores)", mirror.name, streams,
             "unknown" if rtt is None else f"{rtt * 1000:.1f} ms", _cores())
    return streams


def _probe_one(cfg: Config, mirror: MirrorConfig, sample: Obj | None, generation: int, timeout: float,
               open_session: Callable, out: Probe) -> None:
    try:
        t0 = time.monotonic()
        conn = StageConn(stage_mirror(mirror, io_timeout=timeout), open_session, "source", cfg.node.name)
        out.connect = time.monotonic() - t0
        try:
            held = conn.welcome.get("generation")
            out.generation = held if isinstance(held, int) else None
            upstream = conn.welcome.get("upstream")
            t1 = time.monotonic()
            conn.writer.message({"type": "get", "stream": 1, "path": b"x", "sha256": b"\0" * 32,
                                 "offset": 0, "length": 0})
            conn.writer.flush()
            conn.message("get_failed")
            out.rtt = time.monotonic() - t1
            if out.generation != generation or upstream != cfg.node.name:
                out.note = (f"holds generation {out.generation} from {upstream}, "
                            f"not {generation} from {cfg.node.name}")
                return
            if sample is None:
                out.ok = True
                return
            length = min(PROBE_BYTES, sample.size)
            t2 = time.monotonic()
            conn.writer.message({"type": "get", "stream": 1, "path": sample.path, "sha256": sample.sha256,
                                 "offset": 0, "length": length})
            conn.writer.flush()
            head = conn.message()
            if head.get("type") != "range":
                out.note = f"sample refused: {head.get('error')}"
                return
            got = 0
            while True:
                frame = conn.reader.read_frame()
                if frame is None:
                    raise ConnectionLostError("the source closed the connection")
                if frame.kind is FrameType.DATA:
                    got += len(frame.payload)
                    if time.monotonic() - t2 > PROBE_SECONDS:
                        out.note = f"sampled {human(got)} in {PROBE_SECONDS:.0f} s"
                        break  # a slow source: what arrived so far is the measure
                elif frame.kind is FrameType.END:
                    break
            out.rate = got / max(time.monotonic() - t2, 1e-6)
            out.ok = True
        finally:
            conn.close()
    except SyncdError as err:
        out.note = str(err).splitlines()[0][:120]


def probe_names(cfg: Config, mirror: MirrorConfig, wanted: list[str] | None) -> list[str]:
    """The other mirrors that may serve a prewarm of ``mirror`` (each is
    probed), in ``--from``'s order when it is given."""
    others = [m.name for m in cfg.mirrors if m.name != mirror.name]
    return others if wanted is None else [n for n in wanted if n in others]


def choose_source(cfg: Config, mirror: MirrorConfig, wanted: list[str] | None, objs: list[Obj], generation: int,
                   timeout: float, open_session: Callable) -> tuple[MirrorConfig | None, list[Probe]]:
    others = {m.name: m for m in cfg.mirrors if m.name != mirror.name}
    if wanted is not None:
        for name in wanted:
            if name not in others and name not in (SELF, cfg.node.name):
                raise UsageError(f"--from: {name!r} is neither 'self' nor another [mirror:NAME] of {cfg.path}")
        allow_self = SELF in wanted or cfg.node.name in wanted
    else:
        allow_self = True
    names = probe_names(cfg, mirror, wanted)
    sample = max(objs, key=lambda o: o.size, default=None)
    probes = [Probe(name) for name in names]
    threads = [threading.Thread(target=_probe_one, daemon=True, name=f"probe {p.name}",
                                args=(cfg, others[p.name], sample, generation, timeout, open_session, p))
               for p in probes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t, p in zip(threads, probes):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            p.ok = False
            p.note = p.note or f"no answer within {timeout:.0f} s"
    own = Probe(f"{SELF} ({cfg.node.name})", connect=0.0, rtt=0.0, generation=generation, ok=allow_self,
                note="fallback" if allow_self else "excluded by --from")
    if sample is not None and allow_self:
        t0 = time.monotonic()
        try:
            with open(os.path.join(os.fsencode(cfg.node.root), sample.path), "rb") as fh:
                n = len(fh.read(PROBE_BYTES))
            own.rate = n / max(time.monotonic() - t0, 1e-6)
        except OSError as err:
            own.note = f"cannot read: {err.strerror}"
    probes.append(own)
    usable = [p for p in probes[:-1] if p.ok]
    if usable:
        best = max(usable, key=lambda p: (p.rate or 0.0, -(p.rtt or 0.0)))
        best.chosen = True
        return others[best.name], probes
    if allow_self:
        own.chosen = True
        return None, probes
    raise SyncdError(f"--from {','.join(wanted or [])}: no usable source holds generation {generation} "
                     f"of {cfg.node.name}\n{probe_table(probes)}")
