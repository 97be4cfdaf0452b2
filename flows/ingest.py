"""The ingest flow: scan directory -> validated, converted, segmented, measured, stored sample.

``ingest_scan(scan_path)`` runs, as Prefect tasks that pass paths:

1. **validate** (flow process): ``scan.json`` and one readable image;
2. **ledger**: a sample already stored with the same content fingerprint and
   model version is not ingested again (the flow returns ``skipped``); the
   ledger is the catalog's ``samples`` row (status, fingerprint,
   model_version), read from its snapshot;
3. **convert** and **segment** (Dask, concurrently): the OME-Zarr image and
   the particle labels, written into a work directory
   ``<home>/work/<sample>-<fingerprint>/`` (a re-run of the same content
   resumes the segmentation there);
4. **features** (Dask): the particle Parquet file;
5. **store** (flow process, the only writer of the catalog): the particles
   and the ``samples`` row replace the sample's earlier ones atomically; the
   run is recorded in ``runs``; then the archived scan (a scan directory:
   ``scan.json``, ``image.ome.zarr`` and ``source.json`` with the original's
   fingerprint) and the labels are moved to ``<home>/scans/<sample>/`` and
   ``<home>/segmentations/<sample>/``. The archive is what the ``resegment``
   flow re-ingests: its ledger fingerprint is the original scan's;
6. a Prefect markdown artifact ``ingest-<sample>`` with the sample's summary.

Failure. Any error of steps 1-5 (bad input, a crash of the segmentation)
records the run as failed, marks the sample ``quarantined`` with the reason
(its earlier particles, if any, stay stored and queryable), moves the scan
directory to ``<home>/quarantine/`` with an ``error.json`` and removes the
work directory; the flow run then fails with the reason. Only this flow run
is affected: every scan has its own. A scan that changed while it was being
ingested is not stored (``superseded``): the watcher submits its new content.

Dask. Tasks run on the cluster at ``$DASK_SCHEDULER_ADDRESS`` (``ps3d serve``
starts a persistent local one and exports it), else on a temporary local
cluster per flow run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from deployments.cluster import SCHEDULER_ADDRESS_ENV
from ps3d_core import __version__, catalog
from ps3d_core.errors import ScanError
from ps3d_core.io.atomic import replace_directory
from ps3d_core.inbox import fingerprint as scan_fingerprint
from ps3d_core.inbox import quarantine
from ps3d_core.model_registry import describe_model, resolve_model
from schemas.catalog import SAFE_ID_PATTERN
from schemas.scan import SCAN_JSON
from tasks.ingest import convert_scan, measure_particles, segment_scan, store_particles, validate_scan

WORK_DIR = "work"
SCANS_DIR = "scans"
SEGMENTATIONS_DIR = "segmentations"
#: Written beside the archived scan: the fingerprint and path of the scan it was converted from.
SOURCE_JSON = "source.json"
ARCHIVED_IMAGE = "image.ome.zarr"
#: Segmentation defaults of the flow (``SegmentParams`` fields); a deployment's ``segment_options`` override them.
DEFAULT_SEGMENT_OPTIONS: dict[str, Any] = {"device": "auto"}


def task_runner():
    """DaskTaskRunner on ``$DASK_SCHEDULER_ADDRESS``, else on a temporary local cluster (one thread per worker)."""
    from prefect_dask import DaskTaskRunner

    address = os.environ.get(SCHEDULER_ADDRESS_ENV) or None
    if address is not None:
        return DaskTaskRunner(address=address)
    workers = max(1, min(4, os.cpu_count() or 1))
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None, "host": "127.0.0.1"}
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
    return datetime.now(timezone.utc)


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
        f"| D10 / D50 / D80 by volume | {_fmt(summary['d10_volume_mm'])} / {_fmt(summary['d50_volume_mm'])} / "
        f"{_fmt(summary['d80_volume_mm'])} mm |",
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
        Ingest even when the ledger says this content was ingested with this model.
    quarantine_failed : bool
        Move a failing scan to the quarantine (default).

    Returns
    -------
    dict
        ``status`` (ingested, skipped or superseded), sample_id, run_id, fingerprint and the summary.
    """
    logger = get_run_logger()
    started_at, t0 = _now(), time.perf_counter()
    home_path = catalog.resolve_home(home)
    scan = Path(scan_path).absolute()
    run_id = new_run_id()
    timings: dict[str, float] = {}
    stage = "validate"
    sample_id: str | None = None
    work: Path | None = None
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
        done = already_ingested(home_path, sample_id, content, model["version"])
        if done is not None and not force:
            logger.info("%s: already ingested with this content and model %s %s (run %s); nothing to do",
                        sample_id, model["name"], model["version"], done.get("last_run_id"))  # fmt: skip
            return {"status": "skipped", "sample_id": sample_id, "fingerprint": content,
                    "run_id": done.get("last_run_id"), "model_version": model["version"]}  # fmt: skip

        stage = "record"
        parameters |= {"model": model, "fingerprint": content}
        catalog.record_run(home_path, {
            "run_id": run_id, "sample_id": sample_id, "status": "running", "started_at": started_at,
            "parameters": parameters, "versions": {"ps3d": __version__}, "host": socket.gethostname(),
        })  # fmt: skip
        run_recorded = True
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
        archived = _is_archive(scan, home_path)  # resegmenting the archive: nothing to convert
        converted = None if archived else convert_scan.submit(str(scan), str(archive / ARCHIVED_IMAGE))
        segmented = segment_scan.submit(str(scan), str(work / "segment"), params, address)
        segment = segmented.result()
        timings["segment"] = time.perf_counter() - t
        logger.info("%s: %d particles segmented in %.1f s", sample_id, segment["particle_count"], timings["segment"])

        stage = "features"
        t = time.perf_counter()
        features = measure_particles.submit(segment["labels"], str(scan), run_id, str(work / "particles.parquet"))
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
        _record_failure(home_path, run_id, sample_id, started_at, parameters, timings, str(error), run_recorded)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        logger.warning("%s", error)
        return {"status": "superseded", "sample_id": sample_id, "run_id": run_id, "fingerprint": content}
    except Exception as error:
        reason = str(error) if isinstance(error, ScanError) else f"{type(error).__name__}: {error}"
        logger.error("%s failed at %s: %s", scan, stage, reason)
        sample_id = sample_id or _raw_sample_id(scan)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        _record_failure(home_path, run_id, sample_id, started_at, parameters, timings, f"{stage}: {reason}", True)
        lock_problem = isinstance(error, catalog.CatalogLockTimeout)
        entry = None
        if quarantine_failed and not lock_problem and not _is_archive(scan, home_path) and scan.exists():
            entry = quarantine(scan, home_path, error, stage=stage, details={
                "sample_id": sample_id, "fingerprint": content, "run_id": run_id})  # fmt: skip
            logger.error("%s moved to %s (see its error.json)", scan.name, entry)
        if sample_id is not None and not lock_problem:
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


def _record_failure(home: Path, run_id: str, sample_id: str | None, started_at: datetime, parameters: dict,
                    timings: dict, error: str, write: bool) -> None:  # fmt: skip
    if not write:
        return
    try:
        catalog.record_run(home, {
            "run_id": run_id, "sample_id": sample_id, "status": "failed", "started_at": started_at,
            "finished_at": _now(), "parameters": parameters, "timings": {k: round(v, 3) for k, v in timings.items()},
            "versions": {"ps3d": __version__}, "host": socket.gethostname(), "error": error[:10_000],
        })  # fmt: skip
    except Exception:  # noqa: BLE001 - never hide the original failure
        get_run_logger().exception("could not record the failed run %s", run_id)
