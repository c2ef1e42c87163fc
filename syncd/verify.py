"""Verification of a generation before it is published: SHA-256 and OpenPGP.

This module owns the final pass on the receiving node: hashing staged files
(many at once, on a bounded thread pool), checking OpenPGP signatures with
python-gnupg over a GNUPGHOME the node owns, deciding which files are
signatures, which are clearsigned and which must be signed, and following
the chain from a signed Debian ``Release``/``InRelease`` or RPM
``repomd.xml`` to every index file it names.

It makes no publishing decision: it returns findings, and an empty list means
the group may be published.  It does no writes outside the private GNUPGHOME.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import time
import posixpath
import queue
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar
from xml.parsers import expat

from syncd.errors import IndexFormatError, VerifyError

log = logging.getLogger(__name__)

PathLike = TypeVar("PathLike", str, os.PathLike)

# 256 KiB reads: large enough that hashlib drops the GIL for each update and
# syscalls cost nothing, small enough that the hash reads the bytes from L2
# right after the kernel copied them there (measured 5-8% faster than 1 MiB).
DEFAULT_BUFFER = 256 << 10

# Files matching these globs must carry a signature when a keyring is
# configured.  A glob without "/" matches the file name in any directory;
# one with "/" matches the whole relative path.
DEFAULT_REQUIRE_SIGNED: tuple[str, ...] = ("Release", "repomd.xml")
# X.gpg, X.asc, X.sig beside X are detached signatures of X.
DEFAULT_DETACHED_SUFFIXES: tuple[str, ...] = (".gpg", ".asc", ".sig")
# Clearsigned files: the signature and the signed text in one file.  "InX"
# beside "X" also counts as X's signature (InRelease for Release).
DEFAULT_CLEARSIGNED: tuple[str, ...] = ("InRelease",)
# Debian release files whose SHA256 list is checked against the group.
DEFAULT_DEBIAN_RELEASE: tuple[str, ...] = ("Release", "InRelease")

# OpenPGP hash algorithm ids (RFC 4880 9.4) no signature may rely on.
WEAK_DIGESTS = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}

# Caps that keep memory bounded by constants, whatever a hostile peer sends:
# signatures are small, and Debian's largest InRelease is a few MB.
MAX_SIGNATURE_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_KEYRING_BYTES = 64 << 20

_STAMP_NAME = "syncd-keyring.json"
_LOCK_NAME = "syncd-keyring.lock"
_KEYRING_FILES = ("pubring.kbx", "pubring.kbx~", "pubring.gpg", "pubring.gpg~", "trustdb.gpg")


# ---------------------------------------------------------------------------
# Findings


class FindingKind(enum.StrEnum):
    HASH_MISMATCH = "hash_mismatch"
    MISSING_FILE = "missing_file"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED_KEY = "expired_key"
    REVOKED_KEY = "revoked_key"
    MISSING_SIGNATURE = "missing_signature"
    INDEX_MISMATCH = "index_mismatch"
    MALFORMED_INDEX = "malformed_index"
    ERROR = "error"


@dataclass(frozen=True, order=True)
class Finding:
    """One reason the group must not be published; ``path`` is the relative path."""

    path: str
    kind: FindingKind
    message: str


# ---------------------------------------------------------------------------
# Hashing


def _fileio(path_or_fd: str | os.PathLike | int) -> io.FileIO:
    if isinstance(path_or_fd, int):
        return io.FileIO(path_or_fd, "rb", closefd=False)
    f = io.FileIO(os.fspath(path_or_fd), "rb")
    with contextlib.suppress(OSError, AttributeError):
        # Cold files: ask for aggressive readahead; harmless when cached.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def sha256_file(path_or_fd: str | os.PathLike | int, *, buffer: int | bytearray = DEFAULT_BUFFER) -> bytes:
    """SHA-256 of a file, streamed through one reused buffer.

    ``path_or_fd`` is a path, or an open fd read from its current offset and
    left open.  ``buffer`` is a size or a preallocated bytearray to reuse
    (hash_files gives each worker its own).  Raises OSError.
    """
    return _digest_file(path_or_fd, "sha256", bytearray(buffer) if isinstance(buffer, int) else buffer)


def _digest_file(path_or_fd: str | os.PathLike | int, algo: str, buf: bytearray) -> bytes:
    view = memoryview(buf)
    h = hashlib.new(algo)
    with _fileio(path_or_fd) as f:
        readinto, update = f.readinto, h.update
        while n := readinto(view):
            update(view[:n])
    return h.digest()


def default_workers() -> int:
    """Hash threads: one per core (SHA-256 is CPU-bound once files are cached)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def hash_files(
    items: Iterable[PathLike],
    *,
    workers: int | None = None,
    buffer_size: int = DEFAULT_BUFFER,
) -> Iterator[tuple[PathLike, bytes | OSError]]:
    """SHA-256 of many files, yielded as ``(item, digest or OSError)``.

    Results come in completion order, not input order: a large file must not
    hold back the small ones behind it.  Memory is one buffer per worker and
    at most ``4 * workers`` finished results waiting; ``items`` is consumed
    lazily, by the worker threads.  Closing the iterator early stops the
    workers after the files they are hashing.
    """
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1:
        buf = bytearray(buffer_size)
        for item in items:
            yield item, _hash_one(item, buf)
        return

    # Workers pull from one shared iterator and push to one bounded queue: a
    # lock and a queue hop per file (a few microseconds), where an executor
    # future per file cost more than hashing a 64 KiB file.
    source = iter(items)
    pull = threading.Lock()
    results: queue.Queue = queue.Queue(maxsize=4 * workers)
    stop = threading.Event()
    finished = object()

    def work() -> None:
        buf = bytearray(buffer_size)
        try:
            while not stop.is_set():
                with pull:
                    item = next(source, finished)
                if item is finished:
                    break
                results.put((item, _hash_one(item, buf)))
        except BaseException as err:  # from the caller's iterator: re-raised there
            results.put((finished, err))
            return
        results.put((finished, None))

    threads = [threading.Thread(target=work, name=f"syncd-hash-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    running, error = workers, None
    try:
        while running:
            item, got = results.get()
            if item is finished:
                running -= 1
                error = error or got
            elif error is None:
                yield item, got
        if error is not None:
            raise error
    finally:
        stop.set()
        while running:  # unblock workers waiting on a full queue
            item, _ = results.get()
            running -= item is finished
        for t in threads:
            t.join()


def _hash_one(item: str | os.PathLike, buf: bytearray) -> bytes | OSError:
    try:
        return sha256_file(item, buffer=buf)
    except OSError as err:
        return err


def check_hashes(expected: Mapping[PathLike, bytes], *, workers: int | None = None) -> list[Finding]:
    """Compare each file's SHA-256 with ``expected``; findings sorted by path.

    A file that does not exist is ``missing_file``; one that cannot be read
    is ``error``; a different digest is ``hash_mismatch``.
    """
    findings = []
    for item, got in hash_files(expected.keys(), workers=workers):
        name = os.fspath(item)
        if isinstance(got, OSError):
            findings.append(_os_finding(name, got))
        elif got != expected[item]:
            findings.append(Finding(name, FindingKind.HASH_MISMATCH,
                                    f"{name}: SHA-256 {got.hex()} differs from the manifest's "
                                    f"{expected[item].hex()}"))
    findings.sort()
    return findings


def _os_finding(name: str, err: OSError) -> Finding:
    if err.errno == errno.ENOENT:
        return Finding(name, FindingKind.MISSING_FILE, f"{name}: missing")
    return Finding(name, FindingKind.ERROR, f"{name}: cannot read: {err.strerror or err}")


# ---------------------------------------------------------------------------
# OpenPGP


# A gpg that gives no answer in this long (a stalled filesystem under its
# home, a lock another process never lets go) is killed: the check is an
# error, never a hang of the agent that holds the node's lock.
GPG_TIMEOUT = 60.0

_TIMED_GPG: Any = None


class _CallBox:
    """One gpg call's outcome as the timer saw it (shared by the caller and the timer thread)."""

    timed_out = False


def _timed_gpg(gnupg: Any) -> Any:
    """python-gnupg's GPG, each of whose gpg processes is killed after GPG_TIMEOUT."""
    global _TIMED_GPG
    if _TIMED_GPG is None:
        import threading

        class TimedGPG(gnupg.GPG):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.calls = threading.local()  # per calling thread: the box of its current call
                super().__init__(*args, **kwargs)

            def _open_subprocess(self, args: Any, passphrase: bool = False) -> Any:
                proc = super()._open_subprocess(args, passphrase)
                box = getattr(self.calls, "box", None) or _CallBox()  # the calling thread's

                def stop() -> None:
                    if proc.poll() is None:
                        box.timed_out = True
                        proc.kill()

                timer = threading.Timer(GPG_TIMEOUT, stop)
                timer.daemon = True
                timer.start()
                # The timer is cancelled when gpg's output is collected.
                proc.syncd_timer = timer
                return proc

            def _collect_output(self, process: Any, result: Any, writer: Any = None, stdin: Any = None) -> Any:
                try:
                    return super()._collect_output(process, result, writer, stdin)
                finally:
                    timer = getattr(process, "syncd_timer", None)
                    if timer is not None:
                        timer.cancel()

        _TIMED_GPG = TimedGPG
    return _TIMED_GPG


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

_OUTCOME_KIND = {
    SigOutcome.BAD: FindingKind.BAD_SIGNATURE,
    SigOutcome.UNKNOWN_KEY: FindingKind.UNKNOWN_KEY,
    SigOutcome.EXPIRED_KEY: FindingKind.EXPIRED_KEY,
    # The finding kinds are a contract with the caller; an expired signature
    # is, like an expired key, a signature that was good once.
    SigOutcome.EXPIRED_SIG: FindingKind.EXPIRED_KEY,
    SigOutcome.REVOKED_KEY: FindingKind.REVOKED_KEY,
    SigOutcome.MISSING: FindingKind.MISSING_SIGNATURE,
    SigOutcome.ERROR: FindingKind.ERROR,
}


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
        if keyword not in ("GOODSIG", "BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG", "VALIDSIG"):
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
            current.outcome = {
                "GOODSIG": SigOutcome.GOOD,
                "BADSIG": SigOutcome.BAD,
                "EXPSIG": SigOutcome.EXPIRED_SIG,
                "EXPKEYSIG": SigOutcome.EXPIRED_KEY,
                "REVKEYSIG": SigOutcome.REVOKED_KEY,
            }[keyword]
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


_CLEAR_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_SIG_BEGIN = b"-----BEGIN PGP SIGNATURE-----"
_SIG_END = b"-----END PGP SIGNATURE-----"


def _clearsigned_shape(data: bytes) -> str | None:
    """Why ``data`` is not one clean clearsigned message, or None.

    Text outside the armor is never covered by the signature; apt refuses it
    (a parser that read it would trust unsigned lines), and so do we.
    """
    stripped = data.strip()
    if not stripped.startswith(_CLEAR_BEGIN):
        return "not clearsigned" if _CLEAR_BEGIN not in data else "text before the signed message"
    if data.count(_CLEAR_BEGIN) != 1 or data.count(_SIG_END) != 1:
        return "more than one signed message"
    if not stripped.endswith(_SIG_END):
        return "text after the signature"
    return None


def clearsigned_body(data: bytes) -> bytes:
    """The text of a clearsigned message, without checking the signature.

    For chain checks when no keyring is configured.  Raises IndexFormatError
    when ``data`` is not one clearsigned message.
    """
    problem = _clearsigned_shape(data)
    if problem:
        raise IndexFormatError(problem)
    lines = data.strip().split(b"\n")
    i = 1
    while i < len(lines) and lines[i].rstrip(b"\r"):  # armor headers ("Hash: SHA512")
        i += 1
    body = []
    for line in lines[i + 1:]:
        line = line.rstrip(b"\r")
        if line == _SIG_BEGIN:
            return b"\n".join(body) + b"\n"
        body.append(line[2:] if line.startswith(b"- ") else line)
    raise IndexFormatError("no signature block")


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

    Raises VerifyError when the keyring file is unreadable or holds no public
    key, or ``home`` cannot be created.  While another process re-imports
    into the same ``home``, verification fails closed (unknown key).
    """

    def __init__(self, keyring_path: Path, home: Path, *, gpgbinary: str = "gpg") -> None:
        import gnupg  # lazily: commands that never verify do not pay for it

        self.keyring_path = Path(keyring_path)
        self.home = Path(home)
        self.gpgbinary = gpgbinary
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.home, 0o700)  # gpg warns about, and we must not allow, a shared home
        except OSError as err:
            raise VerifyError(f"GNUPGHOME {self.home}: cannot create: {err.strerror or err}") from err
        self._gpg = _timed_gpg(gnupg)(
            gpgbinary=gpgbinary,
            gnupghome=str(self.home),
            # The keyring is the trust anchor (like apt's gpgv): no web of
            # trust, no keyserver, no agent.
            options=["--trust-model", "always", "--no-auto-key-retrieve", "--no-autostart"],
        )
        self.refresh()

    def _run(self, name: str, call: Callable[[], Any]) -> tuple[Any, SigResult | None]:
        """One gpg call, with its result, or the SigResult that says it failed
        (could not start, or gave no answer within GPG_TIMEOUT and was killed)."""
        box = self._gpg.calls.box = _CallBox()
        try:
            result = call()
        except (OSError, ValueError) as err:
            return None, SigResult(SigOutcome.ERROR, name, f"{name}: cannot run gpg: {err}")
        finally:
            self._gpg.calls.box = None
        if box.timed_out:
            return None, SigResult(SigOutcome.ERROR, name,
                                   f"{name}: gpg gave no answer in {GPG_TIMEOUT:.0f} s and was stopped")
        return result, None

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop any gpg daemon started for ``home``."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)

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
        result = self._gpg.import_keys(data)
        fprs = [r["fingerprint"] for r in result.results if r.get("fingerprint") and r.get("ok")]
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
                proc = subprocess.run(
                    [self.gpgbinary, "--homedir", tmp, "--batch", "--no-autostart", "--no-default-keyring",
                     "--keyring", kbx, "--export"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
            finally:
                subprocess.run(["gpgconf", "--homedir", tmp, "--kill", "all"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0 or not proc.stdout:
            raise VerifyError(f"keyring {self.keyring_path}: cannot read keybox: "
                              f"{proc.stderr.decode(errors='replace').strip()[-200:]}")
        return proc.stdout

    def _write_stamp(self, stamp: dict) -> None:
        tmp = self.home / (_STAMP_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.replace(tmp, self.home / _STAMP_NAME)

    def fingerprints(self) -> list[str]:
        """Fingerprints of the primary keys now trusted."""
        return [k["fingerprint"] for k in self._gpg.list_keys()]

    # -- verification ----------------------------------------------------------

    def verify_detached(self, sig_path: Path, data_path: Path, *, name: str | None = None) -> SigResult:
        """Check that ``sig_path`` is a good detached signature of ``data_path``.

        ``name`` (default: the signature's path) is how messages name the file.
        """
        name = name or str(sig_path)
        try:
            size = os.stat(sig_path).st_size
        except FileNotFoundError:
            return SigResult(SigOutcome.MISSING, name, f"{name}: missing")
        except OSError as err:
            return SigResult(SigOutcome.ERROR, name, f"{name}: {err.strerror or err}")
        try:
            os.stat(data_path)
        except OSError as err:
            return SigResult(SigOutcome.ERROR, name, f"{name}: signed file {data_path}: {err.strerror or err}")
        if size > MAX_SIGNATURE_BYTES:
            return SigResult(SigOutcome.BAD, name, f"{name}: {size} bytes is too large for a signature")
        # abspath: a name starting with "-" must not read as an option.
        result, failed = self._run(name, lambda: self._gpg.verify_file(
            os.path.abspath(sig_path), data_filename=os.path.abspath(data_path)))
        if failed is not None:
            return failed
        return _verdict(name, result.stderr or "", detached=True)

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
        problem = _clearsigned_shape(data)
        if problem == "not clearsigned":
            return SigResult(SigOutcome.MISSING, name, f"{name}: is not signed")
        if problem:
            return SigResult(SigOutcome.BAD, name, f"{name}: {problem}")
        result, failed = self._run(name, lambda: self._gpg.verify(data, extra_args=["--output", "-"]))
        if failed is not None:
            return failed
        verdict = _verdict(name, result.stderr or "", detached=False)
        if not verdict.good:
            return verdict
        if (result.stderr or "").count("[GNUPG:] PLAINTEXT") != 1:
            return SigResult(SigOutcome.BAD, name, f"{name}: gpg saw more than one signed text")
        return SigResult(verdict.outcome, name, verdict.message, verdict.key_id, verdict.fingerprint,
                         content=result.data)


# ---------------------------------------------------------------------------
# Which files are signatures, which are signed, which must be


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    base = posixpath.basename(relpath)
    return any(fnmatch.fnmatchcase(relpath if "/" in p else base, p) for p in patterns)


@dataclass(frozen=True)
class SignaturePlan:
    """How the files of one group relate to signatures.

    ``detached`` maps a signature to the file it signs (both in the group);
    ``orphans`` maps a signature to the file it should sign, which is not in
    the group; ``clearsigned`` lists clearsigned files; ``unsigned`` lists
    files that require a signature and have none.
    """

    detached: dict[str, str]
    orphans: dict[str, str]
    clearsigned: tuple[str, ...]
    unsigned: tuple[str, ...]


def plan_signatures(
    paths: Iterable[str],
    *,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    detached_suffixes: Sequence[str] = DEFAULT_DETACHED_SUFFIXES,
    clearsigned: Sequence[str] = DEFAULT_CLEARSIGNED,
) -> SignaturePlan:
    """Pair signatures with what they sign, for the relative paths of a group.

    ``X.gpg`` (any suffix in ``detached_suffixes``) is a signature of ``X``
    when ``X`` is in the group, or when ``X`` is a file that requires a
    signature (``Release.gpg`` without ``Release``: an orphan).  Otherwise it
    is an ordinary file: a public key ``archive.gpg`` signs nothing.
    """
    pathset = set(paths)
    detached: dict[str, str] = {}
    orphans: dict[str, str] = {}
    for p in sorted(pathset):
        for sfx in detached_suffixes:
            if p.endswith(sfx) and len(p) > len(sfx):
                target = p[: -len(sfx)]
                if target in pathset:
                    detached[p] = target
                elif not target.endswith("/") and _matches(target, require_signed):
                    orphans[p] = target
                break
    clear = tuple(sorted(p for p in pathset if p not in detached and _matches(p, clearsigned)))
    signed_targets = set(detached.values())
    unsigned = []
    for p in sorted(pathset):
        if p in detached or p in clear or not _matches(p, require_signed):
            continue
        head, base = posixpath.split(p)
        sibling = posixpath.join(head, "In" + base)
        if p in signed_targets or sibling in clear:
            continue
        unsigned.append(p)
    return SignaturePlan(detached, orphans, clear, tuple(unsigned))


# ---------------------------------------------------------------------------
# Index formats


@dataclass(frozen=True)
class IndexEntry:
    """A file an index names: path relative to the index's base, size, digest."""

    path: str
    size: int | None
    digest: bytes
    algo: str = "sha256"


@dataclass(frozen=True)
class Release:
    """A parsed Debian Release (or InRelease's signed text).

    ``fields`` keeps field names as written; ``sha256`` is None when the
    file has no SHA256 field.
    """

    fields: dict[str, str]
    sha256: tuple[IndexEntry, ...] | None


_FIELD_RE = re.compile(r"([^\s:#-][^\s:]*):[ \t]*(.*)")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_SIZE_RE = re.compile(r"[0-9]{1,19}")
_BY_HASH_RE = re.compile(r"(?:^|/)by-hash/SHA256/[0-9a-f]{64}$")


def _check_relpath(path: str, what: str) -> str:
    if (not path or path.startswith("/") or "\0" in path or "\\" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise IndexFormatError(f"{what}: unsafe path {path[:200]!r}")
    return path


def parse_release(text: bytes | str) -> Release:
    """Parse a Release file's single deb822 paragraph.

    Raises IndexFormatError on anything but well-formed fields, SHA256 lines
    of ``hex64 size relpath`` with a safe relative path, and blank lines at
    the end.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise IndexFormatError(f"not UTF-8 at byte {err.start}") from err
    fields: dict[str, str] = {}
    lower: set[str] = set()
    name: str | None = None
    values: list[str] = []
    ended = False

    def flush() -> None:
        if name is not None:
            fields[name] = "\n".join(values)

    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        # deb822 whitespace is space and tab; str.strip would eat U+00A0 too.
        if not line.strip(" \t"):
            ended = name is not None or ended
            continue
        if ended:
            raise IndexFormatError(f"line {lineno}: more than one paragraph")
        if line[0] in " \t":
            if name is None:
                raise IndexFormatError(f"line {lineno}: continuation line before any field")
            values.append(line.strip(" \t"))
            continue
        m = _FIELD_RE.fullmatch(line)
        if not m:
            raise IndexFormatError(f"line {lineno}: not a field: {line[:80]!r}")
        flush()
        name, first = m.group(1), m.group(2).strip(" \t")
        if name.lower() in lower:
            raise IndexFormatError(f"line {lineno}: field {name} repeated")
        lower.add(name.lower())
        values = [first] if first else []
    flush()
    sha = None
    for key, value in fields.items():
        if key.lower() == "sha256":
            sha = tuple(_parse_sha256_line(v) for v in value.split("\n") if v)
    return Release(fields, sha)


def _parse_sha256_line(line: str) -> IndexEntry:
    parts = line.split()
    if len(parts) != 3 or not _HEX64_RE.fullmatch(parts[0]) or not _SIZE_RE.fullmatch(parts[1]):
        raise IndexFormatError(f"SHA256 line {line[:120]!r}: expected 'sha256 size path'")
    return IndexEntry(_check_relpath(parts[2], "SHA256"), int(parts[1]), bytes.fromhex(parts[0]))


def render_release(fields: Mapping[str, str], sha256: Sequence[IndexEntry] | None) -> str:
    """A Release file's text: ``fields`` (single-line values) then the SHA256 list."""
    out = [f"{k}: {v}" for k, v in fields.items()]
    if sha256 is not None:
        out.append("SHA256:")
        width = max((len(str(e.size)) for e in sha256), default=0)
        out.extend(f" {e.digest.hex()} {e.size:>{width}} {e.path}" for e in sha256)
    return "\n".join(out) + "\n"


_REPOMD_ALGOS = {"sha256": "sha256", "sha": "sha1", "sha1": "sha1", "sha224": "sha224",
                 "sha384": "sha384", "sha512": "sha512"}


def parse_repomd(data: bytes) -> tuple[IndexEntry, ...]:
    """The ``<data>`` entries of an RPM ``repomd.xml``, paths relative to the repo root.

    A DOCTYPE or entity declaration is refused before any expansion
    (billion laughs, external entities).  Entries with an ``xml:base`` or a
    URL as location point outside the tree and are left out.  Raises
    IndexFormatError; md5 and unknown checksum types are errors too.
    """
    entries: list[IndexEntry] = []
    stack: list[str] = []
    cur: dict | None = None
    text: list[str] = []

    def refuse(*_: object) -> None:
        raise IndexFormatError("DOCTYPE or entity declarations are not allowed")

    def start(tag: str, attrs: dict) -> None:
        nonlocal cur
        local = tag.rpartition("}")[2]
        if not stack and local != "repomd":
            raise IndexFormatError(f"root element is <{local}>, not <repomd>")
        stack.append(local)
        text.clear()
        if stack == ["repomd", "data"]:
            cur = {"type": attrs.get("type", "?")}
        elif cur is not None and len(stack) == 3:
            plain = {k.rpartition("}")[2]: v for k, v in attrs.items()}
            if local == "checksum":
                cur["algo"] = plain.get("type", "")
            elif local == "location":
                cur["href"] = plain.get("href")
                cur["base"] = plain.get("base")

    def end(tag: str) -> None:
        nonlocal cur
        local = stack.pop()
        if cur is not None and len(stack) == 2:
            if local == "checksum":
                cur["digest"] = "".join(text).strip()
            elif local == "size":
                cur["size"] = "".join(text).strip()
        elif cur is not None and local == "data":
            entry = _repomd_entry(cur)
            if entry is not None:
                entries.append(entry)
            cur = None
        text.clear()

    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise IndexFormatError(f"not well-formed XML: {err}") from err
    return tuple(entries)


def _repomd_entry(d: dict) -> IndexEntry | None:
    kind = d["type"]
    href = d.get("href")
    if not href or "digest" not in d:
        raise IndexFormatError(f"<data type={kind!r}> lacks a location or checksum")
    if d.get("base") or "://" in href:
        log.debug("repomd.xml: %s at %s%s is outside the tree; not checked", kind, d.get("base") or "", href)
        return None
    algo = _REPOMD_ALGOS.get(d.get("algo", "").lower())
    if algo is None:
        raise IndexFormatError(f"<data type={kind!r}>: checksum type {d.get('algo')!r} not accepted")
    digest = d["digest"]
    if not re.fullmatch(r"[0-9a-fA-F]+", digest) or len(digest) != 2 * hashlib.new(algo).digest_size:
        raise IndexFormatError(f"<data type={kind!r}>: {algo} checksum {digest[:140]!r} malformed")
    size = d.get("size")
    if size is not None and not _SIZE_RE.fullmatch(size):
        raise IndexFormatError(f"<data type={kind!r}>: size {size[:40]!r} malformed")
    return IndexEntry(_check_relpath(href, f"<data type={kind!r}> location"),
                      int(size) if size is not None else None, bytes.fromhex(digest), algo)


# ---------------------------------------------------------------------------
# The entry point


@dataclass
class GroupReport:
    """Findings, and per index file how many named files were checked or absent."""

    findings: list[Finding]
    checked: dict[str, int] = field(default_factory=dict)
    absent: dict[str, int] = field(default_factory=dict)


def verify_index_group(
    files: Mapping[str, Path],
    *,
    keyring: Keyring | None,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    expected_sha256: Mapping[str, bytes] | None = None,
    detached_suffixes: Sequence[str] = DEFAULT_DETACHED_SUFFIXES,
    clearsigned: Sequence[str] = DEFAULT_CLEARSIGNED,
    debian_release: Sequence[str] = DEFAULT_DEBIAN_RELEASE,
    workers: int | None = None,
    require_sha256_list: bool = True,
) -> list[Finding]:
    """Everything that stops this group from being published; empty = publish.

    See ``verify_index_group_report``, which this calls.
    """
    return verify_index_group_report(
        files, keyring=keyring, require_signed=require_signed, expected_sha256=expected_sha256,
        detached_suffixes=detached_suffixes, clearsigned=clearsigned, debian_release=debian_release,
        workers=workers, require_sha256_list=require_sha256_list).findings


def verify_index_group_report(
    files: Mapping[str, Path],
    *,
    keyring: Keyring | None,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    expected_sha256: Mapping[str, bytes] | None = None,
    detached_suffixes: Sequence[str] = DEFAULT_DETACHED_SUFFIXES,
    clearsigned: Sequence[str] = DEFAULT_CLEARSIGNED,
    debian_release: Sequence[str] = DEFAULT_DEBIAN_RELEASE,
    workers: int | None = None,
    require_sha256_list: bool = True,
) -> GroupReport:
    """Verify one group: ``files`` maps each relative path, as it will be
    published, to where its bytes are now (staging or the published tree).

    - SHA-256 of every file in ``expected_sha256`` (the sender's manifest);
      a path there but not in ``files`` is ``missing_file``.
    - With a keyring: every detached and clearsigned signature, and every
      file matching ``require_signed`` has one.  Without: no signature checks.
    - Every Debian Release/InRelease's SHA256 list and every
      ``repodata/repomd.xml``'s checksums against the files of the group that
      they name (size and digest); files named but not in the group are not
      checked and are counted in ``absent``.
    - A Release with no SHA256 list, named by no other Release, is
      ``malformed_index`` unless ``require_sha256_list`` is False (a tree
      checked without a keyring: such a Release has no chain to check, and
      is not the archive's trust root).

    All files are hashed once, in one parallel pass; signatures are checked
    by several gpg processes at once.  Raises VerifyError only when the
    keyring itself cannot be read (a node problem, not a finding about the
    group); everything about the files is a finding.
    """
    report = GroupReport([])
    findings = report.findings
    plan = plan_signatures(files, require_signed=require_signed,
                           detached_suffixes=detached_suffixes, clearsigned=clearsigned)
    clear_content: dict[str, bytes] = {}

    good_signed: set[str] = set()
    if keyring is not None:
        keyring.refresh()
        for sig, target in plan.orphans.items():
            findings.append(Finding(sig, FindingKind.MISSING_FILE,
                                    f"{sig}: signs {target}, which is not in the group"))
        jobs = [(sig, target) for sig, target in plan.detached.items()] + [(p, None) for p in plan.clearsigned]

        def check(job: tuple[str, str | None]) -> SigResult:
            sig, target = job
            if target is None:
                return keyring.verify_clearsigned(files[sig], name=sig)
            return keyring.verify_detached(files[sig], files[target], name=sig)

        # One gpg process per signature, ~10 ms each: run them side by side.
        n = min(len(jobs), default_workers() if workers is None else max(1, workers))
        with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="syncd-gpg") as pool:
            for (sig, target), res in zip(jobs, pool.map(check, jobs)):
                log.debug("%s", res.message)
                if not res.good:
                    findings.append(Finding(sig, _OUTCOME_KIND[res.outcome], res.message))
                elif target is None:
                    good_signed.add(sig)
                    clear_content[sig] = res.content or b""
                else:
                    good_signed.add(target)

    # (relpath, algo) -> list of (index that names it, expected digest, expected size)
    checks: dict[tuple[str, str], list[tuple[str, bytes, int | None]]] = {}
    named: dict[str, set[str]] = {}  # index -> files of the group it names
    no_sha256: list[str] = []

    def want(index: str, entries: Iterable[IndexEntry], base: str) -> None:
        n_absent = 0
        names = named.setdefault(index, set())
        for e in entries:
            rel = posixpath.normpath(posixpath.join(base, e.path)) if base else e.path
            if rel.startswith("../") or rel == "..":
                findings.append(Finding(index, FindingKind.MALFORMED_INDEX,
                                        f"{index}: names {e.path} outside the tree"))
            elif rel in files:
                checks.setdefault((rel, e.algo), []).append((index, e.digest, e.size))
                names.add(rel)
            else:
                n_absent += 1
        report.checked[index], report.absent[index] = len(names), n_absent

    for p in sorted(files):
        base = posixpath.basename(p)
        if _matches(p, debian_release) and p not in plan.detached:
            text = _index_text(p, files[p], findings, clear_content, keyring is not None,
                               clearsigned=_matches(p, clearsigned))
            if text is None:
                continue
            try:
                rel = parse_release(text)
            except IndexFormatError as err:
                findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: {err}"))
                continue
            if rel.sha256 is None:
                no_sha256.append(p)
            else:
                want(p, rel.sha256, posixpath.dirname(p))
        elif base == "repomd.xml" and posixpath.basename(posixpath.dirname(p)) == "repodata":
            text = _index_text(p, files[p], findings, clear_content, keyring is not None, clearsigned=False)
            if text is None:
                continue
            try:
                entries = parse_repomd(text)
            except IndexFormatError as err:
                findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: {err}"))
                continue
            want(p, entries, posixpath.dirname(posixpath.dirname(p)))

        elif _BY_HASH_RE.search(p):
            # apt fetches indices by digest (Acquire-By-Hash); the name is the claim.
            checks.setdefault((p, "sha256"), []).append(("its by-hash name", bytes.fromhex(base), None))

    # Debian's per-component Release files (main/binary-amd64/Release) carry
    # neither a signature nor a SHA256 list: the suite's Release names them,
    # and its signature covers them through that chain.
    named_by_any = set().union(*named.values()) if named else set()
    for p in no_sha256 if require_sha256_list else ():
        if p not in named_by_any:
            findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: has no SHA256 field"))
    if keyring is not None:
        for p in sorted(files):
            head, base = posixpath.split(p)
            sibling = posixpath.join(head, "In" + base)
            if p in plan.detached.values() or sibling not in clear_content:
                continue
            # Release stands on InRelease's signature: it must say the same.
            if not _same_text(files[p], clear_content[sibling]):
                findings.append(Finding(p, FindingKind.INDEX_MISMATCH,
                                        f"{p}: differs from the signed text of {sibling}"))
            else:
                good_signed.add(p)
        sig_failed = {t for s, t in plan.detached.items() if t not in good_signed}
        sig_failed.update(p for p in plan.clearsigned if p not in good_signed)
        for p in _unsigned_to_report(plan.unsigned, _chain_closure(good_signed, named), sig_failed, named):
            findings.append(Finding(p, FindingKind.MISSING_SIGNATURE, f"{p}: requires a signature and has none"))

    for rel, digest in (expected_sha256 or {}).items():
        if rel not in files:
            findings.append(Finding(rel, FindingKind.MISSING_FILE, f"{rel}: in the manifest but not staged"))
        else:
            checks.setdefault((rel, "sha256"), []).append(("", digest, None))

    findings.extend(_run_checks(checks, files, workers))
    findings[:] = sorted(set(findings))  # one file, two checks, same failure: say it once
    return report


def _same_text(path: Path, signed: bytes) -> bool:
    # Clearsigning does not sign trailing whitespace; compare what it does sign.
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError:
        return False

    def canon(b: bytes) -> list[bytes]:
        return [line.rstrip() for line in b.rstrip().split(b"\n")]

    return canon(data) == canon(signed)


def _unsigned_to_report(unsigned: Iterable[str], covered: set[str], sig_failed: set[str],
                        named: Mapping[str, set[str]]) -> list[str]:
    """Unsigned required files to report, one finding per root cause.

    A file named by an index that already failed (bad or missing signature)
    is not reported again: the index is.  A ring of unsigned indices naming
    one another, with no root, is reported whole.
    """
    pending = {p for p in unsigned if p not in covered}
    namers: dict[str, set[str]] = {}
    for index, names in named.items():
        for rel in names:
            namers.setdefault(rel, set()).add(index)
    roots = {p for p in pending if not namers.get(p, set()) & (pending | sig_failed)}
    inherited = _chain_closure(roots | sig_failed, {i: n & pending for i, n in named.items()})
    return sorted(roots | (pending - inherited))


def _chain_closure(roots: Iterable[str], named: Mapping[str, set[str]]) -> set[str]:
    """Files reached from well-signed indices through the indices they name.

    Only a path from a good signature counts: two unsigned indices naming
    each other cover nothing.
    """
    seen = set(roots)
    todo = list(seen)
    while todo:
        for rel in named.get(todo.pop(), ()):
            if rel not in seen:
                seen.add(rel)
                todo.append(rel)
    return seen


def _index_text(p: str, where: Path, findings: list[Finding], clear_content: Mapping[str, bytes],
                signatures_checked: bool, *, clearsigned: bool) -> bytes | None:
    """The bytes of an index to parse, or None (a finding is already recorded)."""
    if clearsigned and signatures_checked:
        # Only gpg's output of a good signature is trusted: a bad one already
        # has a finding, and its text is not worth parsing.
        return clear_content.get(p)
    try:
        with open(where, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError as err:
        findings.append(_os_finding(p, err))
        return None
    if len(data) > MAX_INDEX_BYTES:
        findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: larger than {MAX_INDEX_BYTES} bytes"))
        return None
    if clearsigned:
        try:
            return clearsigned_body(data)
        except IndexFormatError as err:
            findings.append(Finding(p, FindingKind.MALFORMED_INDEX, f"{p}: {err}"))
            return None
    return data


def _run_checks(checks: Mapping[tuple[str, str], list[tuple[str, bytes, int | None]]],
                files: Mapping[str, Path], workers: int | None) -> list[Finding]:
    findings: list[Finding] = []
    sizes: dict[str, int] = {}
    for rel, _algo in checks:
        if rel in sizes:
            continue
        try:
            sizes[rel] = os.stat(files[rel]).st_size
        except OSError as err:
            sizes[rel] = -1
            findings.append(_os_finding(rel, err))
    digests: dict[tuple[str, str], bytes] = {}
    by_path: dict[Path, list[str]] = {}
    for rel, algo in checks:
        if algo == "sha256" and sizes[rel] >= 0:
            by_path.setdefault(files[rel], []).append(rel)
    for where, got in hash_files(by_path, workers=workers):
        for rel in by_path[where]:
            if isinstance(got, OSError):
                findings.append(_os_finding(rel, got))
            else:
                digests[(rel, "sha256")] = got
    buf = bytearray(DEFAULT_BUFFER)
    for rel, algo in checks:
        if algo != "sha256" and sizes[rel] >= 0:
            try:
                digests[(rel, algo)] = _digest_file(files[rel], algo, buf)
            except OSError as err:
                findings.append(_os_finding(rel, err))
    for (rel, algo), wanted in checks.items():
        got = digests.get((rel, algo))
        if got is None:
            # Unreadable or missing: already a finding, and nothing to compare.
            continue
        for index, digest, size in wanted:
            if not index:
                if got != digest:
                    findings.append(Finding(rel, FindingKind.HASH_MISMATCH,
                                            f"{rel}: SHA-256 {got.hex()} differs from the manifest's {digest.hex()}"))
            elif size is not None and sizes[rel] != size:
                findings.append(Finding(rel, FindingKind.INDEX_MISMATCH,
                                        f"{rel}: {sizes[rel]} bytes, {index} says {size}"))
            elif got != digest:
                findings.append(Finding(rel, FindingKind.INDEX_MISMATCH,
                                        f"{rel}: {algo} {got.hex()} differs from {digest.hex()} in {index}"))
    return findings


def verify_tree_group(
    root: Path,
    rels: Iterable[str],
    *,
    keyring: Keyring | None,
    require_signed: Sequence[str] = DEFAULT_REQUIRE_SIGNED,
    workers: int | None = None,
) -> list[Finding]:
    """The index group of a published tree (``syncd verify``, the primary's
    check before a push): ``rels`` relative to ``root``.

    Only regular files count: a path that is missing or no longer a file
    is left out of the group, so it is reported only where an index names
    it.  Without a keyring a Release without a SHA256 list is no finding
    (see ``require_sha256_list``).
    """
    import stat as statmod

    files: dict[str, Path] = {}
    for rel in rels:
        where = Path(root) / rel
        try:
            if statmod.S_ISREG(os.lstat(where).st_mode):
                files[rel] = where
        except OSError:
            continue
    return verify_index_group(files, keyring=keyring, require_signed=require_signed, workers=workers,
                              require_sha256_list=keyring is not None)


__all__ = [
    "DEFAULT_BUFFER", "DEFAULT_CLEARSIGNED", "DEFAULT_DEBIAN_RELEASE", "DEFAULT_DETACHED_SUFFIXES",
    "DEFAULT_REQUIRE_SIGNED", "Finding", "FindingKind", "GroupReport", "IndexEntry", "Keyring", "Release",
    "SigOutcome", "SigResult", "SignaturePlan", "check_hashes", "clearsigned_body", "default_workers",
    "hash_files", "parse_release", "parse_repomd", "plan_signatures", "render_release", "sha256_file",
    "verify_index_group", "verify_index_group_report", "verify_tree_group",
]


# -- a node's own index group (run --once on a primary, the daemon, syncd verify) --


def node_keyring(cfg):  # noqa: ANN001, ANN202
    """The node's Keyring over its private GNUPGHOME, or None without ``[verify] keyring``."""
    if cfg.verify.keyring is None:
        return None
    return Keyring(cfg.verify.keyring, cfg.verify.gnupghome or cfg.node.state_dir / "gnupg")


def check_own_index_group(cfg, manifest) -> tuple[list, int]:  # noqa: ANN001
    """Findings on the node's own index group (signatures, Release/repomd
    chains), and how many index files it has."""
    from .manifest import KIND_FILE
    from .plan import IndexMatcher

    matcher = IndexMatcher(cfg.node.index_patterns)
    rels = [os.fsdecode(e.path) for e in manifest.entries() if e.kind == KIND_FILE and matcher(e.path)]
    keyring = node_keyring(cfg)
    try:
        findings = verify_tree_group(
            cfg.node.root, rels, keyring=keyring,
            require_signed=cfg.verify.require_signed or DEFAULT_REQUIRE_SIGNED, workers=cfg.node.hash_workers,
        )
    finally:
        if keyring is not None:
            keyring.close()
    return findings, len(rels)


META_RELEASE_CHECKED = "release_checked"
# A passed check is trusted this long: a signature or a key can expire
# without a new generation, and a mirror that was down gets the old one later.
RELEASE_CHECK_LIFETIME = 3600.0


def _release_check_key(cfg, manifest) -> str:  # noqa: ANN001
    """What a passed check of the node's own index group depended on: the
    generation (the scan just brought it up to date with the tree) and the
    verify settings, the keyring's stat data included."""
    keyring = cfg.verify.keyring
    try:
        ring = keyring_stamp(keyring) if keyring is not None else None
    except OSError:
        ring = {"path": str(keyring)}  # unreadable now: the check itself says so
    return json.dumps([manifest.generation, ring, list(cfg.verify.require_signed or DEFAULT_REQUIRE_SIGNED),
                       list(cfg.node.index_patterns)], default=str)


def refuse_broken_release(cfg, manifest) -> None:  # noqa: ANN001
    """A primary does not push a release its own mirrors would hold back.

    A generation that passed once is not checked again with the same verify
    settings: a no-op run over 100,000 files spent 0.3 s listing the index
    files of a tree that had not changed.
    """
    key = _release_check_key(cfg, manifest)
    now = time.time()
    try:
        kept = json.loads(manifest.get_meta(META_RELEASE_CHECKED) or "null")
        fresh = kept["key"] == key and 0 <= now - kept["at"] < RELEASE_CHECK_LIFETIME
    except (ValueError, TypeError, KeyError):
        fresh = False
    if fresh:
        return
    findings, _ = check_own_index_group(cfg, manifest)
    if not findings:
        manifest.set_meta(META_RELEASE_CHECKED, json.dumps({"key": key, "at": now}))
        return
    for f in findings:
        log.error("verify: %s", f.message)
    raise VerifyError(
        f"{cfg.node.name}: refusing to push: {len(findings)} finding(s) in this node's own index group, "
        f"first: {findings[0].message} (rerun with --no-verify to push anyway)"
    )
