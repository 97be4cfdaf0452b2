"""Grids of the inference: particle-size zoom, patch grid, Gaussian weights, resampling tables.

Two voxel grids take part (axes z, y, x):

* the **source grid**: the scan, shape ``S``, voxel size ``spacing`` (mm);
* the **target grid**: the scan resampled so that its mean particle is
  ``target_particle_size_voxels`` voxels across (paper section 3.2.1), the grid
  the network sees.

Zoom. A particle ``d`` mm across spans ``d / spacing`` source voxels; the
model wants ``D`` voxels, so each axis is scaled by
``f = D * spacing / d`` (target voxels per source voxel; ``f < 1`` shrinks
large particles). The target shape is ``T = max(1, round(S * f))``; the
realised zoom ``T / S`` differs from ``f`` by less than ``0.5 / S``.

Mapping. Both grids cover the same box: a voxel's centre ``i + 0.5`` of ``n``
voxels sits at ``(i + 0.5) / n`` of the box (pixel-centre convention, as
``torch.nn.functional.interpolate(align_corners=False)``). Hence

* source coordinate of target voxel ``t``: ``s = (t + 0.5) * S / T - 0.5``;
* the grid-``b`` voxel containing the centre of grid-``a`` voxel ``i``:
  ``floor((2 i + 1) * n_b / (2 n_a))``.

Both are computed with integer arithmetic from *global* indices, so any two
chunks of a volume compute the same weights for the voxels they share, bit for
bit, and a chunk-wise resampling equals the whole-volume one.

Interpolation into the target grid is trilinear, done as three 1-D linear
passes (z, then y, then x); separable linear interpolation is trilinear
interpolation. Coordinates outside ``[0, S - 1]`` are clamped (edge voxels
repeat). Labels go back to the source grid by nearest neighbour: each source
voxel takes the label of the target voxel containing its centre.

Patch grid. nnU-Net's rule (``compute_steps_for_sliding_window``): per axis
``n = ceil((T - P) / (step * P)) + 1`` patches, spread evenly from 0 to
``T - P`` and rounded, so the last patch is flush with the end. Each patch's
prediction is weighted with a Gaussian (sigma = patch / 8) centred in the
patch, as in nnU-Net.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import product

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "gaussian_weights",
    "linear_table",
    "nearest_index",
    "patch_grid",
    "patches_in_region",
    "resample_linear",
    "resample_linear_streamed",
    "resample_nearest",
    "sliding_window_starts",
    "source_box",
    "target_shape",
    "zoom_factors",
]


# --------------------------------------------------------------------------
# zoom
# --------------------------------------------------------------------------


def zoom_factors(
    spacing_zyx_mm: Sequence[float], particle_size_mm: float, target_particle_size_voxels: float
) -> tuple[float, float, float]:
    """Target voxels per source voxel along z, y, x: ``target * spacing / particle_size``."""
    if not (particle_size_mm > 0 and math.isfinite(particle_size_mm)):
        raise ValueError(f"particle size must be a positive number of mm, got {particle_size_mm!r}")
    return tuple(float(target_particle_size_voxels) * float(s) / float(particle_size_mm) for s in spacing_zyx_mm)


def target_shape(source_shape: Sequence[int], factors: Sequence[float]) -> tuple[int, int, int]:
    """``max(1, round(S * f))`` per axis."""
    return tuple(max(1, int(round(n * f))) for n, f in zip(source_shape, factors, strict=True))


# --------------------------------------------------------------------------
# resampling tables (global, exact)
# --------------------------------------------------------------------------


def linear_table(n_source: int, n_target: int, start: int = 0, stop: int | None = None):
    """Linear-interpolation table of target indices ``start <= t < stop``.

    Returns
    -------
    lo, hi : ndarray of int64
        Source indices of the two neighbours (``hi == lo`` at clamped edges).
    w : ndarray of float64
        Weight of ``hi``: value = ``(1 - w) * a[lo] + w * a[hi]``.
    """
    stop = n_target if stop is None else stop
    t = np.arange(start, stop, dtype=np.int64)
    num = (2 * t + 1) * n_source - n_target  # s = num / den
    den = 2 * n_target
    lo = np.clip(num // den, 0, n_source - 1)
    w = (num - lo * den) / den
    clamp_low = num <= 0
    clamp_high = lo >= n_source - 1
    w[clamp_low | clamp_high] = 0.0
    lo[clamp_low] = 0
    hi = np.minimum(lo + 1, n_source - 1)
    hi[clamp_low | clamp_high] = lo[clamp_low | clamp_high]
    return lo, hi, w


def nearest_index(n_from: int, n_to: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Index in the ``n_from`` grid of the voxel containing the centre of each ``n_to`` voxel ``start..stop-1``."""
    stop = n_to if stop is None else stop
    j = np.arange(start, stop, dtype=np.int64)
    return ((2 * j + 1) * n_from) // (2 * n_to)


def source_box(source_shape: Sequence[int], shape: Sequence[int], window: Sequence[slice]) -> tuple[slice, ...]:
    """Source voxels the linear interpolation of target ``window`` reads."""
    box = []
    for n_s, n_t, w in zip(source_shape, shape, window, strict=True):
        lo, hi, _ = linear_table(n_s, n_t, w.start, w.stop)
        box.append(slice(int(lo.min()), int(hi.max()) + 1))
    return tuple(box)


def _interp_axis(a: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    lower = np.take(a, lo, axis=axis)
    upper = np.take(a, hi, axis=axis)
    shape = [1] * a.ndim
    shape[axis] = w.size
    weight = w.astype(a.dtype).reshape(shape)
    upper -= lower
    upper *= weight
    lower += upper
    return lower


def resample_linear(
    block: np.ndarray,
    block_origin: Sequence[int],
    source_shape: Sequence[int],
    shape: Sequence[int],
    window: Sequence[slice],
) -> np.ndarray:
    """Trilinear values of target-grid ``window`` from a source ``block``.

    Parameters
    ----------
    block : ndarray, float32, 3D
        Source voxels starting at ``block_origin``; must contain
        :func:`source_box` of ``window``.
    block_origin : (int, int, int)
    source_shape, shape : (int, int, int)
        Whole source and target grid shapes (define the mapping).
    window : tuple of slice
        Target voxels to compute.

    Returns
    -------
    ndarray, float32, shape of ``window``
        Identical, bit for bit, wherever two calls' windows overlap.
    """
    out = block
    for axis, (n_s, n_t, w, o) in enumerate(zip(source_shape, shape, window, block_origin, strict=True)):
        lo, hi, wt = linear_table(n_s, n_t, w.start, w.stop)
        if n_s == n_t and o == w.start and out.shape[axis] == w.stop - w.start:
            continue  # identity along this axis
        out = _interp_axis(out, axis, lo - o, hi - o, wt)
    return np.ascontiguousarray(out, dtype=np.float32)


def resample_linear_streamed(
    read: Callable[[int, int], np.ndarray],
    box: Sequence[slice],
    source_shape: Sequence[int],
    shape: Sequence[int],
    window: Sequence[slice],
    depth: int = 16,
) -> np.ndarray:
    """:func:`resample_linear` of ``window`` reading the source ``box`` a few planes at a time.

    ``read(z0, z1)`` returns source planes ``z0 <= z < z1`` cropped to
    ``box[1:]`` as float32. Each target plane is interpolated along z from
    its two source planes, then along y and x, so memory holds ``depth``
    source planes of the box, not the box. The arithmetic is that of
    :func:`resample_linear` element for element: the results are identical.
    """
    lo, hi, wz = linear_table(source_shape[0], shape[0], window[0].start, window[0].stop)
    tables = [linear_table(n_s, n_t, w.start, w.stop) for n_s, n_t, w in zip(source_shape[1:], shape[1:], window[1:])]
    out = np.empty(tuple(w.stop - w.start for w in window), dtype=np.float32)
    slab, a = None, 0
    for i, (l, h, w) in enumerate(zip(lo, hi, wz)):
        if slab is None or l < a or h >= a + slab.shape[0]:
            a = int(l)
            slab = read(a, min(a + max(depth, 2), box[0].stop))
        plane = _interp_axis(slab, 0, np.array([l - a]), np.array([h - a]), np.array([w]))
        for axis, (ly, hy, wy), o in zip((1, 2), tables, (box[1].start, box[2].start)):
            plane = _interp_axis(plane, axis, ly - o, hy - o, wy)
        out[i] = plane[0]
    return out


def resample_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Whole-volume nearest resampling: each output voxel takes the input voxel containing its centre."""
    index = [nearest_index(n_in, n_out) for n_in, n_out in zip(labels.shape, shape, strict=True)]
    return labels[np.ix_(*index)]


# --------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------


def sliding_window_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """Patch start positions along one axis (nnU-Net's rule, see the module docstring)."""
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if size < patch:
        raise ValueError(f"size {size} is smaller than the patch {patch}")
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def patch_grid(shape: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Per-axis patch starts over a volume; the patches are their product, in C order."""
    return [sliding_window_starts(n, p, step) for n, p in zip(shape, patch, strict=True)]


def patches_in_region(starts: Sequence[Sequence[int]], patch: Sequence[int], region: Sequence[slice]):
    """Patches (start tuples, C order) of the global grid that intersect ``region``.

    Returns
    -------
    patches : list of (int, int, int)
    window : tuple of slice
        The union of those patches (the chunk plus up to one patch of margin).
    """
    axes = []
    for s, p, r in zip(starts, patch, region, strict=True):
        axes.append([int(x) for x in s if x < r.stop and x + p > r.start])
    window = tuple(slice(a[0], a[-1] + p) for a, p in zip(axes, patch))
    return list(product(*axes)), window


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    tmp = np.zeros(patch, dtype=np.float64)
    tmp[tuple(p // 2 for p in patch)] = 1.0
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0.0)
    g /= g.max()
    g = g.astype(np.float32)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    g.setflags(write=False)
    return g


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net's patch importance map: a Gaussian centred at ``patch // 2``, sigma ``patch * sigma_scale``.

    Normalised to a maximum of 1, float32, no zeros (as
    ``nnunetv2.inference.sliding_window_prediction.compute_gaussian``; the
    scale does not matter, predictions are normalised by the summed weights).
    Read-only and cached.
    """
    return _gaussian(tuple(int(p) for p in patch), float(sigma_scale))
