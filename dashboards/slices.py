"""Orthogonal slices of one particle's crop, located through its stored bounding box.

The catalog stores each particle's bounding box (``bbox_*``, voxel indices of
the scan's grid) and centroid (mm), and each sample's voxel size, but no path
to the scan image or the labels. The ingest flow (``flows/ingest.py``) archives
them at fixed places under the home, which is where this module looks:

    <home>/scans/<sample_id>/image.ome.zarr
    <home>/segmentations/<sample_id>/labels.ome.zarr
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The ingest flow's archive layout (flows/ingest.py: SCANS_DIR, ARCHIVED_IMAGE, SEGMENTATIONS_DIR).
SCAN_IMAGE = ("scans", "image.ome.zarr")
LABELS_IMAGE = ("segmentations", "labels.ome.zarr")
OUTLINE_RGB = (255, 40, 40)


@dataclass(frozen=True)
class Located:
    image: Path
    labels: Path
    image_found: bool
    labels_found: bool


def locate(home: Path, sample_id: str) -> Located:
    image = home / SCAN_IMAGE[0] / sample_id / SCAN_IMAGE[1]
    labels = home / LABELS_IMAGE[0] / sample_id / LABELS_IMAGE[1]
    return Located(image, labels, image.is_dir(), labels.is_dir())


def _crop_bounds(row: dict, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    bounds = []
    for i, axis in enumerate("zyx"):
        lo = max(int(row[f"bbox_{axis}0"]) - margin, 0)
        hi = min(int(row[f"bbox_{axis}1"]) + margin, shape[i])
        if hi <= lo:
            raise ValueError(f"bounding box along {axis} ({row[f'bbox_{axis}0']}-{row[f'bbox_{axis}1']}) lies outside "
                             f"the volume of shape {shape}")  # fmt: skip
        bounds.append(slice(lo, hi))
    return tuple(bounds)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1]
    neighbours = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner & ~neighbours


def _to_rgb(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((grey.astype(np.float64) - low) / max(high - low, 1e-9), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=2)


def particle_slices(
    home: Path, row: dict, spacing_zyx_mm: tuple[float, float, float], margin: int = 4, upscale_to: int = 240
) -> dict[str, np.ndarray]:
    """RGB slices {"z (axial)": ..., "y (coronal)": ..., "x (sagittal)": ...} through the particle's centroid,
    of its bounding box plus ``margin`` voxels, with the particle's label outline in red.

    Raises FileNotFoundError when the scan image or labels are not in the home.
    """
    from ps3d_core.io.ngff import open_ome_zarr

    where = locate(home, str(row["sample_id"]))
    if not where.labels_found:
        raise FileNotFoundError(where.labels)
    labels, _, _ = open_ome_zarr(where.labels)
    bounds = _crop_bounds(row, labels.shape, margin)
    label_crop = np.asarray(labels[bounds]) == int(row["particle_id"])
    image_crop = None
    if where.image_found:
        image, _, _ = open_ome_zarr(where.image)
        if image.shape != labels.shape:
            raise ValueError(f"scan {image.shape} and labels {labels.shape} differ in shape")
        image_crop = np.asarray(image[bounds]).astype(np.float64)
    centre = []
    for i, axis in enumerate("zyx"):
        index = row.get(f"centroid_{axis}_mm")
        voxel = int(round(index / spacing_zyx_mm[i])) if index is not None and spacing_zyx_mm[i] else None
        if voxel is None:
            voxel = (int(row[f"bbox_{axis}0"]) + int(row[f"bbox_{axis}1"])) // 2
        centre.append(min(max(voxel - bounds[i].start, 0), label_crop.shape[i] - 1))
    if image_crop is not None:
        low, high = np.percentile(image_crop, [1, 99.5])
    out = {}
    for axis, name in enumerate(("z (axial)", "y (coronal)", "x (sagittal)")):
        take = [slice(None)] * 3
        take[axis] = centre[axis]
        mask = label_crop[tuple(take)]
        if image_crop is not None:
            rgb = _to_rgb(image_crop[tuple(take)], low, high)
        else:
            rgb = np.where(mask[..., None], 170, 40).astype(np.uint8).repeat(3, axis=2)
        rgb[_outline(mask)] = OUTLINE_RGB
        factor = max(1, upscale_to // max(rgb.shape[:2]))
        out[name] = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    return out
