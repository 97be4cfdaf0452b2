"""Tests of ps3d_core.bordercore: border-core <-> instances, whole-volume and chunk-wise.

Agreement with the reference implementation (ParticleSeg3D 0.2.16) is checked
without installing it: ``tests/data/bordercore_reference.npz`` holds small
border-core and label volumes together with the reference's outputs on them.
It was produced by ``bench/bordercore_vs_reference.py --fixtures``, which runs
``particleseg3d.inference.border_core2instance.border_core2instance`` and
``particleseg3d.train.instance2border_core.instance2border_core`` (thickness
1, 2, 3) in a separate virtualenv (see that script's docstring) and stores
the reference's instance labels renumbered 1..N in their original order (the
reference leaves gaps in its numbering). Volumes: one hand-made case per rule
(tie, touching balls, thin plate alone / touching a ball, border-only
component, deep voxel in a thin core, core on its component's bounding-box
face, particles cut by the volume border) and ten random ones (noise, perturbed
training targets, cores touching the background, thin branching shapes,
densely touching particles).
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import cc3d
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from ps3d_core import bordercore as bcm
from ps3d_core.bordercore import (
    ChunkGrid,
    border_core_to_instances,
    border_core_to_instances_chunked,
    instances_to_border_core,
    instances_to_border_core_chunked,
)

FIXTURES = Path(__file__).parent / "data" / "bordercore_reference.npz"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def ball(shape, centre, r2, label=1, out=None):
    """Label voxels with squared distance <= r2 from ``centre`` (only where ``out`` is 0)."""
    out = np.zeros(shape, np.uint32) if out is None else out
    grid = np.indices(shape)
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r2
    out[inside & (out == 0)] = label
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label volumes split the voxels identically (labels may differ, 0 must match)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def erosion_oracle(labels: np.ndarray, t: int) -> np.ndarray:
    """instance2border_core's rule written naively: erode each particle by ball(t), volume border = inside."""
    zz, yy, xx = np.mgrid[-t : t + 1, -t : t + 1, -t : t + 1]
    selem = zz**2 + yy**2 + xx**2 <= t * t
    out = np.zeros(labels.shape, np.uint8)
    for lab in np.unique(labels[labels > 0]):
        mask = labels == lab
        core = ndi.binary_erosion(mask, selem, border_value=1)
        out[mask] = 2
        out[core] = 1
    return out


def growth_oracle(border_core: np.ndarray, keep_all_cores: bool = True) -> np.ndarray:
    """Rule 4 written naively: per core a BFS over 26-neighbours, nearest core wins, ties -> later core.

    Only valid when no core is removed by the small-core filter (the caller
    checks). Returns labels numbered like border_core_to_instances.
    """
    fg = border_core > 0
    comp = cc3d.connected_components(fg, connectivity=26)
    cores = cc3d.connected_components(border_core == 1, connectivity=6)
    n_core = int(cores.max())
    dist = np.full((n_core + 1,) + border_core.shape, np.iinfo(np.int32).max, np.int64)
    offsets = [o for o in np.ndindex(3, 3, 3) if o != (1, 1, 1)]
    for k in range(1, n_core + 1):
        q = deque(zip(*np.nonzero(cores == k)))
        for v in q:
            dist[(k,) + v] = 0
        while q:
            v = q.popleft()
            d = dist[(k,) + v]
            for o in offsets:
                u = tuple(a + b - 1 for a, b in zip(v, o))
                if all(0 <= c < n for c, n in zip(u, border_core.shape)) and fg[u] and dist[(k,) + u] > d + 1:
                    dist[(k,) + u] = d + 1
                    q.append(u)
    best = dist.min(axis=0)
    owner = np.zeros(border_core.shape, np.int64)
    for k in range(1, n_core + 1):  # later cores overwrite ties
        owner[(dist[k] == best) & fg] = k
    # numbering: components in order, cores in order inside; core-less components one particle
    out = np.zeros(border_core.shape, np.uint32)
    nxt = 1
    for c in range(1, int(comp.max()) + 1):
        in_c = comp == c
        ks = np.unique(cores[in_c & (cores > 0)])
        if ks.size == 0:
            out[in_c] = nxt
            nxt += 1
        for k in ks:
            out[in_c & (owner == k)] = nxt
            nxt += 1
    return out


def write_zarr(path, arr, chunks):
    z = zarr.create_array(store=str(path), shape=arr.shape, chunks=chunks, dtype=arr.dtype)
    z[:] = arr
    return z


def chunked(tmp_path, bc, chunk_shape, **kw):
    name = "_".join(map(str, chunk_shape)) + "_" + "_".join(f"{k}{v}" for k, v in kw.items())
    src = write_zarr(tmp_path / f"src_{name}", bc, chunk_shape)
    info = border_core_to_instances_chunked(src, tmp_path / f"dst_{name}", chunk_shape, **kw)
    return zarr.open_array(str(tmp_path / f"dst_{name}"))[:], info


def random_labels(shape, n, seed, rmin=2.0, rmax=6.0, overlap=0.75):
    """Randomly oriented ellipsoids, overlaps resolved by nearest normalised centre (touching particles)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    score = np.full(shape, np.inf)
    grid = np.indices(shape).reshape(3, -1).T.astype(float)
    centres = []
    for i in range(1, n + 1):
        c = rng.uniform(0, shape)
        r = rng.uniform(rmin, rmax, 3)
        if any(np.linalg.norm(c - c2) < overlap * (r.mean() + r2) for c2, r2 in centres):
            continue
        centres.append((c, r.mean()))
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        s = ((((grid - c) @ rot) / r) ** 2).sum(1).reshape(shape)
        win = (s <= 1) & (s < score)
        score[win] = s[win]
        labels[win] = i
    return labels


def noisy_border_core(shape, seed):
    """Border-core with the defects of a prediction: flipped voxels, holes, cores touching background."""
    rng = np.random.default_rng(seed)
    bc = instances_to_border_core(random_labels(shape, int(np.prod(shape) / 400) + 4, seed), int(rng.integers(1, 3)))
    bc[(rng.random(shape) < 0.04) & (bc == 2)] = 1
    bc[(rng.random(shape) < 0.04) & (bc == 1)] = 2
    bc[(rng.random(shape) < 0.05) & (bc == 2)] = 0
    return bc


# --------------------------------------------------------------------------
# instances -> border-core
# --------------------------------------------------------------------------


def test_instances_to_border_core_contract():
    labels = ball((9, 9, 9), (4, 4, 4), 9)
    out = instances_to_border_core(labels, 2)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert set(np.unique(out)) == {0, 1, 2}
    assert np.array_equal(out > 0, labels > 0)
    assert np.array_equal(instances_to_border_core(labels, 0), (labels > 0).astype(np.uint8))
    assert np.array_equal(instances_to_border_core(labels.astype(np.int64), 2), out)
    assert np.array_equal(instances_to_border_core(labels, 2, parallel=2), out)
    with pytest.raises(ValueError):
        instances_to_border_core(labels[0], 2)
    with pytest.raises(ValueError):
        instances_to_border_core(labels, -1)
    with pytest.raises(TypeError):
        instances_to_border_core(labels.astype(float), 2)


def test_ball_rule_is_distance_at_most_thickness():
    # a single voxel of background in a block: border = within distance t (|o|^2 <= t^2) of it
    labels = np.ones((11, 11, 11), np.uint32)
    labels[5, 5, 5] = 0
    out = instances_to_border_core(labels, 3)
    d2 = sum((g - 5) ** 2 for g in np.indices(labels.shape))
    assert np.array_equal(out == 2, (d2 <= 9) & (d2 > 0))
    assert np.array_equal(out == 1, d2 > 9)


def test_touching_particles_keep_separate_cores_and_come_back():
    labels = ball((14, 14, 26), (7, 7, 7), 30, 1)
    ball((14, 14, 26), (7, 7, 18), 30, 2, out=labels)
    assert np.any((labels[:, :, :-1] == 1) & (labels[:, :, 1:] == 2))  # they touch
    for t in (1, 2, 3):
        bc = instances_to_border_core(labels, t)
        cores, n = cc3d.connected_components(bc == 1, connectivity=26, return_N=True)
        assert n == 2  # not even diagonally connected
        for k in (1, 2):
            assert np.unique(labels[cores == k]).size == 1
        assert np.array_equal(border_core_to_instances(bc), labels)


def test_particle_cut_by_volume_border_is_not_eroded_from_outside():
    labels = ball((12, 12, 12), (0, 6, 6), 25)
    out = instances_to_border_core(labels, 2)
    # the volume face is not a boundary: core voxels lie on it
    assert np.any(out[0] == 1)
    assert np.array_equal(out, erosion_oracle(labels, 2))
    assert np.array_equal(border_core_to_instances(out), labels)


@pytest.mark.parametrize("seed", range(4))
def test_instances_to_border_core_matches_naive_erosion(seed):
    labels = random_labels((18, 20, 16), 20, seed)
    for t in (1, 2, 3, 4, 5):  # <= 3: box decomposition, above: distance transform
        assert np.array_equal(instances_to_border_core(labels, t), erosion_oracle(labels, t))


def test_instances_to_border_core_threads_and_blocks():
    # more z-planes than one erosion block, split over threads: same result
    labels = random_labels((45, 20, 18), 40, 5)
    expected = erosion_oracle(labels, 3)
    assert np.array_equal(instances_to_border_core(labels, 3), expected)
    assert np.array_equal(instances_to_border_core(labels, 3, parallel=3), expected)
    assert np.array_equal(instances_to_border_core(labels.astype(np.uint64), 3), expected)


# --------------------------------------------------------------------------
# border-core -> instances: one rule at a time
# --------------------------------------------------------------------------


def test_border_core_to_instances_contract():
    bc = np.zeros((5, 6, 7), np.uint8)
    bc[1:4, 1:4, 1:4] = 2
    bc[2, 2, 2] = 1
    out = border_core_to_instances(bc)
    assert out.dtype == np.uint32 and out.shape == bc.shape
    assert np.array_equal(out, (bc > 0).astype(np.uint32))
    assert np.array_equal(border_core_to_instances(bc.astype(np.int32)), out)
    assert border_core_to_instances(np.zeros((3, 3, 3), np.uint8)).max() == 0
    assert border_core_to_instances(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4, 4)
    assert border_core_to_instances(np.ones((1, 1, 1), np.uint8)).tolist() == [[[1]]]
    assert instances_to_border_core(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4, 4)
    with pytest.raises(ValueError):
        border_core_to_instances(np.full((3, 3, 3), 3, np.uint8))
    with pytest.raises(ValueError):
        border_core_to_instances(bc[0])
    with pytest.raises(ValueError):
        border_core_to_instances(np.full((3, 3, 3), -1, np.int8))


def test_tie_goes_to_the_later_core():
    line = np.array([[[1, 1, 2, 2, 2, 2, 2, 2, 2, 1, 1]]], np.uint8)
    # x=5 is 4 steps from both cores: the core whose first voxel comes later wins
    assert border_core_to_instances(line)[0, 0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    # "later" is C order, not position along the line: core B (row 0, right end) comes
    # before core A (row 1, left end); the tied middle column goes to A
    bc = np.full((1, 2, 11), 2, np.uint8)
    bc[0, 0, 10] = 1  # B: core 1
    bc[0, 1, 0] = 1  # A: core 2
    out = border_core_to_instances(bc, remove_small_cores=False)  # keep the one-voxel cores
    assert out[0, 0, 10] == 1 and out[0, 1, 0] == 2
    assert out[0, :, 5].tolist() == [2, 2]  # 5 steps from both
    assert out[0, :, 6].tolist() == [1, 1]  # 4 steps from B
    assert out[0, :, 4].tolist() == [2, 2]


def test_growth_follows_geodesic_steps_not_straight_lines():
    # a U-shaped border: the right end is closer to core B straight, but the path runs around
    bc = np.zeros((1, 7, 12), np.uint8)
    bc[0, 1, 1:11] = 2  # top bar
    bc[0, 1:6, 1] = 2  # left arm
    bc[0, 1:6, 10] = 2  # right arm
    bc[0, 5, 1] = 1  # core A at the bottom of the left arm
    bc[0, 5, 10] = 1  # core B at the bottom of the right arm
    out = border_core_to_instances(bc, remove_small_cores=False)
    assert out[0, 1, 2] == out[0, 5, 1]  # near A along the path
    assert out[0, 1, 9] == out[0, 5, 10]
    assert np.array_equal(out, growth_oracle(bc))


def test_thin_particle_alone_loses_its_core_but_stays_one_particle():
    plate = np.zeros((7, 12, 12), np.uint32)
    plate[2:5, 1:11, 1:11] = 1
    bc = instances_to_border_core(plate, 1)
    assert np.count_nonzero(bc == 1) == 64  # a one-voxel sheet: every voxel next to the border
    assert np.array_equal(border_core_to_instances(bc), plate)
    # without the filter the sheet is kept as a core: same single particle
    assert np.array_equal(border_core_to_instances(bc, remove_small_cores=False), plate)


def test_thin_particle_touching_a_thick_one_is_absorbed():
    labels = np.zeros((16, 14, 24), np.uint32)
    labels[5:8, 2:12, 1:11] = 1
    ball((16, 14, 24), (7, 7, 16), 30, 2, out=labels)
    bc = instances_to_border_core(labels, 1)
    assert cc3d.connected_components(bc == 1, connectivity=6).max() == 2
    out = border_core_to_instances(bc)
    # the plate's core is removed (thin everywhere); the ball's core grows over the plate
    assert np.array_equal(out, (labels > 0).astype(np.uint32))
    # with the filter disabled both particles come back
    assert same_partition(border_core_to_instances(bc, remove_small_cores=False), labels)


def test_component_without_core_is_one_particle():
    bc = np.zeros((10, 10, 20), np.uint8)
    bc[2:8, 2:8, 2:8] = 2
    bc[2:8, 2:8, 11:18] = 2
    bc[4:6, 4:6, 13:16] = 1
    out = border_core_to_instances(bc)
    expected = np.zeros(bc.shape, np.uint32)
    expected[2:8, 2:8, 2:8] = 1
    expected[2:8, 2:8, 11:18] = 2
    assert np.array_equal(out, expected)


def test_small_core_filter_thresholds():
    # a component with a thin core (1-voxel sheet) and a thick core, joined by border
    bc = np.zeros((9, 12, 30), np.uint8)
    bc[1:8, 1:11, 1:29] = 2
    bc[4, 2:10, 2:12] = 1  # sheet: all its voxels have d = 1
    bc[2:7, 3:8, 18:25] = 1  # thick core
    assert border_core_to_instances(bc).max() == 1  # sheet removed, one particle
    assert border_core_to_instances(bc, remove_small_cores=False).max() == 2
    assert border_core_to_instances(bc, max_ratio=None).max() == 1  # the min rule alone removes it
    assert border_core_to_instances(bc, min_ratio=None, max_ratio=None).max() == 1  # reference: both dropped -> all
    assert border_core_to_instances(bc, min_ratio=1.01).max() == 2  # ratio never reached
    assert border_core_to_instances(bc, min_distance=0.5).max() == 2  # d = 1 is not within 0.5
    # deep rule: a 5^3 block on the sheet puts one voxel 3 deep -> the core stays
    deep = np.zeros((16, 34, 50), np.uint8)
    deep[1:15, 1:33, 1:49] = 2
    deep[4, 2:32, 2:32] = 1
    deep[5:10, 10:15, 10:15] = 1
    deep[4:11, 10:17, 38:45] = 1
    assert border_core_to_instances(deep).max() == 2
    assert border_core_to_instances(deep, max_ratio=None).max() == 1
    assert border_core_to_instances(deep, max_distance=4).max() == 1  # nothing is 4 deep


def test_filter_distance_stops_at_the_component_bounding_box():
    # core plate on the bottom face of its component: background below is outside the box
    bc = np.zeros((12, 20, 30), np.uint8)
    bc[3:9, 2:18, 2:28] = 2
    bc[7:9, 4:16, 4:14] = 1
    bc[4:9, 6:13, 18:25] = 1
    assert border_core_to_instances(bc).max() == 2
    # one more border layer below moves the box: now the plate's bottom is close to the border
    bc2 = np.zeros((12, 20, 30), np.uint8)
    bc2[3:10, 2:18, 2:28] = 2
    bc2[7:9, 4:16, 4:14] = 1
    bc2[4:9, 6:13, 18:25] = 1
    assert border_core_to_instances(bc2).max() == 1


def test_numbering_components_then_cores_in_c_order():
    bc = np.zeros((3, 3, 20), np.uint8)
    bc[1, 1, 0:9] = [1, 2, 2, 2, 2, 2, 2, 2, 1]  # component 1: two cores
    bc[1, 1, 11:14] = 2  # component 2: no core
    bc[1, 1, 15:20] = [2, 2, 1, 2, 2]  # component 3: one core
    out = border_core_to_instances(bc, remove_small_cores=False)[1, 1]
    assert out.tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 3, 3, 3, 0, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_well_separated_convex_particles(seed):
    labels = random_labels((30, 30, 30), 25, seed, rmin=3, rmax=7, overlap=1.5)
    for t in (1, 2, 3):
        assert same_partition(border_core_to_instances(instances_to_border_core(labels, t)), labels)


# --------------------------------------------------------------------------
# agreement with the reference (stored outputs, see module docstring)
# --------------------------------------------------------------------------

_REF = np.load(FIXTURES)
_BC_CASES = sorted({k.split("/")[1] for k in _REF.files if k.startswith("bc2i/")})
_LABEL_CASES = sorted({k.split("/")[1] for k in _REF.files if k.startswith("i2bc/")})


def test_fixture_file_is_complete():
    assert {"tie_line", "touching_balls", "thin_plate_alone", "thin_plate_touching", "border_only",
            "deep_sheet", "bbox_plate", "volume_border"} <= set(_BC_CASES)
    assert len(_BC_CASES) >= 18 and len(_LABEL_CASES) == 3
    assert FIXTURES.stat().st_size < 200 * 1024


@pytest.mark.parametrize("case", _BC_CASES)
def test_border_core_to_instances_matches_reference(case):
    bc = _REF[f"bc2i/{case}/border_core"]
    expected = _REF[f"bc2i/{case}/instances"]
    # same partition and same numbering (the reference's, without its gaps)
    assert np.array_equal(border_core_to_instances(bc), expected)


@pytest.mark.parametrize("case", _LABEL_CASES)
@pytest.mark.parametrize("t", [1, 2, 3])
def test_instances_to_border_core_matches_reference(case, t):
    assert np.array_equal(instances_to_border_core(_REF[f"i2bc/{case}/labels"], t), _REF[f"i2bc/{case}/t{t}"])


# --------------------------------------------------------------------------
# properties on random volumes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_properties_on_noisy_border_cores(seed):
    bc = noisy_border_core((20, 22, 18), seed)
    out = border_core_to_instances(bc)
    # every foreground voxel belongs to a particle, background to none
    assert np.array_equal(out > 0, bc > 0)
    # labels 1..N, each particle 26-connected and inside one component
    n = int(out.max())
    assert np.array_equal(np.unique(out), np.arange(n + 1))
    comp = cc3d.connected_components(bc > 0, connectivity=26)
    assert np.unique(np.stack([out[out > 0], comp[out > 0]]), axis=1).shape[1] == n
    for k in range(1, n + 1):
        assert cc3d.connected_components(out == k, connectivity=26).max() == 1
    # without the filter: every core lies in one particle, every particle holds at most one core
    out = border_core_to_instances(bc, remove_small_cores=False)
    cores = cc3d.connected_components(bc == 1, connectivity=6)
    pairs = np.unique(np.stack([cores[cores > 0], out[cores > 0]]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1]
    assert np.unique(pairs[1]).size == pairs.shape[1]


@pytest.mark.parametrize("seed", range(3))
def test_growth_matches_naive_bfs(seed):
    rng = np.random.default_rng(seed)
    bc = rng.choice(3, size=(7, 8, 9), p=[0.35, 0.12, 0.53]).astype(np.uint8)
    out = border_core_to_instances(bc, remove_small_cores=False)
    assert np.array_equal(out, growth_oracle(bc))


# --------------------------------------------------------------------------
# chunk-wise conversion == whole volume
# --------------------------------------------------------------------------


def test_chunk_grid():
    grid = ChunkGrid((10, 7, 5), (4, 4, 5))
    assert grid.grid == (3, 2, 1) and grid.n_chunks == 6
    assert grid.region((2, 1, 0)) == (slice(8, 10), slice(4, 7), slice(0, 5))
    window, inner = grid.window((1, 0, 0), 2)
    assert window == (slice(2, 10), slice(0, 6), slice(0, 5))
    assert inner == (slice(2, 6), slice(0, 4), slice(0, 5))
    assert sorted(grid.overlapping(window)) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)]


@pytest.mark.parametrize(
    ("seed", "chunk_shape", "halo"),
    [(0, (8, 8, 8), 16), (1, (7, 11, 6), 2), (2, (20, 6, 9), 1), (3, (9, 8, 7), 3)],
)
def test_chunked_equals_whole_on_noisy_volumes(tmp_path, seed, chunk_shape, halo):
    bc = noisy_border_core((20, 22, 18), seed)
    whole = border_core_to_instances(bc)
    out, info = chunked(tmp_path, bc, chunk_shape, halo=halo)
    assert out.dtype == np.uint32
    assert np.array_equal(out, whole)  # partition and numbering
    assert info["n_particles"] == whole.max()


def test_chunked_particles_and_cores_spanning_chunk_corners(tmp_path):
    # balls centred on a chunk corner and on chunk edges: cores and borders span 4-8 chunks
    shape = (24, 24, 24)
    labels = np.zeros(shape, np.uint32)
    for i, c in enumerate([(12, 12, 12), (12, 12, 20), (4, 12, 12), (12, 4, 12)], 1):
        ball(shape, c, 16, i, out=labels)
    bc = instances_to_border_core(labels, 2)
    cores = cc3d.connected_components(bc == 1, connectivity=6)
    assert np.all(cores[11:13, 11:13, 11:13] == cores[12, 12, 12])  # one core across the corner
    out, _ = chunked(tmp_path, bc, (12, 12, 12))
    assert np.array_equal(out, border_core_to_instances(bc))
    assert same_partition(out, labels)


def test_chunked_huge_border_only_component_and_far_growth(tmp_path):
    # a border-only lattice spanning all chunks, plus a second lattice with two cores in
    # opposite corners: its border voxels are up to ~25 steps from a core, so with halo 4
    # growth needs several rounds
    shape = (20, 32, 32)
    bc = np.zeros(shape, np.uint8)
    bc[::4, :, :16] = 2
    bc[:, ::4, :16] = 2
    bc[:, :, 0] = 2
    bc[::4, :, 18:] = 2
    bc[:, ::4, 18:] = 2
    bc[:, :, 18] = 2
    bc[0:5, 0:5, 18:23] = 1  # 5^3 core blocks (their centre is 3 deep: kept)
    bc[15:20, 27:32, 27:32] = 1
    whole = border_core_to_instances(bc)
    assert whole.max() == 3
    out, info = chunked(tmp_path, bc, (10, 11, 12), halo=4)
    assert info["rounds"] > 1
    assert np.array_equal(out, whole)


def test_chunked_small_core_filter_across_chunks(tmp_path):
    # the thin sheet and the deep block of one core lie in different chunks: the filter's
    # counts must be summed over chunks for the (kept) decision
    deep = np.zeros((16, 34, 50), np.uint8)
    deep[1:15, 1:33, 1:49] = 2
    deep[4, 2:32, 2:32] = 1
    deep[5:10, 10:15, 10:15] = 1
    deep[4:11, 10:17, 38:45] = 1
    out, info = chunked(tmp_path, deep, (8, 12, 17))
    assert np.array_equal(out, border_core_to_instances(deep))
    assert out.max() == 2 and info["n_removed"] == 0
    bbox = _REF["bc2i/bbox_plate/border_core"]
    out, _ = chunked(tmp_path, bbox, (6, 10, 10))
    assert np.array_equal(out, _REF["bc2i/bbox_plate/instances"])


def test_chunk_functions_are_order_independent(tmp_path):
    # the per-chunk stages run in any order (as Dask tasks would) with the same result
    bc = noisy_border_core((16, 18, 14), 7)
    grid = ChunkGrid(bc.shape, (6, 6, 6))
    src = write_zarr(tmp_path / "src", bc, grid.chunk_shape)
    work = tmp_path / "work"
    bcm.prepare_work(work, grid)
    params = {"min_distance": 1, "min_ratio": 0.95, "max_distance": 3, "max_ratio": 0.0}
    idx = list(grid.indices())
    rnd = random.Random(0)

    def shuffled():
        out = idx[:]
        rnd.shuffle(out)
        return out

    summaries = [bcm.chunk_label(str(tmp_path / "src"), str(work), i, grid) for i in shuffled()]
    pairs = [bcm.chunk_face_pairs(str(work), i, grid) for i in shuffled()]
    bcm.merge_labels(str(work), grid, summaries, pairs)
    counts = [bcm.chunk_core_counts(src, str(work), i, grid, params) for i in shuffled()]
    need = bcm.merge_core_counts(str(work), counts, params)
    assert need and set(need) <= set(idx)
    flags = [bcm.chunk_candidate_flags(src, str(work), i, grid, params) for i in shuffled()]
    bcm.merge_candidate_flags(str(work), flags, params)
    latest = np.zeros(grid.n_chunks, np.int64)
    todo, rnd_no = idx, 0
    while todo:
        rnd_no += 1
        bcm.prepare_round(work, grid, rnd_no)
        res = {i: bcm.chunk_grow(src, str(work), i, grid, rnd_no, 2, latest) for i in shuffled() if i in todo}
        for i in res:
            latest[grid.chunk_id(i)] = rnd_no
        todo = [i for i in res if res[i]["unresolved"]]
    dst = bcm._create(tmp_path / "dst", bc.shape, grid.chunk_shape, np.uint32)
    for i in shuffled():
        bcm.chunk_relabel(str(work), dst, i, grid, int(latest[grid.chunk_id(i)]))
    assert np.array_equal(dst[:], border_core_to_instances(bc))


def test_chunked_rejects_misaligned_output(tmp_path):
    bc = np.zeros((8, 8, 8), np.uint8)
    src = write_zarr(tmp_path / "src", bc, (4, 4, 4))
    dst = bcm._create(tmp_path / "dst", bc.shape, (3, 3, 3), np.uint32)
    with pytest.raises(ValueError):
        border_core_to_instances_chunked(src, dst, (4, 4, 4))


@pytest.mark.parametrize("chunk_shape", [(5, 7, 6), (16, 3, 16)])
def test_instances_to_border_core_chunked(tmp_path, chunk_shape):
    labels = random_labels((16, 18, 15), 15, 11)
    src = write_zarr(tmp_path / "lab", labels, chunk_shape)
    instances_to_border_core_chunked(src, tmp_path / "bc", chunk_shape, 3)
    assert np.array_equal(zarr.open_array(str(tmp_path / "bc"))[:], instances_to_border_core(labels, 3))
