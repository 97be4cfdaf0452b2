"""Reading scans in z-slabs and writing OME-Zarr/TIFF, streamed.

Formats and the scan-directory rules: :mod:`ps3d_core.io.volumes` and
:mod:`ps3d_core.io.scans`; conversion and its memory and disk behaviour:
:mod:`ps3d_core.io.convert`. Axis order is always z, y, x; sizes in mm.
"""

from ps3d_core.io.atomic import atomic_output, write_text_atomic
from ps3d_core.io.convert import convert_to_ome_zarr, export_tiff, write_labels_ome_zarr
from ps3d_core.io.ngff import open_ome_zarr
from ps3d_core.io.scans import Scan, find_scan_image, open_legacy_dataset, open_scan
from ps3d_core.io.tiff import write_tiff
from ps3d_core.io.volumes import ArrayVolume, Volume, open_volume, read_image

__all__ = [
    "ArrayVolume",
    "Scan",
    "Volume",
    "atomic_output",
    "convert_to_ome_zarr",
    "export_tiff",
    "find_scan_image",
    "open_legacy_dataset",
    "open_ome_zarr",
    "open_scan",
    "open_volume",
    "read_image",
    "write_labels_ome_zarr",
    "write_text_atomic",
    "write_tiff",
]
