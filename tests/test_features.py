"""Per-particle features (ps3d_core.features, ``ps3d features``) against analytic shapes and exact ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from typer.testing import CliRunner

from ps3d.cli import app
from ps3d_core.errors import ScanError
from ps3d_core.features import (
    auto_phases,
    extract_features,
    merge_stats,
    read_phases,
    slab_stats,
    write_features_parquet,
)
from ps3d_core.features.shape import hull_measures, min_width, surface_mesh, widths
from ps3d_core.io import ArrayVolume, write_tiff
from ps3d_core.synth import synthesize, write_synthetic_scan
from schemas.particles import particle_schema

runner = CliRunner()


# --- helpers ------------------------------------------------------------------------


def centred_grid(shape, spacing, centre_offset=(0.0, 0.0, 0.0)):
    """Physical coordinates (mm) of voxel centres relative to the volume centre (plus an offset)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s - o for n, s, o in zip(shape, spacing, centre_offset)]
    return np.meshgrid(*axes, indexing="ij")


def ellipsoid(semi_axes_zyx_mm, spacing, margin=4, offset=(0.0, 0.0, 0.0)):
    """Voxelised axis-aligned ellipsoid (voxel centres inside), uint8 label 1."""
    shape = [int(math.ceil(2 * a / s)) + 2 * margin for a, s in zip(semi_axes_zyx_mm, spacing)]
    z, y, x = centred_grid(shape, spacing, offset)
    a, b, c = semi_axes_zyx_mm
    return ((z / a) ** 2 + (y / b) ** 2 + (x / c) ** 2 <= 1.0).astype(np.uint8)


def features(labels, spacing=(1.0, 1.0, 1.0), image=None, phases=None, **kwargs):
    """The table's rows as dicts, with a flat image and no phases unless given."""
    image = np.full(labels.shape, 1000, np.uint16) if image is None else image
    kwargs.setdefault("outside_value", None)
    result = extract_features(labels, image, spacing, "sample", "run-1", {} if phases is None else phases, **kwargs)
    return result.table.to_pylist()


def single(labels, spacing=(1.0, 1.0, 1.0), **kwargs):
    rows = features(labels, spacing, **kwargs)
    assert len(rows) == 1
    return rows[0]


def balls_volume(shape=(40, 48, 56), count=30, seed=0):
    """Random non-overlapping-ish balls of radius 2-6 voxels (later ones overwrite), labels 1..count."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for label in range(1, count + 1):
        r = rng.uniform(2, 6)
        c = [rng.uniform(0, n) for n in shape]
        labels[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r] = label
    image = rng.integers(0, 65536, shape, dtype=np.uint16)
    return labels, image


# --- analytic shapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("radius", "offset"), [(10.0, (0.0, 0.0, 0.0)), (12.5, (0.3, -0.2, 0.4)), (16.0, (0.5, 0.5, 0.0))]
)
def test_sphere_volume_esd_area_sphericity_within_3_percent(radius, offset):
    spacing = 0.01
    labels = ellipsoid([radius * spacing] * 3, [spacing] * 3, offset=[o * spacing for o in offset])
    row = single(labels, (spacing,) * 3)
    r_mm = radius * spacing
    assert row["voxel_count"] == int(labels.sum())
    assert row["volume_mm3"] == pytest.approx(4 / 3 * math.pi * r_mm**3, rel=0.03)
    assert row["esd_mm"] == pytest.approx(2 * r_mm, rel=0.03)
    assert row["esd_mm"] == pytest.approx((6 * row["volume_mm3"] / math.pi) ** (1 / 3), rel=1e-12)
    assert row["surface_area_mm2"] == pytest.approx(4 * math.pi * r_mm**2, rel=0.03)
    assert row["sphericity"] == pytest.approx(1.0, abs=0.03)
    for axis in ("major", "intermediate", "minor"):
        assert row[f"axis_{axis}_mm"] == pytest.approx(2 * r_mm, rel=0.02)
    # a voxel and a half: a sphere centred half a voxel off the grid has flat poles one voxel short
    assert row["feret_max_mm"] == pytest.approx(2 * r_mm, abs=1.5 * spacing)
    assert row["feret_min_mm"] == pytest.approx(2 * r_mm, abs=1.5 * spacing)
    # the staircase left after smoothing is slightly non-convex (shape module notes)
    assert 0.985 <= row["solidity"] <= 1.0


def test_sphere_with_anisotropic_voxels_is_measured_in_mm():
    spacing = (0.02, 0.01, 0.01)
    r_mm = 0.16  # 8 voxels along z, 16 along y and x
    row = single(ellipsoid([r_mm] * 3, spacing), spacing)
    assert row["volume_mm3"] == pytest.approx(4 / 3 * math.pi * r_mm**3, rel=0.03)
    assert row["surface_area_mm2"] == pytest.approx(4 * math.pi * r_mm**2, rel=0.03)
    assert row["sphericity"] == pytest.approx(1.0, abs=0.03)
    for axis in ("major", "intermediate", "minor"):
        assert row[f"axis_{axis}_mm"] == pytest.approx(2 * r_mm, rel=0.02)
    # one coarse (z) voxel of digitisation
    assert row["feret_max_mm"] == pytest.approx(2 * r_mm, abs=0.02)
    assert row["feret_min_mm"] == pytest.approx(2 * r_mm, abs=0.02)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.02, 0.01, 0.015)])
def test_box_axes_are_exact_and_feret_follows_the_documented_corner_rounding(spacing):
    sides = np.array([12, 20, 30])
    labels = np.zeros(sides + 6, np.uint16)
    labels[3:-3, 3:-3, 3:-3] = 7
    row = single(labels, spacing)
    side_mm = sides * np.array(spacing)
    assert row["particle_id"] == 7
    assert row["voxel_count"] == sides.prod()
    assert (row["bbox_z0"], row["bbox_y0"], row["bbox_x0"], row["bbox_z1"], row["bbox_y1"], row["bbox_x1"]) == (
        3, 3, 3, 15, 23, 33,
    )  # fmt: skip
    # second moments of solid voxels: a box of side L has lambda = L^2 / 12, full axis sqrt(5/3) L
    expected = np.sort(np.sqrt(5 / 3) * side_mm)[::-1]
    got = [row["axis_major_mm"], row["axis_intermediate_mm"], row["axis_minor_mm"]]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert row["elongation"] == pytest.approx(expected[1] / expected[0], rel=1e-12)
    assert row["flatness"] == pytest.approx(expected[2] / expected[1], rel=1e-12)
    assert row["extent"] == 1.0
    assert row["centroid_z_mm"] == pytest.approx((3 + (12 - 1) / 2) * spacing[0], rel=1e-12)
    assert row["centroid_x_mm"] == pytest.approx((3 + (30 - 1) / 2) * spacing[2], rel=1e-12)
    # flat faces sit exactly on the voxel faces: the thinnest width is the shortest side
    assert row["feret_min_mm"] == pytest.approx(side_mm.min(), rel=1e-6)
    # the smoothed surface rounds the corners (shape module notes): the space diagonal is
    # short by about one voxel diagonal, never long
    shortfall = (np.linalg.norm(side_mm) - row["feret_max_mm"]) / np.linalg.norm(spacing)
    assert 0.5 < shortfall < 1.5
    assert row["solidity"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.02, 0.01, 0.015)])
def test_ellipsoid_axes_and_feret_diameters(spacing):
    # semi-axes 0.5, 0.3, 0.2 mm along x, z, y: major along x, minor along y
    scale = 24.0 if spacing[0] == 1.0 else 0.5
    a, b, c = scale, 0.6 * scale, 0.4 * scale
    labels = ellipsoid([b, c, a], spacing)
    row = single(labels, spacing)
    coarse = max(spacing)
    assert row["axis_major_mm"] == pytest.approx(2 * a, rel=0.02)
    assert row["axis_intermediate_mm"] == pytest.approx(2 * b, rel=0.02)
    assert row["axis_minor_mm"] == pytest.approx(2 * c, rel=0.02)
    assert row["elongation"] == pytest.approx(b / a, rel=0.03)
    assert row["flatness"] == pytest.approx(c / b, rel=0.03)
    assert row["feret_max_mm"] == pytest.approx(2 * a, abs=coarse)
    assert row["feret_min_mm"] == pytest.approx(2 * c, abs=coarse)
    assert row["volume_mm3"] == pytest.approx(4 / 3 * math.pi * a * b * c, rel=0.02)
    assert row["solidity"] == pytest.approx(1.0, abs=0.02)
    assert row["extent"] == pytest.approx(math.pi / 6, rel=0.05)  # ellipsoid in its box


def test_l_shape_solidity_and_extent_have_their_known_values():
    labels = np.zeros((24, 44, 44), np.uint32)
    labels[2:22, 2:42, 2:42] = 1
    labels[2:22, 22:42, 22:42] = 0  # a 40x40 square minus a 20x20 corner, 20 deep
    row = single(labels)
    # the hull cuts the missing corner diagonally: area 1600 - 200 against the L's 1200
    assert row["solidity"] == pytest.approx(1200 / 1400, rel=0.015)
    assert row["extent"] == 0.75


def test_tiny_and_thin_particles_do_not_crash_and_use_the_binary_surface():
    labels = np.zeros((12, 30, 30), np.uint32)
    labels[2, 2, 2] = 1  # one voxel
    labels[5, 5, 5:7] = 2  # two voxels
    labels[8, 10:25, 10:25] = 3  # a sheet one voxel thick
    labels[4:7, 20:23, 3:6] = 4  # a 3x3x3 cube
    labels[2, 20, 20:28] = 5  # a needle
    labels[3:8, 3:8, 14:19] = 6  # a 5x5x5 cube: big enough for the smoothed surface
    result = extract_features(labels, np.full(labels.shape, 5, np.uint16), 0.01, "s", "r", {}, outside_value=None)
    rows = {row["particle_id"]: row for row in result.table.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert result.smoothed_surface_fallbacks == 5
    for row in rows.values():
        for key in ("surface_area_mm2", "sphericity", "feret_max_mm", "feret_min_mm", "solidity"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["particle_id"], key, row[key])
    voxel = 0.01
    # the binary surface of one voxel is the octahedron through its face centres
    assert rows[1]["feret_max_mm"] == pytest.approx(voxel)
    assert rows[1]["feret_min_mm"] == pytest.approx(voxel / math.sqrt(3))
    assert rows[1]["surface_area_mm2"] == pytest.approx(8 * math.sqrt(3) / 4 * (voxel / math.sqrt(2)) ** 2)
    assert rows[1]["solidity"] == pytest.approx(1.0)
    # a sheet keeps its thickness of one voxel and its two faces (chamfered at the rim)
    assert rows[3]["feret_min_mm"] == pytest.approx(voxel)
    assert 2 * 14**2 * voxel**2 < rows[3]["surface_area_mm2"] < (2 * 15**2 + 4 * 15) * voxel**2
    assert rows[3]["sphericity"] == pytest.approx(0.35, abs=0.05)  # 15x15x1 voxels: 0.35 exactly
    # a cube's true sphericity is 0.806; the binary surface of 3^3 voxels chamfers every edge
    # and gives 1.02: shape values of particles this small are indicative only (shape module notes)
    assert rows[4]["sphericity"] == pytest.approx(1.02, abs=0.01)
    assert rows[4]["axis_minor_mm"] == pytest.approx(math.sqrt(5 / 3) * 3 * voxel)
    # 5^3 voxels keep the smoothed surface; its faces bulge by 0.05 % at this size
    assert rows[6]["feret_min_mm"] == pytest.approx(5 * voxel, rel=1e-3)


def test_degenerate_point_sets_fall_back_without_qhull():
    rng = np.random.default_rng(1)
    flat = np.column_stack([rng.random(30), rng.random(30), np.zeros(30)])
    hull_volume, feret_max, feret_min = hull_measures(flat)
    assert math.isnan(hull_volume)
    pairs = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert feret_max == pytest.approx(pairs.max(), rel=1e-12)
    assert feret_min == pytest.approx(0.0, abs=1e-12)
    assert min_width(flat) == pytest.approx(0.0, abs=1e-12)
    line = np.outer(np.linspace(0, 2, 5), [1.0, 2.0, 2.0])
    assert hull_measures(line)[1] == pytest.approx(6.0)


def exact_min_width(points):
    """Brute force: a convex polytope is thinnest along a facet normal or the cross product of two edges."""
    from scipy.spatial import ConvexHull

    hull = ConvexHull(points)
    edges = {tuple(sorted((a, b))) for simplex in hull.simplices for a, b in zip(simplex, np.roll(simplex, 1))}
    vectors = np.array([points[b] - points[a] for a, b in edges])
    crosses = np.cross(vectors[:, None], vectors[None]).reshape(-1, 3)
    crosses = crosses[np.linalg.norm(crosses, axis=1) > 1e-12]
    directions = np.concatenate([hull.equations[:, :3], crosses / np.linalg.norm(crosses, axis=1, keepdims=True)])
    return widths(points, directions).min()


def test_min_width_search_finds_the_exact_minimum_on_random_convex_sets():
    rng = np.random.default_rng(7)
    dense = rng.normal(size=(20_000, 3))
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    for _ in range(25):
        points = rng.normal(size=(40, 3)) * rng.uniform(0.3, 3.0, size=3)
        points = points @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
        exact = exact_min_width(points)
        _, _, found = hull_measures(points)
        # within the documented tolerance (feret_max * 1e-6), and better than 20,000 directions
        assert found == pytest.approx(exact, rel=1e-5)
        assert found <= widths(points, dense).min()


def test_surface_mesh_of_a_padded_crop_is_closed():
    labels = ellipsoid([6.0, 6.0, 6.0], [1.0] * 3, margin=0)  # touches its crop's faces
    vertices, faces, smoothed = surface_mesh(labels.astype(bool), (1.0, 1.0, 1.0))
    assert smoothed
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()  # every edge shared by two triangles: watertight


# --- grey values and phases ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
def test_intensity_statistics_equal_numpy(dtype):
    labels, image = balls_volume()
    if dtype == np.int16:
        image = (image.astype(np.int32) - 32768).astype(np.int16)
    elif dtype == np.float32:
        image = (image / 7.0).astype(np.float32)
    rows = features(labels, image=image)
    assert len(rows) == len(np.unique(labels)) - 1
    for row in rows:
        values = image[labels == row["particle_id"]]
        assert row["voxel_count"] == values.size
        assert row["intensity_min"] == values.min()
        assert row["intensity_max"] == values.max()
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        assert (row["intensity_p10"], row["intensity_p50"], row["intensity_p90"]) == (p10, p50, p90)
        exact = values.astype(np.float64)
        if dtype == np.float32:
            assert row["intensity_mean"] == pytest.approx(exact.mean(), rel=1e-12)
        else:
            assert row["intensity_mean"] == exact.mean()
        assert row["intensity_std"] == pytest.approx(exact.std(), rel=1e-12)


def two_phase_sphere():
    """A sphere whose upper half (z < centre) is grey ~1000 and lower half ~3000, plus a one-phase sphere."""
    labels = np.zeros((40, 40, 70), np.uint32)
    z, y, x = np.ogrid[:40, :40, :70]
    labels[(z - 20) ** 2 + (y - 20) ** 2 + (x - 18) ** 2 <= 12**2] = 1
    labels[(z - 20) ** 2 + (y - 20) ** 2 + (x - 52) ** 2 <= 12**2] = 2
    rng = np.random.default_rng(3)
    image = rng.integers(150, 250, labels.shape).astype(np.uint16)  # epoxy
    image[labels > 0] = 1000 + rng.integers(-100, 100, int((labels > 0).sum()))
    dense = (labels == 1) & (z >= 20)
    image[dense] = 3000 + rng.integers(-100, 100, int(dense.sum()))
    return labels, image, dense


def test_phase_fractions_of_a_constructed_two_phase_particle():
    labels, image, dense = two_phase_sphere()
    expected = dense.sum() / (labels == 1).sum()
    given = {"light": (500.0, 2000.0), "dense": (2000.0, 5000.0)}
    result = extract_features(labels, image, 0.01, "s", "r", given, outside_value=None)
    rows = result.table.to_pylist()
    assert result.phases_source == "scan.json" and result.phases == given
    assert rows[0]["phase_dense_fraction"] == expected
    assert rows[0]["phase_light_fraction"] == 1 - expected
    assert (rows[1]["phase_light_fraction"], rows[1]["phase_dense_fraction"]) == (1.0, 0.0)
    # found automatically: two peaks, a threshold between them, the same fractions
    auto = extract_features(labels, image, 0.01, "s", "r", None, outside_value=None)
    assert auto.phases_source == "auto"
    assert list(auto.phases) == ["auto1", "auto2"]
    assert 1100 <= auto.phases["auto1"][1] == auto.phases["auto2"][0] <= 2900
    assert auto.phases["auto1"][0] == 0 and auto.phases["auto2"][1] == 65536
    assert auto.table.column("phase_auto2_fraction").to_pylist() == [expected, 0.0]
    assert "multi-Otsu" in auto.phases_method


def test_phase_fractions_equal_the_synthetic_ground_truth():
    """On the generator's phase volume every voxel's phase is known: the counts must be exact."""
    scan = synthesize("tiny", 5, workers=1)
    phases = {entry["name"]: (entry["id"], entry["id"] + 1) for entry in scan.truth["phases"]}
    rows = features(scan.labels, scan.metadata.spacing_zyx_mm, image=scan.phases, phases=phases)
    assert len(rows) == scan.truth["particle_count"]
    two_phase = 0
    for row, truth in zip(rows, scan.truth["particles"], strict=True):
        assert row["particle_id"] == truth["id"] and row["voxel_count"] == truth["voxel_count"]
        for name in phases:
            assert row[f"phase_{name}_fraction"] == truth["phase_voxels"].get(name, 0) / truth["voxel_count"]
        two_phase += len(truth["phase_voxels"]) > 1
    assert two_phase >= 5


def test_auto_phases_count_peaks_and_cover_the_dtype():
    rng = np.random.default_rng(0)
    three = np.concatenate([rng.normal(m, 80, n) for m, n in ((5000, 50_000), (12000, 20_000), (30000, 3000))])
    values = three.clip(0, 65535).astype(np.uint16)
    phases, method = auto_phases(values, np.dtype(np.uint16))
    assert list(phases) == ["auto1", "auto2", "auto3"]
    assert phases["auto1"][0] == 0 and phases["auto3"][1] == 65536
    assert phases["auto1"][1] == phases["auto2"][0] and phases["auto2"][1] == phases["auto3"][0]
    # each peak's values land in their own phase (multi-Otsu puts the cuts in the gaps)
    source = np.repeat([0, 1, 2], [50_000, 20_000, 3000])
    found = np.searchsorted([phases["auto1"][1], phases["auto2"][1]], values, side="right")
    assert (found == source).mean() > 0.999
    assert "3 peak(s)" in method
    one, _ = auto_phases(rng.normal(0.5, 0.01, 10_000).astype(np.float32), np.dtype(np.float32))
    assert list(one) == ["auto1"] and one["auto1"][0] < -1e38 and one["auto1"][1] > 1e38
    assert auto_phases(np.zeros(0, np.uint8), np.dtype(np.uint8))[0] == {}


# --- border, field of view ----------------------------------------------------------------


def test_touches_border_faces():
    labels = np.zeros((30, 30, 30), np.uint32)
    z, y, x = np.ogrid[:30, :30, :30]
    labels[(z - 2) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 16] = 1  # cut by z = 0
    labels[(z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 16] = 2  # inside
    labels[(z - 15) ** 2 + (y - 15) ** 2 + (x - 28) ** 2 <= 9] = 3  # reaches x = 29
    labels[10:13, 0:3, 3:6] = 4  # on y = 0
    rows = features(labels)
    assert [r["touches_border"] for r in rows] == [True, False, True, True]


def test_touches_border_of_a_cylindrical_field_of_view():
    labels = np.zeros((20, 64, 64), np.uint32)
    z, y, x = np.ogrid[:20, :64, :64]
    radius = np.hypot(y - 31.5, x - 31.5)
    outside = np.broadcast_to(radius > 30, labels.shape)
    labels[(z - 10) ** 2 + (y - 31.5) ** 2 + (x - 53) ** 2 <= 36] = 1  # reaches radius 27.5: inside
    labels[(z - 10) ** 2 + (y - 31.5) ** 2 + (x - 58) ** 2 <= 36] = 2  # crosses the circle ...
    labels[outside & (labels == 2)] = 0  # ... and is cut by it, as segmentations are
    labels[(z - 10) ** 2 + (y - 31.5) ** 2 + (x - 31.5) ** 2 <= 36] = 3  # centre
    rng = np.random.default_rng(0)
    image = rng.integers(1000, 3000, labels.shape, dtype=np.uint16)
    image[outside] = 777  # what CT software writes outside the reconstruction circle
    result = extract_features(labels, image, 0.01, "s", "r", {})
    assert result.outside_value == 777.0
    assert [r["touches_border"] for r in result.table.to_pylist()] == [False, True, False]
    no_fov = extract_features(labels, image, 0.01, "s", "r", {}, outside_value=None)
    assert not any(no_fov.table.column("touches_border").to_pylist())


def test_touches_border_matches_the_synthetic_truth():
    scan = synthesize("tiny", 3, workers=1)
    result = extract_features(scan.labels, scan.image, scan.metadata.spacing_zyx_mm, "s", "r", scan.metadata.phases)
    assert result.outside_value is not None  # this scan shows the outside of its reconstruction circle
    truth = {p["id"]: p["touches_border"] or p["cut_by_fov"] for p in scan.truth["particles"]}
    got = dict(zip(result.table.column("particle_id").to_pylist(), result.table.column("touches_border").to_pylist()))
    assert got == truth
    assert sum(p["cut_by_fov"] and not p["touches_border"] for p in scan.truth["particles"]) >= 2


# --- streaming: slabs, merging, workers -----------------------------------------------------


def test_slab_statistics_merge_to_the_whole_volume_exactly():
    labels, image = balls_volume(count=40, seed=2)
    ranges = [(0.0, 20000.0), (10000.0, 40000.0), (40000.0, 65536.0)]  # overlapping on purpose
    whole = slab_stats(labels, image, 0, ranges)
    for depth in (1, 3, 7, 16):
        parts = [slab_stats(labels[z : z + depth], image[z : z + depth], z, ranges) for z in range(0, 40, depth)]
        assert merge_stats(parts).equals(whole)
        assert merge_stats(parts[::-1]).equals(whole)
    # and the whole-volume statistics are the numpy ones
    for k, label in enumerate(whole.labels):
        zz, yy, xx = np.nonzero(labels == label)
        values = image[labels == label].astype(np.int64)
        assert whole.count[k] == len(zz)
        assert whole.first[k].tolist() == [zz.sum(), yy.sum(), xx.sum()]
        assert whole.second[k].tolist() == [
            (zz * zz).sum(), (yy * yy).sum(), (xx * xx).sum(), (zz * yy).sum(), (zz * xx).sum(), (yy * xx).sum(),
        ]  # fmt: skip
        assert whole.bbox_min[k].tolist() == [zz.min(), yy.min(), xx.min()]
        assert whole.bbox_max[k].tolist() == [zz.max() + 1, yy.max() + 1, xx.max() + 1]
        assert whole.intensity_sum[k] == values.sum() and whole.intensity_sumsq[k] == (values * values).sum()
        assert (whole.intensity_min[k], whole.intensity_max[k]) == (values.min(), values.max())
        assert whole.phase_count[k].tolist() == [((values >= lo) & (values < hi)).sum() for lo, hi in ranges]


def test_table_is_identical_for_every_slab_depth():
    labels, image = balls_volume(count=40, seed=4)
    phases = {"low": (0.0, 30000.0), "high": (30000.0, 65536.0)}
    spacing = (0.02, 0.01, 0.01)
    tables = [
        extract_features(labels, image, spacing, "s", "r", phases, slab_depth=depth, outside_value=None).table
        for depth in (1, 5, 13, 40)
    ]
    for table in tables[1:]:
        assert table.equals(tables[0])


def test_sparse_label_values_and_streamed_volumes():
    labels, image = balls_volume(count=12, seed=5)
    sparse = labels.astype(np.uint32) * 300_000_000  # ids far beyond the voxel count
    rows = features(ArrayVolume(sparse, "labels.tif", None), image=ArrayVolume(image, "scan.tif", None), slab_depth=6)
    dense = features(labels, image=image)
    assert [r["particle_id"] for r in rows] == [r["particle_id"] * 300_000_000 for r in dense]
    for a, b in zip(rows, dense, strict=True):
        assert {k: v for k, v in a.items() if k != "particle_id"} == {k: v for k, v in b.items() if k != "particle_id"}


def test_chunked_zarr_volumes_are_streamed_chunk_aligned(tmp_path):
    import zarr

    from ps3d_core.io import open_volume

    labels, image = balls_volume(count=40, seed=8)
    for name, array in (("labels.zarr", labels), ("image.zarr", image)):
        stored = zarr.create_array(
            store=str(tmp_path / name), shape=array.shape, chunks=(16, 24, 32), dtype=array.dtype
        )
        stored[:] = array
    phases = {"low": (0.0, 30000.0), "high": (30000.0, 65536.0)}
    expected = extract_features(labels, image, 0.01, "s", "r", phases, outside_value=None).table
    for depth in (3, 16, 21):
        with open_volume(tmp_path / "labels.zarr") as zl, open_volume(tmp_path / "image.zarr") as zi:
            assert zl.chunk_depth == 16
            got = extract_features(zl, zi, 0.01, "s", "r", phases, slab_depth=depth, outside_value=None).table
        assert got.equals(expected)


def test_auto_phases_on_chunked_zarr_read_chunk_aligned_samples(tmp_path):
    import zarr

    from ps3d_core.io import open_volume

    labels, image, dense = two_phase_sphere()
    for name, array in (("labels.zarr", labels), ("image.zarr", image)):
        zarr.create_array(store=str(tmp_path / name), shape=array.shape, chunks=(8, 40, 70), dtype=array.dtype)[:] = array
    with open_volume(tmp_path / "labels.zarr") as zl, open_volume(tmp_path / "image.zarr") as zi:
        result = extract_features(zl, zi, 0.01, "s", "r", None, outside_value=None)
    assert list(result.phases) == ["auto1", "auto2"]
    assert "slices" in result.phases_method
    expected = dense.sum() / (labels == 1).sum()
    assert result.table.column("phase_auto2_fraction").to_pylist() == [expected, 0.0]


@pytest.mark.parametrize("parallel", ["thread", "process"])
def test_workers_give_the_same_table(parallel):
    labels, image = balls_volume(shape=(40, 60, 60), count=150, seed=6)
    phases = {"a": (0.0, 30000.0), "b": (30000.0, 65536.0)}
    serial = extract_features(labels, image, 0.01, "s", "r", phases, outside_value=None).table
    assert serial.num_rows > 64  # more than one batch, so the pool is used
    pooled = extract_features(labels, image, 0.01, "s", "r", phases, outside_value=None, workers=2, parallel=parallel)
    assert pooled.table.equals(serial)


def test_empty_labels_give_an_empty_table():
    result = extract_features(np.zeros((4, 5, 6), np.uint8), np.ones((4, 5, 6), np.uint16), 0.01, "s", "r", None)
    assert result.table.num_rows == 0
    assert result.phases == {}
    assert result.table.schema.equals(particle_schema([]), check_metadata=True)


def test_schema_and_parquet_round_trip(tmp_path):
    labels, image, _ = two_phase_sphere()
    result = extract_features(labels, image, (0.02, 0.01, 0.01), "ore-7", "run-9", None, outside_value=None)
    assert result.table.schema.equals(particle_schema(list(result.phases)), check_metadata=True)
    path = write_features_parquet(result, tmp_path / "out" / "particles.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["particles.parquet"]  # no temporary left behind
    stored = pq.read_table(path)
    assert stored.schema.equals(particle_schema(list(result.phases)), check_metadata=False)
    assert stored.drop_columns([]).to_pylist() == result.table.to_pylist()
    assert stored.schema.field("surface_area_mm2").metadata[b"estimator"]
    phases, source = read_phases(path)
    assert phases == result.phases and source == "auto"
    assert json.loads(stored.schema.metadata[b"ps3d.phases"]) == {k: list(v) for k, v in result.phases.items()}
    assert stored.column("sample_id").to_pylist() == ["ore-7", "ore-7"]
    assert stored.column("run_id").to_pylist() == ["run-9", "run-9"]


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_raises_scan_error_naming_the_file():
    labels = ArrayVolume(np.zeros((4, 5, 6), np.float32), "labels.tif", None)
    image = ArrayVolume(np.zeros((4, 5, 6), np.uint16), "scan/scan.tif", None)
    with pytest.raises(ScanError, match="float32 voxels; particle labels must be integers") as error:
        extract_features(labels, image, 0.01, "s", "r", {})
    assert error.value.path == "labels.tif"
    other = ArrayVolume(np.zeros((4, 5, 7), np.uint32), "labels.tif", None)
    with pytest.raises(ScanError, match=r"is 4x5x7 voxels .* scan scan/scan.tif is 4x5x6") as error:
        extract_features(other, image, 0.01, "s", "r", {})
    assert error.value.path == "labels.tif"
    good = ArrayVolume(np.ones((4, 5, 6), np.uint32), "labels.tif", None)
    for spacing in (None, 0.0, -1.0, (0.01, 0.01), (0.01, math.nan, 0.01), "a"):
        with pytest.raises(ScanError, match="voxel size") as error:
            extract_features(good, image, spacing, "s", "r", {})
        assert error.value.path == "scan/scan.tif"
    negative = np.ones((4, 5, 6), np.int16)
    negative[2, 1, 1] = -3
    with pytest.raises(ScanError, match=r"negative labels \(slice z=2\)"):
        extract_features(negative, np.zeros((4, 5, 6), np.uint16), 0.01, "s", "r", {})
    huge = np.full((4, 5, 6), 2**33, np.uint64)
    with pytest.raises(ScanError, match="must fit in uint32"):
        extract_features(huge, np.zeros((4, 5, 6), np.uint16), 0.01, "s", "r", {})
    with pytest.raises(ScanError, match="must be finite with low < high"):
        extract_features(good, image, 0.01, "s", "r", {"a": (5.0, 1.0)})


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("features-cli")
    scan = synthesize("tiny", 3, workers=1, sample_id="ore-3")
    return scan, write_synthetic_scan(scan, out), out / "_truth" / "ore-3_labels.tif"


def test_cli_features_end_to_end(synthetic_scan, tmp_path):
    scan, scan_dir, labels_tif = synthetic_scan
    out = tmp_path / "particles.parquet"
    result = runner.invoke(app, ["features", str(labels_tif), str(scan_dir), "--out", str(out), "--workers", "1",
                                 "--run-id", "run-42"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    table = pq.read_table(out)
    phases, source = read_phases(out)
    assert source == "scan.json" and phases == {k: tuple(v) for k, v in scan.metadata.phases.items()}
    assert table.schema.equals(particle_schema(list(phases)), check_metadata=False)
    assert table.num_rows == scan.truth["particle_count"]
    truth = scan.truth["particles"]
    assert table.column("particle_id").to_pylist() == [p["id"] for p in truth]
    assert table.column("voxel_count").to_pylist() == [p["voxel_count"] for p in truth]
    volume = np.array([p["volume_mm3"] for p in truth])
    np.testing.assert_allclose(table.column("volume_mm3").to_numpy(), volume, rtol=1e-12)
    assert set(table.column("sample_id").to_pylist()) == {"ore-3"}
    assert set(table.column("run_id").to_pylist()) == {"run-42"}
    assert table.column("touches_border").to_pylist() == [p["touches_border"] or p["cut_by_fov"] for p in truth]
    fractions = sum(table.column(f"phase_{name}_fraction").to_numpy() for name in phases)
    np.testing.assert_allclose(fractions, 1.0)  # scan.json's ranges cover the whole grey axis


def test_cli_features_reads_labels_ome_zarr(synthetic_scan, tmp_path):
    scan, scan_dir, _ = synthetic_scan
    from ps3d_core.io import write_labels_ome_zarr

    zarr_labels = write_labels_ome_zarr(
        scan.labels, tmp_path / "labels.ome.zarr", scan.metadata.spacing_zyx_mm,
        attributes={"ps3d": {"sample_id": "ore-3"}}, chunks=(32, 32, 32),
    )  # fmt: skip
    out = tmp_path / "p.parquet"
    result = runner.invoke(app, ["features", str(zarr_labels), str(scan_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == scan.truth["particle_count"]
    # labels recorded for another sample are refused
    other = write_labels_ome_zarr(
        scan.labels, tmp_path / "other.ome.zarr", scan.metadata.spacing_zyx_mm, attributes={"ps3d": {"sample_id": "x"}}
    )
    line = run_bad("features", str(other), str(scan_dir), "--out", str(out))
    assert "holds the labels of sample 'x', but the scan" in line


def run_bad(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_features_bad_input(synthetic_scan, tmp_path):
    scan, scan_dir, labels_tif = synthetic_scan
    out = tmp_path / "p.parquet"
    small = tmp_path / "small.tif"
    write_tiff(small, scan.labels[:10])
    assert str(small) in run_bad("features", str(small), str(scan_dir), "--out", str(out))
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, scan.labels.astype(np.float32))
    assert "particle labels must be integers" in run_bad("features", str(floats), str(scan_dir), "--out", str(out))
    assert "is the scan's image itself" in run_bad(
        "features", str(scan_dir / "scan.tif"), str(scan_dir), "--out", str(out)
    )
    assert "does not exist" in run_bad("features", str(tmp_path / "nope.tif"), str(scan_dir), "--out", str(out))
    assert not out.exists()
    help_text = runner.invoke(app, ["features", "--help"])
    assert help_text.exit_code == 0 and "--workers" in help_text.output and "--run-id" in help_text.output
