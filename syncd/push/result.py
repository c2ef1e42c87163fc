"""What a push reports (:class:`PushResult`, a whole subtree's through the
cascade), and which rows a mirror takes (:func:`filter_rules`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import plan as planmod
from ..config import Config, MirrorConfig
from ..errors import ProtocolError


@dataclass
class PushResult:
    mirror: str
    generation: int
    held_before: int | None = None
    full: bool = False
    fed: bool = False  # the rows came from this node's scan while it ran
    ok: bool = False
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    files_sent: int = 0
    items: list[planmod.Item] = field(default_factory=list)
    seconds: float = 0.0
    attempts: int = 0
    # The downstream's own downstreams, as it reported them (cascade).
    below: list["PushResult"] = field(default_factory=list)
    # A failover push: this mirror is normally served by ``via``, which failed.
    failover_from: str | None = None
    # The summary a downstream sent for itself (cascade): shown as it came.
    quoted_summary: str | None = field(default=None, repr=False, compare=False)

    def tree_ok(self) -> bool:
        return self.ok and all(r.tree_ok() for r in self.below)

    def to_wire(self) -> dict:
        return {
            "mirror": self.mirror, "ok": self.ok, "generation": self.generation,
            "held_before": self.held_before, "error": self.error, "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent, "ms": round(self.seconds * 1000), "attempts": self.attempts,
            "summary": self.summary(), "failover_from": self.failover_from,
            "below": [r.to_wire() for r in self.below],
        }

    @classmethod
    def from_wire(cls, raw: Any, depth: int = 0) -> "PushResult":
        if not isinstance(raw, dict) or depth > 16:
            raise ProtocolError("cascaded: a result is not a dict (or nests too deep)")
        r = cls(mirror=str(raw.get("mirror")), generation=int(raw.get("generation") or 0))
        r.ok = raw.get("ok") is True
        r.held_before = raw.get("held_before") if isinstance(raw.get("held_before"), int) else None
        r.error = raw.get("error") if isinstance(raw.get("error"), str) else None
        r.files_sent = int(raw.get("files_sent") or 0)
        r.bytes_sent = int(raw.get("bytes_sent") or 0)
        r.seconds = int(raw.get("ms") or 0) / 1000
        r.attempts = int(raw.get("attempts") or 0)
        r.failover_from = raw.get("failover_from") if isinstance(raw.get("failover_from"), str) else None
        r.quoted_summary = raw.get("summary") if isinstance(raw.get("summary"), str) else None
        r.below = [cls.from_wire(b, depth + 1) for b in raw.get("below") or []]
        return r

    def report(self, indent: str = "") -> list[str]:
        """One line per mirror of the subtree, tier by tier."""
        lines = [indent + self.summary()]
        for r in self.below:
            lines += r.report(indent + "  ")
        return lines

    def counts(self) -> dict[str, int]:
        return planmod.summarize(self.items)

    def summary(self) -> str:
        if self.quoted_summary:
            return self.quoted_summary
        prefix = f"(failover: {self.failover_from} failed) " if self.failover_from else ""
        return prefix + self._own_summary()

    def _own_summary(self) -> str:
        if not self.ok:
            return f"{self.mirror}: FAILED after {self.attempts} attempt(s): {self.error}"
        c = self.counts()
        held = "none" if self.held_before is None else str(self.held_before)
        what = ", ".join(f"{n} {k}" for k, n in c.items() if n) or "nothing to do"
        how = " (full comparison, fed by the scan)" if self.fed else " (full comparison)" if self.full else ""
        return (
            f"{self.mirror}: generation {held} -> {self.generation}{how}: "
            f"{what}; {self.files_sent} files, {self.bytes_sent} bytes sent, {self.bytes_received} received "
            f"in {self.seconds:.2f} s"
        )


def filter_rules(cfg: Config, mirror: MirrorConfig) -> list[str]:
    """The rules a push to ``mirror`` sends in ``begin`` (their order: Config.filter_rules)."""
    return cfg.filter_rules(mirror)
