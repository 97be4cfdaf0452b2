"""A synthetic particle database to try the dashboard on (and to test it).

``python -m dashboards.demo_data HOME`` stores, through
:func:`ps3d_core.catalog.store_sample`, particle tables that follow
``schemas.particles.particle_schema(phases)``:

- campaign ``2026-Q4 flotation``: a feed sample, and the concentrate and the
  tailings of a simulated separation of a second draw of the same feed
  (each particle reports to the concentrate with a probability rising with
  its sulphide grade and falling off for fines and coarse particles), with
  ``mass_g`` = the products' masses (phase densities 2.7 and 4.2 g/cm³);
- campaign ``2026-Q3 pilot``: the same without ``mass_g``;
- campaign ``2026-Q2 survey``: a feed only (no concentrate, no tailings).

Sizes are log-normal (a feed median ESD of about 0.2 mm), two phases
(``gangue`` and ``sulphide``, fractions summing to 1) with barren, locked,
middling and liberated particles, ellipsoid-like shapes with Zingg ratios and
sphericities drawn per particle, border-touching particles more likely the
larger they are, and voxel counts on a 10 µm grid.

``with_volumes=True`` also writes, for one small sample, a real 64³ scan
(``<home>/scans/<id>/image.ome.zarr``) and its labels
(``<home>/segmentations/<id>/labels.ome.zarr``) at the places where the
ingest flow archives them, with the particle rows measured on those labels,
so the particle explorer can show slices.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from ps3d_core import catalog
from schemas.particles import particle_schema, phase_column
from schemas.scan import ScanMetadata

SPACING_MM = 0.01
PHASES = ("gangue", "sulphide")
PHASE_RANGES = {"gangue": (9000.0, 26000.0), "sulphide": (26000.0, 65536.0)}
DENSITY_G_CM3 = {"gangue": 2.7, "sulphide": 4.2}
#: Layout of the ingest flow (flows/ingest.py): archived scans and labels under the home.
SCANS_DIR, SEGMENTATIONS_DIR = "scans", "segmentations"
ARCHIVED_IMAGE, LABELS_IMAGE = "image.ome.zarr", "labels.ome.zarr"


def _population(rng: np.random.Generator, n: int, median_mm: float, sigma: float, sulphide_share: float) -> dict:
    """Sizes and sulphide grades of ``n`` particles."""
    esd = rng.lognormal(math.log(median_mm), sigma, n)
    kind = rng.random(n)
    grade = np.zeros(n)
    carries = kind < sulphide_share
    # among carriers: 35 % liberated-ish (high grade), 40 % middlings, 25 % locked (low grade)
    sub = rng.random(n)
    grade = np.where(carries & (sub < 0.35), rng.beta(12, 1.2, n), grade)
    grade = np.where(carries & (sub >= 0.35) & (sub < 0.75), rng.beta(2.5, 2.5, n), grade)
    grade = np.where(carries & (sub >= 0.75), rng.beta(1.2, 10, n), grade)
    grade = np.where(carries & (rng.random(n) < 0.08), 1.0, grade)  # fully liberated
    # finer particles are more often liberated
    return {"esd": esd, "grade": np.clip(grade, 0.0, 1.0)}


def particle_table(
    sample_id: str, esd: np.ndarray, grade: np.ndarray, seed: int, *, run_id: str | None = None,
    shape: tuple[int, int, int] = (1000, 1000, 1000),
) -> pa.Table:  # fmt: skip
    """A particle table with physically consistent columns for the given ESDs (mm) and sulphide grades."""
    rng = np.random.default_rng(seed)
    n = len(esd)
    voxel_count = np.maximum(1, np.round(np.pi / 6 * (esd / SPACING_MM) ** 3)).astype(np.int64)
    volume = voxel_count * SPACING_MM**3
    esd = np.cbrt(6 * volume / np.pi)
    elongation = np.clip(rng.beta(7, 2.5, n), 0.2, 1.0)  # b/a
    flatness = np.clip(rng.beta(6, 2.5, n), 0.15, 1.0)  # c/b
    a = esd / (elongation ** (2 / 3) * flatness ** (1 / 3))
    b, c = a * elongation, a * elongation * flatness
    p = 1.6075  # Knud Thomsen's ellipsoid surface
    ellipsoid_area = 4 * np.pi * (((a * b / 4) ** p + (a * c / 4) ** p + (b * c / 4) ** p) / 3) ** (1 / p)
    roughness = rng.uniform(1.05, 1.35, n)  # angular fragments have more surface than their ellipsoid
    area = ellipsoid_area * roughness
    sphericity = np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area
    size_voxels = a / SPACING_MM
    lo = np.array(shape) - 1
    centre = rng.uniform(0, 1, (n, 3)) * lo
    half = np.ceil(size_voxels / 2).astype(np.int32)[:, None]
    bbox0 = np.clip(np.floor(centre).astype(np.int32) - half, 0, lo)
    bbox1 = np.clip(np.floor(centre).astype(np.int32) + half + 1, 1, np.array(shape))
    touches = (bbox0 == 0).any(axis=1) | (bbox1 == np.array(shape)).any(axis=1) | (rng.random(n) < 0.03)
    grey_mean = grade * 42000 + (1 - grade) * 17000 + rng.normal(0, 800, n)
    grey_std = 1500 + 6000 * grade * (1 - grade) + rng.uniform(0, 500, n)
    values = {
        "sample_id": pa.array([sample_id] * n, pa.string()),
        "particle_id": np.arange(1, n + 1, dtype=np.uint32),
        "run_id": pa.array([run_id] * n, pa.string()),
        "voxel_count": voxel_count,
        "volume_mm3": volume,
        "esd_mm": esd,
        **{f"bbox_{ax}0": bbox0[:, i] for i, ax in enumerate("zyx")},
        **{f"bbox_{ax}1": bbox1[:, i] for i, ax in enumerate("zyx")},
        **{f"centroid_{ax}_mm": centre[:, i] * SPACING_MM for i, ax in enumerate("zyx")},
        "surface_area_mm2": area,
        "sphericity": sphericity,
        "axis_major_mm": a,
        "axis_intermediate_mm": b,
        "axis_minor_mm": c,
        "elongation": elongation,
        "flatness": flatness,
        "feret_max_mm": a * rng.uniform(1.0, 1.08, n),
        "feret_min_mm": c * rng.uniform(0.92, 1.0, n),
        "solidity": rng.uniform(0.8, 1.0, n),
        "extent": rng.uniform(0.4, 0.6, n),
        "intensity_mean": grey_mean,
        "intensity_std": grey_std,
        "intensity_min": grey_mean - 3 * grey_std,
        "intensity_max": grey_mean + 3 * grey_std,
        "intensity_p10": grey_mean - 1.28 * grey_std,
        "intensity_p50": grey_mean,
        "intensity_p90": grey_mean + 1.28 * grey_std,
        "touches_border": touches,
        phase_column("gangue"): 1.0 - grade,
        phase_column("sulphide"): grade,
    }
    schema = particle_schema(list(PHASES))
    return pa.table([pa.array(values[f.name], f.type) for f in schema], schema=schema)


def _mass_g(esd: np.ndarray, grade: np.ndarray) -> float:
    volume_cm3 = np.pi / 6 * esd**3 / 1000.0
    return float(np.sum(volume_cm3 * (grade * DENSITY_G_CM3["sulphide"] + (1 - grade) * DENSITY_G_CM3["gangue"])))


def store(
    home: Path, sample_id: str, stream: str, campaign: str | None, esd: np.ndarray, grade: np.ndarray, seed: int,
    *, mass_g: float | None = None, acquired_at: datetime | None = None, table: pa.Table | None = None,
) -> dict:  # fmt: skip
    """Store one sample through the catalog, as the ingest flow would."""
    run_id = f"run-{sample_id}"
    metadata = ScanMetadata.model_validate({
        "sample_id": sample_id, "spacing_mm": SPACING_MM, "stream": stream, "campaign": campaign,
        "material": "Cu-Zn sulphide ore (synthetic)", "mass_g": mass_g, "phases": PHASE_RANGES,
        "acquired_at": (acquired_at or datetime(2026, 10, 1, 9, 0)).isoformat(), "particle_size_mm": 0.2,
    })  # fmt: skip
    if table is None:
        table = particle_table(sample_id, esd, grade, seed, run_id=run_id)
    started = acquired_at or datetime(2026, 10, 1, 9, 0)
    run = {
        "run_id": run_id, "status": "succeeded", "started_at": started + timedelta(hours=1),
        "finished_at": started + timedelta(hours=1, minutes=7), "parameters": {"flow": "demo"},
        "timings": {"segment": 380.0, "features": 40.0}, "versions": {"ps3d": "0.1.0"}, "host": "demo",
    }  # fmt: skip
    return catalog.store_sample(
        home, metadata, table, run, phases=PHASE_RANGES, phases_source="scan.json",
        particle_size_mm=0.2, particle_size_source="scan.json", model_name="ps3d-default", model_version="1.0.0",
        fingerprint=f"demo-{sample_id}-{seed}",
    )  # fmt: skip


def separate(rng: np.random.Generator, esd: np.ndarray, grade: np.ndarray) -> np.ndarray:
    """True where a particle reports to the concentrate (flotation-like partition on grade and size)."""
    by_grade = 1 / (1 + np.exp(-(grade - 0.25) / 0.06))
    by_size = np.exp(-0.5 * (np.log(esd / 0.15) / 0.8) ** 2)  # fines and coarse float less
    p = 0.03 + 0.92 * by_grade * (0.35 + 0.65 * by_size)
    return rng.random(len(esd)) < p


def build(home: str | Path, *, particles: int = 3000, seed: int = 0, with_volumes: bool = True) -> Path:
    """Write the demo database into ``home``; returns it."""
    home = catalog.resolve_home(home)
    rng = np.random.default_rng(seed)
    day = datetime(2026, 10, 1, 9, 0)
    campaigns = [("2026-Q4 flotation", "Q4", True), ("2026-Q3 pilot", "Q3", False)]
    for index, (campaign, tag, with_mass) in enumerate(campaigns):
        feed = _population(rng, particles, 0.20, 0.55, 0.30)
        store(home, f"{tag}-feed", "feed", campaign, feed["esd"], feed["grade"], seed + 10 * index + 1,
              mass_g=_mass_g(feed["esd"], feed["grade"]) if with_mass else None, acquired_at=day)  # fmt: skip
        second = _population(rng, particles * 2, 0.20, 0.55, 0.30)  # the separated feed (same material)
        to_concentrate = separate(rng, second["esd"], second["grade"])
        for stream, mask, k in (("concentrate", to_concentrate, 2), ("tailings", ~to_concentrate, 3)):
            esd, grade = second["esd"][mask], second["grade"][mask]
            store(home, f"{tag}-{stream[:4]}", stream, campaign, esd, grade, seed + 10 * index + k,
                  mass_g=_mass_g(esd, grade) if with_mass else None, acquired_at=day + timedelta(hours=k))  # fmt: skip
        day += timedelta(days=30)
    survey = _population(rng, particles // 2, 0.30, 0.5, 0.25)
    store(home, "Q2-feed", "feed", "2026-Q2 survey", survey["esd"], survey["grade"], seed + 99, acquired_at=day)
    if with_volumes:
        store_explorer_sample(home, seed=seed + 7)
    return home


def _blob_volume(rng: np.random.Generator, shape=(64, 64, 64), count: int = 14):
    """A small scan: ellipsoidal particles (two phases) in epoxy; returns image, labels, grades."""
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint32)
    image = rng.normal(12000, 600, shape)
    grades = []
    label = 0
    for _ in range(count * 4):
        if label == count:
            break
        radii = rng.uniform(4, 9, 3)
        centre = rng.uniform(radii.max() - 2, np.array(shape) - radii.max() + 2)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii)) <= 1
        if not inside.any() or (labels[inside] > 0).any():
            continue
        label += 1
        labels[inside] = label
        # a sulphide inclusion in some particles: the voxels on one side of a plane through it
        share = rng.choice([0.0, 0.0, 0.3, 0.6, 1.0])
        cut = np.quantile(xx[inside], share) if 0 < share < 1 else (np.inf if share == 0 else -np.inf)
        sulphide = inside & (xx < cut)
        image[inside] = rng.normal(18000, 900, int(inside.sum()))
        image[sulphide] = rng.normal(42000, 1200, int(sulphide.sum()))
        grades.append(sulphide.sum() / inside.sum())
    return np.clip(image, 0, 65535).astype(np.uint16), labels, np.array(grades)


def store_explorer_sample(home: str | Path, sample_id: str = "Q4-scan", seed: int = 7) -> Path:
    """A small real scan with its labels in the ingest flow's archive layout, and its particle rows."""
    from ps3d_core.io.convert import convert_to_ome_zarr, write_labels_ome_zarr
    from ps3d_core.io.volumes import ArrayVolume

    home = catalog.resolve_home(home)
    rng = np.random.default_rng(seed)
    image, labels, grades = _blob_volume(rng)
    ids = np.arange(1, int(labels.max()) + 1)
    counts = np.bincount(labels.ravel(), minlength=len(ids) + 1)[1:]
    esd = np.cbrt(6 * counts * SPACING_MM**3 / np.pi)
    table = particle_table(sample_id, esd, grades, seed, run_id=f"run-{sample_id}", shape=labels.shape)
    # the geometry measured on the labels
    bbox0, bbox1, centroid = [], [], []
    for k in ids:
        where = np.argwhere(labels == k)
        bbox0.append(where.min(axis=0))
        bbox1.append(where.max(axis=0) + 1)
        centroid.append(where.mean(axis=0) * SPACING_MM)
    bbox0, bbox1, centroid = np.array(bbox0, np.int32), np.array(bbox1, np.int32), np.array(centroid)
    touches = (bbox0 == 0).any(axis=1) | (bbox1 == np.array(labels.shape)).any(axis=1)
    replace = {
        **{f"bbox_{ax}0": bbox0[:, i] for i, ax in enumerate("zyx")},
        **{f"bbox_{ax}1": bbox1[:, i] for i, ax in enumerate("zyx")},
        **{f"centroid_{ax}_mm": centroid[:, i] for i, ax in enumerate("zyx")},
        "touches_border": touches,
    }
    for name, value in replace.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(name), pa.array(value, table.schema.field(name).type))
    spacing = (SPACING_MM,) * 3
    convert_to_ome_zarr(ArrayVolume(image, "scan", spacing), home / SCANS_DIR / sample_id / ARCHIVED_IMAGE,
                        spacing_zyx_mm=spacing, check_disk_space=False)  # fmt: skip
    write_labels_ome_zarr(labels, home / SEGMENTATIONS_DIR / sample_id / LABELS_IMAGE, spacing)
    store(home, sample_id, "other", "2026-Q4 flotation", esd, grades, seed, table=table,
          acquired_at=datetime(2026, 10, 2, 9, 0))  # fmt: skip
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("home", type=Path, help="Platform home to write (created).")
    parser.add_argument("--particles", type=int, default=3000, help="Particles of a feed sample.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.home, particles=args.particles, seed=args.seed))


if __name__ == "__main__":
    main()
