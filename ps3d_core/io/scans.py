"""Scan directories: ``scan.json`` plus exactly one image.

Rules of a scan directory (the README quotes them):

* It holds ``scan.json`` (see :class:`schemas.scan.ScanMetadata`), optionally
  the ``_SCAN_COMPLETE`` marker, and exactly one image, which is one of

  - a single 3D TIFF file (``*.tif``/``*.tiff``), one page per z slice;
  - several 2D TIFF slices directly in the scan directory, one per z slice;
  - one sub-directory of 2D TIFF slices;
  - a ``*.zarr``/``*.ome.zarr`` directory (zarr array or OME-Zarr image);
  - a ``*.nii``/``*.nii.gz`` file.

  Slices are ordered by natural sort of their file names (``slice_2.tif``
  before ``slice_10.tif``).
* Hidden entries (``.name``, which includes the ``.partial-*`` temporaries
  of unfinished copies) are ignored, as are other files (logs, notes).
* No image, or more than one, is an error listing what was found.
* The voxel size of ``scan.json`` is the contract: when the image file
  carries its own voxel size and the two disagree, ``scan.json`` wins.

The original ParticleSeg3D dataset layout is accepted too: a directory with
``images/<name>.zarr`` and ``metadata.json`` mapping each name to
``{"spacing": ..., "particle_size": ...}`` in mm. :func:`open_scan` takes such
a dataset holding one image, or one ``DATASET/images/<name>.zarr`` directly;
:func:`open_legacy_dataset` opens them all. The image name is the sample id
and the stream is ``other``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natsort import natsorted
from pydantic import ValidationError

from ps3d_core.errors import ScanError
from ps3d_core.io.volumes import (
    NIFTI_SUFFIXES,
    TIFF_SUFFIXES,
    ZARR_SUFFIX,
    Volume,
    is_zarr,
    open_volume,
    tiff_files,
    tiff_header,
)
from schemas.scan import (
    SCAN_COMPLETE_MARKER,
    SCAN_JSON,
    LegacyImageMetadata,
    ScanMetadata,
    describe_validation_error,
    load_scan_metadata,
)

LEGACY_METADATA_JSON = "metadata.json"
LEGACY_IMAGES_DIR = "images"

_EXPECTED_IMAGE = (
    "one 3D TIFF, a folder of 2D TIFF slices (or the slices themselves), "
    "a *.zarr/*.ome.zarr directory or a *.nii/*.nii.gz file"
)


@dataclass(frozen=True)
class Scan:
    """One scan ready to stream.

    Attributes
    ----------
    path : Path
        The scan directory; for the ParticleSeg3D layout the image
        ``DATASET/images/<name>.zarr``.
    metadata : ScanMetadata
        Validated ``scan.json`` (or the ``metadata.json`` entry).
    volume : Volume
        The image, open for reading in z-slabs; close it (or the scan) when done.
    """

    path: Path
    metadata: ScanMetadata
    volume: Volume

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm from the metadata, which wins over the image file's own."""
        return self.metadata.spacing_zyx_mm

    def close(self) -> None:
        self.volume.close()

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _visible_entries(directory: Path) -> list[Path]:
    """Entries that may be the image: not hidden, not scan.json, not the marker."""
    ignored = {SCAN_JSON, SCAN_COMPLETE_MARKER}
    return natsorted(
        (p for p in directory.iterdir() if not p.name.startswith(".") and p.name not in ignored),
        key=lambda p: p.name,
    )


def _image_candidates(scan_dir: Path, entries: list[Path]) -> list[Path]:
    """Each entry that is an image; loose 2D TIFF slices count as one image, the scan directory."""
    tiffs = [p for p in entries if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES)]
    images: list[Path] = []
    if len(tiffs) == 1 or (len(tiffs) > 1 and len(tiff_header(tiffs[0])[0]) > 2):
        images += tiffs  # one volume, or several volumes: too many images
    elif tiffs:
        images.append(scan_dir)
    for entry in entries:
        if (
            (entry.is_file() and entry.name.lower().endswith(NIFTI_SUFFIXES))
            or is_zarr(entry)
            or (entry.is_dir() and tiff_files(entry))
        ):
            images.append(entry)
    return images


def find_scan_image(scan_dir: str | os.PathLike[str]) -> Path:
    """The one image of a scan directory (see the module docstring for the rules).

    Returns
    -------
    Path
        The image file or directory; ``scan_dir`` itself when the 2D slices
        lie directly in it.

    Raises
    ------
    ScanError
        ``scan_dir`` is missing, not a directory, empty, or holds no image or
        more than one.
    """
    scan_dir = Path(scan_dir)
    if not scan_dir.is_dir():
        raise ScanError(
            scan_dir,
            "does not exist"
            if not scan_dir.exists()
            else "is not a directory; a scan is a directory with scan.json and one image",
        )
    entries = _visible_entries(scan_dir)
    images = _image_candidates(scan_dir, entries)
    if len(images) == 1:
        return images[0]
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries)
    if not images:
        where = f"found only {found}" if found else "it is empty"
        raise ScanError(scan_dir, f"holds no image ({where}); expected {_EXPECTED_IMAGE}")
    names = ", ".join("the TIFF slices" if p == scan_dir else p.name for p in images)
    raise ScanError(scan_dir, f"holds {len(images)} images ({names}); a scan directory holds exactly one")


def open_scan(path: str | os.PathLike[str]) -> Scan:
    """Open a scan: a scan directory, a ParticleSeg3D dataset with one image, or one of its images.

    Raises
    ------
    ScanError
        Missing or invalid ``scan.json``/``metadata.json``, no or several
        images, or an unusable image.
    """
    path = Path(path)
    if _is_legacy_image(path):
        dataset = path.parent.parent
        return _open_legacy_image(dataset, path, _legacy_metadata(dataset))
    if path.is_dir() and not (path / SCAN_JSON).exists() and _is_legacy_dataset(path):
        images = _legacy_images(path)
        if len(images) != 1:
            names = ", ".join(p.name for p in images) or "none"
            raise ScanError(
                path,
                f"is a ParticleSeg3D dataset with {len(images)} images ({names}); "
                "open one as DATASET/images/<name>.zarr, or all with open_legacy_dataset",
            )
        return _open_legacy_image(path, images[0], _legacy_metadata(path))
    image = find_scan_image(path)
    metadata = load_scan_metadata(path / SCAN_JSON)
    return Scan(path, metadata, open_volume(image))


# --- the original ParticleSeg3D dataset layout -------------------------------


def _is_legacy_dataset(path: Path) -> bool:
    return (path / LEGACY_METADATA_JSON).is_file() and (path / LEGACY_IMAGES_DIR).is_dir()


def _is_legacy_image(path: Path) -> bool:
    return (
        path.name.lower().endswith(ZARR_SUFFIX)
        and path.parent.name == LEGACY_IMAGES_DIR
        and _is_legacy_dataset(path.parent.parent)
    )


def _legacy_images(dataset: Path) -> list[Path]:
    images = dataset / LEGACY_IMAGES_DIR
    return natsorted((p for p in images.iterdir() if not p.name.startswith(".") and is_zarr(p)), key=lambda p: p.name)


def _legacy_metadata(dataset: Path) -> dict[str, Any]:
    path = dataset / LEGACY_METADATA_JSON
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ScanError(path, f"is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ScanError(path, f"must map image names to their metadata, got {type(document).__name__}")
    return document


def _open_legacy_image(dataset: Path, image: Path, entries: dict[str, Any]) -> Scan:
    source = dataset / LEGACY_METADATA_JSON
    name = image.name[: -len(ZARR_SUFFIX)]
    if name not in entries:
        raise ScanError(source, f"has no entry for image {name!r} (entries: {', '.join(map(repr, entries)) or 'none'})")
    try:
        legacy = LegacyImageMetadata.model_validate(entries[name])
    except ValidationError as error:
        raise ScanError(source, f"entry {name!r}: {describe_validation_error(error)}") from None
    try:
        metadata = legacy.to_scan_metadata(name)
    except ValidationError as error:
        raise ScanError(
            image, f"image name {name!r} is not a valid sample id: {describe_validation_error(error)}"
        ) from None
    return Scan(image, metadata, open_volume(image))


def open_legacy_dataset(dataset_dir: str | os.PathLike[str]) -> list[Scan]:
    """Open every image of an original ParticleSeg3D dataset, in natural order of name.

    Raises
    ------
    ScanError
        Not such a dataset, invalid ``metadata.json``, an image without an
        entry, or an image name that is not a valid sample id.
    """
    dataset = Path(dataset_dir)
    if not _is_legacy_dataset(dataset):
        raise ScanError(
            dataset,
            f"is not a ParticleSeg3D dataset: expected {LEGACY_METADATA_JSON} and an {LEGACY_IMAGES_DIR}/ directory",
        )
    entries = _legacy_metadata(dataset)
    return [_open_legacy_image(dataset, image, entries) for image in _legacy_images(dataset)]
