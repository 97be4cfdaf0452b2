"""The particle table of a labelled scan: two streamed passes (see :mod:`ps3d_core.features`)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ps3d_core.errors import ScanError
from ps3d_core.features import shape
from ps3d_core.features.phases import auto_phases, sample_particle_values
from ps3d_core.features.stats import (
    LabelStats,
    check_phase_ranges,
    empty_stats,
    intensity_accumulator,
    merge_stats,
    slab_stats,
)
from ps3d_core.io.atomic import atomic_output
from ps3d_core.io.ngff import open_ome_zarr
from ps3d_core.io.volumes import ArrayVolume, Volume, is_zarr, open_volume
from ps3d_core.particle_size import outside_value as detect_outside_value
from schemas.particles import particle_schema, phase_column

#: Voxels per slab when ``slab_depth`` is not given: 16 Mi voxels (64 MB of uint32 labels).
SLAB_VOXELS = 16 * 2**20
#: Particles per task sent to a pass-2 worker.
BATCH_PARTICLES = 64
#: Parquet key-value metadata keys written by :func:`write_features_parquet`.
META_PHASES = "ps3d.phases"
META_PHASES_SOURCE = "ps3d.phases_source"
META_PHASES_METHOD = "ps3d.phases_method"

Progress = Callable[[str, int, int], None]
PhasesSource = Literal["scan.json", "auto"]


@dataclass(frozen=True)
class FeatureResult:
    """The particle table of one scan and how it was made.

    Attributes
    ----------
    table : pyarrow.Table
        One row per particle in increasing ``particle_id``, with the schema
        ``schemas.particles.particle_schema(phases)`` exactly.
    phases : dict of str to (float, float)
        Phase grey-value ranges ``[low, high)`` used for the fraction columns, in column order.
    phases_source : {"scan.json", "auto"}
        Given by the caller (``scan.json``) or found from the histogram (record them with the sample).
    phases_method : str
        How the phases were found (or "given").
    outside_value : float or None
        The grey value of the outside of the cylindrical field of view, None when the scan shows none.
    smoothed_surface_fallbacks : int
        Particles too small or thin for the smoothed surface, meshed from the binary crop.
    seconds : dict of str to float
        Wall time of ``phases``, ``pass1``, ``pass2`` and ``table``.
    """

    table: pa.Table
    phases: dict[str, tuple[float, float]]
    phases_source: PhasesSource
    phases_method: str
    outside_value: float | None
    smoothed_surface_fallbacks: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# --- input checks ----------------------------------------------------------------


def _as_volume(data: Volume | np.ndarray, name: str) -> Volume:
    if isinstance(data, Volume):
        return data
    array = np.asarray(data)
    if array.ndim != 3:
        raise ScanError(name, f"has shape {array.shape}; a 3D (z, y, x) array is needed")
    return ArrayVolume(array, name, None)


def check_spacing(spacing_zyx_mm: object, source: str | os.PathLike[str]) -> tuple[float, float, float]:
    """The voxel size as three positive finite floats (z, y, x) in mm, else ScanError naming ``source``.

    One number means isotropic voxels.
    """
    try:
        values = np.asarray(spacing_zyx_mm, dtype=float)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.ndim == 0:
        values = np.full(3, values)
    if spacing_zyx_mm is None or values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise ScanError(
            source, f"needs a voxel size of 1 or 3 positive finite numbers (z, y, x) in mm, got {spacing_zyx_mm!r}"
        )
    return tuple(float(v) for v in values)


def _check_inputs(labels: Volume, image: Volume) -> None:
    if labels.dtype.kind not in "ui":
        raise ScanError(labels.path, f"has {labels.dtype} voxels; particle labels must be integers")
    if tuple(labels.shape) != tuple(image.shape):
        shape = "x".join(map(str, labels.shape))
        raise ScanError(
            labels.path,
            f"is {shape} voxels (z x y x x), but the scan {image.path} is {'x'.join(map(str, image.shape))}: "
            "labels must be on the scan's grid",
        )


def default_slab_depth(shape: Sequence[int]) -> int:
    """Slices per slab: about :data:`SLAB_VOXELS` voxels, at least one slice."""
    return max(1, min(int(shape[0]), SLAB_VOXELS // (int(shape[1]) * int(shape[2]))))


# --- pass 1 --------------------------------------------------------------------------


def chunk_alignment(*volumes: Volume) -> int:
    """Slices per stored chunk of the volumes (the largest): reads from multiples of it decode each chunk once."""
    return max(int(volume.chunk_depth) for volume in volumes)


def read_ranges(depth_total: int, slab_depth: int, align: int) -> Iterator[tuple[int, int]]:
    """``(z0, z1)`` of the slabs read in turn: ``slab_depth`` rounded up to a multiple of ``align``."""
    step = max(align, -(-slab_depth // align) * align)
    for z0 in range(0, depth_total, step):
        yield z0, min(z0 + step, depth_total)


def stream_stats(
    labels: Volume,
    image: Volume,
    ranges: Sequence[tuple[float, float]],
    slab_depth: int,
    progress: Progress | None = None,
) -> LabelStats:
    """Pass 1: per-label statistics of the whole volume, streamed in z-slabs.

    Slabs are read chunk-aligned (see :func:`read_ranges`: a zarr with
    128-slice chunks is read 128 slices at a time, so each chunk is decoded
    once) and measured ``slab_depth`` slices at a time, which bounds the
    temporaries. Peak memory: one read slab of labels and image, plus
    about 10 bytes per voxel of one ``slab_depth`` slab, plus the
    per-slab statistics. The slabs' statistics are merged exactly
    (:func:`~ps3d_core.features.stats.merge_stats`).
    """
    depth_total = labels.shape[0]
    parts = []
    for r0, r1 in read_ranges(depth_total, slab_depth, chunk_alignment(labels, image)):
        label_slab, image_slab = labels.read(r0, r1), image.read(r0, r1)
        for z0 in range(r0, r1, slab_depth):
            z1 = min(z0 + slab_depth, r1)
            within = slice(z0 - r0, z1 - r0)
            parts.append(slab_stats(label_slab[within], image_slab[within], z0, ranges, source=str(labels.path)))
        del label_slab, image_slab
        if progress is not None:
            progress("features: pass 1", r1, depth_total)
    return merge_stats(parts) if parts else empty_stats(len(ranges), intensity_accumulator(image.dtype))


# --- pass 2 --------------------------------------------------------------------------

#: Per-particle results of pass 2, in this column order.
CROP_COLUMNS = (
    "surface_area_mm2",
    "mesh_volume_mm3",
    "hull_volume_mm3",
    "feret_max_mm",
    "feret_min_mm",
    "intensity_p10",
    "intensity_p50",
    "intensity_p90",
    "touches_fov",
    "smoothed",
)


def measure_crop(
    mask: np.ndarray, image: np.ndarray, spacing_zyx_mm: Sequence[float], outside: float | None
) -> np.ndarray:
    """Everything pass 2 measures on one particle.

    Parameters
    ----------
    mask : ndarray, shape (z, y, x), bool
        The particle's voxels in its bounding box grown by one voxel (less at the volume's faces).
    image : ndarray, same shape, integer or float
        Grey values of the same crop.
    spacing_zyx_mm : (float, float, float)
    outside : float or None
        Grey value outside the cylindrical field of view.

    Returns
    -------
    ndarray, shape (len(CROP_COLUMNS),), float64
        In the order of :data:`CROP_COLUMNS`; ``touches_fov`` and ``smoothed`` as 0/1.

    Notes
    -----
    Call it inside :func:`single_threaded_blas` (as :func:`measure_crops` does).
    """
    values = image[mask]
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    touches_fov = False
    if outside is not None:
        # a voxel in the particle or next to it in its slice (4-neighbours) shows the outside value
        near = mask.copy()
        near[:, 1:] |= mask[:, :-1]
        near[:, :-1] |= mask[:, 1:]
        near[:, :, 1:] |= mask[:, :, :-1]
        near[:, :, :-1] |= mask[:, :, 1:]
        touches_fov = bool((image[near] == outside).any())
    vertices, faces, smoothed = shape.surface_mesh(mask, spacing_zyx_mm)
    hull_volume, feret_max, feret_min = shape.hull_measures(vertices)
    return np.array(
        [
            shape.mesh_area(vertices, faces),
            shape.mesh_volume(vertices, faces),
            hull_volume,
            feret_max,
            feret_min,
            p10,
            p50,
            p90,
            touches_fov,
            smoothed,
        ],
        dtype=np.float64,
    )


def _measure_batch(
    rows: np.ndarray,
    crops: list[tuple[np.ndarray, np.ndarray]],
    spacing: tuple[float, float, float],
    outside: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    return rows, np.stack([measure_crop(mask, image, spacing, outside) for mask, image in crops])


def _worker_init() -> None:
    # Pass 2's matrix products are small: BLAS threads only fight the other workers.
    _limit_blas_threads()


def _limit_blas_threads():
    """Limit BLAS to one thread in this process until ``.restore_original_limits()``; None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the pinned scientific stack
        return None
    return threadpool_limits(limits=1, user_api="blas")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with BLAS limited to one thread (process-wide).

    Pass 2 multiplies matrices of a few thousand by 3 entries: a
    multi-threaded BLAS spends more time waking its threads than computing,
    and on a busy machine was 10 times slower. :func:`measure_crops` uses
    it; wrap direct calls of :func:`measure_crop` in it too.
    """
    limits = _limit_blas_threads()
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()


def crop_batches(
    labels: Volume,
    image: Volume,
    stats: LabelStats,
    slab_depth: int,
    batch_size: int = BATCH_PARTICLES,
) -> Iterator[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]:
    """Particle crops in batches, read slab-wise.

    Particles are visited in order of their first slice; a rolling buffer of
    slices holds every particle of the next ``slab_depth`` slices whole
    (taller particles extend it), so each slice is read once; reads are
    chunk-aligned like pass 1's.

    Yields
    ------
    rows : ndarray, shape (b,), int
        Rows of ``stats`` measured.
    crops : list of (mask, image)
        The particle's bounding box grown by one voxel, clipped to the volume:
        mask bool, image in the image's dtype.
    """
    shape_zyx = np.array(labels.shape)
    depth_total = int(shape_zyx[0])
    align = chunk_alignment(labels, image)
    low = np.maximum(stats.bbox_min - 1, 0)
    high = np.minimum(stats.bbox_max + 1, shape_zyx)
    order = np.argsort(low[:, 0], kind="stable")
    first_slice = low[order, 0]
    buffer_z0 = buffer_z1 = 0
    lab_buffer = img_buffer = None
    i = 0
    while i < len(order):
        start = int(first_slice[i])
        stop_group = max(i + 1, int(np.searchsorted(first_slice, start + slab_depth, side="left")))
        group = order[i:stop_group]
        # reads begin and end on chunk boundaries, so each stored chunk is decoded once
        need = min(depth_total, -(-int(high[group, 0].max()) // align) * align)
        if lab_buffer is None or start >= buffer_z1:
            begin = start // align * align
            lab_buffer, img_buffer = labels.read(begin, need), image.read(begin, need)
            buffer_z0, buffer_z1 = begin, need
        elif need > buffer_z1:
            keep = slice(start - buffer_z0, None)
            lab_buffer = np.concatenate([lab_buffer[keep], labels.read(buffer_z1, need)])
            img_buffer = np.concatenate([img_buffer[keep], image.read(buffer_z1, need)])
            buffer_z0, buffer_z1 = start, need
        for b in range(0, len(group), batch_size):
            rows = group[b : b + batch_size]
            crops = []
            for row in rows:
                box = (slice(low[row, 0] - buffer_z0, high[row, 0] - buffer_z0),) + tuple(
                    slice(low[row, axis], high[row, axis]) for axis in (1, 2)
                )
                crops.append((lab_buffer[box] == stats.labels[row], img_buffer[box].copy()))
            yield rows, crops
        i = stop_group


def _executor(workers: int, parallel: Literal["process", "thread"]) -> Executor:
    if parallel == "thread":
        return ThreadPoolExecutor(max_workers=workers)
    # spawn: the parent may hold zarr/blosc threads, which fork would copy mid-lock
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)


def measure_crops(
    labels: Volume,
    image: Volume,
    stats: LabelStats,
    spacing: tuple[float, float, float],
    outside: float | None,
    slab_depth: int,
    workers: int = 1,
    parallel: Literal["process", "thread"] = "thread",
    progress: Progress | None = None,
) -> np.ndarray:
    """Pass 2: :func:`measure_crop` for every particle of ``stats``.

    Returns
    -------
    ndarray, shape (N, len(CROP_COLUMNS)), float64, rows as in ``stats``
    """
    results = np.full((len(stats), len(CROP_COLUMNS)), np.nan)
    done = 0

    def collect(rows: np.ndarray, values: np.ndarray) -> None:
        nonlocal done
        results[rows] = values
        done += len(rows)
        if progress is not None:
            progress("features: pass 2", done, len(stats))

    batches = crop_batches(labels, image, stats, slab_depth)
    with single_threaded_blas():  # also for the thread pool: one process, one BLAS
        if workers <= 1 or len(stats) <= BATCH_PARTICLES:  # a pool costs more than it saves
            for rows, crops in batches:
                collect(*_measure_batch(rows, crops, spacing, outside))
            return results
        with _executor(workers, parallel) as pool:
            pending: deque[Future] = deque()
            for rows, crops in batches:
                pending.append(pool.submit(_measure_batch, rows, crops, spacing, outside))
                # bounded read-ahead: at most a few batches per worker in memory
                while len(pending) > 3 * workers or (pending and pending[0].done()):
                    collect(*pending.popleft().result())
            while pending:
                collect(*pending.popleft().result())
        return results


# --- the table ---------------------------------------------------------------------


def _intensity_moments(stats: LabelStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation of the grey values per label."""
    n = stats.count
    mean = stats.intensity_sum / n
    if stats.intensity_sum.dtype.kind == "i":
        # n * sum(x^2) - sum(x)^2 in exact integers (Python ints: it overflows int64)
        exact = n.astype(object) * stats.intensity_sumsq.astype(object) - stats.intensity_sum.astype(object) ** 2
        variance = np.array([float(v) for v in exact], dtype=np.float64) / (n.astype(np.float64) ** 2)
    else:
        variance = np.maximum(stats.intensity_sumsq / n - mean * mean, 0.0)
    return mean, np.sqrt(variance)


def principal_axes(stats: LabelStats, spacing: tuple[float, float, float]) -> np.ndarray:
    """Full axis lengths (mm) of the ellipsoid with each particle's second moments.

    The covariance of the voxel centres plus the variance of a point
    uniform in one voxel (``spacing**2 / 12`` per axis) is the covariance of
    the particle as a union of solid boxes: a box of ``L`` voxels gets
    ``lambda = (L * spacing)**2 / 12``. An ellipsoid of semi-axis ``a`` has
    ``lambda = a**2 / 5``, hence the full length ``2 sqrt(5 lambda)``.

    Returns
    -------
    ndarray, shape (N, 3), float64
        Major, intermediate and minor axis lengths.
    """
    n = stats.count.astype(np.float64)
    mean = stats.first / n[:, None]
    second = stats.second / n[:, None]
    cov = np.empty((len(n), 3, 3))
    pairs = ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 0, 1), (4, 0, 2), (5, 1, 2))
    for k, i, j in pairs:
        cov[:, i, j] = cov[:, j, i] = (second[:, k] - mean[:, i] * mean[:, j]) * spacing[i] * spacing[j]
    cov[:, range(3), range(3)] += np.square(spacing) / 12.0
    eigenvalues = np.linalg.eigvalsh(cov)[:, ::-1] if len(n) else np.zeros((0, 3))
    return 2.0 * np.sqrt(5.0 * np.maximum(eigenvalues, 0.0))


def build_table(
    stats: LabelStats,
    crops: np.ndarray,
    shape_zyx: Sequence[int],
    spacing: tuple[float, float, float],
    sample_id: str,
    run_id: str,
    phase_names: Sequence[str],
) -> pa.Table:
    """Assemble the particle table from pass 1 statistics and pass 2 results (schema order and types)."""
    schema = particle_schema(phase_names)
    n = len(stats)
    count = stats.count.astype(np.float64)
    voxel_volume = math.prod(spacing)
    volume = count * voxel_volume
    crop = {name: crops[:, k] for k, name in enumerate(CROP_COLUMNS)}
    axes = principal_axes(stats, spacing)
    mean, std = _intensity_moments(stats)
    box_voxels = np.prod(stats.bbox_max - stats.bbox_min, axis=1).astype(np.float64)
    on_face = ((stats.bbox_min == 0) | (stats.bbox_max == np.asarray(shape_zyx))).any(axis=1)
    columns = {
        "sample_id": pa.array([sample_id] * n, pa.string()),
        "particle_id": stats.labels.astype(np.uint32),
        "run_id": pa.array([run_id] * n, pa.string()),
        "voxel_count": stats.count,
        "volume_mm3": volume,
        "esd_mm": np.cbrt(6.0 * volume / math.pi),
        "surface_area_mm2": crop["surface_area_mm2"],
        "sphericity": math.pi ** (1 / 3) * (6.0 * volume) ** (2 / 3) / crop["surface_area_mm2"],
        "axis_major_mm": axes[:, 0],
        "axis_intermediate_mm": axes[:, 1],
        "axis_minor_mm": axes[:, 2],
        "elongation": axes[:, 1] / axes[:, 0],
        "flatness": axes[:, 2] / axes[:, 1],
        "feret_max_mm": crop["feret_max_mm"],
        "feret_min_mm": crop["feret_min_mm"],
        "solidity": crop["mesh_volume_mm3"] / crop["hull_volume_mm3"],
        "extent": count / box_voxels,
        "intensity_mean": mean,
        "intensity_std": std,
        "intensity_min": stats.intensity_min,
        "intensity_max": stats.intensity_max,
        "intensity_p10": crop["intensity_p10"],
        "intensity_p50": crop["intensity_p50"],
        "intensity_p90": crop["intensity_p90"],
        "touches_border": on_face | (crop["touches_fov"] > 0),
    }
    for axis, name in enumerate("zyx"):
        columns[f"bbox_{name}0"] = stats.bbox_min[:, axis].astype(np.int32)
        columns[f"bbox_{name}1"] = stats.bbox_max[:, axis].astype(np.int32)
        columns[f"centroid_{name}_mm"] = stats.first[:, axis] / count * spacing[axis]
    for k, name in enumerate(phase_names):
        columns[phase_column(name)] = stats.phase_count[:, k] / count
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --- the entry point -----------------------------------------------------------------


def _resolve_outside(image: Volume, outside_value: float | Literal["auto"] | None) -> float | None:
    if outside_value == "auto":
        return detect_outside_value(image)
    return None if outside_value is None else float(outside_value)


def extract_features(
    labels: Volume | np.ndarray,
    image: Volume | np.ndarray,
    spacing_zyx_mm: Sequence[float] | float,
    sample_id: str,
    run_id: str,
    phases: Mapping[str, tuple[float, float]] | None = None,
    *,
    slab_depth: int | None = None,
    workers: int = 1,
    parallel: Literal["process", "thread"] = "thread",
    outside_value: float | Literal["auto"] | None = "auto",
    progress: Progress | None = None,
) -> FeatureResult:
    """Measure every particle of a labelled scan: one row per label > 0.

    Parameters
    ----------
    labels : Volume or ndarray, shape (Z, Y, X), integer
        Particle ids (0 background), e.g. ``labels.ome.zarr`` of ``ps3d segment``; read in slabs.
    image : Volume or ndarray, shape (Z, Y, X), integer or float
        The scan's grey values on the same grid.
    spacing_zyx_mm : float or (float, float, float)
        Voxel size in mm (anisotropic allowed).
    sample_id, run_id : str
        Written into every row.
    phases : mapping of name to (low, high), optional
        Grey-value ranges ``[low, high)`` of the phases (``scan.json``); None
        finds them from the histogram (:mod:`ps3d_core.features.phases`).
    slab_depth : int, optional
        Slices read at once, in both passes; default about 16 Mi voxels
        per slab. Peak memory is a few slabs plus the per-particle arrays.
    workers : int
        Parallel workers for pass 2 (1: in this process).
    parallel : {"thread", "process"}
        Pass 2 workers as threads (default) or processes. On the shared
        2-core machine of BENCHMARKS.md threads were the fastest (13,824
        particles: 35-40 s against 46-53 s with processes and 46 s
        serial): processes pay interpreter start-up and more CPU, and the
        session's CPU share, not the core count, was the limit. On an idle
        machine with more cores, processes should scale further, since
        threads share the GIL: measure with ``bench/feature_speed.py
        parallel``. Processes are started with ``spawn``: a script using
        them needs the ``if __name__ == "__main__":`` guard.
    outside_value : float, "auto" or None
        Grey value outside the cylindrical field of view; "auto" detects it
        (:func:`ps3d_core.particle_size.outside_value`), None assumes no
        cylindrical field of view.
    progress : callable(stage, done, total), optional

    Returns
    -------
    FeatureResult

    Raises
    ------
    ScanError
        Labels not integer, negative or above uint32; labels and image of
        different shapes; a missing or invalid voxel size; a damaged file.
    """
    labels_volume = _as_volume(labels, "<labels array>")
    image_volume = _as_volume(image, "<image array>")
    _check_inputs(labels_volume, image_volume)
    spacing = check_spacing(spacing_zyx_mm, image_volume.path)
    if slab_depth is not None and slab_depth < 1:
        raise ValueError(f"slab_depth must be >= 1, got {slab_depth}")
    depth = slab_depth or default_slab_depth(labels_volume.shape)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    if phases is None:
        sample, described = sample_particle_values(labels_volume, image_volume)
        found, method = auto_phases(sample, image_volume.dtype)
        phase_map, source, method = found, "auto", f"{method}; {described}"
    else:
        phase_map, source, method = dict(phases), "scan.json", "given"
    try:
        ranges = check_phase_ranges(phase_map)
    except ValueError as error:
        raise ScanError(image_volume.path, str(error)) from None
    outside = _resolve_outside(image_volume, outside_value)
    seconds["phases"] = time.perf_counter() - started

    started = time.perf_counter()
    stats = stream_stats(labels_volume, image_volume, ranges, depth, progress)
    seconds["pass1"] = time.perf_counter() - started

    started = time.perf_counter()
    crops = measure_crops(labels_volume, image_volume, stats, spacing, outside, depth, workers, parallel, progress)
    seconds["pass2"] = time.perf_counter() - started

    started = time.perf_counter()
    table = build_table(stats, crops, labels_volume.shape, spacing, sample_id, run_id, list(phase_map))
    seconds["table"] = time.perf_counter() - started
    return FeatureResult(
        table=table,
        phases={name: (float(lo), float(hi)) for name, (lo, hi) in phase_map.items()},
        phases_source=source,
        phases_method=method,
        outside_value=outside,
        smoothed_surface_fallbacks=int((crops[:, CROP_COLUMNS.index("smoothed")] == 0).sum()),
        seconds=seconds,
    )


def new_run_id(prefix: str = "features") -> str:
    """A fresh run id: ``<prefix>-<UTC time>-<8 hex digits>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:8]}"


def _labels_sample_id(path: Path) -> str | None:
    """The sample id that ``ps3d segment`` records in a labels.ome.zarr (``attributes["ps3d"]``), if any."""
    if not is_zarr(path):
        return None
    try:
        _, _, attributes = open_ome_zarr(path)
    except ScanError:
        return None  # a bare zarr array: nothing recorded
    record = attributes.get("ps3d")
    return record.get("sample_id") if isinstance(record, dict) else None


def extract_features_from_files(
    labels_path: str | os.PathLike[str],
    scan_path: str | os.PathLike[str],
    run_id: str,
    *,
    slab_depth: int | None = None,
    workers: int = 1,
    parallel: Literal["process", "thread"] = "thread",
    progress: Progress | None = None,
) -> FeatureResult:
    """:func:`extract_features` of a label file and its scan directory.

    The voxel size, sample id and phases come from the scan's ``scan.json``.

    Parameters
    ----------
    labels_path : path
        ``labels.ome.zarr`` of ``ps3d segment``, or a TIFF/zarr/NIfTI label volume.
    scan_path : path
        The scan directory (or an original ParticleSeg3D dataset image).

    Raises
    ------
    ScanError
        Besides :func:`extract_features`'s reasons: labels recorded for
        another sample, or whose own voxel size differs from the scan's.
    """
    from ps3d_core.io.scans import open_scan

    labels_path = Path(labels_path)
    with open_scan(scan_path) as scan, open_volume(labels_path) as labels:
        metadata = scan.metadata
        if labels_path.resolve() == Path(scan.volume.path).resolve():
            raise ScanError(labels_path, "is the scan's image itself; pass the particle labels (labels.ome.zarr)")
        recorded = _labels_sample_id(labels_path)
        if recorded is not None and recorded != metadata.sample_id:
            raise ScanError(
                labels_path,
                f"holds the labels of sample {recorded!r}, but the scan {scan.path} is sample {metadata.sample_id!r}",
            )
        own = labels.spacing_zyx_mm
        if own is not None and not np.allclose(own, metadata.spacing_zyx_mm, rtol=1e-3, atol=0):
            raise ScanError(
                labels_path,
                f"has voxel size {list(own)} mm, but scan.json of {scan.path} says "
                f"{list(metadata.spacing_zyx_mm)} mm: labels must be on the scan's grid",
            )
        return extract_features(
            labels,
            scan.volume,
            metadata.spacing_zyx_mm,
            metadata.sample_id,
            run_id,
            metadata.phases,
            slab_depth=slab_depth,
            workers=workers,
            parallel=parallel,
            progress=progress,
        )


def write_features_parquet(result: FeatureResult, path: str | os.PathLike[str]) -> Path:
    """Write the particle table to Parquet atomically, the phases in its key-value metadata.

    Keys (besides the schema's own ``ps3d.table`` and ``ps3d.table_version``):
    ``ps3d.phases`` (JSON ``{name: [low, high]}``), ``ps3d.phases_source``
    and ``ps3d.phases_method``; read them back with :func:`read_phases`.
    """
    metadata = dict(result.table.schema.metadata or {})
    metadata[META_PHASES.encode()] = json.dumps({k: list(v) for k, v in result.phases.items()}).encode()
    metadata[META_PHASES_SOURCE.encode()] = result.phases_source.encode()
    metadata[META_PHASES_METHOD.encode()] = result.phases_method.encode()
    table = result.table.replace_schema_metadata(metadata)
    with atomic_output(path) as temporary:
        pq.write_table(table, temporary)
    return Path(path)


def read_phases(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[float, float]], str]:
    """Phases and their source recorded in a particle Parquet file by :func:`write_features_parquet`."""
    metadata = pq.read_schema(path).metadata or {}
    phases = json.loads(metadata.get(META_PHASES.encode(), b"{}"))
    source = metadata.get(META_PHASES_SOURCE.encode(), b"").decode()
    return {name: (float(lo), float(hi)) for name, (lo, hi) in phases.items()}, source
