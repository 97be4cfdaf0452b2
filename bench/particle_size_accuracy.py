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

Usage: ``.venv/bin/python bench/particle_size_accuracy.py [--presets tiny small typical hard] [--samples 5] [--seed 5000]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ps3d_core.errors import ScanError
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
    args = parser.parse_args()

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
    print(f"| preset | scans | min error | max error | median error | mean abs error | within ±{TOLERANCE:.0%} | estimate s (median / max) |")
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
