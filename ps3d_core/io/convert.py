"""Stream a scan into an OME-Zarr pyramid, and an image back into a TIFF.

Memory: the conversion holds one slab of the input (``depth`` z slices x Y x X
voxels of its dtype), its 2x downsampled copies (1/8, 1/64, ... of it) and
zarr's encoding buffers, never the whole volume. ``depth`` is the least
multiple of the chunk depth that ``2**(levels - 1)`` divides, so that each
slab downsamples on its own into every level.

Disk: before writing anything, an output whose uncompressed size exceeds the
free space at its location is refused. Compression usually shrinks a scan,
but by how much depends on its noise; refusing up front beats failing on a
full disk hours later. Pass ``check_disk_space=False`` to try anyway.

Outputs appear atomically: a failure part-way (a NaN slab, a full disk,
Ctrl-C) leaves no partial output and keeps a previous one intact.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from zarr.codecs import BloscCodec

from ps3d_core.errors import ScanError
from ps3d_core.io.atomic import atomic_output
from ps3d_core.io.ngff import NGFF_VERSION, Downsampling, multiscales_attributes
from ps3d_core.io.scans import Scan
from ps3d_core.io.tiff import tiff_options
from ps3d_core.io.volumes import ArrayVolume, Volume, open_volume

#: z, y, x voxels per chunk: 4 MiB of uint16, a good unit for viewers and for dask.
DEFAULT_CHUNKS = (128, 128, 128)
#: Levels of the pyramid at most: level 3 is 1/8 of the scan along each axis.
MAX_LEVELS = 4
#: Byte shuffle + zstd level 3: on noisy 16-bit grey values about as fast as bit shuffle and
#: 5 % smaller; higher levels cost far more time than they save space.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

#: Called after each slab with (z slices done, z slices in total).
Progress = Callable[[int, int], None]


def pyramid_shapes(
    shape: tuple[int, int, int], chunks: tuple[int, int, int], max_levels: int = MAX_LEVELS
) -> list[tuple[int, int, int]]:
    """Shapes (z, y, x) of the pyramid levels, level 0 first.

    Each level halves every axis of the one above, rounding up. A level is
    added while the level above spans at least two chunks along every axis:
    a viewer gets an overview of a big scan, a small volume stays one level.
    """
    shapes = [tuple(shape)]
    while len(shapes) < max_levels and all(n >= 2 * c for n, c in zip(shapes[-1], chunks, strict=True)):
        shapes.append(tuple(math.ceil(n / 2) for n in shapes[-1]))
    return shapes


def _block_mean(pair: np.ndarray) -> np.ndarray:
    """Mean of the 2x2x2 blocks of one or two (Y, X) slices: shape (ceil(Y/2), ceil(X/2)), float."""
    odd = [(0, 2 - pair.shape[0]), (0, pair.shape[1] % 2), (0, pair.shape[2] % 2)]
    if any(pad for _, pad in odd):
        # repeating the edge voxel leaves the mean of a partial block unchanged
        pair = np.pad(pair, odd, mode="edge")
    # float32 is exact for sums of eight 16-bit values; wider types need float64
    accumulator = np.float32 if pair.dtype.itemsize <= 2 or pair.dtype == np.float32 else np.float64
    # pairwise sums of strided views: ten times faster than mean() over a 5D reshape
    total = pair[0].astype(accumulator)
    total += pair[1]
    total = total[0::2] + total[1::2]
    total = total[:, 0::2] + total[:, 1::2]
    total *= 0.125
    return np.rint(total, out=total) if pair.dtype.kind in "iu" else total


def halve(slab: np.ndarray, downsampling: Downsampling) -> np.ndarray:
    """Downsample a (Z, Y, X) slab by 2 along each axis.

    Returns
    -------
    ndarray, shape (ceil(Z/2), ceil(Y/2), ceil(X/2)), dtype of ``slab``
        ``"mean"``: the mean of each 2x2x2 block, rounded for integers; a
        block cut by an odd edge averages the voxels it has. ``"stride"``:
        every second voxel (for labels).
    """
    if downsampling == "stride":
        return slab[::2, ::2, ::2]
    halved = np.empty(tuple(-(-n // 2) for n in slab.shape), slab.dtype)
    # one output slice at a time: the float temporaries are a slice, not a slab
    for z, plane in enumerate(halved):
        plane[...] = _block_mean(slab[2 * z : 2 * z + 2])
    return halved


def ensure_disk_space(source: Path, nbytes: int, out: Path) -> None:
    """Refuse an output of ``nbytes`` (uncompressed) that does not fit the free space at ``out``.

    Raises
    ------
    ScanError
        Naming ``source``, with both sizes in GB.
    """
    location = next(p for p in Path(out).absolute().parents if p.exists())
    free = shutil.disk_usage(location).free
    if nbytes > free:
        raise ScanError(
            source,
            f"writing it to {out} needs {nbytes / 1e9:,.1f} GB uncompressed, "
            f"but only {free / 1e9:,.1f} GB are free at {location}; "
            "free disk space, write elsewhere, or retry with check_disk_space=False (compression may make it fit)",
        )


def _source_parts(
    source: Scan | Volume, spacing_zyx_mm: tuple[float, float, float] | None, attributes: Mapping[str, Any] | None
) -> tuple[Volume, tuple[float, float, float], dict[str, Any], str]:
    """Volume, voxel size (mm), group attributes and image name of what is converted."""
    extra = dict(attributes or {})
    if isinstance(source, Scan):
        ps3d = {"ps3d": source.metadata.model_dump(mode="json", exclude_none=True)}
        return source.volume, spacing_zyx_mm or source.spacing_zyx_mm, ps3d | extra, source.metadata.sample_id
    spacing = spacing_zyx_mm or source.spacing_zyx_mm
    if spacing is None:
        raise ScanError(
            source.path, "holds no voxel size; pass spacing_zyx_mm (a scan directory takes it from scan.json)"
        )
    return source, spacing, extra, source.path.name


def _slab_bounds(size: int, depth: int) -> Iterator[tuple[int, int]]:
    """``(z0, z1)`` of consecutive slabs of ``depth`` slices (the last may be thinner)."""
    for z0 in range(0, size, depth):
        yield z0, min(z0 + depth, size)


def _write_levels(levels: list[zarr.Array], z0: int, slab: np.ndarray, downsampling: Downsampling) -> None:
    """Write a level-0 slab starting at ``z0`` and its downsampled copies into every level."""
    for level, array in enumerate(levels):
        if level:
            slab = halve(slab, downsampling)
        start = z0 >> level  # z0 is a multiple of 2**(levels - 1)
        array[start : start + slab.shape[0]] = slab


def convert_to_ome_zarr(
    source: Scan | Volume,
    out: str | os.PathLike[str],
    *,
    spacing_zyx_mm: tuple[float, float, float] | None = None,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    attributes: Mapping[str, Any] | None = None,
    downsampling: Downsampling = "mean",
    progress: Progress | None = None,
    check_disk_space: bool = True,
    ome_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Stream a scan into a compressed OME-Zarr (NGFF 0.5, zarr v3) image pyramid.

    Parameters
    ----------
    source : Scan or Volume
        A scan (its ``scan.json`` gives the voxel size and is stored under
        the ``"ps3d"`` attribute) or a bare volume.
    out : path
        The ``.ome.zarr`` directory to create; an existing one is replaced
        once the new one is complete.
    spacing_zyx_mm : (float, float, float), optional
        Voxel size in mm; default: the scan's, else the one in the image file.
    chunks : (int, int, int)
        Chunk shape (z, y, x) in voxels, clipped to the volume.
    attributes : mapping, optional
        Extra JSON attributes of the root group (they override ``"ps3d"``).
    downsampling : {"mean", "stride"}
        How pyramid levels are computed: "mean" for grey values, "stride"
        for label images.
    progress : callable(done, total), optional
        Called after each slab with the z slices written so far and in total.
    check_disk_space : bool
        Refuse up front an output bigger (uncompressed) than the free space.
    ome_extra : mapping, optional
        Extra keys of the NGFF ``ome`` document (``image-label``).

    Returns
    -------
    Path
        ``out``. Level 0 holds the input's values and dtype, shape (Z, Y, X).

    Raises
    ------
    ScanError
        No voxel size, not enough disk space, or input that fails while
        streaming (NaN, damaged file); nothing is left at ``out`` then.
    """
    volume, spacing, group_attributes, name = _source_parts(source, spacing_zyx_mm, attributes)
    out = Path(out)
    chunks = tuple(min(int(c), n) for c, n in zip(chunks, volume.shape, strict=True))
    shapes = pyramid_shapes(volume.shape, chunks)
    if check_disk_space:
        ensure_disk_space(volume.path, sum(math.prod(s) for s in shapes) * volume.dtype.itemsize, out)
    group_attributes["ome"] = multiscales_attributes(name, spacing, len(shapes), downsampling) | dict(ome_extra or {})
    with atomic_output(out) as temporary:
        group = zarr.create_group(temporary, zarr_format=3, attributes=group_attributes)
        levels = [
            group.create_array(
                str(level),
                shape=shape,
                chunks=tuple(min(c, n) for c, n in zip(chunks, shape, strict=True)),
                dtype=volume.dtype,
                compressors=_COMPRESSOR,
                dimension_names=("z", "y", "x"),
                fill_value=0,
            )
            for level, shape in enumerate(shapes)
        ]
        for z0, z1 in _slab_bounds(volume.shape[0], math.lcm(chunks[0], 2 ** (len(shapes) - 1))):
            # no name holds the slab: it is freed before the next one is read
            _write_levels(levels, z0, volume.read(z0, z1), downsampling)
            if progress is not None:
                progress(z1, volume.shape[0])
    return out


def write_labels_ome_zarr(
    labels: np.ndarray,
    out: str | os.PathLike[str],
    spacing_zyx_mm: tuple[float, float, float],
    *,
    attributes: Mapping[str, Any] | None = None,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
) -> Path:
    """Write an in-memory instance label volume as an OME-Zarr label image.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), unsigned integer
        0 background, k > 0 particle k.
    out : path
        ``labels.ome.zarr`` directory, replaced atomically.
    spacing_zyx_mm : (float, float, float)
        Voxel size in mm.
    attributes : mapping, optional
        Extra root attributes (run parameters).

    The pyramid keeps every second voxel (a mean would invent labels) and the
    root carries NGFF's ``image-label`` marker so viewers show it as labels.
    """
    label_marker = {"image-label": {"version": NGFF_VERSION, "source": {}}}
    return convert_to_ome_zarr(
        ArrayVolume(labels, out, spacing_zyx_mm),
        out,
        spacing_zyx_mm=spacing_zyx_mm,
        chunks=chunks,
        attributes=attributes,
        downsampling="stride",
        check_disk_space=False,
        ome_extra=label_marker,
    )


def _pages(volume: Volume, progress: Progress | None) -> Iterator[np.ndarray]:
    """The (Y, X) slices of ``volume``, read one chunk-deep slab at a time."""
    for z0, z1 in _slab_bounds(volume.shape[0], volume.chunk_depth):
        yield from volume.read(z0, z1)
        if progress is not None:
            progress(z1, volume.shape[0])


def export_tiff(
    source: str | os.PathLike[str],
    out_tif: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    check_disk_space: bool = True,
) -> Path:
    """Stream an image (normally an OME-Zarr from :func:`convert_to_ome_zarr`) into a multi-page TIFF.

    Level 0 is written page by page, uncompressed, BigTIFF over 4 GiB, with
    the voxel size of the source in the file (ImageJ metadata where the
    dtype allows it); memory holds one chunk-deep slab.

    Parameters
    ----------
    source : path
        Any image :func:`open_volume` reads.
    out_tif : path
        The ``.tif`` to create, atomically.
    progress : callable(done, total), optional
        Called after each slab with the z slices written so far and in total.
    check_disk_space : bool
        Refuse up front a TIFF bigger than the free space.

    Returns
    -------
    Path
        ``out_tif``.
    """
    out_tif = Path(out_tif)
    with open_volume(source) as volume:
        if check_disk_space:
            ensure_disk_space(volume.path, volume.nbytes, out_tif)
        options = tiff_options(volume.shape, volume.dtype, volume.spacing_zyx_mm)
        with atomic_output(out_tif) as temporary, tifffile.TiffWriter(temporary, **options["writer"]) as tif:
            tif.write(_pages(volume, progress), shape=volume.shape, dtype=volume.dtype, **options["write"])
    return out_tif
