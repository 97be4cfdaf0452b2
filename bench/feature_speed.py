"""Speed and memory of per-particle features (``ps3d_core.features``).

Volumes: a grid of cubic cells of ``cell`` voxels, one randomly oriented
ellipsoid per cell (semi-axes: a from 5 to 9.5 voxels, b = a x U(0.6, 1),
c = b x U(0.6, 1); centre jittered; at least one voxel between
particles), labels in a random order. The uint16 image: epoxy at 10,000,
particles at 25,000, 40 % of them with a dense half at 45,000, Gaussian
noise (sigma 500 in epoxy, 800 in particles). Volumes are written as zarr
(128^3 chunks, like ``labels.ome.zarr`` of ``ps3d segment``) one 128-slice
slab at a time, so generating a 1024^3 volume needs about 1 GB.

Commands (each prints JSON lines)::

    # (a) 10^5 particles in 1024^3: write the volumes, then measure in a fresh process
    .venv/bin/python bench/feature_speed.py generate --size 1024 --work /tmp/ps3d-feature-bench
    .venv/bin/python bench/feature_speed.py scale --work /tmp/ps3d-feature-bench --workers 2

    # (b) against skimage.measure.regionprops_table on the columns both compute
    .venv/bin/python bench/feature_speed.py regionprops --size 256 --subset 200

    # (c) pass 2 with processes or threads
    .venv/bin/python bench/feature_speed.py parallel --size 320 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

from ps3d_core.features import extract_features, measure_crop, principal_axes, single_threaded_blas, stream_stats
from ps3d_core.features.extract import _intensity_moments, crop_batches, default_slab_depth, measure_crops
from ps3d_core.io import ArrayVolume, open_volume

SPACING = (0.01, 0.01, 0.01)
PHASES = {"light": (0.0, 35000.0), "dense": (35000.0, 65536.0)}
CHUNK = 128


def cell_parameters(n_cells: int, cell: int, seed: int) -> dict[str, np.ndarray]:
    """Per cell (flattened z, y, x): label, centre (voxels), quadratic form Q, dense-half normal."""
    rng = np.random.default_rng(seed)
    count = n_cells**3
    a = rng.uniform(5.0, 9.5, count)
    b = a * rng.uniform(0.6, 1.0, count)
    c = b * rng.uniform(0.6, 1.0, count)
    rotation = np.linalg.qr(rng.normal(size=(count, 3, 3)))[0]
    inverse_squares = np.stack([1 / a**2, 1 / b**2, 1 / c**2], axis=1)
    quadratic = np.einsum("nij,nj,nkj->nik", rotation, inverse_squares, rotation)
    slack = np.maximum(cell / 2 - a - 0.5, 0.0)
    grid = np.stack(np.meshgrid(*[np.arange(n_cells)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    centre = grid * cell + cell / 2 + rng.uniform(-1, 1, (count, 3)) * slack[:, None]
    labels = rng.permutation(count).astype(np.uint32) + 1
    dense = rng.random(count) < 0.4
    return {"label": labels, "centre": centre, "quadratic": quadratic, "axis": rotation[:, :, 0], "dense": dense}


def render_slice(z: int, size: int, cell: int, n_cells: int, params: dict, rng: np.random.Generator):
    """Labels (uint32) and image (uint16) of slice z."""
    labels = np.zeros((size, size), np.uint32)
    image = rng.normal(10000, 500, (size, size))
    cz = z // cell
    if cz < n_cells:
        yy, xx = np.mgrid[0:size, 0:size]
        inside_grid = (yy < n_cells * cell) & (xx < n_cells * cell)
        cell_index = cz * n_cells**2 + (yy // cell).clip(0, n_cells - 1) * n_cells + (xx // cell).clip(0, n_cells - 1)
        centre = params["centre"][cell_index]
        d = np.stack([z - centre[..., 0], yy - centre[..., 1], xx - centre[..., 2]], axis=-1)
        q = params["quadratic"][cell_index]
        inside = (np.einsum("...i,...ij,...j->...", d, q, d) <= 1.0) & inside_grid
        labels[inside] = params["label"][cell_index[inside]]
        upper = np.einsum("...i,...i->...", d, params["axis"][cell_index]) > 0
        dense_half = inside & params["dense"][cell_index] & upper
        image[inside] = rng.normal(25000, 800, int(inside.sum()))
        image[dense_half] = rng.normal(45000, 800, int(dense_half.sum()))
    return labels, image.clip(0, 65535).astype(np.uint16)


def make_arrays(size: int, cell: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The labels and image in memory (small sizes)."""
    n_cells = size // cell
    params = cell_parameters(n_cells, cell, seed)
    rng = np.random.default_rng(seed + 1)
    slices = [render_slice(z, size, cell, n_cells, params, rng) for z in range(size)]
    return np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices])


def generate(work: Path, size: int, cell: int, seed: int) -> dict:
    """Write labels.zarr and image.zarr slab by slab."""
    n_cells = size // cell
    params = cell_parameters(n_cells, cell, seed)
    rng = np.random.default_rng(seed + 1)
    work.mkdir(parents=True, exist_ok=True)
    chunks = (CHUNK, min(CHUNK, size), min(CHUNK, size))
    labels = zarr.create_array(store=str(work / "labels.zarr"), shape=(size,) * 3, chunks=chunks, dtype=np.uint32,
                               overwrite=True)  # fmt: skip
    image = zarr.create_array(store=str(work / "image.zarr"), shape=(size,) * 3, chunks=chunks, dtype=np.uint16,
                              overwrite=True)  # fmt: skip
    started = time.perf_counter()
    for z0 in range(0, size, CHUNK):
        slices = [render_slice(z, size, cell, n_cells, params, rng) for z in range(z0, min(z0 + CHUNK, size))]
        labels[z0 : z0 + len(slices)] = np.stack([s[0] for s in slices])
        image[z0 : z0 + len(slices)] = np.stack([s[1] for s in slices])
    seconds = round(time.perf_counter() - started, 1)
    return {"generated": str(work), "size": size, "particles": n_cells**3, "seconds": seconds}


class MemoryMonitor:
    """Samples the RSS of this process and its children (the pass-2 workers) every 0.2 s.

    ``ru_maxrss`` of the children is no use here: a spawned worker is forked
    before it executes a fresh interpreter, so its peak counts the parent's
    pages shared at that instant.
    """

    def __init__(self) -> None:
        self.peak_total = self.peak_worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            try:
                workers = [child.memory_info().rss for child in me.children(recursive=True)]
            except psutil.Error:
                continue
            self.peak_worker = max([self.peak_worker, *workers])
            self.peak_total = max(self.peak_total, me.memory_info().rss + sum(workers))

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "peak_rss_main_mb": round(own),
            "peak_rss_worker_mb": round(self.peak_worker / 2**20),
            "peak_rss_main_plus_workers_mb": round(self.peak_total / 2**20),
        }


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}


def scale(work: Path, workers: int, parallel: str, slab_depth: int | None) -> dict:
    """(a) The whole table of the generated volume, phases found automatically."""
    labels, image = open_volume(work / "labels.zarr"), open_volume(work / "image.zarr")
    load_before = os.getloadavg()
    started = time.perf_counter()
    cpu = time.process_time()
    with MemoryMonitor() as memory:
        result = extract_features(labels, image, SPACING, "bench", "bench-run", None, workers=workers,
                                  parallel=parallel, slab_depth=slab_depth)  # fmt: skip
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu
    table = result.table
    return {
        "bench": "scale",
        **machine(),
        "shape": list(labels.shape),
        "particles": table.num_rows,
        "mean_voxels": round(float(np.mean(table.column("voxel_count").to_numpy())), 1),
        "foreground": round(float(np.sum(table.column("voxel_count").to_numpy())) / np.prod(labels.shape), 3),
        "workers": workers,
        "parallel": parallel,
        "slab_depth": slab_depth or default_slab_depth(labels.shape),
        "seconds_total": round(total, 1),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "pass2_ms_per_particle_wall": round(1000 * result.seconds["pass2"] / table.num_rows, 2),
        "phases": result.phases,
        "phases_method": result.phases_method,
        "binary_surface_fallbacks": result.smoothed_surface_fallbacks,
        "cpu_seconds_main": round(cpu, 1),
        "cpu_seconds_workers": round(children_cpu_seconds(), 1),
        **memory.report(),
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
    }


def best_of(repeats: int, function):
    best, value = np.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - started)
    return best, value


def regionprops(size: int, cell: int, subset: int, repeats: int) -> list[dict]:
    """(b) Against skimage.measure.regionprops_table on the columns both compute."""
    from skimage.measure import regionprops as skimage_regionprops
    from skimage.measure import regionprops_table

    labels, image = make_arrays(size, cell)
    properties = ("label", "area", "bbox", "centroid", "axis_major_length", "axis_minor_length",
                  "intensity_mean", "intensity_min", "intensity_max")  # fmt: skip

    def ours():
        stats = stream_stats(ArrayVolume(labels, "labels", None), ArrayVolume(image, "image", None), [],
                             default_slab_depth(labels.shape))  # fmt: skip
        axes = principal_axes(stats, SPACING)
        mean, _ = _intensity_moments(stats)
        volume = stats.count * np.prod(SPACING)
        centroid = stats.first / stats.count[:, None] * np.array(SPACING)
        return stats, axes, mean, volume, centroid

    ours_s, (stats, axes, mean, volume, centroid) = best_of(repeats, ours)
    theirs_s, table = best_of(repeats, lambda: regionprops_table(labels, image, properties=properties, spacing=SPACING))
    order = np.argsort(table["label"])
    agree = {
        "area": bool(np.allclose(table["area"][order], volume, rtol=1e-12)),
        "centroid": bool(
            np.allclose(np.stack([table[f"centroid-{k}"][order] for k in range(3)], 1), centroid, rtol=1e-12)
        ),
        "bbox": bool(np.array_equal(np.stack([table[f"bbox-{k}"][order] for k in range(6)], 1),
                                    np.concatenate([stats.bbox_min, stats.bbox_max], 1))),  # fmt: skip
        "intensity_mean": bool(np.allclose(table["intensity_mean"][order], mean, rtol=1e-12)),
        "intensity_min_max": bool(np.array_equal(table["intensity_min"][order], stats.intensity_min)
                                  and np.array_equal(table["intensity_max"][order], stats.intensity_max)),  # fmt: skip
        # skimage: 4 sqrt(lambda) of the voxel centres; ours: 2 sqrt(5 lambda) with the voxel's own variance
        "axis_major_ratio_median": round(float(np.median(axes[:, 0] / table["axis_major_length"][order])), 4),
    }
    rows = [{
        "bench": "regionprops_table",
        **machine(),
        "shape": list(labels.shape),
        "particles": len(stats),
        "columns": list(properties),
        "ours_s": round(ours_s, 3),
        "skimage_s": round(theirs_s, 3),
        "speedup": round(theirs_s / ours_s, 1),
        "agree": agree,
    }]  # fmt: skip

    # per-particle loop columns on a subset: skimage solidity + max Feret against our whole pass 2
    pick = np.zeros(int(labels.max()) + 1, bool)
    pick[np.random.default_rng(0).choice(np.arange(1, len(pick)), subset, replace=False)] = True
    sub_labels = np.where(pick[labels], labels, 0)
    regions = skimage_regionprops(sub_labels, spacing=SPACING)
    theirs_s, _ = best_of(1, lambda: [(r.solidity, r.feret_diameter_max) for r in regions])
    sub_volume = ArrayVolume(sub_labels, "labels", None)
    sub_stats = stream_stats(sub_volume, ArrayVolume(image, "image", None), [], default_slab_depth(labels.shape))
    image_volume = ArrayVolume(image, "image", None)
    crops = [c for _, batch in crop_batches(sub_volume, image_volume, sub_stats, 64) for c in batch]
    with single_threaded_blas():
        ours_s, _ = best_of(1, lambda: [measure_crop(mask, grey, SPACING, None) for mask, grey in crops])
    rows.append({
        "bench": "regionprops solidity + feret_diameter_max vs pass 2 (area, hull, both Ferets, percentiles)",
        "particles": subset,
        "ours_ms_per_particle": round(1000 * ours_s / subset, 2),
        "skimage_ms_per_particle": round(1000 * theirs_s / subset, 2),
        "speedup": round(theirs_s / ours_s, 1),
    })  # fmt: skip
    return rows


def parallel(size: int, cell: int, workers: int) -> list[dict]:
    """(c) Pass 2 serial, with processes and with threads."""
    labels, image = make_arrays(size, cell)
    lv, iv = ArrayVolume(labels, "labels", None), ArrayVolume(image, "image", None)
    stats = stream_stats(lv, iv, [], default_slab_depth(labels.shape))
    rows = []
    for mode, n in (("serial", 1), ("process", workers), ("thread", workers), ("process", workers), ("thread", workers)):
        load = os.getloadavg()[0]
        cpu, children = time.process_time(), children_cpu_seconds()
        seconds, _ = best_of(1, lambda: measure_crops(lv, iv, stats, SPACING, None, default_slab_depth(labels.shape),
                                                      n, "thread" if mode == "thread" else "process"))  # fmt: skip
        rows.append({"bench": "pass 2", "mode": mode, "workers": n, "particles": len(stats),
                     "seconds": round(seconds, 1), "ms_per_particle": round(1000 * seconds / len(stats), 2),
                     "cpu_seconds": round(time.process_time() - cpu + children_cpu_seconds() - children, 1),
                     "load_average_1min_before": round(load, 1)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["generate", "scale", "regionprops", "parallel"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cell", type=int, default=21, help="Cell edge in voxels: (size // cell)^3 particles.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ps3d-feature-bench"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parallel", choices=["process", "thread"], default="process")
    parser.add_argument("--slab-depth", type=int, default=None)
    parser.add_argument("--subset", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.command == "generate":
        rows = [generate(args.work, args.size, args.cell, args.seed)]
    elif args.command == "scale":
        rows = [scale(args.work, args.workers, args.parallel, args.slab_depth)]
    elif args.command == "regionprops":
        rows = regionprops(args.size, args.cell, args.subset, args.repeats)
    else:
        rows = parallel(args.size, args.cell, args.workers)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
