"""Global z-score (paper Eq. 1) vs per-scan quantile normalisation, on held-out scans.

Two models that differ only in their intensity normalisation are trained with
the production recipe (:func:`ps3d_core.training.train_model`, same scans,
seeds and schedule) and evaluated on held-out synthetic scans twice: as
synthesised, and re-windowed as another scanner or export setting would
deliver them (``I' = gain * I + offset``, clipped to uint16, zeros outside
the field of view kept). The paper's z-score uses the training set's
statistics, so a re-windowed scan lands outside the range it was trained on;
the quantile normalisation maps every scan to "epoxy at 0, particles near 1".

    .venv/bin/python bench/normalization_choice.py --work /tmp/ps3d-norm
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ps3d_core.baseline import threshwater
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import read_image, write_tiff
from ps3d_core.metrics import evaluate
from ps3d_core.synth import synthesize_samples
from ps3d_core.training import TrainingConfig, pair_scans_with_labels, train_model

WINDOWS = {"as synthesised": (1.0, 0.0), "gain 0.5, offset +8000": (0.5, 8000.0), "gain 2, offset -2000": (2.0, -2000.0)}


def rewindow(scan_dir: Path, out_dir: Path, gain: float, offset: float) -> Path:
    """A copy of the scan directory with its image re-windowed."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(scan_dir, out_dir)
    image = read_image(scan_dir / "scan.tif").astype(np.float64)
    windowed = np.where(image == 0, 0, np.clip(gain * image + offset, 1, 65535)).astype(np.uint16)
    spacing = json.loads((scan_dir / "scan.json").read_text())["spacing_mm"]
    spacing = tuple(spacing) if isinstance(spacing, list) else (spacing,) * 3
    write_tiff(out_dir / "scan.tif", windowed, spacing)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ps3d-norm"))
    parser.add_argument("--train", type=int, default=8, help="small training scans")
    parser.add_argument("--test", type=int, default=3, help="small held-out scans")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=25)
    args = parser.parse_args()
    train_dir, test_dir = args.work / "train", args.work / "test"
    if not train_dir.exists():
        synthesize_samples(train_dir, "small", args.train, 3100)
    if not test_dir.exists():
        synthesize_samples(test_dir, "small", args.test, 3200)
    cases = pair_scans_with_labels(train_dir, train_dir / "_truth")
    results = {}
    for method in ("zscore", "quantile"):
        model = args.work / f"model-{method}"
        if not (model / "ps3d_model.json").exists():
            config = TrainingConfig(name=f"norm-{method}", normalization=method, target_particle_size=24,
                                    patch_size=(48, 48, 48), features_per_stage=(8, 16, 32, 64), epochs=args.epochs,
                                    iterations_per_epoch=args.iterations, device="cpu", seed=0)  # fmt: skip
            train_model(cases, model, config)
        for window, (gain, offset) in WINDOWS.items():
            scores, baseline = [], []
            for scan_dir in sorted(p for p in test_dir.iterdir() if (p / "scan.json").exists()):
                windowed = rewindow(scan_dir, args.work / "windowed" / scan_dir.name, gain, offset)
                out = args.work / "out" / method / window.replace(" ", "_").replace(",", "") / scan_dir.name
                run_segmentation(windowed, out, SegmentParams(model_dir=model, device="cpu"))
                truth = read_image(test_dir / "_truth" / f"{scan_dir.name}_labels.tif")
                scores.append(evaluate(read_image(out / "labels.ome.zarr"), truth)["f1_instance"])
                baseline.append(evaluate(threshwater(read_image(windowed / "scan.tif")), truth)["f1_instance"])
            results[(method, window)] = (float(np.mean(scores)), float(np.mean(baseline)))
            print(f"{method:8s} {window:24s} F1_instance {np.mean(scores):.3f} (ThreshWater {np.mean(baseline):.3f})",
                  flush=True)  # fmt: skip
    print("\n| normalisation | " + " | ".join(WINDOWS) + " |")
    print("|---|" + "---|" * len(WINDOWS))
    for method in ("zscore", "quantile"):
        print(f"| {method} | " + " | ".join(f"{results[(method, w)][0]:.3f}" for w in WINDOWS) + " |")


if __name__ == "__main__":
    main()
