"""Writing the particle database: one writer at a time, atomic per sample, crash-safe.

A write (``store_sample``, ``record_run``, ``mark_sample``):

1. takes the writer lock (``flock`` on ``<home>/ps3d.lock``; waits up to
   ``lock_timeout_s``, then raises :class:`CatalogLockTimeout` naming the holder);
2. opens ``ps3d.duckdb``, applies pending migrations (one transaction) and
   recovers what a crashed writer left in ``.staging/`` (below), then checks
   that the disk has room for the write, its checkpoint and the snapshot copy
   (:func:`require_space`; else :class:`CatalogError` "No space left on
   device" before anything changed: a checkpoint or a snapshot that fails for
   lack of space *after* the commit would report a failure for a write that
   the next writer publishes);
3. ``store_sample`` only: writes the Parquet file
   ``.staging/write-<write_id>/sample_id=<id>/part-<write_id>.parquet``
   (fsynced; a new name for every store, see ``schemas.catalog.PARTICLES_GLOB``
   for why a path must never change content), then an intent file
   beside it, commits the catalog rows, and only then swaps the staged
   directory with ``particles/sample_id=<id>/`` in one
   ``renameat2(RENAME_EXCHANGE)`` (three renames where the system lacks it,
   leaving the path briefly absent), then deletes the previous version;
4. checkpoints and closes the catalog, then publishes a copy to
   ``snapshot/ps3d.duckdb`` (copy + rename), which is what readers open.

Readers never open ``ps3d.duckdb``: DuckDB refuses a read-only connection to a
file another process holds for writing, and a read-only connection in turn
blocks writers. Readers open the snapshot instead; a rename never conflicts
with an open file, and a reader keeps the version it opened.

Crash safety. Until the commit nothing a reader sees has changed, and an
error or a crash leaves only the staging directory, which the next writer
deletes. The new Parquet file and the samples row carry the same
``write_id``: a crash between the commit and the swap leaves an intent file
whose write_id is in the catalog but not yet in ``particles/``, and the next
writer completes the swap (roll forward). Readers see the previous version,
complete, until then: the snapshot is published only after the swap. A crash
after the swap but before the publish shows the new particles with the old
``samples`` row until the next write publishes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from ps3d_core.catalog._common import (
    CatalogError,
    CatalogLockTimeout,
    catalog_path,
    check_sample_id,
    fsync_path,
    lock_path,
    particles_file,
    partition_dir,
    remove_tree,
    resolve_home,
    snapshot_path,
    staging_dir,
    swap_directories,
)
from ps3d_core.io.atomic import write_text_atomic
from schemas.catalog import (
    D_VALUE_PERCENTS,
    MIGRATIONS,
    PARTICLE_SIZE_SOURCES,
    PHASE_NAME_PATTERN,
    PHASES_METADATA_KEY,
    PHASES_SOURCE_METADATA_KEY,
    PHASES_SOURCES,
    SAMPLE_STATUSES,
    SCHEMA_VERSION,
    RunRecord,
    comment_statements,
    particles_file_name,
)
from schemas.particles import particle_schema
from schemas.scan import ScanMetadata, describe_validation_error

DEFAULT_LOCK_TIMEOUT_S = 60.0
#: Free space kept beyond what a write needs (file-system blocks, DuckDB's block rounding).
SPACE_MARGIN_BYTES = 1 << 20
#: Rows per Parquet row group (DuckDB's own row-group size).
ROW_GROUP_ROWS = 122_880
INTENT_FILE = "intent.json"

#: Testing only: called with the name of each step of ``store_sample``
#: ("parquet_partial", "written", "catalog_updated", "swapped", "committed");
#: raising (or exiting the process) there simulates a crash at that point.
fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


def utc_now() -> datetime:
    """Now, as a naive UTC timestamp (the catalog's TIMESTAMP convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


# --------------------------------------------------------------------------
# lock, connection, migrations, recovery, snapshot
# --------------------------------------------------------------------------


@contextmanager
def writer_lock(home: str | os.PathLike[str] | None = None, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the home's writer lock (``flock`` on ``ps3d.lock``), waiting up to ``timeout_s``.

    The lock belongs to this open file: another thread or process calling this
    waits. It is released when the block ends or the process dies.

    Raises
    ------
    CatalogLockTimeout
        The lock stayed taken for ``timeout_s``; the message names its holder.
    """
    home = resolve_home(home)
    home.mkdir(parents=True, exist_ok=True)
    path = lock_path(home)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
                    raise CatalogLockTimeout(
                        path,
                        f"another process is writing to the particle database ({holder}); waited {timeout_s:g} s. "
                        "Try again when it has finished, or give a longer lock timeout",
                    ) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now():%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
        yield home
    finally:
        os.close(fd)


def _connect_catalog(home: Path, deadline: float) -> duckdb.DuckDBPyConnection:
    path = catalog_path(home)
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise CatalogError(path, f"cannot open the catalog: {error}") from None
            if time.monotonic() >= deadline:
                raise CatalogLockTimeout(
                    path,
                    f"another program keeps the catalog open ({error}). Only the platform should open it; "
                    f"tools that read should open {snapshot_path(home)} (read-only) or use `ps3d sql`",
                ) from None
            time.sleep(0.05)


def schema_version_of(connection: duckdb.DuckDBPyConnection) -> int:
    """The catalog's schema version: max(schema_version.version), 0 for an empty database."""
    exists = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    return connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def migrate(connection: duckdb.DuckDBPyConnection, home: Path, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the migrations after the catalog's version up to ``target``, in order, in one transaction.

    Returns the versions applied. A failing migration rolls all of them back.

    Raises
    ------
    CatalogError
        The catalog is newer than this software.
    """
    current = schema_version_of(connection)
    if current > SCHEMA_VERSION:
        raise CatalogError(
            catalog_path(home),
            f"catalog schema version {current} is newer than this software's {SCHEMA_VERSION}: upgrade ps3d",
        )
    pending = list(range(current + 1, target + 1))
    if not pending:
        return []
    connection.execute("BEGIN TRANSACTION")
    try:
        for version in pending:
            migration = MIGRATIONS[version]
            for statement in migration.statements:
                connection.execute(statement)
            if migration.backfill is not None:
                migration.backfill(connection, home)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)", [version, migration.description, utc_now()]
            )
        if target == SCHEMA_VERSION:
            for statement in comment_statements():
                connection.execute(statement)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return pending


def _relative(home: Path, path: Path | None) -> str | None:
    return None if path is None else path.relative_to(home).as_posix()


def _move_into_place(staged: Path, target: Path) -> None:
    """Put the staged partition directory at ``target``; the previous version (if any) ends up at ``staged``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        swap_directories(staged, target)
    else:
        os.rename(staged, target)
    fsync_path(target.parent)


def _recover(home: Path, connection: duckdb.DuckDBPyConnection) -> bool:
    """Finish or undo what a crashed writer left in ``.staging/``; True if anything was there."""
    root = staging_dir(home)
    if not root.is_dir():
        return False
    found = False
    for entry in sorted(root.iterdir()):
        found = True
        intent_file = entry / INTENT_FILE
        if entry.is_dir() and intent_file.is_file():
            intent = json.loads(intent_file.read_text(encoding="utf-8"))
            sample_id = check_sample_id(intent["sample_id"], intent_file)
            target = partition_dir(home, sample_id)
            staged = entry / target.name
            new_file = _relative(home, target / particles_file_name(intent["write_id"]))
            if _relative(home, particles_file(home, sample_id)) != new_file and staged.is_dir():
                row = connection.execute("SELECT particles_file FROM samples WHERE sample_id = ?", [sample_id]).fetchone()
                if row is not None and row[0] == new_file:
                    # committed, not yet in place: finish the swap (the staged file is complete:
                    # the intent is written only after it)
                    _move_into_place(staged, target)
        remove_tree(entry)
    return found


def _publish_snapshot(home: Path) -> None:
    """Copy the (checkpointed, closed) catalog to ``snapshot/ps3d.duckdb`` by copy + rename."""
    source = catalog_path(home)
    wal = source.with_name(source.name + ".wal")
    if wal.exists():
        raise CatalogError(wal, "the catalog was not checkpointed; the snapshot was not published")
    target = snapshot_path(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging_dir(home).mkdir(parents=True, exist_ok=True)
    temporary = staging_dir(home) / f"snapshot-{uuid.uuid4().hex}.duckdb"
    try:
        with open(source, "rb") as reader, open(temporary, "wb") as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def require_space(home: Path) -> None:
    """Raise :class:`CatalogError` unless the home's disk has room to commit, checkpoint and publish the catalog.

    The checkpoint grows the catalog by at most its size and the write-ahead
    log's; the snapshot is a copy of the catalog.
    """
    catalog = catalog_path(home)
    wal = catalog.with_name(catalog.name + ".wal")
    size = sum(path.stat().st_size for path in (catalog, wal) if path.exists())
    need = 2 * size + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(home).free
    if free < need:
        raise CatalogError(home, f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free, a write to the "
                           f"catalog needs about {need / 2**20:.1f} MiB; nothing was written")  # fmt: skip


@contextmanager
def write_session(
    home: str | os.PathLike[str] | None = None, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The catalog opened for writing, under the writer lock, migrated and recovered.

    On a normal exit the catalog is checkpointed, closed and published to the
    readers' snapshot. Keep the block short: other writers wait for it.
    """
    home = resolve_home(home)
    deadline = time.monotonic() + lock_timeout_s
    with writer_lock(home, lock_timeout_s):
        connection = _connect_catalog(home, deadline)
        try:
            if schema_version_of(connection) == 0:
                migrate(connection, home)
            _recover(home, connection)  # before migrating: a backfill must not read an uncommitted swap
            migrate(connection, home)
            require_space(home)
            yield connection
            connection.execute("CHECKPOINT")
        finally:
            connection.close()
        _publish_snapshot(home)


def init_catalog(home: str | os.PathLike[str] | None = None, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Path:
    """Create (or migrate) the catalog and publish its snapshot; returns the home. Idempotent."""
    home = resolve_home(home)
    with write_session(home, lock_timeout_s):
        pass
    return home


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def validate_particle_table(
    table: Any,
    sample_id: str,
    phases: Sequence[str],
    *,
    run_id: str | None = None,
    where: str | os.PathLike[str] = "particle table",
) -> pa.Table:
    """Check a particle table against ``schemas.particles`` and return it in schema order with its metadata.

    Requires every base column with its exact Arrow type, exactly the phase
    columns of ``phases``, no other column, ``sample_id`` equal to
    ``sample_id`` on every row, and unique, non-null ``particle_id``. With
    ``run_id``, the run_id column must hold it on every row or be all null
    (then it is filled in).

    Raises
    ------
    CatalogError
        Naming every problem found.
    """
    if not isinstance(table, pa.Table):
        raise CatalogError(where, f"expected a pyarrow.Table, got {type(table).__name__}")
    expected = particle_schema(phases)
    names = table.column_names
    problems = []
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"duplicate column(s) {', '.join(duplicates)}")
    missing = [name for name in expected.names if name not in names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    extra = [name for name in names if name not in expected.names]
    if extra:
        declared = ", ".join(phases) if phases else "none"
        problems.append(
            f"unexpected column(s) {', '.join(extra)} (phase columns must match the sample's phases: {declared})"
        )
    for field in expected:
        if field.name in names and names.count(field.name) == 1:
            actual = table.schema.field(field.name).type
            if actual != field.type:
                problems.append(f"column {field.name} has type {actual}, expected {field.type}")
    if problems:
        raise CatalogError(where, "; ".join(problems))
    table = table.select(expected.names)
    ids = table.column("sample_id")
    if ids.null_count:
        raise CatalogError(where, f"{ids.null_count} row(s) have no sample_id; expected {sample_id!r} on every row")
    wrong = pc.filter(ids, pc.not_equal(ids, sample_id))
    if len(wrong):
        others = ", ".join(repr(v) for v in pc.unique(wrong).to_pylist()[:5])
        raise CatalogError(where, f"{len(wrong)} row(s) have sample_id {others}, expected {sample_id!r} (the scan's)")
    particle_ids = table.column("particle_id")
    if particle_ids.null_count:
        raise CatalogError(where, f"{particle_ids.null_count} row(s) have no particle_id")
    if pc.count_distinct(particle_ids).as_py() != table.num_rows:
        raise CatalogError(where, "particle_id values are not unique")
    if run_id is not None:
        runs = table.column("run_id")
        if runs.null_count == table.num_rows:
            index = expected.get_field_index("run_id")
            table = table.set_column(index, expected.field("run_id"), pa.array([run_id] * table.num_rows, pa.string()))
        else:
            others = pc.unique(pc.filter(runs, pc.invert(pc.fill_null(pc.equal(runs, run_id), False))))
            if len(others):
                raise CatalogError(
                    where, f"run_id column holds {others.to_pylist()[:5]}, expected {run_id!r} (the run being stored)"
                )
    return table.cast(expected)


def _check_phases(
    phases: Mapping[str, Sequence[float]] | None, source: str | None, metadata: ScanMetadata, where: Path
) -> dict[str, tuple[float, float]]:
    import re

    if not phases:
        return {}
    if source not in PHASES_SOURCES:
        raise CatalogError(where, f"phases_source must be one of {', '.join(PHASES_SOURCES)}, got {source!r}")
    checked = {}
    for name, bounds in phases.items():
        if not isinstance(name, str) or not re.fullmatch(PHASE_NAME_PATTERN, name):
            raise CatalogError(where, f"phase name {name!r} must match {PHASE_NAME_PATTERN}")
        low, high = (float(v) for v in bounds)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise CatalogError(where, f"phase {name!r}: range [{low}, {high}] must be finite with low < high")
        checked[name] = (low, high)
    if source == "scan.json" and checked != {k: tuple(map(float, v)) for k, v in (metadata.phases or {}).items()}:
        raise CatalogError(where, f"phases {checked} are said to come from scan.json, which has {metadata.phases}")
    return checked


def _run_record(run: Mapping[str, Any] | RunRecord, sample_id: str | None, where: Path) -> RunRecord:
    try:
        record = run if isinstance(run, RunRecord) else RunRecord.model_validate(dict(run))
    except ValidationError as error:
        raise CatalogError(where, f"run record: {describe_validation_error(error)}") from None
    if sample_id is not None:
        if record.sample_id is None:
            record = record.model_copy(update={"sample_id": sample_id})
        elif record.sample_id != sample_id:
            raise CatalogError(where, f"run record is for sample {record.sample_id!r}, not {sample_id!r}")
    return record


def read_particles_file(
    path: str | os.PathLike[str],
) -> tuple[pa.Table, dict[str, tuple[float, float]], str | None]:
    """A particle Parquet file (``ps3d features``) with its phases and their source.

    The phases come from the key-value metadata: ``ps3d.phases`` holding
    ``{name: [low, high]}`` with ``ps3d.phases_source`` beside it (what
    ``ps3d features`` and :func:`store_sample` write), or holding
    ``{"phases": {name: [low, high]}, "source": ...}``. Without the key, the
    phases are unknown (empty) and the source None.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise CatalogError(path, f"cannot be read as Parquet: {error}") from None
    metadata = table.schema.metadata or {}
    raw = metadata.get(PHASES_METADATA_KEY.encode())
    if raw is None:
        return table, {}, None
    try:
        document = json.loads(raw)
        source = metadata.get(PHASES_SOURCE_METADATA_KEY.encode(), b"").decode() or None
        if isinstance(document.get("phases"), dict):
            document, source = document["phases"], document.get("source") or source
        phases = {str(name): (float(low), float(high)) for name, (low, high) in document.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise CatalogError(path, f"key-value metadata {PHASES_METADATA_KEY} is not valid: {error}") from None
    return table, phases, source if phases else None


def volume_d_values(table: pa.Table) -> dict[str, float | None]:
    """D10/D50/D80 by volume with the ``d_values`` view's definition (border-touching particles excluded)."""
    esd = table.column("esd_mm").to_numpy(zero_copy_only=False).astype(float)
    volume = table.column("volume_mm3").to_numpy(zero_copy_only=False).astype(float)
    touches = pc.fill_null(table.column("touches_border"), False).to_numpy(zero_copy_only=False)
    keep = ~touches & (esd > 0) & ~np.isnan(volume)
    result: dict[str, float | None] = {f"d{p}_volume_mm": None for p in D_VALUE_PERCENTS}
    if not keep.any():
        return result
    sizes, inverse = np.unique(esd[keep], return_inverse=True)
    cumulative = np.cumsum(np.bincount(inverse, weights=volume[keep]))
    passing = 100.0 * cumulative / cumulative[-1]
    for p in D_VALUE_PERCENTS:
        j = int(np.argmax(passing >= p))
        if passing[j] < p:
            continue
        if j == 0:
            result[f"d{p}_volume_mm"] = float(sizes[0])
        else:
            d0, d1, p0, p1 = sizes[j - 1], sizes[j], passing[j - 1], passing[j]
            result[f"d{p}_volume_mm"] = float(np.exp(np.log(d0) + (p - p0) / (p1 - p0) * (np.log(d1) - np.log(d0))))
    return result


# --------------------------------------------------------------------------
# writes
# --------------------------------------------------------------------------

def _metadata_values(metadata: ScanMetadata) -> dict[str, Any]:
    z, y, x = metadata.spacing_zyx_mm
    return {
        "stream": metadata.stream.value,
        "campaign": metadata.campaign,
        "material": metadata.material,
        "mass_g": metadata.mass_g,
        "acquired_at": _utc(metadata.acquired_at),
        "spacing_z_mm": z,
        "spacing_y_mm": y,
        "spacing_x_mm": x,
        "notes": metadata.notes,
    }


def _upsert(connection: duckdb.DuckDBPyConnection, table: str, key: str, values: Mapping[str, Any], keep: Sequence[str] = ()) -> None:
    """INSERT, or UPDATE the given columns (except ``key`` and ``keep``) of an existing row."""
    columns = list(values)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key and c not in keep)
    connection.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}",
        [values[c] for c in columns],
    )


def _upsert_run(connection: duckdb.DuckDBPyConnection, run: RunRecord) -> None:
    values = run.model_dump()
    for name in ("parameters", "timings", "versions"):
        values[name] = json.dumps(values[name], sort_keys=True, default=str)
    values["started_at"] = _utc(values["started_at"])
    values["finished_at"] = _utc(values["finished_at"])
    _upsert(connection, "runs", "run_id", values)


def _write_parquet(table: pa.Table, path: Path) -> None:
    table = table.combine_chunks()
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for index, batch in enumerate(table.to_batches(max_chunksize=ROW_GROUP_ROWS)):
            writer.write_batch(batch, row_group_size=ROW_GROUP_ROWS)
            if index == 0:
                _fault("parquet_partial")
    fsync_path(path)


def store_sample(
    home: str | os.PathLike[str] | None,
    metadata: ScanMetadata,
    particles: pa.Table,
    run: Mapping[str, Any] | RunRecord,
    *,
    phases: Mapping[str, Sequence[float]] | None = None,
    phases_source: str | None = None,
    particle_size_mm: float | None = None,
    particle_size_source: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    fingerprint: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Store (or replace) one sample's particles and catalog row, atomically.

    Parameters
    ----------
    home : path or None
        Platform home (None: ``$PS3D_HOME``, else ``./ps3d-data``).
    metadata : ScanMetadata
        The scan's ``scan.json``; gives the sample id and the metadata columns.
    particles : pyarrow.Table
        The particle table (``schemas.particles.particle_schema(phases)``); every
        row's sample_id must be the scan's.
    run : dict or RunRecord
        The run that produced it (``schemas.catalog.RunRecord`` fields); upserted
        into ``runs``. The table's run_id column must hold its run_id (or be null).
    phases, phases_source
        Phase grey-value ranges {name: (low, high)} of the table's phase columns
        and where they came from ("scan.json" or "auto"); None without phases.
    particle_size_mm, particle_size_source
        The particle size the segmentation used and its source (scan.json, params, estimated).
    model_name, model_version, fingerprint
        Provenance: segmentation model and scan-content fingerprint.

    Returns
    -------
    dict
        sample_id, run_id, particle_count, path of the Parquet file, bytes, seconds.

    Raises
    ------
    CatalogError
        Invalid input (nothing is written), or the lock timed out.
    """
    started = time.perf_counter()
    home = resolve_home(home)
    if not isinstance(metadata, ScanMetadata):
        raise CatalogError(home, f"metadata must be a ScanMetadata, got {type(metadata).__name__}")
    sample_id = check_sample_id(metadata.sample_id, home)
    target = partition_dir(home, sample_id)
    record = _run_record(run, sample_id, home)
    checked_phases = _check_phases(phases, phases_source, metadata, home)
    if particle_size_source is not None and particle_size_source not in PARTICLE_SIZE_SOURCES:
        raise CatalogError(
            home, f"particle_size_source must be one of {', '.join(PARTICLE_SIZE_SOURCES)}, got {particle_size_source!r}"
        )
    if particle_size_mm is not None and not (math.isfinite(particle_size_mm) and particle_size_mm > 0):
        raise CatalogError(home, f"particle_size_mm must be a positive number, got {particle_size_mm!r}")
    table = validate_particle_table(
        particles, sample_id, list(checked_phases), run_id=record.run_id, where=f"particles of {sample_id}"
    )
    write_id = uuid.uuid4().hex
    table = table.replace_schema_metadata({
        **(table.schema.metadata or {}),
        PHASES_METADATA_KEY.encode(): json.dumps({k: list(v) for k, v in checked_phases.items()}).encode(),
        PHASES_SOURCE_METADATA_KEY.encode(): (phases_source if checked_phases else "").encode(),
        b"ps3d.sample_id": sample_id.encode(),
        b"ps3d.run_id": record.run_id.encode(),
        b"ps3d.write_id": write_id.encode(),
    })  # fmt: skip
    now = utc_now()
    row = {
        "sample_id": sample_id,
        "status": "ingested",
        "error": None,
        **_metadata_values(metadata),
        "phases": json.dumps({k: list(v) for k, v in checked_phases.items()}) if checked_phases else None,
        "phases_source": phases_source if checked_phases else None,
        "particle_count": table.num_rows,
        "particle_size_mm": particle_size_mm,
        "particle_size_source": particle_size_source,
        "model_name": model_name,
        "model_version": model_version,
        "fingerprint": fingerprint,
        "last_run_id": record.run_id,
        "particles_file": _relative(home, target / particles_file_name(write_id)),
        **volume_d_values(table),
        "created_at": now,
        "updated_at": now,
    }
    with write_session(home, lock_timeout_s) as connection:
        staging = staging_dir(home) / f"write-{write_id}"
        staged = staging / target.name
        staged.mkdir(parents=True)
        committed = in_transaction = False
        try:
            _write_parquet(table, staged / particles_file_name(write_id))
            fsync_path(staged)
            _fault("written")
            had_previous = target.is_dir()
            write_text_atomic(
                staging / INTENT_FILE,
                json.dumps({"sample_id": sample_id, "write_id": write_id, "had_previous": had_previous}),
            )
            fsync_path(staging)
            require_space(home)  # again: the Parquet file took its share
            connection.execute("BEGIN TRANSACTION")
            in_transaction = True
            _upsert(connection, "samples", "sample_id", row, keep=("created_at",))
            _upsert_run(connection, record)
            _fault("catalog_updated")
            connection.execute("COMMIT")
            in_transaction, committed = False, True
            _fault("committed")
            _move_into_place(staged, target)
            _fault("swapped")
        except BaseException as error:
            if in_transaction:
                connection.execute("ROLLBACK")
            if not committed:
                remove_tree(staging)
                raise
            # committed but not (or not known to be) in place: the staging directory and its intent
            # stay, and the next writer completes the swap (readers still see the previous version)
            if isinstance(error, OSError):
                raise CatalogError(
                    target, f"the catalog was updated but moving the new file into place failed ({error}); "
                    "the next write to this home completes it",
                ) from error
            raise
        remove_tree(staging)  # the previous version; under the lock, so no recovery reads it meanwhile
    path = target / particles_file_name(write_id)
    return {
        "sample_id": sample_id,
        "run_id": record.run_id,
        "particle_count": table.num_rows,
        "path": str(path),
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 4),
    }


def record_run(
    home: str | os.PathLike[str] | None,
    run: Mapping[str, Any] | RunRecord,
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> str:
    """Insert or update a row of ``runs`` (e.g. a run that started, or one that failed); returns its run_id."""
    home = resolve_home(home)
    record = _run_record(run, None, home)
    if record.sample_id is not None:
        check_sample_id(record.sample_id, home)
    with write_session(home, lock_timeout_s) as connection:
        _upsert_run(connection, record)
    return record.run_id


def interrupt_runs(
    home: str | os.PathLike[str] | None,
    run_ids: Sequence[str],
    reason: str,
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[str]:
    """Mark the given runs ``interrupted`` (their process died) with ``reason``; returns the run ids changed.

    Only rows still ``running`` change: a run that finished meanwhile keeps its status.
    """
    home = resolve_home(home)
    if not run_ids:
        return []
    with write_session(home, lock_timeout_s) as connection:
        changed = connection.execute(
            f"UPDATE runs SET status = 'interrupted', finished_at = ?, error = ? "
            f"WHERE status = 'running' AND run_id IN ({', '.join('?' for _ in run_ids)}) RETURNING run_id",
            [utc_now(), reason, *run_ids],
        ).fetchall()
    return sorted(row[0] for row in changed)


def mark_sample(
    home: str | os.PathLike[str] | None,
    sample_id: str,
    status: str,
    error: str | None = None,
    *,
    metadata: ScanMetadata | None = None,
    fingerprint: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> None:
    """Set a sample's status (processing, failed, quarantined) and error; creates the row if new.

    The particles of an earlier successful store stay in place and queryable;
    ``status`` tells that the latest attempt did not finish. ``metadata`` and
    ``fingerprint``, when given, update those columns too.
    """
    home = resolve_home(home)
    check_sample_id(sample_id, home)
    allowed = [s for s in SAMPLE_STATUSES if s != "ingested"]
    if status not in allowed:
        hint = " (store_sample sets ingested)" if status == "ingested" else ""
        raise CatalogError(home, f"status must be one of {', '.join(allowed)}, got {status!r}{hint}")
    if metadata is not None and metadata.sample_id != sample_id:
        raise CatalogError(home, f"metadata is for sample {metadata.sample_id!r}, not {sample_id!r}")
    now = utc_now()
    values: dict[str, Any] = {"sample_id": sample_id, "status": status, "error": error}
    if metadata is not None:
        values.update(_metadata_values(metadata))
    if fingerprint is not None:
        values["fingerprint"] = fingerprint
    values.update(created_at=now, updated_at=now)
    with write_session(home, lock_timeout_s) as connection:
        _upsert(connection, "samples", "sample_id", values, keep=("created_at",))
