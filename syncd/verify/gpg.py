"""OpenPGP: the node's keyring in a GNUPGHOME it owns, and gpg's verdict on signatures.

gpg runs as a plain subprocess with the command line python-gnupg builds
(``GPG.make_args``), and its machine-readable status lines (``--status-fd``,
described in GnuPG's doc/DETAILS) are read here.  python-gnupg offers no way
to bound a call, and a gpg stalled on its home must not hang an agent that
holds the node's lock: every call here ends within GPG_TIMEOUT, killed if it
has to be.  tests/test_verify.py checks that the command line and the
verdicts are python-gnupg's own.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from syncd.errors import VerifyError

from .index import MAX_INDEX_BYTES, clearsigned_shape

log = logging.getLogger(__name__)

# A gpg that gives no answer in this long (a stalled filesystem under its
# home, a lock another process never lets go) is killed: the check is an
# error, never a hang of the agent that holds the node's lock.
GPG_TIMEOUT = 60.0

# OpenPGP hash algorithm ids (RFC 4880 9.4) no signature may rely on.
WEAK_DIGESTS = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}

# Caps that keep memory bounded by constants, whatever a hostile peer sends:
# signatures are small.
MAX_SIGNATURE_BYTES = 1 << 20
MAX_KEYRING_BYTES = 64 << 20

_STAMP_NAME = "syncd-keyring.json"
_LOCK_NAME = "syncd-keyring.lock"
_KEYRING_FILES = ("pubring.kbx", "pubring.kbx~", "pubring.gpg", "pubring.gpg~", "trustdb.gpg")
# The keyring is the trust anchor (like apt's gpgv): no web of trust, no
# keyserver, no agent.
_OPTIONS = ("--trust-model", "always", "--no-auto-key-retrieve", "--no-autostart")


# ---------------------------------------------------------------------------
# Running gpg


class GpgFailed(Exception):
    """gpg could not be started, or gave no answer within GPG_TIMEOUT."""


@dataclass(frozen=True)
class GpgOutput:
    """One finished gpg run: its exit status, stdout, and stderr (status lines
    and gpg's own messages), decoded as Latin-1 like python-gnupg does."""

    returncode: int
    data: bytes
    stderr: str


def run_gpg(argv: Sequence[str], input: bytes | None = None) -> GpgOutput:
    """Run ``argv`` with ``input`` on stdin (none: /dev/null); GpgFailed when
    it cannot start or is still running after GPG_TIMEOUT (it is killed)."""
    try:
        proc = subprocess.run(list(argv), input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=GPG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise GpgFailed(f"gpg gave no answer in {GPG_TIMEOUT:.0f} s and was stopped") from None
    except OSError as err:
        raise GpgFailed(f"cannot run gpg: {err}") from None
    return GpgOutput(proc.returncode, proc.stdout, proc.stderr.decode("latin-1"))


class _Gpg:
    """gpg over one GNUPGHOME."""

    def __init__(self, gpgbinary: str, home: str, options: Sequence[str]) -> None:
        self.gpgbinary = gpgbinary
        self.home = home
        self.options = tuple(options)

    def argv(self, args: Sequence[str]) -> list[str]:
        """python-gnupg's command line for ``args`` (GPG.make_args, no passphrase)."""
        return [self.gpgbinary, "--status-fd", "2", "--no-tty", "--no-verbose", "--fixed-list-mode", "--batch",
                "--with-colons", "--homedir", self.home, *self.options, *args]

    def run(self, args: Sequence[str], input: bytes | None = None) -> GpgOutput:
        return run_gpg(self.argv(args), input)


def _kill_daemons(home: str | os.PathLike) -> None:
    """Stop any gpg daemon left running for ``home`` (none is needed to verify)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


# ---------------------------------------------------------------------------
# Verdicts


class SigOutcome(enum.Enum):
    GOOD = "good"
    BAD = "bad"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED_KEY = "expired_key"
    REVOKED_KEY = "revoked_key"
    EXPIRED_SIG = "expired_sig"
    MISSING = "missing"
    ERROR = "error"


# When no signature is good, the most telling problem is reported.
_PRIORITY = (
    SigOutcome.BAD,
    SigOutcome.REVOKED_KEY,
    SigOutcome.EXPIRED_KEY,
    SigOutcome.EXPIRED_SIG,
    SigOutcome.UNKNOWN_KEY,
    SigOutcome.ERROR,
    SigOutcome.MISSING,
)


@dataclass(frozen=True)
class SigResult:
    """The verdict on one signed file.

    ``content`` is the signed text of a clearsigned file exactly as gpg
    output it, set only when the outcome is GOOD.
    """

    outcome: SigOutcome
    path: str
    message: str
    key_id: str | None = None
    fingerprint: str | None = None
    content: bytes | None = field(default=None, repr=False)

    @property
    def good(self) -> bool:
        return self.outcome is SigOutcome.GOOD


@dataclass
class _Sig:
    outcome: SigOutcome | None = None
    key_id: str | None = None
    fingerprint: str | None = None
    validsig: bool = False
    user: str = ""
    digest_algo: str = ""
    note: str = ""


_VERDICTS = {
    "GOODSIG": SigOutcome.GOOD,
    "BADSIG": SigOutcome.BAD,
    "EXPSIG": SigOutcome.EXPIRED_SIG,
    "EXPKEYSIG": SigOutcome.EXPIRED_KEY,
    "REVKEYSIG": SigOutcome.REVOKED_KEY,
}


def _parse_status(stderr: str) -> tuple[list[_Sig], set[str], list[str]]:
    """gpg's ``--status-fd`` lines into one record per signature.

    Returns the signatures, the other status keywords seen, and gpg's own
    human messages (for error text).
    """
    sigs: list[_Sig] = []
    seen: set[str] = set()
    human: list[str] = []
    current: _Sig | None = None
    for line in stderr.splitlines():
        if not line.startswith("[GNUPG:] "):
            if line.startswith("gpg: "):
                human.append(line[5:].strip())
            continue
        keyword, _, value = line[9:].partition(" ")
        seen.add(keyword)
        if keyword == "NEWSIG":
            current = _Sig()
            sigs.append(current)
            continue
        if keyword not in ("ERRSIG", "VALIDSIG") and keyword not in _VERDICTS:
            continue
        if current is None:  # gpg before 2.1 sends no NEWSIG
            current = _Sig()
            sigs.append(current)
        parts = value.split()
        if keyword == "VALIDSIG":
            current.validsig = True
            if len(parts) > 7:
                current.digest_algo = parts[7]
            if parts:
                # The primary key's fingerprint (field 10) names the key even
                # when a subkey made the signature.
                current.fingerprint = parts[9] if len(parts) >= 10 else parts[0]
            continue
        if current.outcome is not None:
            # A second verdict without NEWSIG: never seen from gpg; count it
            # as another signature so a later line cannot launder an earlier.
            current = _Sig()
            sigs.append(current)
        current.key_id = parts[0] if parts else None
        if keyword == "ERRSIG":
            rc = parts[5] if len(parts) > 5 else ""
            current.outcome = SigOutcome.UNKNOWN_KEY if rc == "9" else SigOutcome.ERROR
            if len(parts) > 6 and parts[6] != "-":
                current.fingerprint = parts[6]
        else:
            current.user = value.partition(" ")[2]
            current.outcome = _VERDICTS[keyword]
    for sig in sigs:
        # GOODSIG alone is not enough: VALIDSIG says the key was usable.
        if sig.outcome is SigOutcome.GOOD and not sig.validsig:
            sig.outcome = SigOutcome.ERROR
        # gpg still accepts SHA-1 data signatures; apt and rpm no longer do,
        # since a chosen-prefix collision makes such a signature forgeable.
        if sig.outcome is SigOutcome.GOOD and sig.digest_algo in WEAK_DIGESTS:
            sig.outcome = SigOutcome.BAD
            sig.note = f" made with the weak digest {WEAK_DIGESTS[sig.digest_algo]}"
    return sigs, seen, human


def _verdict(name: str, stderr: str, *, detached: bool) -> SigResult:
    """One outcome for a file that may carry several signatures.

    Like apt: any bad signature fails the file; otherwise one good signature
    by a key in the keyring is enough (others by unknown or retired keys are
    ignored, as Debian signs with the current and the next key).
    """
    sigs, seen, human = _parse_status(stderr)
    sigs = [s for s in sigs if s.outcome is not None]
    detail = human[-1] if human else "no status from gpg"
    if not sigs:
        if "NODATA" in seen:
            if detached:
                return SigResult(SigOutcome.BAD, name, f"{name}: holds no valid OpenPGP signature ({detail})")
            return SigResult(SigOutcome.MISSING, name, f"{name}: is not signed")
        return SigResult(SigOutcome.ERROR, name, f"{name}: gpg could not verify it: {detail}")
    bad = [s for s in sigs if s.outcome is SigOutcome.BAD]
    good = [s for s in sigs if s.outcome is SigOutcome.GOOD]
    if good and not bad:
        s = good[0]
        by = f"{s.fingerprint or s.key_id} {s.user}".rstrip()
        return SigResult(SigOutcome.GOOD, name, f"{name}: good signature by {by}", s.key_id, s.fingerprint)
    worst = min(sigs, key=lambda s: _PRIORITY.index(s.outcome) if s.outcome in _PRIORITY else len(_PRIORITY))
    who = worst.fingerprint or worst.key_id or "unknown key"
    text = {
        SigOutcome.BAD: f"BAD signature by {who}{worst.note}",
        SigOutcome.REVOKED_KEY: f"signed by revoked key {who}",
        SigOutcome.EXPIRED_KEY: f"signed by expired key {who}",
        SigOutcome.EXPIRED_SIG: f"signature by {who} has expired",
        SigOutcome.UNKNOWN_KEY: f"signed by key {who}, which is not in the keyring",
        SigOutcome.ERROR: f"signature by {who} cannot be checked: {detail}",
    }[worst.outcome]
    return SigResult(worst.outcome, name, f"{name}: {text}", worst.key_id, worst.fingerprint)


# ---------------------------------------------------------------------------
# The keyring


def keyring_stamp(path: Path) -> dict:
    """What tells a keyring file changed.  ctime and inode too: a keyring
    replaced by rename within one mtime tick, at the same size, must still
    be noticed.  OSError when it cannot be stat'ed."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


class Keyring:
    """An OpenPGP keyring imported into a GNUPGHOME the node owns.

    The keyring file (binary, as Debian's archive keyrings; ASCII-armored; or
    a GnuPG keybox) is the trust anchor: every key in it is trusted, none
    other.  It is imported into ``home`` (created mode 0700) once, and again
    only when the file changed; keys dropped from the file are dropped from
    ``home``.  No gpg-agent is needed or started for verification; ``close``
    stops one anyway in case a gpg run left it behind.

    Raises VerifyError when gpg cannot run, the keyring file is unreadable or
    holds no public key, or ``home`` cannot be created.  While another
    process re-imports into the same ``home``, verification fails closed
    (unknown key).
    """

    def __init__(self, keyring_path: Path, home: Path, *, gpgbinary: str = "gpg") -> None:
        self.keyring_path = Path(keyring_path)
        self.home = Path(home)
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.home, 0o700)  # gpg warns about, and we must not allow, a shared home
        except OSError as err:
            raise VerifyError(f"GNUPGHOME {self.home}: cannot create: {err.strerror or err}") from err
        self._gpg = _Gpg(gpgbinary, str(self.home), _OPTIONS)
        self._check_gpg()
        self.refresh()

    @property
    def gpgbinary(self) -> str:
        return self._gpg.gpgbinary

    def _check_gpg(self) -> None:
        # A gpg that cannot run is the node's problem, said once here rather
        # than as an error on every signature (python-gnupg asked the same).
        try:
            out = self._gpg.run(["--list-config"])
        except GpgFailed as err:
            raise VerifyError(f"GNUPGHOME {self.home}: {err}") from None
        if out.returncode != 0:
            raise VerifyError(f"GNUPGHOME {self.home}: {self.gpgbinary} --list-config failed: "
                              f"{out.stderr.strip()[-200:]}")

    def _verify(self, name: str, args: Sequence[str], input: bytes) -> tuple[GpgOutput | None, SigResult | None]:
        """One gpg call, with its output, or the SigResult that says it failed
        (could not start, or gave no answer within GPG_TIMEOUT and was killed)."""
        try:
            return self._gpg.run(args, input), None
        except GpgFailed as err:
            return None, SigResult(SigOutcome.ERROR, name, f"{name}: {err}")

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop any gpg daemon started for ``home``."""
        _kill_daemons(self.home)

    # -- import --------------------------------------------------------------

    def _stat_stamp(self) -> dict:
        try:
            return keyring_stamp(self.keyring_path)
        except OSError as err:
            raise VerifyError(f"keyring {self.keyring_path}: {err.strerror or err}") from err

    def _read_stamp(self) -> dict:
        try:
            with open(self.home / _STAMP_NAME, encoding="utf-8") as f:
                stamp = json.load(f)
            return stamp if isinstance(stamp, dict) else {}
        except (OSError, ValueError):
            return {}

    def refresh(self) -> bool:
        """Import the keyring file again if it changed; True when it did.

        A stat per call when nothing changed; the file is hashed only when its
        stat differs, and imported only when its bytes do.
        """
        current = self._stat_stamp()
        old = self._read_stamp()
        if all(old.get(k) == v for k, v in current.items()):
            return False
        with open(self.home / _LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read_keyring()
            current["sha256"] = hashlib.sha256(data).hexdigest()
            old = self._read_stamp()
            if old.get("sha256") == current["sha256"] and old.get("path") == current["path"]:
                self._write_stamp(current)  # touched, not changed
                return False
            self._import(data)
            self._write_stamp(current)
        return True

    def _read_keyring(self) -> bytes:
        try:
            with open(self.keyring_path, "rb") as f:
                data = f.read(MAX_KEYRING_BYTES + 1)
        except OSError as err:
            raise VerifyError(f"keyring {self.keyring_path}: {err.strerror or err}") from err
        if len(data) > MAX_KEYRING_BYTES:
            raise VerifyError(f"keyring {self.keyring_path}: larger than {MAX_KEYRING_BYTES} bytes")
        return data

    def _import(self, data: bytes) -> None:
        # The stamp goes first: a crash before the new one is written leaves
        # no stamp, so the next start imports again.
        for name in (_STAMP_NAME, *_KEYRING_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.home / name)
        if data[8:12] == b"KBXf":
            data = self._export_keybox(data)
        try:
            out = self._gpg.run(["--import"], data)
        except GpgFailed as err:
            raise VerifyError(f"keyring {self.keyring_path}: {err}") from None
        fprs = [parts[1] for parts in _status_records(out.stderr, "IMPORT_OK") if len(parts) > 1]
        if not fprs:
            raise VerifyError(f"keyring {self.keyring_path}: no OpenPGP public keys found")
        log.debug("imported %d keys from %s into %s", len(fprs), self.keyring_path, self.home)

    def _export_keybox(self, data: bytes) -> bytes:
        # gpg reads a keybox only as a --keyring, and may write lock files
        # beside it: give it a private copy.
        with tempfile.TemporaryDirectory(prefix="syncd-kbx-") as tmp:
            os.chmod(tmp, 0o700)
            kbx = os.path.join(tmp, "keyring.kbx")
            with open(kbx, "wb") as f:
                f.write(data)
            try:
                out = run_gpg([self.gpgbinary, "--homedir", tmp, "--batch", "--no-autostart", "--no-default-keyring",
                               "--keyring", kbx, "--export"])
            except GpgFailed as err:
                raise VerifyError(f"keyring {self.keyring_path}: cannot read keybox: {err}") from None
            finally:
                _kill_daemons(tmp)
        if out.returncode != 0 or not out.data:
            raise VerifyError(f"keyring {self.keyring_path}: cannot read keybox: {out.stderr.strip()[-200:]}")
        return out.data

    def _write_stamp(self, stamp: dict) -> None:
        tmp = self.home / (_STAMP_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.replace(tmp, self.home / _STAMP_NAME)

    def fingerprints(self) -> list[str]:
        """Fingerprints of the primary keys now trusted."""
        try:
            out = self._gpg.run(["--list-keys", "--with-fingerprint"])
        except GpgFailed as err:
            raise VerifyError(f"GNUPGHOME {self.home}: {err}") from None
        fprs, primary = [], False
        for line in out.data.decode("latin-1").splitlines():
            record = line.split(":")
            if record[0] == "pub":
                primary = True
            elif record[0] == "fpr" and primary and len(record) > 9:
                fprs.append(record[9])
                primary = False
        return fprs

    # -- verification ----------------------------------------------------------

    def verify_detached(self, sig_path: Path, data_path: Path, *, name: str | None = None) -> SigResult:
        """Check that ``sig_path`` is a good detached signature of ``data_path``.

        ``name`` (default: the signature's path) is how messages name the file.
        """
        name = name or str(sig_path)
        try:
            f = open(sig_path, "rb")
        except FileNotFoundError:
            return SigResult(SigOutcome.MISSING, name, f"{name}: missing")
        except OSError as err:
            return SigResult(SigOutcome.ERROR, name, f"{name}: {err.strerror or err}")
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                os.stat(data_path)
            except OSError as err:
                return SigResult(SigOutcome.ERROR, name, f"{name}: signed file {data_path}: {err.strerror or err}")
            if size > MAX_SIGNATURE_BYTES:
                return SigResult(SigOutcome.BAD, name, f"{name}: {size} bytes is too large for a signature")
            try:
                sig = f.read(MAX_SIGNATURE_BYTES + 1)
            except OSError as err:
                return SigResult(SigOutcome.ERROR, name, f"{name}: cannot read: {err.strerror or err}")
        if len(sig) > MAX_SIGNATURE_BYTES:
            return SigResult(SigOutcome.BAD, name,
                             f"{name}: more than {MAX_SIGNATURE_BYTES} bytes is too large for a signature")
        # The signature on stdin ("-"); abspath: a name starting with "-" must
        # not read as an option.
        out, failed = self._verify(name, ["--verify", "-", os.path.abspath(data_path)], sig)
        if out is None:
            return failed
        return _verdict(name, out.stderr, detached=True)

    def verify_clearsigned(self, path: Path, *, name: str | None = None) -> SigResult:
        """Check a clearsigned file (InRelease); on GOOD, ``content`` is its signed text."""
        name = name or str(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            return SigResult(SigOutcome.MISSING, name, f"{name}: missing")
        except OSError as err:
            return SigResult(SigOutcome.ERROR, name, f"{name}: cannot read: {err.strerror or err}")
        if len(data) > MAX_INDEX_BYTES:
            return SigResult(SigOutcome.ERROR, name, f"{name}: larger than {MAX_INDEX_BYTES} bytes")
        problem = clearsigned_shape(data)
        if problem == "not clearsigned":
            return SigResult(SigOutcome.MISSING, name, f"{name}: is not signed")
        if problem:
            return SigResult(SigOutcome.BAD, name, f"{name}: {problem}")
        out, failed = self._verify(name, ["--verify", "--output", "-"], data)
        if out is None:
            return failed
        verdict = _verdict(name, out.stderr, detached=False)
        if not verdict.good:
            return verdict
        if out.stderr.count("[GNUPG:] PLAINTEXT") != 1:
            return SigResult(SigOutcome.BAD, name, f"{name}: gpg saw more than one signed text")
        return SigResult(verdict.outcome, name, verdict.message, verdict.key_id, verdict.fingerprint,
                         content=out.data)


def _status_records(stderr: str, keyword: str) -> list[list[str]]:
    """The fields of each ``[GNUPG:] keyword`` status line."""
    prefix = f"[GNUPG:] {keyword} "
    return [line[len(prefix):].split() for line in stderr.splitlines() if line.startswith(prefix)]
