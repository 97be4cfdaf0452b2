"""Scan -> particle instances, in chunk tasks with bounded memory, resumable.

Stages (each a list of independent tasks ``fn(plan_path, chunk_index[, int])``
that read and write zarr arrays in the work directory and return a small
result; between stages the driver merges the results, in-process, cheaply):

==================  ===========================================  ==========================
stage               task function                                grid
==================  ===========================================  ==========================
predict             :func:`predict_chunk`                        target chunks
instances/label     :func:`label_chunk`                          target chunks
instances/faces     :func:`face_pairs_chunk`                     target chunks
instances/counts    :func:`core_counts_chunk`                    target chunks
instances/flags     :func:`candidate_flags_chunk` (candidates)   target chunks
instances/grow_<r>  :func:`grow_chunk` (``r`` = round)           target chunks (open ones)
instances/relabel   :func:`relabel_chunk`                        target chunks
labels              :func:`resample_back_chunk`                  source (output) chunks
write               :func:`write_labels_chunk`                   source (output) chunks
pyramid_<k>         :func:`pyramid_chunk` (``k`` = level)        level-k chunks
==================  ===========================================  ==========================

1. **predict**: the chunk's input (the union of the global-grid patches that
   intersect it: the chunk plus up to one patch of margin) is read from the
   scan (the source box its trilinear interpolation needs), normalised as the
   model prescribes (levels computed once per scan, :mod:`ps3d_core.intensity`), resampled to the target grid and predicted patch by
   patch (:mod:`ps3d_core.inference.predict`); the border-core argmax goes to
   ``work/border_core.zarr``. Equal to a whole-volume sliding window.
2. **instances**: :mod:`ps3d_core.bordercore`'s chunk functions (globally
   consistent labels, identical to the whole-volume conversion) into
   ``work/instances.zarr``.
3. **labels**: each source voxel takes the instance of the target voxel
   containing its centre (``work/labels_raw.zarr``, the scan's shape); the
   tasks return per-label voxel counts.
4. Merge: particles smaller than ``min_rel_particle_size`` x the mean particle
   volume (source voxels) are removed, the rest renumbered ``1..N`` in their
   order (stable).
5. **write**/**pyramid**: the renumbered labels into an OME-Zarr label image
   (NGFF 0.5, ``image-label``, every second voxel per level), moved to
   ``OUT/labels.ome.zarr`` when complete; then ``OUT/segment.json``.

Resume. The work directory is ``OUT/.work-<fingerprint>``; the fingerprint
hashes the scan's files (paths, sizes, mtimes), the model folder (version,
files' sizes and mtimes), every parameter and :data:`PIPELINE_VERSION`. Each
task writes ``work/done/<stage>/<z>_<y>_<x>.pkl`` (its result) atomically
*after* its zarr writes; every array and driver merge has its own marker. A
rerun with the same inputs loads finished tasks' results instead of running
them (a killed task left no marker and runs again, overwriting its whole
chunk); different inputs get a new work directory. On success the work
directories of this output are removed (unless ``keep_work``).

Memory. Nothing holds a whole volume: a predict task holds its chunk's input
(the chunk + half a patch on each side, float32: 4 bytes per voxel of
``(chunk + patch)^3``), a few source planes of the box it is interpolated from
and the chunk's class sums (3 x float32 per chunk voxel); the other tasks one
chunk (+ halo) of uint8/uint32 arrays; the driver per-label tables. The
target-grid arrays are sharded (inner chunks of up to 64^3) when chunks are
larger, so that halo reads decode little.

Determinism. Given the same thread count and batch size, a rerun, a resumed
run and a run whose tasks ran elsewhere give the same bits. The network's
outputs depend in their last bits (1e-6) on how patches are batched and on
the number of intra-op threads, so the argmax of voxels whose two best
classes are tied to that precision may differ between such settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import resource
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, as_completed
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastremap
import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator
from zarr.codecs import BloscCodec

from ps3d_core import bordercore as bc
from ps3d_core.errors import ScanError
from ps3d_core.inference.geometry import (
    nearest_index,
    patch_grid,
    patches_in_region,
    resample_linear_streamed,
    source_box,
    target_shape,
    zoom_factors,
)
from ps3d_core.intensity import sample_voxels
from ps3d_core.io.atomic import replace_directory, write_text_atomic
from ps3d_core.io.convert import pyramid_shapes
from ps3d_core.io.ngff import NGFF_VERSION, multiscales_attributes
from ps3d_core.io.volumes import (
    MAX_SCAN_VOXELS,
    Volume,
    ZarrVolume,
    is_zarr,
    open_volume,
)
from ps3d_core.models import (
    DEFAULT_MODEL_DIR,
    load_model,
    model_fingerprint,
    read_metadata,
)
from ps3d_core.particle_size import estimate_particle_size_mm

__all__ = [
    "PIPELINE_VERSION",
    "SegmentParams",
    "candidate_flags_chunk",
    "core_counts_chunk",
    "face_pairs_chunk",
    "grow_chunk",
    "label_chunk",
    "load_plan",
    "predict_chunk",
    "prepare_plan",
    "pyramid_chunk",
    "relabel_chunk",
    "resample_back_chunk",
    "resolve_device",
    "run_segmentation",
    "small_particle_table",
    "target_image",
    "write_labels_chunk",
]

#: Bump when a change of this module changes results: old work directories are then not reused.
PIPELINE_VERSION = "2"
SEGMENT_JSON = "segment.json"
LABELS_NAME = "labels.ome.zarr"
WORK_PREFIX = ".work-"
#: Border-core -> instances settings (ParticleSeg3D's defaults) and the growth halo.
BORDERCORE_PARAMS = {
    "min_distance": 1.0,
    "min_ratio": 0.95,
    "max_distance": bc.DEFAULT_MAX_DISTANCE,
    "max_ratio": bc.DEFAULT_MAX_RATIO,
    "remove_small_cores": True,
}
GROWTH_HALO = 16
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------


class SegmentParams(BaseModel):
    """Parameters of :func:`run_segmentation` (all but ``keep_work`` enter the fingerprint).

    Attributes
    ----------
    model_dir : str, optional
        Model folder (default :data:`ps3d_core.models.DEFAULT_MODEL_DIR`).
    folds : tuple of int, optional
        Folds to ensemble (default: all of the model).
    device : str
        ``"auto"`` (CUDA when the process running a prediction task has it),
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    tta : bool
        Mirroring test-time augmentation over the model's allowed axes (8
        passes per patch in 3D).
    mixed_precision : bool
        Forward passes in float16 on CUDA and in bfloat16 on CPUs with native
        bfloat16 (:class:`~ps3d_core.inference.predict.PatchPredictor`); False:
        float32.
    batch_size : int
        Patches per forward pass.
    chunk_size : int or (int, int, int), optional
        Chunk edge in target-grid voxels, a multiple of the patch size per
        axis; default 4 patches.
    step : float
        Patch step as a fraction of the patch (0.5: nnU-Net's overlap).
    min_rel_particle_size : float
        Particles smaller than this fraction of the mean particle volume are
        removed (0 keeps all).
    particle_size_mm : float, optional
        Mean particle diameter in mm; overrides ``scan.json`` and the estimate.
    output_chunks : int
        Chunk edge of the output label image (and of the source-grid tasks).
    keep_work : bool
        Keep the work directory (intermediate zarr arrays) after success.
    require_particles : bool
        Refuse a scan in which no particle is found (a scan of particles that
        shows none is a wrong or empty scan); model evaluation turns it off,
        where finding nothing is a weak model's score.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str | None = None
    folds: tuple[int, ...] | None = None
    device: str = "auto"
    tta: bool = False
    mixed_precision: bool = True
    batch_size: int = Field(default=4, ge=1)
    chunk_size: int | tuple[int, int, int] | None = None
    step: float = Field(default=0.5, gt=0, le=1)
    min_rel_particle_size: float = Field(default=0.005, ge=0, lt=1)
    particle_size_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    output_chunks: int = Field(default=128, ge=1)
    keep_work: bool = False
    require_particles: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, value):
        sizes = [value] * 3 if isinstance(value, int) else list(value or [])
        if any(s < 1 for s in sizes):
            raise ValueError(f"chunk_size must be positive, got {value!r}")
        return value


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when CUDA is available, else ``"cpu"``; others are checked.

    Raises
    ------
    ValueError
        CUDA requested but not available.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available in this process")
    return device


# --------------------------------------------------------------------------
# inputs and fingerprint
# --------------------------------------------------------------------------


def _open_input(scan_path: Path):
    """(volume, scan metadata or None, image path, spacing or None)."""
    from ps3d_core.io.scans import (
        LEGACY_IMAGES_DIR,
        LEGACY_METADATA_JSON,
        SCAN_JSON,
        open_scan,
    )

    legacy = (scan_path / LEGACY_METADATA_JSON).is_file() or (
        scan_path.parent.name == LEGACY_IMAGES_DIR and (scan_path.parent.parent / LEGACY_METADATA_JSON).is_file()
    )
    if (scan_path.is_dir() and (scan_path / SCAN_JSON).exists()) or legacy:
        scan = open_scan(scan_path)
        return scan.volume, scan.metadata, scan.volume.path, scan.metadata.spacing_zyx_mm
    if scan_path.is_file() or is_zarr(scan_path):
        volume = open_volume(scan_path)
        return volume, None, volume.path, volume.spacing_zyx_mm
    scan = open_scan(scan_path)  # raises the scan-directory error
    return scan.volume, scan.metadata, scan.volume.path, scan.metadata.spacing_zyx_mm


def _file_stats(path: Path) -> list[str]:
    if path.is_file():
        st = path.stat()
        return [f"{path.name}|{st.st_size}|{st.st_mtime_ns}"]
    out = []
    stack = [path]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    st = entry.stat()
                    out.append(f"{os.path.relpath(entry.path, path)}|{st.st_size}|{st.st_mtime_ns}")
    return sorted(out)


def _fingerprint(scan_path: Path, model_dir: Path, params: SegmentParams) -> str:
    digest = hashlib.sha256()
    digest.update(f"pipeline {PIPELINE_VERSION}\n".encode())
    digest.update(f"scan {scan_path}\n".encode())
    for line in _file_stats(scan_path):
        digest.update(f"{line}\n".encode())
    digest.update(f"model {model_dir} {model_fingerprint(model_dir)}\n".encode())
    # what is done with the result, not how it is computed: a rerun resumes whatever they are
    outcome_only = {"keep_work", "require_particles"}
    digest.update(json.dumps(params.model_dump(mode="json", exclude=outcome_only), sort_keys=True).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------


def _chunk_shape(params: SegmentParams, patch: Sequence[int]) -> tuple[int, int, int]:
    if params.chunk_size is None:
        return tuple(4 * p for p in patch)
    sizes = (params.chunk_size,) * 3 if isinstance(params.chunk_size, int) else tuple(params.chunk_size)
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"chunk_size {list(sizes)} must be a multiple of the model's patch size {list(patch)}")
    return tuple(int(s) for s in sizes)


def _inner_chunks(chunk: Sequence[int]) -> tuple[int, ...] | None:
    """Inner chunks for sharded target-grid arrays (halo reads decode little), or None."""
    inner = tuple(math.gcd(int(c), 64) for c in chunk)
    if inner == tuple(chunk) or min(inner) < 16:
        return None
    return inner


def _particle_size(params: SegmentParams, metadata, volume: Volume, spacing, scan_path: Path) -> tuple[float, str]:
    if params.particle_size_mm is not None:
        return float(params.particle_size_mm), "params"
    if metadata is not None and metadata.particle_size_mm is not None:
        return float(metadata.particle_size_mm), "scan.json"
    size = float(estimate_particle_size_mm(volume, tuple(spacing)))
    if not (size > 0 and math.isfinite(size)):
        raise ScanError(scan_path, f"particle size estimation failed (got {size}); pass particle_size_mm")
    return size, "estimated"


def _refuse_uniform(volume: Volume, image_path: Path) -> None:
    """Refuse a constant image (all zero: a failed reconstruction or export): there is nothing to segment.

    Looks at the strided sample the intensity levels are computed from (at
    most 64 slices, :func:`~ps3d_core.intensity.sample_voxels`), before the
    model is loaded; NaN in those slices is reported by the reader. The
    quantile levels read the same slices again, from the page cache for a
    TIFF.
    """
    sample = sample_voxels(volume)
    if sample.min() == sample.max():
        raise ScanError(
            image_path,
            f"is uniform: every sampled voxel is {sample.flat[0]:g}, there are no particles to segment "
            "(an empty or failed reconstruction?)",
        )


def _refuse_huge_target(scan_path: Path, shape: Sequence[int], size_mm: float, size_source: str, spacing) -> None:
    """Refuse a particle size so small against the voxels that the resampled grid could not be held anywhere."""
    if math.prod(shape) > MAX_SCAN_VOXELS:
        raise ScanError(
            scan_path,
            f"would be {'x'.join(map(str, shape))} voxels after particle-size normalisation (more than "
            f"{MAX_SCAN_VOXELS:.3g}): particle size {size_mm:.4g} mm ({size_source}) is tiny against voxels of "
            f"{', '.join(f'{s:.4g}' for s in spacing)} mm; both are in mm",
        )


def _work_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(f"{WORK_PREFIX}*") if p.is_dir()) if out_dir.is_dir() else []


def prepare_plan(
    scan_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: SegmentParams | None = None,
    *,
    check_device: bool = True,
) -> str:
    """Validate the inputs, choose the work directory and write ``plan.json`` and the empty arrays.

    Reuses the work directory (and its plan) of an earlier run with the same
    inputs. Returns the plan's path.

    Raises
    ------
    ScanError
        Unknown or invalid model folder, unreadable scan, no voxel size, a
        uniform image, a scan smaller than one patch or beyond
        :data:`~ps3d_core.io.volumes.MAX_SCAN_VOXELS` in the target grid,
        no particle size.
    """
    params = params or SegmentParams()
    scan_path = Path(scan_path).absolute()
    out_dir = Path(out_dir).absolute()
    model_dir = Path(params.model_dir).absolute() if params.model_dir is not None else DEFAULT_MODEL_DIR
    metadata_model = read_metadata(model_dir)
    if scan_path.is_dir() and (out_dir == scan_path or scan_path in out_dir.parents):
        raise ScanError(out_dir, f"is inside the scan directory {scan_path}; write the output elsewhere")
    if check_device:
        try:
            resolve_device(params.device)
        except ValueError as error:
            raise ScanError(scan_path, str(error)) from None
    fingerprint = _fingerprint(scan_path, model_dir, params) if scan_path.exists() else None
    if fingerprint is not None:
        work = out_dir / f"{WORK_PREFIX}{fingerprint}"
        plan_path = work / "plan.json"
        if plan_path.is_file() and (work / "done" / "_setup" / "arrays.pkl").is_file():
            plan = load_plan(plan_path)
            if plan.get("fingerprint") == fingerprint:
                return str(plan_path)
    volume, scan_meta, image_path, spacing = _open_input(scan_path)
    with volume:
        if spacing is None:
            raise ScanError(
                image_path,
                "holds no voxel size (spacing); put the image in a scan directory with scan.json, "
                "or use an OME-Zarr/TIFF that records it",
            )
        _refuse_uniform(volume, Path(image_path))
        folds = tuple(params.folds) if params.folds is not None else tuple(metadata_model.folds)
        model = _cached_model(str(model_dir), folds, "cpu")
        patch = tuple(model.patch_size)
        try:
            chunk = _chunk_shape(params, patch)
        except ValueError as error:
            raise ScanError(scan_path, str(error)) from None
        size_mm, size_source = _particle_size(params, scan_meta, volume, spacing, scan_path)
        normalization = model.metadata.intensity_normalization
        try:
            offset, scale = normalization.levels(volume)
        except ValueError as error:
            raise ScanError(image_path, f"cannot be normalised: {error}") from None
        factors = zoom_factors(spacing, size_mm, model.metadata.target_particle_size_voxels)
        source_shape = tuple(int(n) for n in volume.shape)
        shape = target_shape(source_shape, factors)
        _refuse_huge_target(scan_path, shape, size_mm, size_source, spacing)
        if any(t < p for t, p in zip(shape, patch)):
            raise ScanError(
                scan_path,
                f"is too small for the model: at particle size {size_mm:.4g} mm ({size_source}) it is "
                f"{'x'.join(map(str, shape))} voxels after particle-size normalisation "
                f"(zoom {', '.join(f'{f:.3g}' for f in factors)}), smaller than one patch "
                f"{'x'.join(map(str, patch))}",
            )
        dtype = str(volume.dtype)
    starts = patch_grid(shape, patch, params.step)
    work = out_dir / f"{WORK_PREFIX}{fingerprint}"
    if work.exists():
        shutil.rmtree(work)  # a run that died before its plan was complete
    work.mkdir(parents=True)
    out_chunks = tuple(min(params.output_chunks, n) for n in source_shape)
    levels = pyramid_shapes(source_shape, out_chunks)
    plan = {
        "pipeline_version": PIPELINE_VERSION,
        "fingerprint": fingerprint,
        "scan_path": str(scan_path),
        "image_path": str(Path(image_path).absolute()),
        "sample_id": scan_meta.sample_id if scan_meta is not None else Path(image_path).name,
        "scan_metadata": scan_meta.model_dump(mode="json", exclude_none=True) if scan_meta is not None else None,
        "source_shape": list(source_shape),
        "source_dtype": dtype,
        "spacing_zyx_mm": [float(s) for s in spacing],
        "particle_size_mm": size_mm,
        "particle_size_source": size_source,
        "zoom_requested": list(factors),
        "zoom": [t / s for t, s in zip(shape, source_shape)],
        "target_shape": list(shape),
        "target_spacing_zyx_mm": [s * n / t for s, n, t in zip(spacing, source_shape, shape)],
        "patch_size": list(patch),
        "step": params.step,
        "patch_starts": starts,
        "n_patches": math.prod(len(s) for s in starts),
        "chunk_shape": list(chunk),
        "output_chunks": list(out_chunks),
        "pyramid_shapes": [list(s) for s in levels],
        "model": {
            "dir": str(model_dir),
            "name": model.metadata.name,
            "version": model.metadata.version,
            "configuration": model.metadata.configuration,
            "folds": list(model.folds),
            "mirroring_axes": list(model.mirroring_axes),
            "target_particle_size_voxels": model.metadata.target_particle_size_voxels,
            "parameters": model.num_parameters,
        },
        "normalization": {"method": normalization.method, "offset": offset, "scale": scale},
        "device": params.device,
        "tta": params.tta,
        "mixed_precision": params.mixed_precision,
        "batch_size": params.batch_size,
        "min_rel_particle_size": params.min_rel_particle_size,
        "bordercore": dict(BORDERCORE_PARAMS, halo=GROWTH_HALO),
        "params": params.model_dump(mode="json"),
        "work_dir": str(work),
        "out_dir": str(out_dir),
    }
    plan_path = work / "plan.json"
    write_text_atomic(plan_path, json.dumps(plan, indent=1))
    _create_arrays(plan)
    _mark(work, "_setup", "arrays", {"created": True})
    return str(plan_path)


def _create_arrays(plan: dict) -> None:
    work = Path(plan["work_dir"])
    shape = tuple(plan["target_shape"])
    chunk = tuple(min(c, n) for c, n in zip(plan["chunk_shape"], shape))
    inner = _inner_chunks(chunk)
    for name, dtype in (("border_core.zarr", np.uint8), ("instances.zarr", np.uint32)):
        zarr.create_array(
            store=str(work / name),
            shape=shape,
            chunks=inner or chunk,
            shards=chunk if inner else None,
            dtype=dtype,
            fill_value=0,
            overwrite=True,
        )
    source_shape = tuple(plan["source_shape"])
    out_chunks = tuple(plan["output_chunks"])
    zarr.create_array(
        store=str(work / "labels_raw.zarr"),
        shape=source_shape,
        chunks=out_chunks,
        dtype=np.uint32,
        fill_value=0,
        overwrite=True,
    )
    levels = [tuple(s) for s in plan["pyramid_shapes"]]
    attributes = {
        "ome": multiscales_attributes(LABELS_NAME, tuple(plan["spacing_zyx_mm"]), len(levels), "stride")
        | {"image-label": {"version": NGFF_VERSION, "source": {}}},
        "ps3d_segmentation": {
            "model": plan["model"]["name"],
            "model_version": plan["model"]["version"],
            "particle_size_mm": plan["particle_size_mm"],
            "particle_size_source": plan["particle_size_source"],
        },
    }
    if plan["scan_metadata"] is not None:
        attributes["ps3d"] = plan["scan_metadata"]
    group = zarr.create_group(str(work / LABELS_NAME), zarr_format=3, attributes=attributes, overwrite=True)
    for level, lshape in enumerate(levels):
        group.create_array(
            str(level),
            shape=lshape,
            chunks=tuple(min(c, n) for c, n in zip(out_chunks, lshape)),
            dtype=np.uint32,
            compressors=_COMPRESSOR,
            dimension_names=("z", "y", "x"),
            fill_value=0,
        )


@lru_cache(maxsize=16)
def _load_plan_cached(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_plan(plan_path: str | os.PathLike[str]) -> dict:
    """The plan document (cached per process).

    ``work_dir`` and ``out_dir`` are where the plan lies now (the work
    directory may have been moved since it was written).
    """
    path = Path(plan_path).absolute()
    plan = dict(_load_plan_cached(str(path), path.stat().st_mtime_ns))
    plan["work_dir"] = str(path.parent)
    plan["out_dir"] = str(path.parent.parent)
    return plan


@lru_cache(maxsize=2)
def _cached_model(model_dir: str, folds: tuple[int, ...] | None, device: str):
    return load_model(model_dir, folds, device)


_volume_lock = threading.Lock()
_SLAB_BYTES = 256 * 2**20


@lru_cache(maxsize=4)
def _cached_volume(path: str, mtime_ns: int) -> Volume:
    return open_volume(path)


def _read_planes(plan: dict, z0: int, z1: int, rows: slice, cols: slice) -> np.ndarray:
    """Source planes ``z0:z1`` cropped to ``rows, cols``, as stored (a zarr image is read box-wise)."""
    path = Path(plan["image_path"])
    with _volume_lock:
        volume = _cached_volume(str(path), path.stat().st_mtime_ns)
        if isinstance(volume, ZarrVolume):
            block = np.asarray(volume._array[(*volume._leading, slice(z0, z1), rows, cols)])
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                raise ScanError(path, f"holds NaN or infinite values in slices {z0}..{z1 - 1}")
            return block
        return volume.read(z0, z1)[:, rows, cols]


def target_image(plan: dict, window: Sequence[slice]) -> np.ndarray:
    """The normalised target-grid image of ``window`` (float32), as the predict tasks see it.

    The source voxels are normalised with the plan's ``offset`` and ``scale``
    (float32; :mod:`ps3d_core.intensity`) and interpolated trilinearly, a few source planes at a
    time (:func:`~ps3d_core.inference.geometry.resample_linear_streamed`).
    """
    source_shape, shape = plan["source_shape"], plan["target_shape"]
    box = source_box(source_shape, shape, window)
    offset = np.float32(plan["normalization"]["offset"])
    scale = np.float32(plan["normalization"]["scale"])

    def read(z0: int, z1: int) -> np.ndarray:
        planes = _read_planes(plan, z0, z1, box[1], box[2]).astype(np.float32)
        planes -= offset
        planes /= scale
        return planes

    # zarr: slabs as deep as the stored chunks (each decoded about once); other formats read
    # whole planes: at most 16 of them; both within about 256 MB
    path = Path(plan["image_path"])
    with _volume_lock:
        volume = _cached_volume(str(path), path.stat().st_mtime_ns)
    plane_bytes = 4 * (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
    if isinstance(volume, ZarrVolume):
        depth = max(16, min(int(volume.chunk_depth), _SLAB_BYTES // plane_bytes))
    else:
        full_plane = volume.shape[1] * volume.shape[2] * volume.dtype.itemsize
        depth = max(2, min(16, _SLAB_BYTES // (plane_bytes + full_plane)))
    return resample_linear_streamed(read, box, source_shape, shape, window, depth=depth)


# --------------------------------------------------------------------------
# markers and the task wrapper
# --------------------------------------------------------------------------


def _key(index: Sequence[int] | str) -> str:
    return index if isinstance(index, str) else "_".join(str(int(i)) for i in index)


def _marker(work: Path, stage: str, index) -> Path:
    return Path(work) / "done" / stage / f"{_key(index)}.pkl"


def _mark(work: Path, stage: str, index, result: Any) -> None:
    path = _marker(work, stage, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _done(work: Path, stage: str, index) -> Any | None:
    path = _marker(work, stage, index)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (EOFError, pickle.UnpicklingError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset_ok: bool) -> int:
    if reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_task(plan_path: str, stage: str, index, body: Callable[[dict], dict]) -> dict:
    plan = load_plan(plan_path)
    work = Path(plan["work_dir"])
    previous = _done(work, stage, index)
    if previous is not None:
        return previous
    reset_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    result = body(plan)
    result = dict(result)
    result["_stats"] = {
        "seconds": time.perf_counter() - t0,
        "peak_rss_bytes": _peak_rss(reset_ok),
        "pid": os.getpid(),
    } | result.get("_stats", {})
    _mark(work, stage, index, result)
    return result


def _target_grid(plan: dict) -> bc.ChunkGrid:
    return bc.ChunkGrid(tuple(plan["target_shape"]), tuple(plan["chunk_shape"]))


def _source_grid(plan: dict) -> bc.ChunkGrid:
    return bc.ChunkGrid(tuple(plan["source_shape"]), tuple(plan["output_chunks"]))


def _bc_work(plan: dict) -> Path:
    return Path(plan["work_dir"]) / "bordercore"


def _idx(index) -> tuple[int, int, int]:
    return tuple(int(i) for i in index)


# --------------------------------------------------------------------------
# tasks: prediction
# --------------------------------------------------------------------------


def predict_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``predict``: border-core classes of one target-grid chunk into ``work/border_core.zarr``.

    Returns ``{"patches": int, "device": str}`` (+ ``_stats``).
    """
    import torch

    from ps3d_core.inference.predict import PatchPredictor, predict_region

    index = _idx(chunk_index)

    def body(plan):
        device = resolve_device(plan["device"])
        region = _target_grid(plan).region(index)
        patch = tuple(plan["patch_size"])
        patches, window = patches_in_region(plan["patch_starts"], patch, region)
        image = target_image(plan, window)
        model = _cached_model(plan["model"]["dir"], tuple(plan["model"]["folds"]), device)
        axes = model.mirroring_axes if plan["tta"] else ()
        predictor = PatchPredictor(model.networks, model.device, axes, plan["mixed_precision"])
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        labels = predict_region(
            predictor,
            image,
            [w.start for w in window],
            region,
            plan["patch_starts"],
            patch,
            batch_size=plan["batch_size"],
            device=model.device,
        )
        zarr.open_array(str(Path(plan["work_dir"]) / "border_core.zarr"), mode="r+")[region] = labels
        stats = {"cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(model.device))} if cuda else {}
        return {
            "patches": len(patches),
            "voxels": int(labels.size),
            "device": str(model.device),
            "_stats": stats,
        }

    return _run_task(plan_path, "predict", index, body)


# --------------------------------------------------------------------------
# tasks: border-core -> instances (ps3d_core.bordercore's chunk functions)
# --------------------------------------------------------------------------


def _bc_src(plan: dict):
    return zarr.open_array(str(Path(plan["work_dir"]) / "border_core.zarr"), mode="r")


def label_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``instances/label``: :func:`ps3d_core.bordercore.chunk_label`."""
    index = _idx(chunk_index)
    return _run_task(
        plan_path, "instances_label", index, lambda p: bc.chunk_label(_bc_src(p), _bc_work(p), index, _target_grid(p))
    )


def face_pairs_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``instances/faces``: :func:`ps3d_core.bordercore.chunk_face_pairs`."""
    index = _idx(chunk_index)
    return _run_task(
        plan_path, "instances_faces", index, lambda p: bc.chunk_face_pairs(_bc_work(p), index, _target_grid(p))
    )


def _filter_params(plan: dict) -> dict:
    return {k: v for k, v in plan["bordercore"].items() if k != "halo"}


def core_counts_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``instances/counts``: :func:`ps3d_core.bordercore.chunk_core_counts`."""
    index = _idx(chunk_index)
    return _run_task(
        plan_path,
        "instances_counts",
        index,
        lambda p: bc.chunk_core_counts(_bc_src(p), _bc_work(p), index, _target_grid(p), _filter_params(p)),
    )


def candidate_flags_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``instances/flags``: :func:`ps3d_core.bordercore.chunk_candidate_flags`."""
    index = _idx(chunk_index)
    return _run_task(
        plan_path,
        "instances_flags",
        index,
        lambda p: bc.chunk_candidate_flags(_bc_src(p), _bc_work(p), index, _target_grid(p), _filter_params(p)),
    )


def grow_chunk(plan_path: str, chunk_index: Sequence[int], round: int) -> dict:
    """Stage ``instances/grow_<round>``: :func:`ps3d_core.bordercore.chunk_grow`.

    Reads the rounds that last wrote each chunk from ``work/bordercore/latest_<round>.npy``.
    """
    index = _idx(chunk_index)
    round = int(round)

    def body(p):
        latest = np.load(_bc_work(p) / f"latest_{round}.npy")
        return bc.chunk_grow(_bc_src(p), _bc_work(p), index, _target_grid(p), round, p["bordercore"]["halo"], latest)

    return _run_task(plan_path, f"instances_grow_{round}", index, body)


def relabel_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``instances/relabel``: :func:`ps3d_core.bordercore.chunk_relabel` into ``work/instances.zarr``."""
    index = _idx(chunk_index)

    def body(p):
        grid = _target_grid(p)
        latest = np.load(_bc_work(p) / "latest_final.npy")
        dst = zarr.open_array(str(Path(p["work_dir"]) / "instances.zarr"), mode="r+")
        bc.chunk_relabel(_bc_work(p), dst, index, grid, int(latest[grid.chunk_id(index)]))
        return {}

    return _run_task(plan_path, "instances_relabel", index, body)


# --------------------------------------------------------------------------
# tasks: back to the source grid, small particles, output
# --------------------------------------------------------------------------


def resample_back_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``labels``: instances of one source-grid chunk into ``work/labels_raw.zarr``.

    Each source voxel takes the label of the target voxel containing its centre.

    Returns
    -------
    dict
        ``ids`` (uint32, labels present, 0 excluded), ``counts`` (int64, their voxels here).
    """
    index = _idx(chunk_index)

    def body(p):
        region = _source_grid(p).region(index)
        idx = [
            nearest_index(t, s, r.start, r.stop) for t, s, r in zip(p["target_shape"], p["source_shape"], region)
        ]
        box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
        instances = zarr.open_array(str(Path(p["work_dir"]) / "instances.zarr"), mode="r")
        labels = np.asarray(instances[box])[np.ix_(*[i - b.start for i, b in zip(idx, box)])]
        labels = np.ascontiguousarray(labels, dtype=np.uint32)
        zarr.open_array(str(Path(p["work_dir"]) / "labels_raw.zarr"), mode="r+")[region] = labels
        ids, counts = fastremap.unique(labels, return_counts=True)
        keep = ids != 0
        return {"ids": ids[keep].astype(np.uint32), "counts": counts[keep].astype(np.int64)}

    return _run_task(plan_path, "labels", index, body)


def small_particle_table(
    results: Sequence[dict], min_rel_particle_size: float
) -> tuple[np.ndarray, dict[str, float | int]]:
    """Old label -> new label, removing particles smaller than ``min_rel`` x the mean volume.

    Parameters
    ----------
    results : sequence of dict
        ``ids`` and ``counts`` per chunk (:func:`resample_back_chunk`).
    min_rel_particle_size : float

    Returns
    -------
    table : ndarray, uint32
        ``table[old]`` is the new label: 0 for removed particles, kept ones
        ``1..N`` in increasing order of their old labels.
    info : dict
        ``n_before``, ``n_removed``, ``particle_count``, ``mean_volume_voxels``,
        ``min_volume_voxels`` (the threshold).
    """
    all_ids = [r["ids"] for r in results if len(r["ids"])]
    top = int(max((int(i.max()) for i in all_ids), default=0))
    volume = np.zeros(top + 1, dtype=np.int64)
    for r in results:
        np.add.at(volume, r["ids"].astype(np.int64), r["counts"])
    volume[0] = 0
    present = volume > 0
    n_before = int(present.sum())
    mean = float(volume[present].mean()) if n_before else 0.0
    threshold = min_rel_particle_size * mean
    keep = present & (volume >= threshold)
    table = np.zeros(top + 1, dtype=np.uint32)
    table[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    info = {
        "n_before": n_before,
        "n_removed": n_before - int(keep.sum()),
        "particle_count": int(keep.sum()),
        "mean_volume_voxels": mean,
        "min_volume_voxels": threshold,
    }
    return table, info


def write_labels_chunk(plan_path: str, chunk_index: Sequence[int]) -> dict:
    """Stage ``write``: renumbered labels of one source chunk into level 0 of the output image."""
    index = _idx(chunk_index)

    def body(p):
        work = Path(p["work_dir"])
        region = _source_grid(p).region(index)
        labels = np.asarray(zarr.open_array(str(work / "labels_raw.zarr"), mode="r")[region])
        table = np.load(work / "remap.npy", mmap_mode="r")
        ids = fastremap.unique(labels)
        mapping = {int(i): int(table[i]) for i in ids}
        labels = fastremap.remap(labels, mapping, preserve_missing_labels=True, in_place=True)
        zarr.open_array(str(work / LABELS_NAME / "0"), mode="r+")[region] = labels
        return {}

    return _run_task(plan_path, "write", index, body)


def _level_grid(plan: dict, level: int) -> bc.ChunkGrid:
    shape = tuple(plan["pyramid_shapes"][level])
    return bc.ChunkGrid(shape, tuple(min(c, n) for c, n in zip(plan["output_chunks"], shape)))


def pyramid_chunk(plan_path: str, chunk_index: Sequence[int], level: int) -> dict:
    """Stage ``pyramid_<level>``: one chunk of level ``level`` = every second voxel of level ``level - 1``."""
    index = _idx(chunk_index)
    level = int(level)

    def body(p):
        work = Path(p["work_dir"]) / LABELS_NAME
        region = _level_grid(p, level).region(index)
        above = zarr.open_array(str(work / str(level - 1)), mode="r")
        src = tuple(slice(2 * r.start, min(2 * r.stop, n)) for r, n in zip(region, above.shape))
        zarr.open_array(str(work / str(level)), mode="r+")[region] = np.asarray(above[src])[::2, ::2, ::2]
        return {}

    return _run_task(plan_path, f"pyramid_{level}", index, body)


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


class _Stages:
    """Runs stages of tasks, inline or on executors, skipping finished tasks; collects statistics."""

    def __init__(self, plan_path: str, executor: Executor | None, progress: Progress | None) -> None:
        self.plan_path = plan_path
        self.work = Path(load_plan(plan_path)["work_dir"])
        self.executor = executor
        self.progress = progress
        self.resumed = 0
        self.run = 0
        self.task_stats: dict[str, dict[str, float]] = {}
        self.local_peak = 0  # peak RSS of tasks that ran in this process

    def __call__(self, stage: str, fn, keys: list, *extra: int, executor: Executor | None = None) -> list:
        executor = executor if executor is not None else self.executor
        results: dict[int, Any] = {}
        pending = []
        for n, key in enumerate(keys):
            previous = _done(self.work, stage, key)
            if previous is None:
                pending.append(n)
            else:
                results[n] = previous
        self.resumed += len(results)
        self.run += len(pending)
        total = len(keys)
        if self.progress is not None:
            self.progress(stage, len(results), total)
        if executor is None:
            for n in pending:
                results[n] = fn(self.plan_path, keys[n], *extra)
                if self.progress is not None:
                    self.progress(stage, len(results), total)
        else:
            futures = {executor.submit(fn, self.plan_path, keys[n], *extra): n for n in pending}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if self.progress is not None:
                    self.progress(stage, len(results), total)
        out = [results[n] for n in range(total)]
        self._collect(stage, out)
        return out

    def _collect(self, stage: str, results: list) -> None:
        group = stage.split("_")[0] if stage.startswith(("instances", "pyramid")) else stage
        s = self.task_stats.setdefault(group, {"tasks": 0, "task_seconds": 0.0, "peak_rss_bytes": 0})
        for r in results:
            st = r.get("_stats", {}) if isinstance(r, dict) else {}
            s["tasks"] += 1
            s["task_seconds"] += float(st.get("seconds", 0.0))
            s["peak_rss_bytes"] = max(s["peak_rss_bytes"], int(st.get("peak_rss_bytes", 0)))
            if st.get("pid") == os.getpid():
                self.local_peak = max(self.local_peak, int(st.get("peak_rss_bytes", 0)))
            if "cuda_max_allocated_bytes" in st:
                s["cuda_max_allocated_bytes"] = max(
                    s.get("cuda_max_allocated_bytes", 0), int(st["cuda_max_allocated_bytes"])
                )

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        """A driver step run once per work directory (its result is remembered)."""
        previous = _done(self.work, "_driver", name)
        if previous is not None:
            return previous["value"]
        value = fn()
        _mark(self.work, "_driver", name, {"value": value})
        return value


def _instances(plan: dict, stages: _Stages) -> dict:
    work = _bc_work(plan)
    grid = _target_grid(plan)
    params = _filter_params(plan)
    indices = [tuple(i) for i in grid.indices()]
    stages.once("bordercore_prepare", lambda: bc.prepare_work(work, grid))
    summaries = stages("instances_label", label_chunk, indices)
    pairs = stages("instances_faces", face_pairs_chunk, indices)
    stages.once("bordercore_merge_labels", lambda: bc.merge_labels(work, grid, _strip(summaries), _strip(pairs)))
    counts = stages("instances_counts", core_counts_chunk, indices)
    need = stages.once("bordercore_merge_counts", lambda: bc.merge_core_counts(work, _strip(counts), params))
    flags = stages("instances_flags", candidate_flags_chunk, [tuple(i) for i in need])
    info = stages.once("bordercore_merge_flags", lambda: bc.merge_candidate_flags(work, _strip(flags), params))
    latest = np.zeros(grid.n_chunks, dtype=np.int64)
    todo = indices
    rnd = 0
    while todo:
        rnd += 1
        stages.once(f"bordercore_round_{rnd}", lambda r=rnd: bc.prepare_round(work, grid, r))
        np.save(work / f"latest_{rnd}.npy", latest)
        results = stages(f"instances_grow_{rnd}", grow_chunk, todo, rnd)
        for i in todo:
            latest[grid.chunk_id(i)] = rnd
        todo = [i for i, r in zip(todo, results) if r["unresolved"]]
    np.save(work / "latest_final.npy", latest)
    stages("instances_relabel", relabel_chunk, indices)
    return {"n_instances": int(info["n_particles"]), "n_cores_removed": int(info["n_removed"]), "growth_rounds": rnd}


def _strip(results: list) -> list:
    return [{k: v for k, v in r.items() if k != "_stats"} for r in results]


def _refuse_no_particles(plan: dict, work: Path) -> None:
    """Raise ScanError for a scan in which the model found no particle; its work directory goes.

    The result is final (a rerun finds nothing again), so the intermediate
    arrays are not kept for resuming.
    """
    shutil.rmtree(work, ignore_errors=True)
    raise ScanError(
        plan["image_path"],
        f"no particles found: the model {plan['model']['name']} {plan['model']['version']} found none at particle "
        f"size {plan['particle_size_mm']:.4g} mm ({plan['particle_size_source']}); an empty mount, the wrong scan, "
        "or a particle size far off",
    )


def _move_output(work: Path, out_dir: Path) -> Path:
    target = out_dir / LABELS_NAME
    source = work / LABELS_NAME
    if not source.exists():
        return target  # moved by an earlier, interrupted run
    replace_directory(source, target)
    return target


def _process_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_segmentation(
    scan_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: SegmentParams | None = None,
    *,
    predict_executor: Executor | None = None,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> dict:
    """Segment the particles of a scan: ``OUT/labels.ome.zarr`` and ``OUT/segment.json``.

    Parameters
    ----------
    scan_path : path
        A scan directory (``scan.json`` + image), a ParticleSeg3D dataset
        image, or a bare image that records its voxel size.
    out_dir : path
        Output directory (created); its work directory ``.work-<fingerprint>``
        makes reruns resume.
    params : SegmentParams, optional
    predict_executor : concurrent.futures.Executor, optional
        Runs the prediction tasks (e.g. a Dask executor routed to GPU
        workers); default ``executor``.
    executor : concurrent.futures.Executor, optional
        Runs all other tasks; None runs every task inline, in order.
    progress : callable(stage, done, total), optional

    Returns
    -------
    dict
        The contents of ``segment.json``.

    Raises
    ------
    ScanError
        Bad input (see :func:`prepare_plan`), NaN or infinite voxels met while
        streaming, or no particle found (unless ``params.require_particles``
        is off).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if params is None:
        params = SegmentParams()
    elif not isinstance(params, SegmentParams):
        params = SegmentParams.model_validate(params)
    out_dir = Path(out_dir).absolute()
    t = time.perf_counter()
    inline_predict = predict_executor is None and executor is None
    plan_path = prepare_plan(scan_path, out_dir, params, check_device=inline_predict)
    plan = load_plan(plan_path)
    work = Path(plan["work_dir"])
    timings["plan"] = time.perf_counter() - t
    stages = _Stages(plan_path, executor, progress)

    t = time.perf_counter()
    target = _target_grid(plan)
    resumed_before = stages.resumed
    predicted = stages(
        "predict",
        predict_chunk,
        [tuple(i) for i in target.indices()],
        executor=predict_executor if predict_executor is not None else executor,
    )
    timings["predict"] = time.perf_counter() - t
    predict_resumed = stages.resumed - resumed_before

    t = time.perf_counter()
    instances = _instances(plan, stages)
    timings["instances"] = time.perf_counter() - t

    t = time.perf_counter()
    source = _source_grid(plan)
    source_indices = [tuple(i) for i in source.indices()]
    counts = stages("labels", resample_back_chunk, source_indices)

    def removal():
        table, info = small_particle_table(counts, plan["min_rel_particle_size"])
        np.save(work / "remap.npy", table)
        return info

    removed = stages.once("remove_small", removal)
    timings["resample_back"] = time.perf_counter() - t
    if removed["particle_count"] == 0 and params.require_particles:
        _refuse_no_particles(plan, work)

    t = time.perf_counter()
    stages("write", write_labels_chunk, source_indices)
    for level in range(1, len(plan["pyramid_shapes"])):
        grid = _level_grid(plan, level)
        stages(f"pyramid_{level}", pyramid_chunk, [tuple(i) for i in grid.indices()], level)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_path = stages.once("move_output", lambda: str(_move_output(work, out_dir)))
    timings["write_labels"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    devices = sorted({r.get("device", "?") for r in predicted})
    predict_seconds = sum(float(r["_stats"]["seconds"]) for r in predicted)
    summary = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pipeline_version": PIPELINE_VERSION,
        "scan_path": plan["scan_path"],
        "image_path": plan["image_path"],
        "sample_id": plan["sample_id"],
        "labels_path": labels_path,
        "model": plan["model"],
        "params": plan["params"],
        "device": devices[0] if len(devices) == 1 else devices,
        "particle_size_mm": plan["particle_size_mm"],
        "particle_size_source": plan["particle_size_source"],
        "spacing_zyx_mm": plan["spacing_zyx_mm"],
        "target_spacing_zyx_mm": plan["target_spacing_zyx_mm"],
        "zoom_requested": plan["zoom_requested"],
        "zoom": plan["zoom"],
        "source_shape": plan["source_shape"],
        "target_shape": plan["target_shape"],
        "patch_size": plan["patch_size"],
        "chunk_shape": plan["chunk_shape"],
        "output_chunks": plan["output_chunks"],
        "n_chunks": target.n_chunks,
        "n_patches": plan["n_patches"],
        "patches_predicted": int(sum(r["patches"] for r in predicted)),
        "target_voxels": math.prod(plan["target_shape"]),
        "instances": instances,
        "small_particle_removal": removed,
        "particle_count": removed["particle_count"],
        "timings_s": timings,
        "throughput": {
            # wall clock of this call's predict stage (None when part of it was resumed)
            "target_voxels_per_s": math.prod(plan["target_shape"]) / timings["predict"]
            if timings["predict"] > 0 and predict_resumed == 0
            else None,
            # per busy worker: voxels over the summed seconds of the predict tasks
            "target_voxels_per_task_second": math.prod(plan["target_shape"]) / predict_seconds
            if predict_seconds > 0
            else None,
        },
        "tasks": {"run": stages.run, "resumed": stages.resumed},
        "task_stats": stages.task_stats,
        "peak_rss_bytes": max((s["peak_rss_bytes"] for s in stages.task_stats.values()), default=0),
        "driver_peak_rss_bytes": max(_process_peak_rss(), stages.local_peak),
        "cuda_max_allocated_bytes": max(
            (s.get("cuda_max_allocated_bytes", 0) for s in stages.task_stats.values()), default=0
        )
        or None,
        "fingerprint": plan["fingerprint"],
    }
    write_text_atomic(out_dir / SEGMENT_JSON, json.dumps(summary, indent=2, default=_json_default))
    for old in _work_dirs(out_dir):
        if old != work or not params.keep_work:
            shutil.rmtree(old, ignore_errors=True)
    return json.loads(json.dumps(summary, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

