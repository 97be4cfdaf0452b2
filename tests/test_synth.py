"""Synthetic scans: determinism, exact ground truth, geometry and CT physics."""

from __future__ import annotations

import dataclasses
import json

import cc3d
import numpy as np
import pytest
import tifffile

from ps3d_core.synth import (
    PRESETS,
    ctsim,
    materials,
    phantom,
    shapes,
    synthesize,
    synthesize_samples,
    touching_count,
    write_synthetic_scan,
)
from ps3d_core.synth.truth import split_pieces
from schemas.scan import ScanMetadata, load_scan_metadata

#: A tiny preset whose particles are small enough to be many (touching-rate statistics).
MANY = dataclasses.replace(PRESETS["tiny"], median_diameter=(9.0, 11.0), solids_fraction=(0.2, 0.25))
#: The projection model on a volume small enough for unit tests.
PROJECTED = dataclasses.replace(PRESETS["typical"], name="projected", shape=(12, 64, 64), median_diameter=(10.0, 14.0))


def shifted_touching_count(labels: np.ndarray) -> int:
    """Independent reference: labels sharing a face, by explicit per-axis slicing."""
    touching = set()
    for a, b in (
        (labels[1:], labels[:-1]),
        (labels[:, 1:], labels[:, :-1]),
        (labels[:, :, 1:], labels[:, :, :-1]),
    ):
        contact = (a != b) & (a != 0) & (b != 0)
        touching.update(a[contact].tolist())
        touching.update(b[contact].tolist())
    return len(touching)


@pytest.fixture(scope="module")
def tiny_scans():
    return [
        synthesize("tiny", seed, stream=stream) for seed, stream in ((0, "feed"), (3, "concentrate"), (5, "tailings"))
    ]


# --- determinism -----------------------------------------------------------------


def test_same_seed_gives_same_bytes(tmp_path):
    first = synthesize_samples(tmp_path / "a", "tiny", 1, seed=7)
    synthesize_samples(tmp_path / "b", "tiny", 1, seed=7)
    assert [p.name for p in first] == ["synth-tiny-s7-000"]
    names = ["synth-tiny-s7-000/scan.tif", "synth-tiny-s7-000/scan.json", "synth-tiny-s7-000/_SCAN_COMPLETE"]
    names += [f"_truth/synth-tiny-s7-000_{suffix}" for suffix in ("labels.tif", "phases.tif", "truth.json")]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_different_seeds_differ():
    a, b = synthesize("tiny", 1), synthesize("tiny", 2)
    assert a.image.shape == b.image.shape
    assert not np.array_equal(a.image, b.image)
    assert a.truth["parameters"] != b.truth["parameters"]


def test_projection_model_does_not_depend_on_worker_count():
    one = synthesize(PROJECTED, 4, workers=1)
    two = synthesize(PROJECTED, 4, workers=2)
    np.testing.assert_array_equal(one.image, two.image)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.truth == two.truth


def test_synthesize_samples_derives_seeds_and_cycles_streams(tmp_path):
    calls = []
    paths = synthesize_samples(tmp_path, "tiny", 2, seed=11, progress=lambda done, total: calls.append((done, total)))
    assert [p.name for p in paths] == ["synth-tiny-s11-000", "synth-tiny-s11-001"]
    assert calls == [(1, 2), (2, 2)]
    streams = [load_scan_metadata(p).stream.value for p in paths]
    assert streams == ["feed", "concentrate"]
    truth = json.loads((tmp_path / "_truth" / "synth-tiny-s11-001_truth.json").read_text())
    assert truth["batch"] == {"seed": 11, "index": 1}
    again = synthesize("tiny", truth["seed"], stream="concentrate", sample_id="synth-tiny-s11-001")
    np.testing.assert_array_equal(again.image, tifffile.imread(paths[1] / "scan.tif"))


# --- ground truth ----------------------------------------------------------------


def test_ground_truth_is_consistent(tiny_scans):
    for scan in tiny_scans:
        labels, phases, truth = scan.labels, scan.phases, scan.truth
        assert labels.dtype == np.uint32 and phases.dtype == np.uint8
        np.testing.assert_array_equal(phases > 0, labels > 0)
        ids = np.unique(labels[labels > 0])
        assert truth["particle_count"] == len(ids) == int(labels.max())
        counts = np.bincount(labels.ravel())
        assert [p["voxel_count"] for p in truth["particles"]] == counts[1:].tolist()
        assert [p["id"] for p in truth["particles"]] == ids.tolist()
        # One 6-connected component per label: relabelling finds no extra pieces.
        assert cc3d.connected_components(labels, connectivity=6).max() == len(ids)
        assert truth["touching_count"] == shifted_touching_count(labels.astype(np.int64)) == touching_count(labels)
        assert truth["touching_rate"] == pytest.approx(truth["touching_count"] / truth["particle_count"])
        assert sum(p["touching"] != [] for p in truth["particles"]) == truth["touching_count"]
        for record in truth["particles"]:
            assert sum(record["phase_voxels"].values()) == record["voxel_count"]
        json.dumps(truth)  # serialisable


def test_phases_come_from_the_sample_phase_table(tiny_scans):
    for scan in tiny_scans:
        table = {p["id"]: p for p in scan.truth["phases"]}
        assert set(np.unique(scan.phases[scan.phases > 0]).tolist()) <= set(table)
        assert all(p["mu_relative_to_epoxy"] > 0 for p in table.values())


def test_particles_are_cut_by_volume_border_and_field_of_view(tiny_scans):
    records = [p for scan in tiny_scans for p in scan.truth["particles"]]
    assert any(p["touches_border"] for p in records)
    assert any(p["cut_by_fov"] for p in records)
    assert all(p["truncated"] for p in records if p["cut_by_fov"])
    for scan in tiny_scans:
        n = scan.labels.shape[1]
        radius = scan.truth["parameters"]["fov_radius"]
        yy, xx = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
        outside = yy**2 + xx**2 > radius**2
        if outside.any():
            assert not scan.labels[:, outside].any()
            # Outside the reconstruction circle the image is one dark fill value.
            assert len(np.unique(scan.image[:, outside])) == 1
            assert scan.image[:, outside][0, 0] < np.median(scan.image[:, ~outside])


def test_distractors_are_present_and_background():
    rng = np.random.default_rng(0)
    mineralogy = materials.draw_mineralogy(
        rng, "feed", low_contrast_share=0.0, heavy_accessory=False, accessory_rate=0.1
    )
    table = {"matrix": np.array([1.0]), "air": np.array([0.0]), "sucrose": np.array([1.4])}
    table |= {m: np.array([3.0]) for m in mineralogy.materials}
    spec = phantom.PhantomSpec(
        shape=(48, 64, 64),
        mount_radius=31.0,
        median_diameter=10.0,
        sigma_ln=0.3,
        solids_fraction=0.15,
        kind_weights=(("angular", 1.0),),
        touching_rate=0.05,
        spacer_fraction=0.1,
        spacer_void_share=0.5,
        spacer_size_ratio=1.2,
        bubble_fraction=0.02,
        bubble_size_ratio=0.6,
    )
    built = phantom.build_phantom(spec, mineralogy, table, np.random.SeedSequence(1))
    assert {"bubble", "sugar_grain", "sugar_void"} <= set(built.distractors)
    distractor = built.owner < 0
    assert distractor.any()
    labels, _ = split_pieces(np.maximum(built.owner, 0))
    assert not labels[distractor].any() and not built.phase[distractor].any()
    # Bubbles are darker than the matrix, sugar grains brighter: both unlabelled.
    values = built.channels[0]
    kinds = np.array(built.distractors)[-built.owner[distractor] - 1]
    assert values[distractor][kinds == "bubble"].mean() < 0.5
    assert 1.0 < values[distractor][kinds == "sugar_grain"].mean() <= 1.4 + 1e-5


def test_distractors_reported_in_truth(tiny_scans):
    for scan in tiny_scans:
        distractors = scan.truth["distractors"]
        assert sum(distractors["placed"].values()) >= sum(distractors["in_image"].values())
    assert any(sum(scan.truth["distractors"]["in_image"].values()) for scan in tiny_scans)
    assert any(scan.truth["distractors"]["voxels_in_image"] > 0 for scan in tiny_scans)


def test_touching_count_on_a_hand_made_volume():
    labels = np.zeros((4, 5, 6), np.uint32)
    labels[0, 0, 0:2] = 1
    labels[0, 0, 2] = 2  # face contact with 1
    labels[1, 1, 3] = 3  # diagonal to 2 only: not touching
    labels[3, 4, 5] = 4
    labels[2, 4, 5] = 5  # face contact with 4 along z
    assert touching_count(labels) == 4 == shifted_touching_count(labels.astype(np.int64))
    assert touching_count(np.zeros((3, 3, 3), np.uint32)) == 0


def test_touching_rate_follows_the_request():
    low = [synthesize(MANY, seed, touching_rate=0.02).truth for seed in (0, 1)]
    high = [synthesize(MANY, seed, touching_rate=0.2).truth for seed in (0, 1)]
    assert all(t["particle_count"] >= 60 for t in low + high)
    assert np.mean([t["touching_rate"] for t in high]) > np.mean([t["touching_rate"] for t in low]) + 0.1
    for truth in high:
        assert truth["touching_rate"] == pytest.approx(0.2, abs=0.05)
    for truth in low:
        assert truth["touching_rate"] == pytest.approx(0.02, abs=0.03)


# --- output contract ---------------------------------------------------------------


def test_scan_directory_contract(tmp_path, tiny_scans):
    scan = tiny_scans[0]
    scan_dir = write_synthetic_scan(scan, tmp_path)
    assert scan_dir == tmp_path / scan.metadata.sample_id
    metadata = load_scan_metadata(scan_dir)
    assert isinstance(metadata, ScanMetadata) and metadata == scan.metadata
    assert metadata.particle_size_mm == pytest.approx(scan.truth["whole_particle_diameter"]["mean_mm"])
    assert 0.005 <= metadata.spacing_mm <= 0.05
    assert "synthetic" in metadata.notes.lower() and "tiny" in metadata.notes and "seed 0" in metadata.notes
    ranges = list(metadata.phases.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == 65536
    assert all(low < high for low, high in ranges)
    assert all(previous[1] == following[0] for previous, following in zip(ranges, ranges[1:]))
    roles = {phase["role"] for phase in scan.truth["phases"]}
    assert all(set(name.split("_")) <= roles | {"low", "contrast"} for name in metadata.phases)
    image = tifffile.imread(scan_dir / "scan.tif")
    assert image.dtype == np.uint16 and image.ndim == 3 and max(image.shape) <= 96
    np.testing.assert_array_equal(image, scan.image)
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "_truth" / f"{metadata.sample_id}_labels.tif"), scan.labels
    )
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "_truth" / f"{metadata.sample_id}_phases.tif"), scan.phases
    )
    truth = json.loads((tmp_path / "_truth" / f"{metadata.sample_id}_truth.json").read_text())
    assert truth == scan.truth
    for key in (
        "generator_version",
        "preset",
        "seed",
        "parameters",
        "phases",
        "distractors",
        "piece_diameter",
        "whole_particle_diameter",
    ):
        assert key in truth
    assert not list(scan_dir.glob("*labels*"))  # truth stays outside the scan directory


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        synthesize("huge", 0)
    with pytest.raises(ValueError, match="stream"):
        synthesize("tiny", 0, stream="waste")
    with pytest.raises(ValueError, match="touching_rate"):
        synthesize("tiny", 0, touching_rate=0.9)
    with pytest.raises(ValueError, match="sample_id"):
        synthesize("tiny", 0, sample_id="a/b")


def test_presets_cover_the_paper_size_range():
    assert max(PRESETS["tiny"].shape) <= 96
    low = min(p.median_diameter[0] for p in PRESETS.values())
    high = max(p.median_diameter[1] for p in PRESETS.values())
    assert low <= 8.0 and high >= 90.0
    assert {p.physics for p in PRESETS.values()} == {"image", "projection"}
    assert PRESETS["typical"].physics == PRESETS["hard"].physics == "projection"
    assert PRESETS["typical"].shape == PRESETS["hard"].shape == (256, 256, 256)
    for preset in PRESETS.values():
        assert preset.touching_rate[0] >= 0.01 and preset.touching_rate[1] <= 0.2


def test_grade_depends_on_stream():
    def grade(stream):
        return np.mean(
            [
                materials.draw_mineralogy(
                    np.random.default_rng(s), stream, low_contrast_share=0, heavy_accessory=False, accessory_rate=0
                ).grade
                for s in range(50)
            ]
        )

    assert grade("tailings") < grade("feed") < grade("concentrate")


# --- shapes and partial volume -------------------------------------------------------


@pytest.mark.parametrize("radius", [8.0, 10.5, 16.0])
def test_sphere_partial_volume_matches_analytic_volume(radius):
    for subvoxel in ([0.0, 0.0, 0.0], [0.31, 0.72, 0.5]):
        rendered = shapes.render(shapes.sphere(radius), np.array(subvoxel))
        assert rendered.occupancy.sum() == pytest.approx(4.0 / 3.0 * np.pi * radius**3, rel=0.02)


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_every_shape_kind_has_the_requested_size(kind):
    rng = np.random.default_rng(3)
    shape = shapes.draw_shape(rng, kind, 24.0)
    assert shape.equivalent_diameter == pytest.approx(24.0)
    rendered = shapes.render(shape, rng.random(3))
    assert rendered.occupancy.sum() == pytest.approx(shape.volume, rel=0.03)
    assert cc3d.connected_components(rendered.mask.astype(np.uint8), connectivity=6).max() == 1


def test_xray_table_matches_reference_contrasts():
    tables = materials.load_tables()
    at60 = int(np.argmin(np.abs(tables.energies_kev - 60.0)))
    ratio = {
        name: tables.mu_of(name)[at60] / tables.mu_of("epoxy")[at60]
        for name in ("quartz", "sucrose", "polypropylene", "galena", "pyrite")
    }
    assert ratio["quartz"] == pytest.approx(3.1, abs=0.2)
    assert ratio["sucrose"] == pytest.approx(1.4, abs=0.05)
    assert ratio["polypropylene"] < 1.0
    assert ratio["galena"] > 150 and 15 < ratio["pyrite"] < 25
    assert np.allclose(tables.spectra.sum(axis=1), 1.0, atol=1e-4)


# --- projection physics ---------------------------------------------------------------


def _disk(m: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A centred disk (float32 0/1) and the radius of every pixel."""
    yy, xx = np.meshgrid(np.arange(m) - (m - 1) / 2, np.arange(m) - (m - 1) / 2, indexing="ij")
    return (yy**2 + xx**2 <= radius**2).astype(np.float32), np.hypot(yy, xx)


def test_monochromatic_reconstruction_recovers_mu():
    proj = ctsim.projector(96, 96, 144, 48.0)
    disk, r = _disk(96, 36.0)
    physics = ctsim.ProjectionPhysics(pixel_cm=0.01, basis_mu=np.array([[0.8]]), weights=np.array([1.0]))
    image = ctsim.simulate_slice(proj, disk[None], physics)
    assert image[r < 30].mean() == pytest.approx(0.8, rel=0.03)
    assert np.abs(image[r < 30] - 0.8).max() < 0.03 * 0.8
    assert abs(image[(r > 40) & (r < 46)].mean()) < 0.01


def test_polychromatic_beam_hardening_cups_the_centre():
    proj = ctsim.projector(96, 96, 144, 48.0)
    disk, r = _disk(96, 40.0)
    spec = materials.spectrum(int(np.flatnonzero(materials.load_tables().kvp == 60.0)[0]))
    mu = materials.mu_at(["quartz"], spec.energies_kev).T
    poly = ctsim.simulate_slice(
        proj, disk[None], ctsim.ProjectionPhysics(pixel_cm=0.02, basis_mu=mu, weights=spec.weights)
    )
    centre, edge = poly[r < 6].mean(), poly[(r > 33) & (r < 37)].mean()
    assert centre < 0.95 * edge
    effective = np.array([[float(spec.weights @ mu[:, 0])]])
    mono = ctsim.simulate_slice(
        proj, disk[None], ctsim.ProjectionPhysics(pixel_cm=0.02, basis_mu=effective, weights=np.array([1.0]))
    )
    assert mono[r < 6].mean() == pytest.approx(mono[(r > 33) & (r < 37)].mean(), rel=0.01)


def test_rings_appear_only_with_detector_gain_errors():
    proj = ctsim.projector(96, 96, 144, 48.0)
    disk, r = _disk(96, 40.0)
    physics = ctsim.ProjectionPhysics(pixel_cm=0.01, basis_mu=np.array([[1.0]]), weights=np.array([1.0]))

    def ring_energy(image):
        """Roughness of the azimuthally averaged radial profile inside the disk."""
        inside = (r > 1.5) & (r < 36)
        bins = np.round(r[inside]).astype(int)
        profile = (np.bincount(bins, image[inside]) / np.maximum(np.bincount(bins), 1))[2:]
        return np.abs(np.diff(profile, 2)).mean()

    clean = ctsim.simulate_slice(proj, disk[None], physics)
    gains = ctsim.detector_gains(np.random.default_rng(0), 1, 96, 0.01, 0.05)[0]
    ringed = ctsim.simulate_slice(proj, disk[None], physics, gain=gains)
    assert ring_energy(clean) < 5e-3
    assert ring_energy(ringed) > 10 * ring_energy(clean)


def test_projector_matches_analytic_line_integrals_and_noise_is_seeded():
    proj = ctsim.projector(64, 64, 90, 32.0)
    yy, xx = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    sigma, dy, dx = 5.0, 6.0, -4.0
    blob = np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * sigma**2)).astype(np.float32)
    theta = np.pi * np.arange(90) / 90
    # The blob centre (x right, y up) projects to t = x cos + y sin.
    t = np.arange(64) - 31.5
    centre = dx * np.cos(theta) - dy * np.sin(theta)
    analytic = np.sqrt(2 * np.pi) * sigma * np.exp(-((t[None, :] - centre[:, None]) ** 2) / (2 * sigma**2))
    assert np.abs(proj.forward(blob) - analytic).max() < 0.02 * analytic.max()
    physics = ctsim.ProjectionPhysics(pixel_cm=0.01, basis_mu=np.array([[1.0]]), weights=np.array([1.0]), photons=1e4)
    noisy = [ctsim.simulate_slice(proj, blob[None], physics, np.random.default_rng(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.array_equal(noisy[0], noisy[2])


def test_image_domain_model_adds_streaks_between_dense_grains():
    mu = np.zeros((2, 64, 64), np.float32)
    mu[:, 10:54, 10:54] = 1.0
    mu[:, 20:26, 20:26] = mu[:, 38:44, 38:44] = 50.0
    residual = ctsim.beam_hardening_residual(mu, 0.2)
    between = residual[:, 30:34, 30:34].mean()
    aside = residual[:, 14:18, 46:50].mean()
    assert between < aside  # darker on the line joining the grains
