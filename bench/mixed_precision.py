"""float32 against bfloat16 mixed precision on the CPU: training steps, patch inference, a whole segmentation.

Three measurements with the shipped default model's network (or ``--model``):

1. **Training step** (what :class:`~ps3d_core.training.trainer.PS3DTrainer`
   runs): forward with deep supervision, CE loss on every output, backward,
   gradient clipping and nnU-Net's SGD step, batch 2 of the model's patch;
   float32 with contiguous tensors (nnU-Net's CPU path) against bfloat16
   autocast with channels-last tensors.
2. **Patch inference** (:class:`~ps3d_core.inference.predict.PatchPredictor`):
   a batch of 4 patches of a real normalised scan, float32 against bfloat16,
   and the share of voxels whose class agrees.
3. **Segmentation** of a synthetic ``small`` scan (seed 4100, never a training seed) (``run_segmentation``,
   inline, default parameters) both ways: wall time, label agreement, and the
   paper's metrics of each against the ground truth.

Each timing is the median of ``--repeats`` runs after a warm-up, the two
variants alternating. Run it on an otherwise idle machine.

    .venv/bin/python bench/mixed_precision.py [--model DIR] [--repeats 5] [--work /tmp/ps3d-mixed]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ps3d_core.inference import PatchPredictor, SegmentParams, cpu_has_native_bfloat16, run_segmentation
from ps3d_core.io import open_scan, read_image
from ps3d_core.metrics import evaluate
from ps3d_core.models import DEFAULT_MODEL_DIR, build_network, load_model
from ps3d_core.synth import synthesize_samples
from ps3d_core.training import prepare_case


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step_seconds(model, repeats: int) -> dict:
    """Median seconds of one training step, float32/contiguous and bfloat16/channels-last."""
    network = build_network(model.plans, model.metadata.configuration, model.dataset_json)
    network.decoder.deep_supervision = True
    optimizer = torch.optim.SGD(network.parameters(), 1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, *model.patch_size), generator=generator)
    y = torch.randint(0, 3, (2, *model.patch_size), generator=generator)

    def step(mixed: bool):
        data = x.contiguous(memory_format=torch.channels_last_3d) if mixed else x
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            outputs = network(data)
            loss = sum(
                torch.nn.functional.cross_entropy(o.float(), torch.nn.functional.interpolate(
                    y[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long())
                for o in outputs
            )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()

    result = {}
    for mixed in (False, True):
        network.to(memory_format=torch.channels_last_3d if mixed else torch.contiguous_format)
        result["bfloat16" if mixed else "float32"] = _median_seconds(lambda: step(mixed), repeats)
    return result


def patch_inference(model, image: np.ndarray, repeats: int) -> dict:
    """Median seconds of a batch of 4 patches both ways, and the share of voxels of equal class."""
    p = model.patch_size
    corners = [(0, 0, 0), (0, p[1], 0), (p[0], 0, p[2]), (p[0], p[1], p[2])]
    x = torch.from_numpy(np.stack([image[z : z + p[0], y : y + p[1], w : w + p[2]] for z, y, w in corners]))[:, None]
    predictors = {name: PatchPredictor(model.networks, "cpu", (), name == "bfloat16") for name in ("float32", "bfloat16")}
    with torch.inference_mode():
        seconds = {name: _median_seconds(lambda pr=pr: pr(x), repeats) for name, pr in predictors.items()}
        classes = {name: pr(x).argmax(1) for name, pr in predictors.items()}
    return seconds | {"class_agreement": float((classes["float32"] == classes["bfloat16"]).float().mean())}


def benchmark_scan(work: Path) -> Path:
    """The synthetic ``small`` scan of seed 4100 (synthesised once into ``work/scans``)."""
    scans = work / "scans"
    if not scans.exists():
        synthesize_samples(scans, "small", 1, 4100, workers=1)
    (scan_dir,) = sorted(p for p in scans.iterdir() if (p / "scan.json").is_file())
    return scan_dir


def model_grid_image(model, scan_dir: Path) -> np.ndarray:
    """The scan normalised and resampled to the model's particle size, as the pipeline feeds it."""
    truth = read_image(scan_dir.parent / "_truth" / f"{scan_dir.name}_labels.tif")
    with open_scan(scan_dir) as scan:
        meta, volume = scan.metadata, scan.volume
        levels = model.metadata.intensity_normalization.levels(volume)
        raw = volume.read(0, volume.shape[0])
    image, _, _ = prepare_case(
        raw, truth, meta.spacing_zyx_mm, meta.particle_size_mm, levels, model.metadata.target_particle_size_voxels
    )
    return image


def segmentation(model_dir: Path, scan_dir: Path, work: Path) -> dict:
    """The scan segmented both ways (inline): seconds, agreement, metrics."""
    truth = read_image(scan_dir.parent / "_truth" / f"{scan_dir.name}_labels.tif")
    result, labels = {}, {}
    for name in ("float32", "bfloat16"):
        params = SegmentParams(model_dir=str(model_dir), device="cpu", mixed_precision=name == "bfloat16")
        start = time.perf_counter()
        run_segmentation(scan_dir, work / name, params)
        seconds = time.perf_counter() - start
        labels[name] = read_image(work / name / "labels.ome.zarr")
        result[name] = {"seconds": round(seconds, 1), "metrics": evaluate(labels[name], truth)}
    result["foreground_agreement"] = float(((labels["float32"] > 0) == (labels["bfloat16"] > 0)).mean())
    result["scan"] = scan_dir.name
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ps3d-mixed"))
    args = parser.parse_args()
    if not cpu_has_native_bfloat16():
        raise SystemExit("this CPU has no native bfloat16: mixed precision stays off here")
    model = load_model(args.model, device="cpu")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": f"{model.metadata.name} {model.metadata.version} ({model.num_parameters:,} parameters)",
        "training_step_s": training_step_seconds(model, args.repeats),
    }
    scan_dir = benchmark_scan(args.work)
    report["patch_inference_s"] = patch_inference(model, model_grid_image(model, scan_dir), args.repeats)
    report["segmentation"] = segmentation(args.model, scan_dir, args.work)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
