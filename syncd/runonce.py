"""One pass of a node's work: scan its root, check its own release, push.

``syncd run --once`` runs the whole pass (:func:`run_once`).  The daemon runs
the same steps on its own schedule: :func:`scan_node` after watch events or
on its timer, and :class:`ReleaseGate` before it asks its workers to push.

- A node whose manifest names an upstream (a mirror) does not scan: its
  agent writes the manifest from its upstream's rows.
- A primary scans, refuses a release that fails its own checks, then
  pushes.
- When a direct mirror has never acknowledged a generation, the pushes run
  while the scan does, fed its rows (``scan.ScanFeed``; docs/design.md,
  "A new mirror is fed while the primary scans").  A scan that fails, or a
  refused release, ends them before anything is published.

The caller opens the links (``push.Link``) before it imports this module:
the SSH handshakes and the remote agents' start then overlap these imports
and the scan (docs/design.md, "Sessions kept open").
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Iterable

from . import gc_paused
from .config import Config, MirrorConfig
from .errors import SyncdError
from .manifest import Manifest
from .own_release import refuse_broken_release
from .plan import Item
from .push import Link, PushResult, push_tree
from .scan import ScanFeed, ScanResult, scan

log = logging.getLogger(__name__)


def scan_node(cfg: Config, manifest: Manifest, *, dirs: Iterable[bytes] | None = None,
              feed: ScanFeed | None = None) -> ScanResult:
    """Scan this node's root into ``manifest`` with its own hash workers
    (``dirs``, ``feed``: see ``scan.scan``).  The caller holds the state_dir lock."""
    return scan(cfg.node.root, manifest, workers=cfg.node.hash_workers, dirs=dirs, feed=feed)


class ReleaseGate:
    """Whether a primary may push its current generation: only if its own
    index group passes its checks (``own_release.refuse_broken_release``).

    Each generation is checked once; the scan that fixes a release makes a
    new generation, checked again.  ``on_refused(generation, err)`` hears
    of each refused generation once.
    """

    def __init__(self, on_refused: Callable[[int, SyncdError], None]) -> None:
        self._on_refused = on_refused
        self._generation: int | None = None
        self._ok = False

    def allows(self, cfg: Config, manifest: Manifest) -> bool:
        gen = manifest.generation
        if gen != self._generation:
            try:
                refuse_broken_release(cfg, manifest)
                self._ok = True
            except SyncdError as err:
                self._on_refused(gen, err)
                self._ok = False
            self._generation = gen
        return self._ok


def run_once(
    cfg: Config,
    mirrors: Iterable[MirrorConfig],
    *,
    links: dict[str, Link],
    dry_run: bool = False,
    force_deletes: bool = False,
    cascade: bool = True,
    verify: bool = True,
    full: bool = False,
    on_item: Callable[[str, Item], None] | None = None,
) -> list[PushResult]:
    """Scan (a primary only), check this node's release (unless not
    ``verify``), push to ``mirrors`` and on through their subtrees.

    ``links`` are the direct mirrors' links, opened by the caller, who also
    closes them all: a failover adds its standby's link there.  The
    results, one per direct mirror with its subtree below it, are kept as
    meta ``last_tree`` for ``status``.  Raises the scan's error or the
    release's refusal; a failed push is a result, not an error.  ``full``:
    a full comparison with each direct mirror (``run --once --full``).  The
    caller holds the state_dir lock.
    """
    mirrors = tuple(mirrors)
    with gc_paused(), Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:

        def push(feed: ScanFeed | None = None) -> list[PushResult]:
            return push_tree(
                cfg, manifest, mirrors=mirrors, dry_run=dry_run, force_deletes=force_deletes,
                on_item=on_item, cascade=cascade, links=links, feed=feed, force_full=full,
            )

        def checked_scan(feed: ScanFeed | None = None) -> None:
            result = scan_node(cfg, manifest, feed=feed)
            log.info("scan: %s", result.summary())
            if verify:
                refuse_broken_release(cfg, manifest)
            if feed is not None:
                feed.finish(result)

        if manifest.get_meta("upstream") is not None:
            results = push()
        elif not has_new_mirror(manifest, mirrors):
            checked_scan()
            results = push()
        else:
            # A mirror never pushed to is sent every row: it is fed the rows
            # while the scan finds them, and the others wait.
            results = _scan_and_push(checked_scan, push, parties=sum(1 for m in mirrors if not m.via))
        manifest.set_meta("last_tree", json.dumps([r.to_wire() for r in results]))
    return results


def has_new_mirror(manifest: Manifest, mirrors: Iterable[MirrorConfig]) -> bool:
    """Whether a mirror (not a standby) has never acknowledged a generation."""
    acked = manifest.acknowledged()
    return any(m.name not in acked for m in mirrors if not m.via)


def _scan_and_push(checked_scan: Callable[[ScanFeed], None], push: Callable[[ScanFeed], list[PushResult]],
                   parties: int) -> list[PushResult]:
    """Scan in this thread while the pushes run in another, fed by the scan."""
    feed = ScanFeed(parties)
    results: list[PushResult] = []
    failed: list[BaseException] = []

    def pushing() -> None:
        try:
            results.extend(push(feed))
        except BaseException as err:  # raised in the caller's thread, below
            failed.append(err)

    pusher = threading.Thread(target=pushing, name="push-tree", daemon=True)
    pusher.start()
    try:
        checked_scan(feed)
    except BaseException as err:
        feed.fail(err)  # the pushes end with nothing published
        raise
    finally:
        pusher.join()
    if failed:
        raise failed[0]
    return results


__all__ = ["ReleaseGate", "has_new_mirror", "run_once", "scan_node"]
