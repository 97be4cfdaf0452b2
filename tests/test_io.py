"""Reading scans: every format, the scan-directory rules, and every bad input's ScanError."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image

from ps3d_core.errors import ScanError
from ps3d_core.io import (
    convert_to_ome_zarr,
    find_scan_image,
    open_legacy_dataset,
    open_scan,
    open_volume,
    read_image,
    write_tiff,
)
from ps3d_core.io.volumes import NiftiVolume, TiffSliceVolume, TiffVolume, ZarrVolume

DTYPES = [np.uint8, np.uint16, np.int16, np.float32]
SPACING = (0.5, 0.25, 0.125)


def ramp(shape: tuple[int, int, int] = (9, 11, 13), dtype=np.uint16) -> np.ndarray:
    """A volume whose every voxel differs, so misplaced slabs or axes show."""
    values = np.arange(np.prod(shape)).reshape(shape) % 251
    return (values - 100 if np.dtype(dtype).kind in "if" else values).astype(dtype)


def write_scan_json(scan_dir: Path, **fields) -> dict:
    document = {"sample_id": scan_dir.name, "spacing_mm": list(SPACING), "stream": "feed", **fields}
    scan_dir.mkdir(parents=True, exist_ok=True)
    (scan_dir / "scan.json").write_text(json.dumps(document))
    return document


def write_slices(folder: Path, volume: np.ndarray, name: str = "slice_{}.tif", first: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name.format(z + first) for z in range(volume.shape[0])]
    for path, plane in zip(paths, volume, strict=True):
        tifffile.imwrite(path, plane, photometric="minisblack")
    return paths


def assert_scan_error(error: pytest.ExceptionInfo[ScanError], path: Path, *words: str) -> None:
    """The error names exactly ``path`` and says ``words``."""
    assert error.value.path == str(path)
    assert str(error.value).startswith(f"{path}: ")
    for word in words:
        assert word in error.value.problem, error.value.problem


# --- readers -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiff_3d_reads_slabs_values_and_spacing(tmp_path, dtype):
    volume = ramp(dtype=dtype)
    write_tiff(tmp_path / "scan.tif", volume, SPACING)
    with open_volume(tmp_path / "scan.tif") as opened:
        assert isinstance(opened, TiffVolume)
        assert opened.shape == (9, 11, 13)
        assert opened.dtype == np.dtype(dtype)
        assert opened.spacing_zyx_mm == pytest.approx(SPACING)
        np.testing.assert_array_equal(opened.read(2, 5), volume[2:5])
        np.testing.assert_array_equal(opened.read(8, 9), volume[8:9])
        assert opened.read(0, 9).tobytes() == volume.tobytes()


def test_compressed_tiff_reads_slabs(tmp_path):
    volume = ramp()
    tifffile.imwrite(tmp_path / "zlib.tif", volume, compression="zlib", photometric="minisblack")
    with open_volume(tmp_path / "zlib.tif") as opened:
        assert opened.spacing_zyx_mm is None
        np.testing.assert_array_equal(opened.read(3, 7), volume[3:7])


def test_imagej_tiff_in_micrometres_gives_mm(tmp_path):
    tifffile.imwrite(
        tmp_path / "um.tif",
        ramp(),
        imagej=True,
        resolution=(1 / 2.0, 1 / 4.0),
        metadata={"axes": "ZYX", "spacing": 8.0, "unit": "micron"},
    )
    assert open_volume(tmp_path / "um.tif").spacing_zyx_mm == pytest.approx((0.008, 0.004, 0.002))


def test_tiff_folder_is_read_in_natural_order(tmp_path):
    volume = ramp((12, 5, 6))
    volume[:, 0, 0] = np.arange(1, 13)  # slice number in a corner
    paths = write_slices(tmp_path / "slices", volume)
    with open_volume(tmp_path / "slices") as opened:
        assert isinstance(opened, TiffSliceVolume)
        assert [p.name for p in opened.files] == [f"slice_{n}.tif" for n in range(1, 13)]
        assert opened.shape == (12, 5, 6)
        assert opened.spacing_zyx_mm is None
        assert opened.read(0, 12)[:, 0, 0].tolist() == list(range(1, 13))
        np.testing.assert_array_equal(opened.read(1, 11), volume[1:11])
    assert sorted(p.name for p in paths)[:3] == ["slice_1.tif", "slice_10.tif", "slice_11.tif"]  # why natsort


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zarr_array_reads_slabs(tmp_path, zarr_format, dtype):
    volume = ramp(dtype=dtype)
    array = zarr.create_array(
        tmp_path / "scan.zarr", shape=volume.shape, chunks=(4, 11, 13), dtype=dtype, zarr_format=zarr_format
    )
    array[:] = volume
    with open_volume(tmp_path / "scan.zarr") as opened:
        assert isinstance(opened, ZarrVolume)
        assert (opened.shape, opened.dtype, opened.chunk_depth, opened.spacing_zyx_mm) == (
            (9, 11, 13),
            np.dtype(dtype),
            4,
            None,
        )
        np.testing.assert_array_equal(opened.read(3, 9), volume[3:9])


def test_big_endian_zarr_reads_native(tmp_path):
    volume = ramp()
    zarr.create_array(tmp_path / "be.zarr", data=volume.astype(">u2"), zarr_format=2)
    with open_volume(tmp_path / "be.zarr") as opened:
        assert opened.dtype == np.dtype("=u2")
        slab = opened.read(0, 9)
        assert slab.dtype.isnative
        np.testing.assert_array_equal(slab, volume)


def test_ome_zarr_v04_from_another_writer_reads_level0_in_mm(tmp_path):
    volume = ramp(dtype=np.int16)
    root = zarr.open_group(tmp_path / "v04.ome.zarr", mode="w", zarr_format=2)
    write_image(
        volume[np.newaxis],  # a channel axis of size 1, as many tools write
        root,
        axes="czyx",
        fmt=FormatV04(),
        scale_factors=(2,),
        scale={"c": 1.0, "z": 20.0, "y": 5.0, "x": 2.5},
        axes_units={axis: "micrometer" for axis in "zyx"},
    )
    with open_volume(tmp_path / "v04.ome.zarr") as opened:
        assert (opened.shape, opened.dtype) == ((9, 11, 13), np.dtype(np.int16))
        assert opened.spacing_zyx_mm == pytest.approx((0.02, 0.005, 0.0025))
        np.testing.assert_array_equal(opened.read(2, 6), volume[2:6])


def test_ome_zarr_v05_from_another_writer(tmp_path):
    volume = ramp(dtype=np.float32)
    root = zarr.open_group(tmp_path / "v05.ome.zarr", mode="w", zarr_format=3)
    write_image(
        volume,
        root,
        axes="zyx",
        fmt=FormatV05(),
        scale_factors=(),
        scale={"z": 0.5, "y": 0.25, "x": 0.125},
        axes_units={a: "millimeter" for a in "zyx"},
    )
    np.testing.assert_array_equal(read_image(tmp_path / "v05.ome.zarr"), volume)
    assert open_volume(tmp_path / "v05.ome.zarr").spacing_zyx_mm == pytest.approx(SPACING)


def test_ome_zarr_written_here_reads_back(tmp_path):
    volume = ramp()
    write_tiff(tmp_path / "scan.tif", volume, SPACING)
    with open_volume(tmp_path / "scan.tif") as source:
        convert_to_ome_zarr(source, tmp_path / "scan.ome.zarr", chunks=(4, 8, 8))
    with open_volume(tmp_path / "scan.ome.zarr") as opened:
        assert (opened.shape, opened.chunk_depth) == ((9, 11, 13), 4)
        assert opened.spacing_zyx_mm == pytest.approx(SPACING)
        np.testing.assert_array_equal(opened.read(0, 9), volume)


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nifti_is_transposed_to_zyx_with_spacing(tmp_path, name, dtype):
    volume = ramp(dtype=dtype)
    image = nibabel.Nifti1Image(volume.transpose(2, 1, 0), affine=np.diag([*SPACING[::-1], 1.0]))
    image.header.set_zooms(SPACING[::-1])
    image.header.set_xyzt_units("mm")
    nibabel.save(image, tmp_path / name)
    with open_volume(tmp_path / name) as opened:
        assert isinstance(opened, NiftiVolume)
        assert (opened.shape, opened.dtype) == ((9, 11, 13), np.dtype(dtype))
        assert opened.spacing_zyx_mm == pytest.approx(SPACING)
        np.testing.assert_array_equal(opened.read(0, 4), volume[0:4])
        np.testing.assert_array_equal(opened.read(4, 9), volume[4:9])


def test_nifti_units_micrometre_and_unknown(tmp_path):
    image = nibabel.Nifti1Image(ramp().transpose(2, 1, 0), affine=np.eye(4))
    image.header.set_zooms((2.0, 4.0, 8.0))
    image.header.set_xyzt_units("micron")
    nibabel.save(image, tmp_path / "um.nii")
    assert open_volume(tmp_path / "um.nii").spacing_zyx_mm == pytest.approx((0.008, 0.004, 0.002))
    image.header.set_xyzt_units("unknown")
    nibabel.save(image, tmp_path / "unknown.nii")
    assert open_volume(tmp_path / "unknown.nii").spacing_zyx_mm is None


def test_scaled_nifti_reads_as_float(tmp_path):
    image = nibabel.Nifti1Image(ramp(dtype=np.int16).transpose(2, 1, 0), affine=np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nibabel.save(image, tmp_path / "scaled.nii")
    with open_volume(tmp_path / "scaled.nii") as opened:
        slab = opened.read(0, 2)
    assert slab.dtype == opened.dtype and opened.dtype.kind == "f"
    np.testing.assert_array_equal(slab, ramp(dtype=np.int16)[:2] * 0.5 + 10.0)


# --- scan directories ------------------------------------------------------------


def test_scan_directory_with_3d_tiff(tmp_path):
    scan_dir = tmp_path / "S-001"
    document = write_scan_json(scan_dir, particle_size_mm=0.3)
    write_tiff(scan_dir / "scan.tif", ramp(), (1.0, 1.0, 1.0))  # disagrees: scan.json wins
    (scan_dir / "_SCAN_COMPLETE").touch()
    (scan_dir / "acquisition.log").write_text("not an image")
    (scan_dir / ".DS_Store").write_bytes(b"\0")
    (scan_dir / ".other.tif.partial-1a2b3c4d").write_bytes(b"half a copy")
    with open_scan(scan_dir) as scan:
        assert scan.path == scan_dir
        assert scan.volume.path == scan_dir / "scan.tif"
        assert scan.metadata.model_dump(mode="json", exclude_none=True) == document
        assert scan.spacing_zyx_mm == SPACING
        assert scan.volume.spacing_zyx_mm == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("layout", "image"),
    [
        ("slices_here", "."),
        ("slices_in_folder", "tiffs"),
        ("zarr", "scan.ome.zarr"),
        ("nifti", "scan.nii.gz"),
    ],
)
def test_scan_directory_image_layouts(tmp_path, layout, image):
    scan_dir = tmp_path / "S-002"
    write_scan_json(scan_dir)
    volume = ramp((5, 6, 7))
    if layout == "slices_here":
        write_slices(scan_dir, volume, "img{}.tiff")
    elif layout == "slices_in_folder":
        write_slices(scan_dir / "tiffs", volume)
    elif layout == "zarr":
        zarr.create_array(scan_dir / "scan.ome.zarr", data=volume)
    else:
        nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), scan_dir / "scan.nii.gz")
    assert find_scan_image(scan_dir) == (scan_dir / image if image != "." else scan_dir)
    with open_scan(scan_dir) as scan:
        np.testing.assert_array_equal(scan.volume.read(0, 5), volume)


def test_missing_scan_json(tmp_path):
    write_tiff(tmp_path / "S" / "scan.tif", ramp())
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S" / "scan.json", "missing")


def test_invalid_scan_json(tmp_path):
    write_scan_json(tmp_path / "S", spacing=0.1)
    write_tiff(tmp_path / "S" / "scan.tif", ramp())
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S" / "scan.json", "unknown field 'spacing'")


def test_scan_json_that_is_not_json(tmp_path):
    write_tiff(tmp_path / "S" / "scan.tif", ramp())
    (tmp_path / "S" / "scan.json").write_text("{sample_id: S}")
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S" / "scan.json", "not valid JSON")


def test_empty_directory(tmp_path):
    (tmp_path / "S").mkdir()
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S", "holds no image (it is empty)")


def test_missing_directory(tmp_path):
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "nowhere")
    assert_scan_error(error, tmp_path / "nowhere", "does not exist")


def test_directory_without_image_lists_what_it_found(tmp_path):
    write_scan_json(tmp_path / "S")
    (tmp_path / "S" / "notes.txt").write_text("")
    (tmp_path / "S" / "empty_folder").mkdir()
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S", "holds no image (found only empty_folder/, notes.txt)")


def test_two_images(tmp_path):
    write_scan_json(tmp_path / "S")
    write_tiff(tmp_path / "S" / "a.tif", ramp())
    zarr.create_array(tmp_path / "S" / "b.zarr", data=ramp())
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S", "holds 2 images (a.tif, b.zarr)", "exactly one")


def test_two_3d_tiffs_are_two_images_not_slices(tmp_path):
    write_tiff(tmp_path / "S" / "scan_2.tif", ramp())
    write_tiff(tmp_path / "S" / "scan_10.tif", ramp())
    with pytest.raises(ScanError) as error:
        find_scan_image(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S", "holds 2 images (scan_2.tif, scan_10.tif)")


def test_loose_slices_next_to_a_zarr_are_two_images(tmp_path):
    write_slices(tmp_path / "S", ramp((3, 4, 5)))
    zarr.create_array(tmp_path / "S" / "scan.zarr", data=ramp())
    with pytest.raises(ScanError) as error:
        find_scan_image(tmp_path / "S")
    assert_scan_error(error, tmp_path / "S", "holds 2 images (the TIFF slices, scan.zarr)")


# --- bad images -----------------------------------------------------------------


def test_single_page_tiff_is_2d(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", ramp()[0], photometric="minisblack")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "flat.tif")
    assert_scan_error(error, tmp_path / "flat.tif", "is a 2D image (11x13 voxels)", "a scan must be a 3D volume")


def test_folder_with_one_slice_is_2d(tmp_path):
    write_slices(tmp_path / "slices", ramp()[:1])
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "slices")
    assert_scan_error(error, tmp_path / "slices", "is a 2D image", "a scan must be a 3D volume")


def test_slices_of_different_shapes(tmp_path):
    paths = write_slices(tmp_path / "slices", ramp((4, 6, 7)))
    tifffile.imwrite(paths[2], np.zeros((6, 8), np.uint16), photometric="minisblack")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "slices")
    assert_scan_error(
        error, paths[2], "is 6x8 uint16, but the first slice slice_1.tif is 6x7 uint16", "share shape and dtype"
    )


def test_slices_of_different_dtypes(tmp_path):
    paths = write_slices(tmp_path / "slices", ramp((4, 6, 7)))
    tifffile.imwrite(paths[3], np.zeros((6, 7), np.uint8), photometric="minisblack")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "slices")
    assert_scan_error(error, paths[3], "is 6x7 uint8, but the first slice slice_1.tif is 6x7 uint16")


def test_3d_tiff_among_slices(tmp_path):
    paths = write_slices(tmp_path / "slices", ramp((3, 6, 7)))
    write_tiff(paths[1], ramp((2, 6, 7)))
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "slices")
    assert_scan_error(error, paths[1], "is not a 2D slice (shape (2, 6, 7))")


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_tiff(tmp_path, compression, keep):
    write = {"compression": compression, "photometric": "minisblack"}
    tifffile.imwrite(
        tmp_path / "whole.tif", np.random.default_rng(1).integers(0, 9999, (9, 32, 32), np.uint16), **write
    )
    data = (tmp_path / "whole.tif").read_bytes()
    cut = len(data) - 100 if keep == -1 else int(len(data) * keep)  # -1: only the end of the last slice is missing
    (tmp_path / "cut.tif").write_bytes(data[:cut])
    with pytest.raises(ScanError) as error:
        read_image(tmp_path / "cut.tif")
    assert_scan_error(error, tmp_path / "cut.tif", "truncated or corrupt TIFF")


def test_tiff_of_garbage_bytes(tmp_path):
    (tmp_path / "garbage.tif").write_bytes(np.random.default_rng(2).bytes(4096))
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "garbage.tif")
    assert_scan_error(error, tmp_path / "garbage.tif", "truncated or corrupt TIFF: not a TIFF file")


def test_tiff_with_corrupt_compressed_slice_fails_when_read(tmp_path):
    tifffile.imwrite(tmp_path / "scan.tif", ramp(), compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "scan.tif") as tif:
        offset = tif.pages[6].dataoffsets[0]
    data = bytearray((tmp_path / "scan.tif").read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    (tmp_path / "scan.tif").write_bytes(bytes(data))
    with open_volume(tmp_path / "scan.tif") as opened:
        np.testing.assert_array_equal(opened.read(0, 6), ramp()[:6])
        with pytest.raises(ScanError) as error:
            opened.read(6, 9)
    assert_scan_error(error, tmp_path / "scan.tif", "truncated or corrupt TIFF")


def test_corrupt_slice_names_the_slice(tmp_path):
    paths = write_slices(tmp_path / "slices", ramp((4, 6, 7)))
    paths[2].write_bytes(paths[2].read_bytes()[:20])
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "slices")
    assert_scan_error(error, paths[2], "truncated or corrupt TIFF")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_is_found_while_streaming(tmp_path, bad):
    volume = ramp(dtype=np.float32)
    volume[7, 3, 4] = bad
    write_tiff(tmp_path / "scan.tif", volume)
    with open_volume(tmp_path / "scan.tif") as opened:
        np.testing.assert_array_equal(opened.read(0, 7), volume[:7])  # no pre-scan: the start streams
        with pytest.raises(ScanError) as error:
            opened.read(4, 9)
    assert_scan_error(error, tmp_path / "scan.tif", "slice z=7 holds NaN or infinite values")


@pytest.mark.parametrize(("dtype", "kind"), [(bool, "boolean"), (np.complex64, "complex")])
def test_non_grey_dtypes(tmp_path, dtype, kind):
    zarr.create_array(tmp_path / "bad.zarr", shape=(4, 5, 6), dtype=dtype)
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "bad.zarr")
    assert_scan_error(error, tmp_path / "bad.zarr", f"has {kind} voxels", "integer or float")


def test_bool_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "mask.tif", np.ones((4, 5, 6), bool), photometric="minisblack")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "mask.tif")
    assert_scan_error(error, tmp_path / "mask.tif", "has boolean voxels")


def test_rgb_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 5, 6, 3), np.uint8), photometric="rgb")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "rgb.tif")
    assert_scan_error(error, tmp_path / "rgb.tif", "is an RGB or multi-sample image")


def test_4d_zarr(tmp_path):
    zarr.create_array(tmp_path / "4d.zarr", shape=(2, 4, 5, 6), dtype=np.uint8)
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "4d.zarr")
    assert_scan_error(error, tmp_path / "4d.zarr", "has 4 axes (shape (2, 4, 5, 6))")


def test_multichannel_ome_zarr(tmp_path):
    root = zarr.open_group(tmp_path / "cz.ome.zarr", mode="w", zarr_format=2)
    write_image(np.zeros((2, 4, 5, 6), np.uint8), root, axes="czyx", fmt=FormatV04(), scale_factors=())
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "cz.ome.zarr")
    assert_scan_error(error, tmp_path / "cz.ome.zarr", "has 2 entries along axis 'c'")


def test_zarr_group_without_multiscales(tmp_path):
    zarr.create_group(tmp_path / "group.zarr")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "group.zarr")
    assert_scan_error(error, tmp_path / "group.zarr", "without OME-Zarr 'multiscales' metadata")


def test_malformed_multiscales(tmp_path):
    zarr.create_group(tmp_path / "bad.ome.zarr", attributes={"ome": {"version": "0.5", "multiscales": [{"axes": []}]}})
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "bad.ome.zarr")
    assert_scan_error(error, tmp_path / "bad.ome.zarr", "has malformed OME-Zarr multiscales metadata")


def test_damaged_zarr_metadata(tmp_path):
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "bad.zarr")
    assert_scan_error(error, tmp_path / "bad.zarr", "is not a readable zarr array or OME-Zarr image")


def test_damaged_zarr_chunk_fails_when_read(tmp_path):
    array = zarr.create_array(tmp_path / "scan.zarr", shape=(8, 5, 6), chunks=(4, 5, 6), dtype=np.uint16)
    array[:] = ramp((8, 5, 6))
    (tmp_path / "scan.zarr" / "c" / "1" / "0" / "0").write_bytes(b"not zstd")
    with open_volume(tmp_path / "scan.zarr") as opened:
        np.testing.assert_array_equal(opened.read(0, 4), ramp((8, 5, 6))[:4])
        with pytest.raises(ScanError) as error:
            opened.read(4, 8)
    assert_scan_error(error, tmp_path / "scan.zarr", "cannot read slices 4..7")


def test_truncated_nifti(tmp_path):
    nibabel.save(nibabel.Nifti1Image(ramp().transpose(2, 1, 0), np.eye(4)), tmp_path / "scan.nii.gz")
    data = (tmp_path / "scan.nii.gz").read_bytes()
    (tmp_path / "scan.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError) as error:
        read_image(tmp_path / "scan.nii.gz")
    assert_scan_error(error, tmp_path / "scan.nii.gz")


def test_4d_nifti(tmp_path):
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 5, 4, 3), np.int16), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "4d.nii")
    assert_scan_error(error, tmp_path / "4d.nii", "holds 3 volumes")


def test_unsupported_file(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(ScanError) as error:
        open_volume(tmp_path / "scan.png")
    assert_scan_error(error, tmp_path / "scan.png", "is not a supported image")


# --- the original ParticleSeg3D dataset layout ------------------------------------


def make_legacy_dataset(dataset: Path, entries: dict[str, dict], images: list[str]) -> None:
    (dataset / "images").mkdir(parents=True)
    (dataset / "metadata.json").write_text(json.dumps(entries))
    for name in images:
        zarr.create_array(dataset / "images" / f"{name}.zarr", data=ramp(), zarr_format=2)


def test_legacy_dataset_scalar_and_list_spacing(tmp_path):
    entries = {
        "sample_10": {"spacing": 0.01, "particle_size": 0.2},
        "sample_2": {"spacing": [0.03, 0.02, 0.01], "particle_size": [0.1, 0.1, 0.1]},
    }
    make_legacy_dataset(tmp_path / "DATASET", entries, ["sample_10", "sample_2"])
    scans = open_legacy_dataset(tmp_path / "DATASET")
    assert [scan.metadata.sample_id for scan in scans] == ["sample_2", "sample_10"]
    assert [scan.spacing_zyx_mm for scan in scans] == [(0.03, 0.02, 0.01), (0.01, 0.01, 0.01)]
    assert [scan.metadata.particle_size_mm for scan in scans] == [0.1, 0.2]
    assert {scan.metadata.stream.value for scan in scans} == {"other"}
    assert scans[0].path == tmp_path / "DATASET" / "images" / "sample_2.zarr"
    np.testing.assert_array_equal(scans[0].volume.read(0, 9), ramp())


def test_open_scan_takes_a_legacy_image_or_a_one_image_dataset(tmp_path):
    make_legacy_dataset(tmp_path / "D1", {"a": {"spacing": 0.5}, "b": {"spacing": 0.25}}, ["a", "b"])
    with open_scan(tmp_path / "D1" / "images" / "b.zarr") as scan:
        assert (scan.metadata.sample_id, scan.spacing_zyx_mm) == ("b", (0.25, 0.25, 0.25))
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "D1")
    assert_scan_error(error, tmp_path / "D1", "ParticleSeg3D dataset with 2 images (a.zarr, b.zarr)")
    make_legacy_dataset(tmp_path / "D2", {"only": {"spacing": 0.5}}, ["only"])
    with open_scan(tmp_path / "D2") as scan:
        assert scan.metadata.sample_id == "only"


def test_legacy_image_without_metadata_entry(tmp_path):
    make_legacy_dataset(tmp_path / "D", {"a": {"spacing": 0.5}}, ["a", "b"])
    with pytest.raises(ScanError) as error:
        open_legacy_dataset(tmp_path / "D")
    assert_scan_error(error, tmp_path / "D" / "metadata.json", "has no entry for image 'b'")


def test_legacy_invalid_entry_and_invalid_name(tmp_path):
    make_legacy_dataset(tmp_path / "D", {"a": {"spacing": -1}}, ["a"])
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "D")
    assert_scan_error(error, tmp_path / "D" / "metadata.json", "entry 'a'", "spacing")
    make_legacy_dataset(tmp_path / "E", {"bad name": {"spacing": 0.5}}, ["bad name"])
    with pytest.raises(ScanError) as error:
        open_scan(tmp_path / "E")
    assert_scan_error(error, tmp_path / "E" / "images" / "bad name.zarr", "is not a valid sample id")
