"""Per-particle characterisation: the particle table of a labelled scan.

:func:`extract_features` turns a label volume (``labels.ome.zarr`` of
``ps3d segment``, or any integer label image) and its scan into one row
per particle with the columns of :func:`schemas.particles.particle_schema`,
in physical units from the voxel size (anisotropic voxels included).
:func:`write_features_parquet` writes it atomically with the phases in the
file's metadata.

Architecture
------------
*Phases.* The grey-value ranges of ``scan.json`` when given; otherwise
found from the histogram of a bounded sample of particle voxels and
returned, so the caller records them (:mod:`ps3d_core.features.phases`).

*Pass 1* streams the labels and the image in z-slabs (``slab_depth``
slices; the volume is never in memory whole) and collects mergeable
per-label statistics (:mod:`ps3d_core.features.stats`): voxel counts,
coordinate sums and second-moment sums, grey-value sums and sums of
squares, grey-value minima and maxima, voxels per phase and bounding
boxes. Merging slabs gives exactly
the whole-volume statistics. From them: volume, ESD, bounding box,
centroid, principal axes (with the within-voxel variance ``spacing**2/12``,
so voxels count as solid boxes), elongation, flatness, extent, mean and
standard deviation, minimum and maximum of the grey values, phase
fractions and touching a face of the volume.

*Pass 2* visits the particles in order of their first slice, reading the
volume once more slab by slab into a rolling buffer, and measures each
particle's crop (its bounding box grown by one voxel) in parallel
(``workers``) (:mod:`ps3d_core.features.shape`): surface area (Gaussian
sigma 0.75 voxel, marching cubes at 0.5), sphericity, solidity against the
convex hull of the mesh, maximum and minimum Feret diameters, the exact
10/50/90th percentiles of the grey values, and touching the edge
of the cylindrical field of view (a neighbour showing the constant grey
value CT software writes outside it, detected by
:func:`ps3d_core.particle_size.outside_value`).

Accuracy
--------
Exact (up to float rounding): counts, volumes, ESD, boxes, centroids,
extent, principal axes of the voxel set, grey-value statistics, phase
counts. Surface area: within 1 % on digitised spheres of radius >= 10
voxels; biased on small particles and sharp edges (-4 % on a 20x30x40
voxel box). Sphericity is not clipped to 1, so the area estimator's bias
stays visible. Feret diameters and solidity refer to the smoothed surface
(see :mod:`ps3d_core.features.shape` for the rounding of sharp corners and
the minimum-width search). ``touches_border`` marks particles cut by the
volume's faces or the field of view: their size and shape are not those of
the whole particle.

Phase fractions count the voxels whose grey value lies in each phase's
range: exact counts (the tests compare them with the synthetic generator's
true phase of every voxel), but blur and partial volume move voxels across
the thresholds. With the ranges ``scan.json`` gives on six ``tiny``
synthetic scans, the densest phase's share of all particle voxels came out
0.9 to 2.5 times the truth (a minor accessory phase 4.7 times): a
threshold is a coarse phase model for small inclusions.

Pass 2 runs ``workers`` threads by default (measured fastest on the
2-core machine, BENCHMARKS.md); ``parallel="process"`` starts processes
with the ``spawn`` method instead, and a script doing so needs the usual
``if __name__ == "__main__":`` guard.
"""

from ps3d_core.features.extract import (
    FeatureResult,
    build_table,
    check_spacing,
    extract_features,
    extract_features_from_files,
    measure_crop,
    new_run_id,
    principal_axes,
    read_phases,
    single_threaded_blas,
    stream_stats,
    write_features_parquet,
)
from ps3d_core.features.phases import auto_phases, sample_particle_values
from ps3d_core.features.stats import LabelStats, merge_stats, phase_codes, slab_stats

__all__ = [
    "FeatureResult",
    "LabelStats",
    "auto_phases",
    "build_table",
    "check_spacing",
    "extract_features",
    "extract_features_from_files",
    "measure_crop",
    "new_run_id",
    "merge_stats",
    "phase_codes",
    "principal_axes",
    "read_phases",
    "sample_particle_values",
    "single_threaded_blas",
    "slab_stats",
    "stream_stats",
    "write_features_parquet",
]
