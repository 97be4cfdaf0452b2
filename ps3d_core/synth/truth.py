"""Ground truth of a synthetic scan: instance labels, contacts and per-particle records."""

from __future__ import annotations

import cc3d
import numpy as np


def _face_pairs(labels: np.ndarray) -> np.ndarray:
    """Distinct label pairs (a < b, both > 0) that share at least one voxel face, shape (P, 2)."""
    pairs = []
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        differ = (lo != hi) & (lo > 0) & (hi > 0)
        if differ.any():
            x, y = lo[differ], hi[differ]
            pairs.append(np.stack([np.minimum(x, y), np.maximum(x, y)], axis=1))
    if not pairs:
        return np.empty((0, 2), labels.dtype)
    return np.unique(np.concatenate(pairs), axis=0)


def touching_count(labels: np.ndarray) -> int:
    """Number of particles whose label shares a 6-connected face with another label.

    Parameters
    ----------
    labels : ndarray, 3D, integer
        Instance labels, 0 = background.
    """
    return int(len(np.unique(_face_pairs(labels))))


def neighbours(labels: np.ndarray) -> dict[int, list[int]]:
    """Face-sharing neighbours of every touching label, sorted."""
    out: dict[int, list[int]] = {}
    for a, b in _face_pairs(labels).tolist():
        out.setdefault(a, []).append(b)
        out.setdefault(b, []).append(a)
    return {k: sorted(v) for k, v in sorted(out.items())}


def split_pieces(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give every 6-connected piece of every particle its own label.

    A cut by the volume border or the field of view can leave a particle in
    several pieces; each becomes a label of its own, numbered in raster order.

    Parameters
    ----------
    owner : ndarray, shape (Z, Y, X), int
        Particle index + 1 per voxel, 0 elsewhere.

    Returns
    -------
    labels : ndarray, same shape, uint32
    source : ndarray, shape (N + 1,), int64
        ``source[label]`` is the owner value the piece came from (0 for 0).
    """
    labels = cc3d.connected_components(owner, connectivity=6, out_dtype=np.uint32)
    source = np.zeros(int(labels.max()) + 1, np.int64)
    source[labels.ravel()] = owner.ravel()
    return labels, source


def labels_on_faces(labels: np.ndarray) -> np.ndarray:
    """Labels with a voxel on any of the six faces of the volume."""
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    return np.unique(np.concatenate([f.ravel() for f in faces]))


def diameter_stats(diameters_vox: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """Number-mean and median of equivalent diameters, in voxels and mm."""
    if len(diameters_vox) == 0:
        return {"mean_voxels": 0.0, "median_voxels": 0.0, "mean_mm": 0.0, "median_mm": 0.0}
    mean, median = float(np.mean(diameters_vox)), float(np.median(diameters_vox))
    return {
        "mean_voxels": mean,
        "median_voxels": median,
        "mean_mm": mean * spacing_mm,
        "median_mm": median * spacing_mm,
    }


def equivalent_diameter(voxels: np.ndarray) -> np.ndarray:
    """Diameter (voxels) of the sphere with the given volume (voxels)."""
    return (6.0 * np.asarray(voxels, float) / np.pi) ** (1.0 / 3.0)
