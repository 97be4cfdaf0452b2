"""Driving the platform from tests: `ps3d serve` and `ps3d watch` as subprocesses, the Prefect REST API,
the catalog, and scans dropped into the inbox. The session's Prefect server and Dask cluster are fixtures
of conftest.py (prefect_api, dask_address, platform_env)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil

from ps3d_core import catalog
from ps3d_core.synth import synthesize, write_synthetic_scan

PS3D = str(Path(sys.executable).with_name("ps3d"))
SEGMENT_OPTIONS = {"folds": [0], "device": "cpu", "chunk_size": 64, "output_chunks": 32, "batch_size": 4}
QUIET_S = 2.0
RESCAN_S = 3.0
INGEST_TIMEOUT_S = 240


# --------------------------------------------------------------------------
# fixtures: one Prefect server and one Dask cluster per session
# --------------------------------------------------------------------------



def api_request(url: str, body: dict | None = None) -> list | dict:
    """A call to the Prefect REST API, retried as Prefect's own client does when the server is busy
    (503 while SQLite is locked, 429)."""
    import urllib.error

    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(6):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code not in (429, 502, 503) or attempt == 5:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def api_post(api_url: str, path: str, body: dict) -> list | dict:
    return api_request(api_url.rstrip("/") + path, body)


def ingest_runs(api_url: str, scan_name: str) -> list[dict]:
    """Flow runs of the ingest deployment for one scan (by its scan_path parameter)."""
    runs = api_post(api_url, "/flow_runs/filter", {"limit": 200, "sort": "EXPECTED_START_TIME_ASC"})
    return [r for r in runs if Path(r["parameters"].get("scan_path", "")).name == scan_name]


def artifacts(api_url: str, key: str) -> list[dict]:
    return api_post(api_url, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 50})


class Platform:
    """`ps3d serve` in a subprocess."""

    def __init__(self, home: Path, env: dict[str, str], model: Path | None, *extra: str) -> None:
        self.home = home
        self.inbox = home / "inbox"
        self.log = home.parent / f"serve-{home.name}-{uuid.uuid4().hex[:4]}.log"
        command = [PS3D, "serve", "--home", str(home), "--segment-options",
                   json.dumps(SEGMENT_OPTIONS), "--quiet", str(QUIET_S), "--rescan", str(RESCAN_S),
                   "--workers", "2", *extra]  # fmt: skip
        if model is not None:  # else the promoted model of <home>/models/current.json
            command[4:4] = ["--model", str(model)]
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=self.handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "ps3d platform ready" not in self.text():
            assert self.process.poll() is None, f"ps3d serve exited:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"ps3d serve not ready:\n{self.text()[-4000:]}"
            time.sleep(0.3)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> list[psutil.Process]:
        """Signal it, wait for it to exit; returns the descendants still alive afterwards."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(sig)
        self.process.wait(90)
        self.handle.close()
        _, alive = psutil.wait_procs(children, timeout=15)
        return alive


def wait_for(predicate, timeout: float, what: str, platform: Platform | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    log = platform.text()[-6000:] if platform else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")


def sample_row(home: Path, sample_id: str, status: str = "ingested"):
    row = catalog.get_sample(home, sample_id)
    return row if row is not None and row["status"] == status else None


def runs_of(home: Path, sample_id: str) -> list[dict]:
    if not (home / "snapshot").exists():
        return []
    sql = f"SELECT run_id, status, error FROM runs WHERE sample_id = '{sample_id}' ORDER BY started_at"
    return catalog.query(home, sql, limit=None).table.to_pylist()


def drop_scan(inbox: Path, sample_id: str, seed: int) -> Path:
    """A complete scan written straight into the inbox, marker last (write_synthetic_scan)."""
    return write_synthetic_scan(synthesize("tiny", seed, workers=1, sample_id=sample_id), inbox)


def api_get(api_url: str, path: str) -> dict:
    return api_request(api_url.rstrip("/") + path)


class Watcher:
    """`ps3d watch` in a subprocess."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = log.open("w")
        self.process = subprocess.Popen([PS3D, "watch", *args], env=env, stdout=self.handle, stderr=subprocess.STDOUT)
        wait_for(lambda: "watching " in self.text() or self.process.poll() is not None, 120, "the watcher")
        assert self.process.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(60)
        self.handle.close()
        return code


# --------------------------------------------------------------------------
# fault tests: scans staged outside the inbox, references, processes, a small disk
# --------------------------------------------------------------------------


def stage_scan(root: Path, sample_id: str, seed: int) -> Path:
    """A complete synthetic scan written under ``root`` (outside the inbox), to be moved in with one rename."""
    return write_synthetic_scan(synthesize("tiny", seed, workers=1, sample_id=sample_id), root)


def reference_of(root: Path, scans: list[Path], model_dir: Path) -> Path:
    """The fault-free database of ``scans`` (tests/reference.py), built in this process from copies of them.

    ``shutil.copytree`` keeps the files' modification times, so the copies have the scans' fingerprints.
    """
    from reference import reference_home

    home = root / f"reference-{uuid.uuid4().hex[:6]}"
    for scan in scans:
        copy = root / f".reference-scans-{uuid.uuid4().hex[:6]}" / scan.name
        shutil.copytree(scan, copy)
        reference_home(copy, model_dir, home, SEGMENT_OPTIONS)
    return home


def flow_run_processes(platform: Platform) -> list[psutil.Process]:
    """The flow-run processes (``python -m prefect.engine``) the platform's runner started."""
    found = []
    for child in psutil.Process(platform.process.pid).children(recursive=True):
        try:
            if "prefect.engine" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def segmentation_markers(home: Path, stage: str = "predict") -> list[Path]:
    """Chunk-task markers of the segmentations in progress under ``<home>/work``."""
    return list(home.glob(f"work/*/segment/.work-*/done/{stage}/*.pkl"))


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    return api_get(api_url, f"/flow_runs/{flow_run_id}")["state_type"]


@contextmanager
def tmpfs(path: Path, size_mb: int):
    """A tmpfs of ``size_mb`` MiB mounted at ``path`` (a small disk that fills up); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                             check=False, capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        raise AssertionError(f"this test needs a small file system: `mount -t tmpfs` at {path} failed "
                             f"(run as root or with CAP_SYS_ADMIN): {mounted.stderr.strip()}")  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # lazy: a straggler may still hold a file


def fill_disk(path: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves ``leave_bytes`` free on the file system of ``path``.

    A flow writing at the same time may take the last bytes first: the disk is then full, which is
    what the caller wants, so running out of space here ends the filling rather than the test.
    """
    ballast = path / "ballast"
    free = shutil.disk_usage(path).free
    with open(ballast, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush at close on a full disk
        chunk = b"\0" * (1 << 20)
        remaining = free - leave_bytes
        try:
            while remaining > 0:
                remaining -= handle.write(chunk[: min(len(chunk), remaining)])
            os.fsync(handle.fileno())
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return ballast
