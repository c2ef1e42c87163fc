"""What a prewarm reports: its result, and the probes of its sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SELF = "self"


@dataclass
class Probe:
    name: str
    connect: float | None = None  # SSH handshake, login and command start, seconds
    rtt: float | None = None  # one protocol round trip, seconds
    rate: float | None = None  # sample throughput, bytes/s
    generation: int | None = None
    ok: bool = False
    note: str = ""
    chosen: bool = False


@dataclass
class PrewarmResult:
    mirror: str
    generation: int = 0
    source: str = SELF
    streams: int = 1
    probes: list[Probe] = field(default_factory=list)
    files_total: int = 0
    bytes_total: int = 0
    files_present: int = 0
    bytes_present: int = 0
    files_staged: int = 0
    bytes_staged: int = 0
    failed_pieces: int = 0
    seconds_staging: float = 0.0
    push: Any = None
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.ok:
            return f"{self.mirror}: prewarm FAILED: {self.error}"
        push = self.push
        return (
            f"{self.mirror}: prewarmed to generation {self.generation} from {self.source} with "
            f"{self.streams} stream(s): {self.files_staged} objects, {human(self.bytes_staged)} staged "
            f"in {self.seconds_staging:.2f} s ({self.files_present} objects already there); "
            f"push {push.bytes_sent if push else 0} bytes; total {self.seconds:.2f} s"
        )


def probe_table(probes: list[Probe]) -> str:
    rows = [["source", "connect", "rtt", "throughput", "generation", "usable", ""]]
    for p in probes:
        rows.append([
            p.name + (" *" if p.chosen else ""),
            "-" if p.connect is None else f"{p.connect * 1000:.0f} ms",
            "-" if p.rtt is None else f"{p.rtt * 1000:.1f} ms",
            "-" if p.rate is None else f"{human(p.rate)}/s",
            "-" if p.generation is None else str(p.generation),
            "yes" if p.ok else "no",
            p.note,
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
