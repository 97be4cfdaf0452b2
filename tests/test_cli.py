"""The ``ps3d`` command line: help everywhere, real work, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import typer
import zarr
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core.io import open_ome_zarr, read_image, write_tiff

runner = CliRunner()
#: Every registered command, so a new one cannot miss its help test.
COMMANDS = sorted(typer.main.get_command(app).commands)


def make_scan(scan_dir: Path, volume: np.ndarray | None = None, **fields) -> Path:
    scan_dir.mkdir(parents=True, exist_ok=True)
    if volume is None:
        volume = np.arange(10 * 12 * 14, dtype=np.uint16).reshape(10, 12, 14)
    write_tiff(scan_dir / "scan.tif", volume)
    document = {"sample_id": scan_dir.name, "spacing_mm": 0.02, "stream": "feed", **fields}
    (scan_dir / "scan.json").write_text(json.dumps(document))
    return scan_dir


def run_bad(*args: str) -> str:
    """Run a command expected to refuse its input; return its error line."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: ps3d" in result.output


def test_entry_point_is_installed():
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("ps3d")), "--version"], capture_output=True, text=True, check=True
    )
    assert completed.stdout.startswith("ps3d ")


def test_validate_prints_what_the_platform_sees(tmp_path):
    scan_dir = make_scan(tmp_path / "ore-1", particle_size_mm=0.3)
    result = runner.invoke(app, ["validate", str(scan_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sample_id"] == "ore-1"
    assert summary["shape_zyx"] == [10, 12, 14]
    assert summary["dtype"] == "uint16"
    assert summary["spacing_zyx_mm"] == [0.02, 0.02, 0.02]
    assert summary["particle_size_mm"] == 0.3


def test_convert_then_export_round_trip(tmp_path):
    volume = np.random.default_rng(1).integers(0, 65535, size=(37, 21, 19), dtype=np.uint16)
    scan_dir = make_scan(tmp_path / "ore-2", volume)
    image = tmp_path / "ore-2.ome.zarr"
    result = runner.invoke(app, ["convert", str(scan_dir), str(image), "--chunk", "16"])
    assert result.exit_code == 0, result.output
    level0, spacing, attributes = open_ome_zarr(image)
    assert level0.chunks == (16, 16, 16)
    assert spacing == (0.02, 0.02, 0.02)
    assert attributes["ps3d"]["sample_id"] == "ore-2"
    np.testing.assert_array_equal(level0[:], volume)

    back = tmp_path / "back.tif"
    result = runner.invoke(app, ["export", str(image), str(back)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_image(back), volume)


def test_missing_scan_json(tmp_path):
    scan_dir = make_scan(tmp_path / "s")
    (scan_dir / "scan.json").unlink()
    assert run_bad("validate", str(scan_dir)) == f"error: {scan_dir / 'scan.json'}: missing: every scan directory needs a scan.json"


def test_invalid_scan_json_names_field_and_value(tmp_path):
    scan_dir = make_scan(tmp_path / "s", spacing_mm=-1)
    line = run_bad("convert", str(scan_dir), str(tmp_path / "out.ome.zarr"))
    assert str(scan_dir / "scan.json") in line
    assert "'spacing_mm'" in line and "-1" in line
    assert not (tmp_path / "out.ome.zarr").exists()


def test_truncated_tiff(tmp_path):
    scan_dir = make_scan(tmp_path / "s")
    tif = scan_dir / "scan.tif"
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    line = run_bad("convert", str(scan_dir), str(tmp_path / "out.ome.zarr"))
    assert str(tif) in line and "truncated or corrupt" in line


def test_2d_image(tmp_path):
    scan_dir = make_scan(tmp_path / "s")
    tifffile.imwrite(scan_dir / "scan.tif", np.zeros((12, 14), np.uint16))
    line = run_bad("validate", str(scan_dir))
    assert str(scan_dir / "scan.tif") in line and "2D image" in line


def test_slices_of_different_shapes(tmp_path):
    scan_dir = make_scan(tmp_path / "s")
    (scan_dir / "scan.tif").unlink()
    for index, shape in enumerate([(12, 14), (12, 14), (12, 15)]):
        tifffile.imwrite(scan_dir / f"slice_{index}.tif", np.zeros(shape, np.uint16))
    line = run_bad("validate", str(scan_dir))
    assert str(scan_dir / "slice_2.tif") in line and "12x15" in line and "12x14" in line


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_bad("convert", str(tmp_path / "empty"), str(tmp_path / "out.ome.zarr"))
    assert str(tmp_path / "empty") in line and "empty" in line.split(": ", 2)[2]


def test_image_too_large_for_the_disk(tmp_path):
    scan_dir = tmp_path / "huge"
    scan_dir.mkdir()
    # 8 TB: a size readers accept (volumes.MAX_SCAN_VOXELS), beyond any test machine's disk
    zarr.create_array(scan_dir / "scan.zarr", shape=(10_000, 10_000, 10_000), chunks=(256, 256, 256), dtype="uint64")
    (scan_dir / "scan.json").write_text(json.dumps({"sample_id": "huge", "spacing_mm": 0.01, "stream": "other"}))
    line = run_bad("convert", str(scan_dir), str(tmp_path / "out.ome.zarr"))
    assert str(scan_dir / "scan.zarr") in line and "GB" in line and "free" in line
    assert list(tmp_path.iterdir()) == [scan_dir]


def test_unknown_preset(tmp_path):
    assert "choose one of tiny" in run_bad("synth", str(tmp_path), "--preset", "huge")


def two_spheres(shape=(40, 40, 60), radius=9) -> np.ndarray:
    """Two touching balls, labels 1 and 2."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint32)
    for label, cx in ((1, 20), (2, 20 + 2 * radius)):
        labels[(z - 20) ** 2 + (y - 20) ** 2 + (x - cx) ** 2 <= radius**2] = label
    return labels


def write_ref(tmp_path: Path, labels: np.ndarray) -> Path:
    write_tiff(tmp_path / "ref.tif", labels, (0.02, 0.02, 0.02))
    return tmp_path / "ref.tif"


def evaluate_cli(pred: Path, ref: Path) -> dict:
    result = runner.invoke(app, ["evaluate", str(pred), str(ref)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_prints_the_paper_metrics(tmp_path):
    reference = two_spheres()
    write_tiff(tmp_path / "ref.tif", reference)
    write_tiff(tmp_path / "merged.tif", (reference > 0).astype(np.uint32))
    scores = evaluate_cli(tmp_path / "merged.tif", tmp_path / "ref.tif")
    assert scores["n_pred"] == 1 and scores["n_ref"] == 2
    assert scores["mergers"] == 1 and scores["merger_ratio"] == 0.5
    assert scores["f1"] == 1.0


def test_evaluate_refuses_different_shapes(tmp_path):
    write_tiff(tmp_path / "a.tif", np.zeros((4, 5, 6), np.uint32))
    write_tiff(tmp_path / "b.tif", np.zeros((4, 5, 7), np.uint32))
    line = run_bad("evaluate", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"))
    assert str(tmp_path / "a.tif") in line


def test_baseline_writes_the_segmentation_format(tmp_path):
    reference = two_spheres()
    rng = np.random.default_rng(0)
    image = (1000 + 20000 * (reference > 0) + rng.normal(0, 500, reference.shape)).clip(0, 65535).astype(np.uint16)
    scan_dir = make_scan(tmp_path / "two", image, particle_size_mm=18 * 0.02)
    out = tmp_path / "baseline"
    result = runner.invoke(app, ["baseline", str(scan_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "segment.json").read_text())
    labels, spacing, attributes = open_ome_zarr(out / "labels.ome.zarr")
    assert record["method"] == "threshwater" and record["particle_count"] == 2
    assert labels.dtype == np.uint32 and spacing == (0.02, 0.02, 0.02)
    assert "image-label" in attributes["ome"]
    assert evaluate_cli(out / "labels.ome.zarr", write_ref(tmp_path, reference))["f1_match"] == 1.0


def test_split_separates_a_merged_pair(tmp_path):
    reference = two_spheres()
    merged = tmp_path / "merged.tif"
    write_tiff(merged, (reference > 0).astype(np.uint32), (0.02, 0.02, 0.02))
    out = tmp_path / "split.tif"
    result = runner.invoke(
        app,
        ["split", str(merged), "--label", "1", "--marker", "20,20,20", "--marker", "20,20,38",
         "--border", "10,10,29", "--border", "30,30,29", "--border", "30,10,29", "--border", "10,30,29", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new_labels"] == [2, 3]
    scores = evaluate_cli(out, write_ref(tmp_path, reference))
    assert scores["n_pred"] == 2 and scores["f1_match"] == 1.0 and scores["f1_instance"] > 0.95


def test_split_refuses_a_marker_off_the_particle(tmp_path):
    merged = tmp_path / "merged.tif"
    write_tiff(merged, (two_spheres() > 0).astype(np.uint32))
    line = run_bad("split", str(merged), "--label", "1", "--marker", "0,0,0", "--marker", "20,20,38", "--border", "20,20,29")
    assert str(merged) in line and "marker" in line


def test_split_refuses_malformed_points(tmp_path):
    assert "expected voxel coordinates z,y,x" in run_bad(
        "split", str(tmp_path / "x.tif"), "--label", "1", "--marker", "1,2", "--marker", "1,2,3", "--border", "1,1,1"
    )


def test_border_core_and_back_recovers_touching_particles(tmp_path):
    reference = two_spheres()
    write_tiff(tmp_path / "labels.tif", reference, (0.02, 0.02, 0.02))
    result = runner.invoke(app, ["border-core", str(tmp_path / "labels.tif"), str(tmp_path / "bc.ome.zarr")])
    assert result.exit_code == 0, result.output
    border_core, spacing, _ = open_ome_zarr(tmp_path / "bc.ome.zarr")
    assert spacing == (0.02, 0.02, 0.02)
    assert set(np.unique(border_core[:]).tolist()) == {0, 1, 2}
    result = runner.invoke(app, ["instances", str(tmp_path / "bc.ome.zarr"), str(tmp_path / "back.tif")])
    assert result.exit_code == 0, result.output
    scores = evaluate_cli(tmp_path / "back.tif", tmp_path / "labels.tif")
    assert scores["n_pred"] == 2 and scores["f1_instance"] == 1.0


def test_border_core_to_ome_zarr_needs_a_voxel_size(tmp_path):
    write_tiff(tmp_path / "labels.tif", two_spheres().astype(np.uint16))
    line = run_bad("border-core", str(tmp_path / "labels.tif"), str(tmp_path / "bc.ome.zarr"))
    assert "needs a voxel size" in line
