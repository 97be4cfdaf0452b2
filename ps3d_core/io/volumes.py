"""Read 3D scans in z-slabs, whatever format the instrument wrote.

Accepted images (axis order is always z, y, x; voxel sizes in mm):

* one multi-page TIFF (``.tif``/``.tiff``), one page per z slice;
* a folder of 2D TIFF slices, one file per z slice in natural sort order
  (``slice_2.tif`` before ``slice_10.tif``), all of one shape and dtype;
* a zarr array (zarr format 2 or 3) or an OME-Zarr image (NGFF 0.4 on zarr
  v2, 0.5 on zarr v3; level 0 is read and its scale is the voxel size);
* a NIfTI file (``.nii``/``.nii.gz``), whose voxel (i, j, k) is (x, y, z);
  the orientation in its affine is ignored.

Voxels are integers or floats. What the headers tell is checked when the
volume is opened, before any voxel is read or memory allocated (3D and more
than one voxel thick, a plausible size, numeric, equal and consecutively
numbered slices, a TIFF or NIfTI whose data lies inside the file); float
slabs are checked for NaN and infinity while they are streamed, so that a
scan is never read twice. Every problem is a
:class:`~ps3d_core.errors.ScanError` naming the most specific file.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Self

import nibabel
import numpy as np
import tifffile
import zarr
from natsort import natsorted

from ps3d_core.errors import ScanError
from ps3d_core.io.ngff import open_group, read_multiscale
from ps3d_core.io.units import spacing_in_mm

TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ZARR_SUFFIX = ".zarr"

#: Largest declared volume and slice, in voxels. The biggest tomograms are about
#: 8k x 8k x 8k (2**39 voxels) from 8k-wide detectors (2**26 per slice); a
#: header declaring more is damaged or lies, and is refused before a reader
#: allocates a slice of it.
MAX_SCAN_VOXELS = 2**40
MAX_SLICE_VOXELS = 2**30

_DTYPE_KINDS = {"b": "boolean", "c": "complex", "V": "structured (RGB or multi-channel)", "U": "text", "O": "object"}


@contextmanager
def _unusable(path: Path, problem: str) -> Iterator[None]:
    """Report a library's exception about a bad file as a ScanError naming the file.

    Readers signal damaged input with many exception types (``struct.error``,
    ``zlib.error``, ``EOFError``, numcodecs' ``RuntimeError``, ...); for the
    user they all mean the same: this file cannot be used.
    """
    try:
        yield
    except (ScanError, MemoryError):
        raise
    except Exception as error:
        raise ScanError(path, f"{problem}: {error}") from error


class Volume(ABC):
    """A 3D grey-value image read in z-slabs, never loaded whole.

    Use it as a context manager (or call :meth:`close`) to release the file.

    Attributes
    ----------
    path : Path
        The image file or directory.
    shape : (int, int, int)
        (Z, Y, X) in voxels.
    dtype : numpy.dtype
        Integer or float, native byte order; what :meth:`read` returns.
    spacing_zyx_mm : (float, float, float) or None
        Voxel size in mm as stored in the image itself, None when it holds
        none. A scan's ``scan.json`` takes precedence over it.
    chunk_depth : int
        Number of z slices the format stores together: slabs starting at
        multiples of it decode each stored chunk once.
    """

    chunk_depth: int = 1

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        spacing_zyx_mm: tuple[float, float, float] | None,
    ) -> None:
        self.path = Path(path)
        self.shape = _volume_shape(self.path, tuple(int(n) for n in shape))
        self.dtype = _grey_dtype(self.path, np.dtype(dtype))
        self.spacing_zyx_mm = spacing_zyx_mm

    @property
    def nbytes(self) -> int:
        """Uncompressed size of the whole volume in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Read slices ``z0 <= z < z1``.

        Returns
        -------
        ndarray, shape (z1 - z0, Y, X), dtype ``self.dtype``, C-contiguous

        Raises
        ------
        ScanError
            The file is damaged, or a float slab holds NaN or infinity
            (naming the first such z).
        """
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise IndexError(f"slices [{z0}, {z1}) are outside [0, {self.shape[0]})")
        with _unusable(self.path, f"cannot read slices {z0}..{z1 - 1}"):
            slab = self._read(z0, z1)
        slab = np.ascontiguousarray(slab, dtype=self.dtype).reshape(z1 - z0, *self.shape[1:])
        _check_finite(self.path, slab, z0)
        return slab

    @abstractmethod
    def _read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 <= z < z1`` in any layout that reshapes to (z1 - z0, Y, X)."""

    def close(self) -> None:
        """Release open files; reading afterwards is an error."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def _volume_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` when it is a plausible (Z, Y, X) scan; ScanError otherwise."""
    if math.prod(shape) == 1:
        raise ScanError(path, f"holds a single voxel (shape {shape}); a scan must be a 3D volume")
    if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
        raise ScanError(path, f"is a 2D image ({shape[-2]}x{shape[-1]} voxels); a scan must be a 3D volume")
    if len(shape) != 3:
        raise ScanError(path, f"has {len(shape)} axes (shape {shape}); a scan must be a 3D volume (z, y, x)")
    if 0 in shape:
        raise ScanError(path, f"is empty (shape {shape})")
    thin = [axis for axis, n in zip("yx", shape[1:], strict=True) if n == 1]
    if thin:
        raise ScanError(
            path, f"is {_size(shape)} voxels, one voxel thick along {thin[0]}; a scan must be a 3D volume"
        )
    if math.prod(shape) > MAX_SCAN_VOXELS or shape[1] * shape[2] > MAX_SLICE_VOXELS:
        raise ScanError(
            path,
            f"declares {_size(shape)} voxels, more than any micro-CT scan (at most {MAX_SCAN_VOXELS:.3g} voxels, "
            f"{MAX_SLICE_VOXELS:.3g} per slice): a damaged or wrong header",
        )
    return shape


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _grey_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    if dtype.kind not in "iuf":
        kind = _DTYPE_KINDS.get(dtype.kind, "non-numeric")
        raise ScanError(path, f"has {kind} voxels ({dtype}); a scan needs integer or float grey values")
    return dtype.newbyteorder("=")


def _check_finite(path: Path, slab: np.ndarray, z0: int) -> None:
    # min and max propagate NaN and reach infinity, without a mask as big as the slab
    if slab.dtype.kind != "f" or (np.isfinite(slab.min()) and np.isfinite(slab.max())):
        return
    z = next(i for i, plane in enumerate(slab) if not np.isfinite(plane).all())
    bad = ~np.isfinite(slab[z])  # one slice's mask, only on the way to the error
    y, x = (int(i[0]) for i in np.nonzero(bad))
    raise ScanError(
        path,
        f"slice z={z0 + z} holds NaN or infinite values ({int(bad.sum())} voxels of the slice, the first at "
        f"y={y}, x={x}); a scan must hold finite grey values",
    )


# --- TIFF -------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    """Collects the errors tifffile logs in this thread (other threads read other files)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _tiff_errors(path: Path) -> Iterator[None]:
    """Raise ScanError for a TIFF that tifffile rejects or logs as damaged.

    tifffile logs, instead of raising, a chain of pages that points past the
    end of the file (a truncated file) and then returns fewer pages.
    """
    log = _ErrorLog()
    logger = logging.getLogger("tifffile")
    logger.addHandler(log)
    try:
        with _unusable(path, "truncated or corrupt TIFF"):
            yield
    finally:
        logger.removeHandler(log)
    if log.messages:
        raise ScanError(path, f"truncated or corrupt TIFF: {log.messages[0]}")


def _check_tiff_data(path: Path, series: tifffile.TiffPageSeries, file_size: int) -> None:
    """Refuse image data that the file cannot hold: past its end, or fewer uncompressed bytes than declared.

    A damaged or forged header can declare a slice of 60000 x 60000 voxels
    over a few stored bytes; without this check the reader would allocate it.
    """
    if series.dataoffset is not None:  # contiguous, possibly a single IFD (ImageJ files over 4 GiB)
        end = series.dataoffset + series.nbytes
    else:
        end = 0
        for z, page in enumerate(series.pages):
            if page is None:
                continue
            offsets, counts = page.dataoffsets, page.databytecounts
            if len(offsets) != len(counts):
                raise ScanError(
                    path, f"truncated or corrupt TIFF: page {z} has {len(offsets)} strip offsets, {len(counts)} sizes"
                )
            stored = sum(counts)
            # uncompressed, whole bytes per sample (not bit-packed): the strips hold every voxel
            key = page.keyframe  # a TiffFrame keeps its tags there
            unpacked = key.bitspersample == 8 * key.dtype.itemsize
            if key.compression == 1 and unpacked and stored < page.nbytes:
                raise ScanError(
                    path,
                    f"truncated or corrupt TIFF: page {z} declares {_size(page.shape)} {page.dtype} "
                    f"({page.nbytes:,} bytes) but stores {stored:,} bytes",
                )
            end = max([end, *(o + c for o, c in zip(offsets, counts, strict=True))])
    if end > file_size:
        raise ScanError(path, f"truncated or corrupt TIFF: image data reaches byte {end}, the file has {file_size}")


def _open_tiff(path: Path) -> tuple[tifffile.TiffFile, tifffile.TiffPageSeries]:
    """Open a TIFF holding one grey-value image whose data lies inside the file; the caller closes it."""
    with ExitStack() as stack:
        with _tiff_errors(path):
            tif = stack.enter_context(tifffile.TiffFile(path))
            len(tif.pages)  # walks the whole chain of pages, where truncation shows
            series = tif.series
        if not series:
            raise ScanError(path, "holds no image data (a TIFF header without pages)")
        _check_tiff_data(path, series[0], tif.filehandle.size)
        if len(series) != 1:
            shapes = ", ".join(str(s.shape) for s in series) or "none"
            raise ScanError(path, f"holds {len(series)} images of different shapes ({shapes}); expected one image")
        if "S" in series[0].axes:
            raise ScanError(
                path,
                f"is an RGB or multi-sample image (axes {series[0].axes}, shape {series[0].shape}); "
                "a scan has one grey value per voxel",
            )
        stack.pop_all()
    return tif, series[0]


def _tiff_spacing(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Voxel size in mm from this platform's metadata, or ImageJ's z spacing, unit and resolution tags."""
    shaped = tif.shaped_metadata
    if shaped and "spacing_zyx_mm" in shaped[0]:
        return spacing_in_mm(shaped[0]["spacing_zyx_mm"], "mm")
    imagej = tif.imagej_metadata or {}
    x_per_unit, y_per_unit = tif.pages.first.resolution
    if "spacing" not in imagej or not (x_per_unit > 0 and y_per_unit > 0):
        return None
    return spacing_in_mm((imagej["spacing"], 1 / y_per_unit, 1 / x_per_unit), imagej.get("unit"))


class ArrayVolume(Volume):
    """An in-memory (Z, Y, X) array seen as a volume, so that results computed
    in memory (labels of a small scan) go through the same streamed writers."""

    def __init__(self, array: np.ndarray, name: str | Path, spacing_zyx_mm: tuple[float, float, float] | None) -> None:
        super().__init__(Path(name), array.shape, array.dtype, spacing_zyx_mm)
        self._array = array

    def _read(self, z0: int, z1: int) -> np.ndarray:
        return self._array[z0:z1]


class TiffVolume(Volume):
    """One multi-page TIFF, page z holding slice z."""

    def __init__(self, path: Path) -> None:
        self._tif, series = _open_tiff(Path(path))
        try:
            super().__init__(path, series.shape, series.dtype, _tiff_spacing(self._tif))
        except BaseException:
            self._tif.close()
            raise

    def _read(self, z0: int, z1: int) -> np.ndarray:
        with _tiff_errors(self.path):
            return self._tif.asarray(key=range(z0, z1), series=0)

    def close(self) -> None:
        self._tif.close()


def tiff_files(folder: Path) -> list[Path]:
    """The visible ``*.tif``/``*.tiff`` files of ``folder`` in natural sort order."""
    files = (p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in TIFF_SUFFIXES)
    return natsorted((p for p in files if p.is_file()), key=lambda p: p.name)


def tiff_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a TIFF's image, read from its headers.

    Raises
    ------
    ScanError
        Truncated or corrupt file, several images or an RGB image.
    """
    tif, series = _open_tiff(path)
    with tif:
        return series.shape, series.dtype


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype = tiff_header(path)
    if len(shape) != 2:
        raise ScanError(path, f"is not a 2D slice (shape {shape}); a folder of slices holds one 2D TIFF per z slice")
    return shape, dtype


def _name_tokens(file: Path) -> list[str]:
    """A file name split into text and digit runs: ``rec_0012_8bit.tif`` -> rec_, 0012, _, 8, bit.tif."""
    return re.split(r"(\d+)", file.name)


def _check_numbering(folder: Path, files: list[Path]) -> None:
    """Refuse a numbered slice stack with a missing, repeated or foreign slice.

    Slice files share one name pattern (the same text around their digit
    runs) and one digit run counts up by one step (usually 1). A gap is a
    slice lost in the copy (the volume would silently be one slice short); a
    file of another pattern (``preview.tif``, ``rec_0001_copy.tif``) or a
    repeated number is not a slice of this stack. Names without digits are
    read in natural order; when several digit runs vary, nothing is checked.
    """
    tokens = [_name_tokens(f) for f in files]
    if len(files) < 2 or all(len(t) == 1 for t in tokens):
        return
    skeletons = [tuple(part.lower() for part in t[0::2]) for t in tokens]
    pattern = max(skeletons, key=skeletons.count)  # the most common; a foreign file may sort first
    example = files[skeletons.index(pattern)].name
    for file, skeleton in zip(files, skeletons, strict=True):
        if skeleton != pattern:
            raise ScanError(
                file,
                f"is not named like the other slices of {folder} (such as {example}); "
                "remove it, or name it as a slice",
            )
    runs = [[int(n) for n in t[1::2]] for t in tokens]
    varying = [i for i in range(len(runs[0])) if len({r[i] for r in runs}) > 1]
    if len(varying) > 1:
        return
    numbers = [r[varying[0]] if varying else r[-1] for r in runs]
    steps = [b - a for a, b in itertools.pairwise(numbers)]
    for index, step in enumerate(steps):
        if step == 0:
            raise ScanError(files[index + 1], f"repeats slice number {numbers[index]} of {files[index].name}")
    step = min(steps)
    for index, jump in enumerate(steps):
        if jump != step:
            raise ScanError(
                folder,
                f"misses slices: {files[index].name} is followed by {files[index + 1].name} "
                f"(slice numbers step by {step} elsewhere); copy the missing slices",
            )


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{'x'.join(map(str, shape))} {dtype}"


class TiffSliceVolume(Volume):
    """A folder of 2D TIFF files, one per z slice, in natural sort order.

    Every slice header is read when the folder is opened, so a slice of the
    wrong shape or dtype, or a gap in the slice numbers, is reported before
    anything is converted.
    """

    def __init__(self, folder: Path) -> None:
        self.files = tiff_files(Path(folder))
        if not self.files:
            raise ScanError(folder, "holds no TIFF slices (*.tif, *.tiff)")
        _check_numbering(Path(folder), self.files)
        first = _slice_header(self.files[0])
        for file in self.files[1:]:
            header = _slice_header(file)
            if header != first:
                raise ScanError(
                    file,
                    f"is {_describe(*header)}, but the first slice {self.files[0].name} is {_describe(*first)}; "
                    "all slices must share shape and dtype",
                )
        shape, dtype = first
        super().__init__(folder, (len(self.files), *shape), dtype, None)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        slab = np.empty((z1 - z0, *self.shape[1:]), self.dtype)
        for plane, file in zip(slab, self.files[z0:z1], strict=True):
            with _tiff_errors(file):
                plane[...] = tifffile.imread(file)
        return slab


# --- zarr and OME-Zarr --------------------------------------------------------


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a zarr v2/v3 array or group directory."""
    return path.is_dir() and (
        path.name.lower().endswith(ZARR_SUFFIX)
        or any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))
    )


class ZarrVolume(Volume):
    """A 3D zarr array (format 2 or 3), or level 0 of an OME-Zarr image."""

    def __init__(self, path: Path) -> None:
        node = open_group(path)
        if isinstance(node, zarr.Group):
            self._array, leading_axes, spacing = read_multiscale(node, Path(path))
        else:
            self._array, leading_axes, spacing = node, 0, None
        self._leading = (0,) * leading_axes
        self.chunk_depth = (self._array.shards or self._array.chunks)[leading_axes]
        super().__init__(path, self._array.shape[leading_axes:], self._array.dtype, spacing)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        return self._array[(*self._leading, slice(z0, z1))]


# --- NIfTI -------------------------------------------------------------------


def _check_nifti_size(path: Path, image: nibabel.Nifti1Image) -> None:
    """Refuse an uncompressed ``.nii`` shorter than its header declares, before anything is read.

    (A ``.nii.gz`` does not tell its uncompressed size; a short one fails when read.)
    """
    if path.name.lower().endswith(".nii.gz"):
        return
    header = image.header
    declared = int(header["vox_offset"]) + math.prod(image.shape) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if declared > size:
        raise ScanError(
            path,
            f"truncated or corrupt NIfTI: its header declares {_size(image.shape)} {header.get_data_dtype()} "
            f"voxels ({declared:,} bytes with the header), the file has {size:,} bytes",
        )


def _nifti_spacing(header: nibabel.Nifti1Header) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x) in mm from the header; None when it records none, or a damaged one (scan.json wins)."""
    try:
        zooms = header.get_zooms()[:3]
        unit = header.get_xyzt_units()[0]
    except (KeyError, ValueError):  # an unknown unit code
        return None
    return spacing_in_mm(zooms[::-1], unit) if len(zooms) == 3 else None


class NiftiVolume(Volume):
    """A NIfTI-1/2 file; its voxel (i, j, k) is (x, y, z), read transposed to (z, y, x)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        # a damaged header fails anywhere in nibabel (KeyError for an unknown code, ...)
        with _unusable(path, "is not a readable NIfTI file"):
            # keep_file_open: a .nii.gz is then decompressed once, front to
            # back, instead of from its start for every slab
            image = nibabel.load(path, keep_file_open=True)
            self._proxy = image.dataobj
            _check_nifti_size(path, image)
            # scaled NIfTI (scl_slope) reads as float: ask the reader, not the header
            dtype = np.asarray(self._proxy[(0,) * len(image.shape)]).dtype
        self._extra = image.shape[3:]
        if any(n != 1 for n in self._extra):
            raise ScanError(
                path, f"holds {math.prod(self._extra)} volumes (shape {image.shape}); a scan is one 3D volume"
            )
        super().__init__(path, image.shape[:3][::-1], dtype, _nifti_spacing(image.header))

    def _read(self, z0: int, z1: int) -> np.ndarray:
        xyz = self._proxy[(slice(None), slice(None), slice(z0, z1), *(0,) * len(self._extra))]
        return np.asarray(xyz).transpose(2, 1, 0)

    def close(self) -> None:
        # nibabel closes the kept-open file when the proxy is collected
        self._proxy = None


# --- dispatch ------------------------------------------------------------------


def open_volume(path: str | os.PathLike[str]) -> Volume:
    """Open an image for reading in z-slabs, choosing the reader from what ``path`` is.

    A directory is a zarr array/OME-Zarr image when its name ends in
    ``.zarr`` or it holds zarr metadata, otherwise a folder of TIFF slices;
    a file is read by its suffix (``.tif``/``.tiff``, ``.nii``/``.nii.gz``).

    Raises
    ------
    ScanError
        Missing path, unknown format, or an image that is not a numeric 3D
        volume.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise ScanError(path, "does not exist")
    if path.is_dir():
        return ZarrVolume(path) if is_zarr(path) else TiffSliceVolume(path)
    if name.endswith(TIFF_SUFFIXES):
        return TiffVolume(path)
    if name.endswith(NIFTI_SUFFIXES):
        return NiftiVolume(path)
    raise ScanError(
        path,
        "is not a supported image: expected a 3D TIFF, a folder of TIFF slices, "
        "a zarr/OME-Zarr directory or a NIfTI file",
    )


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole (small) image: labels, test data.

    Returns
    -------
    ndarray, shape (Z, Y, X), the file's dtype in native byte order
    """
    with open_volume(path) as volume:
        return volume.read(0, volume.shape[0])
