"""The DuckDB SQL behind every dashboard chart: aggregated in DuckDB, small results.

Every function takes a read-only connection from
:func:`ps3d_core.catalog.connect_readonly` (views ``particles``, ``psd``,
``d_values``, ``size_classes`` and tables ``samples``, ``runs``) and returns a
pandas DataFrame of at most a few thousand rows, whatever the number of
particles: particles are grouped into bins, classes or samples inside DuckDB.
Samples are selected with a literal ``sample_id IN (...)`` list, which DuckDB
turns into a filter on the Parquet partitions (only the selected samples'
files are read).

Conventions shared by all charts (stated in the dashboard's captions):

- Size statistics exclude particles that touch the volume border or the field
  of view (``touches_border``): they are cut, so their size and shape are not
  the particle's (as the catalog's ``psd``/``d_values``/``size_classes`` views do).
- ``number`` weighting counts particles; ``volume`` weights each particle by
  its volume, which equals mass weighting when all particles have one density.
- Size classes are the catalog's sqrt(2) series: class k holds sizes in
  [2^(k/2), 2^((k+1)/2)) mm.
- Phase grades are volume fractions (``phase_<name>_fraction``).

Analysts can copy any of these queries into the SQL page: they only use the
documented tables and views.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import duckdb
import pandas as pd

from schemas.catalog import PHASE_NAME_PATTERN, SAFE_ID_PATTERN, d_values_view_sql, phase_names_of

#: Size measures the dashboard offers: key -> (column, label).
SIZE_MEASURES: dict[str, tuple[str, str]] = {
    "esd": ("esd_mm", "equivalent sphere diameter (ESD)"),
    "feret_min": ("feret_min_mm", "minimum Feret diameter"),
    "axis_intermediate": ("axis_intermediate_mm", "intermediate axis"),
}

#: Shape measures (all in [0, 1]): key -> (SQL expression, label).
SHAPE_MEASURES: dict[str, tuple[str, str]] = {
    "sphericity": ("sphericity", "sphericity ψ"),
    "elongation": ("elongation", "elongation b/a"),
    "flatness": ("flatness", "flatness c/b"),
    "feret_ratio": ("feret_min_mm / nullif(feret_max_mm, 0)", "Feret ratio min/max"),
}

WEIGHTINGS = ("number", "volume")

#: Particles that enter size and shape statistics (same rule as the catalog's views).
SIZED = "touches_border IS NOT TRUE AND volume_mm3 IS NOT NULL"

#: Zingg class limit on b/a and c/b.
ZINGG_LIMIT = 2.0 / 3.0


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _in_list(sample_ids: Sequence[str]) -> str:
    """``('a', 'b')`` for a sample filter; ids are checked against the catalog's id pattern."""
    ids = list(dict.fromkeys(sample_ids))
    for sample_id in ids:
        if not isinstance(sample_id, str) or not re.fullmatch(SAFE_ID_PATTERN, sample_id):
            raise ValueError(f"not a sample id: {sample_id!r}")
    if not ids:
        return "(NULL)"  # matches nothing
    return "(" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + ")"


def _measure(measure: str) -> str:
    if measure not in SIZE_MEASURES:
        raise ValueError(f"size measure must be one of {', '.join(SIZE_MEASURES)}, got {measure!r}")
    return SIZE_MEASURES[measure][0]


def _weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be number or volume, got {weighting!r}")
    return "1.0" if weighting == "number" else "volume_mm3"


def _phase_column(connection: duckdb.DuckDBPyConnection, phase: str) -> str:
    if not re.fullmatch(PHASE_NAME_PATTERN, phase) or phase not in phases(connection):
        raise ValueError(f"unknown phase {phase!r}")
    return f"phase_{phase}_fraction"


def _df(connection: duckdb.DuckDBPyConnection, sql: str, params: Sequence | None = None) -> pd.DataFrame:
    return connection.execute(sql, params or []).df()


# --------------------------------------------------------------------------
# catalog contents
# --------------------------------------------------------------------------


def particle_columns(connection: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(name, SQL type) of the particles view's columns."""
    return [(r[0], r[1]) for r in connection.execute("SELECT column_name, column_type FROM (DESCRIBE particles)").fetchall()]


def phases(connection: duckdb.DuckDBPyConnection) -> list[str]:
    """Phase names present in any stored sample (``phase_<name>_fraction`` columns)."""
    return phase_names_of([name for name, _ in particle_columns(connection)])


def samples(connection: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every sample with its latest run: metadata, status, counts, size, model, times."""
    return _df(connection, """
        SELECT s.sample_id, s.stream, s.campaign, s.material, s.status, s.particle_count,
            s.particle_size_mm, s.d10_volume_mm, s.d50_volume_mm, s.d80_volume_mm,
            s.model_name, s.model_version, s.mass_g, s.acquired_at, s.updated_at,
            r.started_at AS run_started_at, r.finished_at AS run_finished_at, r.status AS run_status,
            s.error, s.spacing_z_mm, s.spacing_y_mm, s.spacing_x_mm, s.phases, s.last_run_id, s.particles_file
        FROM samples AS s LEFT JOIN runs AS r ON r.run_id = s.last_run_id
        ORDER BY s.campaign NULLS LAST, s.stream, s.sample_id
    """)  # fmt: skip


def quality(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], floor_voxels: int = 1000, merger_iqr: float = 3.0
) -> pd.DataFrame:
    """Quality flags per sample.

    - ``border_pct``: share of particles touching the volume border or field of view;
    - ``below_floor``: particles of fewer than ``floor_voxels`` voxels (below the
      resolution floor: their size and shape are dominated by voxelisation);
    - ``suspected_mergers``: particles not touching the border whose ln(ESD) lies
      above Q3 + ``merger_iqr`` x IQR of the sample's ln(ESD) (Tukey's far-out
      fence on the log size): far larger than the sample's size distribution,
      typically several touching particles segmented as one.
    """
    return _df(connection, f"""
        WITH selected AS (
            SELECT sample_id, voxel_count, esd_mm, touches_border FROM particles WHERE sample_id IN {_in_list(sample_ids)}
        ),
        fences AS (
            SELECT sample_id, quantile_cont(ln(esd_mm), [0.25, 0.75]) AS q
            FROM selected WHERE touches_border IS NOT TRUE AND esd_mm > 0 GROUP BY sample_id
        )
        SELECT s.sample_id,
            count(*) AS particles,
            count(*) FILTER (WHERE s.touches_border) AS border_touching,
            100.0 * count(*) FILTER (WHERE s.touches_border) / count(*) AS border_pct,
            count(*) FILTER (WHERE s.voxel_count < $floor) AS below_floor,
            100.0 * count(*) FILTER (WHERE s.voxel_count < $floor) / count(*) AS below_floor_pct,
            count(*) FILTER (WHERE s.touches_border IS NOT TRUE AND s.esd_mm > 0
                             AND ln(s.esd_mm) > f.q[2] + $k * (f.q[2] - f.q[1])) AS suspected_mergers,
            exp(f.q[2] + $k * (f.q[2] - f.q[1])) AS merger_fence_esd_mm
        FROM selected AS s LEFT JOIN fences AS f USING (sample_id)
        GROUP BY s.sample_id, f.q
        ORDER BY s.sample_id
    """, {"floor": int(floor_voxels), "k": float(merger_iqr)})  # fmt: skip


# --------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------


def psd_curves(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], measure: str = "esd", bins_per_ln: int = 32
) -> pd.DataFrame:
    """Cumulative % passing by number and by volume at fine log-size bin edges.

    Particles are summed into bins of width 1/``bins_per_ln`` in ln(size)
    (32: 3 % in size); each bin gives two points, its lower edge at the share
    below it and its upper edge at the share up to it, so the curve is exact at
    every edge and linear in log size inside a bin. Columns: sample_id, size_mm,
    passing_number_pct, passing_volume_pct, particles (of the sample).
    """
    column = _measure(measure)
    k = int(bins_per_ln)
    return _df(connection, f"""
        WITH bins AS (
            SELECT sample_id, CAST(floor(ln({column}) * {k}) AS INTEGER) AS bin,
                CAST(count(*) AS DOUBLE) AS n, sum(volume_mm3) AS v
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {column} > 0
            GROUP BY ALL
        ),
        cumulative AS (
            SELECT sample_id, bin,
                sum(n) OVER upto AS n_upto, sum(n) OVER upto - n AS n_below, sum(n) OVER whole AS n_total,
                sum(v) OVER upto AS v_upto, sum(v) OVER upto - v AS v_below, sum(v) OVER whole AS v_total
            FROM bins
            WINDOW upto AS (PARTITION BY sample_id ORDER BY bin ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
                   whole AS (PARTITION BY sample_id)
        )
        SELECT sample_id, exp((bin + e.edge) / {k}) AS size_mm,
            100.0 * CASE e.edge WHEN 0 THEN n_below ELSE n_upto END / n_total AS passing_number_pct,
            100.0 * CASE e.edge WHEN 0 THEN v_below ELSE v_upto END / v_total AS passing_volume_pct,
            CAST(n_total AS BIGINT) AS particles
        FROM cumulative, (VALUES (0), (1)) AS e(edge)
        ORDER BY sample_id, size_mm, passing_number_pct
    """)  # fmt: skip


def d_values(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], measure: str = "esd") -> pd.DataFrame:
    """D10, D50, D80 by number and by volume: exact per-particle log-linear interpolation.

    The catalog's own ``d_values`` algorithm (``schemas.catalog.d_values_view_sql``:
    two passes over fine log bins, then the particles of the bin holding each
    crossing) applied to the chosen size measure and to the selected samples
    only. For ESD it equals the ``d_values`` view. Columns: sample_id,
    particles, d10/d50/d80 _number_mm and _volume_mm.
    """
    ids = _in_list(sample_ids)
    column = _measure(measure)
    view = d_values_view_sql(temporary=True)
    header, body = view.split(" d_values AS\n", 1)
    if "FROM particles\n" not in body or "esd_mm" not in body:
        raise AssertionError("schemas.catalog.d_values_view_sql changed shape; update dashboards.queries.d_values")
    body = body.replace("esd_mm", column).replace(
        "FROM particles\n", f"FROM (SELECT * FROM particles WHERE sample_id IN {ids}) AS selected\n", 1
    )
    return _df(connection, f"""
        WITH counts AS (
            SELECT sample_id, count(*) AS particles FROM particles
            WHERE sample_id IN {ids} AND {SIZED} AND {column} > 0 GROUP BY sample_id
        ),
        d AS ({body})
        SELECT c.sample_id, c.particles, d.d10_number_mm, d.d50_number_mm, d.d80_number_mm,
            d.d10_volume_mm, d.d50_volume_mm, d.d80_volume_mm
        FROM counts AS c JOIN d USING (sample_id)
        ORDER BY c.sample_id
    """)  # fmt: skip


def size_classes(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], measure: str = "esd") -> pd.DataFrame:
    """Frequency per sqrt(2) size class: particles, volume, number_pct, volume_pct."""
    column = _measure(measure)
    return _df(connection, f"""
        WITH classed AS (
            SELECT sample_id, CAST(floor(2 * log2({column})) AS INTEGER) AS size_class, volume_mm3
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {column} > 0
        )
        SELECT sample_id, size_class, pow(2, size_class / 2.0) AS lower_mm, pow(2, (size_class + 1) / 2.0) AS upper_mm,
            count(*) AS particles, sum(volume_mm3) AS volume_mm3,
            100.0 * count(*) / sum(count(*)) OVER (PARTITION BY sample_id) AS number_pct,
            100.0 * sum(volume_mm3) / sum(sum(volume_mm3)) OVER (PARTITION BY sample_id) AS volume_pct
        FROM classed
        GROUP BY sample_id, size_class
        ORDER BY sample_id, size_class
    """)  # fmt: skip


# --------------------------------------------------------------------------
# shape
# --------------------------------------------------------------------------


def _shape_long(sample_ids: Sequence[str], weighting: str) -> str:
    weight = _weighting(weighting)
    return " UNION ALL ".join(
        f"SELECT sample_id, '{key}' AS measure, least(greatest({expr}, 0.0), 1.0) AS x, {weight} AS w "
        f"FROM particles WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND ({expr}) IS NOT NULL "
        f"AND isfinite({expr})"
        for key, (expr, _) in SHAPE_MEASURES.items()
    )


def shape_box_stats(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], weighting: str = "number", bins: int = 400
) -> pd.DataFrame:
    """Box-plot statistics (P5, Q1, median, Q3, P95) of each shape measure per sample, weighted.

    Weighted quantiles from a ``bins``-bin histogram on [0, 1] (interpolated
    inside the bin: exact to 1/``bins``). Columns: sample_id, measure, particles,
    p5, q1, median, q3, p95, mean.
    """
    b = int(bins)
    return _df(connection, f"""
        WITH long AS ({_shape_long(sample_ids, weighting)}),
        hist AS (
            SELECT sample_id, measure, least(CAST(floor(x * {b}) AS INTEGER), {b - 1}) AS bin,
                sum(w) AS w, count(*) AS n, sum(w * x) AS wx
            FROM long GROUP BY ALL
        ),
        cumulative AS (
            SELECT *, sum(w) OVER upto AS upto, sum(w) OVER upto - w AS below, sum(w) OVER whole AS total
            FROM hist
            WINDOW upto AS (PARTITION BY sample_id, measure ORDER BY bin ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
                   whole AS (PARTITION BY sample_id, measure)
        ),
        quantiles AS (
            SELECT c.sample_id, c.measure, t.q,
                arg_min((c.bin + (t.q * c.total - c.below) / c.w) / {b}, c.bin) FILTER (WHERE c.upto >= t.q * c.total) AS v
            FROM cumulative AS c, (VALUES (0.05), (0.25), (0.5), (0.75), (0.95)) AS t(q)
            GROUP BY c.sample_id, c.measure, t.q
        ),
        totals AS (
            SELECT sample_id, measure, sum(n) AS particles, sum(wx) / sum(w) AS mean FROM hist GROUP BY ALL
        )
        SELECT t.sample_id, t.measure, CAST(t.particles AS BIGINT) AS particles,
            max(v) FILTER (WHERE q = 0.05) AS p5, max(v) FILTER (WHERE q = 0.25) AS q1,
            max(v) FILTER (WHERE q = 0.5) AS median, max(v) FILTER (WHERE q = 0.75) AS q3,
            max(v) FILTER (WHERE q = 0.95) AS p95, t.mean
        FROM totals AS t JOIN quantiles AS q USING (sample_id, measure)
        GROUP BY t.sample_id, t.measure, t.particles, t.mean
        ORDER BY t.measure, t.sample_id
    """)  # fmt: skip


def shape_histograms(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], weighting: str = "number", bins: int = 40
) -> pd.DataFrame:
    """Density of each shape measure per sample on ``bins`` bins of [0, 1] (for violins).

    Columns: sample_id, measure, x (bin centre), density (share of the sample's
    weight per unit of the measure), particles (in the bin).
    """
    b = int(bins)
    return _df(connection, f"""
        WITH long AS ({_shape_long(sample_ids, weighting)}),
        hist AS (
            SELECT sample_id, measure, least(CAST(floor(x * {b}) AS INTEGER), {b - 1}) AS bin, sum(w) AS w, count(*) AS n
            FROM long GROUP BY ALL
        )
        SELECT sample_id, measure, (bin + 0.5) / {b} AS x,
            w / sum(w) OVER (PARTITION BY sample_id, measure) * {b} AS density, n AS particles
        FROM hist
        ORDER BY measure, sample_id, x
    """)  # fmt: skip


def zingg_hexbins(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], weighting: str = "number", radius: float = 0.025
) -> pd.DataFrame:
    """Hexagonal bins (pointy-top, circumradius ``radius``) of elongation b/a (x) vs flatness c/b (y).

    Columns: x, y (hexagon centre), particles, weight_pct (share of the selected
    samples' total weight).
    """
    weight = _weighting(weighting)
    r = float(radius)
    return _df(connection, f"""
        WITH points AS (
            SELECT elongation AS x, flatness AS y, {weight} AS w FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND elongation IS NOT NULL AND flatness IS NOT NULL
                AND isfinite(elongation) AND isfinite(flatness)
        ),
        axial AS (SELECT (sqrt(3) / 3 * x - y / 3) / {r} AS cx, (2.0 / 3 * y) / {r} AS cz, w FROM points),
        rounded AS (
            SELECT cx, cz, -cx - cz AS cy, round(cx) AS rx, round(cz) AS rz, round(-cx - cz) AS ry, w FROM axial
        ),
        cube AS (
            SELECT CASE WHEN abs(rx - cx) > abs(ry - cy) AND abs(rx - cx) > abs(rz - cz) THEN -ry - rz ELSE rx END AS q,
                CASE WHEN abs(rx - cx) > abs(ry - cy) AND abs(rx - cx) > abs(rz - cz) THEN rz
                     WHEN abs(ry - cy) > abs(rz - cz) THEN rz ELSE -rx - ry END AS r,
                w
            FROM rounded
        )
        SELECT {r} * sqrt(3) * (q + r / 2.0) AS x, {r} * 1.5 * r AS y, count(*) AS particles,
            100.0 * sum(w) / sum(sum(w)) OVER () AS weight_pct
        FROM cube GROUP BY q, r
        ORDER BY x, y
    """)  # fmt: skip


def zingg_classes(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], weighting: str = "number") -> pd.DataFrame:
    """Share of each Zingg class per sample (limits b/a = c/b = 2/3): disc, equant, blade, rod."""
    weight = _weighting(weighting)
    lim = ZINGG_LIMIT
    return _df(connection, f"""
        WITH classed AS (
            SELECT sample_id, {weight} AS w,
                CASE WHEN elongation >= {lim} AND flatness >= {lim} THEN 'equant (spheroid)'
                     WHEN elongation >= {lim} THEN 'disc (oblate)'
                     WHEN flatness >= {lim} THEN 'rod (prolate)'
                     ELSE 'blade' END AS zingg_class
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND elongation IS NOT NULL AND flatness IS NOT NULL
        )
        SELECT sample_id, zingg_class, count(*) AS particles,
            100.0 * sum(w) / sum(sum(w)) OVER (PARTITION BY sample_id) AS pct
        FROM classed GROUP BY sample_id, zingg_class ORDER BY sample_id, zingg_class
    """)  # fmt: skip


def size_sphericity_density(
    connection: duckdb.DuckDBPyConnection,
    sample_ids: Sequence[str],
    measure: str = "esd",
    weighting: str = "number",
    size_bins_per_ln: int = 8,
    sphericity_bins: int = 25,
) -> pd.DataFrame:
    """2-D histogram of size (log bins) vs sphericity: size_lo/hi_mm, sph_lo/hi, particles, weight_pct."""
    column = _measure(measure)
    weight = _weighting(weighting)
    k, b = int(size_bins_per_ln), int(sphericity_bins)
    return _df(connection, f"""
        WITH binned AS (
            SELECT CAST(floor(ln({column}) * {k}) AS INTEGER) AS sbin,
                least(greatest(CAST(floor(sphericity * {b}) AS INTEGER), 0), {b - 1}) AS pbin, {weight} AS w
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {column} > 0 AND sphericity IS NOT NULL
                AND isfinite(sphericity)
        )
        SELECT exp(sbin / {k}) AS size_lo_mm, exp((sbin + 1) / {k}) AS size_hi_mm,
            pbin / {b} AS sph_lo, (pbin + 1) / {b} AS sph_hi,
            count(*) AS particles, 100.0 * sum(w) / sum(sum(w)) OVER () AS weight_pct
        FROM binned GROUP BY sbin, pbin ORDER BY sbin, pbin
    """)  # fmt: skip


# --------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------


def modal_mineralogy(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str]) -> pd.DataFrame:
    """Phase volume % of each sample (all particles, border-touching ones included): sample_id, phase, volume_pct, particles."""
    names = phases(connection)
    if not names:
        return pd.DataFrame(columns=["sample_id", "phase", "volume_pct", "particles"])
    parts = " UNION ALL ".join(
        f"""SELECT sample_id, '{name}' AS phase,
                100.0 * sum(phase_{name}_fraction * volume_mm3) / sum(volume_mm3) AS volume_pct, count(*) AS particles
            FROM particles WHERE sample_id IN {_in_list(sample_ids)} AND phase_{name}_fraction IS NOT NULL
            GROUP BY sample_id"""
        for name in names
    )
    return _df(connection, f"SELECT * FROM ({parts}) ORDER BY sample_id, phase")


def grade_by_size(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], phase: str, measure: str = "esd"
) -> pd.DataFrame:
    """Phase grade (volume %) and deportment (% of the sample's phase) per sqrt(2) size class.

    Columns: sample_id, size_class, lower_mm, upper_mm, particles, volume_mm3,
    phase_volume_mm3, grade_pct, deportment_pct.
    """
    fraction = _phase_column(connection, phase)
    column = _measure(measure)
    return _df(connection, f"""
        WITH classed AS (
            SELECT sample_id, CAST(floor(2 * log2({column})) AS INTEGER) AS size_class, volume_mm3,
                {fraction} * volume_mm3 AS phase_volume
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {column} > 0 AND {fraction} IS NOT NULL
        )
        SELECT sample_id, size_class, pow(2, size_class / 2.0) AS lower_mm, pow(2, (size_class + 1) / 2.0) AS upper_mm,
            count(*) AS particles, sum(volume_mm3) AS volume_mm3, sum(phase_volume) AS phase_volume_mm3,
            100.0 * sum(phase_volume) / sum(volume_mm3) AS grade_pct,
            100.0 * sum(phase_volume) / nullif(sum(sum(phase_volume)) OVER (PARTITION BY sample_id), 0) AS deportment_pct
        FROM classed GROUP BY sample_id, size_class ORDER BY sample_id, size_class
    """)  # fmt: skip


#: Liberation classes of a particle's phase grade g: 0 (barren), (0-10], ..., (80-90], (90-100), 100 (liberated).
LIBERATION_LABELS = ["0 %", *(f"{10 * i}-{10 * (i + 1)} %" for i in range(10)), "100 %"]


def _liberation_class(fraction: str) -> str:
    """SQL: class index 0 (g = 0), 1..10 ((10(i-1), 10 i] %, the last one open at 100), 11 (g = 1)."""
    return (
        f"CASE WHEN {fraction} <= 0 THEN 0 WHEN {fraction} >= 1 THEN 11 "
        f"ELSE least(greatest(CAST(ceil({fraction} * 10) AS INTEGER), 1), 10) END"
    )


def liberation_spectrum(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], phase: str) -> pd.DataFrame:
    """Phase volume per liberation class (of the phase's grade in each particle), per sample.

    All particles are included (a border-cut particle still holds its phase
    voxels; its grade is that of the visible part). Columns: sample_id,
    liberation_class (0-11), label, particles, volume_mm3, phase_volume_mm3,
    phase_pct (share of the sample's phase volume), volume_pct (of the sample's volume).
    """
    fraction = _phase_column(connection, phase)
    labels = "[" + ", ".join(f"'{label}'" for label in LIBERATION_LABELS) + "]"
    return _df(connection, f"""
        WITH classed AS (
            SELECT sample_id, {_liberation_class(fraction)} AS liberation_class, volume_mm3,
                {fraction} * volume_mm3 AS phase_volume
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {fraction} IS NOT NULL AND volume_mm3 IS NOT NULL
        )
        SELECT sample_id, liberation_class, {labels}[liberation_class + 1] AS label, count(*) AS particles,
            sum(volume_mm3) AS volume_mm3, sum(phase_volume) AS phase_volume_mm3,
            100.0 * sum(phase_volume) / nullif(sum(sum(phase_volume)) OVER (PARTITION BY sample_id), 0) AS phase_pct,
            100.0 * sum(volume_mm3) / sum(sum(volume_mm3)) OVER (PARTITION BY sample_id) AS volume_pct
        FROM classed GROUP BY sample_id, liberation_class ORDER BY sample_id, liberation_class
    """)  # fmt: skip


def liberation_yield(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], phase: str, bins: int = 100
) -> pd.DataFrame:
    """Cumulative liberation yield: % of the phase's volume in particles of grade >= g, per sample.

    Also the cumulative grade of those particles (the liberation-limited
    grade-recovery curve: feed particles sorted by grade, accumulated).
    Columns: sample_id, grade_pct (g, lower edge of a 1/``bins`` grade bin),
    phase_yield_pct, volume_yield_pct, cumulative_grade_pct, particles (with grade >= g).
    """
    fraction = _phase_column(connection, phase)
    b = int(bins)
    return _df(connection, f"""
        WITH binned AS (
            SELECT sample_id, least(greatest(CAST(floor({fraction} * {b}) AS INTEGER), 0), {b}) AS bin,
                count(*) AS n, sum(volume_mm3) AS v, sum({fraction} * volume_mm3) AS pv
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {fraction} IS NOT NULL AND volume_mm3 IS NOT NULL
            GROUP BY ALL
        ),
        down AS (
            SELECT sample_id, bin, sum(n) OVER above AS n_above, sum(v) OVER above AS v_above, sum(pv) OVER above AS pv_above,
                sum(v) OVER whole AS v_total, sum(pv) OVER whole AS pv_total
            FROM binned
            WINDOW above AS (PARTITION BY sample_id ORDER BY bin DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
                   whole AS (PARTITION BY sample_id)
        )
        SELECT sample_id, 100.0 * bin / {b} AS grade_pct,
            100.0 * pv_above / nullif(pv_total, 0) AS phase_yield_pct,
            100.0 * v_above / v_total AS volume_yield_pct,
            100.0 * pv_above / v_above AS cumulative_grade_pct,
            CAST(n_above AS BIGINT) AS particles
        FROM down ORDER BY sample_id, bin DESC
    """)  # fmt: skip


# --------------------------------------------------------------------------
# process: products of a separation
# --------------------------------------------------------------------------


def product_totals(connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], phase: str) -> pd.DataFrame:
    """Per sample: particles, volume and phase volume of the particles not touching the border; grade %."""
    fraction = _phase_column(connection, phase)
    return _df(connection, f"""
        SELECT sample_id, count(*) AS particles, sum(volume_mm3) AS volume_mm3,
            sum({fraction} * volume_mm3) AS phase_volume_mm3, 100.0 * sum({fraction} * volume_mm3) / sum(volume_mm3) AS grade_pct
        FROM particles
        WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {fraction} IS NOT NULL
        GROUP BY sample_id ORDER BY sample_id
    """)  # fmt: skip


def product_classes(
    connection: duckdb.DuckDBPyConnection, sample_ids: Sequence[str], phase: str, by: str = "size", measure: str = "esd"
) -> pd.DataFrame:
    """Per sample and class (sqrt(2) size class, or liberation class of ``phase``): particles,
    volume, phase volume, and the class's share of the sample's volume and phase volume (%).

    Border-touching particles are excluded, so that class shares add up to
    the totals of :func:`product_totals`.
    """
    fraction = _phase_column(connection, phase)
    if by == "size":
        column = _measure(measure)
        klass, where = f"CAST(floor(2 * log2({column})) AS INTEGER)", f"AND {column} > 0"
    elif by == "liberation":
        klass, where = _liberation_class(fraction), ""
    else:
        raise ValueError(f"by must be size or liberation, got {by!r}")
    return _df(connection, f"""
        WITH classed AS (
            SELECT sample_id, {klass} AS class, volume_mm3, {fraction} * volume_mm3 AS phase_volume
            FROM particles
            WHERE sample_id IN {_in_list(sample_ids)} AND {SIZED} AND {fraction} IS NOT NULL {where}
        )
        SELECT sample_id, class, count(*) AS particles, sum(volume_mm3) AS volume_mm3, sum(phase_volume) AS phase_volume_mm3,
            100.0 * sum(volume_mm3) / sum(sum(volume_mm3)) OVER (PARTITION BY sample_id) AS volume_share_pct,
            100.0 * sum(phase_volume) / nullif(sum(sum(phase_volume)) OVER (PARTITION BY sample_id), 0) AS phase_share_pct
        FROM classed GROUP BY sample_id, class ORDER BY sample_id, class
    """)  # fmt: skip


# --------------------------------------------------------------------------
# particle explorer
# --------------------------------------------------------------------------

#: Particle columns the explorer can filter on (numeric and boolean ones).
_NUMERIC_TYPES = ("DOUBLE", "FLOAT", "BIGINT", "INTEGER", "UINTEGER", "UBIGINT", "SMALLINT", "HUGEINT")


def filterable_columns(connection: duckdb.DuckDBPyConnection) -> list[str]:
    return [name for name, kind in particle_columns(connection) if kind in _NUMERIC_TYPES or kind == "BOOLEAN"]


def column_range(connection: duckdb.DuckDBPyConnection, sample_id: str, column: str) -> tuple[float | None, float | None]:
    if column not in filterable_columns(connection):
        raise ValueError(f"unknown column {column!r}")
    row = connection.execute(
        f'SELECT min("{column}")::DOUBLE, max("{column}")::DOUBLE FROM particles WHERE sample_id IN {_in_list([sample_id])}'
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def find_particles(
    connection: duckdb.DuckDBPyConnection,
    sample_id: str,
    ranges: dict[str, tuple[float, float]],
    order_by: str = "volume_mm3",
    descending: bool = True,
    limit: int = 200,
) -> tuple[pd.DataFrame, int]:
    """Particles of one sample whose columns lie in the given closed ranges; (first ``limit`` rows, match count)."""
    allowed = filterable_columns(connection)
    conditions, params = [f"sample_id IN {_in_list([sample_id])}"], []
    for column, (low, high) in ranges.items():
        if column not in allowed:
            raise ValueError(f"unknown column {column!r}")
        conditions.append(f'CAST("{column}" AS DOUBLE) BETWEEN ? AND ?')
        params += [float(low), float(high)]
    if order_by not in allowed:
        raise ValueError(f"unknown column {order_by!r}")
    where = " AND ".join(conditions)
    count = connection.execute(f"SELECT count(*) FROM particles WHERE {where}", params).fetchone()[0]
    rows = _df(
        connection,
        f'SELECT * FROM particles WHERE {where} ORDER BY "{order_by}" {"DESC" if descending else "ASC"}, particle_id '
        f"LIMIT {int(limit)}",
        params,
    )
    return rows, int(count)


def particle(connection: duckdb.DuckDBPyConnection, sample_id: str, particle_id: int) -> dict | None:
    """One particle's row as a dict, or None."""
    cursor = connection.execute(
        f"SELECT * FROM particles WHERE sample_id IN {_in_list([sample_id])} AND particle_id = ?", [int(particle_id)]
    )
    names = [d[0] for d in cursor.description]
    row = cursor.fetchone()
    return None if row is None else dict(zip(names, row))


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))
