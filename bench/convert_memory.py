"""Peak memory of the streamed conversion (``ps3d convert``) does not grow with the scan.

For each size, writes a synthetic uint16 scan as a multi-page TIFF one page at
a time (the scan is never held in memory), converts it to OME-Zarr
(128^3 chunks, pyramid included) in a fresh Python process, and records that
process's peak RSS, its RSS after the imports, the time and the throughput.
Prints a Markdown table.

Usage: ``.venv/bin/python bench/convert_memory.py [--sizes 256x512x512 1024x512x512 ...] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

DEFAULT_SIZES = ("256x512x512", "512x512x512", "1024x512x512", "2048x512x512")
SPACING_MM = (0.01, 0.01, 0.01)
MB = 1e6


def synthetic_pages(shape: tuple[int, int, int], seed: int = 0) -> Iterator[np.ndarray]:
    """CT-like uint16 slices, one at a time: bright grains in a darker matrix, with noise."""
    _, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    for z in range(shape[0]):
        grains = np.sin(yy / 7 + z / 5) * np.cos(xx / 9 - z / 11) > 0.3
        yield (rng.normal(12_000, 300, (y, x)) + 20_000 * grains).astype(np.uint16)


def write_scan(path: Path, shape: tuple[int, int, int]) -> None:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(synthetic_pages(shape), shape=shape, dtype=np.uint16, photometric="minisblack")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # ru_maxrss is in KiB on Linux


def convert_in_this_process(tif: Path, out: Path) -> dict:
    """The child's work: convert, and report its own memory and time."""
    from ps3d_core.io import convert_to_ome_zarr, open_volume

    after_imports = peak_rss_mb()
    start = time.perf_counter()
    with open_volume(tif) as volume:
        convert_to_ome_zarr(volume, out, spacing_zyx_mm=SPACING_MM)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": after_imports}


def convert_in_fresh_process(tif: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(tif), str(out)], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(sizes: list[tuple[int, int, int]], workdir: Path) -> list[dict]:
    rows = []
    for shape in sizes:
        tif, out = workdir / "scan.tif", workdir / "scan.ome.zarr"
        write_scan(tif, shape)
        result = convert_in_fresh_process(tif, out)
        scan_mb = tif.stat().st_size / MB
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "scan_mb": scan_mb,
                "slab_mb": min(128, shape[0]) * shape[1] * shape[2] * 2 / MB,
                "ratio": scan_mb / (directory_bytes(out) / MB),
                "mb_per_s": scan_mb / result["seconds"],
                **result,
            }
        )
        tif.unlink()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| scan (z x y x x, uint16) | scan MB | slab MB | peak RSS MB | RSS after imports MB "
        "| seconds | MB/s | compression |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['scan_mb']:.0f} | {r['slab_mb']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['import_rss_mb']:.0f} | {r['seconds']:.1f} | {r['mb_per_s']:.0f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="ZxYxX voxels, e.g. 1024x512x512")
    parser.add_argument("--workdir", type=Path, help="where the scans are written (default: a temporary directory)")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("TIF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(convert_in_this_process(*args.child)))
        return
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        rows = run(sizes, Path(workdir))
    print(f"{os.cpu_count()} CPUs, chunks 128^3, zstd level 3, pyramid of up to 4 levels\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
