"""sync.ini: the contract keys, defaults, and one clear line for each bad input."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncd import config
from syncd.cli import main
from syncd.errors import EXIT_CONFIG, ConfigError

GOOD = """\
[node]
name = primary                 ; this node's name
root = {root}
state_dir = {state}

[mirror:tier1-east]            ; one section per direct downstream
host = 127.0.0.1
port = 2222
user = syncd
identity_file = /etc/syncd/id_ed25519
known_hosts = /etc/syncd/known_hosts
remote_command = syncd agent --config /etc/syncd/sync.ini
schedule = */15 * * * *

[mirror:tier1-west]
host = mirror2.example.net

[verify]
keyring = {keyring}
"""


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "srv"
    root.mkdir()
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    return {"root": root, "state": tmp_path / "state", "keyring": keyring, "tmp": tmp_path}


def write(dirs: dict[str, Path], text: str) -> Path:
    path = dirs["tmp"] / "sync.ini"
    path.write_text(text.format(root=dirs["root"], state=dirs["state"], keyring=dirs["keyring"]))
    return path


def test_contract_keys_and_defaults(dirs: dict[str, Path]) -> None:
    cfg = config.load(write(dirs, GOOD))
    assert cfg.node.name == "primary"
    assert cfg.node.root == dirs["root"]
    assert cfg.node.state_dir == dirs["state"]
    east, west = cfg.mirrors
    assert (east.name, east.host, east.port, east.user) == ("tier1-east", "127.0.0.1", 2222, "syncd")
    assert east.identity_file == Path("/etc/syncd/id_ed25519")
    assert east.known_hosts == Path("/etc/syncd/known_hosts")
    assert east.remote_command == "syncd agent --config /etc/syncd/sync.ini"
    assert east.schedule == "*/15 * * * *"
    # The defaults an ssh user expects.
    assert west.port == 22
    assert west.user == getpass.getuser()
    assert west.identity_file is None
    assert west.known_hosts == Path(os.path.expanduser("~/.ssh/known_hosts"))
    assert west.remote_command == "syncd agent"
    assert west.schedule == "0 * * * *"
    assert cfg.verify.keyring == dirs["keyring"]
    assert cfg.mirror("tier1-west") is west and cfg.mirror("nope") is None


def test_no_verify_section_means_no_keyring(dirs: dict[str, Path]) -> None:
    cfg = config.load(write(dirs, "[node]\nname = a\nroot = {root}\nstate_dir = {state}\n"))
    assert cfg.verify.keyring is None and cfg.mirrors == ()


def test_config_from_environment(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(dirs, "[node]\nname = a\nroot = {root}\nstate_dir = {state}\n")
    monkeypatch.setenv("SYNCD_CONFIG", str(path))
    assert config.load().path == path


NODE = "[node]\nname = primary\nroot = {root}\nstate_dir = {state}\n"

# (id, config text or None for "no file", expected fragment of the one-line error)
BAD = [
    ("syntax", "[node\nname = x\n", "line 1"),
    ("key-before-section", "name = x\n[node]\n", "before any [section]"),
    ("missing-node", "[verify]\n", "missing section [node]"),
    ("missing-name", "[node]\nroot = {root}\nstate_dir = {state}\n", "[node] name: missing required key"),
    ("missing-root", "[node]\nname = a\nstate_dir = {state}\n", "[node] root: missing required key"),
    ("missing-state", "[node]\nname = a\nroot = {root}\n", "[node] state_dir: missing required key"),
    ("missing-host", NODE + "[mirror:m1]\nport = 22\n", "[mirror:m1] host: missing required key"),
    ("bad-port", NODE + "[mirror:m1]\nhost = h\nport = ssh\n", "[mirror:m1] port: expected an integer"),
    ("port-range", NODE + "[mirror:m1]\nhost = h\nport = 70000\n", "[mirror:m1] port: expected an integer"),
    ("bad-timeout", NODE + "[mirror:m1]\nhost = h\nconnect_timeout = soon\n", "connect_timeout"),
    ("bad-cron", NODE + "[mirror:m1]\nhost = h\nschedule = every hour\n", "[mirror:m1] schedule: expected a 5-field cron"),
    ("bad-cron-range", NODE + "[mirror:m1]\nhost = h\nschedule = 99 * * * *\n", "[mirror:m1] schedule"),
    ("root-missing", "[node]\nname = a\nroot = {root}/nope\nstate_dir = {state}\n", "[node] root:"),
    ("duplicate-mirror", NODE + "[mirror:m1]\nhost = a\n[mirror:m1]\nhost = b\n", "section [mirror:m1] appears twice"),
    ("duplicate-key", NODE + "[mirror:m1]\nhost = a\nhost = b\n", "[mirror:m1] host: key appears twice"),
    ("bad-mirror-name", NODE + "[mirror:a/b]\nhost = a\n", "[mirror:a/b]: mirror name"),
    ("mirror-is-self", NODE + "[mirror:primary]\nhost = a\n", "this node's own name"),
    ("bad-node-name", "[node]\nname = ../x\nroot = {root}\nstate_dir = {state}\n", "[node] name: expected a name"),
    ("state-in-root", "[node]\nname = a\nroot = {root}\nstate_dir = {root}/.state\n", "inside root"),
    ("keyring-missing", NODE + "[verify]\nkeyring = {root}/none.gpg\n", "[verify] keyring: no such file"),
    ("bad-listen", NODE + "metrics_listen = nowhere\n", "[node] metrics_listen: expected HOST:PORT"),
    ("bad-bwlimit", NODE + "[mirror:m1]\nhost = h\nbwlimit = fast\n", "[mirror:m1] bwlimit: expected bytes per second"),
    ("bad-watch", NODE + "watch = maybe\n", "[node] watch: expected yes or no"),
    ("not-utf8", None, "not valid UTF-8"),
    ("no-file", None, "no such config file"),
]


@pytest.mark.parametrize("case,text,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_exit_2(dirs, case, text, fragment, capsys) -> None:  # noqa: ANN001
    path = dirs["tmp"] / "sync.ini"
    if case == "not-utf8":
        path.write_bytes(b"[node]\nname = \xff\n")
    elif text is not None:
        path = write(dirs, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert str(path) in message
    # Through the CLI: exit status 2 and the same single line on stderr.
    assert main(["-c", str(path), "status"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_unreadable_file(dirs: dict[str, Path]) -> None:
    if os.geteuid() == 0:
        # root reads anything: drop to nobody in a child to see the refusal.
        path = write(dirs, NODE)
        path.chmod(0o000)
        code = (
            # Import first: the interpreter's own files may not be readable by nobody.
            "import os,sys\nfrom syncd import config, errors\nos.setgid(65534); os.setuid(65534)\n"
            "try: config.load(sys.argv[1])\n"
            "except errors.ConfigError as e: print(e); sys.exit(e.exit_status)"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
        assert proc.returncode == EXIT_CONFIG, proc.stderr
        assert "permission denied" in proc.stdout
    else:
        path = write(dirs, NODE)
        path.chmod(0o000)
        with pytest.raises(ConfigError, match="permission denied"):
            config.load(path)


def test_state_dir_on_another_filesystem(dirs: dict[str, Path]) -> None:
    # /dev/shm (tmpfs) or /proc is another filesystem than the test tmp dir.
    other = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/proc")
    if os.stat(other).st_dev == os.stat(dirs["root"]).st_dev:
        pytest.skip("no second filesystem here")
    path = write(dirs, "[node]\nname = a\nroot = {root}\nstate_dir = " + str(other / "syncd-test-state") + "\n")
    with pytest.raises(ConfigError, match=r"\[node\] state_dir: .* another filesystem"):
        config.load(path)


# An unknown key or section used to be a warning, its default silently used
# (issue 28: "shedule" fell back to hourly, "exlude" published what was meant
# to stay out, "[mirror tier1]" was dropped).  It is now an error, with a hint.
UNKNOWN = [
    ("key", NODE + "[mirror:m1]\nhost = h\nidentiy_file = /x\n",
     "[mirror:m1] identiy_file: unknown key (did you mean identity_file?)"),
    ("schedule", NODE + "[mirror:m1]\nhost = h\nshedule = */5 * * * *\n",
     "[mirror:m1] shedule: unknown key (did you mean schedule?)"),
    ("node-key", NODE + "exlude = *.iso\n", "[node] exlude: unknown key (did you mean exclude?)"),
    ("no-hint", NODE + "colour = blue\n", "[node] colour: unknown key"),
    ("space-for-colon", NODE + "[mirror tier1]\nhost = h\n",
     "[mirror tier1]: unknown section (did you mean [mirror:tier1]?)"),
    ("misspelt-section", NODE + "[mirors:m2]\nhost = h\n",
     "[mirors:m2]: unknown section (did you mean [mirror:m2]?)"),
    ("verify", NODE + "[verfy]\nkeyring = /x\n", "[verfy]: unknown section (did you mean [verify]?)"),
    ("unrelated", NODE + "[printer]\nhost = h\n", "[printer]: unknown section"),
]


@pytest.mark.parametrize("case,text,fragment", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_key_or_section_is_an_error_with_a_hint(dirs, case, text, fragment, capsys) -> None:  # noqa: ANN001
    path = write(dirs, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: {fragment}"
    assert main(["-c", str(path), "status"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{path}: {fragment}"), err
    if "did you mean" not in fragment:
        assert "did you mean" not in err[0]


def test_log_level(dirs: dict[str, Path]) -> None:
    assert config.load(write(dirs, NODE)).node.log_level == "info"
    assert config.load(write(dirs, NODE + "log_level = DEBUG\n")).node.log_level == "debug"
    with pytest.raises(ConfigError, match=r"\[node\] log_level: expected one of debug, info, warning, error"):
        config.load(write(dirs, NODE + "log_level = loud\n"))


def test_filter_keys_and_their_order(dirs: dict[str, Path]) -> None:
    inc = dirs["tmp"] / "include.txt"
    inc.write_text("# comment\n; another\n\n*/binary-amd64/\n- *.old\nname with space\r\n")
    exc = dirs["tmp"] / "exclude.txt"
    exc.write_text("*.iso\n+ keep.iso\n")
    mexc = dirs["tmp"] / "mirror-exclude.txt"
    mexc.write_text("/private/\n")
    text = NODE + (
        "include = a b\n"
        f"include_from = {inc}\n"
        "filter =\n    - *.tmp   ; inline comment\n    include /keep/\n    - /*\n"
        "exclude = c\n"
        f"exclude_from = {exc}\n"
        "[mirror:m1]\nhost = h\ninclude = m\nfilter = + /m/\nexclude = x\n"
        f"exclude_from =\n    {mexc}\n"
    )
    cfg = config.load(write(dirs, text))
    assert cfg.node.filter == ("- *.tmp", "+ /keep/", "- /*")
    assert cfg.node.include_from[0].path == inc
    assert cfg.node.include_from[0].rules == ("+ */binary-amd64/", "- *.old", "+ name with space")
    assert cfg.node.exclude_from[0].rules == ("- *.iso", "+ keep.iso")
    assert cfg.filter_rules(cfg.mirrors[0]) == [
        "+ m", "+ a", "+ b", "+ */binary-amd64/", "- *.old", "+ name with space",  # includes
        "+ /m/", "- *.tmp", "+ /keep/", "- /*",  # the ordered rules
        "- x", "- /private/", "- c", "- *.iso", "+ keep.iso",  # excludes
    ]
    # Without the new keys, the order is what it always was: includes, then excludes.
    old = config.load(write(dirs, NODE + "include = a\nexclude = b\n[mirror:m1]\nhost = h\ninclude = c\n"))
    assert old.filter_rules(old.mirrors[0]) == ["+ c", "+ a", "- b"]


@pytest.mark.parametrize("text,fragment", [
    ("filter = * x\n", "[node] filter: filter rule '* x': expected '+ PATTERN' or '- PATTERN'"),
    ("filter =\n    - ok\n    - [abc\n", "[node] filter: filter pattern '[abc': unterminated '['"),
    ("filter = : .rsync-filter\n", "expected '+ PATTERN' or '- PATTERN'"),
    ("exclude_from = {root}/none.txt\n", "[node] exclude_from: {root}/none.txt: no such file"),
    ("include_from = {root}/bad.txt\n", "[node] include_from: {root}/bad.txt line 2: filter pattern '[x'"),
    ("include_from = {root}/clear.txt\n", "line 1: '!' (clear the list) is not supported"),
])
def test_bad_filter_keys(dirs: dict[str, Path], text: str, fragment: str) -> None:
    (dirs["root"] / "bad.txt").write_text("ok\n[x\n")
    (dirs["root"] / "clear.txt").write_text("!\n")
    with pytest.raises(ConfigError) as info:
        config.load(write(dirs, NODE + text))
    assert fragment.format(root=dirs["root"]) in str(info.value)
    assert "\n" not in str(info.value)


def test_every_key_is_documented_in_the_example_sync_ini() -> None:
    """The example sync.ini at the repository root documents every key syncd reads."""
    example = (Path(__file__).resolve().parent.parent / "sync.ini").read_text()
    documented = {line.lstrip(";").split("=")[0].strip() for line in example.splitlines() if "=" in line}
    for table in (config.NODE_KEYS, config.MIRROR_KEYS, config.VERIFY_KEYS):
        missing = set(table) - documented
        assert not missing, f"keys not documented in sync.ini: {sorted(missing)}"
