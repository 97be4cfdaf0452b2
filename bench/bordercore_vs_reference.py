"""Border-core conversions of this project vs the reference, ParticleSeg3D 0.2.16, side by side.

Compares ``ps3d_core.bordercore.instances_to_border_core`` and
``border_core_to_instances`` with the reference's
``particleseg3d.train.instance2border_core.instance2border_core`` and
``particleseg3d.inference.border_core2instance.border_core2instance`` on the
same synthetic 256^3 volumes (~1,000 particles, many touching): agreement
(border-core identical? particle count equal? share of foreground voxels in
matched particles? numbering equal to the reference's with its gaps
removed?) and speed (median of ``--repeat`` timed calls of the conversion
alone, in one run; the reference runs in a subprocess of its own virtualenv,
the volumes travel as .npy files).

The reference is never imported by the project. Build its virtualenv once
(no torch; GeodisTK does not build with numpy 2 and only serves a
non-default method, so an empty stub module stands in for it)::

    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install --no-deps particleseg3d==0.2.16
    /tmp/refenv/bin/pip install numpy-indexed 'zarr<3' acvl-utils \\
        connected-components-3d scikit-image numpy scipy tqdm
    touch /tmp/refenv/lib/python3.11/site-packages/GeodisTK.py

Then::

    .venv/bin/python bench/bordercore_vs_reference.py             # benchmark, markdown table on stdout
    .venv/bin/python bench/bordercore_vs_reference.py --fixtures  # rewrite tests/data/bordercore_reference.npz

Test volumes: ``packed_ellipsoids`` below (random ellipsoids, overlaps
resolved by the nearest normalised centre, so neighbours touch along curved
faces). ``ps3d_core.synth``'s "typical" preset was tried first but holds only
15-35 particles per 256^3 volume, too few for this comparison.

Thread counts: both sides run with the same environment (``OMP_NUM_THREADS``
etc. = ``--threads``) on the same CPUs; the reference is single-threaded
numpy/scipy. ``instances_to_border_core`` is timed with its distance
transform on 1 thread and on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ps3d_core.bordercore import border_core_to_instances, instances_to_border_core

REFENV = Path(os.environ.get("PS3D_REFENV", "/tmp/refenv"))
FIXTURES = ROOT / "tests" / "data" / "bordercore_reference.npz"

# Runs inside the reference virtualenv: reads jobs.npz, writes out.npz + timings as JSON on stdout.
_REFERENCE_RUNNER = textwrap.dedent(
    """
    import json, sys, time, warnings
    import numpy as np
    warnings.filterwarnings("ignore")
    from particleseg3d.train.instance2border_core import instance2border_core
    from particleseg3d.inference.border_core2instance import border_core2instance
    jobs = json.loads(sys.argv[1])
    tmp = sys.argv[2]
    out, times = {}, {}
    for job in jobs:
        arr = np.load(job["input"])
        ts = []
        for _ in range(job.get("repeat", 1)):
            t = time.perf_counter()
            if job["op"] == "i2bc":
                res = instance2border_core(arr, job["thickness"])
            else:
                res, _ = border_core2instance(arr, tmp + "/components.zarr", progressbar=False)
            ts.append(time.perf_counter() - t)
        np.save(job["output"], res)
        times[job["output"]] = ts
    print(json.dumps(times))
    """
)


def reference_python() -> Path:
    """The reference virtualenv's interpreter, or exit with instructions."""
    python = REFENV / "bin" / "python"
    if not python.exists():
        sys.exit(
            f"reference virtualenv not found at {REFENV} (set PS3D_REFENV to use another path).\n"
            "Build it as described at the top of bench/bordercore_vs_reference.py:\n"
            "  python3.11 -m venv /tmp/refenv\n"
            "  /tmp/refenv/bin/pip install --no-deps particleseg3d==0.2.16\n"
            "  /tmp/refenv/bin/pip install numpy-indexed 'zarr<3' acvl-utils connected-components-3d "
            "scikit-image numpy scipy tqdm\n"
            "  touch /tmp/refenv/lib/python3.11/site-packages/GeodisTK.py"
        )
    check = subprocess.run(
        [str(python), "-c", "import particleseg3d.inference.border_core2instance"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode:
        sys.exit(f"{python} cannot import the reference:\n{check.stderr.strip()}")
    return python


def run_reference(jobs: list[dict], env: dict) -> dict:
    """Run reference conversions in the reference virtualenv; returns output path -> timings."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [str(reference_python()), "-c", _REFERENCE_RUNNER, json.dumps(jobs), tmp],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if proc.returncode:
        sys.exit(f"reference run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# test volumes
# --------------------------------------------------------------------------


def packed_ellipsoids(shape=(256, 256, 256), n=1000, seed=0, rmin=7.0, rmax=13.0, overlap=0.75) -> np.ndarray:
    """Instance labels of ``n`` randomly oriented ellipsoids packed with contacts.

    Centres are drawn uniformly, rejecting those closer than ``overlap`` times
    the sum of mean radii to an earlier one; where ellipsoids overlap, a voxel
    goes to the ellipsoid with the smallest normalised radius
    ``|R^T (x - c) / r|``, so neighbours touch along curved faces.

    Returns
    -------
    ndarray, shape ``shape``, uint32
        Labels ``1..n`` (fewer if the volume is full), 0 background.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, np.uint32)
    score = np.full(shape, np.inf, np.float32)
    centres = np.zeros((0, 3))
    means = np.zeros(0)
    placed = []
    tries = 0
    while len(placed) < n and tries < 50 * n:
        tries += 1
        c = rng.uniform(0, shape)
        r = rng.uniform(rmin, rmax, 3)
        if centres.size and np.any(np.linalg.norm(centres - c, axis=1) < overlap * (means + r.mean())):
            continue
        placed.append((c, r))
        centres = np.vstack([centres, c])
        means = np.append(means, r.mean())
    for i, (c, r) in enumerate(placed, 1):
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        half = int(np.ceil(r.max())) + 1
        lo = np.maximum(np.floor(c).astype(int) - half, 0)
        hi = np.minimum(np.floor(c).astype(int) + half + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        p = np.stack([g - ci for g, ci in zip(grids, c)], -1) @ rot
        s = ((p / r) ** 2).sum(-1).astype(np.float32)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        win = (s <= 1) & (s < score[sl])
        score[sl][win] = s[win]
        labels[sl][win] = i
    return labels


def touching_share(labels: np.ndarray) -> float:
    """Share of particles with a 6-neighbour voxel of another particle."""
    touching = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        x, y = a[:-1], a[1:]
        m = (x != y) & (x != 0) & (y != 0)
        touching.update(np.unique(x[m]).tolist())
        touching.update(np.unique(y[m]).tolist())
    n = len(np.unique(labels)) - 1
    return len(touching) / n if n else 0.0


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Particle counts, share of foreground voxels in one-to-one matched particles, numbering check.

    Particles are matched when each holds the largest share of the other
    (mutual best overlap); agreeing voxels are the overlaps of matched pairs
    over the voxels that are foreground on either side.
    """
    fg = (ours != 0) | (ref != 0)
    a = ours[fg].astype(np.int64)
    b = ref[fg].astype(np.int64)
    nb = int(b.max()) + 1
    keys, counts = np.unique(a * nb + b, return_counts=True)
    pa, pb = keys // nb, keys % nb
    order = np.lexsort((-counts, pa))
    best_a = {}
    for x, y, c in zip(pa[order], pb[order], counts[order]):
        best_a.setdefault(x, (y, c))
    order = np.lexsort((-counts, pb))
    best_b = {}
    for x, y, c in zip(pa[order], pb[order], counts[order]):
        best_b.setdefault(y, (x, c))
    matched = sum(c for x, (y, c) in best_a.items() if x and y and best_b.get(y, (None,))[0] == x)
    compressed = _without_gaps(ref)
    return {
        "n_ours": int(len(np.unique(ours)) - 1),
        "n_ref": int(len(np.unique(ref)) - 1),
        "agree": matched / max(int(fg.sum()), 1),
        "same_numbering": bool(np.array_equal(compressed, ours)),
    }


def _without_gaps(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in the same order, 0 kept (the reference's numbering has gaps)."""
    ids = np.union1d([0], labels)
    return np.searchsorted(ids, labels).astype(np.uint32)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def benchmark(args) -> None:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(args.threads)
        os.environ[var] = str(args.threads)
    reference_python()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(args.volumes):
            t0 = time.perf_counter()
            labels = packed_ellipsoids((args.size,) * 3, n=args.particles, seed=v)
            gen_s = time.perf_counter() - t0
            lab_path = f"{tmp}/labels{v}.npy"
            np.save(lab_path, labels)
            # the reference converts its own border-core; it is also our input (identical anyway)
            ref_t = run_reference(
                [{"op": "i2bc", "input": lab_path, "output": f"{tmp}/ref_bc{v}.npy", "thickness": 3, "repeat": args.repeat}],
                env,
            )
            ref_bc = np.load(f"{tmp}/ref_bc{v}.npy")
            ref_t.update(
                run_reference(
                    [{"op": "bc2i", "input": f"{tmp}/ref_bc{v}.npy", "output": f"{tmp}/ref_inst{v}.npy", "repeat": args.repeat}],
                    env,
                )
            )
            ref_inst = np.load(f"{tmp}/ref_inst{v}.npy")
            ours_bc = instances_to_border_core(labels, 3)  # warm-up (page faults, imports)
            t_i2bc_1 = timed(lambda lab=labels: instances_to_border_core(lab, 3, parallel=1), args.repeat)
            t_i2bc_n = timed(lambda lab=labels: instances_to_border_core(lab, 3, parallel=args.threads), args.repeat)
            ours_inst = border_core_to_instances(ref_bc)
            t_bc2i = timed(lambda bc=ref_bc: border_core_to_instances(bc), args.repeat)
            agree = agreement(ours_inst, ref_inst)
            row = {
                "volume": v,
                "particles": int(len(np.unique(labels)) - 1),
                "touching": touching_share(labels),
                "foreground": float((labels != 0).mean()),
                "bc_identical": bool(np.array_equal(ours_bc, ref_bc)),
                "ref_i2bc": float(np.median(ref_t[f"{tmp}/ref_bc{v}.npy"])),
                "ours_i2bc_1": float(np.median(t_i2bc_1)),
                "ours_i2bc_n": float(np.median(t_i2bc_n)),
                "ref_bc2i": float(np.median(ref_t[f"{tmp}/ref_inst{v}.npy"])),
                "ours_bc2i": float(np.median(t_bc2i)),
                **agree,
            }
            rows.append(row)
            print(f"# volume {v}: generated in {gen_s:.1f} s; {json.dumps(row)}", file=sys.stderr, flush=True)
    print_table(rows, args)


def print_table(rows, args) -> None:
    n = args.threads
    print(f"Machine: {platform.processor() or platform.machine()}, {_cpu_model()}, "
          f"{len(os.sched_getaffinity(0))} CPUs available, Python {platform.python_version()}, numpy {np.__version__}")
    print(f"Command: `.venv/bin/python bench/bordercore_vs_reference.py --volumes {args.volumes} "
          f"--repeat {args.repeat} --threads {n}` (median of {args.repeat} timed calls)\n")
    print("| volume | particles (touching) | border-core identical | particles ours / ref | foreground voxels agreeing | "
          f"`instances_to_border_core` ref / ours 1 thread / ours {n} threads (speed-up) | "
          "`border_core_to_instances` ref / ours (speed-up) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['volume']} | {r['particles']} ({100 * r['touching']:.0f} %) | {'yes' if r['bc_identical'] else 'NO'} | "
            f"{r['n_ours']} / {r['n_ref']} | {100 * r['agree']:.3f} %{' (same numbering)' if r['same_numbering'] else ''} | "
            f"{r['ref_i2bc']:.2f} s / {r['ours_i2bc_1']:.3f} s / {r['ours_i2bc_n']:.3f} s "
            f"({r['ref_i2bc'] / r['ours_i2bc_1']:.1f}x / {r['ref_i2bc'] / r['ours_i2bc_n']:.1f}x) | "
            f"{r['ref_bc2i']:.2f} s / {r['ours_bc2i']:.3f} s ({r['ref_bc2i'] / r['ours_bc2i']:.1f}x) |"
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# --------------------------------------------------------------------------
# fixtures for tests/test_bordercore.py
# --------------------------------------------------------------------------


def handmade_border_cores() -> dict[str, np.ndarray]:
    """Small border-core volumes, each exercising one rule of the reference."""
    cases = {}
    # tie: border voxel x=5 is 4 steps from both cores -> the later core
    line = np.zeros((1, 1, 11), np.uint8)
    line[0, 0, :] = [1, 1, 2, 2, 2, 2, 2, 2, 2, 1, 1]
    cases["tie_line"] = line
    # two touching balls (border 2)
    zz, yy, xx = np.mgrid[:14, :14, :26]
    labels = np.zeros((14, 14, 26), np.uint32)
    labels[(zz - 7) ** 2 + (yy - 7) ** 2 + (xx - 7) ** 2 <= 30] = 1
    labels[(zz - 7) ** 2 + (yy - 7) ** 2 + (xx - 18) ** 2 <= 30] = 2
    cases["touching_balls"] = instances_to_border_core(labels, 2)
    # a 3-voxel plate, thickness 1: its core is a 1-voxel sheet, removed -> still one particle
    plate = np.zeros((7, 12, 12), np.uint32)
    plate[2:5, 1:11, 1:11] = 1
    cases["thin_plate_alone"] = instances_to_border_core(plate, 1)
    # the same plate touching a ball: its core is removed, the ball's core grows over it
    zz, yy, xx = np.mgrid[:16, :14, :24]
    both = np.zeros((16, 14, 24), np.uint32)
    both[5:8, 2:12, 1:11] = 1
    both[((zz - 7) ** 2 + (yy - 7) ** 2 + (xx - 16) ** 2 <= 30) & (both == 0)] = 2
    cases["thin_plate_touching"] = instances_to_border_core(both, 1)
    # a border-only component next to a normal particle
    bo = np.zeros((10, 10, 20), np.uint8)
    bo[2:8, 2:8, 2:8] = 2
    bo[2:8, 2:8, 11:18] = 2
    bo[4:6, 4:6, 13:16] = 1
    cases["border_only"] = bo
    # core = 1-voxel sheet + 5^3 cube: >= 95 % close to the border, but one voxel 3 deep -> kept
    ds = np.zeros((16, 34, 50), np.uint8)
    ds[1:15, 1:33, 1:49] = 2
    ds[4, 2:32, 2:32] = 1
    ds[5:10, 10:15, 10:15] = 1
    ds[4:11, 10:17, 38:45] = 1
    cases["deep_sheet"] = ds
    # core plate on the component's bounding-box face: the background beyond is not counted
    bp = np.zeros((12, 20, 30), np.uint8)
    bp[3:9, 2:18, 2:28] = 2
    bp[7:9, 4:16, 4:14] = 1
    bp[4:9, 6:13, 18:25] = 1
    cases["bbox_plate"] = bp
    # particles cut by the volume border
    zz, yy, xx = np.mgrid[:12, :12, :12]
    cut = np.zeros((12, 12, 12), np.uint32)
    cut[(zz - 1) ** 2 + (yy - 6) ** 2 + (xx - 1) ** 2 <= 40] = 1
    cut[((zz - 9) ** 2 + (yy - 6) ** 2 + (xx - 9) ** 2 <= 30) & (cut == 0)] = 2
    cases["volume_border"] = instances_to_border_core(cut, 2)
    return cases


def random_border_cores(n: int = 10) -> dict[str, np.ndarray]:
    """Random small border-core volumes of several kinds (noise, perturbed targets, thin shapes)."""
    import scipy.ndimage as ndi

    cases = {}
    for seed in range(n):
        rng = np.random.default_rng(2000 + seed)
        shape = tuple(int(s) for s in rng.integers(10, 22, 3))
        kind = seed % 5
        if kind == 0:  # sparse noise: many tiny cores, ties everywhere
            bc = rng.choice(3, size=shape, p=rng.dirichlet([8, 1, 2])).astype(np.uint8)
        elif kind == 1:  # training targets with flipped voxels
            lab = packed_ellipsoids(shape, n=int(np.prod(shape) / 500) + 3, seed=seed, rmin=2, rmax=6)
            bc = instances_to_border_core(lab, int(rng.integers(1, 4)))
            bc[(rng.random(shape) < 0.03) & (bc == 2)] = 1
            bc[(rng.random(shape) < 0.03) & (bc == 1)] = 2
        elif kind == 2:  # border partly missing: cores touch the background
            lab = packed_ellipsoids(shape, n=int(np.prod(shape) / 500) + 3, seed=seed, rmin=2, rmax=6)
            bc = instances_to_border_core(lab, int(rng.integers(1, 3)))
            bc[(rng.random(shape) < 0.4) & (bc == 2)] = 0
        elif kind == 3:  # smooth noise: thin, branching shapes
            f = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.7, 1.5))
            q = np.quantile(f, sorted(rng.uniform(0.4, 0.9, 2)))
            bc = np.where(f > q[1], 1, np.where(f > q[0], 2, 0)).astype(np.uint8)
        else:  # densely touching small particles, border 1
            lab = packed_ellipsoids(shape, n=int(np.prod(shape) / 300) + 3, seed=seed, rmin=2, rmax=5)
            bc = instances_to_border_core(lab, 1)
        cases[f"random{seed}"] = bc
    return cases


def label_volumes() -> dict[str, np.ndarray]:
    """Small instance volumes (touching particles, particles cut by the volume border)."""
    return {f"labels{s}": packed_ellipsoids((20, 24, 22), n=30, seed=300 + s, rmin=3, rmax=7) for s in range(3)}


def make_fixtures(args) -> None:
    """Run the reference on the fixture volumes and store inputs and outputs in tests/data."""
    bcs = {**handmade_border_cores(), **random_border_cores()}
    labs = label_volumes()
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, bc in bcs.items():
            np.save(f"{tmp}/{name}.npy", bc)
            jobs.append({"op": "bc2i", "input": f"{tmp}/{name}.npy", "output": f"{tmp}/{name}.out.npy"})
        for name, lab in labs.items():
            np.save(f"{tmp}/{name}.npy", lab)
            for t in (1, 2, 3):
                jobs.append({"op": "i2bc", "input": f"{tmp}/{name}.npy", "output": f"{tmp}/{name}.t{t}.npy", "thickness": t})
        run_reference(jobs, dict(os.environ))
        for name, bc in bcs.items():
            ref = np.load(f"{tmp}/{name}.out.npy")
            data[f"bc2i/{name}/border_core"] = bc.astype(np.uint8)
            data[f"bc2i/{name}/instances"] = _without_gaps(ref).astype(np.uint16)
        for name, lab in labs.items():
            data[f"i2bc/{name}/labels"] = lab.astype(np.uint16)
            for t in (1, 2, 3):
                data[f"i2bc/{name}/t{t}"] = np.load(f"{tmp}/{name}.t{t}.npy").astype(np.uint8)
    FIXTURES.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURES, **data)
    print(f"wrote {FIXTURES} ({FIXTURES.stat().st_size / 1024:.0f} KiB, {len(bcs)} border-core and {len(labs)} label volumes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=3, help="number of synthetic volumes")
    parser.add_argument("--size", type=int, default=256, help="edge length of the cubic volumes")
    parser.add_argument("--particles", type=int, default=1000, help="particles per volume")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per conversion (median reported)")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))), help="thread count for both sides")
    parser.add_argument("--fixtures", action="store_true", help="rewrite the reference fixtures of tests/test_bordercore.py")
    args = parser.parse_args()
    if args.fixtures:
        make_fixtures(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
