"""A fault-free reference database, and the comparison every fault test ends with.

A fault test ingests a scan while something goes wrong (a worker killed, a
process killed, a server restarted, a disk filled up) and must end with the
database a fault-free run gives. :func:`reference_home` builds that run in
this process with the core functions the flow's tasks wrap (segment inline
with one torch thread, as the single-threaded Dask workers do; features;
store), and :func:`assert_same_database` compares two homes on everything
but provenance (run ids, timestamps, archived paths).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from ps3d_core import catalog

#: Columns that name a run, a time or a file: they differ between two correct runs.
PROVENANCE_COLUMNS = frozenset({
    "run_id", "last_run_id", "created_at", "updated_at", "particles_file", "error",
})  # fmt: skip


def reference_home(
    scan_dir: str | Path, model_dir: str | Path, home: str | Path, segment_options: dict[str, Any] | None = None
) -> Path:
    """Ingest ``scan_dir`` fault-free into ``home`` (segment, features, store in this process); returns ``home``."""
    import datetime as dt

    import torch

    from ps3d_core.features import extract_features_from_files, write_features_parquet
    from ps3d_core.inbox import fingerprint
    from ps3d_core.inference import SegmentParams, run_segmentation
    from schemas.scan import load_scan_metadata

    home, scan_dir = Path(home), Path(scan_dir)
    work = home.parent / f".reference-{uuid.uuid4().hex[:8]}"
    options = {"device": "cpu"} | dict(segment_options or {}) | {"model_dir": str(model_dir)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Dask workers' single thread: the same bits
    try:
        segment = run_segmentation(scan_dir, work / "segment", SegmentParams.model_validate(options))
    finally:
        torch.set_num_threads(threads)
    run_id = f"reference-{uuid.uuid4().hex[:8]}"
    result = extract_features_from_files(segment["labels_path"], scan_dir, run_id)
    write_features_parquet(result, work / "particles.parquet")
    table, phases, phases_source = catalog.read_particles_file(work / "particles.parquet")
    now = dt.datetime.now(dt.timezone.utc)
    metadata = load_scan_metadata(scan_dir)
    catalog.store_sample(
        home, metadata, table,
        {"run_id": run_id, "sample_id": metadata.sample_id, "status": "succeeded", "started_at": now,
         "finished_at": now},
        phases=phases or None, phases_source=phases_source,
        particle_size_mm=segment["particle_size_mm"], particle_size_source=segment["particle_size_source"],
        model_name=segment["model"]["name"], model_version=segment["model"]["version"],
        fingerprint=fingerprint(scan_dir),
    )  # fmt: skip
    return home


def _rows(home: Path, sql: str) -> list[dict[str, Any]]:
    table: pa.Table = catalog.query(home, sql, limit=None).table
    keep = [name for name in table.column_names if name not in PROVENANCE_COLUMNS]
    return table.select(keep).to_pylist()


def database_state(home: str | Path, samples: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The samples rows and every particle row of ``home`` (or of ``samples``), provenance left out, in key order."""
    where = ""
    if samples is not None:
        where = "WHERE sample_id IN (" + ", ".join(f"'{s}'" for s in samples) + ")"
    return {
        "samples": _rows(Path(home), f"SELECT * FROM samples {where} ORDER BY sample_id"),
        "particles": _rows(Path(home), f"SELECT * FROM particles {where} ORDER BY sample_id, particle_id"),
    }


def _assert_same_rows(table: str, got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected) > 0, f"{table}: {len(got)} rows, the reference has {len(expected)}"
    for row, want in zip(got, expected):
        assert row.keys() == want.keys(), f"{table} columns differ: {sorted(row.keys() ^ want.keys())}"
        assert row == want, {k: (row[k], want[k]) for k in row if row[k] != want[k]}


def assert_same_database(home: str | Path, reference: str | Path, samples: list[str] | None = None) -> None:
    """``home`` holds what ``reference`` holds: the same samples rows and the same particles, value for value.

    The particles view has a column for every phase of any stored sample, so
    compare homes holding the same samples, or name them in ``samples``.
    """
    got, expected = database_state(home, samples), database_state(reference, samples)
    for table in ("samples", "particles"):
        _assert_same_rows(table, got[table], expected[table])
