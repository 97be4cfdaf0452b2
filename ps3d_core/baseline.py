"""ThreshWater: the classical threshold + watershed baseline of the paper (section 4.3.1).

Steps, as the paper describes them:

1. **Threshold** the image. The paper tunes it by hand per image; here it is
   given, or computed automatically: Otsu, or the lowest multi-Otsu
   threshold of three classes (our option, chosen or not by the tuning: with
   several particle phases two-class Otsu tends to split the densest phase
   from the rest). It is computed on a random subsample of the voxels,
   leaving out exact zeros, which CT reconstructions use for the region
   outside the cylindrical field of view.
2. **Hole filling** (our addition, common practice in the threshold
   pipelines the paper derives ThreshWater from): enclosed cavities smaller
   than a fraction of a particle's volume are filled.
3. **Morphological opening** with a ball, to remove the many small false
   positive detections of low-contrast scans.
4. **Seeds by erosion** of the opened mask with a ball; each connected
   component of the eroded mask is one seed.
5. **Marker-based watershed** of the negative Euclidean distance transform
   (EDT) of the opened mask (the scikit-image best practice the paper cites),
   restricted to the mask. Components of the mask that contain no seed
   (particles thinner than the erosion) are kept as one particle each rather
   than dropped.
6. **Small objects removed**, labels renumbered 1..N, uint32.

Ball erosions and dilations are computed exactly with EDTs (a voxel survives
an erosion by a ball of radius r iff its distance to the background is > r),
which costs the same for any radius, unlike structuring-element morphology.

Size-dependent parameters are relative to a *particle radius* R in voxels, so
one parameter set serves scans of any particle size. R is given or estimated
from the mask as ``4 * mean(EDT) - 1``: for a ball of radius R the mean of the
continuous EDT over its volume is R/4, and the ``- 1`` corrects the voxel
discretisation (within 0.4 voxel for digital balls of radius 5 to 30). For
non-spherical particles R is a thickness radius, the quantity that erosion
depends on. The estimate uses the mask after a radius-1 opening and closing
so that noise specks and noise holes do not bias it.

Default parameters are read from ``ps3d_core/data/threshwater_defaults.json``,
written by ``bench/tune_threshwater.py`` (grid search on synthetic training
scans only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cc3d
import edt
import fastremap
import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.segmentation import watershed

#: Tuned defaults, shipped as package data (written by bench/tune_threshwater.py).
DEFAULTS_PATH = Path(__file__).parent / "data" / "threshwater_defaults.json"


def load_defaults() -> dict:
    """The tuned default parameters (the ``"params"`` object of the JSON file)."""
    return json.loads(DEFAULTS_PATH.read_text(encoding="utf-8"))["params"]


_DEFAULTS = load_defaults()
THRESHOLD_METHODS = ("otsu", "multiotsu")
_OTSU_BINS = 256


@dataclass(frozen=True)
class ThreshWaterParams:
    """Parameters of :func:`threshwater`. Defaults come from the tuned JSON file.

    Attributes
    ----------
    threshold : float or None
        Intensity threshold in image units; ``None``: computed with
        ``threshold_method``.
    threshold_method : {"otsu", "multiotsu"}
        Automatic threshold when ``threshold`` is None: Otsu's two-class
        threshold, or the lowest of the three-class multi-Otsu thresholds
        (particles of several phases: Otsu then often separates the densest
        phase from everything else instead of particles from epoxy).
    particle_radius : float or None
        Typical particle radius in voxels; ``None``: estimated from the mask
        (see module notes).
    opening_rel : float
        Radius of the opening ball, as a fraction of the particle radius.
        Radii below 1 voxel mean no opening.
    erosion_rel : float
        Radius of the erosion ball that makes the seeds, as a fraction of the
        particle radius. Larger: fewer seeds, fewer splits, more mergers.
    min_size_rel : float
        Objects smaller than this fraction of the volume of a ball of the
        particle radius are removed (at least 1 voxel).
    max_hole_rel : float
        Enclosed cavities of the thresholded mask smaller than this fraction
        of the volume of a ball of the particle radius are filled before the
        opening (noise holes inside particles would otherwise break their
        seeds apart; the opening only enlarges them). 0: no filling.
    bright_particles : bool
        Particles are brighter than the embedding (the usual micro-CT case).
    ignore_zero : bool
        Leave voxels equal to 0 (outside the field of view) out of the
        automatic threshold and out of the mask.
    otsu_samples : int
        Number of voxels sampled (random, fixed seed) for the automatic threshold.
    threads : int
        Threads for the EDTs.
    """

    threshold: float | None = None
    threshold_method: str = str(_DEFAULTS.get("threshold_method", "otsu"))
    particle_radius: float | None = None
    opening_rel: float = float(_DEFAULTS["opening_rel"])
    erosion_rel: float = float(_DEFAULTS["erosion_rel"])
    min_size_rel: float = float(_DEFAULTS["min_size_rel"])
    max_hole_rel: float = float(_DEFAULTS.get("max_hole_rel", 0.0))
    bright_particles: bool = True
    ignore_zero: bool = True
    otsu_samples: int = 2_000_000
    threads: int = 2

    @classmethod
    def from_dict(cls, values: dict) -> ThreshWaterParams:
        """Parameters from a dict, ignoring unknown keys (e.g. the JSON file's notes)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        """JSON-ready parameters."""
        return asdict(self)

    def __post_init__(self) -> None:
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold_method must be one of {THRESHOLD_METHODS}, got {self.threshold_method!r}")


def _sample(image: np.ndarray, samples: int, ignore_zero: bool, seed: int) -> np.ndarray:
    """Up to ``samples`` voxel values drawn at random (fixed seed), zeros dropped if asked."""
    flat = image.reshape(-1)
    if flat.size > samples:
        # Random, not a regular stride, which could alias with the row length.
        index = np.sort(np.random.default_rng(seed).integers(0, flat.size, samples))
        flat = flat[index]
    if ignore_zero:
        flat = flat[flat != 0]
    return flat


def auto_threshold(
    image: np.ndarray, samples: int = 2_000_000, ignore_zero: bool = True, seed: int = 0, method: str = "otsu"
) -> float:
    """Automatic threshold of a (sub)sample of the voxels.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X), any real dtype
        CT intensities.
    samples : int
        At most this many voxels are drawn, uniformly at random with a fixed seed.
    ignore_zero : bool
        Drop voxels equal to 0 (outside the field of view of a cylindrical scan).
    seed : int
        Random seed of the subsample.
    method : {"otsu", "multiotsu"}
        Otsu's threshold, or the lowest of the three-class multi-Otsu thresholds.

    Returns
    -------
    float
        Threshold in image units; particles are ``image > threshold``.
    """
    flat = _sample(image, samples, ignore_zero, seed)
    if flat.size == 0 or flat.min() == flat.max():
        # Nothing to separate: a threshold at the (single) value selects nothing.
        return float(flat.max()) if flat.size else 0.0
    # A 256-bin histogram over the sample's range: skimage would otherwise use
    # one bin per integer value, and multi-Otsu is quadratic in the bins
    # (47 s instead of milliseconds on uint16 scans).
    counts, edges = np.histogram(flat, bins=_OTSU_BINS)
    hist = (counts, (edges[:-1] + edges[1:]) / 2)
    if method == "multiotsu":
        try:
            return float(threshold_multiotsu(classes=3, hist=hist)[0])
        except ValueError:  # fewer than three occupied bins
            pass
    return float(threshold_otsu(hist=hist))


def _edt(mask: np.ndarray, threads: int) -> np.ndarray:
    """EDT of a boolean mask (distance in voxels to the nearest False voxel), float32.

    The volume edge is not background (``black_border=False``): particles cut
    by the edge are not eroded from it. A mask with no False voxel has infinite
    distances; they are clamped to the volume diagonal.
    """
    dist = edt.edt(np.ascontiguousarray(mask), black_border=False, parallel=threads)
    if mask.all():
        dist = np.full(mask.shape, float(np.linalg.norm(mask.shape)), dtype=np.float32)
    return dist


def _open(mask: np.ndarray, dist: np.ndarray, radius: float, threads: int) -> np.ndarray:
    """Opening by a ball of ``radius`` voxels, given the EDT ``dist`` of ``mask``."""
    if radius < 1.0:
        return mask
    eroded = dist > radius
    if not eroded.any():
        return np.zeros_like(mask)
    return _edt(~eroded, threads) <= radius


def estimate_particle_radius(mask: np.ndarray, threads: int = 2) -> float:
    """Typical particle radius in voxels from a binary particle mask.

    Parameters
    ----------
    mask : ndarray, shape (Z, Y, X), bool
        Particle voxels.
    threads : int
        Threads for the EDTs.

    Returns
    -------
    float
        ``4 * mean(EDT over the mask) - 1`` (see module notes), at least 1.0;
        1.0 for an empty mask. The mask is first opened and closed with a
        radius-1 ball: noise specks (EDT 1) and one-voxel noise holes inside
        particles (which cut the EDT of the voxels around them) would
        otherwise halve the estimate on noisy scans.
    """
    cleaned = _open(mask, _edt(mask, threads), 1.0, threads)
    inverse = ~cleaned
    cleaned = ~_open(inverse, _edt(inverse, threads), 1.0, threads)  # closing, by duality
    del inverse
    if not cleaned.any():
        cleaned = mask
    if not cleaned.any():
        return 1.0
    dist = _edt(cleaned, threads)
    return max(1.0, 4.0 * float(dist[cleaned].mean()) - 1.0)


def fill_small_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """Fill enclosed cavities of fewer than ``max_size`` voxels.

    Parameters
    ----------
    mask : ndarray, shape (Z, Y, X), bool
        Particle voxels.
    max_size : int
        Background components (6-connected, the complement of the 26-connected
        foreground) smaller than this and not touching the volume edge are
        filled.

    Returns
    -------
    ndarray, shape (Z, Y, X), bool
        A new mask.
    """
    background = cc3d.connected_components(~mask, connectivity=6, out_dtype=np.uint32)
    sizes = np.bincount(background.reshape(-1))
    # Background touching the volume edge may continue outside it: not a cavity.
    edge = np.unique(
        np.concatenate(
            [background[i].reshape(-1) for i in (0, -1)]
            + [background[:, i].reshape(-1) for i in (0, -1)]
            + [background[:, :, i].reshape(-1) for i in (0, -1)]
        )
    )
    fill = sizes < max_size
    fill[0] = False
    fill[edge] = False
    return mask | fill[background]


def binarize(image: np.ndarray, params: ThreshWaterParams) -> tuple[np.ndarray, float]:
    """Threshold ``image`` and find the particle radius.

    Returns
    -------
    mask : ndarray, shape (Z, Y, X), bool
        Particle voxels.
    radius : float
        ``params.particle_radius``, or the estimate from ``mask`` (voxels).
    """
    threshold = params.threshold
    if threshold is None:
        threshold = auto_threshold(image, params.otsu_samples, params.ignore_zero, method=params.threshold_method)
    mask = image > threshold if params.bright_particles else image < threshold
    if params.ignore_zero and not params.bright_particles:
        mask &= image != 0  # outside the field of view is not a dark particle
    radius = params.particle_radius or estimate_particle_radius(mask, params.threads)
    return mask, float(radius)


def clean_mask(mask: np.ndarray, radius: float, params: ThreshWaterParams) -> np.ndarray:
    """Fill small cavities, then open with a ball of ``opening_rel * radius`` voxels."""
    if params.max_hole_rel > 0 and mask.any():
        mask = fill_small_holes(mask, math.ceil(params.max_hole_rel * _ball_volume(radius)))
    return _open(mask, _edt(mask, params.threads), params.opening_rel * radius, params.threads)


def separate(mask: np.ndarray, radius: float, params: ThreshWaterParams) -> np.ndarray:
    """Seeds by erosion, watershed of -EDT inside ``mask``; uint32 labels, not yet size-filtered."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint32)
    dist = _edt(mask, params.threads)
    seeds = cc3d.connected_components(dist > params.erosion_rel * radius, connectivity=26, out_dtype=np.uint32)
    labels = watershed(-dist, markers=seeds, mask=mask).astype(np.uint32, copy=False)
    del dist, seeds
    # Mask components without a seed (thinner than the erosion) become one particle each.
    orphans = cc3d.connected_components(mask & (labels == 0), connectivity=26, out_dtype=np.uint32)
    if orphans.any():
        offset = np.uint32(labels.max())
        labels[orphans > 0] = orphans[orphans > 0] + offset
    return labels


def remove_small(labels: np.ndarray, radius: float, params: ThreshWaterParams) -> np.ndarray:
    """Drop objects under ``min_size_rel`` of a radius-``radius`` ball; renumber 1..N (new uint32 array)."""
    min_size = max(1, math.ceil(params.min_size_rel * _ball_volume(radius)))
    labels = np.array(labels, dtype=np.uint32, copy=True)
    sizes = np.bincount(labels.reshape(-1))
    small = np.flatnonzero(sizes < min_size)
    small = small[small > 0]
    if small.size:
        labels = fastremap.mask(labels, small.tolist(), in_place=True)
    labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
    return labels.astype(np.uint32, copy=False)


def _ball_volume(radius: float) -> float:
    return 4.0 / 3.0 * math.pi * radius**3


def threshwater(image: np.ndarray, params: ThreshWaterParams | None = None) -> np.ndarray:
    """Instance segmentation by threshold, opening, erosion seeds and watershed.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X), any real dtype
        CT intensities (any unit).
    params : ThreshWaterParams, optional
        Defaults: the tuned parameters of ``threshwater_defaults.json``.

    Returns
    -------
    ndarray, shape (Z, Y, X), uint32
        Particle labels 1..N, 0 = background.
    """
    params = params or ThreshWaterParams()
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {image.shape}")
    mask, radius = binarize(image, params)
    mask = clean_mask(mask, radius, params)
    return remove_small(separate(mask, radius, params), radius, params)
