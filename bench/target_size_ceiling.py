"""What the target particle size costs in accuracy and in inference work, before any training.

For each synthetic scan and target size T, the exact ground truth goes the
way a perfect network's output would: labels resampled to the model grid
(nearest, mean particle = T voxels), border-core with thickness 3, border-core
-> instances (small-core filter as in inference), labels resampled back, tiny
particles removed (0.005 x mean volume), scored against the truth with the
paper's metrics. The result is the accuracy ceiling of the representation at
T; the model-grid voxel count is the inference work (it grows with T^3).

    .venv/bin/python bench/target_size_ceiling.py --preset small --samples 4 --seed 7000 --sizes 16 24 32 48 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ps3d_core.bordercore import border_core_to_instances, instances_to_border_core
from ps3d_core.inference.geometry import resample_nearest, target_shape, zoom_factors
from ps3d_core.metrics import evaluate
from ps3d_core.synth import synthesize

KEYS = ("f1", "f1_match", "f1_instance", "merger_ratio", "splitter_ratio")


def round_trip(labels: np.ndarray, spacing, size_mm: float, target: float) -> tuple[np.ndarray, int]:
    shape = target_shape(labels.shape, zoom_factors(spacing, size_mm, target))
    model_grid = resample_nearest(labels, shape)
    instances = border_core_to_instances(instances_to_border_core(model_grid, 3))
    back = resample_nearest(instances, labels.shape)
    ids, counts = np.unique(back[back > 0], return_counts=True)
    if ids.size:
        small = ids[counts < 0.005 * counts.mean()]
        back[np.isin(back, small)] = 0
    return back, int(np.prod(shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--sizes", type=float, nargs="+", default=[16, 24, 32, 48, 60])
    args = parser.parse_args()
    rows = {t: [] for t in args.sizes}
    work = {t: 0 for t in args.sizes}
    source = 0
    for i in range(args.samples):
        scan = synthesize(args.preset, args.seed + i, workers=1)
        meta = scan.metadata
        source += scan.labels.size
        for t in args.sizes:
            t0 = time.perf_counter()
            back, voxels = round_trip(scan.labels, meta.spacing_zyx_mm, meta.particle_size_mm, t)
            rows[t].append(evaluate(back, scan.labels))
            work[t] += voxels
            print(f"seed {args.seed + i} T={t:g}: F1_instance {rows[t][-1]['f1_instance']:.3f} ({time.perf_counter() - t0:.1f} s)")
    print(f"\n| target size (voxels) | model-grid voxels / source voxels | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for t in args.sizes:
        means = [np.mean([r[k] for r in rows[t]]) for k in KEYS]
        print(f"| {t:g} | {work[t] / source:.2f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
