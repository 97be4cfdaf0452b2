"""Fault tolerance of ``run_segmentation`` on a real Dask ``LocalCluster`` (worker processes)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import torch
from fault_plugins import KillMidPrediction

from deployments.cluster import chunk_executors, dask_client
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import open_ome_zarr
from ps3d_core.synth import synthesize, write_synthetic_scan


def _labels(out):
    labels, _, _ = open_ome_zarr(out / "labels.ome.zarr")
    return np.asarray(labels[:])


def test_worker_killed_mid_prediction_chunk_is_recomputed_elsewhere(tmp_path, tiny_model_dir):
    scan_dir = write_synthetic_scan(synthesize("tiny", 11), tmp_path / "inbox")
    # 8 prediction chunks (71^3 target grid, chunks of 64^3); keep the work directory to read the task markers
    params = SegmentParams(model_dir=tiny_model_dir, device="cpu", chunk_size=64, keep_work=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the single-threaded Dask workers: the same bits
    try:
        inline = run_segmentation(scan_dir, tmp_path / "inline", params)
    finally:
        torch.set_num_threads(threads)
    assert inline["n_chunks"] == 8

    flag = tmp_path / "killed.json"
    out = tmp_path / "dask"
    with dask_client(n_workers=2) as client:
        client.register_plugin(KillMidPrediction(str(flag)))
        predict_executor, executor = chunk_executors(client)
        record = run_segmentation(scan_dir, out, params, predict_executor=predict_executor, executor=executor)
        worker_pids = set(client.run(os.getpid).values())

    killed = json.loads(flag.read_text())
    assert killed["pid"] not in worker_pids  # that process is gone (its nanny started a new one)
    # the killed chunk was computed again, by another process, and nothing by the killed one
    work = next(out.glob(".work-*"))
    marker = work / "done" / "predict" / ("_".join(map(str, killed["chunk"])) + ".pkl")
    redone = pickle.loads(marker.read_bytes())["_stats"]["pid"]
    assert redone != killed["pid"]
    predict_pids = {pickle.loads(p.read_bytes())["_stats"]["pid"] for p in (work / "done" / "predict").glob("*.pkl")}
    assert len(list((work / "done" / "predict").glob("*.pkl"))) == 8 and killed["pid"] not in predict_pids
    assert record["device"] == "cpu" and record["tasks"]["resumed"] == 0

    assert record["particle_count"] == inline["particle_count"] > 0
    np.testing.assert_array_equal(_labels(out), _labels(tmp_path / "inline"))
