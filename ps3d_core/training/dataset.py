"""Training data: scans plus instance labels -> an nnU-Net v2 raw dataset of border-core targets.

Each case is prepared as the inference pipeline sees its input (paper
section 3.2.1): intensities normalised with the model's method
(:mod:`ps3d_core.intensity`), the scan resampled (trilinear) so that its mean
particle measures ``target_particle_size`` voxels, the instance labels
resampled the same way (nearest) and turned into border-core targets
(:func:`ps3d_core.bordercore.instances_to_border_core`). Large cases are cut
into crops, because nnU-Net's TIFF reader loads a whole case as float32.

Layout written (``Tiff3DIO`` reads the spacing sidecars; the data are
already resampled, so every spacing is 1)::

    RAW/DatasetNNN_Name/dataset.json
    RAW/DatasetNNN_Name/imagesTr/<case>_0000.tif  + <case>.json
    RAW/DatasetNNN_Name/labelsTr/<case>.tif       + <case>.json
    RAW/DatasetNNN_Name/cases.json                 where every crop came from
    RAW/DatasetNNN_Name/particle_bank.npz          particles for the touching augmentation
    RAW/DatasetNNN_Name/splits_final.json          train/validation split by scan
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import fastremap
import numpy as np

from ps3d_core.bordercore import instances_to_border_core
from ps3d_core.errors import ScanError
from ps3d_core.inference.geometry import resample_linear, resample_nearest, target_shape, zoom_factors
from ps3d_core.intensity import normalize, sample_voxels
from ps3d_core.io import open_scan, read_image, write_tiff
from ps3d_core.io.atomic import write_text_atomic
from ps3d_core.models import IntensityNormalization, make_dataset_json

IMAGE_SUFFIXES = (".tif", ".tiff", ".zarr", ".nii", ".nii.gz")
#: Crops larger than this edge (target-grid voxels) are cut (Tiff3DIO loads whole cases).
MAX_CROP_EDGE = 192
#: At most this edge (target-grid voxels) of each scan is used: a central region of bigger scans.
MAX_CASE_EDGE = 288
#: Particles kept per case in the touching-augmentation bank, and their size limits (voxels).
BANK_PER_CASE = 150
BANK_MIN_VOXELS = 200
BANK_MAX_EDGE = 96


@dataclass(frozen=True)
class TrainingCase:
    """One annotated scan: its directory and its instance label image (same shape)."""

    scan_dir: Path
    labels_path: Path


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model's grid.

    Attributes
    ----------
    image : ndarray (Z', Y', X') float32
        Normalised, resampled intensities.
    instances : ndarray (Z', Y', X') uint32
        Resampled instance labels.
    border_core : ndarray (Z', Y', X') uint8
        0 background, 1 core, 2 border.
    particle_size_mm : float
        Mean particle diameter used for the resampling.
    particle_size_source : str
        ``scan.json`` or ``labels`` (mean equivalent diameter of the labels).
    """

    image: np.ndarray
    instances: np.ndarray
    border_core: np.ndarray
    particle_size_mm: float
    particle_size_source: str


def find_labels(labels_dir: Path, sample_id: str, scan_name: str) -> Path:
    """The label image of a scan in ``labels_dir``: ``<id>_labels.*`` or ``<id>.*`` (id: sample_id or directory name)."""
    for stem in (sample_id, scan_name):
        for name in (f"{stem}_labels", stem):
            for suffix in IMAGE_SUFFIXES:
                candidate = labels_dir / f"{name}{suffix}"
                if candidate.exists():
                    return candidate
    raise ScanError(labels_dir, f"has no label image for scan {scan_name!r} (looked for {sample_id}_labels.tif, ...)")


def pair_scans_with_labels(scans_dir: str | os.PathLike[str], labels_dir: str | os.PathLike[str]) -> list[TrainingCase]:
    """Every scan directory of ``scans_dir`` (one holding ``scan.json``) with its label image.

    Raises
    ------
    ScanError
        No scan directory, or a scan without a label image.
    """
    scans_dir, labels_dir = Path(scans_dir), Path(labels_dir)
    if not scans_dir.is_dir():
        raise ScanError(scans_dir, "is not a directory")
    if not labels_dir.is_dir():
        raise ScanError(labels_dir, "is not a directory")
    cases = []
    for scan_dir in sorted(p for p in scans_dir.iterdir() if (p / "scan.json").is_file()):
        sample_id = json.loads((scan_dir / "scan.json").read_text(encoding="utf-8")).get("sample_id", scan_dir.name)
        cases.append(TrainingCase(scan_dir, find_labels(labels_dir, str(sample_id), scan_dir.name)))
    if not cases:
        raise ScanError(scans_dir, "holds no scan directory (a directory with scan.json)")
    return cases


def mean_equivalent_diameter_voxels(labels: np.ndarray) -> float:
    """Number-weighted mean equivalent sphere diameter ``(6 V / pi)^(1/3)`` of the particles, in voxels."""
    ids, counts = fastremap.unique(labels, return_counts=True)
    counts = counts[ids != 0]
    if counts.size == 0:
        raise ValueError("the label image holds no particle")
    return float(np.mean(np.cbrt(6.0 * counts / math.pi)))


def zscore_statistics(images: Sequence[np.ndarray]) -> tuple[float, float]:
    """Global ``(mean, std)`` of the training images (paper Eq. 1), from the same sample of each."""
    values = np.concatenate([sample_voxels(image).astype(np.float64) for image in images])
    return float(values.mean()), float(values.std())


def prepare_case(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    particle_size_mm: float,
    levels: tuple[float, float],
    target_particle_size: float,
    border_thickness: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, instances, border_core)`` of one scan on the model's grid.

    Parameters
    ----------
    image : ndarray (Z, Y, X)
        Raw intensities.
    labels : ndarray (Z, Y, X)
        Instance labels, 0 background.
    spacing_zyx_mm : (float, float, float)
    particle_size_mm : float
        Mean particle diameter (mm).
    levels : (offset, scale)
        Intensity normalisation (:meth:`ps3d_core.models.IntensityNormalization.levels`).
    target_particle_size : float
        Mean particle diameter on the model's grid (voxels).
    """
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    factors = zoom_factors(spacing_zyx_mm, particle_size_mm, target_particle_size)
    shape = target_shape(image.shape, factors)
    normalised = normalize(image, *levels)
    resampled = resample_linear(normalised, (0, 0, 0), image.shape, shape, tuple(slice(0, n) for n in shape))
    instances = resample_nearest(np.asarray(labels, dtype=np.uint32), shape)
    return resampled, instances, instances_to_border_core(instances, border_thickness)


def crop_boxes(shape: Sequence[int], max_edge: int = MAX_CROP_EDGE) -> list[tuple[slice, slice, slice]]:
    """Boxes that tile ``shape`` with edges of at most ``max_edge`` (as equal as possible per axis)."""
    axes = []
    for n in shape:
        parts = max(1, math.ceil(n / max_edge))
        edges = np.linspace(0, n, parts + 1).round().astype(int)
        axes.append([slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])])
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def bank_particles(
    image: np.ndarray, instances: np.ndarray, rng: np.random.Generator, limit: int = BANK_PER_CASE
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole particles of a prepared case for the touching augmentation: ``[(image float16, mask bool), ...]``.

    Particles that touch the volume's faces (cut, so not whole), smaller than
    :data:`BANK_MIN_VOXELS` or wider than :data:`BANK_MAX_EDGE` are skipped;
    at most ``limit`` are drawn at random. Crops are the particle's bounding
    box; the mask marks its voxels.
    """
    stats = cc3d.statistics(instances, no_slice_conversion=False)
    boxes, counts = stats["bounding_boxes"], stats["voxel_counts"]
    candidates = []
    for label in range(1, len(counts)):
        box = boxes[label]
        if box is None or counts[label] < BANK_MIN_VOXELS:
            continue
        edges = [s.stop - s.start for s in box]
        touches = any(s.start == 0 or s.stop == n for s, n in zip(box, instances.shape))
        if not touches and max(edges) <= BANK_MAX_EDGE:
            candidates.append(label)
    chosen = rng.permutation(candidates)[:limit]
    return [
        (image[boxes[label]].astype(np.float16), instances[boxes[label]] == label) for label in sorted(chosen.tolist())
    ]


def save_particle_bank(path: Path, particles: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Store particles as flat arrays plus shapes (one ``.npz``; loaded by the augmentation)."""
    shapes = np.array([m.shape for _, m in particles], dtype=np.int32).reshape(-1, 3)
    images = np.concatenate([i.ravel() for i, _ in particles]) if particles else np.zeros(0, np.float16)
    masks = np.concatenate([m.ravel() for _, m in particles]) if particles else np.zeros(0, bool)
    with open(path, "wb") as handle:
        np.savez(handle, shapes=shapes, images=images, masks=masks)


def load_particle_bank(path: str | os.PathLike[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The particles saved by :func:`save_particle_bank`: ``[(image float32, mask bool), ...]``."""
    with np.load(path) as data:
        shapes, images, masks = data["shapes"], data["images"], data["masks"]
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    starts = np.concatenate([[0], ends[:-1]]).astype(int)
    return [
        (images[a:b].astype(np.float32).reshape(s), masks[a:b].reshape(s))
        for a, b, s in zip(starts, ends, map(tuple, shapes))
    ]


def split_cases(scan_names: Sequence[str], crops_by_scan: dict[str, list[str]], val_fraction: float = 0.15) -> dict:
    """One nnU-Net split that keeps all crops of a scan on the same side.

    A fraction ``val_fraction`` of the scans (at least one) validates when there
    are at least 2 scans; with a single scan it is used for both (nnU-Net
    needs a validation set; the figures then measure fit, not generalisation).
    """
    names = sorted(scan_names)
    if len(names) < 2:
        crops = [c for n in names for c in crops_by_scan[n]]
        return {"train": crops, "val": crops}
    n_val = max(1, round(val_fraction * len(names)))
    val_scans = set(names[:: max(1, len(names) // n_val)][:n_val])
    return {
        "train": [c for n in names if n not in val_scans for c in crops_by_scan[n]],
        "val": [c for n in names if n in val_scans for c in crops_by_scan[n]],
    }


def training_regions(
    source_shape: Sequence[int], factors: Sequence[float], rng: np.random.Generator, max_edge: int = MAX_CASE_EDGE
) -> list[tuple[slice, slice, slice]]:
    """Source-grid boxes of a scan whose model-grid edge is at most ``max_edge`` per axis.

    A scan that fits is one box, the whole scan. Scans of fine particles are
    upsampled several-fold on the model grid, and a bounded region keeps
    memory and preprocessing in check while holding thousands of particles;
    such a scan gives two boxes: the central one, and one in a corner of the
    slice plane (which corner, and the box's height, drawn from ``rng``). The
    corner box holds what every scan has away from its centre and a central
    crop never shows: the rim of the reconstructed field of view, the blank
    outside of it and the mount's edge. A model that never saw them takes
    them for particles.
    """
    edges = [min(int(n), max(1, int(max_edge / f))) for n, f in zip(source_shape, factors)]
    central = tuple(slice((int(n) - e) // 2, (int(n) - e) // 2 + e) for n, e in zip(source_shape, edges))
    if all(e == int(n) for n, e in zip(source_shape, edges)):
        return [central]
    nz = int(source_shape[0])
    z0 = int(rng.integers(0, nz - edges[0] + 1))
    corner = [slice(z0, z0 + edges[0])]
    for n, e in zip(source_shape[1:], edges[1:]):
        start = 0 if rng.random() < 0.5 else int(n) - e
        corner.append(slice(start, start + e))
    return [central, tuple(corner)]


def case_particle_size(scan_meta, labels: np.ndarray, spacing_zyx_mm: Sequence[float]) -> tuple[float, str]:
    """Mean particle diameter (mm): ``scan.json``'s ``particle_size_mm``, else the labels' mean equivalent diameter."""
    if scan_meta is not None and scan_meta.particle_size_mm is not None:
        return float(scan_meta.particle_size_mm), "scan.json"
    voxel_mm = float(np.cbrt(np.prod(spacing_zyx_mm)))
    return mean_equivalent_diameter_voxels(labels) * voxel_mm, "labels"


def write_raw_dataset(
    cases: Sequence[TrainingCase],
    dataset_dir: str | os.PathLike[str],
    normalization: IntensityNormalization,
    *,
    target_particle_size: float,
    border_thickness: int = 3,
    max_crop_edge: int = MAX_CROP_EDGE,
    seed: int = 0,
) -> dict:
    """Write the nnU-Net raw dataset of ``cases`` into ``dataset_dir``; returns its ``cases.json`` summary.

    ``normalization`` must be complete (for ``zscore``: the training set's
    statistics, :func:`zscore_statistics`). Every case is read whole (one at a
    time): crop huge scans to training regions first.

    Raises
    ------
    ScanError
        A scan that cannot be read, labels of another shape than the image,
        labels without particles.
    """
    dataset_dir = Path(dataset_dir)
    (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    summary, crops_by_scan, bank = [], {}, []
    for index, case in enumerate(cases):
        scan = open_scan(case.scan_dir)
        labels = read_image(case.labels_path)
        with scan.volume as volume:
            if labels.shape != volume.shape:
                raise ScanError(
                    case.labels_path, f"has shape {labels.shape}, its scan {case.scan_dir} has {volume.shape}"
                )
            spacing = scan.metadata.spacing_zyx_mm
            try:
                size_mm, size_source = case_particle_size(scan.metadata, labels, spacing)
            except ValueError as error:
                raise ScanError(case.labels_path, str(error)) from None
            levels = normalization.levels(volume)
            factors = zoom_factors(spacing, size_mm, target_particle_size)
            regions = [
                (region, volume.read(region[0].start, region[0].stop)[:, region[1], region[2]])
                for region in training_regions(volume.shape, factors, rng)
            ]
        scan_name = f"{index:03d}_{scan.metadata.sample_id}"
        crops_by_scan[scan_name] = []
        prepared = []
        for region, image in regions:
            resampled, instances, border_core = prepare_case(
                image, labels[region], spacing, size_mm, levels, target_particle_size, border_thickness
            )
            bank.extend(bank_particles(resampled, instances, rng))
            crops = []
            # crops without particles are kept: blank epoxy and the outside of the field of view are negatives
            for box in crop_boxes(resampled.shape, max_crop_edge):
                name = f"case_{index:03d}_{len(crops_by_scan[scan_name]):02d}"
                write_tiff(dataset_dir / "imagesTr" / f"{name}_0000.tif", resampled[box], (1.0, 1.0, 1.0))
                write_tiff(dataset_dir / "labelsTr" / f"{name}.tif", border_core[box], (1.0, 1.0, 1.0))
                for folder in ("imagesTr", "labelsTr"):
                    write_text_atomic(dataset_dir / folder / f"{name}.json", json.dumps({"spacing": [1.0, 1.0, 1.0]}))
                crops_by_scan[scan_name].append(name)
                crops.append(name)
            prepared.append(
                {
                    "region": [[r.start, r.stop] for r in region],
                    "target_shape": list(resampled.shape),
                    "particles": len(fastremap.unique(instances)) - int(instances.min() == 0),
                    "crops": crops,
                }
            )
        del regions, labels
        summary.append(
            {
                "scan": str(case.scan_dir),
                "labels": str(case.labels_path),
                "sample_id": scan.metadata.sample_id,
                "spacing_zyx_mm": list(spacing),
                "particle_size_mm": size_mm,
                "particle_size_source": size_source,
                "normalization_levels": list(levels),
                "regions": prepared,
            }
        )
    n_crops = sum(len(c) for c in crops_by_scan.values())
    dataset_json = make_dataset_json(n_crops)
    write_text_atomic(dataset_dir / "dataset.json", json.dumps(dataset_json, indent=1))
    save_particle_bank(dataset_dir / "particle_bank.npz", bank)
    split = split_cases(list(crops_by_scan), crops_by_scan)
    write_text_atomic(dataset_dir / "splits_final.json", json.dumps([split], indent=1))
    info = {
        "cases": summary,
        "crops": n_crops,
        "bank_particles": len(bank),
        "normalization": normalization.model_dump(mode="json"),
        "target_particle_size_voxels": target_particle_size,
        "border_thickness": border_thickness,
    }
    write_text_atomic(dataset_dir / "cases.json", json.dumps(info, indent=1))
    return info
