"""Intensity normalisation of scans, identical in training and inference.

Two methods, named in a model's ``ps3d_model.json``:

``zscore`` (paper Eq. 1)
    ``(I - mean) / std`` with the training set's global statistics. Exact
    for scans from the scanner and export settings the model was trained on,
    but a scan exported with another grey-value window (a different
    calibration, 8-bit vs 16-bit rescaling, another energy) lands far from
    the training range.

``quantile`` (this platform's default)
    ``(I - q_lo) / (q_hi - q_lo)`` with two quantiles of the scan itself,
    by default the median and the 99th percentile of its non-zero voxels.
    Particles in epoxy fill a minority of the volume, so the median is the
    embedding level and the 99th percentile lies among the particle
    intensities; every scan is mapped to "epoxy at 0, particles near 1",
    whatever its scanner and export window. Zero voxels are left out because
    many reconstructions write exact zeros outside the cylindrical field of
    view. The statistics come from a fixed, strided sample of the whole scan
    (:func:`sample_voxels`), computed once before any chunk is processed, so
    every chunk of a chunked run is normalised identically.
    ``bench/normalization_choice.py`` compares both on held-out scans whose
    grey values were re-windowed (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

#: Quantiles of the ``quantile`` method: (embedding level, particle level).
DEFAULT_QUANTILES = (0.5, 0.99)
#: Voxels read by :func:`sample_voxels` at most (16 MB of float32).
SAMPLE_VOXELS = 1 << 22


class Planes(Protocol):
    """What :func:`sample_voxels` reads: a ``(Z, Y, X)`` volume read plane range by plane range."""

    shape: tuple[int, int, int]

    def read(self, z0: int, z1: int) -> np.ndarray: ...


def sample_voxels(volume: Planes | np.ndarray, max_voxels: int = SAMPLE_VOXELS) -> np.ndarray:
    """A deterministic strided sample of the volume's voxels, shape ``(n,)``, ``n <= max_voxels``.

    Reads evenly spaced planes one at a time (at most 64) and takes every
    ``k``-th row and column of each, so memory stays bounded whatever the
    scan's size. ``volume`` is a :class:`~ps3d_core.io.volumes.Volume` or an
    array of shape ``(Z, Y, X)``.
    """
    nz, ny, nx = (int(n) for n in volume.shape)
    planes = np.unique(np.linspace(0, nz - 1, min(nz, 64)).round().astype(int))
    per_plane = max(1, max_voxels // len(planes))
    stride = max(1, math.ceil(math.sqrt(ny * nx / per_plane)))
    parts = []
    for z in planes:
        plane = volume[z : z + 1] if isinstance(volume, np.ndarray) else volume.read(int(z), int(z) + 1)
        parts.append(np.asarray(plane[0, ::stride, ::stride]).ravel())
    return np.concatenate(parts)


def quantile_levels(
    volume: Planes | np.ndarray, quantiles: tuple[float, float] = DEFAULT_QUANTILES
) -> tuple[float, float]:
    """``(offset, scale)`` of the ``quantile`` method: ``q_lo`` and ``q_hi - q_lo`` of the non-zero voxels.

    Raises
    ------
    ValueError
        The sample holds no non-zero voxel, or the two quantiles coincide
        (a flat image: nothing to segment).
    """
    values = sample_voxels(volume)
    values = values[values != 0].astype(np.float64)
    if values.size == 0:
        raise ValueError("every sampled voxel is zero: the image is empty")
    low, high = np.quantile(values, quantiles)
    if not high > low:
        raise ValueError(
            f"the image is flat: its {quantiles[0]:.0%} and {quantiles[1]:.0%} quantiles are both {low:g}"
        )
    return float(low), float(high - low)


def normalize(image: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """``(image - offset) / scale`` as float32 (a new array)."""
    out = image.astype(np.float32)
    out -= np.float32(offset)
    out /= np.float32(scale)
    return out
