"""Border-core representation of particle instances (ParticleSeg3D, section 3.2.2).

The network of ParticleSeg3D does not predict instances: it predicts, for every
voxel, *background* (0), *core* (1) or *border* (2). Training targets are made
from instance labels by eroding every particle on its own
(:func:`instances_to_border_core`); at inference the predicted cores are
labelled, implausible small cores are dropped, and the cores are grown back
through the border (:func:`border_core_to_instances`).

Both functions reproduce the reference implementation, ParticleSeg3D 0.2.16
(``particleseg3d.train.instance2border_core.instance2border_core`` and
``particleseg3d.inference.border_core2instance.border_core2instance`` with its
default dilation method), voxel for voxel: the border-core volumes are
identical, and so are the instance labels once the reference's numbering
gaps are removed. They are rewritten on whole-volume primitives (``cc3d``,
separable boolean and maximum filters, ``edt``) instead of a Python loop over
particles and components, which makes them several times (border-core) and
more than ten times (instances) faster (``bench/bordercore_vs_reference.py``,
``BENCHMARKS.md``). This module never imports the reference.

Large scans are converted chunk by chunk: :func:`border_core_to_instances_chunked`
runs a sequence of per-chunk functions (``chunk_*``), each a pure function of
(zarr paths, chunk index, parameters) that reads one chunk plus a halo and
writes one output region, separated by cheap global merges (``merge_*``) of
per-chunk summaries. The result is identical to the whole-volume function,
label numbers included. The next layer dispatches the same functions as Dask
tasks.

Conventions
-----------
* Volumes are (Z, Y, X) numpy arrays in C order; distances are in voxels
  (ParticleSeg3D resamples every scan to a common particle size first, so the
  voxel grid is treated as isotropic, as in the reference).
* Connectivity: foreground components are 26-connected, cores are
  6-connected, growth steps are 26-neighbour steps (all as in the reference).
* Instance labels are ``1..N``: components in C order of their first voxel,
  and inside a component the particles in C order of their cores' first
  voxels. This is the reference's order; the reference leaves gaps (a
  component without core skips a number), which are removed here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import cc3d
import edt
import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "BACKGROUND",
    "BORDER",
    "CORE",
    "ChunkGrid",
    "border_core_to_instances",
    "border_core_to_instances_chunked",
    "chunk_candidate_flags",
    "chunk_core_counts",
    "chunk_face_pairs",
    "chunk_grow",
    "chunk_instances_to_border_core",
    "chunk_label",
    "chunk_relabel",
    "instances_to_border_core",
    "instances_to_border_core_chunked",
    "merge_candidate_flags",
    "merge_core_counts",
    "merge_labels",
    "prepare_round",
    "prepare_work",
]

BACKGROUND, CORE, BORDER = 0, 1, 2

# The reference's small-core filter (remove_small_cores) also requires that no
# core voxel lies max_distance or further from the core's border
# (max_ratio_threshold = 0.0 with max_distance = 3): a core is only "small" if
# it is thin everywhere.
DEFAULT_MAX_DISTANCE = 3.0
DEFAULT_MAX_RATIO = 0.0


# --------------------------------------------------------------------------
# instances -> border-core
# --------------------------------------------------------------------------


def instances_to_border_core(labels: np.ndarray, thickness: int = 3, *, parallel: int = 1) -> np.ndarray:
    """Border-core training target of an instance segmentation.

    Every particle is eroded on its own by a ball of radius ``thickness``; the
    eroded particle is its core, the rest of the particle its border. A core
    therefore never touches another particle (nor its core): touching
    particles stay separable.

    Rule, exactly as the reference (``skimage.morphology.ball(thickness)`` and
    ``binary_erosion`` of each particle's mask): a particle voxel ``v`` is core
    iff no voxel ``u`` *inside the volume* with a different label (background
    or another particle) satisfies ``|u - v|^2 <= thickness^2``. The volume
    border does not erode (the reference's erosion treats outside voxels as
    foreground), so a particle cut by the volume border keeps its core up to
    the border. Implemented without a loop over particles: for thickness <= 3
    as an exact box decomposition of the ball (separable boolean AND filters
    of "same label as the next voxel"), above as a multi-label Euclidean
    distance transform (``edt``, each label measured separately, volume
    border not a boundary) thresholded at ``thickness^2``.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), integer dtype
        Instance labels, 0 = background. Labels need not be consecutive. (The
        reference casts to uint16 first, which merges labels that are equal
        modulo 65536; here labels are used as given.)
    thickness : int, default 3
        Border thickness in voxels (``ball`` radius), >= 0. 0 makes every
        particle voxel core.
    parallel : int, default 1
        Threads.

    Returns
    -------
    ndarray, shape (Z, Y, X), uint8
        0 background, 1 core, 2 border.
    """
    labels = _check_volume(labels, "labels")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    thickness = _check_thickness(thickness)
    return _border_core_from_labels(labels, thickness, parallel)


def _check_thickness(thickness: int) -> int:
    if int(thickness) != thickness or thickness < 0:
        raise ValueError(f"thickness must be a non-negative integer, got {thickness!r}")
    return int(thickness)


def _border_core_from_labels(labels: np.ndarray, thickness: int, parallel: int) -> np.ndarray:
    """Border-core of ``labels`` (see :func:`instances_to_border_core`)."""
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    elif labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    labels = np.ascontiguousarray(labels)
    if len(_ball_boxes(thickness)) <= _MAX_BOXES:
        core = _ball_erosion_boxes(labels, thickness, max(1, int(parallel)))
    else:
        core = _ball_erosion_edt(labels, thickness, max(1, int(parallel)))
    out = (labels != 0).view(np.uint8) * np.uint8(BORDER)
    out -= core.view(np.uint8)
    return out


def _ball_erosion_edt(labels: np.ndarray, thickness: int, parallel: int) -> np.ndarray:
    """Core mask via the per-label squared EDT (``edt``, volume border not a boundary) > thickness^2."""
    if labels.dtype.kind == "i":
        labels = labels.astype(np.dtype(labels.dtype.str.replace("i", "u")))
    # edt's cost grows with the label width; uint16 is ~2x faster than uint32
    if labels.dtype.itemsize > 2 and labels.size and int(labels.max()) < 2**16:
        labels = labels.astype(np.uint16)
    dist2 = edt.edtsq(labels, black_border=False, parallel=parallel)
    # exact small integers in float32; background has distance 0
    return dist2 > thickness * thickness


_MAX_BOXES = 6  # thickness <= 3: the box decomposition beats the EDT (at 4, 10 boxes do not)
_ERODE_SLAB = 16  # z-planes per block of the box erosion


def _ball_boxes(radius: int) -> list[tuple[int, int, int]]:
    """Half-widths ``(hz, hy, hx)`` of boxes whose union is ``ball(radius)``.

    An integer offset ``o`` lies in the ball iff the box spanned by ``|o|``
    does, so the ball is the union of the boxes of its maximal corners
    ``h >= 0`` with ``|h|^2 <= r^2`` (6 boxes for r = 3).
    """
    r = int(radius)
    pts = [(a, b, c) for a in range(r + 1) for b in range(r + 1) for c in range(r + 1) if a * a + b * b + c * c <= r * r]
    return [p for p in pts if not any(q != p and all(x >= y for x, y in zip(q, p)) for q in pts)]


def _ball_erosion_boxes(labels: np.ndarray, radius: int, parallel: int) -> np.ndarray:
    """Core mask: voxels whose ball of ``radius`` (inside the volume) holds only their own label.

    Exact rewrite of the per-particle erosion without distances: the ball is
    a union of boxes, a voxel survives the ball iff it survives every box,
    and a box around ``v`` holds one label iff every pair of face-adjacent
    voxels inside it agrees. So with ``E_d(u) = [L(u) == L(u + e_d)]`` (True
    across the volume border, which does not erode), the core is the AND
    over boxes and axes ``d`` of ``E_d`` ANDed over the box's window of
    ``d``-edges: separable AND filters computed by doubling, in cache-sized
    z-blocks (split between threads when ``parallel > 1``).
    """
    shape = labels.shape
    out = np.zeros(shape, dtype=bool)
    if labels.size == 0:
        return out
    boxes = _ball_boxes(radius)
    t = int(radius)
    n_z = shape[0]
    slab = min(_ERODE_SLAB, n_z)
    starts = list(range(0, n_z, slab))

    def run(block_starts):
        padded = (slab + 2 * t, shape[1] + 2 * t, shape[2] + 2 * t)
        buffers: dict = {}
        edges = [np.ones(padded, dtype=bool) for _ in range(3)]
        for z0 in block_starts:
            _erode_block(labels, out, z0, min(z0 + slab, n_z), t, boxes, edges, buffers, padded)

    if parallel > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # numpy releases the GIL in its element-wise loops
        groups = [starts[i::parallel] for i in range(parallel)]
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(run, groups))
    else:
        run(starts)
    return out


def _and_shifted(src: np.ndarray, axis: int, step: int, out: np.ndarray) -> np.ndarray:
    """``out[i] = src[i] & src[i + step]`` along ``axis``.

    Done as a flat shift (one contiguous loop, ~5x faster than a strided
    one): positions near the end of a row or plane then read the next one,
    and :func:`_erode_block` never reads them.
    """
    flat_step = step * int(np.prod(src.shape[axis + 1 :]))
    a, o = src.reshape(-1), out.reshape(-1)
    n = a.size - flat_step
    np.logical_and(a[:n], a[flat_step:], out=o[:n])
    return out


def _erode_block(labels, out, z0, z1, t, boxes, edges, buffers, padded) -> None:
    """Core mask of planes ``z0:z1`` (see :func:`_ball_erosion_boxes`).

    Work arrays are padded by ``t`` on every side with True (outside the
    volume never erodes); voxel ``(z, y, x)`` sits at ``(z - z0 + t, y + t,
    x + t)``. A forward window ``[i, i + w)`` is computed at every position
    and a box's result for ``v`` is read at ``v - h``. The doubling leaves
    the last positions of rows and planes stale; they are never read, since
    the windows of the block's voxels end at most ``t`` past the volume.
    """
    n_z, n_y, n_x = labels.shape
    za, zb = max(z0 - t, 0), min(z1 + t, n_z)
    window = labels[za:zb]
    pz = za - z0 + t  # padded index of plane za
    core = out[z0:z1]
    np.not_equal(labels[z0:z1], 0, out=core)
    for d in range(3):
        e = edges[d]
        e[:pz] = True
        e[pz + (zb - za) :] = True
        dst = [slice(pz, pz + zb - za), slice(t, t + n_y), slice(t, t + n_x)]
        last = list(dst)
        last[d] = slice(dst[d].stop - 1, dst[d].stop)
        e[tuple(last)] = True  # no edge after the last voxel (or the window's last plane: unused)
        dst[d] = slice(dst[d].start, dst[d].stop - 1)
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[d], b[d] = slice(0, -1), slice(1, None)
        np.equal(window[tuple(a)], window[tuple(b)], out=e[tuple(dst)])
        cache: dict = {(): e}
        for h in boxes:
            if h[d] == 0:
                continue  # a box flat along d holds no d-edges
            key: tuple = ()
            for ax in (2, 1, 0):
                w = 2 * h[ax] + (0 if ax == d else 1)  # 2h edges along d, 2h + 1 voxels across
                base_key, key = key, key + ((ax, w),)
                if key in cache:
                    continue
                base = cache[base_key]
                if w == 1:
                    cache[key] = base
                    continue
                k, power = 0, base
                while (1 << (k + 1)) <= w:
                    pkey = base_key + (("pow", ax, k + 1),)
                    if pkey not in cache:
                        buf = buffers.setdefault((d,) + pkey, np.empty(padded, dtype=bool))
                        cache[pkey] = _and_shifted(power, ax, 1 << k, buf)
                    power, k = cache[pkey], k + 1
                rest = w - (1 << k)  # 2^k < w < 2^(k+1): two overlapping windows of 2^k
                if rest:
                    buf = buffers.setdefault((d,) + key, np.empty(padded, dtype=bool))
                    power = _and_shifted(power, ax, rest, buf)
                cache[key] = power
            r = cache[key]
            core &= r[t - h[0] : t - h[0] + (z1 - z0), t - h[1] : t - h[1] + n_y, t - h[2] : t - h[2] + n_x]


# --------------------------------------------------------------------------
# border-core -> instances (whole volume)
# --------------------------------------------------------------------------


def border_core_to_instances(
    border_core: np.ndarray,
    min_distance: float = 1,
    min_ratio: float | None = 0.95,
    *,
    max_distance: float = DEFAULT_MAX_DISTANCE,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
    remove_small_cores: bool = True,
) -> np.ndarray:
    """Instance segmentation from a border-core segmentation.

    The rules, in order (all exactly those of the reference, re-implemented on
    the whole volume at once):

    1. **Components.** Foreground (border or core) is split into 26-connected
       components, numbered by first voxel in C order. Nothing ever crosses
       from one component to another.
    2. **Cores.** Core voxels are labelled into 6-connected cores, numbered by
       first voxel in C order.
    3. **Small-core filter.** For a core voxel ``v`` of component ``C``,
       ``d(v)`` is the Euclidean distance to the nearest voxel that is not
       core and lies inside the bounding box of ``C`` (the reference runs
       ``distance_transform_edt`` on the component's bounding box, so neither
       the volume border nor background just outside that box counts). A core
       is removed -- its voxels become border -- when at least ``min_ratio`` of
       its voxels have ``d <= min_distance`` *and* at most ``max_ratio`` of
       them have ``d >= max_distance``. With the defaults: >= 95 % of the core
       within 1 voxel of its border and no voxel 3 or more voxels deep, i.e.
       cores that are thin everywhere, the spurious extra cores predicted in
       particles thinner than the border. ``None`` drops a condition (as in
       the reference: with both dropped every core is removed);
       ``remove_small_cores=False`` switches the filter off.
    4. **Growth.** Inside a component, every border voxel joins the surviving
       core nearest to it in 26-neighbour steps through the component (the
       reference's repeated 3x3x3 dilation restricted to the component).
       **Ties** -- a voxel reached at the same step from several cores, e.g.
       on the contact face of two touching particles -- go to the core with
       the largest number, i.e. whose first voxel comes *last* in C order (the
       reference's dilation is a maximum filter over core numbers).
    5. **No core.** A component left without any core (it never had one, or
       all were removed) is one particle: thin particles are not lost.

    Rule 3 is evaluated exactly but cheaply: every core's count of voxels
    with a non-core voxel within ``min_distance`` anywhere in the volume is
    an upper bound of the reference's count (which only looks inside the
    component's box), so only cores passing ``min_ratio`` with that bound are
    tested voxel by voxel. One corner case differs inside, not in the
    result: when a component's box holds no non-core voxel at all (a
    box-shaped core without border), scipy's distance transform returns
    distances to a point outside the array and the reference may remove that
    core; here it is kept. Either way the component is one particle.

    Particles are numbered component by component (components in C order of
    their first voxel), and inside a component in the order of their cores'
    first voxels: this is the reference's numbering with its gaps removed.

    Parameters
    ----------
    border_core : ndarray, shape (Z, Y, X), integer dtype
        0 background, 1 core, 2 border; other values are rejected.
    min_distance : float, default 1
        Distance (voxels) that makes a core voxel "close to the border".
    min_ratio : float or None, default 0.95
        Fraction of close voxels at or above which a core may be removed.
    max_distance : float, default 3
        Distance (voxels) that makes a core voxel "deep".
    max_ratio : float or None, default 0.0
        Fraction of deep voxels at or below which a core may be removed.
    remove_small_cores : bool, default True
        Apply the small-core filter (rule 3).

    Returns
    -------
    ndarray, shape (Z, Y, X), uint32
        Instance labels ``1..N``, 0 = background; every foreground voxel
        belongs to a particle.
    """
    bc = _check_border_core(border_core)
    params = _FilterParams.make(min_distance, min_ratio, max_distance, max_ratio, remove_small_cores)
    if bc.size == 0:
        return np.zeros(bc.shape, dtype=np.uint32)
    foreground = bc != BACKGROUND
    core = bc == CORE
    comp, n_comp = cc3d.connected_components(foreground, connectivity=26, return_N=True, binary_image=True)
    cores, n_core = cc3d.connected_components(core, connectivity=6, return_N=True, binary_image=True)

    # per-core facts from the list of core voxels (a fraction of the volume)
    core_idx = np.flatnonzero(core)
    core_lab = cores.ravel()[core_idx]
    n_voxels = np.bincount(core_lab, minlength=n_core + 1).astype(np.int64)
    core_comp = np.zeros(n_core + 1, dtype=np.int64)
    core_comp[1:] = comp.ravel()[core_idx[_first_of_raster_labels(core_lab, n_core)]]

    # small-core filter: a cheap screen, then the exact test for the few candidates
    candidates = np.zeros(n_core + 1, dtype=bool)
    if n_core and params.enabled:
        if params.min_ratio is None:
            candidates = n_voxels > 0
        else:
            near = _near_mask(bc, (slice(None),) * 3, params.near_offsets)
            near_n = np.bincount(core_lab[near.ravel()[core_idx]], minlength=n_core + 1)
            del near
            candidates = params.screen(near_n, n_voxels)
    candidates[0] = False
    remove = np.zeros(n_core + 1, dtype=bool)
    if candidates.any():
        sel = candidates[core_lab]
        cand_lab = core_lab[sel]
        coords = np.stack(np.unravel_index(core_idx[sel], bc.shape), axis=1).astype(np.int64)
        lo, hi = _component_boxes(comp, core_comp[cand_lab])
        near_e, deep_e = _exact_flags(bc, coords, lo, hi, params)
        near_n = np.bincount(cand_lab[near_e], minlength=n_core + 1)
        deep_n = np.bincount(cand_lab[deep_e], minlength=n_core + 1)
        remove = candidates & params.removes(near_n, deep_n, n_voxels)
    del core, core_idx, core_lab

    keep = n_voxels > 0
    keep &= ~remove
    keep[0] = False
    rank, start = _particle_tables(keep, core_comp, n_comp)
    # growth: every component with a surviving core is filled from its cores
    grown = rank[cores]
    del cores
    unresolved = foreground
    unresolved &= grown == 0
    _grow(grown, unresolved)
    del unresolved
    # comp is uint32 like start: take into it (elementwise, so aliasing is safe
    # without mode="raise"'s buffering) instead of faulting in a new 4 B/voxel array
    if comp.dtype == start.dtype:
        out = np.take(start, comp, out=comp, mode="clip")
    else:  # cc3d picks a narrower dtype for small volumes
        out = start[comp]
    out += grown
    return out


@dataclass(frozen=True)
class _FilterParams:
    """Small-core filter parameters and the voxel offsets they imply."""

    min_distance: float
    min_ratio: float | None
    max_distance: float
    max_ratio: float | None
    enabled: bool = True

    @staticmethod
    def make(min_distance, min_ratio, max_distance, max_ratio, remove_small_cores=True) -> _FilterParams:
        if min_distance < 0 or max_distance < 0:
            raise ValueError("min_distance and max_distance must be >= 0")
        return _FilterParams(
            float(min_distance),
            None if min_ratio is None else float(min_ratio),
            float(max_distance),
            None if max_ratio is None else float(max_ratio),
            bool(remove_small_cores),
        )

    @property
    def near_offsets(self) -> np.ndarray:
        """Offsets ``o != 0`` with ``|o| <= min_distance``: a non-core voxel there makes ``v`` close."""
        return _ball_offsets(self.min_distance, strict=False)

    @property
    def deep_offsets(self) -> np.ndarray:
        """Offsets ``o != 0`` with ``|o| < max_distance``: a non-core voxel there makes ``v`` not deep."""
        return _ball_offsets(self.max_distance, strict=True)

    @property
    def near_halo(self) -> int:
        offs = self.near_offsets
        return int(np.abs(offs).max()) if offs.size else 0

    @property
    def halo(self) -> int:
        """Reach in voxels of the exact test."""
        offs = np.concatenate([self.near_offsets, self.deep_offsets])
        return int(np.abs(offs).max()) if offs.size else 0

    def screen(self, near_n: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Cores that may be removed, given an upper bound of their close-voxel counts."""
        if not self.enabled:
            return np.zeros(n.shape, dtype=bool)
        if self.min_ratio is None:
            return n > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            return (n > 0) & (near_n / np.maximum(n, 1) >= self.min_ratio)

    def removes(self, near_n: np.ndarray, deep_n: np.ndarray, n: np.ndarray) -> np.ndarray:
        """The reference's decision from exact counts (float64 ratios, as the reference)."""
        out = n > 0
        safe = np.maximum(n, 1)
        if self.min_ratio is not None:
            out &= near_n / safe >= self.min_ratio
        if self.max_ratio is not None:
            out &= deep_n / safe <= self.max_ratio
        return out


def _ball_offsets(radius: float, strict: bool) -> np.ndarray:
    """Integer offsets ``o != 0`` with ``sqrt(|o|^2) <= radius`` (``<`` if strict), shape (K, 3), int64.

    The square root is taken in float64 like scipy's distance transform, so
    the comparison is the reference's comparison of its distance values.
    """
    r = math.floor(radius) + 1
    g = np.arange(-r, r + 1)
    o = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    d = np.sqrt((o.astype(np.float64) ** 2).sum(axis=1))
    ok = (d < radius) if strict else (d <= radius)
    ok &= d > 0
    return o[ok].astype(np.int64)


def _check_volume(arr, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (Z, Y, X) array, got shape {arr.shape}")
    return arr


def _check_border_core(border_core) -> np.ndarray:
    bc = _check_volume(border_core, "border_core")
    if not (np.issubdtype(bc.dtype, np.integer) or bc.dtype == np.bool_):
        raise TypeError(f"border_core must be an integer array, got {bc.dtype}")
    bad = bc.size and (bc.max() > BORDER or (bc.dtype.kind == "i" and bc.min() < 0))
    if bad:
        raise ValueError("border_core values must be 0 (background), 1 (core) or 2 (border)")
    return np.ascontiguousarray(bc, dtype=np.uint8)


def _first_of_raster_labels(lab: np.ndarray, n: int) -> np.ndarray:
    """Positions of the first occurrences of labels ``1..n`` in ``lab``.

    ``lab`` lists, in C order, the labels of a raster-ordered labelling (cc3d
    and scipy number labels by first voxel), so label ``k + 1`` first appears
    after label ``k``: first occurrences are where the running maximum grows.
    """
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64)
    running = np.maximum.accumulate(lab)
    first = np.flatnonzero(np.diff(running, prepend=running.dtype.type(0)))
    if first.size != n:  # pragma: no cover - guaranteed by cc3d
        raise AssertionError("labels are not numbered by first voxel")
    return first


def _near_mask(bc: np.ndarray, inner: tuple[slice, ...], offsets: np.ndarray) -> np.ndarray:
    """Voxels of ``bc[inner]`` with a non-core voxel at one of ``offsets``.

    Only voxels inside ``bc`` count (``bc`` is the volume or a window that
    reaches the volume border wherever it is clipped): the volume border is
    never a witness, as in the reference. Not restricted to core voxels.

    Returns
    -------
    ndarray, shape of ``bc[inner]``, bool
    """
    shape = bc.shape
    box = [s.indices(n)[:2] for s, n in zip(inner, shape)]
    out = np.zeros(tuple(b - a for a, b in box), dtype=bool)
    noncore = bc != CORE
    for o in offsets:
        dst, src = [], []
        for (a, b), d, n in zip(box, o, shape):
            lo, hi = max(a, -int(d)), min(b, n - int(d))
            if hi <= lo:
                break
            dst.append(slice(lo - a, hi - a))
            src.append(slice(lo + int(d), hi + int(d)))
        else:
            out[tuple(dst)] |= noncore[tuple(src)]
    return out


def _exact_flags(bc: np.ndarray, coords: np.ndarray, lo: np.ndarray, hi: np.ndarray, params: _FilterParams):
    """The reference's per-voxel filter tests for a set of core voxels.

    Parameters
    ----------
    bc : ndarray, shape (Z, Y, X), uint8
        Border-core volume, or a window of it holding every voxel of the
        volume within ``params.halo`` of ``coords``.
    coords : ndarray, shape (N, 3), int64
        Core voxels, in ``bc``'s coordinates.
    lo, hi : ndarray, shape (N, 3), int64
        Bounding box ``[lo, hi)`` of each voxel's component, in ``bc``'s
        coordinates (it lies in the volume, so it excludes the outside).

    Returns
    -------
    near, deep : ndarray, shape (N,), bool
        ``d <= min_distance`` and ``d >= max_distance``, ``d`` being the
        distance to the nearest non-core voxel inside the component's box.
        "Non-core" need not exclude other components' cores: the nearest
        non-core voxel is never one, because the voxel one step closer to
        ``v`` would be core and join the two components.
    """
    upper = np.asarray(bc.shape) - 1

    def witness(offsets: np.ndarray) -> np.ndarray:
        found = np.zeros(coords.shape[0], dtype=bool)
        for o in offsets:
            u = coords + o
            inside = np.all((u >= lo) & (u < hi), axis=1)
            np.clip(u, 0, upper, out=u)
            found |= inside & (bc[u[:, 0], u[:, 1], u[:, 2]] != CORE)
        return found

    return witness(params.near_offsets), ~witness(params.deep_offsets)


def _component_boxes(comp: np.ndarray, comp_of: np.ndarray):
    """Bounding boxes ``[lo, hi)`` of the components ``comp_of``, shape (N, 3) each."""
    which = np.unique(comp_of)
    slices = ndi.find_objects(comp, max_label=int(which.max()))
    lo = np.zeros((int(which.max()) + 1, 3), dtype=np.int64)
    hi = np.zeros_like(lo)
    for c in which:
        lo[c] = [s.start for s in slices[c - 1]]
        hi[c] = [s.stop for s in slices[c - 1]]
    return lo[comp_of], hi[comp_of]


def _particle_tables(keep: np.ndarray, core_comp: np.ndarray, n_comp: int):
    """Rank of each surviving core inside its component, and each component's label base.

    Parameters
    ----------
    keep : ndarray, shape (n_core + 1,), bool
        Surviving cores (index 0 unused).
    core_comp : ndarray, shape (n_core + 1,), int64
        Component of each core.
    n_comp : int
        Number of components.

    Returns
    -------
    rank : ndarray, shape (n_core + 1,), uint8/uint16/uint32
        ``1..r`` in core order inside each component, 0 for removed cores.
        Growth runs on ranks: they order the cores of a component like the
        core numbers do (tie-breaking is unchanged) and fit in fewer bytes.
    start : ndarray, shape (n_comp + 1,), uint32
        ``start[c] + rank`` is the final label of a voxel of component ``c``
        (rank 0 in components without core).
    """
    kept = np.flatnonzero(keep)
    comp_of = core_comp[kept]
    survivors = np.bincount(comp_of, minlength=n_comp + 1)
    # kept cores are in core order; a stable sort by component keeps it
    order = np.argsort(comp_of, kind="stable")
    group_start = np.zeros(n_comp + 2, dtype=np.int64)
    np.cumsum(survivors, out=group_start[1:])
    r = np.empty(kept.size, dtype=np.int64)
    r[order] = np.arange(kept.size) - group_start[comp_of[order]] + 1
    top = int(r.max()) if r.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
    rank = np.zeros(keep.size, dtype=dtype)
    rank[kept] = r
    count = np.maximum(survivors, 1)
    count[0] = 0
    first_label = np.zeros(n_comp + 1, dtype=np.int64)
    np.cumsum(count[:-1], out=first_label[1:])
    first_label += 1  # first particle label of each component
    start = first_label - (survivors > 0)
    start[0] = 0
    if start.size and int(start.max()) + max(top, 1) >= 2**32:
        raise OverflowError("more than 2**32 - 1 particles")
    return rank, start.astype(np.uint32)


def _max26(src: np.ndarray, work: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Maximum over the 3x3x3 neighbourhood of every voxel (separable; edges see only the inside).

    ``work`` and ``tmp`` are buffers of ``src``'s shape and dtype; the result
    is left in ``work``, which is returned.
    """
    _centred_max(src, work, 2)
    _centred_max(work, tmp, 1)
    _centred_max(tmp, work, 0)
    return work


def _centred_max(src: np.ndarray, out: np.ndarray, axis: int) -> None:
    """``out[i] = max(src[i-1], src[i], src[i+1])`` along ``axis`` (missing neighbours ignored)."""
    n = src.shape[axis]

    def sl(a, b):
        s = [slice(None)] * src.ndim
        s[axis] = slice(a, b)
        return tuple(s)

    if n == 1:
        np.copyto(out, src)
        return
    mid = sl(1, n - 1)
    np.maximum(src[sl(0, n - 2)], src[sl(2, n)], out=out[mid])
    np.maximum(out[mid], src[mid], out=out[mid])
    np.maximum(src[sl(0, 1)], src[sl(1, 2)], out=out[sl(0, 1)])
    np.maximum(src[sl(n - 1, n)], src[sl(n - 2, n - 1)], out=out[sl(n - 1, n)])


_SLAB = 8  # z-planes per growth block: keeps the working set in cache


def _grow(
    labels: np.ndarray,
    unresolved: np.ndarray,
    levels: np.ndarray | None = None,
    seed_levels: np.ndarray | None = None,
    max_level: int | None = None,
) -> None:
    """Level-synchronous multi-source BFS with largest-label tie-breaking, in place.

    At step ``k`` every unresolved voxel with a labelled 26-neighbour of
    level ``k - 1`` takes the largest label among those neighbours and level
    ``k``. This is the reference's repeated masked 3x3x3 maximum dilation: a
    voxel ends with the largest label among the seeds at the smallest
    26-step distance (the maximum over a union of tie sets is the maximum of
    their maxima). Unresolved voxels of different components are never
    neighbours, so one call serves all components.

    The volume is processed in slabs of z-planes so that the maximum filters
    run in cache; a slab is only revisited when it or a neighbouring slab
    changed at the previous step.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), unsigned
        Seed labels, 0 elsewhere; receives the grown labels.
    unresolved : ndarray, shape (Z, Y, X), bool
        Voxels that may receive a label (foreground, not seeds); cleared as
        they are assigned.
    levels : ndarray, shape (Z, Y, X), integer, optional
        Receives every assigned voxel's step count (seeds: their level).
    seed_levels : ndarray, shape (Z, Y, X), integer, optional
        Level of each seed (default 0); a seed of level ``L`` joins the front
        at step ``L``. Levels must be exact geodesic step distances.
    max_level : int, optional
        Stop after this step.
    """
    shape = labels.shape
    n_z = shape[0]
    starts = list(range(0, n_z, _SLAB))
    n_slabs = len(starts)
    seeded = labels != 0
    pending = None  # seeds of level > 0, sorted by level: flat positions, levels, labels
    if seed_levels is not None:
        if levels is not None:
            levels[seeded] = seed_levels[seeded]
        pos = np.flatnonzero(seeded)
        lv = seed_levels.ravel()[pos]
        late = lv > 0
        if late.any():
            pos, lv = pos[late], lv[late]
            order = np.argsort(lv, kind="stable")
            pos, lv = pos[order], lv[order]
            pending = (pos, lv, labels.ravel()[pos].copy())
            labels.ravel()[pos] = 0
            seeded.ravel()[pos] = False
    elif levels is not None:
        levels[seeded] = 0
    plane = shape[1] * shape[2]
    todo = np.array([np.count_nonzero(unresolved[z : z + _SLAB]) for z in starts], dtype=np.int64)
    changed = np.array([seeded[z : z + _SLAB].any() for z in starts], dtype=bool)
    del seeded
    buf_shape = (min(_SLAB + 2, n_z),) + shape[1:]
    buf_src = np.empty(buf_shape, dtype=labels.dtype)
    buf_a = np.empty(buf_shape, dtype=labels.dtype)
    buf_b = np.empty(buf_shape, dtype=labels.dtype)
    level = 0
    while True:
        level += 1
        if max_level is not None and level > max_level:
            break
        active = changed.copy()
        active[1:] |= changed[:-1]
        active[:-1] |= changed[1:]
        active &= todo > 0
        now_changed = np.zeros(n_slabs, dtype=bool)
        saved = None  # (plane index, values before this step) of a plane just rewritten
        for s in np.flatnonzero(active):
            z0 = starts[s]
            z1 = min(z0 + _SLAB, n_z)
            lo, hi = max(z0 - 1, 0), min(z1 + 1, n_z)
            m = hi - lo
            if saved is not None and saved[0] == lo and lo < z0:
                # the previous slab already moved this plane to this step: use its old values
                src = buf_src[:m]
                np.copyto(src, labels[lo:hi])
                src[0] = saved[1]
            else:
                src = labels[lo:hi]
            saved = (z1 - 1, src[z1 - 1 - lo].copy()) if z1 < n_z else None
            grown = _max26(src, buf_a[:m], buf_b[:m])[z0 - lo : z1 - lo]
            u = unresolved[z0:z1]
            target = labels[z0:z1]
            # new labels where unresolved (target is 0 there), 0 elsewhere; plain
            # vectorised arithmetic is faster than a masked copy
            np.multiply(grown, u, out=grown)
            np.maximum(target, grown, out=target)
            np.logical_and(u, grown == 0, out=u)
            left = np.count_nonzero(u)
            if left < todo[s]:
                now_changed[s] = True
                if levels is not None:
                    levels[z0:z1][grown != 0] = level
            todo[s] = left
        if pending is not None:
            pos, lv, lab = pending
            j, k = np.searchsorted(lv, level, side="left"), np.searchsorted(lv, level, side="right")
            if k > j:
                labels.ravel()[pos[j:k]] = lab[j:k]
                now_changed[np.unique(pos[j:k] // (plane * _SLAB))] = True
            pending = (pos[k:], lv[k:], lab[k:]) if k < lv.size else None
        changed = now_changed
        if not changed.any():
            if pending is None or not todo.any():
                break
            level = int(pending[1][0]) - 1  # nothing moves until the next seeds enter
    if pending is not None:  # seeds beyond max_level (or with nothing left to grow into)
        pos, lv, lab = pending
        labels.ravel()[pos] = lab


# --------------------------------------------------------------------------
# chunk-wise conversion
# --------------------------------------------------------------------------
#
# border_core_to_instances needs global knowledge in three places: which
# voxels form a component and a core (labels across chunk faces), which cores
# the small-core filter removes (a core's voxel counts are summed over every
# chunk it spans) and how far the growth reaches (unbounded in long border
# arms). The chunked pipeline makes each of them exact:
#
#   prepare_work         create the work arrays
#   chunk_label          cc3d per chunk (no halo) -> local labels + summaries
#   chunk_face_pairs     local labels that touch across the chunk's upper faces
#   merge_labels         union-find -> global component / core numbers, ordered
#                        by first voxel in C order (= cc3d's whole-volume
#                        numbering), component boxes, core -> component
#   chunk_core_counts    per core: voxels, voxels with a non-core voxel within
#                        min_distance (halo = ceil(min_distance))
#   merge_core_counts    -> candidates of the small-core filter
#   chunk_candidate_flags  exact (bounding-box aware) tests for candidate core
#                        voxels (halo = ceil(max_distance))
#   merge_candidate_flags -> surviving cores, their ranks, label bases
#   prepare_round, chunk_grow (rounds)
#                        growth in chunk + halo H. A voxel whose step count in
#                        the window is <= r*H is exact in round r: all its
#                        shortest paths, and those of its tied cores, lie
#                        within H steps of exact seeds inside the window.
#                        Round r+1 re-seeds from the accepted voxels; rounds
#                        only run where voxels are left (rare: border arms
#                        more than H voxels from any core).
#   chunk_relabel        final label = start[component] + rank
#
# Every chunk_* function is a pure function of (paths, chunk index,
# parameters): it reads its chunk plus a halo from zarr arrays / .npy tables
# in the work directory and writes only its own output region, so the
# functions can run as independent Dask tasks between the merges. Summaries
# they return are small (per label, not per voxel).


@dataclass(frozen=True)
class ChunkGrid:
    """Regular chunking of a (Z, Y, X) volume.

    Parameters
    ----------
    shape : tuple of 3 int
        Volume shape.
    chunk_shape : tuple of 3 int
        Chunk shape (the last chunks along each axis may be smaller).
    """

    shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "chunk_shape", tuple(int(n) for n in self.chunk_shape))
        if len(self.shape) != 3 or len(self.chunk_shape) != 3 or min(self.chunk_shape) < 1:
            raise ValueError(f"bad grid {self.shape} / {self.chunk_shape}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of chunks along each axis."""
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunk_shape))

    @property
    def n_chunks(self) -> int:
        return int(np.prod(self.grid))

    def indices(self) -> Iterator[tuple[int, int, int]]:
        """All chunk indices in C order."""
        return product(*(range(g) for g in self.grid))

    def chunk_id(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.grid))

    def region(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        """Voxels of chunk ``index``."""
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunk_shape, self.shape)
        )

    def window(self, index: Sequence[int], halo: int):
        """Chunk plus ``halo`` voxels (clipped to the volume).

        Returns
        -------
        window : tuple of slice
            In volume coordinates.
        inner : tuple of slice
            The chunk, in window coordinates.
        """
        region = self.region(index)
        window = tuple(slice(max(r.start - halo, 0), min(r.stop + halo, n)) for r, n in zip(region, self.shape))
        inner = tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window))
        return window, inner

    def overlapping(self, window: Sequence[slice]) -> Iterator[tuple[int, int, int]]:
        """Indices of the chunks that intersect ``window``."""
        ranges = [range(w.start // c, (w.stop - 1) // c + 1) for w, c in zip(window, self.chunk_shape)]
        return product(*ranges)


def _open(array, mode: str = "r"):
    """A zarr array given as a path or as an array."""
    import zarr

    if isinstance(array, (str, os.PathLike)):
        return zarr.open_array(store=str(array), mode=mode)
    return array


def _create(path, shape, chunks, dtype):
    import zarr

    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True)


def _work(work, name: str) -> str:
    return str(Path(work) / name)


def _save(work, name: str, value: np.ndarray) -> None:
    np.save(Path(work) / f"{name}.npy", value)


def _load(work, name: str, mmap: bool = False) -> np.ndarray:
    return np.load(Path(work) / f"{name}.npy", mmap_mode="r" if mmap else None)


def _flat(grid: ChunkGrid, coords: np.ndarray) -> np.ndarray:
    """Global C-order flat index of (N, 3) volume coordinates."""
    return np.ravel_multi_index(tuple(np.asarray(coords, dtype=np.int64).T), grid.shape).astype(np.int64)


def _local_table(work, kind: str, grid: ChunkGrid, index) -> np.ndarray:
    """Local label -> global number for one chunk (``kind`` is "comp" or "core")."""
    offsets = _load(work, f"{kind}_offsets", mmap=True)
    table = _load(work, f"{kind}_map", mmap=True)
    cid = grid.chunk_id(index)
    return np.asarray(table[offsets[cid] : offsets[cid + 1]])


def _read_mapped(work, name: str, kind: str, grid: ChunkGrid, window, value_table: np.ndarray | None, dtype):
    """Read ``window`` of a per-chunk local-label array, mapped through global tables.

    Each chunk's part is mapped local -> global (``kind``) -> ``value_table``
    (or kept global when None).
    """
    arr = _open(_work(work, name))
    out = np.zeros(tuple(w.stop - w.start for w in window), dtype=dtype)
    for index in grid.overlapping(window):
        region = grid.region(index)
        part = tuple(slice(max(w.start, r.start), min(w.stop, r.stop)) for w, r in zip(window, region))
        local = np.asarray(arr[part])
        table = _local_table(work, kind, grid, index)
        if value_table is not None:
            table = value_table[table]
        out[tuple(slice(p.start - w.start, p.stop - w.start) for p, w in zip(part, window))] = table[local]
    return out


def prepare_work(work, grid: ChunkGrid) -> None:
    """Create the work directory's per-voxel arrays used by stages 1-2 (before any ``chunk_*`` call)."""
    Path(work).mkdir(parents=True, exist_ok=True)
    for name in ("comp_local", "core_local"):
        _create(_work(work, name), grid.shape, grid.chunk_shape, np.uint32)


def prepare_round(work, grid: ChunkGrid, round: int) -> None:
    """Create ``work/rank_<round>`` and ``work/level_<round>`` (after :func:`merge_candidate_flags`)."""
    _create(_work(work, f"rank_{round}"), grid.shape, grid.chunk_shape, _load(work, "rank", mmap=True).dtype)
    _create(_work(work, f"level_{round}"), grid.shape, grid.chunk_shape, np.uint32)


def chunk_label(src, work, index, grid: ChunkGrid) -> dict[str, Any]:
    """Stage 1: label components (26-connected) and cores (6-connected) inside one chunk.

    Writes the chunk's local labels to ``work/comp_local`` and
    ``work/core_local`` and its six boundary planes to ``work/faces``.

    Returns
    -------
    dict
        ``index``; ``comp_first``, ``core_first``: global flat index of each
        local label's first voxel (int64, shape (n,)); ``comp_lo``,
        ``comp_hi``: local components' bounding boxes in volume coordinates
        (int64, shape (n, 3)); ``core_comp``: local component of each local
        core (int64, shape (n,)).
    """
    index = tuple(int(i) for i in index)
    region = grid.region(index)
    origin = np.array([r.start for r in region], dtype=np.int64)
    bc = _check_border_core(np.asarray(_open(src)[region]))
    comp, n_comp = cc3d.connected_components(bc != BACKGROUND, connectivity=26, return_N=True, binary_image=True)
    cores, n_core = cc3d.connected_components(bc == CORE, connectivity=6, return_N=True, binary_image=True)
    _open(_work(work, "comp_local"), "r+")[region] = comp
    _open(_work(work, "core_local"), "r+")[region] = cores
    faces = {}
    for axis, name in enumerate("zyx"):
        for side, pick in (("lo", 0), ("hi", -1)):
            faces[f"comp_{name}{side}"] = np.take(comp, pick, axis=axis)
            faces[f"core_{name}{side}"] = np.take(cores, pick, axis=axis)
    (Path(work) / "faces").mkdir(exist_ok=True)
    np.savez(Path(work) / "faces" / f"{grid.chunk_id(index)}.npz", **faces)

    def firsts(lab, n):
        idx = np.flatnonzero(lab)
        pos = idx[_first_of_raster_labels(lab.ravel()[idx], n)]
        return pos, np.stack(np.unravel_index(pos, lab.shape), axis=1).astype(np.int64) + origin

    _, comp_xyz = firsts(comp, n_comp)
    core_pos, core_xyz = firsts(cores, n_core)
    stats = cc3d.statistics(comp, no_slice_conversion=True)["bounding_boxes"][1:]
    # cc3d gives (xmin, xmax, ymin, ymax, zmin, zmax) per label, inclusive, for (Z, Y, X) arrays
    # in our axis order: columns 0..1 -> axis 0, 2..3 -> axis 1, 4..5 -> axis 2
    stats = np.asarray(stats, dtype=np.int64).reshape(-1, 3, 2)
    lo = stats[:, :, 0] + origin
    hi = stats[:, :, 1] + 1 + origin
    return {
        "index": index,
        "comp_first": _flat(grid, comp_xyz) if n_comp else np.zeros(0, np.int64),
        "comp_lo": lo,
        "comp_hi": hi,
        "core_first": _flat(grid, core_xyz) if n_core else np.zeros(0, np.int64),
        "core_comp": comp.ravel()[core_pos].astype(np.int64),
    }


def chunk_face_pairs(work, index, grid: ChunkGrid) -> dict[str, np.ndarray]:
    """Stage 2: pairs of local labels that touch across the chunk's upper faces.

    For each axis, the chunk's last plane is compared with the first plane
    of the chunks after it, extended by one voxel on both sides in-plane so
    that edge and corner neighbours are seen (components: all 26-neighbour
    offsets; cores: the face neighbour only). Every pair of touching voxels
    in different chunks is seen from the chunk before it along some axis.

    Returns
    -------
    dict
        ``comp``, ``core``: int64 arrays, shape (P, 4), rows
        ``(chunk_id_a, label_a, chunk_id_b, label_b)``.
    """
    index = tuple(int(i) for i in index)
    faces_dir = Path(work) / "faces"
    cache: dict[int, Any] = {}

    def faces(idx):
        cid = grid.chunk_id(idx)
        if cid not in cache:
            cache[cid] = np.load(faces_dir / f"{cid}.npz")
        return cache[cid]

    own = faces(index)
    out = {"comp": [], "core": []}
    for axis, name in enumerate("zyx"):
        if index[axis] + 1 >= grid.grid[axis]:
            continue
        others = [a for a in range(3) if a != axis]
        region = grid.region(index)
        # the neighbouring plane, extended by one voxel in-plane (clipped)
        ext = [slice(max(region[a].start - 1, 0), min(region[a].stop + 1, grid.shape[a])) for a in others]
        plane = {k: np.zeros(tuple(e.stop - e.start for e in ext), dtype=np.int64) for k in ("comp", "core")}
        owner = np.full(plane["comp"].shape, -1, dtype=np.int64)
        nb = list(index)
        nb[axis] += 1
        for d0 in (-1, 0, 1):
            for d1 in (-1, 0, 1):
                idx = list(nb)
                idx[others[0]] += d0
                idx[others[1]] += d1
                if not all(0 <= i < g for i, g in zip(idx, grid.grid)):
                    continue
                r = grid.region(idx)
                part = [slice(max(e.start, r[a].start), min(e.stop, r[a].stop)) for e, a in zip(ext, others)]
                if any(p.stop <= p.start for p in part):
                    continue
                dst = tuple(slice(p.start - e.start, p.stop - e.start) for p, e in zip(part, ext))
                srcs = tuple(slice(p.start - r[a].start, p.stop - r[a].start) for p, a in zip(part, others))
                f = faces(idx)
                for k in ("comp", "core"):
                    plane[k][dst] = f[f"{k}_{name}lo"][srcs]
                owner[dst] = grid.chunk_id(idx)
        off = [region[a].start - e.start for a, e in zip(others, ext)]  # own plane origin in ext
        for k, steps in (("comp", (-1, 0, 1)), ("core", (0,))):
            mine = own[f"{k}_{name}hi"].astype(np.int64)
            n0, n1 = mine.shape
            for d0 in steps:
                for d1 in steps:
                    lo0, lo1 = off[0] + d0, off[1] + d1
                    a0, b0 = max(0, -lo0), min(n0, plane[k].shape[0] - lo0)
                    a1, b1 = max(0, -lo1), min(n1, plane[k].shape[1] - lo1)
                    if b0 <= a0 or b1 <= a1:
                        continue
                    m = mine[a0:b0, a1:b1]
                    t = plane[k][a0 + lo0 : b0 + lo0, a1 + lo1 : b1 + lo1]
                    w = owner[a0 + lo0 : b0 + lo0, a1 + lo1 : b1 + lo1]
                    hit = (m != 0) & (t != 0)
                    if hit.any():
                        rows = np.stack(
                            [np.full(int(hit.sum()), grid.chunk_id(index)), m[hit], w[hit], t[hit]], axis=1
                        )
                        out[k].append(np.unique(rows, axis=0))
    return {k: (np.unique(np.concatenate(v), axis=0) if v else np.zeros((0, 4), np.int64)) for k, v in out.items()}


def _union(grid: ChunkGrid, counts: np.ndarray, pairs: np.ndarray, first: np.ndarray):
    """Global numbering of per-chunk local labels joined by ``pairs``.

    Returns the concatenated local -> global table (each chunk's block starts
    with local label 0 -> 0), block offsets, and the group of every node.
    Global numbers are ordered by the group's first voxel (C order).
    """
    node_off = np.zeros(grid.n_chunks + 1, dtype=np.int64)
    np.cumsum(counts, out=node_off[1:])
    n = int(node_off[-1])
    if n == 0:
        group = np.zeros(0, dtype=np.int64)
        n_groups = 0
    else:
        a = node_off[pairs[:, 0]] + pairs[:, 1] - 1
        b = node_off[pairs[:, 2]] + pairs[:, 3] - 1
        graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
        n_groups, group = connected_components(graph, directed=False)
    group_first = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(group_first, group, first)
    order = np.argsort(group_first, kind="stable")
    number = np.empty(n_groups, dtype=np.int64)
    number[order] = np.arange(1, n_groups + 1)
    global_of_node = number[group] if n else np.zeros(0, np.int64)
    table = np.zeros(n + grid.n_chunks, dtype=np.uint32)
    table_off = node_off + np.arange(grid.n_chunks + 1)
    for cid in range(grid.n_chunks):
        table[table_off[cid] + 1 : table_off[cid + 1]] = global_of_node[node_off[cid] : node_off[cid + 1]]
    return table, table_off, global_of_node, n_groups


def merge_labels(work, grid: ChunkGrid, summaries: Sequence[dict], pairs: Sequence[dict]) -> dict[str, int]:
    """Merge 1: global component and core numbers from the chunk summaries.

    Writes ``comp_map``/``comp_offsets``, ``core_map``/``core_offsets``
    (local -> global per chunk), ``comp_lo``/``comp_hi`` (global component
    boxes, shape (n_comp + 1, 3)) and ``core_comp`` (component of each global
    core) to the work directory.

    Returns
    -------
    dict
        ``n_comp``, ``n_core``.
    """
    by_id = {grid.chunk_id(s["index"]): s for s in summaries}
    if len(by_id) != grid.n_chunks:
        raise ValueError("one summary per chunk is required")
    ordered = [by_id[c] for c in range(grid.n_chunks)]
    out = {}
    nodes = {}
    for kind in ("comp", "core"):
        counts = np.array([s[f"{kind}_first"].size for s in ordered], dtype=np.int64)
        first = np.concatenate([s[f"{kind}_first"] for s in ordered]) if counts.sum() else np.zeros(0, np.int64)
        pp = [p[kind] for p in pairs if p[kind].size]
        pp = np.concatenate(pp) if pp else np.zeros((0, 4), np.int64)
        table, table_off, global_of_node, n_groups = _union(grid, counts, pp, first)
        _save(work, f"{kind}_map", table)
        _save(work, f"{kind}_offsets", table_off)
        nodes[kind] = global_of_node
        out[f"n_{kind}"] = n_groups
    # component boxes: union of the pieces
    n_comp = out["n_comp"]
    lo = np.full((n_comp + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.zeros((n_comp + 1, 3), dtype=np.int64)
    if n_comp:
        g = nodes["comp"]
        for ax in range(3):
            np.minimum.at(lo[:, ax], g, np.concatenate([s["comp_lo"][:, ax] for s in ordered]))
            np.maximum.at(hi[:, ax], g, np.concatenate([s["comp_hi"][:, ax] for s in ordered]))
    lo[0] = 0
    _save(work, "comp_lo", lo)
    _save(work, "comp_hi", hi)
    # component of each global core (every piece of a core lies in the same component)
    core_comp = np.zeros(out["n_core"] + 1, dtype=np.int64)
    comp_map = _load(work, "comp_map")
    comp_off = _load(work, "comp_offsets")
    node = 0
    for cid, s in enumerate(ordered):
        k = s["core_comp"].size
        if k:
            core_comp[nodes["core"][node : node + k]] = comp_map[comp_off[cid] + s["core_comp"]]
        node += k
    _save(work, "core_comp", core_comp)
    return out


def chunk_core_counts(src, work, index, grid: ChunkGrid, params: dict) -> dict[str, np.ndarray]:
    """Stage 3: per core, its voxels and its voxels close to a non-core voxel, in one chunk.

    "Close" ignores component boxes (an upper bound of the exact count, used
    to screen candidates). Halo: ``ceil(min_distance)``.

    Returns
    -------
    dict
        ``index`` (the chunk's); ``core`` (global numbers), ``n``, ``near``:
        int64 arrays, shape (k,).
    """
    p = _FilterParams.make(**params)
    window, inner = grid.window(index, p.near_halo)
    bc = _check_border_core(np.asarray(_open(src)[window]))
    local = np.asarray(_open(_work(work, "core_local"))[grid.region(index)])
    table = _local_table(work, "core", grid, index)
    n = np.bincount(local.ravel(), minlength=table.size)
    if p.min_ratio is None or not p.enabled:
        near_n = np.zeros_like(n)
    else:
        near = _near_mask(bc, inner, p.near_offsets)
        near &= local != 0
        near_n = np.bincount(local[near], minlength=table.size)
    present = np.flatnonzero(n[1:]) + 1
    return {
        "index": tuple(int(i) for i in index),
        "core": table[present].astype(np.int64),
        "n": n[present],
        "near": near_n[present],
    }


def merge_core_counts(work, counts: Sequence[dict], params: dict) -> list[tuple[int, int, int]]:
    """Merge 2: total voxel counts per core, and the small-core filter's candidates.

    Writes ``core_n`` and ``candidates`` (bool per global core).

    Returns
    -------
    list of tuple
        Indices of the chunks holding voxels of candidate cores (only those
        need stage 4; the others would return nothing).
    """
    p = _FilterParams.make(**params)
    n_core = _load(work, "core_comp").size - 1
    n = np.zeros(n_core + 1, dtype=np.int64)
    near = np.zeros(n_core + 1, dtype=np.int64)
    for c in counts:
        np.add.at(n, c["core"], c["n"])
        np.add.at(near, c["core"], c["near"])
    cand = p.screen(near, n)
    cand[0] = False
    _save(work, "core_n", n)
    _save(work, "candidates", cand)
    return [c["index"] for c in counts if cand[c["core"]].any()]


def chunk_candidate_flags(src, work, index, grid: ChunkGrid, params: dict) -> dict[str, np.ndarray]:
    """Stage 4: exact filter tests (component-box aware) for candidate core voxels in one chunk.

    Halo: the filter's reach (``ceil(max_distance)`` by default).

    Returns
    -------
    dict
        ``core`` (global numbers), ``near``, ``deep``: int64 arrays, shape (k,).
    """
    p = _FilterParams.make(**params)
    window, inner = grid.window(index, p.halo)
    local = np.asarray(_open(_work(work, "core_local"))[grid.region(index)])
    table = _local_table(work, "core", grid, index)
    cand = _load(work, "candidates")
    glob = table[local]
    sel = cand[glob]
    if not sel.any():
        z = np.zeros(0, np.int64)
        return {"core": z, "near": z, "deep": z}
    bc = _check_border_core(np.asarray(_open(src)[window]))
    origin = np.array([w.start for w in window], dtype=np.int64)
    lab = glob[sel].astype(np.int64)
    coords = np.stack(np.nonzero(sel), axis=1).astype(np.int64) + np.array([s.start for s in inner])
    comp = _load(work, "core_comp")[lab]
    lo = _load(work, "comp_lo")[comp] - origin
    hi = _load(work, "comp_hi")[comp] - origin
    near, deep = _exact_flags(bc, coords, lo, hi, p)
    ids, inv = np.unique(lab, return_inverse=True)
    return {
        "core": ids,
        "near": np.bincount(inv, weights=near, minlength=ids.size).astype(np.int64),
        "deep": np.bincount(inv, weights=deep, minlength=ids.size).astype(np.int64),
    }


def merge_candidate_flags(work, flags: Sequence[dict], params: dict) -> dict[str, int]:
    """Merge 3: the filter's decisions; ranks of surviving cores and label bases.

    Writes ``rank`` (per global core), ``start`` and ``survivors`` (per
    global component).

    Returns
    -------
    dict
        ``n_removed``, ``n_particles``.
    """
    p = _FilterParams.make(**params)
    n = _load(work, "core_n")
    core_comp = _load(work, "core_comp")
    cand = _load(work, "candidates")
    near = np.zeros_like(n)
    deep = np.zeros_like(n)
    for f in flags:
        np.add.at(near, f["core"], f["near"])
        np.add.at(deep, f["core"], f["deep"])
    remove = cand & p.removes(near, deep, n)
    keep = (n > 0) & ~remove
    keep[0] = False
    n_comp = _load(work, "comp_lo").shape[0] - 1
    rank, start = _particle_tables(keep, core_comp, n_comp)
    survivors = np.bincount(core_comp[keep], minlength=n_comp + 1)
    _save(work, "rank", rank)
    _save(work, "start", start)
    _save(work, "survivors", survivors)
    return {"n_removed": int(remove.sum()), "n_particles": int(np.maximum(survivors[1:], 1).sum())}


def chunk_grow(src, work, index, grid: ChunkGrid, round: int, halo: int, latest: Sequence[int] | None = None) -> dict[str, int]:
    """Stage 5, round ``round`` (1, 2, ...): grow cores into one chunk's border.

    Round 1 seeds the window (chunk + ``halo``) with the surviving cores'
    ranks; round ``r > 1`` seeds it with every voxel accepted so far (rank
    and step count, read from ``work/rank_<q>``/``work/level_<q>`` of the
    round ``q = latest[chunk]`` that last wrote each chunk). The BFS runs to
    step ``round * halo``; every voxel it reaches is accepted. Components
    with one surviving core get rank 1 and components without core rank 0
    directly; only voxels of components with several cores can stay open.

    Why accepted voxels are exact (``H = halo``; induction on rounds, with
    "every voxel at true step distance <= (r-1)H is accepted" before round
    ``r``): seeds are exact, so window distances are never below the true
    ones. A chunk voxel ``v`` at true distance ``(r-1)H < d <= rH`` has a
    shortest path whose last ``d - (r-1)H <= H`` steps start at an accepted
    voxel and stay within ``H`` voxels of ``v``, i.e. in the window, so its
    window distance is ``d``. The same holds for every 26-neighbour of ``v``
    one step closer to a core (their paths also stay within ``H`` of ``v``),
    so the maximum over them -- ``v``'s label -- is the true one. A voxel
    reached within ``rH`` steps in the window is at most ``rH`` away in
    truth, hence exact. Rounds end when no chunk has open voxels; each
    round covers ``H`` more steps (one round unless border arms run more
    than ``H`` voxels from any core).

    Writes ``work/rank_<round>`` and ``work/level_<round>`` for the chunk.

    Returns
    -------
    dict
        ``unresolved``: open voxels left in the chunk (it then takes part in
        the next round).
    """
    index = tuple(int(i) for i in index)
    if halo < 1:
        raise ValueError("halo must be >= 1")
    window, inner = grid.window(index, halo)
    region = grid.region(index)
    bc = _check_border_core(np.asarray(_open(src)[window]))
    rank_table = _load(work, "rank")
    dtype = rank_table.dtype
    if round == 1:
        labels = _read_mapped(work, "core_local", "core", grid, window, rank_table, dtype)
        seed_levels = None
    else:
        labels = np.zeros(bc.shape, dtype=dtype)
        seed_levels = np.zeros(bc.shape, dtype=np.int64)
        for idx in grid.overlapping(window):
            r = grid.region(idx)
            part = tuple(slice(max(w.start, q.start), min(w.stop, q.stop)) for w, q in zip(window, r))
            dst = tuple(slice(p.start - w.start, p.stop - w.start) for p, w in zip(part, window))
            last = int(latest[grid.chunk_id(idx)])
            labels[dst] = _open(_work(work, f"rank_{last}"))[part]
            seed_levels[dst] = _open(_work(work, f"level_{last}"))[part]
    unresolved = bc != BACKGROUND
    unresolved &= labels == 0
    levels = np.zeros(bc.shape, dtype=np.int64)
    _grow(labels, unresolved, levels=levels, seed_levels=seed_levels, max_level=round * halo)
    rank = labels[inner]
    level = levels[inner]
    comp = np.asarray(_open(_work(work, "comp_local"))[region])
    comp = _local_table(work, "comp", grid, index)[comp]
    survivors = _load(work, "survivors")[comp]
    single = survivors == 1
    rank[single] = 1
    level[single] = 0
    rank[survivors == 0] = 0
    unresolved_n = int(np.count_nonzero((survivors >= 2) & (rank == 0)))
    _open(_work(work, f"rank_{round}"), "r+")[region] = rank
    _open(_work(work, f"level_{round}"), "r+")[region] = level.astype(np.uint32)
    return {"unresolved": unresolved_n}


def chunk_relabel(work, dst, index, grid: ChunkGrid, round: int) -> None:
    """Stage 6: final labels ``start[component] + rank`` of one chunk into ``dst``.

    ``round`` is the last round that wrote this chunk.
    """
    region = grid.region(index)
    comp = np.asarray(_open(_work(work, "comp_local"))[region])
    comp = _local_table(work, "comp", grid, index)[comp]
    rank = np.asarray(_open(_work(work, f"rank_{round}"))[region])
    out = _load(work, "start")[comp]
    out += rank
    _open(dst, "r+")[region] = out


def border_core_to_instances_chunked(
    src,
    dst,
    chunk_shape: Sequence[int] | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    min_distance: float = 1,
    min_ratio: float | None = 0.95,
    max_distance: float = DEFAULT_MAX_DISTANCE,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
    remove_small_cores: bool = True,
    halo: int = 16,
) -> dict[str, int]:
    """:func:`border_core_to_instances` chunk by chunk, for volumes larger than memory.

    Runs the ``chunk_*`` stages serially over all chunks with the ``merge_*``
    steps in between (the Dask layer runs the same functions as tasks). The
    result is identical to the whole-volume function, label numbers
    included. Memory per step: one chunk plus its halo (and per-label tables).

    Parameters
    ----------
    src : zarr array or path
        Border-core volume, shape (Z, Y, X), values 0/1/2.
    dst : zarr array or path
        Output, uint32, same shape; created (chunked like ``chunk_shape``)
        when a path that does not exist. Its chunks must tile
        ``chunk_shape`` so that no two tasks write the same zarr chunk.
    chunk_shape : tuple of 3 int, optional
        Processing chunk shape; default: ``src``'s chunks.
    work_dir : path, optional
        Directory for intermediate arrays and tables (about 13 bytes per
        voxel); a temporary directory removed afterwards by default.
    min_distance, min_ratio, max_distance, max_ratio, remove_small_cores
        Small-core filter, see :func:`border_core_to_instances`.
    halo : int, default 16
        Growth halo (voxels). Larger halos make extra rounds rarer.

    Returns
    -------
    dict
        ``n_particles``, ``n_removed`` (cores), ``rounds`` (growth rounds run).
    """
    import shutil
    import tempfile

    src_arr = _open(src)
    shape = tuple(src_arr.shape)
    if len(shape) != 3:
        raise ValueError(f"border_core must be 3-D, got shape {shape}")
    chunk_shape = tuple(chunk_shape) if chunk_shape is not None else tuple(src_arr.chunks)
    grid = ChunkGrid(shape, chunk_shape)
    if isinstance(dst, (str, os.PathLike)) and not Path(dst).exists():
        dst = _create(dst, shape, grid.chunk_shape, np.uint32)
    dst_arr = _open(dst, "r+")
    if tuple(dst_arr.shape) != shape:
        raise ValueError(f"dst shape {dst_arr.shape} differs from src shape {shape}")
    if any(c % d for c, d in zip(grid.chunk_shape, dst_arr.chunks)):
        raise ValueError(f"chunk_shape {grid.chunk_shape} must be a multiple of dst chunks {dst_arr.chunks}")
    params = {
        "min_distance": min_distance,
        "min_ratio": min_ratio,
        "max_distance": max_distance,
        "max_ratio": max_ratio,
        "remove_small_cores": remove_small_cores,
    }
    _FilterParams.make(**params)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ps3d-bordercore-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare_work(work, grid)
        indices = list(grid.indices())
        summaries = [chunk_label(src_arr, work, i, grid) for i in indices]
        pairs = [chunk_face_pairs(work, i, grid) for i in indices]
        merge_labels(work, grid, summaries, pairs)
        counts = [chunk_core_counts(src_arr, work, i, grid, params) for i in indices]
        need = merge_core_counts(work, counts, params)
        flags = [chunk_candidate_flags(src_arr, work, i, grid, params) for i in need]
        info = merge_candidate_flags(work, flags, params)
        latest = np.zeros(grid.n_chunks, dtype=np.int64)
        todo = indices
        rnd = 0
        while todo:
            rnd += 1
            prepare_round(work, grid, rnd)
            results = [(i, chunk_grow(src_arr, work, i, grid, rnd, halo, latest)) for i in todo]
            for i, _ in results:
                latest[grid.chunk_id(i)] = rnd
            todo = [i for i, r in results if r["unresolved"]]
        for i in indices:
            chunk_relabel(work, dst_arr, i, grid, int(latest[grid.chunk_id(i)]))
        return {"n_particles": info["n_particles"], "n_removed": info["n_removed"], "rounds": rnd}
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def chunk_instances_to_border_core(src, dst, index, grid: ChunkGrid, thickness: int = 3, parallel: int = 1) -> None:
    """:func:`instances_to_border_core` for one chunk (halo = ``thickness``) into ``dst``.

    Exact: a voxel's nearest other-label voxel within ``thickness`` lies in
    the window, and the window's sides inside the volume are not boundaries.
    """
    thickness = _check_thickness(thickness)
    window, inner = grid.window(index, thickness)
    labels = _check_volume(np.asarray(_open(src)[window]), "labels")
    _open(dst, "r+")[grid.region(index)] = _border_core_from_labels(labels, thickness, parallel)[inner]


def instances_to_border_core_chunked(
    src, dst, chunk_shape: Sequence[int] | None = None, thickness: int = 3, *, parallel: int = 1
) -> None:
    """:func:`instances_to_border_core` chunk by chunk (zarr in, zarr out); identical result.

    ``dst`` (zarr array or path, created as uint8 when missing) must have
    chunks that tile ``chunk_shape``.
    """
    src_arr = _open(src)
    shape = tuple(src_arr.shape)
    grid = ChunkGrid(shape, tuple(chunk_shape) if chunk_shape is not None else tuple(src_arr.chunks))
    if isinstance(dst, (str, os.PathLike)) and not Path(dst).exists():
        dst = _create(dst, shape, grid.chunk_shape, np.uint8)
    dst_arr = _open(dst, "r+")
    if any(c % d for c, d in zip(grid.chunk_shape, dst_arr.chunks)):
        raise ValueError(f"chunk_shape {grid.chunk_shape} must be a multiple of dst chunks {dst_arr.chunks}")
    for index in grid.indices():
        chunk_instances_to_border_core(src_arr, dst_arr, index, grid, thickness, parallel)
