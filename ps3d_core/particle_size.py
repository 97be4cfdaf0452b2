"""Estimate a scan's mean particle diameter from its image alone.

ParticleSeg3D resamples every scan so that its mean particle spans the
model's target size, so segmentation needs the approximate mean particle
diameter (``particle_size_mm`` of ``scan.json``). When a scan comes without
it, :func:`estimate_particle_size_mm` measures it on a bounded sample of the
image: the number-weighted mean of the particles' equivalent-sphere
diameters, which is what ``particle_size_mm`` means (and what the synthetic
generator's ``whole_particle_diameter.mean_mm`` reports).

Method
------
1. **Sample.** A central box of the volume is read slab by slab and
   block-averaged by an integer factor into a grid of at most
   :data:`SAMPLE_EDGE` voxels per axis; nothing larger than one slab of the
   scan (:data:`SLAB_BYTES`) and a few arrays of the grid's size is ever in
   memory. The factor is chosen so that the typical particle spans about
   :data:`TARGET_DIAMETER_VOXELS` grid voxels: a coarse first pass (grid
   edge :data:`COARSE_EDGE`, over at most :data:`COARSE_EXTENT_VOXELS` scan
   voxels per axis) estimates the size, a second pass measures it at that
   factor and is repeated once, finer, when it finds particles smaller than
   the coarse pass could see. A finer pass that finds far fewer particles
   per volume than the coarser one (:data:`MIN_COUNT_RATIO`) has lost a
   particle class in the noise, which block averaging had lowered; the next
   coarser factor is tried instead, up to the coarser pass itself. Small particles are thus measured at full
   resolution, large ones on a coarser grid, which averages the noise away,
   blurs inclusion grains of a few scan voxels below detection, spreads the
   sample over more particles and takes less time. The region outside the
   reconstruction circle, which CT software fills with one constant grey
   value, is recognised by that value and left out.
2. **Matrix level and noise.** The epoxy is the most frequent grey value:
   the mode of the smoothed grid's histogram; the noise is the half width at
   half maximum of that peak. A radial profile of the epoxy level (median of
   epoxy-like voxels per distance from the rotation axis, assumed at the
   centre of the slices) is subtracted: it removes cupping, beam hardening
   and ring artefacts, which are functions of that distance.
3. **Objects at half their own contrast.** A voxel belongs to an object
   when its smoothed value exceeds both the epoxy level plus
   :data:`DETECTION_SNR` noise deviations and the level halfway between the
   epoxy and the brightest value within :data:`LOCAL_MAX_RADIUS` voxels.
   Every particle is thus cut at half its own contrast, the iso-level of its
   true surface under a symmetric blur, whatever its material: dense grains
   do not swell by their blur halo and faint ones are not shrunk.
4. **One material class.** Many objects are not whole particles: dense
   inclusions of particles whose body is invisible (plastics, coal near the
   epoxy's attenuation), sugar spacer grains, pieces of faint particles. The
   objects' median contrasts cluster by material; the class holding the
   largest object volume (the peak of the volume-weighted histogram of log
   contrast) is kept, with objects from 0.6 to 1.7 times its contrast
   (:data:`CLASS_WINDOW`). Which material a particle is made of does not
   depend on its size, so one class is an unbiased sample of the sizes;
   weighting by volume picks particle bodies, not the small bright grains
   inclusions leave.
5. **Diameters.** Equivalent-sphere diameters from voxel counts. A particle
   cut by the sample box or the field of view is completed: its thickness
   (twice its largest inscribed radius, the cut face not counting as a
   surface) times the median ratio of diameter to thickness of the class's
   uncut particles. Cut pieces holding under :data:`SLIVER_FRACTION` of
   that completed volume (grazing caps, whose thickness says little about
   the particle) are left out, as are particles under
   :data:`MIN_DIAMETER_SCAN_VOXELS` scan voxels or
   :data:`MIN_DIAMETER_GRID_VOXELS` grid voxels, below which blurred
   inclusion grains and noise cannot be told from particles.
6. **Mean** of the kept diameters, converted to mm with the voxel size and
   the sampling factor.

Assumptions
-----------
Particles are brighter than the embedding (dark particles, bubbles and
voids are ignored); the epoxy is the most common grey value; at least one
material class is visible in the sample and its material is independent of
particle size; the rotation axis is at the centre of the slices; voxels are
near-isotropic (anisotropic spacing is handled through volumes and
distances in mm, but the smoothing is in voxels).

Known biases
------------
* Particles below the size cut (step 5) are not counted: when many
  particles are that small (a fine population, or a wide one measured on a
  coarse grid) the mean is overestimated. This is the worst case seen: fine
  particles (about 10 voxels) of several materials of very different
  attenuation in a noisy scan, where full resolution loses the weaker
  classes in the noise and the coarser grid that keeps them drops the
  smallest particles (+30 % to +100 %).
* Fragments that survive the filters (inclusion grains larger than the
  cut, pieces of textured particles that the half-contrast threshold breaks
  apart) pull the mean down; so do grazing cuts kept as particles.
* Touching particles of the same class that are not separated count as one
  larger particle.
* When sugar spacer grains (or another distractor brighter than the epoxy)
  hold more volume than any particle material, they are what is measured.
* The sample is the central part of the scan: a mount whose particles
  settled by size along z is measured where the sample lies.
* On a small volume holding few particles the sample is small: a scan with
  five visible particles gives a mean of five.

On the synthetic presets the estimate is within 25 % of the truth for most
scans; ``BENCHMARKS.md`` reports the errors per preset
(``bench/particle_size_accuracy.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import edt
import numpy as np
from scipy import ndimage

from ps3d_core.errors import ScanError
from ps3d_core.io.volumes import ArrayVolume, Volume

#: Edge (voxels) of the analysed grid of the second pass: at most 192^3 float32 voxels (28 MB).
SAMPLE_EDGE = 192
#: Edge (voxels) of the coarse first pass's grid.
COARSE_EDGE = 96
#: Scan voxels per axis the coarse pass covers at most (it reads about this many slices).
COARSE_EXTENT_VOXELS = 512
#: Grid voxels the typical particle should span in the second pass.
TARGET_DIAMETER_VOXELS = 14.0
#: Gaussian smoothing of the grid before anything is measured, grid voxels.
SMOOTHING_SIGMA_VOXELS = 1.0
#: Objects are at least this many noise standard deviations above the epoxy.
DETECTION_SNR = 5.0
#: Radius (grid voxels) of the cube over which the local maximum is taken.
LOCAL_MAX_RADIUS = 2
#: Objects of fewer grid voxels are noise.
MIN_OBJECT_VOXELS = 8
#: Particles below this equivalent diameter in scan voxels are not counted ...
MIN_DIAMETER_SCAN_VOXELS = 6.0
#: ... nor those below this one in grid voxels.
MIN_DIAMETER_GRID_VOXELS = 4.0
#: Kept objects have a median contrast within this range of the class contrast.
CLASS_WINDOW = (0.6, 1.7)
#: A finer sample finding under this share of a coarser one's particles per volume lost a particle class.
MIN_COUNT_RATIO = 0.25
#: Cut particles whose visible volume is below this fraction of the completed one are left out.
SLIVER_FRACTION = 0.3
#: Diameter / thickness ratio of a compact particle, used when a class has fewer than 3 uncut particles.
DEFAULT_SHAPE_RATIO = 1.3
#: Bytes of scan slices read at once (one slab).
SLAB_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Sample:
    """A block-averaged box of a scan.

    Attributes
    ----------
    grid : ndarray, shape (Z, Y, X), float32
        Mean grey value of each ``factor``^3 block of scan voxels.
    valid : ndarray, shape (Z, Y, X), bool
        Blocks holding no voxel of the outside-the-field-of-view value.
    saturated : ndarray, shape (Z, Y, X), bool
        Blocks holding a voxel at the integer dtype's maximum (clipped values).
    factor : int
        Scan voxels per grid voxel along each axis.
    axis_yx : (float, float)
        Rotation axis (centre of the scan's slices) in grid coordinates.
    """

    grid: np.ndarray
    valid: np.ndarray
    saturated: np.ndarray
    factor: int
    axis_yx: tuple[float, float]


def estimate_particle_size_mm(volume: Volume | np.ndarray, spacing_zyx_mm: Sequence[float] | float) -> float:
    """Approximate number-mean equivalent diameter of the scan's particles, in mm.

    Reads central boxes of the scan, one slab of about :data:`SLAB_BYTES` at
    a time: at most :data:`COARSE_EXTENT_VOXELS` slices for the coarse pass
    and :data:`SAMPLE_EDGE` times the sampling factor for each further pass.
    Deterministic. See the module notes for the method, its assumptions and
    biases.

    Parameters
    ----------
    volume : Volume or ndarray, shape (Z, Y, X)
        The scan (integer or float grey values; particles brighter than the
        embedding).
    spacing_zyx_mm : float or (float, float, float)
        Voxel size in mm.

    Returns
    -------
    float
        Mean particle diameter in mm.

    Raises
    ------
    ScanError
        No particles can be found (a uniform image, noise only, nothing
        brighter than the embedding), naming the image.
    ValueError
        ``spacing_zyx_mm`` is not 1 or 3 positive finite numbers.
    """
    if not isinstance(volume, Volume):
        array = np.asarray(volume)
        volume = ArrayVolume(array, "<array>", None)
    spacing = _spacing(spacing_zyx_mm)
    anisotropy = tuple(s / math.prod(spacing) ** (1 / 3) for s in spacing)
    outside = outside_value(volume)
    coarse_factor = max(1, math.ceil(min(max(volume.shape), COARSE_EXTENT_VOXELS) / COARSE_EDGE))

    def measure(factor: int, edge: int = SAMPLE_EDGE) -> tuple[Sample, np.ndarray]:
        sample = read_sample(volume, factor, edge, outside)
        return sample, particle_diameters(sample, anisotropy)

    def finest_consistent(factors: range, reference: tuple[Sample, np.ndarray]) -> tuple[Sample, np.ndarray]:
        """The first of ``factors`` whose sample keeps ``reference``'s particles, else ``reference``."""
        for factor in factors:
            measured = measure(factor)
            if not _lost_particles(*measured, *reference):
                return measured
        return reference

    coarse = None
    factor = 1
    if coarse_factor > 1:
        coarse = measure(coarse_factor, COARSE_EXTENT_VOXELS // coarse_factor)
        factor = _factor(coarse[1], coarse_factor)
    sample, diameters = measure(factor)
    if sample.grid.min() == sample.grid.max():
        raise ScanError(
            volume.path,
            f"is uniform (every sampled voxel is {sample.grid.flat[0]:g}): no particles to estimate the "
            "particle size from; set particle_size_mm in scan.json",
        )
    if coarse is not None and _lost_particles(sample, diameters, *coarse):
        sample, diameters = finest_consistent(range(factor + 1, coarse_factor + 1), coarse)
    finer = _factor(diameters, sample.factor)
    if finer < sample.factor:  # smaller particles than the coarse pass could see: measure them finer
        sample, diameters = finest_consistent(range(finer, sample.factor), (sample, diameters))
    if not len(diameters):
        raise ScanError(
            volume.path,
            "no particles found to estimate the particle size from (nothing brighter than the embedding "
            "stands out of the noise); set particle_size_mm in scan.json",
        )
    return float(diameters.mean() * sample.factor * math.prod(spacing) ** (1 / 3))


def _lost_particles(fine: Sample, fine_diameters: np.ndarray, coarse: Sample, coarse_diameters: np.ndarray) -> bool:
    """Whether the finer sample found far fewer particles per volume than the coarser one.

    Averaging blocks lowers the noise: a low-contrast particle class that
    stands out on the coarse grid can sink into the noise at full resolution,
    and the finer pass then measures a minor class (a few dense grains)
    instead. The finer sample is trusted only when it finds at least
    :data:`MIN_COUNT_RATIO` of the coarse sample's particle density.
    """
    fine_volume = fine.valid.sum() * fine.factor**3
    coarse_volume = coarse.valid.sum() * coarse.factor**3
    return len(fine_diameters) * coarse_volume < MIN_COUNT_RATIO * len(coarse_diameters) * fine_volume


def _factor(diameters: np.ndarray, factor: int) -> int:
    """Sampling factor that makes the mean of ``diameters`` (grid voxels at ``factor``) span the target; 1 if none."""
    if not len(diameters):
        return 1
    return max(1, round(diameters.mean() * factor / TARGET_DIAMETER_VOXELS))


def _spacing(spacing_zyx_mm: Sequence[float] | float) -> tuple[float, float, float]:
    values = np.asarray(spacing_zyx_mm, dtype=float)
    values = np.full(3, values) if values.ndim == 0 else values
    if values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"spacing_zyx_mm must be 1 or 3 positive finite mm values, got {spacing_zyx_mm!r}")
    return tuple(float(v) for v in values)


def outside_value(volume: Volume, slices: int = 3) -> float | None:
    """The constant grey value filling the outside of the reconstruction circle, or None.

    Looks at ``slices`` evenly spaced slices. The value is the most frequent
    one (the integer dtype's minimum and maximum, where noise clips, aside)
    when it holds at least 1 % of the voxels and five times more than any
    other value: real grey values of a noisy scan never repeat that often.
    """
    zs = np.linspace(0, volume.shape[0] - 1, slices + 2)[1:-1].round().astype(int)
    values = np.concatenate([volume.read(z, z + 1).ravel() for z in np.unique(zs)])
    unique, counts = np.unique(values, return_counts=True)
    if values.dtype.kind in "ui":
        info = np.iinfo(values.dtype)
        inside = (unique != info.min) & (unique != info.max)
        unique, counts = unique[inside], counts[inside]
    if len(counts) < 2:
        return None
    first, second = np.sort(counts)[::-1][:2]
    if first < 0.01 * values.size or first < 5 * second:
        return None
    return float(unique[counts.argmax()])


def central_box(shape: Sequence[int], factor: int, edge: int) -> tuple[tuple[int, int], ...]:
    """Per axis, the central (start, stop) of at most ``edge * factor`` scan voxels, a multiple of ``factor``."""
    box = []
    for n in shape:
        length = min(n, edge * factor) // factor * factor
        start = (n - length) // 2
        box.append((start, start + length))
    return tuple(box)


def read_sample(volume: Volume, factor: int, edge: int, outside: float | None) -> Sample:
    """Read the central box of ``volume`` block-averaged by ``factor`` into at most ``edge`` voxels per axis.

    Slabs of about :data:`SLAB_BYTES` (a multiple of ``factor`` slices) are
    read, cropped and averaged one at a time.
    """
    (z0, z1), (y0, y1), (x0, x1) = central_box(volume.shape, factor, edge)
    if z1 == z0 or y1 == y0 or x1 == x0:
        raise ScanError(volume.path, f"is too small ({volume.shape}) to estimate the particle size from")
    shape = ((z1 - z0) // factor, (y1 - y0) // factor, (x1 - x0) // factor)
    grid = np.empty(shape, np.float32)
    valid = np.ones(shape, bool)
    saturated = np.zeros(shape, bool)
    slice_bytes = volume.shape[1] * volume.shape[2] * volume.dtype.itemsize
    depth = max(1, SLAB_BYTES // (slice_bytes * factor)) * factor
    top = np.iinfo(volume.dtype).max if volume.dtype.kind in "ui" else None
    for z in range(z0, z1, depth):
        slab = volume.read(z, min(z + depth, z1))[:, y0:y1, x0:x1]
        k = slab.shape[0] // factor
        at = slice((z - z0) // factor, (z - z0) // factor + k)
        grid[at] = _block_mean(slab, factor)
        if outside is not None:
            valid[at] = ~_block_any(slab == outside, factor)
        if top is not None:
            saturated[at] = _block_any(slab == top, factor)
    axis_yx = tuple(((volume.shape[i] - 1) / 2 - start + 0.5) / factor - 0.5 for i, start in ((1, y0), (2, x0)))
    return Sample(grid, valid, saturated, factor, axis_yx)


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    z, y, x = (n // factor for n in array.shape)
    return array.reshape(z, factor, y, factor, x, factor)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array.astype(np.float32)
    return _blocks(array, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    return mask if factor == 1 else _blocks(mask, factor).any(axis=(1, 3, 5))


def matrix_level(values: np.ndarray) -> tuple[float, float]:
    """Epoxy grey level and noise standard deviation from a sample of voxel values.

    The level is the mode of a 1024-bin histogram (0.5 to 99.5 percentile,
    lightly smoothed); the noise is the narrower half width at half maximum
    of that peak / 1.1774 (a Gaussian's), at least one bin.
    """
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi > lo:
        return float(lo), 0.0
    counts, edges = np.histogram(values, bins=1024, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    smooth = ndimage.gaussian_filter1d(counts.astype(float), 3)
    peak = int(smooth.argmax())
    above = smooth > smooth[peak] / 2
    left = peak - np.argmin(above[peak::-1]) if not above[: peak + 1].all() else 0
    right = peak + np.argmin(above[peak:]) if not above[peak:].all() else len(smooth) - 1
    half_width = min(centres[peak] - centres[left], centres[right] - centres[peak])
    return float(centres[peak]), float(max(half_width / 1.1774, edges[1] - edges[0]))


def radial_profile(values: np.ndarray, radius_bins: np.ndarray, bins: int, min_count: int = 50) -> np.ndarray | None:
    """Median of ``values`` per radius bin, interpolated over bins with fewer than ``min_count`` values.

    None when fewer than two bins are populated.
    """
    counts = np.bincount(radius_bins, minlength=bins)
    medians = _label_quantiles(values, radius_bins, bins - 1, (0.5,))[0]
    populated = np.flatnonzero(counts >= min_count)
    if len(populated) < 2:
        return None
    return np.interp(np.arange(bins), populated, medians[populated])


def _label_quantiles(
    values: np.ndarray, labels: np.ndarray, n: int, quantiles: Sequence[float]
) -> list[np.ndarray]:
    """Per label 0..n, the given quantiles of ``values`` (NaN for empty labels)."""
    order = np.lexsort((values, labels))
    counts = np.bincount(labels, minlength=n + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ordered = values[order]
    filled = counts > 0
    out = []
    for q in quantiles:
        result = np.full(n + 1, np.nan)
        result[filled] = ordered[starts[filled] + np.minimum((q * counts[filled]).astype(np.int64), counts[filled] - 1)]
        out.append(result)
    return out


def flatten_background(sample: Sample, smooth: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Subtract the radial epoxy profile; returns the corrected grid, epoxy level and noise.

    Epoxy-like voxels (within 4 noise deviations of the global level) give
    the median per grid voxel of distance from the rotation axis.
    """
    usable = inner & ~ndimage.binary_dilation(sample.saturated, iterations=3)
    level, noise = matrix_level(smooth[usable])
    if noise == 0.0:
        return smooth, level, noise
    _, ny, nx = smooth.shape
    yy, xx = np.ogrid[0:ny, 0:nx]
    radius = np.rint(np.hypot(yy - sample.axis_yx[0], xx - sample.axis_yx[1])).astype(np.int64)
    epoxy = inner & (np.abs(smooth - level) < 4 * noise)
    epoxy[:, :, 1::2] = False  # every other column: the same profile, half the sorting
    profile = radial_profile(smooth[epoxy], np.broadcast_to(radius, smooth.shape)[epoxy], int(radius.max()) + 1)
    if profile is None:
        return smooth, level, noise
    flat = smooth - (profile[radius] - level).astype(np.float32)
    level, noise = matrix_level(flat[usable])
    return flat, level, noise


def particle_diameters(sample: Sample, anisotropy: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Equivalent diameters (grid voxels) of the particles of the sample's dominant class.

    ``anisotropy``: voxel size per axis relative to its geometric mean.
    Empty when no particle stands out. See the module notes, steps 2 to 5.
    """
    valid = sample.valid
    grid = sample.grid
    if not valid.all():
        grid = np.where(valid, grid, np.median(grid[valid]) if valid.any() else 0.0).astype(np.float32)
    smooth = ndimage.gaussian_filter(grid, SMOOTHING_SIGMA_VOXELS)
    inner = valid if valid.all() else ndimage.binary_erosion(valid, iterations=2, border_value=1)
    if not inner.any():
        return np.empty(0)
    smooth, level, noise = flatten_background(sample, smooth, inner)
    if noise == 0.0:
        return np.empty(0)
    labels, n = _objects(smooth, inner, level, noise)
    if n == 0:
        return np.empty(0)
    foreground = labels > 0
    counts = np.bincount(labels[foreground], minlength=n + 1)
    contrast = _label_quantiles(smooth[foreground] - level, labels[foreground].astype(np.int64), n, (0.5,))[0]
    candidate = (counts >= MIN_OBJECT_VOXELS) & (contrast > 0)
    candidate[0] = False
    if not candidate.any():
        return np.empty(0)
    class_contrast = dominant_contrast(contrast[candidate], counts[candidate].astype(float))
    low, high = (bound * class_contrast for bound in CLASS_WINDOW)
    members = candidate & (contrast >= low) & (contrast <= high)
    diameters = completed_diameters(labels, members, counts, inner, anisotropy)
    return diameters[diameters >= max(MIN_DIAMETER_SCAN_VOXELS / sample.factor, MIN_DIAMETER_GRID_VOXELS)]


def _objects(smooth: np.ndarray, inner: np.ndarray, level: float, noise: float) -> tuple[np.ndarray, int]:
    """6-connected objects above both the detection level and half their local maximum contrast."""
    local_max = ndimage.maximum_filter(smooth, size=2 * LOCAL_MAX_RADIUS + 1)
    threshold = np.maximum(level + DETECTION_SNR * noise, level + 0.5 * (local_max - level))
    del local_max
    mask = (smooth > threshold) & inner
    labels = cc3d.connected_components(mask, connectivity=6, out_dtype=np.uint32)
    return labels, int(labels.max())


def dominant_contrast(contrast: np.ndarray, volume: np.ndarray, bin_width: float = 0.05) -> float:
    """Contrast at the peak of the volume-weighted histogram of log contrast.

    The histogram has bins of ``bin_width`` in natural log and is smoothed
    with a Gaussian of 0.25 (a factor of 1.28) so that one material's spread
    forms one peak.
    """
    logs = np.log(contrast)
    lo = logs.min() - 0.5
    bins = int((logs.max() + 0.5 - lo) / bin_width) + 1
    counts, edges = np.histogram(logs, bins=bins, range=(lo, lo + bins * bin_width), weights=volume)
    smooth = ndimage.gaussian_filter1d(counts, 0.25 / bin_width, mode="constant")
    peak = int(smooth.argmax())
    return float(np.exp((edges[peak] + edges[peak + 1]) / 2))


def completed_diameters(
    labels: np.ndarray,
    members: np.ndarray,
    counts: np.ndarray,
    inner: np.ndarray,
    anisotropy: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Equivalent diameters (grid voxels) of the member objects, cut ones completed (module notes, step 5).

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), uint32
        Objects 1..N.
    members : ndarray, shape (N + 1,), bool
        Objects to measure.
    counts : ndarray, shape (N + 1,)
        Voxels per object.
    inner : ndarray, shape (Z, Y, X), bool
        The usable region: an object with a voxel on its edge is cut.
    anisotropy : (float, float, float)
        Voxel size per axis relative to its geometric mean.
    """
    edge = ~ndimage.binary_erosion(inner, iterations=1, border_value=0)
    cut = np.zeros(len(counts), bool)
    cut[np.unique(labels[edge])] = True
    diameter = (6.0 * counts / np.pi) ** (1 / 3)
    thickness = np.zeros(len(counts))
    boxes = ndimage.find_objects(labels)
    for i in np.flatnonzero(members):
        box = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in boxes[i - 1])
        inside = labels[box] == i
        if cut[i]:  # the cut face (volume edge, field of view) is not the particle's surface
            distance = edt.edt(inside | ~inner[box], anisotropy=anisotropy, black_border=False)
        else:
            distance = edt.edt(inside, anisotropy=anisotropy, black_border=True)
        thickness[i] = 2.0 * distance[inside].max()
    uncut = members & ~cut
    ratio = float(np.median(diameter[uncut] / thickness[uncut])) if uncut.sum() >= 3 else DEFAULT_SHAPE_RATIO
    completed = np.where(cut, np.maximum(diameter, ratio * thickness), diameter)
    keep = members & (~cut | ((diameter / np.maximum(completed, 1e-9)) ** 3 > SLIVER_FRACTION))
    return completed[keep]
