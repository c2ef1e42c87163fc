"""The push over the tree: every direct downstream at once, each retried with
backoff, and a standby edge pushed to directly while its usual upstream
(``via``) fails.

The modules of syncd.push log as ``syncd.push``, the name the operator's
logs have always shown for a push.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from .. import plan as planmod
from ..config import Config, MirrorConfig
from ..errors import SyncdError
from ..manifest import Manifest
from ..scanfeed import FeedClosed, FeedLeft, ScanFeed
from .link import Link
from .pusher import Pusher
from .result import PushResult

log = logging.getLogger(__package__)


def push_tree(
    cfg: Config,
    manifest: Manifest,
    *,
    mirrors: Iterable[MirrorConfig] | None = None,
    dry_run: bool = False,
    force_deletes: bool = False,
    on_item: Callable[[str, planmod.Item], None] | None = None,
    cascade: bool = True,
    links: dict[str, Link] | None = None,
    feed: ScanFeed | None = None,
    force_full: bool = False,
) -> list[PushResult]:
    """Push to every direct downstream at once (each cascading to its subtree).

    Siblings run concurrently (at most ``parallel_pushes``): one that fails or
    hangs does not hold back the others.  A mirror with ``via = T`` is an edge
    normally served by T; it is pushed to directly only while T fails
    (failover), and left to T again once T succeeds.

    With ``feed`` (a syncd.scan.ScanFeed), this node is still scanning: see
    :class:`Pusher`.
    """
    chosen = list(mirrors if mirrors is not None else cfg.mirrors)
    direct = [m for m in chosen if not m.via]
    standby = [m for m in chosen if m.via]

    def one(m: MirrorConfig) -> PushResult:
        link = None
        if links is not None:
            link = links.get(m.name)
            if link is None or link.mirror != m:
                if link is not None:
                    link.close()  # the mirror's settings changed: a new session
                link = links[m.name] = Link(m)
        return push_with_retries(cfg, m, manifest, dry_run=dry_run, force_deletes=force_deletes,
                                 on_item=on_item, cascade=cascade, link=link, feed=feed, force_full=force_full)

    with ThreadPoolExecutor(max_workers=max(1, cfg.node.parallel_pushes), thread_name_prefix="push") as pool:
        results = list(pool.map(one, direct))
        failed = {r.mirror for r in results if not r.ok}
        takeover = [m for m in standby if m.via in failed]
        for m in takeover:
            log.warning("%s: %s failed; pushing to %s directly (failover)", cfg.node.name, m.via, m.name)
        for m, r in zip(takeover, pool.map(one, takeover)):
            r.failover_from = m.via
            results.append(r)
    return results


def push_with_retries(
    cfg: Config,
    mirror: MirrorConfig,
    manifest: Manifest,
    *,
    dry_run: bool = False,
    force_deletes: bool = False,
    on_item: Callable[[str, planmod.Item], None] | None = None,
    open_session: Callable[[MirrorConfig], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cascade: bool = True,
    force_full: bool = False,
    stop: threading.Event | None = None,
    link: Link | None = None,
    feed: ScanFeed | None = None,
) -> PushResult:
    """Push, retrying a lost connection with exponential backoff and jitter.

    A retry resumes: what the agent staged survives the lost session, and it
    does not ask for those bytes again.  Anything but a lost connection (a
    bad host key, a refusal by the agent) is final at once.  With ``feed``,
    a scan that fails ends the push, which then records nothing: the run
    reports the scan's error.
    """
    result = PushResult(mirror=mirror.name, generation=manifest.generation)
    make = functools.partial(Pusher, cfg, mirror, manifest, dry_run=dry_run, force_deletes=force_deletes,
                             on_item=on_item, open_session=open_session, cascade=cascade, force_full=force_full,
                             stop=stop, feed=feed)
    try:
        _attempts(make, mirror, result, link, stop, sleep)
        if feed is not None:
            # The scan's write transaction is open until it ends: the row
            # recorded below would wait for it.
            scanned = feed.wait()
            if not result.ok:
                result.generation = scanned.generation  # the one it failed to push
    except FeedClosed as err:
        return _not_pushed(result, err)
    if not dry_run:
        _record(manifest, mirror.name, result)
    if result.ok:
        result.error = None
    return result


def _attempts(make: Callable[..., Pusher], mirror: MirrorConfig, result: PushResult, link: Link | None,
              stop: threading.Event | None, sleep: Callable[[float], None]) -> None:
    """Push until it succeeds, fails for good or has no attempt left
    (``result`` says which), with exponential backoff and jitter between."""
    retries = mirror.retries
    follow_feed = True
    attempt = 0
    while attempt < retries:
        attempt += 1
        result.attempts = attempt
        result.items = []
        result.below = []
        result.fed = False
        try:
            make(follow_feed=follow_feed).run(result, link)
            return
        except FeedLeft:
            # It fell behind while another push waited for the scan: pushed
            # again once the scan is over (what it staged is not sent again).
            log.info("%s: pushing after the scan (the rows came faster than it took them)", mirror.name)
            follow_feed = False
            attempt -= 1
            continue
        except SyncdError as err:
            result.error = str(err)
            if not err.retryable or attempt == retries or (stop is not None and stop.is_set()):
                return
            delay = min(mirror.retry_delay * 2 ** (attempt - 1), 60.0) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; retry %d of %d in %.1f s", mirror.name, err, attempt, retries - 1, delay)
            if stop is not None:
                if stop.wait(delay):
                    return
            else:
                sleep(delay)


def _record(manifest: Manifest, mirror: str, result: PushResult) -> None:
    """The push's outcome in this node's manifest (``status`` shows it)."""
    now = time.time_ns()
    if result.ok:
        manifest.record_downstream(
            mirror, generation=result.generation, acked_ns=now, last_success_ns=now,
            last_error=None, bytes_sent=result.bytes_sent, files_sent=result.files_sent,
        )
    else:
        manifest.record_downstream(mirror, last_error=result.error, last_error_ns=now)


def _not_pushed(result: PushResult, err: BaseException) -> PushResult:
    """The scan feeding this push failed: nothing of it is recorded (the run
    reports the scan's own error)."""
    result.ok = False
    result.error = f"not pushed: this node's scan failed ({err.args[0] if err.args else err})"
    return result
