"""Chunked sliding-window inference: scan -> border-core -> particle instances.

Modules: :mod:`~ps3d_core.inference.geometry` (zoom, grids, resampling
tables, Gaussian), :mod:`~ps3d_core.inference.predict` (patch prediction and
aggregation), :mod:`~ps3d_core.inference.pipeline` (resumable chunk tasks and
:func:`run_segmentation`).
"""

from ps3d_core.inference.geometry import (
    gaussian_weights,
    patch_grid,
    patches_in_region,
    resample_linear,
    resample_nearest,
    sliding_window_starts,
    target_shape,
    zoom_factors,
)
from ps3d_core.inference.pipeline import (
    PIPELINE_VERSION,
    SegmentParams,
    candidate_flags_chunk,
    core_counts_chunk,
    face_pairs_chunk,
    grow_chunk,
    label_chunk,
    load_plan,
    predict_chunk,
    prepare_plan,
    pyramid_chunk,
    relabel_chunk,
    resample_back_chunk,
    resolve_device,
    run_segmentation,
    small_particle_table,
    target_image,
    write_labels_chunk,
)
from ps3d_core.inference.predict import (
    PatchPredictor,
    autocast_dtype,
    cpu_has_native_bfloat16,
    predict_region,
    sliding_window_predict,
)

__all__ = [
    "PIPELINE_VERSION",
    "PatchPredictor",
    "autocast_dtype",
    "cpu_has_native_bfloat16",
    "SegmentParams",
    "candidate_flags_chunk",
    "core_counts_chunk",
    "face_pairs_chunk",
    "gaussian_weights",
    "grow_chunk",
    "label_chunk",
    "load_plan",
    "patch_grid",
    "patches_in_region",
    "predict_chunk",
    "predict_region",
    "prepare_plan",
    "pyramid_chunk",
    "relabel_chunk",
    "resample_back_chunk",
    "resample_linear",
    "resample_nearest",
    "resolve_device",
    "run_segmentation",
    "sliding_window_predict",
    "sliding_window_starts",
    "small_particle_table",
    "target_image",
    "target_shape",
    "write_labels_chunk",
    "zoom_factors",
]
