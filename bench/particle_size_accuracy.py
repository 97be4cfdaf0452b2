"""Accuracy and speed of the particle-size estimate on synthetic scans.

For each preset, synthesizes scans of consecutive seeds (the stream cycles
through feed, concentrate, tailings and other, as ``ps3d synth`` does),
estimates the mean particle diameter from the image alone with
:func:`ps3d_core.particle_size.estimate_particle_size_mm`, and compares it
with the truth the generator used: ``scan.json``'s ``particle_size_mm``, the
number-mean equivalent diameter of the whole particles in the scan
(``whole_particle_diameter.mean_mm`` of the truth). Only the estimate is
timed, not the synthesis.

The default seeds (5000 and up) are used neither by the tests
(``tests/test_particle_size.py``: 3000 and up) nor by the development of the
method (2000-2019).

Prints one row per scan, then a summary per preset, as Markdown tables.

``--large Z Y X`` instead times the estimate on a scan of that shape (the
real ones are about 1000 x 1250 x 1250): a ``typical`` scan mirror-tiled to
that shape, served slab by slab by a lazy volume so that the benchmark itself
holds only the 256^3 tile; reports the seconds, the slices read and the peak
memory the estimate allocated (``tracemalloc``, which sees numpy's arrays).

Usage: ``.venv/bin/python bench/particle_size_accuracy.py [--presets tiny small typical hard] [--samples 5] [--seed 5000]``
or ``.venv/bin/python bench/particle_size_accuracy.py --large 1000 1250 1250 [--seed 5000]``
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ps3d_core.errors import ScanError
from ps3d_core.io.volumes import Volume
from ps3d_core.particle_size import estimate_particle_size_mm
from ps3d_core.synth import synthesize
from ps3d_core.synth.generator import STREAM_CYCLE

#: An estimate this close to the truth (relative error) is within the requirement.
TOLERANCE = 0.25


def measure(preset: str, seed: int, stream: str) -> dict:
    """Synthesize one scan and estimate its particle size; a row of the report."""
    scan = synthesize(preset, seed, stream=stream, workers=1)
    started = time.perf_counter()
    try:
        estimate = estimate_particle_size_mm(scan.image, scan.metadata.spacing_zyx_mm)
    except ScanError:
        estimate = float("nan")
    seconds = time.perf_counter() - started
    truth = scan.metadata.particle_size_mm
    return {
        "preset": preset,
        "seed": seed,
        "stream": stream,
        "particles": scan.truth["particle_count"],
        "voxel_mm": scan.metadata.spacing_zyx_mm[0],
        "truth_mm": truth,
        "estimate_mm": estimate,
        "error": estimate / truth - 1.0,
        "seconds": seconds,
    }


class MirroredVolume(Volume):
    """A 3D array mirror-tiled (reflected at its faces) to a larger shape, generated slab by slab."""

    def __init__(self, tile: np.ndarray, shape: tuple[int, int, int]) -> None:
        super().__init__(Path("mirrored"), shape, tile.dtype, None)
        self.tile = tile
        self.index = [_mirror_index(n, m) for n, m in zip(shape, tile.shape)]
        self.slices_read = 0

    def _read(self, z0: int, z1: int) -> np.ndarray:
        self.slices_read += z1 - z0
        z, y, x = self.index
        return self.tile[np.ix_(z[z0:z1], y, x)]


def _mirror_index(n: int, m: int) -> np.ndarray:
    """Indices 0..n-1 into an axis of length m, reflected at its ends (0 .. m-1, m-1 .. 0, ...)."""
    period = np.arange(n) % (2 * m)
    return np.where(period < m, period, 2 * m - 1 - period)


def time_large(shape: tuple[int, int, int], seed: int) -> None:
    """Estimate on a ``typical`` scan mirror-tiled to ``shape``; print seconds, slices read and peak memory."""
    scan = synthesize("typical", seed, workers=1)
    volume = MirroredVolume(scan.image, shape)
    tracemalloc.start()
    started = time.perf_counter()
    estimate = estimate_particle_size_mm(volume, scan.metadata.spacing_zyx_mm)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    truth = scan.metadata.particle_size_mm
    print("| scan (z x y x x, uint16) | scan GB | truth mm | estimate mm | error | seconds | slices read "
          "| peak MB allocated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {'x'.join(map(str, shape))} | {volume.nbytes / 1e9:.1f} | {truth:.3f} | {estimate:.3f} "
        f"| {estimate / truth - 1:+.1%} | {seconds:.1f} | {volume.slices_read} | {peak / 2**20:.0f} |"
    )


def summary(rows: list[dict]) -> dict:
    """Relative errors of one preset's rows: min, max, median, mean absolute, share within tolerance."""
    errors = np.array([r["error"] for r in rows])
    found = errors[np.isfinite(errors)]
    return {
        "scans": len(errors),
        "min": float(found.min()) if len(found) else float("nan"),
        "max": float(found.max()) if len(found) else float("nan"),
        "median": float(np.median(found)) if len(found) else float("nan"),
        "mean_abs": float(np.abs(found).mean()) if len(found) else float("nan"),
        "within": int((np.abs(found) <= TOLERANCE).sum()),
        "failed": int(len(errors) - len(found)),
        "seconds_max": max(r["seconds"] for r in rows),
        "seconds_median": float(np.median([r["seconds"] for r in rows])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "typical", "hard"])
    parser.add_argument("--samples", type=int, default=5, help="scans per preset")
    parser.add_argument("--seed", type=int, default=5000, help="first seed")
    parser.add_argument("--large", type=int, nargs=3, metavar=("Z", "Y", "X"), help="time one mirror-tiled scan")
    args = parser.parse_args()
    if args.large:
        time_large(tuple(args.large), args.seed)
        return

    print("| preset | seed | stream | particles | voxel µm | truth mm | estimate mm | error | estimate s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    by_preset: dict[str, list[dict]] = {}
    for preset in args.presets:
        for i in range(args.samples):
            row = measure(preset, args.seed + i, STREAM_CYCLE[i % len(STREAM_CYCLE)])
            by_preset.setdefault(preset, []).append(row)
            print(
                f"| {preset} | {row['seed']} | {row['stream']} | {row['particles']} | {row['voxel_mm'] * 1000:.1f} "
                f"| {row['truth_mm']:.3f} | {row['estimate_mm']:.3f} | {row['error']:+.1%} | {row['seconds']:.2f} |",
                flush=True,
            )
    print()
    print(
        f"| preset | scans | min error | max error | median error | mean abs error | within ±{TOLERANCE:.0%} "
        "| estimate s (median / max) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset, rows in by_preset.items():
        s = summary(rows)
        failed = f" ({s['failed']} without estimate)" if s["failed"] else ""
        print(
            f"| {preset} | {s['scans']} | {s['min']:+.1%} | {s['max']:+.1%} | {s['median']:+.1%} | {s['mean_abs']:.1%} "
            f"| {s['within']}/{s['scans']}{failed} | {s['seconds_median']:.2f} / {s['seconds_max']:.2f} |"
        )


if __name__ == "__main__":
    main()
