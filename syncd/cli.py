"""The ``syncd`` command line: the one place that turns errors into exit statuses.

Commands import what they use when they run: paramiko, SQLAlchemy and numpy
are slow to import (docs/performance.md, "Start-up"), and ``status`` should
not pay for what only ``run`` needs.
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
from typing import TYPE_CHECKING, Any

from . import __version__, import_in_background
from .errors import EXIT_FAILURE, ManifestError, SyncdError, UsageError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("syncd")


def _load_config(args: argparse.Namespace):  # noqa: ANN202
    from . import config

    return config.load(args.config)


# -- commands ----------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from .manifest import Manifest, fspath
    from .scan import scan

    cfg = _load_config(args)
    out = sys.stdout

    def show(kind: str, path: bytes) -> None:
        out.write(f"{kind:<7}{fspath(path) or './'}\n")  # b"": root itself (its mode or mtime)

    with _state_lock(cfg, "scan"):
        with Manifest.open(cfg.node.state_dir, cfg.node.name) as manifest:
            result = scan(
                cfg.node.root,
                manifest,
                workers=cfg.node.hash_workers,
                on_change=None if args.quiet else show,  # -q: the summary line only
            )
    out.write(result.summary() + "\n")
    return 0


def _state_lock(cfg, purpose: str):  # noqa: ANN001, ANN202
    """The state_dir lock (created with state_dir on first use), not yet taken."""
    from .lock import StateLock

    try:
        cfg.node.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as err:
        raise ManifestError(f"{cfg.node.state_dir}: cannot create state_dir: {err.strerror}") from err
    return StateLock(cfg.node.state_dir, purpose)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.once:
        if args.dry_run or args.force_deletes or args.mirror or args.full or args.itemize:
            raise UsageError("--dry-run, --force-deletes, --full, --mirror and -i go with --once")
        from .daemon import run_daemon

        return run_daemon(args.config, verbosity=args.verbosity)
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
    printing = threading.Lock()

    def show(mirror: str, item) -> None:  # noqa: ANN001 - a plan.Item
        with printing:
            out.write(f"{mirror}: {item.itemized() if args.itemize else item.line()}\n")

    with _state_lock(cfg, "run --once"):
        # The SSH handshakes and the remote agents' start (docs/performance.md,
        # "Start-up") run while this node scans.  A mirror with ``via`` is
        # reached only on failover: not opened ahead.
        links = {m.name: Link(m) for m in mirrors if not m.via}
        for link in links.values():
            link.open_in_background()
        try:
            # Imported once the handshakes are under way: the scan's and
            # verify's imports overlap them too.
            from .runonce import run_once

            results = run_once(
                cfg, mirrors, links=links, dry_run=args.dry_run, force_deletes=args.force_deletes,
                cascade=not args.no_cascade, verify=not args.no_verify, full=args.full,
                on_item=show if (args.dry_run or args.itemize) else None,
            )
        finally:
            for link in links.values():
                link.close()
    # Tier by tier: each mirror, then (indented) what it reached below it.
    for r in results:
        for line in r.report():
            out.write(("(dry run) " if args.dry_run else "") + line + "\n")
    return 0 if all(r.tree_ok() for r in results) else EXIT_FAILURE


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
    from .own_release import check_own_index_group
    from .verify import Finding, check_hashes

    cfg = _load_config(args)
    out = sys.stdout
    # check_hashes names each finding by the path it hashed, message first:
    # the report names it relative to root.
    prefix = os.fsdecode(os.path.abspath(cfg.node.root)) + "/"
    findings: list = []
    files = size = 0
    with _state_lock(cfg, "verify"):
        with Manifest.open(cfg.node.state_dir, cfg.node.name, create=False) as manifest:
            upstream = manifest.get_meta("upstream")

            def check(chunk: dict[str, bytes]) -> None:
                findings.extend(Finding(f.path[len(prefix):], f.kind, f.message[len(prefix):])
                                for f in check_hashes(chunk, workers=cfg.node.hash_workers))

            # Chunks keep memory bounded on a tree of millions of files.
            chunk: dict[str, bytes] = {}
            for e in manifest.entries():
                if e.kind != KIND_FILE:
                    continue
                files += 1
                size += e.size
                # fsdecode, not fspath: --repair encodes the name back.
                chunk[prefix + os.fsdecode(e.path)] = e.sha256
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
        from .prewarm.stager import serve_stage_stdio

        # Staging done, the session may go on as a push agent's (prewarm's
        # hand-over): the agent is imported only then.
        return serve_stage_stdio(cfg, then=_serve_agent)
    return _serve_agent(cfg)


def _serve_agent(cfg: Config) -> int:
    """The push agent, handed the pusher for its cascade: the agent sits
    below the pusher and does not import it (tests/test_layers.py)."""
    from .agent import serve_stdio

    if cfg.mirrors:
        # paramiko and the pusher (docs/performance.md, "Start-up"): a node
        # that will push on imports them while its own push arrives, not
        # after it commits.
        import_in_background("syncd.push", "syncd.transport")
    return serve_stdio(cfg, cascade=_push_on)


def _push_on(cfg: Config, manifest: Any, *, links: dict) -> list:
    """An agent's cascade: this node's generation on to its own downstreams."""
    from .push import push_tree

    return push_tree(cfg, manifest, links=links)


def cmd_status(args: argparse.Namespace) -> int:
    """This node, then each downstream of the tree below it (see syncd.status)."""
    from .status import node_status

    report = node_status(_load_config(args))
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"node {report.node}: generation {report.generation}, {report.files} files, "
          f"{report.dirs} dirs, {report.symlinks} symlinks, {report.total_size} bytes"
          + (f", mirror of {report.upstream}" if report.upstream else ""))
    hb = report.held_back
    if hb:
        first = hb.get("first") if isinstance(hb.get("first"), list) else []
        print(f"  held back: generation {hb.get('generation')} from {hb.get('upstream')}"
              f"{' at ' + hb['at'] if hb.get('at') else ''}: {hb.get('findings')} finding(s)"
              + (f", first: {first[0]}" if first else "") + "; serving the last good generation")
    pw = report.prewarm
    if pw is not None:
        from .status import iso

        shown = {k: (iso(v * 1e9) if k in ("started", "updated") and isinstance(v, (int, float)) else v)
                 for k, v in pw.items() if k != "running" and not isinstance(v, (dict, list))}
        fields = ", ".join(f"{k} {v}" for k, v in sorted(shown.items()))
        if "error" in pw or pw.get("phase") in ("done", "failed"):
            print(f"  last prewarm: {fields}")
        elif pw.get("running"):
            print(f"  prewarm in progress: {fields}")
        else:
            print(f"  prewarm interrupted (process {pw.get('pid', '?')} is gone): {fields}; "
                  f"'syncd prewarm {pw.get('mirror', 'NAME')}' resumes it")
    for m in report.mirrors:
        _show_mirror(m, "  ")
    return 0


def _show_mirror(m, indent: str) -> None:  # noqa: ANN001 - a status.MirrorStatus or TreeMirror
    """One line for ``m``, then (indented) one for each mirror below it."""
    direct = hasattr(m, "host")
    line = f"{indent}{m.name:<{max(1, 22 - len(indent))}} "
    line += f"{m.host:<28} " if direct else ""
    if m.generation is None:
        line += "never synced" if direct else "generation unknown"
    else:
        line += f"generation {m.generation}"
        if m.lag_generations:
            ago = f", {m.lag_seconds:.0f} s behind" if m.lag_seconds is not None else ""
            line += f" (lag {m.lag_generations}{ago})"
        else:
            line += " (current)"
    if m.last_success:
        line += f", last success {m.last_success}"
        if m.files_sent or m.bytes_sent:
            line += f" ({m.files_sent} files, {m.bytes_sent} bytes)"
    if m.last_error:
        at = m.last_error_at if direct else m.as_of
        line += f", last error{' ' + at if at else ''}: {m.last_error}"
    print(line)
    for sub in m.below:
        _show_mirror(sub, indent + "  ")


# -- parser ------------------------------------------------------------------


ITEMIZE_LEGEND = """\
-i prints one line per change, as rsync's -i (its %i), with the mirror's name:
  MIRROR: YXcstpoguax PATH

  Y  >  a file is received: sent whole, as a delta, or copied from a file the
        mirror has with the same content (rsync says > for its own local
        basis too)
     c  a directory or symlink is made or changed
     .  nothing but attributes change
     *  a message: *deleting
  X  f file, d directory (PATH ends in '/'), L symlink (PATH -> TARGET)
  then, for each attribute: + new, . unchanged, or its letter when it changes:
     c  a symlink's target    s  a file's size    t  the modification time
     p  the permissions       (o g u a x: owner, group, atime, ACLs and
                              xattrs, which syncd does not copy: always .)

  >f+++++++++ new file      >f.st...... changed file   .f...p..... mode only
  cd+++++++++ new directory .d..t...... directory time cL+++++++++ new symlink
  cLc.t...... symlink retargeted                       *deleting   removed

Where it differs from rsync -rlptHi --delete (as rsync prints a local copy;
pushing to a remote host, rsync says < where this says >):
  syncd compares contents (SHA-256), as rsync does only with --checksum: a
  file whose content is the same but whose time differs is .f..t......
  (rsync: >f..t......); times are compared to the nanosecond (rsync: to the
  second); the root's own time (rsync's ./ line) is not listed.
"""


def _common_options(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """-c, -v and -q, before the command (``after`` False) and after it.

    After it they must not overwrite what was given before when absent
    (SUPPRESS), and -v/-q count into their own names, added up by main():
    ``syncd -v run -v`` is -vv.
    """
    suffix = "_after" if after else ""
    parser.add_argument(
        "-c", "--config", type=Path, default=argparse.SUPPRESS if after else None,
        help="config file (default: $SYNCD_CONFIG, then /etc/syncd/sync.ini)",
    )
    parser.add_argument("-v", "--verbose", action="count", dest="verbose" + suffix,
                        default=argparse.SUPPRESS if after else 0,
                        help="more log output; -vv: debug (the daemon starts from [node] log_level, "
                             "other commands from warnings)")
    parser.add_argument("-q", "--quiet", action="count", dest="quiet" + suffix,
                        default=argparse.SUPPRESS if after else 0,
                        help="less log output (errors are always shown)")


def build_parser() -> argparse.ArgumentParser:
    from .config import PROBE_TIMEOUT

    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Incremental mirror synchronization daemon.",
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    _common_options(parser, after=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, after=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, **kw: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = command("scan", help="walk root, update the manifest, print what changed",
                description="Walk root, update the manifest, print what changed (-q: only the summary line).")
    p.set_defaults(func=cmd_scan)

    p = command("run", help="push changes to every downstream (--once: one push, then exit)",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ITEMIZE_LEGEND)
    p.add_argument("--once", action="store_true", help="scan, push to each mirror once, exit 0 only if all succeeded")
    p.add_argument("--full", action="store_true",
                   help="with --once: a full comparison (every path listed, what the mirror has beyond "
                        "the primary deleted), as the scheduled reconciles do, instead of the changes since "
                        "the generation each mirror holds")
    p.add_argument("--dry-run", action="store_true", help="print the plan per file and change nothing on the mirrors")
    p.add_argument("--force-deletes", action="store_true", help="allow a plan that deletes more than max_delete")
    p.add_argument("--mirror", metavar="NAME[,NAME]", help="push only to these mirrors")
    p.add_argument("-i", "--itemize", action="store_true",
                   help="print each change as rsync -i does (the legend is below)")
    p.add_argument("--no-cascade", action="store_true",
                   help="push to the direct downstreams only; do not ask them to push on")
    p.add_argument("--no-verify", action="store_true",
                   help="push even if this node's own signatures or Release/repomd checksums fail")
    p.set_defaults(func=cmd_run)

    p = command("verify", help="re-hash the tree against the manifest and check signatures")
    p.add_argument("--repair", action="store_true",
                   help="on a mirror: have its upstream repair the findings on its next push")
    p.set_defaults(func=cmd_verify)

    p = command("agent", help="the remote end of a push, speaking the protocol on stdin/stdout")
    p.add_argument("--stage", action="store_true",
                   help="stage-only mode for prewarm's parallel streams: writes only state_dir/staging")
    p.set_defaults(func=cmd_agent)

    p = command("prewarm", help="fill a new or stale downstream, in parallel and resumably")
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

    p = command("status", help="generation, size and per-downstream state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import logs

    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = args.quiet + getattr(args, "quiet_after", 0)
    args.verbosity = args.verbose + getattr(args, "verbose_after", 0) - args.quiet
    daemon = args.func is cmd_run and not args.once
    # The daemon's level is [node] log_level once its config is read: until
    # then (a config error) that key's default.
    logs.setup(logs.level_for("info" if daemon else "warning", args.verbosity), agent=args.func is cmd_agent)
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

    The interpreter's teardown (module and thread finalizers) is a share of
    every ``run --once`` worth saving (docs/performance.md, "Start-up").  By
    the time main() returns, every file is closed and every thread joined (a
    command that did not get there raised instead, and exits the usual way),
    so the standard streams and the log are all that is left to flush.
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
