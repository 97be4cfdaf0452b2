"""The inbox (ps3d_core.inbox): readiness of scans being copied, fingerprints, listing, quarantine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ps3d_core.errors import ScanError
from ps3d_core.inbox import (
    ERROR_JSON,
    ReadinessTracker,
    fingerprint,
    list_scans,
    quarantine,
    read_quarantine,
    scan_readiness,
)
from schemas.scan import SCAN_COMPLETE_MARKER

QUIET = 0.8


def _scan_json(scan: Path, sample_id: str = "S1") -> None:
    scan.mkdir(parents=True, exist_ok=True)
    (scan / "scan.json").write_text(json.dumps({"sample_id": sample_id, "spacing_mm": 0.01, "stream": "feed"}))


def _slice(path: Path, value: int) -> None:
    tifffile.imwrite(path, np.full((16, 16), value, dtype=np.uint16))


def _wait_ready(tracker: ReadinessTracker, scan: Path, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = tracker.check(scan)
        if state.ready:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{scan} not ready after {timeout} s: {state.reason}")


def test_tiff_stack_written_slowly_is_ready_only_when_quiet(tmp_path):
    scan = tmp_path / "inbox" / "S1"
    _scan_json(scan)
    (scan / "slices").mkdir()
    tracker = ReadinessTracker(quiet_s=QUIET, inbox=tmp_path / "inbox")
    for index in range(6):
        _slice(scan / "slices" / f"{index:04d}.tif", index)
        state = tracker.check(scan)
        assert not state.ready, f"ready after slice {index}: {state.reason}"
        time.sleep(QUIET / 3)
    started = time.monotonic()
    state = _wait_ready(tracker, scan)
    assert time.monotonic() - started >= QUIET * 0.5  # waited for the quiet period
    assert state.fingerprint == fingerprint(scan)
    assert len(list((scan / "slices").glob("*.tif"))) == 6


def test_marker_makes_a_scan_ready_at_once(tmp_path):
    scan = tmp_path / "S1"
    _scan_json(scan)
    tifffile.imwrite(scan / "scan.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    tracker = ReadinessTracker(quiet_s=3600)
    assert not tracker.check(scan).ready
    (scan / SCAN_COMPLETE_MARKER).touch()
    state = tracker.check(scan)
    assert state.ready and SCAN_COMPLETE_MARKER in state.reason
    assert state.fingerprint == fingerprint(scan)


def test_no_scan_json_is_never_ready(tmp_path):
    scan = tmp_path / "S1"
    scan.mkdir()
    tifffile.imwrite(scan / "scan.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    (scan / SCAN_COMPLETE_MARKER).touch()
    state = ReadinessTracker(quiet_s=0).check(scan)
    assert not state.ready and "scan.json" in state.reason


def test_copy_preserving_old_mtimes_waits_for_stability(tmp_path):
    """cp -p / rsync -a: finished files look old while the next ones are still to come."""
    scan = tmp_path / "S1"
    _scan_json(scan)
    old = time.time() - 3600
    tracker = ReadinessTracker(quiet_s=QUIET)
    for index in range(3):
        _slice(scan / f"{index:04d}.tif", index)
        for path in scan.iterdir():
            os.utime(path, (old, old))
        assert not tracker.check(scan).ready  # nothing recent, but it just changed
        time.sleep(QUIET / 3)
    assert _wait_ready(tracker, scan).fingerprint == fingerprint(scan)


def test_growing_hidden_temporary_keeps_scan_not_ready(tmp_path):
    scan = tmp_path / "S1"
    _scan_json(scan)
    _slice(scan / "0000.tif", 0)
    old = time.time() - 3600
    for path in scan.iterdir():
        os.utime(path, (old, old))
    tracker = ReadinessTracker(quiet_s=QUIET)
    partial = scan / ".0001.tif.partial-abc"
    for chunk in range(5):
        with partial.open("ab") as handle:
            handle.write(b"x" * 100)
        assert not tracker.check(scan).ready
        time.sleep(QUIET / 3)
    partial.rename(scan / "0001.tif")
    assert not tracker.check(scan).ready  # the rename changed the listing
    assert _wait_ready(tracker, scan).ready


def test_one_shot_readiness(tmp_path):
    scan = tmp_path / "S1"
    _scan_json(scan)
    _slice(scan / "0000.tif", 0)
    assert not scan_readiness(scan, quiet_s=60).ready
    old = time.time() - 60
    for path in scan.iterdir():
        os.utime(path, (old, old))
    assert scan_readiness(scan, quiet_s=0.3).ready


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    scan = tmp_path / "S1"
    _scan_json(scan)
    tifffile.imwrite(scan / "scan.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    first = fingerprint(scan)
    assert first == fingerprint(scan)
    (scan / ".partial-xyz").write_text("temporary")  # hidden files do not count
    assert fingerprint(scan) == first
    stat = (scan / "scan.tif").stat()
    tifffile.imwrite(scan / "scan.tif", np.ones((4, 8, 8), np.uint16), photometric="minisblack")  # same size, new content
    os.utime(scan / "scan.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = fingerprint(scan)
    assert second != first
    (scan / "notes.txt").write_text("operator notes")
    assert fingerprint(scan) not in (first, second)


def test_list_scans_skips_hidden_reserved_and_outside_links(tmp_path):
    inbox = tmp_path / "inbox"
    for name in ("B", "A", ".staging", "_truth"):
        (inbox / name).mkdir(parents=True)
    (inbox / "readme.txt").write_text("not a scan")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (inbox / "evil").symlink_to(outside)
    (inbox / "alias").symlink_to(inbox / "A")
    listing = list_scans(inbox)
    assert [p.name for p in listing.scans] == ["A", "B", "alias"]
    assert [(p.name, "outside the inbox" in why) for p, why in listing.refused] == [("evil", True)]
    assert list_scans(tmp_path / "missing").scans == []


def test_scan_holding_a_link_outside_the_inbox_is_refused(tmp_path):
    inbox = tmp_path / "inbox"
    scan = inbox / "S1"
    _scan_json(scan)
    secret = tmp_path / "secret.tif"
    tifffile.imwrite(secret, np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    (scan / "scan.tif").symlink_to(secret)
    (scan / SCAN_COMPLETE_MARKER).touch()
    state = ReadinessTracker(quiet_s=0, inbox=inbox).check(scan)
    assert not state.ready and state.refused and "outside the inbox" in state.reason


def test_quarantine_moves_the_scan_with_its_reason(tmp_path):
    inbox, home = tmp_path / "inbox", tmp_path / "home"
    scan = inbox / "S1"
    _scan_json(scan)
    (scan / "scan.tif").write_bytes(b"not a tiff")
    error = ScanError(scan / "scan.tif", "is not a TIFF file")
    entry = quarantine(scan, home, error, stage="validate", details={"sample_id": "S1"})
    assert not scan.exists()
    assert entry.parent == home / "quarantine" and entry.name.startswith("S1-")
    record = json.loads((entry / ERROR_JSON).read_text())
    assert record["file"] == str(scan / "scan.tif")
    assert record["problem"] == "is not a TIFF file"
    assert record["stage"] == "validate" and record["sample_id"] == "S1"
    assert (entry / "S1" / "scan.tif").read_bytes() == b"not a tiff"
    assert not [p for p in (home / "quarantine").iterdir() if p.name.startswith(".")]

    # the same name again (the operator dropped it twice): a second entry, nothing overwritten
    _scan_json(scan)
    second = quarantine(scan, home, RuntimeError("boom"), stage="segment")
    assert second != entry and (entry / "S1" / "scan.tif").exists()
    record = json.loads((second / ERROR_JSON).read_text())
    assert record["problem"] == "RuntimeError: boom" and record["error_type"] == "RuntimeError"
    assert record["file"] == str(scan.absolute())
    assert [r["path"] for r in read_quarantine(home)] == [str(entry), str(second)]

    with pytest.raises(FileNotFoundError):
        quarantine(inbox / "gone", home, "missing")
    assert len(read_quarantine(home)) == 2
