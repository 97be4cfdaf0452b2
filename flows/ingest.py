"""The ingest flow: scan directory -> validated, converted, segmented, measured, stored sample.

``ingest_scan(scan_path)`` runs, as Prefect tasks that pass paths:

1. **validate** (flow process): ``scan.json`` and one readable image;
2. **claim**: a ``sample_id`` belongs to one scan directory
   (:mod:`ps3d_core.claims`): a sample already stored from another directory
   (its archive's ``source.json``) belongs to that one; otherwise, among the
   inbox's directories claiming the id, the one whose name sorts first wins,
   whatever the order they arrived or ran in. A losing scan fails here and is
   quarantined with the winner's name; the sample's row is not touched (it is
   the winner's). The ``resegment`` flow (the archive) and ``force`` skip this;
3. **ledger**: a sample already stored with the same content fingerprint and
   model version is not ingested again (the flow returns ``skipped``); the
   ledger is the catalog's ``samples`` row (status, fingerprint,
   model_version), read from its snapshot;
4. **record**: the run is recorded as ``running`` with its process (host,
   pid, start time, flow run id). Earlier ``running`` runs of the sample whose
   process is gone (killed; the runner marked their flow run crashed) are
   marked ``interrupted``;
5. **convert** and **segment** (Dask, concurrently): the OME-Zarr image and
   the particle labels, written into a work directory
   ``<home>/work/<sample>-<fingerprint>/`` (a re-run of the same content
   resumes the segmentation there: its finished chunk tasks are not run
   again). A segmentation whose flow run died stops at its next chunk;
6. **features** (Dask): the particle Parquet file;
7. **store** (flow process, the only writer of the catalog): the particles
   and the ``samples`` row replace the sample's earlier ones atomically; the
   run is recorded in ``runs``; then the archived scan (a scan directory:
   ``scan.json``, ``image.ome.zarr`` and ``source.json`` with the original's
   fingerprint and path) and the labels are moved to ``<home>/scans/<sample>/``
   and ``<home>/segmentations/<sample>/``. The archive is what the ``resegment``
   flow re-ingests: its ledger fingerprint is the original scan's;
8. a Prefect markdown artifact ``ingest-<sample>`` with the sample's summary.

Failure. Any error of steps 1-7 (bad input, a crash of the segmentation)
waits for the run's tasks to stop writing, removes the work directory,
records the run as failed, marks the sample ``quarantined`` with the reason
(its earlier particles, if any, stay stored and queryable), moves the scan
directory to ``<home>/quarantine/`` with an ``error.json``; the flow run then
fails with the reason. Only this flow run is affected: every scan has its
own. A failure of the platform rather than of the scan (a full disk or an
exceeded quota, the catalog locked) leaves the sample's row as it was: its
stored version is still complete and the latest good one; the error is in the
run's row, the flow run's log and (disk full) the quarantine's ``error.json``
(a scan that cannot be quarantined stays in the inbox). A scan that changed
while it was being ingested is not stored: the run ends ``superseded`` and
the watcher submits the new content.

Dask. Tasks run on the cluster at ``$DASK_SCHEDULER_ADDRESS`` (``ps3d serve``
starts a persistent local one and exports it), else on a temporary local
cluster per flow run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from deployments.cluster import SCHEDULER_ADDRESS_ENV
from ps3d_core import __version__, catalog
from ps3d_core.claims import claim_winner, claimants
from ps3d_core.errors import ScanError
from ps3d_core.inbox import fingerprint as scan_fingerprint
from ps3d_core.inbox import quarantine
from ps3d_core.io.atomic import replace_directory
from ps3d_core.model_registry import describe_model, resolve_model
from schemas.catalog import SAFE_ID_PATTERN
from schemas.scan import SCAN_JSON
from tasks.ingest import (
    convert_scan,
    measure_particles,
    segment_scan,
    store_particles,
    validate_scan,
)

WORK_DIR = "work"
SCANS_DIR = "scans"
SEGMENTATIONS_DIR = "segmentations"
#: Written beside the archived scan: the fingerprint and path of the scan it was converted from.
SOURCE_JSON = "source.json"
ARCHIVED_IMAGE = "image.ome.zarr"
#: Segmentation defaults of the flow (``SegmentParams`` fields); a deployment's ``segment_options`` override them.
DEFAULT_SEGMENT_OPTIONS: dict[str, Any] = {"device": "auto"}
#: Prefect state types after which a flow run's process no longer works on its sample.
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
#: Seconds a failing run waits for its tasks still running on Dask before it removes their work directory.
TASK_DRAIN_S = 300.0


def task_runner():
    """DaskTaskRunner on ``$DASK_SCHEDULER_ADDRESS``, else on a temporary local cluster (one thread per worker)."""
    from prefect_dask import DaskTaskRunner

    address = os.environ.get(SCHEDULER_ADDRESS_ENV) or None
    if address is not None:
        return DaskTaskRunner(address=address)
    workers = max(1, min(4, os.cpu_count() or 1))
    # the scheduler's HTTP server runs even without a dashboard: a free port, not the well-known 8787
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}
    )  # fmt: skip


# --------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------


def ledger_entry(home: str | os.PathLike[str], sample_id: str) -> dict[str, Any] | None:
    """The catalog's ``samples`` row of a sample (None when unknown or no catalog yet)."""
    return catalog.get_sample(home, sample_id)


def already_ingested(
    home: str | os.PathLike[str], sample_id: str, fingerprint: str, model_version: str
) -> dict[str, Any] | None:
    """The stored row when this sample was ingested with this content and this model version, else None."""
    row = ledger_entry(home, sample_id)
    if (
        row is not None
        and row.get("status") == "ingested"
        and row.get("fingerprint") == fingerprint
        and row.get("model_version") == model_version
    ):
        return row
    return None


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def new_run_id(sample: str | None = None) -> str:
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    return f"ingest-{stamp}-{uuid.uuid4().hex[:8]}"


def artifact_key(sample_id: str) -> str:
    """Prefect artifact keys hold lowercase letters, digits and dashes only."""
    return "ingest-" + (re.sub(r"[^a-z0-9-]+", "-", sample_id.lower()).strip("-") or "sample")


def _raw_sample_id(scan: Path) -> str | None:
    """The sample id of a scan.json that failed validation, when it is a usable id."""
    try:
        value = json.loads((scan / SCAN_JSON).read_text(encoding="utf-8")).get("sample_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and re.fullmatch(SAFE_ID_PATTERN, value) and set(value) != {"."} else None


def source_fingerprint(scan: Path) -> str | None:
    """The original scan's fingerprint recorded in an archived scan (``source.json``), else None."""
    try:
        value = json.loads((scan / SOURCE_JSON).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _is_archive(scan: Path, home: Path) -> bool:
    return scan.parent.absolute() == (home / SCANS_DIR).absolute()


# --------------------------------------------------------------------------
# who owns a sample id; which runs are dead; platform problems
# --------------------------------------------------------------------------


def stored_from(home: Path, sample_id: str) -> Path | None:
    """The original path of the scan a sample was stored from (its archive's ``source.json``), else None."""
    try:
        value = json.loads((home / SCANS_DIR / sample_id / SOURCE_JSON).read_text(encoding="utf-8")).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(value) if isinstance(value, str) and value else None


def check_claim(home: Path, scan: Path, sample_id: str) -> None:
    """Raise :class:`ScanError` when another scan directory owns ``sample_id`` (rule: :mod:`ps3d_core.claims`)."""
    stored = stored_from(home, sample_id)
    winner = claim_winner(scan.name, claimants(scan.parent, sample_id), stored.name if stored else None)
    if winner == scan.name:
        return
    where = f", from which it is already stored ({stored})" if stored else f" ({scan.parent / winner}), whose name sorts first"
    raise ScanError(scan / SCAN_JSON, f"sample_id {sample_id} is also claimed by scan directory {winner}{where}; "
                    "a sample_id belongs to one scan directory: give this scan its own sample_id and move it back "
                    "into the inbox")  # fmt: skip


def process_record() -> dict[str, Any]:
    """This run's process, recorded in its run row so that a later run can tell whether it died."""
    import psutil
    from prefect.runtime import flow_run

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "flow_run_id": flow_run.id}  # fmt: skip


def _flow_run_state(flow_run_id: str) -> str | None:
    """The state type of a flow run (COMPLETED, CRASHED, ...), None when the API cannot tell."""
    from uuid import UUID

    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - unknown: the caller treats the run as alive
        return None
    return state.type.value if state is not None else None


def process_alive(process: dict[str, Any]) -> bool:
    """Whether the process of a run recorded as ``running`` may still work on it (unknown counts as alive).

    On this host the pid and its start time tell (a reused pid has another
    start time); elsewhere the state of the run's flow run does.
    """
    import psutil

    if process.get("host") == socket.gethostname() and process.get("pid"):
        try:
            started = psutil.Process(int(process["pid"])).create_time()
        except psutil.NoSuchProcess:
            return False
        return abs(started - float(process.get("pid_started") or 0)) < 1.0
    if process.get("flow_run_id"):
        return _flow_run_state(str(process["flow_run_id"])) not in FINAL_STATES
    return True


def interrupt_dead_runs(home: Path, sample_id: str, run_id: str) -> list[str]:
    """Mark the sample's other ``running`` runs whose process is gone as ``interrupted``; their ids."""
    dead = [row["run_id"] for row in catalog.running_runs(home, sample_id)
            if row["run_id"] != run_id and not process_alive(row["parameters"].get("process") or {})]  # fmt: skip
    return catalog.interrupt_runs(home, dead, f"interrupted: its process ended without recording an outcome "
                                  f"(killed, or its failure could not be written); run {run_id} took over")  # fmt: skip


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def disk_full(error: BaseException) -> bool:
    """True when ``error`` or an error it came from is a full disk or an exceeded quota.

    Errors from Dask workers, DuckDB or wrapped ones may carry only the message, so that counts too.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(message in str(current) for message in _DISK_FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def written_file(error: BaseException) -> Path | None:
    """The file named by ``error`` or an error it came from (an ``OSError``'s filename, a ``ScanError``'s path)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = getattr(current, "filename", None) or getattr(current, "path", None)
        if isinstance(name, (str, os.PathLike)):
            return Path(name)
        current = current.__cause__ or current.__context__
    return None


def _drain(futures: list, logger) -> None:
    """Wait for the run's submitted tasks to stop (so none writes into a work directory being removed)."""
    from prefect.futures import wait

    if futures:
        _, running = wait(futures, timeout=TASK_DRAIN_S)
        if running:
            logger.warning("%d task(s) still running after %g s; removing their work directory anyway",
                           len(running), TASK_DRAIN_S)  # fmt: skip


def sample_summary(particles_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Particles, D10/D50/D80 by volume, mean sphericity and phase grades of a particle Parquet file.

    Sphericity and D-values exclude particles cut by the volume border or the
    field of view (their shape is not the whole particle's). A phase's grade is
    its share of all particle voxels (volume-weighted phase fractions).
    """
    import numpy as np
    import pyarrow.compute as pc

    table, phases, phases_source = catalog.read_particles_file(particles_path)
    touches = pc.fill_null(table.column("touches_border"), False).to_numpy(zero_copy_only=False)
    whole = ~touches
    sphericity = table.column("sphericity").to_numpy(zero_copy_only=False).astype(float)
    volume = table.column("volume_mm3").to_numpy(zero_copy_only=False).astype(float)
    chosen = sphericity[whole & np.isfinite(sphericity)]
    grades = {}
    total = float(np.nansum(volume))
    for name in phases:
        column = f"phase_{name}_fraction"
        if column in table.column_names and total > 0:
            fraction = table.column(column).to_numpy(zero_copy_only=False).astype(float)
            grades[name] = float(np.nansum(fraction * volume) / total)
    return {
        "particles": table.num_rows,
        "particles_touching_border": int(touches.sum()),
        **catalog.volume_d_values(table),
        "mean_sphericity": float(chosen.mean()) if chosen.size else None,
        "phase_grades": grades,
        "phases_source": phases_source,
        "total_volume_mm3": total,
    }


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def summary_markdown(sample_id: str, summary: dict[str, Any], model: dict[str, Any], fingerprint: str,
                     timings: dict[str, float], scan_path: str) -> str:  # fmt: skip
    grades = ", ".join(f"{name} {100 * share:.2f} %" for name, share in summary["phase_grades"].items()) or "no phases"
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    return "\n".join([
        f"# Sample `{sample_id}` ingested",
        "",
        "| | |",
        "|---|---|",
        f"| particles | {summary['particles']} ({summary['particles_touching_border']} touching the border) |",
        (f"| D10 / D50 / D80 by volume | {_fmt(summary['d10_volume_mm'])} / {_fmt(summary['d50_volume_mm'])} / "
         f"{_fmt(summary['d80_volume_mm'])} mm |"),
        f"| mean sphericity (whole particles) | {_fmt(summary['mean_sphericity'], 3)} |",
        f"| phase grades (share of particle volume; {summary['phases_source'] or 'none'}) | {grades} |",
        f"| model | {model['name']} {model['version']} |",
        f"| scan | `{scan_path}` (fingerprint `{fingerprint}`) |",
        f"| timings | {stages} |",
        "",
        f"Query it: `ps3d sql \"SELECT * FROM d_values WHERE sample_id = '{sample_id}'\"`",
    ])  # fmt: skip


# --------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------


@flow(name="ingest-scan", task_runner=task_runner(), log_prints=True)
def ingest_scan(
    scan_path: str,
    fingerprint: str | None = None,
    model_dir: str | None = None,
    segment_options: dict[str, Any] | None = None,
    home: str | None = None,
    force: bool = False,
    quarantine_failed: bool = True,
) -> dict[str, Any]:
    """Ingest one scan directory into the particle database (see the module docstring).

    Parameters
    ----------
    scan_path : str
        The scan directory (``scan.json`` + image).
    fingerprint : str, optional
        The content fingerprint the trigger saw (the watcher's); the flow
        fingerprints the scan itself and logs a difference.
    model_dir : str, optional
        Model folder; default ``$PS3D_MODEL``, else the promoted model of
        ``<home>/models/current.json``, else the shipped default.
    segment_options : dict, optional
        ``SegmentParams`` fields (device, folds, batch_size, chunk_size, tta, ...).
    home : str, optional
        Platform home; default ``$PS3D_HOME``, else ``./ps3d-data``.
    force : bool
        Ingest even when the ledger says this content was ingested with this model, or when
        another scan directory owns the sample id.
    quarantine_failed : bool
        Move a failing scan to the quarantine (default).

    Returns
    -------
    dict
        ``status`` (ingested, skipped or superseded), sample_id, run_id, fingerprint and the summary.
    """
    # the flow's body is long because each step's failure needs what the earlier ones left (the
    # work directory, the recorded run, the submitted tasks): one try block keeps that in one place
    logger = get_run_logger()
    started_at, t0 = _now(), time.perf_counter()
    home_path = catalog.resolve_home(home)
    scan = Path(scan_path).absolute()
    run_id = new_run_id()
    timings: dict[str, float] = {}
    stage = "validate"
    sample_id: str | None = None
    work: Path | None = None
    futures: list = []  # submitted tasks: a failure waits for them before removing the work directory
    run_recorded = False
    content = fingerprint
    model: dict[str, Any] = {}
    parameters = {"flow": "ingest-scan", "scan": str(scan), "force": force, "segment_options": segment_options or {}}
    try:
        if not (scan / SCAN_JSON).exists() and not scan.is_dir():
            raise ScanError(scan, "does not exist (moved or deleted before it was ingested)")
        content = source_fingerprint(scan) or scan_fingerprint(scan)
        if fingerprint and fingerprint != content:
            logger.info("scan %s changed since it was submitted (fingerprint %s, now %s)", scan, fingerprint, content)
        t = time.perf_counter()
        info = validate_scan(str(scan))
        sample_id = info["sample_id"]
        model = describe_model(resolve_model(home_path, model_dir))
        timings["validate"] = time.perf_counter() - t
        archived = _is_archive(scan, home_path)  # resegmenting the archive: nothing to convert, no claim
        stage = "claim"
        if not force and not archived:
            check_claim(home_path, scan, sample_id)
        stage = "ledger"
        done = already_ingested(home_path, sample_id, content, model["version"])
        if done is not None and not force:
            logger.info("%s: already ingested with this content and model %s %s (run %s); nothing to do",
                        sample_id, model["name"], model["version"], done.get("last_run_id"))  # fmt: skip
            return {"status": "skipped", "sample_id": sample_id, "fingerprint": content,
                    "run_id": done.get("last_run_id"), "model_version": model["version"]}  # fmt: skip

        stage = "record"
        parameters |= {"model": model, "fingerprint": content, "process": process_record()}
        catalog.record_run(home_path, {
            "run_id": run_id, "sample_id": sample_id, "status": "running", "started_at": started_at,
            "parameters": parameters, "versions": {"ps3d": __version__}, "host": socket.gethostname(),
        })  # fmt: skip
        run_recorded = True
        for interrupted in interrupt_dead_runs(home_path, sample_id, run_id):
            logger.warning("%s: run %s was left running by a process that died; marked interrupted",
                           sample_id, interrupted)  # fmt: skip
        work = home_path / WORK_DIR / f"{sample_id}-{content[:12]}"
        work.mkdir(parents=True, exist_ok=True)
        params = DEFAULT_SEGMENT_OPTIONS | dict(segment_options or {}) | {"model_dir": model["path"]}
        address = os.environ.get(SCHEDULER_ADDRESS_ENV) or None

        stage = "segment"
        t = time.perf_counter()
        archive = work / "scan"
        archive.mkdir(exist_ok=True)
        shutil.copyfile(scan / SCAN_JSON, archive / SCAN_JSON)
        (archive / SOURCE_JSON).write_text(json.dumps({"fingerprint": content, "path": str(scan)}) + "\n")
        converted = None if archived else convert_scan.submit(str(scan), str(archive / ARCHIVED_IMAGE))
        segmented = segment_scan.submit(str(scan), str(work / "segment"), params, address)
        futures += [f for f in (converted, segmented) if f is not None]
        segment = segmented.result()
        timings["segment"] = time.perf_counter() - t
        logger.info("%s: %d particles segmented in %.1f s", sample_id, segment["particle_count"], timings["segment"])

        stage = "features"
        t = time.perf_counter()
        features = measure_particles.submit(segment["labels"], str(scan), run_id, str(work / "particles.parquet"))
        futures.append(features)
        measured = features.result()
        timings["features"] = time.perf_counter() - t
        stage = "convert"
        if converted is not None:
            converted.result()
        timings["convert_and_segment"] = time.perf_counter() - t0

        if (source_fingerprint(scan) or scan_fingerprint(scan)) != content:
            stage = "superseded"
            raise _Superseded(f"{scan} changed while it was being ingested; its new content is ingested by another run")

        stage = "store"
        t = time.perf_counter()
        summary = sample_summary(measured["particles"])
        timings["total"] = time.perf_counter() - t0
        run = {
            "run_id": run_id, "sample_id": sample_id, "status": "succeeded", "started_at": started_at,
            "finished_at": _now(), "parameters": parameters,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "versions": {"ps3d": __version__, "pipeline": str(segment.get("model", {}).get("version", ""))},
            "peak_memory_mb": (segment["peak_rss_bytes"] or 0) / 2**20 if segment.get("peak_rss_bytes") else None,
            "host": socket.gethostname(),
        }  # fmt: skip
        stored = store_particles(home_path.as_posix(), str(scan), measured["particles"], run, segment, model, content)
        timings["store"] = time.perf_counter() - t
        if not archived:
            replace_directory(archive, home_path / SCANS_DIR / sample_id)
        replace_directory(work / "segment", home_path / SEGMENTATIONS_DIR / sample_id)
        shutil.rmtree(work, ignore_errors=True)
        create_markdown_artifact(
            key=artifact_key(sample_id),
            markdown=summary_markdown(sample_id, summary, model, content, timings, str(scan)),
            description=f"{sample_id}: {summary['particles']} particles",
        )
        logger.info("%s: stored %d particles in %.1f s from start", sample_id, stored["particle_count"],
                    time.perf_counter() - t0)  # fmt: skip
        return {"status": "ingested", "sample_id": sample_id, "run_id": run_id, "fingerprint": content,
                "model_version": model["version"], "summary": summary, "timings": timings,
                "particles_file": stored["path"]}  # fmt: skip
    except _Superseded as error:
        _record_failure(home_path, run_id, sample_id, started_at, parameters, timings, str(error), run_recorded,
                        status="superseded")  # fmt: skip
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        logger.warning("%s", error)
        return {"status": "superseded", "sample_id": sample_id, "run_id": run_id, "fingerprint": content}
    except Exception as error:
        reason = str(error) if isinstance(error, ScanError) else f"{type(error).__name__}: {error}"
        full = disk_full(error)
        written = (written_file(error) or home_path) if full else None
        if written is not None and str(written) not in reason:  # a failed write() names no file
            reason += f" (writing under {written})"
        logger.error("%s failed at %s: %s", scan, stage, reason)
        sample_id = sample_id or _raw_sample_id(scan)
        if work is not None:
            _drain(futures, logger)
            shutil.rmtree(work, ignore_errors=True)
        _record_failure(home_path, run_id, sample_id, started_at, parameters, timings, f"{stage}: {reason}", True)
        lock_problem = isinstance(error, catalog.CatalogLockTimeout)
        entry = None
        if quarantine_failed and not lock_problem and not _is_archive(scan, home_path) and scan.exists():
            entry = _quarantine(scan, home_path, error, stage, written, {
                "sample_id": sample_id, "fingerprint": content, "run_id": run_id})  # fmt: skip
        # the samples row describes the stored version: a losing claim is another directory's sample, and a
        # full disk or a locked catalog says nothing about the scan
        if sample_id is not None and stage != "claim" and not lock_problem and not full:
            try:
                catalog.mark_sample(home_path, sample_id, "quarantined" if entry else "failed", f"{stage}: {reason}")
            except Exception as mark_error:  # noqa: BLE001 - the original error is what matters
                logger.error("could not mark %s in the catalog: %s", sample_id, mark_error)
        create_markdown_artifact(
            key=artifact_key(sample_id or scan.name),
            markdown=f"# Scan `{scan.name}` failed at {stage}\n\n{reason}\n\n"
            + (f"Moved to `{entry}` (see its `error.json`)." if entry else "Left in place."),
            description=f"{scan.name}: failed at {stage}",
        )
        raise


class _Superseded(Exception):
    """The scan changed while it was ingested."""


def _quarantine(scan: Path, home: Path, error: Exception, stage: str, file: Path | None,
                details: dict[str, Any]) -> Path | None:  # fmt: skip
    """Move the failed scan to the quarantine; None when that failed too (the scan then stays where it was)."""
    logger = get_run_logger()
    try:
        entry = quarantine(scan, home, error, stage=stage, file=file, details=details)
    except OSError as problem:  # a full disk cannot take error.json: quarantine() put the scan back
        logger.error("could not quarantine %s (%s); it stays in %s", scan.name, problem, scan.parent)
        return None
    logger.error("%s moved to %s (see its error.json)", scan.name, entry)
    return entry


def _record_failure(home: Path, run_id: str, sample_id: str | None, started_at: datetime, parameters: dict,
                    timings: dict, error: str, write: bool, status: str = "failed") -> None:  # fmt: skip
    if not write:
        return
    try:
        catalog.record_run(home, {
            "run_id": run_id, "sample_id": sample_id, "status": status, "started_at": started_at,
            "finished_at": _now(), "parameters": parameters, "timings": {k: round(v, 3) for k, v in timings.items()},
            "versions": {"ps3d": __version__}, "host": socket.gethostname(), "error": error[:10_000],
        })  # fmt: skip
    except Exception:  # noqa: BLE001 - never hide the original failure
        get_run_logger().exception("could not record the failed run %s", run_id)
