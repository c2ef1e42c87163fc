"""What this edge accepts of a push: the one place where the agent says no.

A message that reaches the agent is well formed (syncd.messages checked its
types, its names and its ranges).  What the upstream asks for may still be
refused here, before anything of the push is published:

- deletions beyond the share of the tree that ``begin`` allows
  (``max_delete_ppm``), unless it says ``force_deletes``;
- in a full comparison, unlisted paths that the upstream's filter excludes
  (they are not the upstream's to delete), and this node's own trace file;
- hard-link claims that do not hold together (syncd.plan.LinkChecker): a
  name linked to anything but the first name of a group announced earlier
  in the push, with the same content and count, or a group short of names.
"""

from __future__ import annotations

from typing import Any, Callable

from .. import plan as planmod
from ..config import Config
from ..filters import Filter
from ..messages import DEFAULT_MAX_DELETE_PPM, Begin, Row


class Policy:
    """One push's rules, from its ``begin``."""

    def __init__(self, cfg: Config, begin: Begin | None = None) -> None:
        self.cfg = cfg
        self.max_delete = (begin.max_delete_ppm if begin else DEFAULT_MAX_DELETE_PPM) / 1_000_000
        self.force_deletes = begin.force_deletes if begin else False
        self.filter: Filter = begin.filter if begin else Filter.from_lists()
        self._links = planmod.LinkChecker()

    def check_deletions(self, deletes: list[bytes], live_count: Callable[[], int]) -> None:
        """The deletion guard (DeletionGuardError) on a plan deleting ``deletes``
        of the ``live_count()`` entries this node records."""
        if deletes:  # (nothing to count the tree for otherwise)
            planmod.check_deletions(
                len(set(deletes)), max(live_count(), len(deletes)), self.max_delete,
                force=self.force_deletes, where=self.cfg.node.name,
            )

    def deletes_unlisted(self, path: bytes, is_dir: bool) -> bool:
        """Whether a full comparison deletes ``path``, which the upstream did not list."""
        if self.filter.excluded_path(path, is_dir):
            return False
        from ..trace import protects  # (docs/performance.md, "Start-up": a full comparison only)

        return not protects(self.cfg, path)  # this node's own trace file is not the upstream's to delete

    # -- hard links -------------------------------------------------------------------------

    def link_first(self, row: Row, group: Any) -> None:
        """``row`` announces a group of ``row.names`` names (ProtocolError if it cannot)."""
        self._links.first(row.path, row.names, row.content(), group)

    def link_member(self, row: Row) -> tuple[Any, bool]:
        """``row`` is one more name of its group's file: that group, and whether it was the last name."""
        return self._links.member(row.path, row.link, row.names, row.content())

    def links_end(self) -> None:
        """No more rows: every group announced must be complete."""
        self._links.end()
