"""Phases found from the grey-value histogram of the particle voxels, when ``scan.json`` names none.

Method
------
1. **Sample.** :data:`SAMPLE_SLABS` slabs evenly spread over z, of at most
   :data:`SAMPLE_VOXELS` voxels together, are read (for zarr volumes,
   slabs start on chunk boundaries and fewer of them are read, so that at
   most :data:`SAMPLE_DECODED_VOXELS` voxels are decoded); the grey values
   of their particle voxels (label > 0) are the sample. When that holds fewer
   than :data:`MIN_SAMPLE` values (particles lie elsewhere), every slab is
   read until it does, so the sample is bounded either way.
2. **Number of phases.** A :data:`HISTOGRAM_BINS`-bin histogram of the
   sample between its 0.1 and 99.9 percentiles is smoothed by a Gaussian
   of :data:`SMOOTHING_BINS` bins on the square root of the counts (where
   counting noise is the same for every bin); its peaks
   (``scipy.signal.find_peaks``) whose prominence exceeds both
   :data:`PEAK_PROMINENCE` of the highest peak and :data:`NOISE_SIGMAS`
   noise deviations are counted, at most :data:`MAX_AUTO_PHASES`. Partial-volume voxels at
   particle surfaces form shoulders, not peaks, so they do not add phases.
3. **Thresholds.** Multi-Otsu (``skimage.filters.threshold_multiotsu``) on
   that histogram with one class per peak; one peak gives one phase.
4. **Ranges.** Phases are named ``auto1``, ``auto2``, ... in increasing
   grey level; the ranges ``[low, high)`` meet at the thresholds and cover
   the whole grey-value axis of the image's dtype, so every particle voxel
   is in exactly one phase and the fractions of a particle sum to 1.

A threshold from a histogram is a simple phase model: voxels blurred
across an interface (partial volume) go to whichever phase their grey value
falls in, so thin rims and small inclusions are misassigned.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal
from skimage.filters import threshold_multiotsu

from ps3d_core.io.volumes import Volume

#: Most phases found automatically.
MAX_AUTO_PHASES = 4
#: Slabs read for the sample.
SAMPLE_SLABS = 8
#: Voxels (labels and image) read for the sample, at most.
SAMPLE_VOXELS = 32 * 2**20
#: Voxels decoded for the sample at most, for chunked (zarr) volumes whose reads decode whole chunks.
SAMPLE_DECODED_VOXELS = 256 * 2**20
#: Particle voxels below which more slabs are read.
MIN_SAMPLE = 10_000
HISTOGRAM_BINS = 256
SMOOTHING_BINS = 2.0
#: A peak counts when its prominence (square root of counts) is at least this fraction of the highest peak ...
PEAK_PROMINENCE = 0.05
#: ... and this many standard deviations of the smoothed counting noise.
NOISE_SIGMAS = 5.0


def sample_particle_values(labels: Volume, image: Volume) -> tuple[np.ndarray, str]:
    """Grey values of particle voxels from a bounded sample of slabs (module notes, step 1).

    Returns
    -------
    values : ndarray, shape (n,), the image's dtype
    description : str
        What was read, for the method record.
    """
    depth_total, ny, nx = labels.shape
    slice_voxels = ny * nx
    align = max(int(labels.chunk_depth), int(image.chunk_depth))
    slabs = SAMPLE_SLABS
    if align > 1:
        # a read decodes whole chunks: bound the voxels decoded, and start slabs on chunk boundaries
        slabs = max(1, min(SAMPLE_SLABS, SAMPLE_DECODED_VOXELS // (align * slice_voxels)))
    depth = max(1, min(depth_total // slabs, SAMPLE_VOXELS // (slabs * slice_voxels)))
    if align > 1:
        depth = min(depth, align)
    if align > 1:
        chunk_count = -(-depth_total // align)
        starts = np.unique(np.linspace(0, chunk_count - 1, slabs).round().astype(int)) * align
    else:
        starts = np.unique(np.linspace(0, depth_total - depth, slabs).round().astype(int))
    chunks, slices = [], 0
    for z in starts:
        z1 = min(int(z) + depth, depth_total)
        chunks.append(_particle_values(labels, image, int(z), z1))
        slices += z1 - int(z)
    values = np.concatenate(chunks)
    if len(values) < MIN_SAMPLE and slices < depth_total:
        # particles lie elsewhere: read on, slab after slab, until the sample is large enough
        chunks, slices = [], 0
        for z in range(0, depth_total, max(depth, align)):
            z1 = min(z + max(depth, align), depth_total)
            chunks.append(_particle_values(labels, image, z, z1))
            slices += z1 - z
            if sum(len(c) for c in chunks) >= MIN_SAMPLE:
                break
        values = np.concatenate(chunks)
    return values, f"{len(values)} particle voxels from {slices} of {depth_total} slices"


def _particle_values(labels: Volume, image: Volume, z0: int, z1: int) -> np.ndarray:
    return image.read(z0, z1)[labels.read(z0, z1) != 0]


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The half-open grey-value range ``[low, high)`` holding every value of ``dtype``.

    Integers: ``[min, max + 1)``. Floats: ``[-max, max)`` of the dtype (the
    largest finite value itself is left out; ``scan.json`` ranges must be
    finite).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max) + 1.0
    top = float(np.finfo(dtype).max)
    return -top, top


def auto_phases(values: np.ndarray, dtype: np.dtype) -> tuple[dict[str, tuple[float, float]], str]:
    """Phases from a sample of particle grey values (module notes, steps 2 to 4).

    Parameters
    ----------
    values : ndarray, shape (n,)
        Grey values of particle voxels.
    dtype : numpy dtype
        The image's dtype: the outer ranges reach its limits.

    Returns
    -------
    phases : dict
        ``{"auto1": (low, high), ...}`` in increasing grey level; empty when
        ``values`` is empty.
    method : str
        How they were found, for the record.
    """
    low, high = dtype_range(dtype)
    if not len(values):
        return {}, "no particle voxels: no phases"
    lo, hi = (float(v) for v in np.percentile(values, [0.1, 99.9]))
    if not hi > lo:
        return {"auto1": (low, high)}, f"one grey value ({lo:g}) in the particles: one phase"
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    # On the square root of the counts Poisson noise has a standard deviation of 1/2 whatever
    # the count, so one noise floor serves every peak, and a minor phase (a few % of the
    # voxels) still stands out; a monotone transform keeps peaks and valleys where they are.
    smooth = ndimage.gaussian_filter1d(np.sqrt(counts), SMOOTHING_BINS, mode="constant")
    noise = 0.5 / math.sqrt(2.0 * math.sqrt(math.pi) * SMOOTHING_BINS)  # after the smoothing
    # zero ends so that a peak at the edge of the range (a saturated phase) counts
    padded = np.concatenate([[0.0], smooth, [0.0]])
    peaks, _ = signal.find_peaks(padded, prominence=max(PEAK_PROMINENCE * smooth.max(), NOISE_SIGMAS * noise))
    classes = int(np.clip(len(peaks), 1, MAX_AUTO_PHASES))
    thresholds = (
        [float(t) for t in threshold_multiotsu(hist=(counts, centres), classes=classes)] if classes > 1 else []
    )
    cuts = [low, *thresholds, high]
    phases = {f"auto{k + 1}": (cuts[k], cuts[k + 1]) for k in range(classes)}
    method = (
        f"histogram of particle grey values ({HISTOGRAM_BINS} bins, {lo:g} to {hi:g}): {len(peaks)} peak(s) "
        f"(square-root counts, prominence >= {PEAK_PROMINENCE:.0%} of the highest and {NOISE_SIGMAS:g} noise "
        f"deviations) -> {classes} phase(s)"
        + (f", multi-Otsu thresholds {', '.join(f'{t:g}' for t in thresholds)}" if thresholds else "")
    )
    return phases, method
