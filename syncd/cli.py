"""The ``syncd`` command line: the one place that turns errors into exit statuses.

Commands import what they use when they run: starting Python with paramiko,
SQLAlchemy and numpy costs most of a second, and ``status`` should not pay for
what only ``run`` needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import __version__
from .errors import EXIT_FAILURE, SyncdError

if TYPE_CHECKING:
    from .scan import ScanFeed

log = logging.getLogger("syncd")

# syslog priorities, for journald's "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Under systemd, stderr goes to the journal: prefix the priority, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("syncd").setLevel(
        logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity >= 1 else logging.WARNING
    )


def _load_config(args: argparse.Namespace):  # noqa: ANN202
    from . import config

    return config.load(getattr(args, "agent_config", None) or args.config)


# -- commands ----------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from .manifest import Manifest, fspath
    from .scan import scan

    cfg = _load_config(args)
    out = sys.stdout

    def show(kind: str, path: bytes) -> None:
        out.write(f"{kind:<7}{fspath(path)}\n")

    with _state_lock(cfg, "scan"):
        with Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:
            result = scan(
                cfg.node.root,
                manifest,
                workers=cfg.node.hash_workers,
                on_change=None if args.quiet else show,
            )
    out.write(result.summary() + "\n")
    return 0


def _state_lock(cfg, purpose: str):  # noqa: ANN001, ANN202
    """The state_dir lock (created with state_dir on first use), not yet taken."""
    from .errors import ManifestError
    from .lock import StateLock

    try:
        cfg.node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as err:
        raise ManifestError(f"{cfg.node.state_dir}: cannot create state_dir: {err.strerror}") from err
    return StateLock(cfg.node.state_dir, purpose)


def cmd_run(args: argparse.Namespace) -> int:
    from .errors import UsageError

    if not args.once:
        if args.dry_run or args.force_deletes or args.mirror:
            raise UsageError("--dry-run, --force-deletes and --mirror go with --once")
        from .daemon import run_daemon

        return run_daemon(getattr(args, "config", None))
    from .push import Link

    cfg = _load_config(args)
    mirrors = cfg.mirrors
    if args.mirror:
        wanted = set(args.mirror.split(","))
        unknown = wanted - {m.name for m in cfg.mirrors}
        if unknown:
            raise UsageError(f"--mirror: no [mirror:{sorted(unknown)[0]}] in {cfg.path}")
        mirrors = tuple(m for m in cfg.mirrors if m.name in wanted)
    if not mirrors:
        raise UsageError(f"{cfg.path}: no [mirror:NAME] section: nothing to push to")
    out = sys.stdout
    with _state_lock(cfg, "run --once"):
        # The SSH handshakes and the remote agents' start (a quarter second
        # each) run while this node scans.  A mirror with ``via`` is reached
        # only on failover: not opened ahead.
        links = {m.name: Link(m) for m in mirrors if not m.via}
        for link in links.values():
            link.open_in_background()
        try:
            # Imported once the handshakes are under way (tens of ms).
            from . import gc_paused
            from .manifest import Manifest
            from .push import push_tree
            from .scan import scan
            from .verify import refuse_broken_release

            with gc_paused(), Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:
                printing = threading.Lock()

                def show(mirror: str, item) -> None:  # noqa: ANN001
                    with printing:
                        out.write(f"{mirror}: {item.line()}\n")

                def push(feed: "ScanFeed | None" = None) -> list:
                    return push_tree(
                        cfg, manifest, mirrors=mirrors, dry_run=args.dry_run, force_deletes=args.force_deletes,
                        on_item=show if (args.dry_run or args.itemize) else None, cascade=not args.no_cascade,
                        links=links, feed=feed,
                    )

                def checked_scan(feed: "ScanFeed | None" = None) -> None:
                    result = scan(cfg.node.root, manifest, workers=cfg.node.hash_workers, feed=feed)
                    log.info("scan: %s", result.summary())
                    if not args.no_verify:
                        refuse_broken_release(cfg, manifest)
                    if feed is not None:
                        feed.finish(result)

                # A mirror's manifest is written by its agent from its upstream's
                # rows; only a node that publishes by itself scans its root.
                if manifest.get_meta("upstream") is not None:
                    results = push()
                elif not _has_new_mirror(manifest, mirrors):
                    checked_scan()
                    results = push()
                else:
                    # A mirror never pushed to is sent every row: it is fed
                    # the rows while the scan finds them, and the others wait.
                    results = _scan_and_push(checked_scan, push, parties=sum(1 for m in mirrors if not m.via))
                manifest.set_meta("last_tree", json.dumps([r.to_wire() for r in results]))
        finally:
            for link in links.values():
                link.close()
    # Tier by tier: each mirror, then (indented) what it reached below it.
    for r in results:
        for line in r.report():
            out.write(("(dry run) " if args.dry_run else "") + line + "\n")
    return 0 if all(r.tree_ok() for r in results) else EXIT_FAILURE


def _has_new_mirror(manifest, mirrors) -> bool:  # noqa: ANN001
    """Whether a mirror (not a standby) has never acknowledged a generation."""
    acked = manifest.acknowledged()
    return any(m.name not in acked for m in mirrors if not m.via)


def _scan_and_push(checked_scan: Callable, push: Callable, parties: int) -> list:
    """Scan in this thread while the pushes run in another, fed by the scan."""
    from .scan import ScanFeed

    feed = ScanFeed(parties)
    results: list = []
    failed: list[BaseException] = []

    def pushing() -> None:
        try:
            results.extend(push(feed))
        except BaseException as err:  # raised in the main thread, below
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


def cmd_prewarm(args: argparse.Namespace) -> int:
    from .prewarm import cmd_prewarm as run_prewarm  # imported only for this command

    return run_prewarm(args)


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash the tree against the manifest, check the index group.

    On a mirror, ``--repair`` forgets the stat data of every path with a
    finding and asks the upstream for a full comparison on its next push
    (the agent's welcome claims no generation), which re-hashes those files
    and sends what differs.  A primary has nothing to repair from: with
    ``--repair`` it only reports, like without.
    """
    from .manifest import KIND_FILE, META_HELD_BACK, META_REPAIR, Manifest
    from .verify import Finding, FindingKind, check_own_index_group, hash_files

    cfg = _load_config(args)
    out = sys.stdout
    root = os.fsencode(os.path.abspath(cfg.node.root))
    findings: list = []
    files = size = 0
    with _state_lock(cfg, "verify"):
        with Manifest.open(cfg.node.state_dir, cfg.node.name, create=False) as manifest:
            upstream = manifest.get_meta("upstream")

            def check(chunk: dict[str, tuple[str, bytes]]) -> None:
                for where, got in hash_files(chunk, workers=cfg.node.hash_workers):
                    rel, digest = chunk[where]
                    if isinstance(got, FileNotFoundError):
                        findings.append(Finding(rel, FindingKind.MISSING_FILE, f"{rel}: missing"))
                    elif isinstance(got, OSError):
                        findings.append(Finding(rel, FindingKind.ERROR, f"{rel}: cannot read: {got.strerror or got}"))
                    elif got != digest:
                        findings.append(Finding(
                            rel, FindingKind.HASH_MISMATCH,
                            f"{rel}: SHA-256 {got.hex()} differs from the manifest's {digest.hex()}"))

            # Chunks keep memory bounded on a tree of millions of files.
            chunk: dict[str, tuple[str, bytes]] = {}
            for e in manifest.entries():
                if e.kind != KIND_FILE:
                    continue
                files += 1
                size += e.size
                # fsdecode, not fspath: --repair encodes the name back.
                chunk[os.fsdecode(root + b"/" + e.path)] = (os.fsdecode(e.path), e.sha256)
                if len(chunk) >= 4096:
                    check(chunk)
                    chunk = {}
            check(chunk)
            group, n_index = check_own_index_group(cfg, manifest)
            findings = sorted(set(findings + group))
            marked = 0
            if findings and args.repair and upstream is not None:
                marked = manifest.invalidate(os.fsencode(f.path) for f in findings)
                manifest.set_meta(META_REPAIR, json.dumps({"at_ns": time.time_ns(), "findings": len(findings)}))
            held = manifest.get_meta(META_HELD_BACK)
    for f in findings:
        line = f"{f.kind.value:<18}{f.message}\n"
        out.write(line.encode("utf-8", "backslashreplace").decode("utf-8"))
    if held:
        info = json.loads(held)
        out.write(f"note: generation {info.get('generation')} from {info.get('upstream')} was held back "
                  f"({info.get('findings')} finding(s)); this node serves its last good generation\n")
    where = f"mirror of {upstream}" if upstream is not None else "primary"
    out.write(f"verify {cfg.node.name} ({where}): {files} files, {size} bytes re-hashed, {n_index} index files "
              f"checked{' with signatures' if cfg.verify.keyring else ''}: {len(findings)} finding(s)\n")
    if findings:
        if upstream is None:
            if args.repair:
                out.write("repair: this node is a primary, there is nothing upstream to repair from; restore "
                          "the files, or rescan ('syncd scan') if the changes are intended\n")
        elif args.repair:
            out.write(f"repair: {marked} file(s) marked; {upstream} repairs them on its next push\n")
        else:
            out.write(f"run 'syncd verify --repair' to have {upstream} repair them on its next push\n")
    return EXIT_FAILURE if findings else 0


def _forced_stage_request() -> bool:
    """Under a forced command (``command=`` in authorized_keys) sshd runs the
    configured agent whatever the client asked for, and puts the request in
    $SSH_ORIGINAL_COMMAND: prewarm's streams ask for ``agent --stage`` there.
    The stage-only mode writes nothing but staging, so honouring it widens
    nothing."""
    import shlex

    try:
        words = shlex.split(os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    except ValueError:
        return False
    return "agent" in words and "--stage" in words


def cmd_agent(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.stage or _forced_stage_request():
        from .stager import serve_stage_stdio

        return serve_stage_stdio(cfg)
    from .agent import serve_stdio

    return serve_stdio(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    """This node, then each downstream of the tree below it.

    Direct mirrors come from the manifest's ``downstreams`` table (what each
    acknowledged, and its last result); the mirrors below them from meta
    ``last_tree``, the report of the last push through the tree: as fresh as
    that push, and marked with its time (``as_of``).
    """
    from .manifest import META_HELD_BACK, Manifest

    cfg = _load_config(args)
    with Manifest.open(cfg.node.state_dir, cfg.node.name, create=False) as manifest:
        stats = manifest.stats()
        acked = {d["name"]: d for d in manifest.downstreams()}
        raw_tree = manifest.get_meta("last_tree")
        raw_held = manifest.get_meta(META_HELD_BACK)
        upstream = manifest.get_meta("upstream")
        # Generations this node made, oldest first: a lagging mirror's lag in
        # seconds is the age of the first one it lacks.  (Read through the
        # driver connection: the manifest has no public query for it yet.)
        raw = manifest._raw()
        try:
            made = raw.execute("SELECT generation, created_ns FROM generations ORDER BY generation").fetchall()
        finally:
            raw.close()
    now_ns = time.time_ns()

    def lag(held: int | None) -> tuple[int | None, float | None]:
        if held is None:
            return None, None
        if held >= stats.generation:
            return 0, 0.0
        lacked = next((ns for g, ns in made if g > held), None)
        return stats.generation - held, None if lacked is None else round((now_ns - lacked) / 1e9, 3)

    def loads(text: str | None, what: str):  # noqa: ANN202 - whatever JSON it holds, or None
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            log.warning("%s: meta %s is not valid JSON; ignored", manifest.path, what)
            return None

    def below(raw_results: object, as_of: int | None) -> list[dict]:
        """A ``last_tree`` subtree as status entries, nested the same way."""
        out = []
        for r in raw_results if isinstance(raw_results, list) else []:
            if not isinstance(r, dict):
                continue
            ok = r.get("ok") is True
            gen = r.get("generation") if isinstance(r.get("generation"), int) else None
            before = r.get("held_before") if isinstance(r.get("held_before"), int) else None
            held = gen if ok else before
            lag_g, lag_s = lag(held)
            out.append({
                "name": str(r.get("mirror")),
                "generation": held,
                "lag_generations": lag_g,
                "lag_seconds": lag_s,
                "ok": ok,
                "last_success": _iso(as_of) if ok else None,
                "last_error": None if ok else r.get("error"),
                "bytes_sent": int(r.get("bytes_sent") or 0),
                "files_sent": int(r.get("files_sent") or 0),
                "failover_from": r.get("failover_from"),
                "as_of": _iso(as_of),
                "below": below(r.get("below"), as_of),
            })
        return out

    tree = {str(r.get("mirror")): r for r in (loads(raw_tree, "last_tree") or []) if isinstance(r, dict)}
    report = {
        "node": cfg.node.name,
        "root": str(cfg.node.root),
        "upstream": upstream,
        "generation": stats.generation,
        "generation_age_s": (
            round((now_ns - stats.generation_created_ns) / 1e9, 3) if stats.generation_created_ns else None
        ),
        "files": stats.files,
        "dirs": stats.dirs,
        "symlinks": stats.symlinks,
        "total_size": stats.total_size,
        "tombstones": stats.tombstones,
        "held_back": None,
        "prewarm": None,
        "mirrors": [],
    }
    held_back = loads(raw_held, META_HELD_BACK)
    if isinstance(held_back, dict):
        report["held_back"] = dict(held_back, at=_iso(held_back.get("at_ns")
                                                      if isinstance(held_back.get("at_ns"), int) else None))
    progress = cfg.node.state_dir / "prewarm.json"
    try:
        text = progress.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except OSError as err:
        report["prewarm"] = {"error": f"{progress}: {err.strerror or err}"}
        text = None
    if text is not None:
        # Written by a prewarm in progress (and rewritten as it goes): take
        # whatever keys it has, show them as they are.
        try:
            state = json.loads(text)
        except ValueError:
            state = None
        report["prewarm"] = state if isinstance(state, dict) else {"error": f"{progress}: not a JSON object"}
    for m in cfg.mirrors:
        d = acked.get(m.name, {})
        held = d.get("generation")
        lag_g, lag_s = lag(held)
        last_push = max((t for t in (d.get("last_success_ns"), d.get("last_error_ns")) if t is not None),
                        default=None)
        report["mirrors"].append(
            {
                "name": m.name,
                "host": f"{m.host}:{m.port}",
                "generation": held,
                "lag_generations": lag_g,
                "lag_seconds": lag_s,
                "last_success": _iso(d.get("last_success_ns")),
                "last_error": d.get("last_error"),
                "last_error_at": _iso(d.get("last_error_ns")),
                "bytes_sent": d.get("bytes_sent") or 0,
                "files_sent": d.get("files_sent") or 0,
                "via": m.via,
                "below": below((tree.get(m.name) or {}).get("below"), last_push),
            }
        )
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    def held_text(m: dict) -> str:
        if m["generation"] is None:
            return "never synced" if "host" in m else "generation unknown"
        text = f"generation {m['generation']}"
        if m["lag_generations"]:
            ago = f", {m['lag_seconds']:.0f} s behind" if m["lag_seconds"] is not None else ""
            text += f" (lag {m['lag_generations']}{ago})"
        else:
            text += " (current)"
        return text

    def show(m: dict, indent: str) -> None:
        line = f"{indent}{m['name']:<{max(1, 22 - len(indent))}} "
        line += f"{m['host']:<28} " if "host" in m else ""
        line += held_text(m)
        if m["last_success"]:
            line += f", last success {m['last_success']}"
            if m["files_sent"] or m["bytes_sent"]:
                line += f" ({m['files_sent']} files, {m['bytes_sent']} bytes)"
        if m["last_error"]:
            at = m.get("last_error_at") or m.get("as_of")
            line += f", last error{' ' + at if at else ''}: {m['last_error']}"
        print(line)
        for sub in m["below"]:
            show(sub, indent + "  ")

    print(f"node {report['node']}: generation {report['generation']}, {stats.files} files, "
          f"{stats.dirs} dirs, {stats.symlinks} symlinks, {stats.total_size} bytes"
          + (f", mirror of {upstream}" if upstream else ""))
    hb = report["held_back"]
    if hb:
        first = hb.get("first") if isinstance(hb.get("first"), list) else []
        print(f"  held back: generation {hb.get('generation')} from {hb.get('upstream')}"
              f"{' at ' + hb['at'] if hb.get('at') else ''}: {hb.get('findings')} finding(s)"
              + (f", first: {first[0]}" if first else "") + "; serving the last good generation")
    pw = report["prewarm"]
    if pw is not None:
        done = pw.get("phase") in ("done", "failed")
        fields = ", ".join(f"{k} {v}" for k, v in sorted(pw.items()) if not isinstance(v, (dict, list)))
        print(f"  {'last prewarm' if done else 'prewarm in progress'}: {fields}")
    for m in report["mirrors"]:
        show(m, "  ")
    return 0


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


# -- parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .config import PROBE_TIMEOUT

    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Incremental mirror synchronization daemon.",
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    parser.add_argument(
        "-c", "--config", type=Path, default=None,
        help="config file (default: $SYNCD_CONFIG, then /etc/syncd/sync.ini)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("scan", help="walk root, update the manifest, print what changed")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("run", help="push changes to every downstream (--once: one push, then exit)")
    p.add_argument("--once", action="store_true", help="scan, push to each mirror once, exit 0 only if all succeeded")
    p.add_argument("--dry-run", action="store_true", help="print the plan per file and change nothing on the mirrors")
    p.add_argument("--force-deletes", action="store_true", help="allow a plan that deletes more than max_delete")
    p.add_argument("--mirror", metavar="NAME[,NAME]", help="push only to these mirrors")
    p.add_argument("-i", "--itemize", action="store_true", help="print each change, like rsync -i")
    p.add_argument("--no-cascade", action="store_true",
                   help="push to the direct downstreams only; do not ask them to push on")
    p.add_argument("--no-verify", action="store_true",
                   help="push even if this node's own signatures or Release/repomd checksums fail")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="re-hash the tree against the manifest and check signatures")
    p.add_argument("--repair", action="store_true",
                   help="on a mirror: have its upstream repair the findings on its next push")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("agent", help="the remote end of a push, speaking the protocol on stdin/stdout")
    p.add_argument("--config", dest="agent_config", type=Path, default=None,
                   help="config file (the same as -c)")
    p.add_argument("--stage", action="store_true",
                   help="stage-only mode for prewarm's parallel streams: writes only state_dir/staging")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("prewarm", help="fill a new or stale downstream, in parallel and resumably")
    p.add_argument("name", metavar="NAME", help="the [mirror:NAME] to fill")
    p.add_argument("--from", dest="sources", metavar="MIRROR,...",
                   help="sources to consider: other [mirror:X] sections holding this node's generation, "
                        "'self' for this node (default: probe every other mirror, fall back to self)")
    p.add_argument("--streams", type=int, metavar="N",
                   help="parallel SSH streams (default: from the link and the cores: "
                        "min(4, cores) on a LAN (TCP RTT under 2 ms), else min(4, 2 x cores))")
    p.add_argument("--bwlimit", metavar="RATE", help="total rate limit in bytes/s, e.g. 50M, 1.5G, 800K")
    p.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT, metavar="SECONDS",
                   help="give up on a source probe after this long (default %(default)s)")
    p.add_argument("--transport", choices=("auto", "openssh", "paramiko"), default="auto",
                   help="SSH client for the parallel streams (default: OpenSSH's ssh when installed)")
    p.set_defaults(func=cmd_prewarm)

    p = sub.add_parser("status", help="generation, size and per-downstream state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except SyncdError as err:
        log.error("%s", err)
        return err.exit_status
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:
        # `syncd scan | head`: the reader left; not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def entry() -> None:
    """The ``syncd`` command (console script and ``python -m syncd``): main(),
    then a quick exit.

    The interpreter's teardown (module and thread finalizers) cost 25-30 ms
    of every ``run --once``, a tenth of a no-op.  By the time main() returns,
    every file is closed and every thread joined (a command that did not get
    there raised instead, and exits the usual way), so the standard streams
    and the log are all that is left to flush.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a reader that left (`syncd status | head`)
    os._exit(code)


if __name__ == "__main__":
    entry()
