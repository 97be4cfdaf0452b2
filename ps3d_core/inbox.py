"""The inbox: which scan directories are complete, what they contain, and the quarantine.

Pure file-system logic (no Prefect, no database), used by the watcher
(``deployments.watcher``) and the ingest flow (``flows.ingest``).

Readiness. A scan directory in the inbox is *ready* when its ``scan.json``
exists and either

* the ``_SCAN_COMPLETE`` marker is present (the producer says it finished), or
* it has been *quiet*: no file, hidden temporaries included, was modified in
  the last ``quiet_s`` seconds, **and** its activity signature (every file's
  relative path, size and mtime) has not changed while it was watched for at
  least ``quiet_s`` seconds. The second condition catches copies that
  preserve modification times (``cp -p``, ``rsync -a``), whose finished files
  look old while the next ones are still to come.

A directory that is not ready is looked at again on the next rescan.

Fingerprint. :func:`fingerprint` hashes (relative path, size, mtime_ns) of
every visible file (hidden ones such as ``.partial-*`` are skipped): the same
content gives the same fingerprint without reading the image, and rewriting
any file gives a new one. ``ps3d store`` records the same fingerprint, so
samples stored by hand and by the flow compare alike.

Listing. :func:`list_scans` yields the inbox's sub-directories, ignoring
hidden names (``.staging/``, ``.partial-*``) and names starting with ``_``
(``_truth/``, reserved); a symbolic link whose target lies outside the inbox
is refused (never followed), as is a scan holding such a link.

Quarantine. :func:`quarantine` moves a failed scan directory to
``<home>/quarantine/<name>-<UTC time>/<name>/`` beside an ``error.json`` that
names the file and the problem; the entry appears complete or not at all
(assembled in a hidden staging directory, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from schemas.scan import SCAN_COMPLETE_MARKER, SCAN_JSON

#: Default quiet period (seconds) before a scan without marker counts as complete.
DEFAULT_QUIET_S = 30.0
QUARANTINE_DIR = "quarantine"
ERROR_JSON = "error.json"


class InboxError(Exception):
    """A scan directory that cannot be watched (a link leaving the inbox); names the path."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class FileStat:
    """One file of a scan directory: path relative to the scan, size in bytes, mtime in ns."""

    relpath: str
    size: int
    mtime_ns: int
    hidden: bool


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def scan_files(scan_dir: str | os.PathLike[str], inbox: str | os.PathLike[str] | None = None) -> list[FileStat]:
    """Every file under ``scan_dir`` (hidden ones flagged), sorted by path.

    Symbolic links are followed only when they resolve inside ``inbox``
    (default: the scan's parent directory); any other link raises
    :class:`InboxError`. Files that vanish while listed are skipped.
    """
    root = Path(scan_dir)
    boundary = Path(inbox if inbox is not None else root.parent).resolve()
    files: list[FileStat] = []
    for directory, subdirs, names in os.walk(root, followlinks=True):
        here = Path(directory)
        for name in [*subdirs, *names]:
            path = here / name
            if path.is_symlink() and not _inside(path.resolve(), boundary):
                raise InboxError(path, f"is a link to {os.readlink(path)}, outside the inbox {boundary}; refused")
        subdirs.sort()
        hidden_dir = any(part.startswith(".") for part in here.relative_to(root).parts)
        for name in sorted(names):
            path = here / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append(
                FileStat(
                    relpath=os.path.relpath(path, root),
                    size=stat.st_size,
                    mtime_ns=stat.st_mtime_ns,
                    hidden=hidden_dir or name.startswith("."),
                )
            )
    return sorted(files, key=lambda f: f.relpath)


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:32]


def fingerprint_of(files: Iterable[FileStat]) -> str:
    """Content fingerprint of listed files: visible files' (path, size, mtime_ns), hashed."""
    return _digest(f"{f.relpath}|{f.size}|{f.mtime_ns}" for f in files if not f.hidden)


def fingerprint(scan_dir: str | os.PathLike[str], inbox: str | os.PathLike[str] | None = None) -> str:
    """Content fingerprint of a scan directory (32 hex digits); see the module docstring."""
    root = Path(scan_dir)
    if root.is_file():
        root = root.parent
    return fingerprint_of(scan_files(root, inbox))


def _activity(files: Iterable[FileStat]) -> str:
    """Signature of everything in the directory, hidden temporaries included."""
    return _digest(f"{f.relpath}|{f.size}|{f.mtime_ns}" for f in files)


@dataclass(frozen=True)
class Readiness:
    """Whether a scan directory is ready; ``reason`` says why (not); ``fingerprint`` when ready."""

    ready: bool
    reason: str
    fingerprint: str | None = None
    refused: bool = False


@dataclass
class _Seen:
    signature: str
    since: float


@dataclass
class ReadinessTracker:
    """Remembers what each scan directory looked like, to decide when it has been stable for ``quiet_s``.

    Parameters
    ----------
    quiet_s : float
        Seconds without any change (by mtime and by observation) before a
        scan without marker counts as complete.
    inbox : path, optional
        Links may point anywhere inside it (default: each scan's parent).
    clock : callable, optional
        Monotonic clock (seconds), for tests.
    """

    quiet_s: float = DEFAULT_QUIET_S
    inbox: str | os.PathLike[str] | None = None
    clock: Any = time.monotonic
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def check(self, scan_dir: str | os.PathLike[str], now_s: float | None = None) -> Readiness:
        """Readiness of ``scan_dir`` now (``now_s``: wall-clock seconds, default ``time.time()``)."""
        root = Path(scan_dir)
        key = str(root.absolute())
        if not (root / SCAN_JSON).is_file():
            self._seen.pop(key, None)
            return Readiness(False, f"no {SCAN_JSON} yet")
        try:
            files = scan_files(root, self.inbox)
        except InboxError as error:
            return Readiness(False, str(error), refused=True)
        except FileNotFoundError:
            self._seen.pop(key, None)
            return Readiness(False, "vanished while listed")
        content = fingerprint_of(files)
        if (root / SCAN_COMPLETE_MARKER).is_file():
            return Readiness(True, f"{SCAN_COMPLETE_MARKER} present", content)
        signature = _activity(files)
        observed = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen.signature != signature:
            self._seen[key] = seen = _Seen(signature, observed)
        now_s = time.time() if now_s is None else now_s
        newest = max((f.mtime_ns for f in files), default=0) / 1e9
        age = now_s - newest
        stable = observed - seen.since
        if age < self.quiet_s:
            return Readiness(False, f"last write {age:.1f} s ago (< {self.quiet_s:g} s quiet period)")
        if stable < self.quiet_s:
            return Readiness(False, f"unchanged for {stable:.1f} s of watching (< {self.quiet_s:g} s)")
        return Readiness(True, f"quiet for {min(age, stable):.1f} s", content)

    def forget(self, scan_dir: str | os.PathLike[str]) -> None:
        self._seen.pop(str(Path(scan_dir).absolute()), None)


def scan_readiness(
    scan_dir: str | os.PathLike[str], quiet_s: float = DEFAULT_QUIET_S, *, inbox: str | os.PathLike[str] | None = None
) -> Readiness:
    """One-shot readiness check (blocks up to ``quiet_s``): marker, or quiet and unchanged for ``quiet_s``.

    A scan whose files are old enough is watched for ``quiet_s`` seconds to
    confirm that nothing changes; the watcher instead keeps a
    :class:`ReadinessTracker` across its rescans.
    """
    tracker = ReadinessTracker(quiet_s=quiet_s, inbox=inbox)
    first = tracker.check(scan_dir)
    if first.ready or first.refused or "watching" not in first.reason:
        return first
    time.sleep(quiet_s)
    return tracker.check(scan_dir)


@dataclass(frozen=True)
class Listing:
    """Candidate scan directories of an inbox, and refused entries with the reason."""

    scans: list[Path]
    refused: list[tuple[Path, str]]


def list_scans(inbox: str | os.PathLike[str]) -> Listing:
    """The inbox's candidate scan directories, in name order (see the module docstring)."""
    root = Path(inbox)
    boundary = root.resolve()
    scans: list[Path] = []
    refused: list[tuple[Path, str]] = []
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return Listing([], [])
    for entry in entries:
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_symlink():
            target = entry.resolve()
            if not _inside(target, boundary) or target == boundary:
                refused.append((entry, f"is a link to {os.readlink(entry)}, outside the inbox; refused"))
                continue
        if entry.is_dir():
            scans.append(entry)
    return Listing(scans, refused)


# --------------------------------------------------------------------------
# quarantine
# --------------------------------------------------------------------------


def quarantine_root(home: str | os.PathLike[str]) -> Path:
    return Path(home) / QUARANTINE_DIR


def _move(source: Path, target: Path) -> None:
    """Rename, or copy then delete where the inbox and the home are on different file systems."""
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno != 18:  # EXDEV
            raise
        shutil.copytree(source, target, symlinks=True)
        shutil.rmtree(source)


def quarantine(
    scan_dir: str | os.PathLike[str],
    home: str | os.PathLike[str],
    error: BaseException | str,
    *,
    file: str | os.PathLike[str] | None = None,
    stage: str | None = None,
    details: dict[str, Any] | None = None,
) -> Path:
    """Move ``scan_dir`` into the quarantine with an ``error.json``; returns the quarantine entry.

    Parameters
    ----------
    scan_dir : path
        The failed scan directory (moved, not copied, when on the same file system).
    home : path
        Platform home; the entry is ``<home>/quarantine/<name>-<UTC time>/``.
    error : exception or str
        What went wrong. A :class:`ps3d_core.errors.ScanError` gives the file
        and the problem; other exceptions their type, message and traceback.
    file : path, optional
        The offending file, when not carried by ``error``.
    stage : str, optional
        The step that failed (validate, convert, segment, features, store).
    details : dict, optional
        Extra JSON fields (sample id, fingerprint, run id, flow run).

    Raises
    ------
    FileNotFoundError
        ``scan_dir`` no longer exists (nothing is written then).
    """
    source = Path(scan_dir)
    if not source.exists() and not source.is_symlink():
        raise FileNotFoundError(2, "scan directory vanished before it could be quarantined", str(source))
    root = quarantine_root(home)
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc)
    problem = getattr(error, "problem", None) if not isinstance(error, str) else error
    where = file if file is not None else getattr(error, "path", None)
    record: dict[str, Any] = {
        "scan": source.name,
        "original_path": str(source.absolute()),
        "file": str(where) if where is not None else str(source.absolute()),
        "problem": problem if problem is not None else f"{type(error).__name__}: {error}",
        "stage": stage,
        "quarantined_at": stamp.isoformat(timespec="seconds"),
    }
    if isinstance(error, BaseException) and getattr(error, "problem", None) is None:
        record["error_type"] = type(error).__name__
        record["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    record.update(details or {})
    name = f"{source.name}-{stamp:%Y%m%dT%H%M%S}Z"
    target = root / name
    counter = 1
    while target.exists():
        counter += 1
        target = root / f"{name}-{counter}"
    staging = root / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / ERROR_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        _move(source, staging / source.name)
        os.rename(staging, target)
    except BaseException:
        if (staging / source.name).exists() and not source.exists():
            _move(staging / source.name, source)  # put it back: nothing half-quarantined
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_quarantine(home: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The quarantine's entries (their ``error.json`` plus ``path``), oldest first."""
    root = quarantine_root(home)
    entries = []
    for entry in sorted(root.glob("*/" + ERROR_JSON)) if root.is_dir() else []:
        if entry.parent.name.startswith("."):
            continue
        try:
            record = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        entries.append(record | {"path": str(entry.parent)})
    return sorted(entries, key=lambda r: r.get("quarantined_at", ""))
