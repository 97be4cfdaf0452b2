"""Pass 1: mergeable per-label statistics, one z-slab at a time.

A slab of labels is cut into *runs*: maximal stretches of one row (fixed z
and y) that hold one label. Particles are compact, so a slab has 10 to 50
times fewer runs than voxels, and every statistic that is a sum or an
extreme over voxels is a sum or an extreme over runs, with closed forms for
the run's coordinate sums (a run of length ``L`` starting at ``x0`` has
``sum x = L x0 + L (L - 1) / 2``). The grey values of the particle voxels
are packed run after run, so grey-value sums, minima, maxima and phase
counts per run are ``np.add.reduceat`` (``minimum``, ``maximum``) over
consecutive pieces; runs are added into labels with ``ufunc.at``.

All geometric statistics are integers held in int64, so merging slabs (or
the statistics of any partition of the volume into whole z-slices) gives
exactly the whole-volume result, in any order. Grey-value sums are int64
for integer images of up to 16 bits (exact) and float64 otherwise (exact
for integer-valued grey values below 2**53 in total per particle; other
float images merge up to rounding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from ps3d_core.errors import ScanError

#: Largest particle id the table's ``particle_id`` (uint32) can hold.
MAX_LABEL = np.iinfo(np.uint32).max
#: Most phases a slab's phase code (one bit per phase) can carry.
MAX_PHASES = 64


@dataclass(frozen=True)
class LabelStats:
    """Sums and extremes over the voxels of each label, for one slab or a whole volume.

    Rows are the labels present, in increasing label order. Coordinates are
    voxel indices of the whole volume (z, y, x).

    Attributes
    ----------
    labels : ndarray, shape (N,), int64
        Label values, increasing, all > 0.
    count : ndarray, shape (N,), int64
        Voxels per label.
    first : ndarray, shape (N, 3), int64
        Sums of z, y and x.
    second : ndarray, shape (N, 6), int64
        Sums of zz, yy, xx, zy, zx and yx.
    bbox_min : ndarray, shape (N, 3), int64
        Smallest z, y, x index.
    bbox_max : ndarray, shape (N, 3), int64
        Largest z, y, x index plus one (half-open box).
    intensity_sum : ndarray, shape (N,), int64 or float64
        Sum of the grey values.
    intensity_sumsq : ndarray, shape (N,), int64 or float64
        Sum of the squared grey values.
    intensity_min, intensity_max : ndarray, shape (N,), float64
        Lowest and highest grey value.
    phase_count : ndarray, shape (N, K), int64
        Voxels per label whose grey value lies in phase k's range.
    """

    labels: np.ndarray
    count: np.ndarray
    first: np.ndarray
    second: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    intensity_sum: np.ndarray
    intensity_sumsq: np.ndarray
    intensity_min: np.ndarray
    intensity_max: np.ndarray
    phase_count: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def equals(self, other: LabelStats) -> bool:
        """Whether every array is identical (dtype and values)."""
        return all(
            getattr(self, f.name).dtype == getattr(other, f.name).dtype
            and np.array_equal(getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
        )


_SUMMED = ("count", "first", "second", "intensity_sum", "intensity_sumsq", "phase_count")


def empty_stats(n_phases: int, intensity_dtype: np.dtype) -> LabelStats:
    """Statistics of a volume without labels."""
    i64 = np.int64
    return LabelStats(
        labels=np.zeros(0, i64),
        count=np.zeros(0, i64),
        first=np.zeros((0, 3), i64),
        second=np.zeros((0, 6), i64),
        bbox_min=np.zeros((0, 3), i64),
        bbox_max=np.zeros((0, 3), i64),
        intensity_sum=np.zeros(0, intensity_dtype),
        intensity_sumsq=np.zeros(0, intensity_dtype),
        intensity_min=np.zeros(0),
        intensity_max=np.zeros(0),
        phase_count=np.zeros((0, n_phases), i64),
    )


def intensity_accumulator(dtype: np.dtype) -> np.dtype:
    """int64 for integer images of up to 16 bits (sums of squares stay exact), float64 otherwise."""
    dtype = np.dtype(dtype)
    return np.dtype(np.int64) if dtype.kind in "ui" and dtype.itemsize <= 2 else np.dtype(np.float64)


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable sort order of ``keys``, the start of each run of equal keys in it, and the unique keys."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1]))) if len(keys) else np.zeros(0, int)
    return order, starts, ordered[starts]


def _dense_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each key among the unique keys, and the unique keys (increasing).

    Label values are used as indices directly when they are small (the
    usual 1..N labels): a table lookup instead of a sort.
    """
    top = int(keys.max())
    if top <= max(4 * len(keys), 1 << 20):
        present = np.zeros(top + 1, bool)
        present[keys] = True
        unique = np.flatnonzero(present)
        lookup = np.cumsum(present) - 1
        return lookup[keys], unique.astype(np.int64)
    unique, index = np.unique(keys, return_inverse=True)
    return index, unique.astype(np.int64)


def merge_stats(parts: Iterable[LabelStats]) -> LabelStats:
    """Combine the statistics of disjoint parts of a volume (e.g. slabs).

    Sums add and boxes widen, so the result equals the statistics of the
    union of the parts, whatever their number and order.

    Parameters
    ----------
    parts : iterable of LabelStats
        With the same number of phases and the same intensity dtype; at least one.
    """
    parts = [part for part in parts]
    if not parts:
        raise ValueError("merge_stats needs at least one LabelStats")
    if len(parts) == 1:
        return parts[0]
    stacked = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(LabelStats)}
    if not len(stacked["labels"]):
        return parts[0]
    order, starts, labels = _groups(stacked["labels"])
    merged = {"labels": labels}
    for name in _SUMMED:
        merged[name] = np.add.reduceat(stacked[name][order], starts, axis=0)
    merged["bbox_min"] = np.minimum.reduceat(stacked["bbox_min"][order], starts, axis=0)
    merged["bbox_max"] = np.maximum.reduceat(stacked["bbox_max"][order], starts, axis=0)
    merged["intensity_min"] = np.minimum.reduceat(stacked["intensity_min"][order], starts)
    merged["intensity_max"] = np.maximum.reduceat(stacked["intensity_max"][order], starts)
    return LabelStats(**merged)


def check_phase_ranges(phases: Mapping[str, tuple[float, float]]) -> list[tuple[float, float]]:
    """The ranges ``[low, high)`` of ``phases`` in order, checked to be finite and ordered."""
    ranges = []
    for name, (low, high) in phases.items():
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"phase {name!r}: range [{low}, {high}) must be finite with low < high")
        ranges.append((low, high))
    if len(ranges) > MAX_PHASES:
        raise ValueError(f"at most {MAX_PHASES} phases are supported, got {len(ranges)}")
    return ranges


def _code_dtype(n_phases: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_phases <= np.dtype(dtype).itemsize * 8:
            return np.dtype(dtype)
    raise ValueError(f"at most {MAX_PHASES} phases are supported, got {n_phases}")


def phase_codes(image: np.ndarray, ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Bit k set where ``ranges[k][0] <= image < ranges[k][1]`` (ranges may overlap).

    Parameters
    ----------
    image : ndarray, any shape, integer or float
    ranges : sequence of (low, high)
        At most :data:`MAX_PHASES`.

    Returns
    -------
    ndarray, the shape of ``image``, the smallest unsigned dtype holding one bit per phase
    """
    dtype = _code_dtype(len(ranges))
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 2:
        # one table lookup per voxel instead of two comparisons per phase
        info = np.iinfo(image.dtype)
        values = np.arange(info.min, info.max + 1, dtype=np.int64)
        table = phase_codes(values, ranges)
        index = image if info.min == 0 else image.astype(np.int64) - info.min
        return table[index]
    codes = np.zeros(image.shape, dtype)
    for bit, (low, high) in enumerate(ranges):
        inside = (image >= low) & (image < high)
        codes |= inside.astype(dtype) << dtype.type(bit)
    return codes


def slab_stats(
    labels: np.ndarray,
    image: np.ndarray,
    z0: int,
    ranges: Sequence[tuple[float, float]],
    *,
    source: str = "<labels>",
) -> LabelStats:
    """Statistics of every label in one slab of whole z-slices.

    Parameters
    ----------
    labels : ndarray, shape (Zs, Y, X), integer
        Particle ids, 0 = background.
    image : ndarray, shape (Zs, Y, X), integer or float
        Grey values of the same voxels.
    z0 : int
        z index of the slab's first slice in the volume.
    ranges : sequence of (low, high)
        Phase grey-value ranges ``[low, high)``.
    source : str
        Names the labels in errors.

    Raises
    ------
    ScanError
        A negative label, or one above :data:`MAX_LABEL`.
    """
    n_phases = len(ranges)
    accumulator = intensity_accumulator(image.dtype)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        z = z0 + int(np.flatnonzero((labels < 0).any(axis=(1, 2)))[0])
        raise ScanError(source, f"holds negative labels (slice z={z}); particle ids must be >= 0")
    _, ny, nx = labels.shape
    flat = labels.reshape(-1)
    n = flat.size
    if n == 0:
        return empty_stats(n_phases, accumulator)
    # A run ends where the label changes and at every row end.
    boundary = np.empty(n, bool)
    boundary[0] = True
    np.not_equal(flat[1:], flat[:-1], out=boundary[1:])
    boundary[::nx] = True
    starts = np.flatnonzero(boundary)
    del boundary
    run_label = flat[starts]
    foreground = run_label != 0
    if not foreground.any():
        return empty_stats(n_phases, accumulator)
    if run_label.max() > MAX_LABEL:
        raise ScanError(source, f"holds label {int(run_label.max())}; particle ids must fit in uint32 (<= {MAX_LABEL})")

    keep = np.flatnonzero(foreground)
    index, unique = _dense_index(run_label[keep].astype(np.int64))
    size = len(unique)

    def total(per_run: np.ndarray, dtype: type = np.int64) -> np.ndarray:
        # ufunc.at is exact on int64 and, in numpy 2, as fast as a weighted bincount (no sort);
        # one 1D column at a time, as ufunc.at over 2D rows is slower
        out = np.zeros(size, dtype)
        np.add.at(out, index, per_run)
        return out

    length = np.diff(starts, append=n)[keep]
    # Grey values of the particle voxels only, packed run after run (most voxels are
    # background): per-run sums and extremes are reductions over consecutive pieces.
    values = image.reshape(-1)[flat != 0]
    offsets = np.concatenate(([0], np.cumsum(length)[:-1]))
    if accumulator == np.int64:
        exact = values.astype(np.int64)  # squares of <= 16-bit values and their sums fit
        isum = total(np.add.reduceat(exact, offsets))
        isumsq = total(np.add.reduceat(exact * exact, offsets))
        del exact
    else:
        as_float = values.astype(np.float64)
        isum = total(np.add.reduceat(as_float, offsets), np.float64)
        isumsq = total(np.add.reduceat(np.square(as_float, out=as_float), offsets), np.float64)
        del as_float
    grey_min = np.full(size, np.inf)
    np.minimum.at(grey_min, index, np.minimum.reduceat(values, offsets))
    grey_max = np.full(size, -np.inf)
    np.maximum.at(grey_max, index, np.maximum.reduceat(values, offsets))
    # Phase voxels per run: the sum over the run of phase k's bit. Runs are not
    # split by phase: noise around a threshold would fragment them into single voxels.
    phase_count = np.zeros((size, n_phases), np.int64)
    if n_phases:
        codes = phase_codes(values, ranges)
        for bit in range(n_phases):
            in_phase = np.add.reduceat(codes & codes.dtype.type(1 << bit), offsets, dtype=np.int64) >> bit
            phase_count[:, bit] = total(in_phase)
        del codes
    del values

    starts = starts[keep]
    row = starts // nx
    x0 = starts - row * nx
    zl = row // ny  # z within the slab: keeps the sums small; shifted to the volume below
    y = row - zl * ny
    del row, starts
    sx = length * x0 + length * (length - 1) // 2
    sxx = length * x0 * x0 + x0 * length * (length - 1) + (length - 1) * length * (2 * length - 1) // 6
    count = total(length)
    lz, ly = length * zl, length * y
    sz, sy, sx_ = total(lz), total(ly), total(sx)
    szz, syy, sxx_ = total(lz * zl), total(ly * y), total(sxx)
    szy, szx, syx = total(lz * y), total(zl * sx), total(y * sx)
    # moments about z = 0 of the volume from those about the slab's first slice
    szz = szz + 2 * z0 * sz + z0 * z0 * count
    szy = szy + z0 * sy
    szx = szx + z0 * sx_
    sz = sz + z0 * count

    bbox_min = np.empty((size, 3), np.int64)
    bbox_max = np.empty((size, 3), np.int64)
    for axis, (low, high) in enumerate(((zl + z0, zl + z0 + 1), (y, y + 1), (x0, x0 + length))):
        lowest = np.full(size, np.iinfo(np.int64).max)
        np.minimum.at(lowest, index, low)
        highest = np.full(size, -1, np.int64)
        np.maximum.at(highest, index, high)
        bbox_min[:, axis], bbox_max[:, axis] = lowest, highest
    result = {
        "labels": unique,
        "count": count,
        "first": np.stack([sz, sy, sx_], axis=1),
        "second": np.stack([szz, syy, sxx_, szy, szx, syx], axis=1),
        "bbox_min": bbox_min,
        "bbox_max": bbox_max,
        "intensity_sum": isum.astype(accumulator),
        "intensity_sumsq": isumsq.astype(accumulator),
        "intensity_min": grey_min,
        "intensity_max": grey_max,
        "phase_count": phase_count,
    }
    return LabelStats(**result)
