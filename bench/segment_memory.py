"""Peak memory and CPU throughput of ``run_segmentation`` on a 256^3 and a 512^3 synthetic scan.

Both scans have the same look and the same particle sizes: the 256^3 one is a
``typical`` synthetic scan (``ps3d_core.synth``, projection CT model); the
512^3 one is that scan mirror-tiled to 512^3 (``np.pad(mode="symmetric")``:
eight mirrored copies, so 8x the particles, the same spacing and
``scan.json``). Both are written as scan directories (``scan.tif`` +
``scan.json``) and segmented with the SAME parameters (chunk size, batch,
step, model), each in a fresh Python process.

Memory, two modes:

* ``--mode inline`` (default): every task runs in the segmenting process
  (``executor=None``); its peak RSS (``ru_maxrss``) is the whole run's peak.
* ``--mode dask --workers N``: a ``distributed.LocalCluster`` of N
  single-threaded worker processes (``deployments.cluster.dask_client``, as
  ``ps3d segment`` does); the peak is the highest sum of the RSS of the
  process tree (driver + nanny + worker processes), sampled every 50 ms with
  psutil, plus the peak RSS of the largest single task.

Throughput: target-grid voxels (after particle-size normalisation) and
source voxels per wall second of the prediction stage and of the whole
``run_segmentation`` call (stage timings from ``segment.json``).

The model is the tiny test model (``tests/tiny_model.py``, built once into
the data directory, ~15 s) unless ``--model`` names a model folder.

Usage::

    .venv/bin/python bench/segment_memory.py [--sizes 256 512] [--chunk-size 128]
        [--particle-size-voxels 16] [--mode inline|dask] [--workers 2] [--model DIR] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
BASE = 256


def _peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (per address space, so it does not inherit the
    parent's peak across fork + exec the way ``ru_maxrss`` does)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def tiny_model(data: Path) -> Path:
    folder = data / "tiny-model"
    if not (folder / "ps3d_model.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import build_tiny_model

        build_tiny_model(folder)
    return folder


def mirror_index(n_out: int, n_in: int) -> np.ndarray:
    """Indices 0..n_out-1 folded into 0..n_in-1 by mirroring (0 1 .. n-1 n-1 .. 0 0 1 ..).

    As ``np.pad(mode="symmetric")``.
    """
    i = np.arange(n_out) % (2 * n_in)
    return np.where(i < n_in, i, 2 * n_in - 1 - i)


def write_tiled_scan(base_scan: Path, folder: Path, shape: tuple[int, int, int]) -> Path:
    """A scan directory of ``shape``: ``base_scan``'s image mirror-tiled (or cropped), its ``scan.json``.

    Written page by page as a BigTIFF: never holds more than the base image and one page.
    """
    import tifffile

    from schemas.scan import SCAN_COMPLETE_MARKER, SCAN_JSON

    image = tifffile.imread(base_scan / "scan.tif")
    zi, yi, xi = (mirror_index(n, m) for n, m in zip(shape, image.shape))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".partial-scan.tif"
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        pages = (image[z][np.ix_(yi, xi)] for z in zi)
        tif.write(pages, shape=tuple(shape), dtype=image.dtype, photometric="minisblack")
    os.replace(tmp, folder / "scan.tif")
    (folder / SCAN_JSON).write_text((base_scan / SCAN_JSON).read_text())
    (folder / SCAN_COMPLETE_MARKER).write_text("")
    return folder


def base_scan_dir(data: Path, preset: str, seed: int) -> Path:
    """One synthetic scan of ``preset`` (``ps3d_core.synth``), written once into ``data``."""
    from ps3d_core.synth import synthesize, write_synthetic_scan
    from schemas.scan import SCAN_COMPLETE_MARKER

    base_dir = data / f"{preset}-s{seed}"
    base_scan = base_dir / f"synth-{preset}-s{seed}-000"
    if not (base_scan / SCAN_COMPLETE_MARKER).is_file():
        t = time.perf_counter()
        scan = synthesize(preset, seed, workers=2)
        write_synthetic_scan(scan, base_dir)
        seconds = time.perf_counter() - t
        print(f"synthesized {preset} seed {seed} {scan.image.shape} in {seconds:.0f} s", file=sys.stderr)
    return base_scan


def scan_dirs(data: Path, preset: str, seed: int, sizes: list[int]) -> dict[int, Path]:
    """Scan directories of edge ``size`` (mirror-tiled from one ``preset`` scan), written once."""
    from schemas.scan import SCAN_COMPLETE_MARKER

    base_scan = base_scan_dir(data, preset, seed)
    out: dict[int, Path] = {}
    for size in sizes:
        folder = data / f"{preset}-s{seed}-{size}" / base_scan.name
        if not (folder / SCAN_COMPLETE_MARKER).is_file():
            write_tiled_scan(base_scan, folder, (size, size, size))
        out[size] = folder
    return out


# --------------------------------------------------------------------------
# one run (child process)
# --------------------------------------------------------------------------


def child(scan: str, out: str, params_json: str, mode: str, workers: int) -> dict:
    """Segment ``scan`` into ``out`` in this process; report memory and the segment.json figures."""
    import torch

    from ps3d_core.inference import SegmentParams, pipeline, run_segmentation

    # the tasks reset VmHWM to measure themselves; keep it whole-process here (inline tasks then
    # report the process peak so far instead of their own)
    pipeline._reset_peak_rss = lambda: False
    params = SegmentParams.model_validate(json.loads(params_json))
    import_rss = _peak_rss_bytes()
    t = time.perf_counter()
    if mode == "inline":
        record = run_segmentation(scan, out, params)
    else:
        from deployments.cluster import chunk_executors, dask_client

        with dask_client(None, n_workers=workers) as client:
            predict_executor, executor = chunk_executors(client)
            record = run_segmentation(scan, out, params, predict_executor=predict_executor, executor=executor)
    seconds = time.perf_counter() - t
    return {
        "record": record,
        "seconds": seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "import_rss_bytes": import_rss,
        "torch_threads": torch.get_num_threads(),
    }


class TreeSampler:
    """Highest summed RSS of a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_processes = total, len(procs)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_one(scan: Path, out: Path, params: dict, mode: str, workers: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, __file__, "--child", str(scan), str(out), json.dumps(params), mode, str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    stdout, _ = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"segmentation of {scan} failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_rss_bytes"] = sampler.peak
    result["tree_processes"] = sampler.peak_processes
    return result


def summarise(size: int, r: dict, mode: str) -> dict:
    rec = r["record"]
    t = rec["timings_s"]
    target = int(np.prod(rec["target_shape"]))
    source = int(np.prod(rec["source_shape"]))
    peak = r["peak_rss_bytes"] if mode == "inline" else r["tree_peak_rss_bytes"]
    return {
        "size": size,
        "source_shape": rec["source_shape"],
        "target_shape": rec["target_shape"],
        "zoom": rec["zoom"][0],
        "chunk_shape": rec["chunk_shape"],
        "n_chunks": rec["n_chunks"],
        "patches_predicted": rec["patches_predicted"],
        "n_patches": rec["n_patches"],
        "particles": rec["particle_count"],
        "peak_rss_mb": peak / MB,
        "import_rss_mb": r["import_rss_bytes"] / MB,
        "tree_peak_rss_mb": r["tree_peak_rss_bytes"] / MB,
        "tree_processes": r["tree_processes"],
        "largest_task_rss_mb": rec["peak_rss_bytes"] / MB,
        "task_peak_rss_mb": {k: v["peak_rss_bytes"] / MB for k, v in rec["task_stats"].items()},
        "timings_s": t,
        "predict_target_vox_s": target / t["predict"],
        "predict_source_vox_s": source / t["predict"],
        "total_target_vox_s": target / t["total"],
        "total_source_vox_s": source / t["total"],
        "device": rec["device"],
        "torch_threads": r["torch_threads"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        scan, out, params, mode, workers = argv[1:6]
        print(json.dumps(child(scan, out, params, mode, int(workers)), default=str))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--preset", default="typical")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/ps3d-bench-segment"), help="cache of scans and model")
    ap.add_argument("--chunk-size", type=int, default=None, help="chunk edge (target voxels); default 4 patches")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument(
        "--particle-size-voxels",
        type=float,
        default=None,
        help="override the scan's particle size (in source voxels); = the model's target size gives zoom 1",
    )
    ap.add_argument("--mode", choices=("inline", "dask"), default="inline")
    ap.add_argument("--workers", type=int, default=2, help="worker processes in --mode dask")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    args.data.mkdir(parents=True, exist_ok=True)
    model = args.model or tiny_model(args.data)
    scans = scan_dirs(args.data, args.preset, args.seed, args.sizes)
    params = {"model_dir": str(model), "device": "cpu", "batch_size": args.batch_size, "step": args.step}
    if args.chunk_size:
        params["chunk_size"] = args.chunk_size
    if args.particle_size_voxels:
        meta = json.loads((next(iter(scans.values())) / "scan.json").read_text())
        spacing = meta["spacing_mm"][0] if isinstance(meta["spacing_mm"], list) else meta["spacing_mm"]
        params["particle_size_mm"] = args.particle_size_voxels * spacing
    rows = []
    for size, scan in scans.items():
        r = run_one(scan, args.data / f"out-{size}", params, args.mode, args.workers)
        row = summarise(size, r, args.mode)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nmode {args.mode}" + (f", {args.workers} workers" if args.mode == "dask" else "") + f"; params {params}\n")
    print(
        "| scan | target grid (zoom) | chunks | patches predicted (grid) | particles | peak RSS MB | RSS after imports MB "
        "| predict s | total s | predict target vox/s | predict source vox/s "
        "| total target vox/s | total source vox/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in rows:
        t = w["timings_s"]
        print(
            f"| {'x'.join(map(str, w['source_shape']))} | {'x'.join(map(str, w['target_shape']))} ({w['zoom']:.3f}) "
            f"| {w['n_chunks']} | {w['patches_predicted']} ({w['n_patches']}) | {w['particles']} | {w['peak_rss_mb']:.0f} "
            f"| {w['import_rss_mb']:.0f} | {t['predict']:.1f} | {t['total']:.1f} "
            f"| {w['predict_target_vox_s'] / 1e6:.2f} M | {w['predict_source_vox_s'] / 1e6:.2f} M "
            f"| {w['total_target_vox_s'] / 1e6:.2f} M | {w['total_source_vox_s'] / 1e6:.2f} M |"
        )
    print("\nstage seconds: " + "; ".join(
        f"{w['size']}: " + ", ".join(f"{k} {v:.1f}" for k, v in w["timings_s"].items()) for w in rows
    ))
    print("largest task peak RSS MB per stage: " + "; ".join(
        f"{w['size']}: " + ", ".join(f"{k} {v:.0f}" for k, v in w["task_peak_rss_mb"].items()) for w in rows
    ))
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        ok = ratio <= 1.3 and rows[-1]["peak_rss_mb"] < 4000
        print(
            f"\npeak RSS {rows[-1]['size']}^3 / {rows[0]['size']}^3 = {ratio:.2f}x "
            f"(target <= 1.3x and < 4 GB: {'met' if ok else 'MISSED'})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
