"""Streamed conversion to OME-Zarr and export to TIFF: values, metadata, memory bounds, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from ps3d_core.errors import ScanError
from ps3d_core.io import (
    Volume,
    convert_to_ome_zarr,
    export_tiff,
    open_ome_zarr,
    open_scan,
    open_volume,
    read_image,
    write_tiff,
)
from ps3d_core.io.convert import halve, pyramid_shapes

SPACING = (0.5, 0.25, 0.125)
SHAPE = (37, 45, 50)  # no axis a multiple of CHUNKS
CHUNKS = (8, 16, 16)


class ArrayVolume(Volume):
    """An in-memory volume that records which slabs were read."""

    def __init__(self, array: np.ndarray, spacing_zyx_mm=SPACING) -> None:
        self.array = array
        self.reads: list[tuple[int, int]] = []
        super().__init__(Path("memory"), array.shape, array.dtype, spacing_zyx_mm)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        self.reads.append((z0, z1))
        return self.array[z0:z1]


def noise(shape=SHAPE, dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def reference_mean(volume: np.ndarray) -> np.ndarray:
    """2x2x2 block mean of a whole volume, partial edge blocks averaging what they hold."""
    z, y, x = volume.shape
    total = np.zeros((-(-z // 2), -(-y // 2), -(-x // 2)))
    count = np.zeros_like(total)
    for dz in range(2):
        for dy in range(2):
            for dx in range(2):
                part = volume[dz::2, dy::2, dx::2]
                total[: part.shape[0], : part.shape[1], : part.shape[2]] += part
                count[: part.shape[0], : part.shape[1], : part.shape[2]] += 1
    mean = total / count
    return (np.rint(mean) if volume.dtype.kind in "iu" else mean).astype(volume.dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_round_trip_values_dtype_spacing_and_chunks(tmp_path, dtype):
    volume = noise(dtype=dtype)
    source = ArrayVolume(volume)
    out = convert_to_ome_zarr(source, tmp_path / "scan.ome.zarr", chunks=CHUNKS)
    assert out == tmp_path / "scan.ome.zarr"
    level0, spacing, attributes = open_ome_zarr(out)
    assert (level0.shape, level0.dtype, level0.chunks) == (SHAPE, np.dtype(dtype), CHUNKS)
    assert level0[:].tobytes() == volume.tobytes()
    assert spacing == pytest.approx(SPACING)
    assert attributes["ome"]["version"] == "0.5"
    assert [axis["unit"] for axis in attributes["ome"]["multiscales"][0]["axes"]] == ["millimeter"] * 3
    assert level0.compressors[0].cname.value == "zstd"
    assert zarr.open_group(out, mode="r").metadata.zarr_format == 3


def test_slabs_are_read_once_front_to_back_one_chunk_deep(tmp_path):
    source = ArrayVolume(noise())
    convert_to_ome_zarr(source, tmp_path / "scan.ome.zarr", chunks=CHUNKS)
    assert source.reads == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]


def test_pyramid_levels_equal_whole_volume_downsampling(tmp_path):
    volume = noise((37, 45, 50), np.uint16)
    out = convert_to_ome_zarr(ArrayVolume(volume), tmp_path / "scan.ome.zarr", chunks=(4, 8, 8))
    group = zarr.open_group(out, mode="r")
    expected = volume
    shapes = pyramid_shapes(SHAPE, (4, 8, 8))
    assert len(shapes) == 3  # (37, 45, 50) -> (19, 23, 25) -> (10, 12, 13); 10 < 2 * 8 stops it
    for level, shape in enumerate(shapes):
        if level:
            expected = reference_mean(expected)
        assert group[str(level)].shape == shape
        np.testing.assert_array_equal(group[str(level)][:], expected)


def test_stride_downsampling_keeps_labels(tmp_path):
    labels = noise((40, 40, 40), np.uint32) % 7
    out = convert_to_ome_zarr(
        ArrayVolume(labels), tmp_path / "labels.ome.zarr", chunks=(8, 8, 8), downsampling="stride"
    )
    group = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(group["1"][:], labels[::2, ::2, ::2])
    np.testing.assert_array_equal(group["2"][:], labels[::4, ::4, ::4])
    assert group.attrs["ome"]["multiscales"][0]["type"] == "stride"


def test_halve_mean_of_wide_integers_is_exact():
    slab = np.full((2, 2, 3), 2**31 - 1, np.int32)
    slab[0, 0, 0] = 2**31 - 3
    np.testing.assert_array_equal(halve(slab, "mean"), np.array([[[2**31 - 1, 2**31 - 1]]], np.int32))


def test_ome_zarr_package_reads_shape_and_scale(tmp_path):
    out = convert_to_ome_zarr(ArrayVolume(noise((40, 64, 72))), tmp_path / "scan.ome.zarr", chunks=(8, 16, 16))
    node = next(iter(Reader(parse_url(out))()))
    assert [tuple(level.shape) for level in node.data] == [(40, 64, 72), (20, 32, 36), (10, 16, 18)]
    transforms = node.metadata["coordinateTransformations"]
    assert [t[0]["scale"] for t in transforms] == [[0.5, 0.25, 0.125], [1.0, 0.5, 0.25], [2.0, 1.0, 0.5]]
    assert transforms[1][1] == {"type": "translation", "translation": [0.25, 0.125, 0.0625]}
    np.testing.assert_array_equal(np.asarray(node.data[0]), noise((40, 64, 72)))


def test_scan_metadata_is_stored_and_scan_json_spacing_wins(tmp_path):
    scan_dir = tmp_path / "S-7"
    scan_dir.mkdir()
    document = {"sample_id": "S-7", "spacing_mm": 0.02, "stream": "tailings", "phases": {"ore": [1000.0, 2000.0]}}
    (scan_dir / "scan.json").write_text(json.dumps(document))
    write_tiff(scan_dir / "scan.tif", noise((9, 20, 20)), (1.0, 1.0, 1.0))
    with open_scan(scan_dir) as scan:
        out = convert_to_ome_zarr(scan, tmp_path / "S-7.ome.zarr", chunks=(4, 8, 8), attributes={"source": "test"})
    _, spacing, attributes = open_ome_zarr(out)
    assert spacing == pytest.approx((0.02, 0.02, 0.02))
    assert attributes["ps3d"] == document
    assert attributes["source"] == "test"
    assert attributes["ome"]["multiscales"][0]["name"] == "S-7"


def test_volume_without_spacing_needs_one(tmp_path):
    with pytest.raises(ScanError) as error:
        convert_to_ome_zarr(ArrayVolume(noise(), spacing_zyx_mm=None), tmp_path / "x.ome.zarr")
    assert error.value.path == "memory"
    assert "holds no voxel size" in error.value.problem
    out = convert_to_ome_zarr(
        ArrayVolume(noise(), spacing_zyx_mm=None), tmp_path / "x.ome.zarr", spacing_zyx_mm=(1.0, 2.0, 3.0)
    )
    assert open_ome_zarr(out)[1] == (1.0, 2.0, 3.0)


def test_progress_is_reported_after_each_slab(tmp_path):
    calls = []
    convert_to_ome_zarr(
        ArrayVolume(noise()),
        tmp_path / "scan.ome.zarr",
        chunks=CHUNKS,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(8, 37), (16, 37), (24, 37), (32, 37), (37, 37)]


def test_conversion_from_tiff_file(tmp_path):
    volume = noise(dtype=np.int16)
    write_tiff(tmp_path / "scan.tif", volume, SPACING)
    with open_volume(tmp_path / "scan.tif") as source:
        out = convert_to_ome_zarr(source, tmp_path / "scan.ome.zarr", chunks=CHUNKS)
    assert read_image(out).tobytes() == volume.tobytes()
    assert open_ome_zarr(out)[1] == pytest.approx(SPACING)


# --- export ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
def test_export_tiff_round_trip(tmp_path, dtype):
    volume = noise(dtype=dtype)
    zarr_path = convert_to_ome_zarr(ArrayVolume(volume), tmp_path / "scan.ome.zarr", chunks=CHUNKS)
    calls = []
    out = export_tiff(zarr_path, tmp_path / "export.tif", progress=lambda done, total: calls.append(done))
    assert calls == [8, 16, 24, 32, 37]
    assert tifffile.imread(out).tobytes() == volume.tobytes()
    with open_volume(out) as exported:
        assert (exported.shape, exported.dtype) == (SHAPE, np.dtype(dtype))
        assert exported.spacing_zyx_mm == pytest.approx(SPACING)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == SHAPE[0]
        assert tif.pages[0].resolution == pytest.approx((1 / SPACING[2], 1 / SPACING[1]))


# --- refusals and atomicity ------------------------------------------------------


def test_huge_declared_shape_is_refused_for_disk_space(tmp_path):
    # 10**12 voxels: within what a reader accepts (volumes.MAX_SCAN_VOXELS), beyond any test machine's disk
    zarr.create_array(tmp_path / "huge.zarr", shape=(10_000, 10_000, 10_000), chunks=(100, 100, 100), dtype=np.uint64)
    with open_volume(tmp_path / "huge.zarr") as huge, pytest.raises(ScanError) as error:
        convert_to_ome_zarr(huge, tmp_path / "huge.ome.zarr", spacing_zyx_mm=(0.01, 0.01, 0.01))
    assert error.value.path == str(tmp_path / "huge.zarr")
    # 8 * 10**12 bytes of level 0, plus 1/8, 1/64 and 1/512 of it for the pyramid
    assert error.value.problem.startswith(
        f"writing it to {tmp_path / 'huge.ome.zarr'} needs 9,140.6 GB uncompressed, but only "
    )
    assert f"GB are free at {tmp_path}" in error.value.problem
    assert list(tmp_path.iterdir()) == [tmp_path / "huge.zarr"]


def test_disk_check_compares_with_free_space_and_can_be_skipped(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)._replace(free=10_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    volume = noise((20, 30, 40), np.uint8)  # 24,000 bytes
    with pytest.raises(ScanError) as error:
        convert_to_ome_zarr(ArrayVolume(volume), tmp_path / "a.ome.zarr")
    assert "needs 0.0 GB uncompressed, but only 0.0 GB are free" in error.value.problem
    out = convert_to_ome_zarr(ArrayVolume(volume), tmp_path / "a.ome.zarr", check_disk_space=False)
    np.testing.assert_array_equal(read_image(out), volume)
    with pytest.raises(ScanError):
        export_tiff(out, tmp_path / "a.tif")
    assert not (tmp_path / "a.tif").exists()


def test_failure_mid_stream_leaves_no_partial_output_and_keeps_the_previous(tmp_path):
    good = noise(dtype=np.float32)
    out = convert_to_ome_zarr(ArrayVolume(good), tmp_path / "scan.ome.zarr", chunks=CHUNKS)
    bad = good.copy()
    bad[20, 5, 5] = np.nan  # third of five slabs
    source = ArrayVolume(bad)
    with pytest.raises(ScanError) as error:
        convert_to_ome_zarr(source, out, chunks=CHUNKS)
    assert "slice z=20 holds NaN" in error.value.problem
    assert source.reads == [(0, 8), (8, 16), (16, 24)]  # it failed part-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.ome.zarr"]
    assert read_image(out).tobytes() == good.tobytes()
    with pytest.raises(ScanError):
        convert_to_ome_zarr(ArrayVolume(bad), tmp_path / "new.ome.zarr", chunks=CHUNKS)
    assert not (tmp_path / "new.ome.zarr").exists()


def test_export_failure_mid_stream_leaves_no_tiff(tmp_path):
    bad = noise(dtype=np.float32)
    bad[30] = np.inf
    array = zarr.create_array(tmp_path / "bad.zarr", shape=bad.shape, chunks=CHUNKS, dtype=bad.dtype)
    array[:] = bad
    with pytest.raises(ScanError) as error:
        export_tiff(tmp_path / "bad.zarr", tmp_path / "out.tif", check_disk_space=False)
    assert error.value.path == str(tmp_path / "bad.zarr")
    assert "slice z=30" in error.value.problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zarr"]
