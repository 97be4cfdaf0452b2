"""How fast the dashboard's charts get their data on a large database.

Builds (or reuses with ``--home``) the query benchmark's database, 100
samples of 10^5 particles each (``bench/query_speed.py``'s tables, stored with
``ps3d_core.catalog.store_sample``), then times every query of
``dashboards/queries.py`` that a page runs, on a fresh read-only connection
(``catalog.connect_readonly``), for 3 selected samples and for all 100. The
app caches query results until the next write, so these are the cold times a
user waits after an ingestion.

Usage: ``.venv/bin/python bench/dashboard_queries.py [--samples 100] [--rows 100000] [--home DIR]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dashboards import queries  # noqa: E402
from ps3d_core import catalog  # noqa: E402
from query_speed import store  # noqa: E402

#: (page, query, call) for every chart query; ``ids`` are the selected samples.
CHARTS = [
    ("Overview", "samples", lambda c, ids: queries.samples(c)),
    ("Overview", "quality", lambda c, ids: queries.quality(c, ids)),
    ("Size", "psd_curves", lambda c, ids: queries.psd_curves(c, ids)),
    ("Size", "d_values", lambda c, ids: queries.d_values(c, ids)),
    ("Size", "size_classes", lambda c, ids: queries.size_classes(c, ids)),
    ("Shape", "shape_box_stats", lambda c, ids: queries.shape_box_stats(c, ids)),
    ("Shape", "zingg_hexbins", lambda c, ids: queries.zingg_hexbins(c, ids)),
    ("Shape", "size_sphericity_density", lambda c, ids: queries.size_sphericity_density(c, ids)),
    ("Composition", "modal_mineralogy", lambda c, ids: queries.modal_mineralogy(c, ids)),
    ("Composition", "grade_by_size", lambda c, ids: queries.grade_by_size(c, ids, "ore")),
    ("Composition", "liberation_spectrum", lambda c, ids: queries.liberation_spectrum(c, ids, "ore")),
    ("Composition", "liberation_yield", lambda c, ids: queries.liberation_yield(c, ids, "ore")),
    ("Process", "product_classes", lambda c, ids: queries.product_classes(c, ids, "ore")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rows", type=int, default=100_000, help="particles per sample")
    parser.add_argument("--home", type=Path, default=None, help="reuse this home when it holds the samples")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="ps3d-dashboard-bench-"))
    started = time.perf_counter()
    for index in range(args.samples):
        if catalog.get_sample(home, f"s{index:03d}") is None:
            store(home, index, args.rows, seed=index)
    print(f"database: {args.samples} samples x {args.rows} particles in {home} ({time.perf_counter() - started:.0f} s)")
    all_ids = [f"s{index:03d}" for index in range(args.samples)]
    selections = {"3 samples": all_ids[:3], f"all {args.samples}": all_ids}
    print("| page | query | " + " | ".join(f"{name}, s" for name in selections) + " |")
    print("|---|---|" + "---:|" * len(selections))
    for page, name, call in CHARTS:
        cells = []
        for ids in selections.values():
            with catalog.connect_readonly(home) as connection:
                t0 = time.perf_counter()
                call(connection, ids)
                cells.append(f"{time.perf_counter() - t0:.2f}")
        print(f"| {page} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
