"""``sync.ini`` into frozen dataclasses: the configuration contract.

Every key syncd reads is declared once in the ``*_KEYS`` tables below, with its
type, default and whether it is required; the example ``sync.ini`` at the
repository root documents the same keys.  A problem is one line naming the
file, section and key (``ConfigError``, exit status 2).  So is an unknown key
or section, with the closest known name as a hint: a misspelt optional key
(``shedule``, ``exlude``) would otherwise fall back to its default without a
word, and publish what was meant to stay out.
"""

from __future__ import annotations

import configparser
import difflib
import getpass
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .filters import compile_pattern, parse_rule, read_rule_file

DEFAULT_PATHS = ("/etc/syncd/sync.ini",)
MIRROR_PREFIX = "mirror:"
# Seconds `prewarm` gives a source probe (its --probe-timeout): defined here,
# where the command line finds it without importing prewarm.
PROBE_TIMEOUT = 15.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_TRACE_DIR = "project/trace"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Files whose publication makes a new release visible to clients: they go
# live after every data file they may reference, and before any deletion.
DEFAULT_INDEX_PATTERNS: tuple[str, ...] = (
    # Debian / Ubuntu
    "Release", "Release.gpg", "InRelease",
    "Packages", "Packages.*", "Sources", "Sources.*",
    "Contents-*", "Translation-*", "Components-*", "icons-*", "Commands-*",
    "Index", "by-hash/**",
    # RPM (dnf/yum)
    "repodata/repomd.xml", "repodata/repomd.xml.*",
    # PyPI simple (PEP 503) and JSON indices
    "simple/index.html", "simple/*/index.html", "simple/*/index.v1_json", "pypi/*/json",
    # generic checksum lists and their signatures
    "SHA256SUMS", "SHA256SUMS.*", "SHA512SUMS", "SHA512SUMS.*", "MD5SUMS", "MD5SUMS.*",
    "*.sha256", "*.sha512",
    # Alpine, Arch
    "APKINDEX.tar.gz", "*.db", "*.db.sig", "*.files", "*.files.sig",
)


@dataclass(frozen=True)
class RuleFile:
    """An ``include_from``/``exclude_from`` file, read when the config is
    loaded (and again at a reload): its rules as ``"+ PATTERN"``/``"- PATTERN"``."""

    path: Path
    rules: tuple[str, ...]


@dataclass(frozen=True)
class NodeConfig:
    name: str
    root: Path
    state_dir: Path
    hash_workers: int = 2
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_from: tuple[RuleFile, ...] = ()
    exclude_from: tuple[RuleFile, ...] = ()
    filter: tuple[str, ...] = ()
    log_level: str = "info"
    max_delete: float = 0.10
    index_patterns: tuple[str, ...] = ()
    parallel_pushes: int = 4
    watch: bool = True
    watch_debounce: float = 0.1
    scan_interval: float = 300.0
    metrics_listen: str | None = None
    trace: bool = False
    trace_dir: str = DEFAULT_TRACE_DIR


@dataclass(frozen=True)
class MirrorConfig:
    name: str
    host: str
    port: int
    user: str
    identity_file: Path | None
    known_hosts: Path
    remote_command: str
    schedule: str
    connect_timeout: float
    keepalive: int
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_from: tuple[RuleFile, ...] = ()
    exclude_from: tuple[RuleFile, ...] = ()
    filter: tuple[str, ...] = ()
    retries: int = 3
    retry_delay: float = 1.0
    io_timeout: float = 300.0
    via: str | None = None
    bwlimit: int = 0


@dataclass(frozen=True)
class VerifyConfig:
    """``[verify]``: signature checks before publishing, and ``syncd verify``.

    ``keyring`` None: no signature checks (SHA-256 and the Release/repomd
    chain checks always run).  ``gnupghome`` None: ``state_dir/gnupg``.
    ``require_signed`` None: ``verify.DEFAULT_REQUIRE_SIGNED``.  ``schedule``
    is when the daemon runs ``verify`` by itself (on a mirror it marks its
    findings for repair by its upstream).
    """

    keyring: Path | None
    gnupghome: Path | None = None
    require_signed: tuple[str, ...] | None = None
    schedule: str = "30 4 * * *"


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeConfig
    mirrors: tuple[MirrorConfig, ...] = field(default_factory=tuple)
    verify: VerifyConfig = VerifyConfig(keyring=None)

    def mirror(self, name: str) -> MirrorConfig | None:
        return next((m for m in self.mirrors if m.name == name), None)

    def filter_rules(self, mirror: MirrorConfig) -> list[str]:
        """The rules of a push to ``mirror``, in rsync's order (first match wins).

        ``include`` and ``include_from`` come first, as rsync reads an
        ``--include`` listed ahead of a broader ``--exclude`` (what these
        keys have always meant); then the ordered ``filter`` rules; then
        ``exclude`` and ``exclude_from``.  At each step the mirror's rules
        come before the node's, so that they refine them.
        """
        levels = (mirror, self.node)
        rules: list[str] = []
        for level in levels:
            rules += [f"+ {p}" for p in level.include] + [r for f in level.include_from for r in f.rules]
        for level in levels:
            rules += level.filter
        for level in levels:
            rules += [f"- {p}" for p in level.exclude] + [r for f in level.exclude_from for r in f.rules]
        return rules


# ---------------------------------------------------------------------------
# Value parsers: each takes the raw string and returns the value or raises
# ValueError with the expectation ("expected ..."); the caller adds the place.


def _str(raw: str) -> str:
    if not raw:
        raise ValueError("expected a non-empty value")
    return raw


def _name(raw: str) -> str:
    if not _NAME_RE.match(raw):
        raise ValueError("expected a name of letters, digits, '.', '_', '-' (at most 64)")
    return raw


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("expected a path")
    return Path(os.path.expanduser(raw))


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise ValueError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not 0 < value <= 86400:
        raise ValueError("expected a number of seconds above 0 and at most 86400")
    return value


def _cron(raw: str) -> str:
    # APScheduler is the judge of what the daemon will accept; import it only
    # when a mirror has a schedule to check (its import is slow:
    # docs/performance.md, "Start-up").
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"expected a 5-field cron expression ({err})") from None
    return raw


def _patterns(raw: str) -> tuple[str, ...]:
    patterns = tuple(raw.split())
    for pat in patterns:
        compile_pattern(pat)  # ValueError names the pattern
    return patterns


def _filter(raw: str) -> tuple[str, ...]:
    """rsync filter rules, one a line (an INI value continued on indented lines)."""
    rules = []
    for line in raw.splitlines():
        if line.strip():
            include, pattern = parse_rule(line.strip())  # ValueError names the rule
            rules.append(f"{'+' if include else '-'} {pattern}")
    return tuple(rules)


def _rule_files(include: bool) -> Callable[[str], tuple[RuleFile, ...]]:
    """Files of rsync patterns, one path a line: read now, so that a missing
    file or a bad pattern is a config error, not a surprise at the first push."""

    def parse(raw: str) -> tuple[RuleFile, ...]:
        files = []
        for line in raw.splitlines():
            if line.strip():
                path = _path(line.strip())
                files.append(RuleFile(path, read_rule_file(path, include=include)))
        return tuple(files)

    return parse


def _log_level(raw: str) -> str:
    level = raw.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def _globs(raw: str) -> tuple[str, ...]:
    patterns = tuple(raw.split())
    if not patterns:
        raise ValueError("expected at least one pattern")
    return patterns


def _trace_dir(raw: str) -> str:
    """A directory relative to root: no leading '/', no '..', no empty parts."""
    value = raw.strip().rstrip("/")
    if not value or value.startswith("/"):
        raise ValueError("expected a directory relative to root, such as project/trace")
    parts = value.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\0" in value:
        raise ValueError("expected a directory relative to root without '.', '..' or '//'")
    return value


def _listen(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9109")
    return raw.strip()


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no (true/false, on/off, 1/0)")


def parse_rate(raw: str) -> int:
    """Bytes per second: ``0`` (no limit), or e.g. ``50M``, ``1.5G``, ``800K``
    (powers of 1000) or ``64Mi`` (powers of 1024); a trailing ``B`` or ``/s`` is allowed."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGkmg]i?)?[Bb]?(?:/s)?\s*", raw)
    if not m:
        raise ValueError("expected bytes per second such as 0, 800K, 50M, 1.5G or 64Mi")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}[unit]
    return int(float(m.group(1)) * scale)


def _share(raw: str) -> float:
    text = raw.strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("expected a share of the tree such as 10% or 0.1") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a share from 0% to 100%")
    return value


@dataclass(frozen=True)
class Key:
    parse: Callable[[str], Any]
    default: Any = None
    required: bool = False


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


NODE_KEYS: dict[str, Key] = {
    "name": Key(_name, required=True),
    "root": Key(_path, required=True),
    "state_dir": Key(_path, required=True),
    "hash_workers": Key(_int_range(1, 64), default=None),  # None: min(4, cores)
    "include": Key(_patterns, default=()),
    "exclude": Key(_patterns, default=()),
    "include_from": Key(_rule_files(include=True), default=()),
    "exclude_from": Key(_rule_files(include=False), default=()),
    "filter": Key(_filter, default=()),
    "log_level": Key(_log_level, default="info"),
    "max_delete": Key(_share, default=0.10),
    "index_patterns": Key(_globs, default=None),  # None: DEFAULT_INDEX_PATTERNS
    "parallel_pushes": Key(_int_range(1, 64), default=4),
    "watch": Key(_bool, default=True),
    "watch_debounce": Key(_seconds, default=0.1),
    "scan_interval": Key(_seconds, default=300.0),
    "metrics_listen": Key(_listen, default=None),
    "trace": Key(_bool, default=False),
    "trace_dir": Key(_trace_dir, default=DEFAULT_TRACE_DIR),
}

MIRROR_KEYS: dict[str, Key] = {
    "host": Key(_str, required=True),
    "port": Key(_int_range(1, 65535), default=22),
    "user": Key(_str, default=None),  # None: the current user
    "identity_file": Key(_path, default=None),  # None: ssh's usual keys or an agent
    "known_hosts": Key(_path, default=Path("~/.ssh/known_hosts")),
    "remote_command": Key(_str, default="syncd agent"),
    "schedule": Key(_cron, default="0 * * * *"),
    "connect_timeout": Key(_seconds, default=15.0),
    "keepalive": Key(_int_range(0, 3600), default=15),
    "include": Key(_patterns, default=()),
    "exclude": Key(_patterns, default=()),
    "include_from": Key(_rule_files(include=True), default=()),
    "exclude_from": Key(_rule_files(include=False), default=()),
    "filter": Key(_filter, default=()),
    "retries": Key(_int_range(1, 100), default=3),
    "retry_delay": Key(_seconds, default=1.0),
    "io_timeout": Key(_seconds, default=300.0),
    "via": Key(_name, default=None),
    "bwlimit": Key(parse_rate, default=0),
}

VERIFY_KEYS: dict[str, Key] = {
    "keyring": Key(_path, default=None),
    "gnupghome": Key(_path, default=None),  # None: state_dir/gnupg
    "require_signed": Key(_globs, default=None),  # None: verify.DEFAULT_REQUIRE_SIGNED
    "schedule": Key(_cron, default="30 4 * * *"),
}


# ---------------------------------------------------------------------------


def default_config_path() -> Path:
    env = os.environ.get("SYNCD_CONFIG")
    return Path(env) if env else Path(DEFAULT_PATHS[0])


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, parse and validate ``path`` (default ``$SYNCD_CONFIG``, then /etc)."""
    cfg_path = Path(path) if path is not None else default_config_path()
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,  # duplicate sections (mirror names) and keys are errors
        empty_lines_in_values=False,
        default_section="\0no-defaults",  # a literal [DEFAULT] is not special here
    )
    parser.optionxform = str  # keys are case-sensitive, as written in the contract
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            parser.read_file(fh, source=str(cfg_path))
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: no such config file (set -c FILE or $SYNCD_CONFIG)") from None
    except PermissionError:
        raise ConfigError(f"{cfg_path}: permission denied reading the config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{cfg_path}: is a directory, not a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{cfg_path}: not valid UTF-8 (byte {err.start})") from None
    except configparser.DuplicateSectionError as err:
        raise ConfigError(f"{cfg_path}: line {err.lineno}: section [{err.section}] appears twice") from None
    except configparser.DuplicateOptionError as err:
        raise ConfigError(
            f"{cfg_path}: line {err.lineno}: [{err.section}] {err.option}: key appears twice"
        ) from None
    except configparser.MissingSectionHeaderError as err:
        raise ConfigError(f"{cfg_path}: line {err.lineno}: a key before any [section] header") from None
    except configparser.ParsingError as err:
        lineno, line = err.errors[0] if err.errors else (0, "")
        raise ConfigError(f"{cfg_path}: line {lineno}: cannot parse {line.strip()!r}") from None
    except configparser.Error as err:
        raise ConfigError(f"{cfg_path}: {err.message.splitlines()[0]}") from None
    except OSError as err:
        raise ConfigError(f"{cfg_path}: cannot read: {err.strerror}") from None
    return _build(cfg_path, parser)


def _build(cfg_path: Path, parser: configparser.ConfigParser) -> Config:
    for section in parser.sections():
        if section in ("node", "verify") or section.startswith(MIRROR_PREFIX):
            continue
        hint = _section_hint(section)
        raise ConfigError(f"{cfg_path}: [{section}]: unknown section"
                          + (f" (did you mean [{hint}]?)" if hint else ""))

    if not parser.has_section("node"):
        raise ConfigError(f"{cfg_path}: missing section [node]")
    node_values = _section(cfg_path, parser, "node", NODE_KEYS)
    # Fields come from the key table; only derived defaults are spelled out.
    node = NodeConfig(**{
        **node_values,
        "hash_workers": node_values["hash_workers"] or _default_workers(),
        "index_patterns": node_values["index_patterns"] or DEFAULT_INDEX_PATTERNS,
    })
    _check_dirs(cfg_path, node)

    mirrors = []
    for section in parser.sections():
        if not section.startswith(MIRROR_PREFIX):
            continue
        name = section[len(MIRROR_PREFIX):]
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"{cfg_path}: [{section}]: mirror name must be letters, digits, '.', '_', '-' (at most 64)"
            )
        if name == node.name:
            raise ConfigError(f"{cfg_path}: [{section}]: a mirror cannot have this node's own name")
        values = _section(cfg_path, parser, section, MIRROR_KEYS)
        mirrors.append(MirrorConfig(**{
            **values,
            "name": name,
            "user": values["user"] or getpass.getuser(),
            "known_hosts": Path(os.path.expanduser(values["known_hosts"])),
        }))

    names = {m.name: m for m in mirrors}
    for m in mirrors:
        if m.via is None:
            continue
        if m.via not in names:
            raise ConfigError(f"{cfg_path}: [mirror:{m.name}] via: no [mirror:{m.via}] in this file")
        if names[m.via].via is not None or m.via == m.name:
            raise ConfigError(
                f"{cfg_path}: [mirror:{m.name}] via: {m.via} must be a direct downstream (no via of its own)"
            )

    verify = VerifyConfig(keyring=None)
    if parser.has_section("verify"):
        values = _section(cfg_path, parser, "verify", VERIFY_KEYS)
        verify = VerifyConfig(
            keyring=values["keyring"],
            gnupghome=values["gnupghome"],
            require_signed=values["require_signed"],
            schedule=values["schedule"],
        )
        if verify.keyring is not None and not verify.keyring.is_file():
            raise ConfigError(f"{cfg_path}: [verify] keyring: no such file {verify.keyring}")

    return Config(path=cfg_path, node=node, mirrors=tuple(mirrors), verify=verify)


def _section(cfg_path: Path, parser: configparser.ConfigParser, section: str, keys: dict[str, Key]) -> dict[str, Any]:
    raw = dict(parser.items(section))
    for key in raw:
        if key not in keys:
            hint = difflib.get_close_matches(key, list(keys), n=1)
            raise ConfigError(f"{cfg_path}: [{section}] {key}: unknown key"
                              + (f" (did you mean {hint[0]}?)" if hint else ""))
    values: dict[str, Any] = {}
    for key, spec in keys.items():
        if key not in raw:
            if spec.required:
                raise ConfigError(f"{cfg_path}: [{section}] {key}: missing required key")
            values[key] = spec.default
            continue
        try:
            values[key] = spec.parse(raw[key].strip())
        except ValueError as err:
            raise ConfigError(f"{cfg_path}: [{section}] {key}: {err}, got {raw[key]!r}") from None
    return values


def _section_hint(section: str) -> str | None:
    """The section an unknown one was probably meant to be: ``[mirror tier1]``
    (a space for the colon) or ``[mirors:m2]`` is ``[mirror:NAME]``."""
    word = re.match(r"\s*([A-Za-z]*)", section)
    head = word.group(1) if word else ""
    rest = section[word.end() if word else 0:].strip(" \t:;,._=-")
    if rest and _NAME_RE.match(rest) and difflib.get_close_matches(head.lower(), ["mirror"], cutoff=0.6):
        return MIRROR_PREFIX + rest
    hint = difflib.get_close_matches(section.strip().lower(), ["node", "verify"], n=1, cutoff=0.6)
    return hint[0] if hint else None


def _check_dirs(cfg_path: Path, node: NodeConfig) -> None:
    try:
        root_st = os.stat(node.root)
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: [node] root: {node.root} does not exist") from None
    except OSError as err:
        raise ConfigError(f"{cfg_path}: [node] root: {node.root}: {err.strerror}") from None
    if not os.path.isdir(node.root):
        raise ConfigError(f"{cfg_path}: [node] root: {node.root} is not a directory")
    # state_dir may not exist yet (it is created on first use); judge its
    # filesystem by its nearest existing ancestor.
    probe = node.state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{cfg_path}: [node] state_dir: {probe} is not a directory")
    try:
        state_dev = os.stat(probe).st_dev
    except OSError as err:
        raise ConfigError(f"{cfg_path}: [node] state_dir: {probe}: {err.strerror}") from None
    if state_dev != root_st.st_dev:
        raise ConfigError(
            f"{cfg_path}: [node] state_dir: {node.state_dir} is on another filesystem than root "
            f"{node.root} (staged files must reach root by rename)"
        )
    root_real = os.path.realpath(node.root)
    state_real = os.path.realpath(node.state_dir)
    if state_real == root_real or state_real.startswith(root_real.rstrip("/") + "/"):
        raise ConfigError(
            f"{cfg_path}: [node] state_dir: {node.state_dir} is inside root {node.root} "
            "(its staging files would be served)"
        )
