"""Speed of the particle database: storing samples and cross-sample size-distribution queries.

Generates ``--samples`` particle tables of ``--rows`` rows each (default
100 x 10^5 = 10^7 particles; sizes from integer voxel counts of lognormal
diameters, so equal sizes occur as in real scans; three different phase sets
across samples), stores them with ``ps3d_core.catalog.store_sample`` (timing
each store), then times queries through ``ps3d_core.catalog.query`` (each
call opens a fresh safe read-only connection, creates the views and runs the
SQL: what ``ps3d sql`` does). Every query runs once cold (first after the
stores) and ``--repeat`` times warm; the median and the range are reported.
Finally the same D-value query is timed while another process re-stores
samples in a loop, to show that readers are not held up by a writer.

Prints a Markdown report on stdout (machine, commands, tables).

Usage: ``.venv/bin/python bench/query_speed.py [--samples 100] [--rows 100000] [--home DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ps3d_core import catalog  # noqa: E402
from ps3d_core.synth.particle_tables import random_particle_table  # noqa: E402
from schemas.scan import ScanMetadata  # noqa: E402

SPACING_MM = 0.01
PHASE_SETS = (("ore", "gangue"), ("pyrite",), ("ore", "gangue", "pyrite"))
RANGES = {"ore": (20000.0, 65535.0), "gangue": (5000.0, 20000.0), "pyrite": (30000.0, 65535.0)}


def particles(sample_id: str, n: int, phases: tuple[str, ...], seed: int) -> pa.Table:
    """A valid particle table with plausible values; each sample its own median size."""
    median = np.random.default_rng(seed).uniform(12, 30)
    return random_particle_table(
        sample_id, n, phases, seed=seed, spacing_mm=SPACING_MM, median_diameter_voxels=median, sigma_ln=0.45,
        border_share=0.08, run_id=f"bench-{sample_id}",
    )


def store(home: Path, index: int, rows: int, seed: int) -> float:
    sample_id = f"s{index:03d}"
    phases = PHASE_SETS[index % len(PHASE_SETS)]
    table = particles(sample_id, rows, phases, seed)
    metadata = ScanMetadata(sample_id=sample_id, spacing_mm=SPACING_MM, stream=("feed", "concentrate", "tailings")[index % 3],
                            phases={p: RANGES[p] for p in phases})  # fmt: skip
    run = {"run_id": f"bench-{sample_id}", "started_at": datetime.now(), "status": "succeeded"}
    started = time.perf_counter()
    catalog.store_sample(home, metadata, table, run, phases=metadata.phases, phases_source="scan.json",
                         particle_size_mm=0.2, particle_size_source="estimated", model_name="bench", model_version="0")  # fmt: skip
    return time.perf_counter() - started


QUERIES = {
    "D10/D50/D80 by volume and number, all samples (`d_values` view: exact, two passes)":
        "SELECT * FROM d_values",
    "D10/D50/D80 by volume, all samples, stored at ingest (`samples` columns)":
        "SELECT sample_id, d10_volume_mm, d50_volume_mm, d80_volume_mm FROM samples",
    "D10/D50/D80 by number, all samples (`quantile_cont`, no window)":
        "SELECT sample_id, quantile_cont(esd_mm, [0.1, 0.5, 0.8]) AS d FROM particles "
        "WHERE touches_border IS NOT TRUE GROUP BY sample_id",
    "PSD curves of 3 samples (`psd` view, all points)":
        "SELECT * FROM psd WHERE sample_id IN ('s000', 's001', 's002')",
    "PSD curves of all samples (`psd` view, aggregated to one row per sample)":
        "SELECT sample_id, count(*) AS points, max(passing_volume_pct) AS top FROM psd GROUP BY sample_id",
    "Size classes with phase grades, all samples (`size_classes` view)":
        "SELECT * FROM size_classes",
    "Particle count (`particles` view)":
        "SELECT count(*) FROM particles",
}  # fmt: skip


def cpu_seconds() -> float:
    """CPU time of this process, all threads (DuckDB's included): user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(home: Path, sql: str, repeat: int) -> tuple[float, list[float], list[float], int]:
    """Cold wall seconds, warm wall seconds and warm CPU seconds of ``repeat`` runs, rows returned."""
    cold_started = time.perf_counter()
    result = catalog.query(home, sql, limit=None, timeout_s=600)
    cold = time.perf_counter() - cold_started
    warm, cpu = [], []
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), cpu_seconds()
        catalog.query(home, sql, limit=None, timeout_s=600)
        warm.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_started)
    return cold, warm, cpu, result.table.num_rows


WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from bench.query_speed import store
home, until, rows = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[4])
i = 0
while time.time() < until:
    store(home, i % 5, rows, 10_000 + i)
    i += 1
print(i)
"""


RACE_SWAPPER = """
import os, shutil, sys, time
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, sys.argv[4])
from ps3d_core.catalog._common import swap_directories
root, seconds, unique = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "unique"
rng = np.random.default_rng(0)
def write(folder, n, columns, name):
    os.makedirs(folder, exist_ok=True)
    table = pa.table({"n": np.full(n, n), "x": rng.random(n), **{c: rng.random(n) for c in columns}})
    pq.write_table(table, f"{folder}/{name}.parquet", compression="zstd")
for s in range(3):
    write(f"{root}/p/sample_id=s{s}", 100, ["a"], "part-0")
open(f"{root}/ready", "w").close()
i, started = 0, time.time()
while time.time() - started < seconds:
    s, n = i % 3, 50 + (i * 37) % 500
    staged = f"{root}/staging{i}/sample_id=s{s}"
    write(staged, n, ["a"] if i % 2 else ["b", "c"], f"part-{i}" if unique else "part-0")
    swap_directories(Path(staged), Path(f"{root}/p/sample_id=s{s}"))
    shutil.rmtree(f"{root}/staging{i}")
    i += 1
open(f"{root}/done", "w").close()
print(i)
"""


def race(seconds: float) -> None:
    """Queries racing a tight loop of partition swaps: a fixed file name against a new name per version.

    Each file holds n rows whose column n equals n, so a query that mixes two
    versions of a file shows count != n. Plain DuckDB, no catalog: this is the
    measurement behind the catalog's file naming.
    """
    print("| file name per version | swaps | queries | wrong results, no error | errors |")
    print("|---|---:|---:|---:|---|")
    for mode in ("fixed", "unique"):
        root = Path(tempfile.mkdtemp(prefix="ps3d-race-"))
        try:
            swapper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACE_SWAPPER), str(root), str(seconds),
                                        mode, str(ROOT)], stdout=subprocess.PIPE, text=True)  # fmt: skip
            while not (root / "ready").exists():
                time.sleep(0.01)
            queries = wrong = 0
            errors: dict[str, int] = {}
            while not (root / "done").exists():
                connection = duckdb.connect()
                try:
                    rows = connection.sql(
                        f"SELECT sample_id, count(*), min(n), max(n) FROM read_parquet('{root}/p/sample_id=*/*.parquet', "
                        "hive_partitioning = true, union_by_name = true) GROUP BY ALL"
                    ).fetchall()
                    wrong += any(not (count == low == high) for _, count, low, high in rows)
                    queries += 1
                except duckdb.Error as error:
                    kind = str(error).split(":")[0] + ": " + str(error).split(":")[1].strip()[:40]
                    errors[kind] = errors.get(kind, 0) + 1
                finally:
                    connection.close()
            swaps = swapper.communicate()[0].strip()
            described = "; ".join(f"{count} x {kind}" for kind, count in errors.items()) or "0"
            print(f"| {'part-0.parquet (fixed)' if mode == 'fixed' else 'part-<version>.parquet'} | {swaps} | "
                  f"{queries + sum(errors.values())} | {wrong} | {described} |")  # fmt: skip
        finally:
            shutil.rmtree(root, ignore_errors=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM; Python {platform.python_version()}, "
            f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rows", type=int, default=100_000, help="particles per sample")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the home afterwards")
    parser.add_argument("--concurrent-seconds", type=float, default=20.0)
    parser.add_argument("--queries-only", action="store_true", help="reuse the samples already in --home")
    parser.add_argument("--race-seconds", type=float, default=0.0,
                        help="only measure queries racing partition swaps, for this many seconds per file naming")  # fmt: skip
    args = parser.parse_args()
    if args.race_seconds:
        print(f"Machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}\n")
        race(args.race_seconds)
        return

    home = args.home or Path(tempfile.mkdtemp(prefix="ps3d-bench-"))
    if not args.queries_only and home.exists() and any(home.iterdir()):
        sys.exit(f"{home} is not empty (use --queries-only to reuse it)")
    print(f"Machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}\n")
    try:
        if not args.queries_only:
            seconds = [store(home, i, args.rows, i) for i in range(args.samples)]
            size = sum(p.stat().st_size for p in (home / "particles").rglob("*.parquet"))
            print(f"Stored {args.samples} samples x {args.rows:,} particles = {args.samples * args.rows:,} rows; "
                  f"Parquet {size / 2**20:,.0f} MiB ({size / (args.samples * args.rows):.0f} B/particle)\n")  # fmt: skip
            print("| store_sample, one sample | median s | p90 s | max s | total s |")
            print("|---|---:|---:|---:|---:|")
            ordered = sorted(seconds)
            print(f"| {args.rows:,} particles | {statistics.median(seconds):.3f} "
                  f"| {ordered[int(0.9 * len(ordered)) - 1]:.3f} | {max(seconds):.3f} | {sum(seconds):.1f} |\n")  # fmt: skip

        connect = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            catalog.connect_readonly(home).close()
            connect.append(time.perf_counter() - started)
        print(f"Opening a safe read-only connection with its views (included in every query below): "
              f"median {statistics.median(connect):.3f} s\n")  # fmt: skip

        print(f"| query | rows out | cold s | warm median s (min-max of {args.repeat}) | warm CPU s, median |")
        print("|---|---:|---:|---:|---:|")
        for name, sql in QUERIES.items():
            cold, warm, cpu, n = timed(home, sql, args.repeat)
            print(f"| {name} | {n} | {cold:.3f} | {statistics.median(warm):.3f} ({min(warm):.3f}-{max(warm):.3f}) "
                  f"| {statistics.median(cpu):.3f} |")  # fmt: skip

        until = time.time() + args.concurrent_seconds
        writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(home), str(until), str(ROOT),
                                   str(args.rows)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        during, errors = [], 0
        time.sleep(1.0)
        while time.time() < until:
            started = time.perf_counter()
            try:
                catalog.query(home, "SELECT * FROM d_values", limit=None, timeout_s=600)
                during.append(time.perf_counter() - started)
            except catalog.CatalogError:
                errors += 1
        out, err = writer.communicate()
        if writer.returncode != 0:
            sys.exit(err)
        print(f"\nWhile another process re-stored samples ({out.strip()} stores of {args.rows:,} particles in "
              f"{args.concurrent_seconds:.0f} s): `SELECT * FROM d_values` ran {len(during)} times, median "
              f"{statistics.median(during):.3f} s, max {max(during):.3f} s, {errors} errors.")  # fmt: skip
        catalog_size = (home / "ps3d.duckdb").stat().st_size
        print(f"\nCatalog ps3d.duckdb (copied to the snapshot on every write): {catalog_size / 2**20:.1f} MiB. "
              f"Load average at end {os.getloadavg()[0]:.1f}")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
