"""The particle table: one row per segmented particle, the contract between
feature extraction (``ps3d_core.features``), storage (``ps3d_core.catalog``),
``ps3d sql`` and the dashboard.

Every column carries Arrow field metadata ``unit`` and ``description`` (and
``estimator`` where the estimator changes the answer), so a Parquet file
documents itself: ``pyarrow.parquet.read_schema(path).field("esd_mm").metadata``.

Axis order is z, y, x; voxel indices are those of the scan's grid; physical
quantities are in mm, mm² and mm³. Phase columns depend on the scan:
``phase_<name>_fraction`` for each phase of the sample (named grey-value
ranges from ``scan.json``, or found from the histogram and recorded in the
``samples`` table), so tables of different samples are combined by column
name (DuckDB ``union_by_name``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

#: Bumped whenever a column is added, removed or changes meaning.
PARTICLE_TABLE_VERSION = 1

SURFACE_AREA_ESTIMATOR = (
    "marching cubes (Lewiner) at level 0.5 on the particle's binary crop smoothed by a Gaussian of "
    "sigma 0.75 voxel (Rorato et al. 2019, as in spam and Sand Atlas): within 3 % on spheres of radius "
    ">= 10 voxels, biased for particles of a few voxels; particles whose smoothed surface encloses less than "
    "75 % of their voxel volume (a few voxels, or one or two voxels thick) are meshed from the unsmoothed "
    "binary crop instead"
)


def _field(name: str, type_: pa.DataType, unit: str, description: str, **extra: str) -> pa.Field:
    metadata = {"unit": unit, "description": description, **extra}
    return pa.field(name, type_, nullable=name not in ("sample_id", "particle_id"), metadata=metadata)


#: The columns every particle table has, in table order, with their units and definitions.
_COLUMNS: list[pa.Field] = [
    _field("sample_id", pa.string(), "", "Sample id from scan.json."),
    _field("particle_id", pa.uint32(), "", "Label value of the particle in labels.ome.zarr."),
    _field("run_id", pa.string(), "", "Pipeline run that produced the row (runs table)."),
    _field("voxel_count", pa.int64(), "voxel", "Number of voxels of the particle."),
    _field("volume_mm3", pa.float64(), "mm3", "voxel_count x voxel volume."),
    _field("esd_mm", pa.float64(), "mm", "Equivalent sphere diameter (6 V / pi)^(1/3)."),
    *(
        _field(f"bbox_{axis}{end}", pa.int32(), "voxel", f"Bounding box, {word} voxel index along {axis}.")
        for end, word in (("0", "first"), ("1", "one past the last")) for axis in "zyx"
    ),
    *(
        _field(f"centroid_{axis}_mm", pa.float64(), "mm", f"Centroid along {axis} from the scan's origin voxel centre.")
        for axis in "zyx"
    ),
    _field(
        "surface_area_mm2", pa.float64(), "mm2", "Surface area of the particle.", estimator=SURFACE_AREA_ESTIMATOR
    ),
    _field(
        "sphericity", pa.float64(), "",
        "Wadell sphericity pi^(1/3) (6 V)^(2/3) / A; 1 for a sphere.", estimator=SURFACE_AREA_ESTIMATOR,
    ),
    *(
        _field(
            f"axis_{name}_mm", pa.float64(), "mm",
            f"{name.capitalize()} full axis length of the ellipsoid with the particle's second moments "
            "(2 sqrt(5 lambda), voxels as unit cubes).",
        )
        for name in ("major", "intermediate", "minor")
    ),
    _field("elongation", pa.float64(), "", "axis_intermediate / axis_major (Zingg b/a)."),
    _field("flatness", pa.float64(), "", "axis_minor / axis_intermediate (Zingg c/b)."),
    _field("feret_max_mm", pa.float64(), "mm", "Largest caliper diameter of the surface mesh."),
    _field("feret_min_mm", pa.float64(), "mm", "Smallest caliper diameter (thinnest width) of the surface mesh."),
    _field(
        "solidity", pa.float64(), "",
        "Volume enclosed by the surface mesh / volume of its convex hull (1 for a convex particle).",
        estimator=SURFACE_AREA_ESTIMATOR,
    ),
    _field("extent", pa.float64(), "", "voxel_count / bounding-box voxel count."),
    _field("intensity_mean", pa.float64(), "grey", "Mean grey value of the particle's voxels."),
    _field("intensity_std", pa.float64(), "grey", "Standard deviation of the grey values (population)."),
    _field("intensity_min", pa.float64(), "grey", "Lowest grey value."),
    _field("intensity_max", pa.float64(), "grey", "Highest grey value."),
    *(
        _field(f"intensity_p{q}", pa.float64(), "grey", f"{q}th percentile of the grey values (linear interpolation).")
        for q in (10, 50, 90)
    ),
    _field(
        "touches_border", pa.bool_(), "",
        "The particle touches a face of the volume or the edge of the cylindrical field of view: it is cut, "
        "so its size and shape are not those of the whole particle.",
    ),
]

#: Columns every particle table has, in order (phase columns follow).
BASE_COLUMNS: tuple[str, ...] = tuple(field.name for field in _COLUMNS)


def phase_column(phase: str) -> str:
    """Column name of a phase's volume fraction: ``phase_<name>_fraction``."""
    return f"phase_{phase}_fraction"


def particle_schema(phases: Sequence[str] = ()) -> pa.Schema:
    """The Arrow schema of a sample's particle table, with one fraction column per phase.

    Parameters
    ----------
    phases : sequence of str
        Phase names of the sample, in the order of their grey-value ranges.
    """
    phase_fields = [
        _field(phase_column(name), pa.float64(), "", f"Volume fraction of the particle's voxels in phase {name!r}.")
        for name in phases
    ]
    return pa.schema(
        [*_COLUMNS, *phase_fields],
        metadata={"ps3d.table": "particles", "ps3d.table_version": str(PARTICLE_TABLE_VERSION)},
    )


def markdown(phases: Sequence[str] = ("<name>",)) -> str:
    """The particle table's columns as a Markdown table (unit, definition), for the README."""
    lines = ["| column | type | unit | definition |", "|---|---|---|---|"]
    for field in particle_schema(phases):
        meta = {key.decode(): value.decode() for key, value in (field.metadata or {}).items()}
        estimator = f" Estimator: {meta['estimator']}." if "estimator" in meta and field.name == "surface_area_mm2" else ""
        lines.append(f"| `{field.name}` | {field.type} | {meta.get('unit', '')} | {meta.get('description', '')}{estimator} |")
    return "\n".join(lines)
