"""``ps3d segment`` end to end on a real Dask LocalCluster, against an in-process run."""

from __future__ import annotations

import json

import numpy as np
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from deployments.cluster import chunk_executors, gpu_workers
from ps3d.cli import app
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import open_ome_zarr
from ps3d_core.synth import synthesize, write_synthetic_scan

runner = CliRunner()


def test_segment_on_a_local_cluster_equals_an_inline_run(tmp_path, tiny_model_dir):
    scan_dir = write_synthetic_scan(synthesize("tiny", 11), tmp_path / "inbox")
    inline = run_segmentation(scan_dir, tmp_path / "inline", SegmentParams(model_dir=tiny_model_dir, device="cpu"))

    out = tmp_path / "dask"
    result = runner.invoke(
        app, ["segment", str(scan_dir), "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "segment.json").read_text())
    assert record["particle_count"] == inline["particle_count"] > 0
    labels, spacing, _ = open_ome_zarr(out / "labels.ome.zarr")
    expected, _, _ = open_ome_zarr(tmp_path / "inline" / "labels.ome.zarr")
    assert labels.dtype == np.uint32 and labels.shape == expected.shape
    np.testing.assert_array_equal(labels[:], expected[:])


def test_prediction_is_routed_to_gpu_workers_only_when_one_exists():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            assert gpu_workers(client) == []
            predict, _ = chunk_executors(client)
            assert predict.submit(sum, [1, 2]).result(timeout=30) == 3
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, resources={"gpu": 1}
    ) as cluster:
        with Client(cluster) as client:
            assert len(gpu_workers(client)) == 1
            predict, _ = chunk_executors(client)
            assert predict.submit(sum, [3, 4]).result(timeout=30) == 7
