"""Our patch predictor against nnU-Net's sliding window, side by side; optionally the whole pipeline.

**Sliding window.** The same networks (every fold of the model, or
``--folds``), the same normalised volume, the same patch size and step, in
one process, timed alternately (``--repeat`` rounds, median reported, after
an untimed warm-up of both on a small crop):

* ours: :func:`ps3d_core.inference.predict.sliding_window_predict` with
  :class:`~ps3d_core.inference.predict.PatchPredictor` (batches of
  ``--batch-size`` patches; on CUDA float16 autocast, the volume copied from
  pinned memory without blocking, the Gaussian-weighted sums kept on the GPU);
* nnU-Net: ``nnUNetPredictor.predict_sliding_window_return_logits``, the
  predictor set up with ``manual_initialization`` (network built from the
  model's plans; no trainer class looked up by name), one pass per fold with
  the fold's weights loaded as nnU-Net's own ensembling does, logits summed
  on the device.

Both timings include the host -> device copy of the volume and the argmax
back on the host. Reported: seconds, voxels/s (of the volume) and
patches/s, the speed-up, and the share of voxels whose argmax class is equal.
Two agreement figures: ours as the pipeline computes it (Gaussian-weighted
softmax probabilities summed in float32, as ParticleSeg3D aggregates) against
nnU-Net (Gaussian-weighted logits in float16 buffers): the aggregation rule
itself decides near-tied voxels differently; and nnU-Net's aggregation run
through our predictor (fold-averaged logits, our batching, buffers and
transfers) against nnU-Net: the numerical difference of the implementations.

The volume: a ``typical`` synthetic scan (``ps3d_core.synth``) z-scored with
the model's statistics, resampled to the model's particle size and
mirror-tiled or cropped to ``--shape`` (default 4 patches per axis on the
CPU, the same but at least 256 voxels on CUDA).

**Pipeline** (``--pipeline``): ``run_segmentation`` on a synthetic scan of
``--pipeline-shape`` (default the paper's mean scan, 1000 x 1250 x 1250
voxels), the ``typical`` seed-0 scan (mean particle diameter 60 voxels)
mirror-tiled to that shape, prediction in this process on the device, the
other stages inline or on ``--pipeline-workers`` processes; prints the stage
timings and throughputs from ``segment.json``. That size needs a GPU: on the
CPU use a smaller ``--pipeline-shape``, or ``--dry-run`` for the plan only
(target grid, patches, chunks).

Usage::

    .venv/bin/python bench/gpu_sliding_window.py [--model DIR] [--shape Z Y X] [--repeat 3]
    .venv/bin/python bench/gpu_sliding_window.py --pipeline [--pipeline-shape 1000 1250 1250] [--dry-run]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segment_memory import base_scan_dir, tiny_model, write_tiled_scan  # noqa: E402

PAPER_SHAPE = (1000, 1250, 1250)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------
# the volume
# --------------------------------------------------------------------------


def bench_volume(model, data: Path, shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    """A normalised target-grid volume of ``shape`` from a synthetic scan (float32)."""
    import tifffile

    from ps3d_core.inference.geometry import resample_linear, target_shape, zoom_factors
    from segment_memory import mirror_index

    scan = base_scan_dir(data, "typical", seed)
    meta = json.loads((scan / "scan.json").read_text())
    spacing = meta["spacing_mm"] if isinstance(meta["spacing_mm"], list) else [meta["spacing_mm"]] * 3
    image = tifffile.imread(scan / "scan.tif").astype(np.float32)
    norm = model.metadata.intensity_normalization
    image -= np.float32(norm.mean)
    image /= np.float32(norm.std)
    factors = zoom_factors(spacing, meta["particle_size_mm"], model.metadata.target_particle_size_voxels)
    tshape = target_shape(image.shape, factors)
    image = resample_linear(image, (0, 0, 0), image.shape, tshape, tuple(slice(0, n) for n in tshape))
    idx = [mirror_index(n, m) for n, m in zip(shape, image.shape)]
    return np.ascontiguousarray(image[np.ix_(*idx)], dtype=np.float32)


# --------------------------------------------------------------------------
# the two predictors
# --------------------------------------------------------------------------


class Ours:
    def __init__(self, model, device: torch.device, tta: bool, step: float, batch_size: int) -> None:
        from ps3d_core.inference.predict import PatchPredictor

        self.predictor = PatchPredictor(model.networks, device, model.mirroring_axes if tta else ())
        self.patch, self.step, self.batch, self.device = model.patch_size, step, batch_size, device

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from ps3d_core.inference.predict import sliding_window_predict

        labels = sliding_window_predict(
            self.predictor, image, self.patch, self.step, batch_size=self.batch, device=self.device
        )
        _sync(self.device)
        return labels


class _LogitMean:
    """Fold-averaged logits instead of probabilities: nnU-Net's aggregation, with our batching and buffers."""

    def __init__(self, predictor) -> None:
        self.p = predictor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(self.p._logits(n, x) for n in self.p.networks)
        return total / len(self.p.networks)


def ours_logit_aggregation(ours: Ours, image: np.ndarray) -> np.ndarray:
    from ps3d_core.inference.predict import sliding_window_predict

    return sliding_window_predict(
        _LogitMean(ours.predictor), image, ours.patch, ours.step, batch_size=ours.batch, device=ours.device
    )


class NnUNet:
    """``nnUNetPredictor.predict_sliding_window_return_logits``, fold by fold (manual initialisation)."""

    def __init__(self, model, device: torch.device, tta: bool, step: float) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from ps3d_core.models import TRAINER_NAME, build_network

        plans = PlansManager(copy.deepcopy(model.plans))
        config = plans.get_configuration(model.metadata.configuration)
        network = build_network(model.plans, model.metadata.configuration, model.dataset_json, initialize=False)
        self.parameters = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in model.networks]
        network.load_state_dict(self.parameters[0])
        self.predictor = nnUNetPredictor(
            tile_step_size=step,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
        self.predictor.manual_initialization(
            network.to(device).eval(),
            plans,
            config,
            self.parameters,
            model.dataset_json,
            TRAINER_NAME,
            tuple(model.mirroring_axes) if tta else None,
        )
        self.device = device

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image)[None]
        total = None
        for params in self.parameters:
            if len(self.parameters) > 1:
                self.predictor.network.load_state_dict(params)
            logits = self.predictor.predict_sliding_window_return_logits(x)
            total = logits if total is None else total + logits
        labels = total.argmax(0).to(torch.uint8).cpu().numpy()
        _sync(self.device)
        return labels


def compare(args, model, device: torch.device) -> dict:
    from ps3d_core.inference.geometry import patch_grid

    patch = tuple(model.patch_size)
    if args.shape:
        shape = tuple(args.shape)
    elif device.type == "cuda":
        shape = tuple(max(256, 4 * p) for p in patch)
    else:
        shape = tuple(4 * p for p in patch)
    image = bench_volume(model, args.data, shape)
    n_patches = math.prod(len(s) for s in patch_grid(shape, patch, args.step))
    ours = Ours(model, device, args.tta, args.step, args.batch_size)
    theirs = NnUNet(model, device, args.tta, args.step)

    warm = np.ascontiguousarray(image[tuple(slice(0, 2 * p) for p in patch)])
    ours(warm), theirs(warm)
    times: dict[str, list[float]] = {"ours": [], "nnunet": []}
    labels: dict[str, np.ndarray] = {}
    for r in range(args.repeat):
        order = (("ours", ours), ("nnunet", theirs)) if r % 2 == 0 else (("nnunet", theirs), ("ours", ours))
        for name, fn in order:
            _sync(device)
            t = time.perf_counter()
            labels[name] = fn(image)
            times[name].append(time.perf_counter() - t)
            print(f"  round {r + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    voxels = math.prod(shape)
    med = {k: statistics.median(v) for k, v in times.items()}
    equal = float((labels["ours"] == labels["nnunet"]).mean())
    # the same computation as nnU-Net's (Gaussian-weighted logits), through our predictor: what is left
    # of the difference is numerics (float16 buffers and autocast, batching), not the aggregation rule
    equal_logits = float((ours_logit_aggregation(ours, image) == labels["nnunet"]).mean())
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "model": f"{model.metadata.name} {model.metadata.version}",
        "parameters": model.num_parameters,
        "folds": list(model.folds),
        "tta": args.tta,
        "shape": list(shape),
        "patch": list(patch),
        "step": args.step,
        "patches": n_patches,
        "batch_size": args.batch_size,
        "seconds": times,
        "median_s": med,
        "voxels_per_s": {k: voxels / v for k, v in med.items()},
        "patches_per_s": {k: n_patches * len(model.folds) / v for k, v in med.items()},
        "speedup": med["nnunet"] / med["ours"],
        "argmax_equal": equal,
        "argmax_equal_same_aggregation": equal_logits,
        "class_shares": [float((labels["ours"] == c).mean()) for c in range(3)],
    }


# --------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each task at submission, in this process (keeps the prediction on this process's GPU)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future


def pipeline(args, model_dir: Path, model, device: torch.device) -> dict:
    from ps3d_core.inference import SegmentParams, run_segmentation
    from ps3d_core.inference.geometry import patch_grid, target_shape, zoom_factors
    from schemas.scan import SCAN_COMPLETE_MARKER

    shape = tuple(args.pipeline_shape)
    base = base_scan_dir(args.data, "typical", 0)
    meta = json.loads((base / "scan.json").read_text())
    spacing = meta["spacing_mm"] if isinstance(meta["spacing_mm"], list) else [meta["spacing_mm"]] * 3
    size_mm = args.particle_size_voxels * spacing[0] if args.particle_size_voxels else meta["particle_size_mm"]
    patch = tuple(model.patch_size)
    chunk = (args.chunk_size,) * 3 if args.chunk_size else tuple(4 * p for p in patch)
    tshape = target_shape(shape, zoom_factors(spacing, size_mm, model.metadata.target_particle_size_voxels))
    plan = {
        "source_shape": list(shape),
        "source_voxels": math.prod(shape),
        "particle_size_voxels": size_mm / spacing[0],
        "target_shape": list(tshape),
        "target_voxels": math.prod(tshape),
        "patch": list(patch),
        "patches": math.prod(len(s) for s in patch_grid(tshape, patch, args.step)),
        "chunk_shape": list(chunk),
        "chunks": math.prod(math.ceil(t / c) for t, c in zip(tshape, chunk)),
        "scan_gb_uint16": 2 * math.prod(shape) / 1e9,
    }
    if args.dry_run:
        return {"plan": plan, "dry_run": True}
    if device.type != "cuda" and math.prod(shape) > 64 * 2**20 and not args.force:
        raise SystemExit(
            f"a {'x'.join(map(str, shape))} scan needs a GPU (on this CPU it would take hours); "
            "pass a smaller --pipeline-shape, --dry-run for the plan, or --force"
        )
    folder = args.data / f"pipeline-{'x'.join(map(str, shape))}" / base.name
    if not (folder / SCAN_COMPLETE_MARKER).is_file():
        t = time.perf_counter()
        write_tiled_scan(base, folder, shape)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    params = SegmentParams(
        model_dir=str(model_dir),
        device=str(device),
        batch_size=args.batch_size,
        step=args.step,
        chunk_size=args.chunk_size,
        tta=args.tta,
        particle_size_mm=size_mm,
    )
    out = args.data / f"pipeline-out-{'x'.join(map(str, shape))}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if args.pipeline_workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.pipeline_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            record = run_segmentation(folder, out, params, predict_executor=InlineExecutor(), executor=pool)
    else:
        record = run_segmentation(folder, out, params)
    wall = time.perf_counter() - t
    timings = record["timings_s"]
    source, target = math.prod(record["source_shape"]), math.prod(record["target_shape"])
    return {
        "plan": plan,
        "device": record["device"],
        "wall_s": wall,
        "timings_s": timings,
        "particles": record["particle_count"],
        "predict_target_voxels_per_s": target / timings["predict"],
        "predict_source_voxels_per_s": source / timings["predict"],
        "total_target_voxels_per_s": target / timings["total"],
        "total_source_voxels_per_s": source / timings["total"],
        "cuda_max_allocated_gb": (record.get("cuda_max_allocated_bytes") or 0) / 1e9,
        "peak_rss_gb": max(record["peak_rss_bytes"], record["driver_peak_rss_bytes"]) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/ps3d-bench-segment"), help="cache of scans and model")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="volume of the sliding-window comparison")
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=None, help="our patches per forward pass (default 4 CPU, 8 CUDA)")
    ap.add_argument("--folds", type=int, nargs="+", default=None)
    ap.add_argument("--tta", action="store_true", help="mirroring test-time augmentation on both sides")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    ap.add_argument("--pipeline", action="store_true", help="time run_segmentation instead")
    ap.add_argument("--pipeline-shape", type=int, nargs=3, default=list(PAPER_SHAPE))
    ap.add_argument("--particle-size-voxels", type=float, default=None, help="default: the scan's (60 voxels)")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--pipeline-workers", type=int, default=0, help="processes for the non-prediction stages")
    ap.add_argument("--dry-run", action="store_true", help="--pipeline: print the plan only")
    ap.add_argument("--force", action="store_true", help="--pipeline: run a large scan on the CPU anyway")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from ps3d_core.inference.pipeline import resolve_device
    from ps3d_core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    if args.batch_size is None:
        args.batch_size = 8 if device.type == "cuda" else 4
    args.data.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or tiny_model(args.data)
    model = load_model(model_dir, args.folds, device)
    result = pipeline(args, model_dir, model, device) if args.pipeline else compare(args, model, device)
    print(json.dumps(result, indent=1))
    if not args.pipeline:
        r = result
        print(
            f"\n{r['device']}, {r['torch_threads']} torch threads; {r['model']} ({r['parameters']} parameters), "
            f"folds {r['folds']}, tta {r['tta']}; volume {'x'.join(map(str, r['shape']))}, patch "
            f"{'x'.join(map(str, r['patch']))}, step {r['step']}: {r['patches']} patches x {len(r['folds'])} folds\n"
        )
        print("| predictor | median s (runs) | voxels/s | patch passes/s |")
        print("|---|---:|---:|---:|")
        names = {"ours": f"ours (batch {r['batch_size']})", "nnunet": "nnU-Net predict_sliding_window_return_logits"}
        for k, label in names.items():
            runs = ", ".join(f"{s:.2f}" for s in r["seconds"][k])
            print(
                f"| {label} | {r['median_s'][k]:.2f} ({runs}) | {r['voxels_per_s'][k] / 1e6:.2f} M "
                f"| {r['patches_per_s'][k]:.0f} |"
            )
        print(
            f"\nspeed-up {r['speedup']:.2f}x; argmax equal on {100 * r['argmax_equal']:.3f} % of the voxels "
            f"(ours sums Gaussian-weighted probabilities, as ParticleSeg3D; nnU-Net sums logits); "
            f"with nnU-Net's logit aggregation through our predictor: {100 * r['argmax_equal_same_aggregation']:.3f} %"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
