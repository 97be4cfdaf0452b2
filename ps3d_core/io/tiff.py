"""TIFF writing shared by the synthesiser, the exporter and the tests."""

from __future__ import annotations

import os

import numpy as np
import tifffile

from ps3d_core.io.atomic import atomic_output

#: Classic TIFF addresses at most 4 GiB; stay clear of it.
_BIGTIFF_THRESHOLD_BYTES = 2**32 - 2**25


def imagej_compatible(dtype: np.dtype) -> bool:
    """ImageJ hyperstacks hold only 8/16-bit unsigned and 32-bit float voxels."""
    return np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def tiff_options(shape: tuple[int, ...], dtype: np.dtype, spacing_zyx_mm: tuple[float, float, float] | None) -> dict:
    """Keyword arguments for :class:`tifffile.TiffWriter` and ``write`` of a z-y-x volume.

    Files are deterministic (no date or host in the tags), uncompressed so that
    any reader opens them, BigTIFF when over 4 GiB, and carry the voxel size
    in ImageJ metadata (Fiji reads it) when the dtype allows ImageJ.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    bigtiff = nbytes >= _BIGTIFF_THRESHOLD_BYTES
    writer = {"bigtiff": bigtiff, "imagej": imagej_compatible(dtype) and not bigtiff}
    write: dict = {"photometric": "minisblack", "metadata": {"axes": "ZYX"}, "software": False, "datetime": False}
    if spacing_zyx_mm is not None:
        dz, dy, dx = (float(s) for s in spacing_zyx_mm)
        write["resolution"] = (1.0 / dx, 1.0 / dy)
        write["resolutionunit"] = "NONE" if not writer["imagej"] else None
        if writer["imagej"]:
            write["metadata"] = {"axes": "ZYX", "spacing": dz, "unit": "mm"}
        else:
            write["metadata"] = {"axes": "ZYX", "spacing_zyx_mm": [dz, dy, dx]}
    if write.get("resolutionunit") is None:
        write.pop("resolutionunit", None)
    return {"writer": writer, "write": write}


def write_tiff(
    path: str | os.PathLike[str],
    volume: np.ndarray,
    spacing_zyx_mm: tuple[float, float, float] | None = None,
) -> None:
    """Write a 3D (z, y, x) array as a multi-page TIFF, atomically.

    Parameters
    ----------
    path : path
        Output ``.tif`` file; replaced only once the new file is complete.
    volume : ndarray, shape (Z, Y, X), any integer or float dtype
        Written as is, one page per z slice.
    spacing_zyx_mm : (float, float, float), optional
        Voxel size in mm, stored in the file's metadata.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    options = tiff_options(volume.shape, volume.dtype, spacing_zyx_mm)
    with atomic_output(path) as temporary:
        with tifffile.TiffWriter(temporary, **options["writer"]) as tif:
            tif.write(volume, **options["write"])
