"""The particle database: a DuckDB catalog beside per-sample Parquet files.

Layout of a platform home (``$PS3D_HOME``, default ``./ps3d-data``)::

    ps3d.duckdb                         the catalog: tables samples, runs, schema_version
    snapshot/ps3d.duckdb                the copy readers open (published after every write)
    ps3d.lock                           the writers' lock file
    particles/sample_id=<id>/part-<write_id>.parquet   one file per sample (schemas.particles)
    .staging/                           writes in progress; cleaned by the next writer

This module is the contract: the schema version, the migrations that build
the tables (applied in order, in one transaction, when a writer opens the
catalog), the SQL of the views, and the documentation of every table, view
and column (:func:`markdown` renders it for the README). ``ps3d_core.catalog``
does the storing and querying.

Units: mm, mm³, g; timestamps are UTC without a time zone (``TIMESTAMP``);
percentages are 0-100, fractions 0-1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from schemas.particles import BASE_COLUMNS, particle_schema

#: Version of the catalog's tables; :data:`MIGRATIONS` holds one entry per version.
SCHEMA_VERSION = 2

CATALOG_FILE = "ps3d.duckdb"
SNAPSHOT_DIR = "snapshot"
LOCK_FILE = "ps3d.lock"
PARTICLES_DIR = "particles"
STAGING_DIR = ".staging"
#: Glob of the particle files under particles/. Each store writes a new file
#: name (its write id): a path never changes content. DuckDB may open a file
#: twice in one query (schema at bind, data at execution); when a swap put
#: other content at the same path in between, it read rows of one version with
#: the footer of the other. Measured: with a fixed part-0.parquet, 55 of 362
#: queries racing a tight swap loop returned inconsistent rows without error.
PARTICLES_GLOB = "sample_id=*/part-*.parquet"


def particles_file_name(write_id: str) -> str:
    """``part-<write_id>.parquet``: the file name of one stored version of a sample."""
    return f"part-{write_id}.parquet"

#: Keys of the particle Parquet files' key-value metadata that hold the phases
#: (as ``ps3d features`` writes them): JSON ``{name: [low, high]}`` and
#: "scan.json" | "auto". The stored files also carry ``ps3d.sample_id``,
#: ``ps3d.run_id`` and ``ps3d.write_id``.
PHASES_METADATA_KEY = "ps3d.phases"
PHASES_SOURCE_METADATA_KEY = "ps3d.phases_source"

SAMPLE_STATUSES = ("processing", "ingested", "failed", "quarantined")
#: A run is ``superseded`` when its scan changed while it ran (nothing stored; another run ingests the new
#: content) and ``interrupted`` when its process ended without recording an outcome (marked so by the sample's
#: next run).
RUN_STATUSES = ("running", "succeeded", "failed", "superseded", "interrupted")
PHASES_SOURCES = ("scan.json", "auto")
#: Where the particle size used for segmentation came from (``ps3d segment``'s ``particle_size_source``).
PARTICLE_SIZE_SOURCES = ("scan.json", "params", "estimated")
#: Passing percentages reported as D-values (D10, D50, D80 = P80).
D_VALUE_PERCENTS = (10, 50, 80)

SAFE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
PHASE_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"


# --------------------------------------------------------------------------
# documentation of tables and views
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One documented column: SQL type, unit ("" when dimensionless or none) and definition."""

    name: str
    type: str
    unit: str
    description: str


@dataclass(frozen=True)
class Relation:
    """A documented table or view."""

    name: str
    kind: Literal["table", "view"]
    description: str
    columns: tuple[Column, ...]
    notes: tuple[str, ...] = field(default=())


_SAMPLE_COLUMNS = (
    Column("sample_id", "VARCHAR", "", "Sample id from scan.json (primary key); also the Parquet partition name."),
    Column("status", "VARCHAR", "", "Latest processing status: " + ", ".join(SAMPLE_STATUSES) + "."),
    Column("error", "VARCHAR", "", "Why the latest attempt failed or was quarantined; NULL when ingested."),
    Column("stream", "VARCHAR", "", "feed, concentrate, tailings or other (scan.json)."),
    Column("campaign", "VARCHAR", "", "Sampling campaign (scan.json)."),
    Column("material", "VARCHAR", "", "Material or ore type (scan.json)."),
    Column("mass_g", "DOUBLE", "g", "Mass of the scanned sample (scan.json)."),
    Column("acquired_at", "TIMESTAMP", "", "Acquisition time (scan.json); converted to UTC when it had a time zone."),
    Column("spacing_z_mm", "DOUBLE", "mm", "Voxel size along z (slices)."),
    Column("spacing_y_mm", "DOUBLE", "mm", "Voxel size along y (rows)."),
    Column("spacing_x_mm", "DOUBLE", "mm", "Voxel size along x (columns)."),
    Column(
        "phases", "JSON", "grey",
        "Phase grey-value ranges used for the phase_<name>_fraction columns: {name: [low, high)} in the "
        "image's grey values; NULL when the sample has no phases.",
    ),
    Column("phases_source", "VARCHAR", "", "scan.json (given) or auto (found from the histogram); NULL without phases."),
    Column("notes", "VARCHAR", "", "Free text from scan.json."),
    Column("particle_count", "BIGINT", "", "Rows of the sample in the particles view (border-touching ones included)."),
    Column("particle_size_mm", "DOUBLE", "mm", "Mean particle diameter the segmentation was scaled with."),
    Column(
        "particle_size_source", "VARCHAR", "",
        "Where particle_size_mm came from: scan.json (given), params (command-line override) or estimated "
        "(from the image).",
    ),
    Column("model_name", "VARCHAR", "", "Segmentation model (ps3d_model.json name)."),
    Column("model_version", "VARCHAR", "", "Segmentation model version."),
    Column(
        "fingerprint", "VARCHAR", "",
        "Fingerprint of the scan content that was ingested (file paths, sizes, modification times); "
        "a changed scan gets a new fingerprint and is ingested again.",
    ),
    Column("last_run_id", "VARCHAR", "", "Run (runs table) that produced the stored particles."),
    Column(
        "particles_file", "VARCHAR", "",
        "Parquet file holding the sample's rows, relative to the home: particles/sample_id=<id>/"
        "part-<write_id>.parquet. Every store writes a new name, so a path never changes content.",
    ),
    Column("created_at", "TIMESTAMP", "UTC", "When the sample was first recorded."),
    Column("updated_at", "TIMESTAMP", "UTC", "When the row last changed."),
    *(
        Column(
            f"d{p}_volume_mm", "DOUBLE", "mm",
            f"D{p}: ESD below which {p} % of the volume passes (psd view, volume basis, border-touching "
            "particles excluded, log-linear interpolation); computed when the particles are stored.",
        )
        for p in D_VALUE_PERCENTS
    ),
)

_RUN_COLUMNS = (
    Column("run_id", "VARCHAR", "", "Pipeline run id (primary key); the particles' run_id column refers to it."),
    Column("sample_id", "VARCHAR", "", "Sample the run processed (NULL when it failed before reading scan.json)."),
    Column(
        "status", "VARCHAR", "",
        "running, succeeded, failed, superseded (the scan changed while it ran: nothing stored, the new content "
        "is ingested by another run) or interrupted (its process ended without recording an outcome: killed, or "
        "unable to write its failure; set by the sample's next run).",
    ),
    Column("started_at", "TIMESTAMP", "UTC", "Start of the run."),
    Column("finished_at", "TIMESTAMP", "UTC", "End of the run; NULL while running."),
    Column("parameters", "JSON", "", "Parameters of the run (segmentation, features), as given to the pipeline."),
    Column("timings", "JSON", "s", "Seconds per stage: {stage: seconds}."),
    Column("versions", "JSON", "", "Software versions: {package: version}."),
    Column("peak_memory_mb", "DOUBLE", "MB", "Peak resident memory of the run's processes (10^6 bytes)."),
    Column("host", "VARCHAR", "", "Machine that ran it."),
    Column("error", "VARCHAR", "", "Error message of a failed run."),
)

_SCHEMA_VERSION_COLUMNS = (
    Column("version", "INTEGER", "", "Catalog schema version reached by a migration (primary key)."),
    Column("description", "VARCHAR", "", "What the migration changed."),
    Column("applied_at", "TIMESTAMP", "UTC", "When the migration ran."),
)

TABLES: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation("samples", "table", "One row per sample: scan.json metadata, processing status and provenance.",
                 _SAMPLE_COLUMNS),
        Relation("runs", "table", "One row per pipeline run (ingestion attempt) with parameters, timings and versions.",
                 _RUN_COLUMNS),
        Relation("schema_version", "table", "Migrations applied to the catalog; the current version is max(version).",
                 _SCHEMA_VERSION_COLUMNS),
    )
}

_PHASE_NOTE = (
    "Phase columns phase_<name>_fraction come from the samples' phase sets, combined by name: a sample "
    "without a phase has NULL there."
)
_BORDER_NOTE = (
    "Particles with touches_border = true are excluded: they are cut by the field of view, so their size "
    "is not the particle's size."
)

VIEWS: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation(
            "particles", "view",
            "Every stored particle: the Parquet files particles/sample_id=*/part-*.parquet read with hive "
            "partitioning and union_by_name. Columns: see the particle table (schemas/particles.py).",
            (Column("phase_<name>_fraction", "DOUBLE", "", "Volume fraction of the particle's voxels in the phase."),),
            (_PHASE_NOTE,),
        ),
        Relation(
            "psd", "view",
            "Particle size distribution: one row per sample and distinct ESD, ordered by sample_id, esd_mm, "
            "with the cumulative percentage passing (size <= esd_mm) by number and by volume.",
            (
                Column("sample_id", "VARCHAR", "", "Sample."),
                Column("esd_mm", "DOUBLE", "mm", "Equivalent sphere diameter (size measure of the curve)."),
                Column("particle_count", "BIGINT", "", "Particles of exactly this ESD."),
                Column("volume_mm3", "DOUBLE", "mm3", "Their summed volume."),
                Column("passing_number_pct", "DOUBLE", "%", "Share of the sample's particles with ESD <= esd_mm."),
                Column("passing_volume_pct", "DOUBLE", "%", "Share of the sample's particle volume with ESD <= esd_mm."),
            ),
            (_BORDER_NOTE,),
        ),
        Relation(
            "d_values", "view",
            "D10, D50 and D80 (P80) per sample, by volume and by number, interpolated log-linearly on the "
            "psd curve: D_p = exp(ln d0 + (p - P0) / (P1 - P0) * (ln d1 - ln d0)) between the last point "
            "below p and the first point at or above it (the smallest ESD when the first point is already "
            "above p). Computed in two passes (fine log-size bins find the crossing, then only that bin's "
            "particles are sorted), which gives the psd curve's values at a third of the cost of sorting all.",
            (
                Column("sample_id", "VARCHAR", "", "Sample."),
                *(Column(f"d{p}_volume_mm", "DOUBLE", "mm", f"ESD at {p} % passing by volume.") for p in D_VALUE_PERCENTS),
                *(Column(f"d{p}_number_mm", "DOUBLE", "mm", f"ESD at {p} % passing by number.") for p in D_VALUE_PERCENTS),
            ),
            (_BORDER_NOTE,),
        ),
        Relation(
            "size_classes", "view",
            "Particles per size class of the sqrt(2) series (class k holds 2^(k/2) <= ESD < 2^((k+1)/2) mm, "
            "k = floor(2 log2 ESD), so 1 mm is a class boundary) with counts, volume and phase grades.",
            (
                Column("sample_id", "VARCHAR", "", "Sample."),
                Column("size_class", "INTEGER", "", "k = floor(2 log2(esd_mm))."),
                Column("lower_mm", "DOUBLE", "mm", "Lower class boundary 2^(k/2) (inclusive)."),
                Column("upper_mm", "DOUBLE", "mm", "Upper class boundary 2^((k+1)/2) (exclusive)."),
                Column("particle_count", "BIGINT", "", "Particles in the class."),
                Column("volume_mm3", "DOUBLE", "mm3", "Their summed volume."),
                Column("number_pct", "DOUBLE", "%", "Share of the sample's particles."),
                Column("volume_pct", "DOUBLE", "%", "Share of the sample's particle volume."),
                Column(
                    "phase_<name>_fraction", "DOUBLE", "",
                    "Grade of the class: volume of the phase / volume of the class's particles "
                    "(sum(fraction x volume) / sum(volume)).",
                ),
            ),
            (_BORDER_NOTE, _PHASE_NOTE),
        ),
    )
}


def markdown(relations: Iterable[Relation] | None = None) -> str:
    """The tables and views as Markdown (one heading and one column table each), for the README."""
    relations = list(relations) if relations is not None else [*TABLES.values(), *VIEWS.values()]
    parts = []
    for relation in relations:
        lines = [f"#### `{relation.name}` ({relation.kind})", "", relation.description, ""]
        lines += [f"- {note}" for note in relation.notes]
        if relation.notes:
            lines.append("")
        lines += ["| column | type | unit | definition |", "|---|---|---|---|"]
        for column in relation.columns:
            description = column.description.replace("|", "\\|")
            lines.append(f"| `{column.name}` | {column.type} | {column.unit} | {description} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------
# migrations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """The step from ``version - 1`` to ``version``.

    ``statements`` run in order; ``backfill(connection, home)`` then fills new
    columns from existing data (it may read the home's Parquet files). The
    catalog applies every pending migration in one transaction when a writer
    opens it, and records each in ``schema_version``: a failure leaves the
    catalog at its old version. Never edit a released migration; add one.
    """

    version: int
    description: str
    statements: tuple[str, ...]
    backfill: Callable[[Any, Any], None] | None = None


_V1 = Migration(
    1,
    "samples, runs and schema_version tables",
    (
        """CREATE TABLE schema_version (
            version INTEGER PRIMARY KEY,
            description VARCHAR,
            applied_at TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE samples (
            sample_id VARCHAR PRIMARY KEY,
            status VARCHAR NOT NULL,
            error VARCHAR,
            stream VARCHAR,
            campaign VARCHAR,
            material VARCHAR,
            mass_g DOUBLE,
            acquired_at TIMESTAMP,
            spacing_z_mm DOUBLE,
            spacing_y_mm DOUBLE,
            spacing_x_mm DOUBLE,
            phases JSON,
            phases_source VARCHAR,
            notes VARCHAR,
            particle_count BIGINT,
            particle_size_mm DOUBLE,
            particle_size_source VARCHAR,
            model_name VARCHAR,
            model_version VARCHAR,
            fingerprint VARCHAR,
            last_run_id VARCHAR,
            particles_file VARCHAR,
            created_at TIMESTAMP NOT NULL,
            updated_at TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            sample_id VARCHAR,
            status VARCHAR NOT NULL,
            started_at TIMESTAMP,
            finished_at TIMESTAMP,
            parameters JSON,
            timings JSON,
            versions JSON,
            peak_memory_mb DOUBLE,
            host VARCHAR,
            error VARCHAR
        )""",
    ),
)


def _backfill_d_values(connection: Any, home: Any) -> None:
    """Compute the new D-value columns of every stored sample from its Parquet file."""
    from pathlib import Path

    particles_dir = Path(home) / PARTICLES_DIR
    if not any(particles_dir.glob(PARTICLES_GLOB)):
        return
    for sql in view_statements(particles_dir, phases=(), temporary=True, names=("particles", "d_values")):
        connection.execute(sql)
    columns = [f"d{p}_volume_mm" for p in D_VALUE_PERCENTS]
    connection.execute(
        f"UPDATE samples SET {', '.join(f'{c} = d.{c}' for c in columns)} "
        "FROM d_values AS d WHERE samples.sample_id = d.sample_id"
    )
    for name in ("d_values", "particles"):
        connection.execute(f"DROP VIEW temp.{name}")


_V2 = Migration(
    2,
    "samples: D10/D50/D80 by volume, stored so cross-sample D-value queries need not read every particle",
    tuple(f"ALTER TABLE samples ADD COLUMN d{p}_volume_mm DOUBLE" for p in D_VALUE_PERCENTS),
    _backfill_d_values,
)

#: Version -> migration reaching it, applied in ascending order.
MIGRATIONS: dict[int, Migration] = {m.version: m for m in (_V1, _V2)}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def comment_statements() -> list[str]:
    """``COMMENT ON`` statements carrying the documentation into the catalog (``duckdb_columns().comment``)."""

    def quote(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    statements = []
    for table in TABLES.values():
        statements.append(f"COMMENT ON TABLE {table.name} IS {quote(table.description)}")
        for column in table.columns:
            unit = f" [{column.unit}]" if column.unit else ""
            statements.append(f"COMMENT ON COLUMN {table.name}.{column.name} IS {quote(column.description + unit)}")
    return statements


# --------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------

_ARROW_TO_SQL = {"string": "VARCHAR", "uint32": "UINTEGER", "int64": "BIGINT", "int32": "INTEGER",
                 "double": "DOUBLE", "bool": "BOOLEAN"}  # fmt: skip


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def particles_view_sql(particles_dir: Any | None, *, temporary: bool = True) -> str:
    """The ``particles`` view over ``<particles_dir>/sample_id=*/part-*.parquet``.

    ``particles_dir`` must be absolute (DuckDB resolves relative paths against
    the working directory, not the database file). ``None``, for a home with
    no sample stored yet, gives an empty view with the base columns.
    """
    create = "CREATE OR REPLACE TEMP VIEW" if temporary else "CREATE OR REPLACE VIEW"
    if particles_dir is None:
        schema = particle_schema()
        columns = ", ".join(f"CAST(NULL AS {_ARROW_TO_SQL[str(f.type)]}) AS {f.name}" for f in schema)
        return f"{create} particles AS SELECT {columns} WHERE false"
    pattern = f"{particles_dir}/{PARTICLES_GLOB}"
    return (
        f"{create} particles AS SELECT * FROM read_parquet({_sql_string(pattern)}, hive_partitioning = true, "
        "union_by_name = true, hive_types = {'sample_id': VARCHAR})"
    )


#: Particles that enter size statistics.
_SIZED = "touches_border IS NOT TRUE AND esd_mm > 0 AND volume_mm3 IS NOT NULL"


_SIZES_CTE = f"""sizes AS (
    SELECT sample_id, esd_mm, count(*) AS particle_count, sum(volume_mm3) AS volume_mm3
    FROM particles
    WHERE {_SIZED}
    GROUP BY sample_id, esd_mm
)"""

_CURVE_WINDOWS = """upto AS (PARTITION BY sample_id ORDER BY esd_mm ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
       whole AS (PARTITION BY sample_id)"""


def psd_view_sql(*, temporary: bool = True) -> str:
    create = "CREATE OR REPLACE TEMP VIEW" if temporary else "CREATE OR REPLACE VIEW"
    return f"""{create} psd AS
WITH {_SIZES_CTE}
SELECT sample_id, esd_mm, particle_count, volume_mm3,
    100.0 * CAST(sum(particle_count) OVER upto AS DOUBLE) / CAST(sum(particle_count) OVER whole AS DOUBLE)
        AS passing_number_pct,
    100.0 * sum(volume_mm3) OVER upto / sum(volume_mm3) OVER whole AS passing_volume_pct
FROM sizes
WINDOW {_CURVE_WINDOWS}
ORDER BY sample_id, esd_mm"""


#: Bins per unit of ln(ESD) used by d_values to find the crossing (1/256: 0.4 % in size).
D_VALUE_BINS_PER_LN = 256


def d_values_view_sql(*, temporary: bool = True) -> str:
    """D-values exactly as on the psd curve, computed in two passes instead of one big sort.

    Sorting every particle (what the psd view does) costs about 3.5 CPU seconds
    for 10^7 particles; this costs about 1 (BENCHMARKS.md). Pass 1 sums the
    particles into fine log-size bins and finds, per sample, basis and p, the
    first bin whose cumulative share reaches p. Pass 2 sorts only that bin's
    particles, continues the cumulative sum from the bins below, and takes the
    first point at or above p; its previous point is the previous size in the
    bin, or the largest size of the bins below. Equal to the psd view's values
    up to the order of floating-point summation (tests: 1e-12 relative).
    """
    create = "CREATE OR REPLACE TEMP VIEW" if temporary else "CREATE OR REPLACE VIEW"
    targets = ", ".join(f"('{basis}', {p})" for basis in ("volume", "number") for p in D_VALUE_PERCENTS)
    columns = ",\n    ".join(
        f"max(d) FILTER (WHERE basis = '{basis}' AND p = {p}) AS d{p}_{basis}_mm"
        for basis in ("volume", "number")
        for p in D_VALUE_PERCENTS
    )

    def by_basis(volume: str, number: str) -> str:
        return f"CASE t.basis WHEN 'volume' THEN {volume} ELSE {number} END"

    return f"""{create} d_values AS
WITH sized AS (
    SELECT sample_id, esd_mm, volume_mm3, CAST(floor(ln(esd_mm) * {D_VALUE_BINS_PER_LN}) AS INTEGER) AS bin
    FROM particles
    WHERE {_SIZED}
),
bins AS (
    SELECT sample_id, bin, sum(volume_mm3) AS volume, CAST(count(*) AS DOUBLE) AS number, max(esd_mm) AS top
    FROM sized
    GROUP BY sample_id, bin
),
bin_curve AS (
    SELECT sample_id, bin, lag(top) OVER upto AS top_below,
        sum(volume) OVER upto AS volume_upto, sum(volume) OVER upto - volume AS volume_below,
        sum(volume) OVER whole AS volume_total,
        sum(number) OVER upto AS number_upto, sum(number) OVER upto - number AS number_below,
        sum(number) OVER whole AS number_total
    FROM bins
    WINDOW upto AS (PARTITION BY sample_id ORDER BY bin ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
           whole AS (PARTITION BY sample_id)
),
targets AS (
    SELECT c.sample_id, t.basis, t.p,
        arg_min(struct_pack(bin := c.bin, top_below := c.top_below,
                            below := {by_basis("c.volume_below", "c.number_below")},
                            total := {by_basis("c.volume_total", "c.number_total")}), c.bin)
            FILTER (WHERE 100.0 * {by_basis("c.volume_upto", "c.number_upto")}
                          / {by_basis("c.volume_total", "c.number_total")} >= t.p) AS hit
    FROM bin_curve AS c, (VALUES {targets}) AS t(basis, p)
    GROUP BY c.sample_id, t.basis, t.p
),
inside AS (
    SELECT t.sample_id, t.basis, t.p, t.hit, s.esd_mm, sum({by_basis("s.volume_mm3", "1.0")}) AS weight
    FROM sized AS s JOIN targets AS t ON s.sample_id = t.sample_id AND s.bin = t.hit.bin
    GROUP BY t.sample_id, t.basis, t.p, t.hit, s.esd_mm
),
points AS (
    SELECT sample_id, basis, p, esd_mm AS d,
        coalesce(lag(esd_mm) OVER upto, hit.top_below) AS d0,
        100.0 * (hit.below + sum(weight) OVER upto) / hit.total AS passing,
        100.0 * (hit.below + sum(weight) OVER upto - weight) / hit.total AS passing0
    FROM inside
    WINDOW upto AS (PARTITION BY sample_id, basis, p ORDER BY esd_mm ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
firsts AS (
    -- the first point at or above p (the bin's last point if rounding left the bin's end a hair below p)
    SELECT sample_id, basis, p,
        coalesce(arg_min(struct_pack(d := d, d0 := d0, pc := passing, p0 := passing0), d) FILTER (WHERE passing >= p),
                 arg_max(struct_pack(d := d, d0 := d0, pc := passing, p0 := passing0), d)) AS x
    FROM points
    GROUP BY sample_id, basis, p
),
interpolated AS (
    SELECT sample_id, basis, p,
        CASE WHEN x.d0 IS NULL THEN x.d
             ELSE exp(ln(x.d0) + (p - x.p0) / (x.pc - x.p0) * (ln(x.d) - ln(x.d0))) END AS d
    FROM firsts
)
SELECT sample_id,
    {columns}
FROM interpolated
GROUP BY sample_id
ORDER BY sample_id"""


def size_classes_view_sql(phases: Sequence[str], *, temporary: bool = True) -> str:
    """The ``size_classes`` view with one grade column per phase name in ``phases``."""
    create = "CREATE OR REPLACE TEMP VIEW" if temporary else "CREATE OR REPLACE VIEW"
    for name in phases:
        if not re.fullmatch(PHASE_NAME_PATTERN, name):
            raise ValueError(f"phase name {name!r} must match {PHASE_NAME_PATTERN}")
    columns = [f"phase_{name}_fraction" for name in phases]
    selected = "".join(f", {c}" for c in columns)
    grades = "".join(
        f",\n    sum({c} * volume_mm3) / sum(CASE WHEN {c} IS NOT NULL THEN volume_mm3 END) AS {c}" for c in columns
    )
    return f"""{create} size_classes AS
WITH classed AS (
    SELECT sample_id, CAST(floor(2 * log2(esd_mm)) AS INTEGER) AS size_class, volume_mm3{selected}
    FROM particles
    WHERE {_SIZED}
)
SELECT sample_id, size_class,
    pow(2, size_class / 2.0) AS lower_mm,
    pow(2, (size_class + 1) / 2.0) AS upper_mm,
    count(*) AS particle_count,
    sum(volume_mm3) AS volume_mm3,
    100.0 * count(*) / sum(count(*)) OVER (PARTITION BY sample_id) AS number_pct,
    100.0 * sum(volume_mm3) / sum(sum(volume_mm3)) OVER (PARTITION BY sample_id) AS volume_pct{grades}
FROM classed
GROUP BY sample_id, size_class
ORDER BY sample_id, size_class"""


def view_statements(
    particles_dir: Any | None,
    phases: Sequence[str],
    *,
    temporary: bool = True,
    names: Sequence[str] = ("particles", "psd", "d_values", "size_classes"),
) -> list[str]:
    """``CREATE VIEW`` statements of the views in dependency order (particles first)."""
    makers = {
        "particles": lambda: particles_view_sql(particles_dir, temporary=temporary),
        "psd": lambda: psd_view_sql(temporary=temporary),
        "d_values": lambda: d_values_view_sql(temporary=temporary),
        "size_classes": lambda: size_classes_view_sql(phases, temporary=temporary),
    }
    return [makers[name]() for name in names]


def phase_names_of(columns: Iterable[str]) -> list[str]:
    """Phase names of ``phase_<name>_fraction`` columns, in their order."""
    names = []
    for column in columns:
        match = re.fullmatch(r"phase_([A-Za-z][A-Za-z0-9_]{0,63})_fraction", column)
        if match and column not in BASE_COLUMNS:
            names.append(match.group(1))
    return names


# --------------------------------------------------------------------------
# run records
# --------------------------------------------------------------------------

SafeId = Annotated[str, StringConstraints(pattern=SAFE_ID_PATTERN)]


class RunRecord(BaseModel):
    """A row of ``runs``: what :func:`ps3d_core.catalog.record_run` and ``store_sample`` accept (as a dict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: SafeId
    sample_id: SafeId | None = None
    status: Literal["running", "succeeded", "failed", "superseded", "interrupted"] = "succeeded"
    started_at: datetime
    finished_at: datetime | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    peak_memory_mb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    host: str | None = Field(default=None, max_length=256)
    error: str | None = None

    @field_validator("timings")
    @classmethod
    def _finite_timings(cls, value: dict[str, float]) -> dict[str, float]:
        for stage, seconds in value.items():
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"timing {stage!r} must be a finite number of seconds >= 0, got {seconds!r}")
        return value
