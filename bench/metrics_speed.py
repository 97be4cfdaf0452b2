"""Speed of ``ps3d_core.metrics.evaluate`` on a large, many-particle volume.

Builds a 512^3 reference with ~10^4 ball-shaped particles (one per 24^3
block, random radius and offset), derives a prediction from it with the
errors the metrics count (a 1-voxel shift everywhere, 5 % of particles merged
with a neighbour, 5 % split in two, a few hundred false-positive specks), then
times :func:`evaluate`. Prints one JSON line.

Usage: ``.venv/bin/python bench/metrics_speed.py [--size 512] [--block 24]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np

from ps3d_core.metrics import evaluate


def make_volumes(size: int, block: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label volumes, shape (size,)*3, uint32."""
    rng = np.random.default_rng(seed)
    n = size // block
    labels_per_axis = np.arange(n, dtype=np.int64)
    # Per-block ball centre (local coordinates) and radius, in voxels.
    radius = rng.uniform(0.25, 0.45, (n, n, n)) * block
    centre = block / 2 + rng.uniform(-1, 1, (n, n, n, 3)) * (block / 2 - radius[..., None]) * 0.9
    ref = np.zeros((size, size, size), dtype=np.uint32)
    local = np.arange(block) + 0.5
    zz, yy, xx = np.meshgrid(local, local, local, indexing="ij")
    ids = rng.permutation(n**3).reshape(n, n, n).astype(np.uint32) + 1  # non-sequential ids
    for bz in labels_per_axis:
        for by in labels_per_axis:
            for bx in labels_per_axis:
                c = centre[bz, by, bx]
                ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius[bz, by, bx] ** 2
                view = ref[bz * block : (bz + 1) * block, by * block : (by + 1) * block, bx * block : (bx + 1) * block]
                view[ball] = ids[bz, by, bx]
    pred = np.roll(ref, 1, axis=2)
    # Merge 5 % of particles into their x-neighbour's id (a merger when both
    # keep the majority of their voxels in the merged prediction).
    flat_ids = ids[:, :, :-1].ravel()
    merge = rng.choice(flat_ids.size, flat_ids.size // 20, replace=False)
    lut = np.arange(n**3 + 1, dtype=np.uint32)
    lut[ids[:, :, 1:].ravel()[merge]] = flat_ids[merge]
    pred = lut[pred]
    # Split 5 % of blocks in half along z with a fresh id.
    next_id = n**3 + 1
    for b in rng.choice(n**3, n**3 // 20, replace=False):
        bz, by, bx = np.unravel_index(b, (n, n, n))
        zc = int(bz * block + centre[bz, by, bx, 0])
        view = pred[zc : (bz + 1) * block, by * block : (by + 1) * block, bx * block : (bx + 1) * block]
        view[view != 0] = next_id
        next_id += 1
    # False-positive specks in the background.
    for _ in range(300):
        z, y, x = rng.integers(0, size - 3, 3)
        pred[z : z + 3, y : y + 3, x : x + 3] = next_id
        next_id += 1
    return pred, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--block", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    pred, ref = make_volumes(args.size, args.block)
    build = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = evaluate(pred, ref)
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "bench": "metrics_speed",
                "shape": list(ref.shape),
                "n_ref": result["n_ref"],
                "n_pred": result["n_pred"],
                "evaluate_s_best": round(min(times), 3),
                "evaluate_s_all": [round(t, 3) for t in times],
                "build_s": round(build, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                "result": {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
