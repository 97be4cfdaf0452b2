"""OME-NGFF (OME-Zarr) multiscale metadata: written as version 0.5, read as 0.4 or 0.5.

Version 0.4 keeps ``multiscales`` at the top of the zarr v2 group attributes,
version 0.5 nests it under ``attributes["ome"]`` of a zarr v3 group. Only the
first multiscale image and its level 0 are read; its ``scale`` transform is the
voxel size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import zarr

from ps3d_core.errors import ScanError
from ps3d_core.io.units import spacing_in_mm

NGFF_VERSION = "0.5"

#: How the pyramid levels below level 0 are computed: the mean of each 2x2x2
#: block (grey values) or every second voxel (label images, where a mean
#: would invent labels).
Downsampling = Literal["mean", "stride"]


def multiscales_attributes(
    name: str,
    spacing_zyx_mm: tuple[float, float, float],
    level_count: int,
    downsampling: Downsampling,
) -> dict[str, Any]:
    """The ``attributes["ome"]`` document of a 3D image pyramid.

    Parameters
    ----------
    name : str
        Name of the image shown by viewers.
    spacing_zyx_mm : (float, float, float)
        Voxel size of level 0 in mm; level ``k`` has voxels ``2**k`` times larger.
    level_count : int
        Number of levels, stored as arrays ``"0"``, ``"1"``, ...
    downsampling : {"mean", "stride"}
        How the levels were computed: a mean voxel sits at the centre of its
        block, which the translation transform records.
    """
    axes = [{"name": axis, "type": "space", "unit": "millimeter"} for axis in "zyx"]
    datasets = []
    for level in range(level_count):
        factor = 2**level
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [s * factor for s in spacing_zyx_mm]}]
        if downsampling == "mean" and level:
            transforms.append({"type": "translation", "translation": [s * (factor - 1) / 2 for s in spacing_zyx_mm]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    multiscale = {"name": name, "axes": axes, "datasets": datasets, "type": downsampling}
    return {"version": NGFF_VERSION, "multiscales": [multiscale]}


def _scale(transforms: list[dict[str, Any]] | None) -> list[float] | None:
    for transform in transforms or []:
        if transform.get("type") == "scale":
            return [float(value) for value in transform["scale"]]
    return None


def read_multiscale(group: zarr.Group, path: Path) -> tuple[zarr.Array, int, tuple[float, float, float] | None]:
    """Find level 0 of an OME-Zarr image and its voxel size.

    Parameters
    ----------
    group : zarr.Group
        The OME-Zarr root group (zarr v2 with NGFF 0.4, or zarr v3 with 0.5).
    path : Path
        Its location, for error messages.

    Returns
    -------
    array : zarr.Array
        Level 0, with the z, y, x axes last.
    leading_axes : int
        Number of axes before z (time, channel), each of size 1.
    spacing_zyx_mm : (float, float, float) or None
        Level 0 voxel size in mm; None without a scale or a length unit.

    Raises
    ------
    ScanError
        Without multiscales metadata, with malformed metadata, or when a
        time or channel axis holds more than one entry.
    """
    attributes = group.attrs.asdict()
    multiscales = attributes.get("ome", attributes).get("multiscales")
    if not multiscales:
        raise ScanError(
            path, "is a zarr group without OME-Zarr 'multiscales' metadata; expected a zarr array or an OME-Zarr image"
        )
    try:
        multiscale = multiscales[0]
        names, types, units = zip(*((a["name"], a.get("type"), a.get("unit")) for a in multiscale["axes"]), strict=True)
        dataset = multiscale["datasets"][0]
        array = group[dataset["path"]]
        scale = _scale(dataset.get("coordinateTransformations"))
        overall = _scale(multiscale.get("coordinateTransformations")) or [1.0] * len(names)
        if scale is not None:
            scale = [s * o for s, o in zip(scale, overall, strict=True)]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise ScanError(path, f"has malformed OME-Zarr multiscales metadata ({error!r})") from None
    if not isinstance(array, zarr.Array) or array.ndim != len(names) or types[-3:] != ("space",) * 3:
        raise ScanError(
            path, f"has axes {list(names)}; a scan needs a level 0 array with three space axes z, y, x last"
        )
    for name, size in zip(names[:-3], array.shape, strict=False):
        if size != 1:
            raise ScanError(path, f"has {size} entries along axis {name!r}; a scan must be one grey-value 3D volume")
    spatial_units = set(units[-3:])
    spacing = None
    if scale is not None and len(spatial_units) == 1:
        spacing = spacing_in_mm(scale[-3:], spatial_units.pop())
    return array, len(names) - 3, spacing


def open_group(path: str | os.PathLike[str]) -> zarr.Group | zarr.Array:
    """Open a zarr v2 or v3 array or group read-only; ScanError if it is neither."""
    path = Path(path)
    try:
        return zarr.open(store=path, mode="r")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        raise ScanError(path, f"is not a readable zarr array or OME-Zarr image ({error})") from None


def open_ome_zarr(path: str | os.PathLike[str]) -> tuple[zarr.Array, tuple[float, float, float] | None, dict[str, Any]]:
    """Open an OME-Zarr image written by :func:`convert_to_ome_zarr` (or any NGFF 0.4/0.5 image).

    Returns
    -------
    array : zarr.Array, shape (Z, Y, X) for this platform's files
        Level 0, read lazily.
    spacing_zyx_mm : (float, float, float) or None
        Its voxel size in mm.
    attributes : dict
        All group attributes: ``"ome"`` (or ``"multiscales"`` for 0.4) and
        this platform's ``"ps3d"`` scan metadata.
    """
    path = Path(path)
    group = open_group(path)
    if not isinstance(group, zarr.Group):
        raise ScanError(path, "is a bare zarr array, not an OME-Zarr image (no multiscales metadata)")
    array, _, spacing = read_multiscale(group, path)
    return array, spacing, group.attrs.asdict()
