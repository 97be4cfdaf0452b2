"""Prefect tasks of the ingest flow: thin wrappers around ``ps3d_core`` that pass paths, not arrays.

Each task reads files and writes files (zarr, Parquet, JSON) and returns a
small dict of paths and figures, so that results stay tiny whether a task
runs in the flow process or on a Dask worker of another machine (paths must
then be on a shared file system). Tasks are not cached by Prefect: the
ingest ledger (``flows.ingest``) and the segmentation's own resumable work
directory make re-runs cheap and correct, and a cached path could point at
a work directory deleted since.

Database writes are not tasks of the task runner: the flow calls
:func:`store_particles` directly (Prefect runs a task called without
``.submit`` in the flow process), because DuckDB admits one writing process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="validate", **_OPTIONS)
def validate_scan(scan_path: str) -> dict[str, Any]:
    """Open the scan (``scan.json`` + one readable image); its metadata, shape and dtype."""
    from ps3d_core.io import open_scan

    with open_scan(scan_path) as scan:
        return {
            "sample_id": scan.metadata.sample_id,
            "metadata": scan.metadata.model_dump(mode="json", exclude_none=True),
            "image_path": str(scan.volume.path),
            "shape": list(scan.volume.shape),
            "dtype": str(scan.volume.dtype),
            "spacing_zyx_mm": list(scan.spacing_zyx_mm),
        }


@task(name="convert", **_OPTIONS)
def convert_scan(scan_path: str, out: str) -> dict[str, Any]:
    """Stream the scan into an OME-Zarr image pyramid at ``out`` (replaced atomically).

    Without the converter's up-front space check: it compares the
    uncompressed size with the free space (refusing compressed copies that
    would fit) and reports a refusal as a problem of the scan. A disk that
    really fills up raises ``ENOSPC``, which the flow treats as the
    platform's problem; the partial output is removed either way.
    """
    import time

    from ps3d_core.io import convert_to_ome_zarr, open_scan

    started = time.perf_counter()
    with open_scan(scan_path) as scan:
        convert_to_ome_zarr(scan, out, check_disk_space=False)
    return {"image": out, "seconds": time.perf_counter() - started}


def _inside_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


class Abandoned(RuntimeError):
    """The flow run that submitted this task is gone: its result is no longer wanted."""


def _abandonment_check() -> Callable[[str, int, int], None]:
    """A segmentation progress callback that raises :class:`Abandoned` once this Dask task is no longer wanted.

    A Dask worker cannot stop a running task. When the flow run's process
    dies (killed, its machine lost), the scheduler releases the task and the
    worker marks it ``cancelled``, but the task would go on submitting chunk
    tasks and finally clean the work directory up, under the feet of the run
    that resumes it. So the segmentation looks at its own state after every
    chunk and stops.
    """
    from distributed import get_worker
    from distributed.worker import thread_state

    worker, key = get_worker(), thread_state.key

    def check(stage: str, done: int, total: int) -> None:
        state = worker.state.tasks.get(key)
        if state is None or state.state in ("cancelled", "released", "forgotten"):
            raise Abandoned(f"segmentation task {key} was released by its flow run (gone); stopped at {stage}")

    return check


@task(name="segment", **_OPTIONS)
def segment_scan(
    scan_path: str, out_dir: str, params: dict[str, Any], dask_address: str | None = None
) -> dict[str, Any]:
    """Segment the scan into ``out_dir/labels.ome.zarr`` + ``segment.json``; its chunk tasks run on Dask.

    On a Dask worker (the flow's DaskTaskRunner) the chunk tasks go to the
    same cluster through ``worker_client``, which takes this task out of the
    worker's thread pool while it waits, so a one-thread worker cannot
    deadlock; the segmentation stops when its flow run is gone
    (:func:`_abandonment_check`). Elsewhere they go to ``dask_address`` (default
    ``$DASK_SCHEDULER_ADDRESS``, else a temporary local cluster).
    """
    from deployments.cluster import chunk_executors, dask_client
    from ps3d_core.inference import SegmentParams, run_segmentation

    segment_params = SegmentParams.model_validate(params)
    if _inside_dask_worker():
        from distributed import worker_client

        progress = _abandonment_check()  # before worker_client: it needs this task's key
        with worker_client() as client:
            predict_executor, executor = chunk_executors(client)
            record = run_segmentation(scan_path, out_dir, segment_params, predict_executor=predict_executor,
                                      executor=executor, progress=progress)  # fmt: skip
    else:
        with dask_client(dask_address) as client:
            predict_executor, executor = chunk_executors(client)
            record = run_segmentation(scan_path, out_dir, segment_params,
                                      predict_executor=predict_executor, executor=executor)  # fmt: skip
    return {
        "labels": record["labels_path"],
        "segment_json": str(Path(out_dir) / "segment.json"),
        "particle_count": record["particle_count"],
        "particle_size_mm": record["particle_size_mm"],
        "particle_size_source": record["particle_size_source"],
        "model": record["model"],
        "device": record["device"],
        "timings_s": record["timings_s"],
        "peak_rss_bytes": record.get("peak_rss_bytes"),
    }


@task(name="features", **_OPTIONS)
def measure_particles(labels_path: str, scan_path: str, run_id: str, out: str) -> dict[str, Any]:
    """One row per particle into the Parquet file ``out`` (atomic), phases in its metadata."""
    from ps3d_core.features import extract_features_from_files, write_features_parquet

    workers = max(1, min(2, os.cpu_count() or 1))
    result = extract_features_from_files(labels_path, scan_path, run_id, workers=workers, parallel="thread")
    write_features_parquet(result, out)
    return {
        "particles": out,
        "rows": result.table.num_rows,
        "phases": {name: list(bounds) for name, bounds in result.phases.items()},
        "phases_source": result.phases_source,
        "seconds": result.seconds,
    }


@task(name="store", **_OPTIONS)
def store_particles(
    home: str,
    scan_path: str,
    particles_path: str,
    run: dict[str, Any],
    segment: dict[str, Any],
    model: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """Register the sample's particles in the catalog (replaces its earlier rows atomically)."""
    from ps3d_core import catalog
    from schemas.scan import load_scan_metadata

    metadata = load_scan_metadata(Path(scan_path))
    table, phases, phases_source = catalog.read_particles_file(particles_path)
    return catalog.store_sample(
        home, metadata, table, run,
        phases=phases or None, phases_source=phases_source,
        particle_size_mm=segment.get("particle_size_mm"),
        particle_size_source=segment.get("particle_size_source"),
        model_name=model.get("name"), model_version=model.get("version"),
        fingerprint=fingerprint,
    )  # fmt: skip
