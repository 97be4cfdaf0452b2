"""Malformed input: refused with one line naming the file and the problem, and nothing stored is lost.

Every malformed input of README.md's "Malformed input: what happens" table
is tried here at the step that catches it:

* ``ps3d validate`` (the ingest flow's validate step, the same ``open_scan``):
  one table-driven test writes each malformed scan directory and expects
  exit status 2 and one line ``error: <file>: <problem>``, never a traceback;
* the segmentation (``run_segmentation`` with the tiny test model): inputs
  whose problem shows only in the voxels (a constant image, NaN in a slice
  the validation does not read, no particles);
* the ingest flow: a malformed scan claiming a stored sample's id is
  quarantined with its reason and the stored particles stay as they were.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
import torch
import zarr
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core import catalog
from ps3d_core.errors import ScanError
from ps3d_core.inbox import ERROR_JSON, InboxError, fingerprint, read_quarantine
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import write_tiff
from ps3d_core.synth.particle_tables import random_particle_table
from schemas.scan import ScanMetadata

runner = CliRunner()
SPACING_MM = 0.01


def ramp(shape: tuple[int, int, int] = (8, 9, 10), dtype=np.uint16) -> np.ndarray:
    """A small volume whose voxels differ."""
    return (np.arange(np.prod(shape)).reshape(shape) % 251).astype(dtype)


def write_scan_json(scan_dir: Path, **fields) -> None:
    """A valid scan.json with ``fields`` changed (``...`` removes one)."""
    document = {"sample_id": "S-1", "spacing_mm": SPACING_MM, "stream": "feed", **fields}
    scan_dir.mkdir(parents=True, exist_ok=True)
    (scan_dir / "scan.json").write_text(json.dumps({k: v for k, v in document.items() if v is not ...}))


def write_raw_json(scan_dir: Path, data: bytes) -> None:
    scan_dir.mkdir(parents=True, exist_ok=True)
    (scan_dir / "scan.json").write_bytes(data)


def write_slices(folder: Path, volume: np.ndarray, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, plane in zip(names, volume, strict=True):
        tifffile.imwrite(folder / name, plane, photometric="minisblack")


def forged_tiff(path: Path, compression: str | None) -> None:
    """A 3-page 8x8 TIFF whose headers claim 60000x60000 slices (its strips still hold 8x8)."""
    tifffile.imwrite(path, ramp((3, 8, 8)), photometric="minisblack", metadata=None, compression=compression)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        # ImageWidth, ImageLength, RowsPerStrip of every page; small values, so 2 bytes little-endian suffice
        offsets = [tag.valueoffset for page in tif.pages for tag in page.tags.values() if tag.code in (256, 257, 278)]
    for offset in offsets:
        struct.pack_into("<H", data, offset, 60000)
    path.write_bytes(bytes(data))


def huge_nifti(path: Path) -> None:
    """A .nii header declaring 30000^3 uint16 voxels, followed by a few bytes."""
    header = nibabel.Nifti1Header()
    header.set_data_dtype(np.uint16)
    header.set_data_shape((30000, 30000, 30000))
    path.write_bytes(header.binaryblock + b"\0" * 132)


def image_case(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """A scan directory with a valid scan.json and the image ``write`` makes."""

    def build(scan_dir: Path) -> None:
        write_scan_json(scan_dir)
        write(scan_dir)

    return build


def json_case(**fields) -> Callable[[Path], None]:
    """A scan directory with a good image and scan.json fields changed."""

    def build(scan_dir: Path) -> None:
        write_scan_json(scan_dir, **fields)
        write_tiff(scan_dir / "scan.tif", ramp())

    return build


def raw_json_case(data: bytes) -> Callable[[Path], None]:
    def build(scan_dir: Path) -> None:
        write_raw_json(scan_dir, data)
        write_tiff(scan_dir / "scan.tif", ramp())

    return build


def _truncated(scan_dir: Path) -> None:
    tifffile.imwrite(scan_dir / "whole.tif", ramp((9, 32, 32)), photometric="minisblack")
    data = (scan_dir / "whole.tif").read_bytes()
    (scan_dir / "whole.tif").unlink()
    (scan_dir / "scan.tif").write_bytes(data[: len(data) // 2])


def _corrupt(scan_dir: Path) -> None:
    (scan_dir / "scan.tif").write_bytes(np.random.default_rng(1).bytes(4096))


def _header_only(scan_dir: Path) -> None:
    with tifffile.TiffWriter(scan_dir / "scan.tif"):
        pass


def _mixed_shapes(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((4, 9, 10)), [f"s_{z}.tif" for z in range(1, 5)])
    tifffile.imwrite(scan_dir / "slices" / "s_3.tif", ramp((1, 9, 11))[0], photometric="minisblack")


def _mixed_dtypes(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((4, 9, 10)), [f"s_{z}.tif" for z in range(1, 5)])
    tifffile.imwrite(scan_dir / "slices" / "s_4.tif", ramp((1, 9, 10), np.float32)[0], photometric="minisblack")


def _missing_slice(scan_dir: Path) -> None:
    names = ["rec_0001.tif", "rec_0002.tif", "rec_0004.tif", "rec_0005.tif"]
    write_slices(scan_dir / "slices", ramp((4, 9, 10)), names)


def _repeated_slice(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((4, 9, 10)), ["rec_1.tif", "rec_2.tif", "rec_02.tif", "rec_3.tif"])


def _extra_slice(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((4, 9, 10)), ["rec_0001.tif", "rec_0002.tif", "rec_0003.tif", "preview.tif"])


def _text_among_slices(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((3, 9, 10)), ["s_1.tif", "s_2.tif", "s_3.tif"])
    (scan_dir / "slices" / "s_4.tif").write_text("exported by mistake")


def _empty_slice(scan_dir: Path) -> None:
    write_slices(scan_dir / "slices", ramp((3, 9, 10)), ["s_1.tif", "s_2.tif", "s_3.tif"])
    (scan_dir / "slices" / "s_4.tif").touch()


def _tiff(array: np.ndarray, **options) -> Callable[[Path], None]:
    return lambda scan_dir: tifffile.imwrite(scan_dir / "scan.tif", array, **({"photometric": "minisblack"} | options))


def _huge_zarr(scan_dir: Path) -> None:
    zarr.create_array(scan_dir / "scan.zarr", shape=(10**6, 10**6, 10**6), chunks=(64, 64, 64), dtype=np.uint16)


def _two_images(scan_dir: Path) -> None:
    write_tiff(scan_dir / "a.tif", ramp())
    zarr.create_array(scan_dir / "b.zarr", data=ramp())


def _too_big_json(scan_dir: Path) -> None:
    write_raw_json(scan_dir, b'{"notes": "' + b"x" * 2_000_000 + b'"}')
    write_tiff(scan_dir / "scan.tif", ramp())


SID_RULE = "must be 1 to 128 ASCII letters, digits, '.', '_' or '-'"
SPACING_RANGE = "must be a voxel size between 1e-06 and 10 mm"

#: (id, builder, the file the error names (relative to the scan directory), words of the problem)
CASES = [
    # --- the image --------------------------------------------------------------------------------
    ("tiff-truncated", image_case(_truncated), "scan.tif", ["truncated or corrupt TIFF"]),
    ("tiff-corrupt", image_case(_corrupt), "scan.tif", ["truncated or corrupt TIFF: not a TIFF file"]),
    ("tiff-empty-file", image_case(lambda d: (d / "scan.tif").touch()), "scan.tif", ["not a TIFF file"]),
    ("tiff-header-only", image_case(_header_only), "scan.tif", ["holds no image data"]),
    ("tiff-huge-declared", image_case(lambda d: forged_tiff(d / "scan.tif", None)), "scan.tif",
     ["declares 60000x60000 uint16 (7,200,000,000 bytes) but stores 128 bytes"]),
    ("tiff-huge-declared-compressed", image_case(lambda d: forged_tiff(d / "scan.tif", "zlib")), "scan.tif",
     ["declares 3x60000x60000 voxels, more than any micro-CT scan"]),
    ("zarr-huge-declared", image_case(_huge_zarr), "scan.zarr", ["declares 1000000x1000000x1000000 voxels"]),
    ("nifti-huge-declared", image_case(lambda d: huge_nifti(d / "scan.nii")), "scan.nii",
     ["truncated or corrupt NIfTI: its header declares 30000x30000x30000 uint16"]),
    ("slices-mixed-shapes", image_case(_mixed_shapes), "slices/s_3.tif",
     ["is 9x11 uint16, but the first slice s_1.tif is 9x10 uint16"]),
    ("slices-mixed-dtypes", image_case(_mixed_dtypes), "slices/s_4.tif", ["is 9x10 float32", "share shape and dtype"]),
    ("slices-missing-one", image_case(_missing_slice), "slices",
     ["misses slices: rec_0002.tif is followed by rec_0004.tif"]),
    ("slices-repeated-number", image_case(_repeated_slice), "slices/rec_02.tif", ["repeats slice number 2"]),
    ("slices-extra-file", image_case(_extra_slice), "slices/preview.tif", ["is not named like the other slices"]),
    ("slices-text-file", image_case(_text_among_slices), "slices/s_4.tif", ["not a TIFF file"]),
    ("slices-empty-file", image_case(_empty_slice), "slices/s_4.tif", ["not a TIFF file"]),
    ("image-2d", image_case(_tiff(ramp()[0])), "scan.tif", ["is a 2D image (9x10 voxels)"]),
    ("image-one-voxel", image_case(_tiff(np.ones((1, 1, 1), np.uint16))), "scan.tif", ["holds a single voxel"]),
    ("image-one-voxel-thick", image_case(_tiff(ramp((5, 1, 7)))), "scan.tif", ["one voxel thick along y"]),
    ("dtype-complex", image_case(_tiff(ramp(dtype=np.complex64))), "scan.tif", ["has complex voxels (complex64)"]),
    ("dtype-bool", image_case(_tiff(np.ones((4, 5, 6), bool))), "scan.tif", ["has boolean voxels"]),
    ("image-rgb", image_case(_tiff(np.zeros((4, 5, 6, 3), np.uint8), photometric="rgb")), "scan.tif",
     ["is an RGB or multi-sample image"]),
    ("raw-file", image_case(lambda d: (d / "scan.raw").write_bytes(ramp().tobytes())), ".",
     ["holds no image (found only scan.raw)"]),
    ("two-images", image_case(_two_images), ".", ["holds 2 images (a.tif, b.zarr)"]),
    # --- scan.json --------------------------------------------------------------------------------
    ("json-missing", lambda d: (d.mkdir(), write_tiff(d / "scan.tif", ramp())), "scan.json", ["missing"]),
    ("json-zero-bytes", raw_json_case(b""), "scan.json", ["is not valid JSON: Expecting value at line 1"]),
    ("json-not-json", raw_json_case(b"sample_id: S-1\n"), "scan.json", ["is not valid JSON", "line 1 column 1"]),
    ("json-not-utf8", raw_json_case(b'{"notes": "\xe9"}'), "scan.json", ["is not UTF-8 text"]),
    ("json-not-an-object", raw_json_case(b'["S-1", 0.01]'), "scan.json", ["must hold a JSON object, got list"]),
    ("json-unknown-field", json_case(spacing=0.01), "scan.json", ["unknown field 'spacing' (value 0.01)"]),
    ("json-duplicate-field",
     raw_json_case(b'{"sample_id": "a", "sample_id": "b", "spacing_mm": 0.01, "stream": "feed"}'),
     "scan.json", ["names the field 'sample_id' twice"]),
    ("json-too-big", _too_big_json, "scan.json", ["is 2,000,013 bytes"]),
    ("json-nested-too-deep", raw_json_case(b'{"notes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "scan.json", ["nested too deeply"]),
    ("json-huge-integer", raw_json_case(b'{"mass_g": 1' + b"0" * 5000 + b"}"), "scan.json",
     ["a number has more than 4,300 digits"]),
    ("sample-id-missing", json_case(sample_id=...), "scan.json", ["missing field 'sample_id'"]),
    ("sample-id-slash", json_case(sample_id="ore/1"), "scan.json", [SID_RULE, "'ore/1'"]),
    ("sample-id-backslash", json_case(sample_id="ore\\1"), "scan.json", [SID_RULE, "'ore\\\\1'"]),
    ("sample-id-parent", json_case(sample_id="../up"), "scan.json", [SID_RULE, "'../up'"]),
    ("sample-id-dots", json_case(sample_id=".."), "scan.json", ["must not consist of dots only"]),
    ("sample-id-empty", json_case(sample_id=""), "scan.json", [SID_RULE, "(value '')"]),
    ("sample-id-too-long", json_case(sample_id="a" * 129), "scan.json", [SID_RULE]),
    ("sample-id-non-ascii", json_case(sample_id="Erz-Köln"), "scan.json", [SID_RULE, "'Erz-Köln'"]),
    ("sample-id-number", json_case(sample_id=17), "scan.json", ["field 'sample_id': Input should be a valid string"]),
    ("spacing-zero", json_case(spacing_mm=0), "scan.json", ["must be a positive finite number of mm, got 0"]),
    ("spacing-negative", json_case(spacing_mm=[0.01, -0.01, 0.01]), "scan.json", ["got -0.01"]),
    ("spacing-nan", raw_json_case(b'{"sample_id": "S-1", "spacing_mm": NaN, "stream": "feed"}'), "scan.json",
     ["must be a positive finite number of mm, got nan"]),
    ("spacing-string", json_case(spacing_mm="0.01"), "scan.json", ["must be a number in mm, got '0.01'"]),
    ("spacing-bool", json_case(spacing_mm=True), "scan.json", ["must be a number in mm, got True"]),
    ("spacing-two-values", json_case(spacing_mm=[0.01, 0.01]), "scan.json", ["got 2 values"]),
    ("spacing-huge", json_case(spacing_mm=1e300), "scan.json", [SPACING_RANGE, "got 1e+300"]),
    ("spacing-in-micrometres", json_case(spacing_mm=12), "scan.json", [SPACING_RANGE, "12 µm is 0.012"]),
    ("spacing-tiny", json_case(spacing_mm=1e-300), "scan.json", [SPACING_RANGE]),
    ("mass-string", json_case(mass_g="12,5"), "scan.json", ["field 'mass_g': Input should be a valid number"]),
    ("particle-size-below-a-voxel", json_case(particle_size_mm=0.001), "scan.json",
     ["particle_size_mm 0.001 is smaller than one voxel (0.01 mm)"]),
    ("stream-unknown", json_case(stream="middlings"), "scan.json", ["field 'stream'", "'middlings'"]),
    ("acquired-at-huge", json_case(acquired_at=10**30), "scan.json", ["field 'acquired_at'"]),
]  # fmt: skip


def run_validate(scan_dir: Path) -> str:
    """``ps3d validate`` on a scan expected to be refused: its one error line."""
    result = runner.invoke(app, ["validate", str(scan_dir)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(("build", "file", "words"), [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_validate_refuses_malformed_scan(tmp_path, build, file, words):
    scan_dir = tmp_path / "S-1"
    build(scan_dir)
    line = run_validate(scan_dir)
    named = scan_dir if file == "." else scan_dir / file
    assert line.startswith(f"error: {named}: "), line
    for word in words:
        assert word in line, line


def test_the_installed_command_refuses_with_one_line(tmp_path):
    json_case(sample_id="../../etc")(tmp_path / "S-1")
    ps3d = Path(sys.executable).with_name("ps3d")
    completed = subprocess.run([str(ps3d), "validate", str(tmp_path / "S-1")], capture_output=True, text=True,
                               check=False, timeout=120)  # fmt: skip
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.startswith(f"error: {tmp_path / 'S-1' / 'scan.json'}: field 'sample_id': {SID_RULE}")
    assert len(completed.stderr.splitlines()) == 1


@pytest.mark.parametrize("names", [
    ["rec_0001_8bit.tif", "rec_0002_8bit.tif", "rec_0003_8bit.tif"],  # a constant digit run is part of the pattern
    ["z0.tif", "z2.tif", "z4.tif"],  # every second slice exported: one step throughout
    ["top.tif", "middle.tif", "bottom.tif"],  # no numbers: natural order
])  # fmt: skip
def test_slice_names_that_are_not_a_gap_are_accepted(tmp_path, names):
    write_scan_json(tmp_path / "S-1")
    write_slices(tmp_path / "S-1" / "slices", ramp((3, 9, 10)), names)
    result = runner.invoke(app, ["validate", str(tmp_path / "S-1")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shape_zyx"] == [3, 9, 10]


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Windows editors write one: not worth a refusal."""
    json_case()(tmp_path / "S-1")
    (tmp_path / "S-1" / "scan.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "S-1" / "scan.json").read_bytes())
    result = runner.invoke(app, ["validate", str(tmp_path / "S-1")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sample_id"] == "S-1"


def test_nan_passes_validation_and_is_refused_by_convert(tmp_path):
    """Validation reads headers only; the first pass over the voxels (convert, segment) finds NaN, naming the slice."""
    volume = ramp(dtype=np.float32)
    volume[5, 2, 3] = np.nan
    write_scan_json(tmp_path / "S-1")
    write_tiff(tmp_path / "S-1" / "scan.tif", volume)
    assert runner.invoke(app, ["validate", str(tmp_path / "S-1")]).exit_code == 0
    result = runner.invoke(app, ["convert", str(tmp_path / "S-1"), str(tmp_path / "out.ome.zarr")])
    assert result.exit_code == 2, result.output
    assert f"error: {tmp_path / 'S-1' / 'scan.tif'}: slice z=5 holds NaN or infinite values (1 voxels of the " \
           "slice, the first at y=2, x=3)" in result.output  # fmt: skip
    assert not (tmp_path / "out.ome.zarr").exists()


def test_link_outside_the_inbox_is_refused_before_anything_is_read(tmp_path):
    """The watcher refuses such a scan (tests/test_inbox.py); a flow run given one fails at its first step."""
    scan = tmp_path / "inbox" / "S-1"
    write_scan_json(scan)
    write_tiff(tmp_path / "secret.tif", ramp())
    (scan / "scan.tif").symlink_to(tmp_path / "secret.tif")
    with pytest.raises(InboxError) as error:
        fingerprint(scan)
    assert error.value.path == str(scan / "scan.tif") and "outside the inbox" in error.value.problem


# --------------------------------------------------------------------------
# caught by the segmentation: what only the voxels show
# --------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def segment_params(model_dir: Path, **fields) -> SegmentParams:
    base = {"model_dir": str(model_dir), "folds": (0,), "device": "cpu", "chunk_size": 64, "output_chunks": 32}
    return SegmentParams(**(base | fields))


def scan_with(root: Path, volume: np.ndarray, **fields) -> Path:
    """A scan directory of ``volume``; particles of 16 voxels by default (zoom 1 for the tiny model)."""
    scan_dir = root / "S-1"
    write_scan_json(scan_dir, **({"particle_size_mm": 16 * SPACING_MM} | fields))
    write_tiff(scan_dir / "scan.tif", volume)
    return scan_dir


def epoxy(shape: tuple[int, int, int], dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """Embedding only: grey values around one level with noise, nothing brighter."""
    return np.random.default_rng(seed).normal(6700, 50, shape).astype(dtype)


@pytest.mark.parametrize("volume", [np.zeros((40, 40, 40), np.uint16), np.full((40, 40, 40), 0.5, np.float32)],
                         ids=["all-zero", "constant-float"])  # fmt: skip
def test_constant_image_is_refused_before_the_model_runs(tmp_path, tiny_model_dir, volume):
    scan_dir = scan_with(tmp_path, volume)
    with pytest.raises(ScanError) as error:
        run_segmentation(scan_dir, tmp_path / "out", segment_params(tiny_model_dir))
    assert error.value.path == str(scan_dir / "scan.tif")
    assert error.value.problem.startswith(f"is uniform: every sampled voxel is {volume.flat[0]:g}")
    assert not list((tmp_path / "out").glob(".work-*"))


def test_nan_in_a_slice_the_sample_skips_is_found_while_segmenting(tmp_path, tiny_model_dir):
    volume = epoxy((80, 40, 40), np.float32)
    sampled = set(np.unique(np.linspace(0, 79, 64).round().astype(int)))
    z = next(z for z in range(80) if z not in sampled)
    volume[z, 7, 9] = np.nan
    scan_dir = scan_with(tmp_path, volume)
    with pytest.raises(ScanError) as error:
        run_segmentation(scan_dir, tmp_path / "out", segment_params(tiny_model_dir))
    assert error.value.path == str(scan_dir / "scan.tif")
    assert error.value.problem.startswith(f"slice z={z} holds NaN or infinite values (1 voxels of the slice")
    assert list((tmp_path / "out").glob(".work-*/plan.json")), "found by the plan's sample, not while segmenting"


@pytest.fixture(scope="module")
def blind_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its background logit raised by 1000: it finds nothing, as a useless model would."""
    blind = tmp_path_factory.mktemp("blind") / "ps3d-blind"
    shutil.copytree(tiny_model_dir, blind)
    for checkpoint in blind.glob("fold_*/checkpoint_final.pth"):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        weights = saved["network_weights"]
        for key in [k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".bias")]:
            weights[key][0] += 1000.0
        torch.save(saved, checkpoint)
    return blind


def test_no_particles_found_is_refused(tmp_path, blind_model_dir):
    scan_dir = scan_with(tmp_path, epoxy((40, 40, 40)))
    with pytest.raises(ScanError) as error:
        run_segmentation(scan_dir, tmp_path / "out", segment_params(blind_model_dir))
    assert error.value.path == str(scan_dir / "scan.tif")
    assert error.value.problem.startswith("no particles found: the model ps3d-tiny-test 0.0.1-test found none")
    assert not (tmp_path / "out" / "labels.ome.zarr").exists() and not list((tmp_path / "out").glob(".work-*"))
    # model evaluation scores such a model instead of failing
    record = run_segmentation(scan_dir, tmp_path / "eval", segment_params(blind_model_dir, require_particles=False))
    assert record["particle_count"] == 0


def test_pure_epoxy_without_particle_size_is_refused(tmp_path, tiny_model_dir):
    scan_dir = scan_with(tmp_path, epoxy((48, 48, 48)), particle_size_mm=...)
    with pytest.raises(ScanError) as error:
        run_segmentation(scan_dir, tmp_path / "out", segment_params(tiny_model_dir))
    assert error.value.path == str(scan_dir / "scan.tif")
    assert "no particles found to estimate the particle size from" in error.value.problem


@pytest.mark.parametrize(("size_mm", "words"), [
    (1e300, "is too small for the model: at particle size 1e+300 mm (params)"),
    (1e-5, "would be 512000x512000x512000 voxels after particle-size normalisation"),
])  # fmt: skip
def test_particle_size_far_off_is_refused_before_the_model_runs(tmp_path, tiny_model_dir, size_mm, words):
    scan_dir = scan_with(tmp_path, epoxy((32, 32, 32)))
    with pytest.raises(ScanError) as error:
        run_segmentation(scan_dir, tmp_path / "out", segment_params(tiny_model_dir, particle_size_mm=size_mm))
    assert error.value.path == str(scan_dir)
    assert words in error.value.problem


# --------------------------------------------------------------------------
# the quarantine keeps everything
# --------------------------------------------------------------------------


def stored_sample(home: Path, sample_id: str) -> list[dict]:
    """Store a sample of 40 particles as an earlier ingestion would have; its particle rows."""
    now = datetime.now(UTC)
    metadata = ScanMetadata(sample_id=sample_id, spacing_mm=SPACING_MM, stream="feed", particle_size_mm=0.1)
    run = {"run_id": "stored-run", "sample_id": sample_id, "status": "succeeded", "started_at": now,
           "finished_at": now}  # fmt: skip
    catalog.store_sample(home, metadata, random_particle_table(sample_id, 40, seed=3, spacing_mm=SPACING_MM), run,
                         fingerprint="0" * 32, model_name="ps3d-tiny-test", model_version="0.0.1-test")  # fmt: skip
    return particles_of(home, sample_id)


def particles_of(home: Path, sample_id: str) -> list[dict]:
    sql = f"SELECT * FROM particles WHERE sample_id = '{sample_id}' ORDER BY particle_id"
    return catalog.query(home, sql, limit=None).table.to_pylist()


def test_a_malformed_scan_claiming_a_stored_sample_is_quarantined_and_loses_nothing(tmp_path, tiny_model_dir,
                                                                                    prefect_api):  # fmt: skip
    """An all-zero image (caught by the segmentation, on a Dask worker) with the id of a stored sample.

    The flow runs in this process on the session's Prefect server (Prefect's
    own ephemeral server cannot start in this environment: ``uvicorn
    --app-dir site-packages`` lets the ``argparse`` 1.4 backport that
    batchgenerators pulls in shadow the standard library's) and a temporary
    Dask LocalCluster.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ingest import ingest_scan

    home, sample = tmp_path / "home", "Ore1-feed"
    before = stored_sample(home, sample)
    scan = tmp_path / "inbox" / "Ore1-feed-rescan"
    write_scan_json(scan, sample_id=sample, particle_size_mm=16 * SPACING_MM)
    write_tiff(scan / "scan.tif", np.zeros((32, 32, 32), np.uint16))
    (scan / "notes.txt").write_text("operator notes, kept in the quarantine")

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        with pytest.raises(ScanError, match="is uniform"):
            ingest_scan(str(scan), model_dir=str(tiny_model_dir), home=str(home),
                        segment_options={"device": "cpu", "chunk_size": 64})  # fmt: skip
        # send the run's logs and events while the server is up, not in retries at exit after it stopped
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)

    assert not scan.exists()
    [entry] = read_quarantine(home)
    assert entry["file"] == str(scan / "scan.tif") and entry["stage"] == "segment"
    assert entry["problem"].startswith("is uniform: every sampled voxel is 0")
    kept = Path(entry["path"]) / scan.name
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "scan.json", "scan.tif"]
    assert json.loads((Path(entry["path"]) / ERROR_JSON).read_text())["sample_id"] == sample

    assert particles_of(home, sample) == before  # the stored particles, value for value
    row = catalog.get_sample(home, sample)
    assert row["status"] == "quarantined" and "is uniform" in row["error"]
    assert row["particle_count"] == 40 and row["fingerprint"] == "0" * 32
    runs = catalog.query(home, f"SELECT run_id, status, error FROM runs WHERE sample_id = '{sample}' "
                               "ORDER BY started_at").table.to_pylist()  # fmt: skip
    assert [r["status"] for r in runs] == ["succeeded", "failed"]
    assert runs[1]["error"].startswith(f"segment: {scan / 'scan.tif'}: is uniform")
    assert not (home / "work").exists() or not list((home / "work").iterdir())


# --------------------------------------------------------------------------
# the README's table names tests that exist
# --------------------------------------------------------------------------


def test_the_readme_table_names_existing_tests():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Malformed input: what happens", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) > 30
    ids = {case[0] for case in CASES}
    for row in rows:
        references = row.rsplit(" | ", 1)[1]
        assert references.strip(" |") != "", row
        for case in re.findall(r"`\[([a-z0-9-]+)\]`", references):
            assert case in ids, case
        for file, name in re.findall(r"`([a-z_]+\.py)::(test_[a-z0-9_]+)", references):
            source = (root / "tests" / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{file}::{name}"
    assert {case for row in rows for case in re.findall(r"`\[([a-z0-9-]+)\]`", row)} == ids
