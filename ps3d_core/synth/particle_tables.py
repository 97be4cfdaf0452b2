"""Random particle tables with physically consistent columns, for storage tests and query benchmarks.

The images of :mod:`ps3d_core.synth` give the whole pipeline exact ground
truth, but measuring 10⁷ particles from images to fill a database takes
hours. These tables skip the images: seeded, log-normal sizes, voxel counts
rounded from the diameters, volumes, ESD and boxes consistent with them,
principal axes ordered major ≥ intermediate ≥ minor, phase fractions that
sum to at most 1. Values are plausible, not measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from schemas.particles import particle_schema, phase_column


def random_particle_table(
    sample_id: str,
    n: int,
    phases: Sequence[str] = (),
    *,
    seed: int = 0,
    spacing_mm: float = 0.01,
    median_diameter_voxels: float = 8.0,
    sigma_ln: float = 0.5,
    border_share: float = 0.1,
    run_id: str | None = None,
    shuffle_ids: bool = False,
) -> pa.Table:
    """A valid particle table (:func:`schemas.particles.particle_schema`) of ``n`` random particles.

    Parameters
    ----------
    sample_id, run_id : str
        Written into every row (``run_id`` None: left null, for the store to fill in).
    n : int
        Rows.
    phases : sequence of str
        Phase names; each gets a ``phase_<name>_fraction`` column
        (Dirichlet fractions with one share left to unphased voxels).
    seed : int
        Seed of the random generator: the same arguments give the same table.
    spacing_mm : float
        Isotropic voxel size in mm.
    median_diameter_voxels, sigma_ln : float
        Log-normal equivalent diameters in voxels.
    border_share : float
        Expected share of rows with ``touches_border``.
    shuffle_ids : bool
        Particle ids in random order instead of 1..n.
    """
    rng = np.random.default_rng(seed)
    diameters = rng.lognormal(np.log(median_diameter_voxels), sigma_ln, n)
    voxel_count = np.maximum(1, np.round(np.pi / 6 * diameters**3)).astype(np.int64)
    volume = voxel_count * spacing_mm**3
    esd = np.cbrt(6 * volume / np.pi)
    fractions = rng.dirichlet(np.ones(len(phases) + 1), n) if phases else np.zeros((n, 0))
    corner = rng.integers(0, 400, (n, 3)).astype(np.int32)
    extent = (np.ceil(diameters) + 1).astype(np.int32)
    axes = np.sort(rng.uniform(0.5, 1.5, (n, 3)) * esd[:, None], axis=1)[:, ::-1]
    grey = np.round(rng.normal(20000, 3000, (n, 7)))
    ids = np.arange(1, n + 1, dtype=np.uint32)
    values = {
        "sample_id": [sample_id] * n,
        "particle_id": rng.permutation(ids) if shuffle_ids else ids,
        "run_id": [run_id] * n,
        "voxel_count": voxel_count,
        "volume_mm3": volume,
        "esd_mm": esd,
        **{f"bbox_{a}0": corner[:, i] for i, a in enumerate("zyx")},
        **{f"bbox_{a}1": corner[:, i] + extent for i, a in enumerate("zyx")},
        **{f"centroid_{a}_mm": (corner[:, i] + extent / 2) * spacing_mm for i, a in enumerate("zyx")},
        "surface_area_mm2": np.pi * esd**2 * rng.uniform(1.0, 1.5, n),
        "sphericity": rng.uniform(0.6, 1.0, n),
        "axis_major_mm": axes[:, 0],
        "axis_intermediate_mm": axes[:, 1],
        "axis_minor_mm": axes[:, 2],
        "elongation": axes[:, 1] / axes[:, 0],
        "flatness": axes[:, 2] / axes[:, 1],
        "feret_max_mm": axes[:, 0] * 1.05,
        "feret_min_mm": axes[:, 2] * 0.95,
        "solidity": rng.uniform(0.7, 1.0, n),
        "extent": rng.uniform(0.3, 0.7, n),
        "intensity_mean": grey[:, 0],
        "intensity_std": np.abs(grey[:, 1]) / 10,
        "intensity_min": grey[:, 2] - 9000,
        "intensity_max": grey[:, 3] + 9000,
        "intensity_p10": grey[:, 4] - 3000,
        "intensity_p50": grey[:, 5],
        "intensity_p90": grey[:, 6] + 3000,
        "touches_border": rng.random(n) < border_share,
        **{phase_column(name): fractions[:, i] for i, name in enumerate(phases)},
    }
    schema = particle_schema(list(phases))
    return pa.table([pa.array(values[f.name], f.type) for f in schema], schema=schema)
