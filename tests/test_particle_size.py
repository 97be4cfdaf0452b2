"""Particle-size estimate from the image alone (``ps3d_core.particle_size``).

The truth of a synthetic scan is its ``scan.json`` ``particle_size_mm``: the
number-mean equivalent-sphere diameter of the whole particles in the scan
(``whole_particle_diameter.mean_mm`` of the generator's truth), which is what
the estimate approximates. The seeds here (3000 and up) were not used to
develop the method (2000-2019) nor by ``bench/particle_size_accuracy.py``
(5000 and up).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from ps3d_core import particle_size
from ps3d_core.errors import ScanError
from ps3d_core.io.volumes import ArrayVolume, open_volume
from ps3d_core.particle_size import estimate_particle_size_mm
from ps3d_core.synth import synthesize

#: Accuracy the estimate must reach on synthetic scans (relative to the truth).
TOLERANCE = 0.25


def _balls_scan(shape, diameter, seed=0, outside=None) -> np.ndarray:
    """uint16 CT-like scan of equal balls (``diameter`` voxels) on a jittered lattice, none overlapping.

    Epoxy 10000, balls 20000, a 1-voxel blur, then noise of 400 (SNR 25);
    ``outside``: the grey value filling the y-x corners outside an inscribed
    circle (a reconstruction's field of view).
    """
    rng = np.random.default_rng(seed)
    pitch = 1.5 * diameter
    axes = [np.arange(pitch / 2, n, pitch) for n in shape]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centres += rng.uniform(-0.2, 0.2, centres.shape) * diameter
    inside = np.zeros(shape, bool)
    r = diameter / 2
    for centre in centres:
        lo = [max(0, int(c - r) - 1) for c in centre]
        hi = [min(n, int(c + r) + 2) for c, n in zip(centre, shape)]
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r**2
        inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= ball
    image = ndimage.gaussian_filter(np.where(inside, 20000.0, 10000.0), 1.0)
    image += rng.normal(0.0, 400.0, shape)
    if outside is not None:
        _, ny, nx = shape
        yy, xx = np.ogrid[0:ny, 0:nx]
        image[:, np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) > min(ny, nx) / 2] = outside
    return np.clip(image, 0, 65535).astype(np.uint16)


class _CountingVolume(ArrayVolume):
    """An in-memory volume that records the slices each read asked for."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array, "counting", None)
        self.reads: list[tuple[int, int]] = []

    def _read(self, z0: int, z1: int) -> np.ndarray:
        self.reads.append((z0, z1))
        return super()._read(z0, z1)


@pytest.fixture(scope="module")
def tiny_scan():
    return synthesize("tiny", 3000, workers=1)


# --- accuracy on synthetic scans ---------------------------------------------------


def test_truth_is_the_mean_whole_particle_diameter(tiny_scan):
    assert tiny_scan.metadata.particle_size_mm == tiny_scan.truth["whole_particle_diameter"]["mean_mm"]


@pytest.mark.parametrize(
    ("preset", "seed"),
    [("tiny", seed) for seed in range(3000, 3008)] + [("small", seed) for seed in range(3000, 3004)],
)
def test_estimate_within_25_percent_of_the_truth(preset, seed):
    scan = synthesize(preset, seed, workers=1)
    estimate = estimate_particle_size_mm(scan.image, scan.metadata.spacing_zyx_mm)
    assert estimate == pytest.approx(scan.metadata.particle_size_mm, rel=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "seed"), [("typical", 3000), ("typical", 3001), ("hard", 3000), ("hard", 3001)])
def test_estimate_within_25_percent_on_large_scans(preset, seed):
    scan = synthesize(preset, seed, workers=2)
    estimate = estimate_particle_size_mm(scan.image, scan.metadata.spacing_zyx_mm)
    assert estimate == pytest.approx(scan.metadata.particle_size_mm, rel=TOLERANCE)


def test_equal_balls_measure_their_diameter():
    image = _balls_scan((96, 96, 96), 14.0, outside=1000)
    assert estimate_particle_size_mm(image, 0.01) == pytest.approx(0.14, rel=0.1)


def test_large_particles_are_measured_on_a_coarser_grid(monkeypatch):
    calls = []
    read_sample = particle_size.read_sample

    def recording(volume, factor, edge, outside):
        calls.append(factor)
        return read_sample(volume, factor, edge, outside)

    monkeypatch.setattr(particle_size, "read_sample", recording)
    image = _balls_scan((160, 192, 192), 40.0, outside=1000)
    assert estimate_particle_size_mm(image, 0.005) == pytest.approx(0.2, rel=0.1)
    assert calls[-1] > 1  # 40-voxel balls: a block-averaged grid, not full resolution


# --- invariances --------------------------------------------------------------------


def test_result_scales_with_the_voxel_size(tiny_scan):
    spacing = tiny_scan.metadata.spacing_zyx_mm
    once = estimate_particle_size_mm(tiny_scan.image, spacing)
    twice = estimate_particle_size_mm(tiny_scan.image, tuple(2 * s for s in spacing))
    assert twice == pytest.approx(2 * once, rel=1e-12)
    assert estimate_particle_size_mm(tiny_scan.image, spacing[0]) == once  # one number = isotropic


def test_volume_array_and_file_give_the_same_result(tiny_scan, tmp_path):
    spacing = tiny_scan.metadata.spacing_zyx_mm
    from_array = estimate_particle_size_mm(tiny_scan.image, spacing)
    assert estimate_particle_size_mm(ArrayVolume(tiny_scan.image, "scan", None), spacing) == from_array
    tifffile.imwrite(tmp_path / "scan.tif", tiny_scan.image)
    with open_volume(tmp_path / "scan.tif") as volume:
        assert estimate_particle_size_mm(volume, spacing) == from_array


def test_slab_size_does_not_change_the_result(tiny_scan, monkeypatch):
    spacing = tiny_scan.metadata.spacing_zyx_mm
    whole = estimate_particle_size_mm(tiny_scan.image, spacing)
    volume = _CountingVolume(tiny_scan.image)
    slice_bytes = tiny_scan.image[0].nbytes
    monkeypatch.setattr(particle_size, "SLAB_BYTES", 5 * slice_bytes)
    assert estimate_particle_size_mm(volume, spacing) == whole
    assert max(z1 - z0 for z0, z1 in volume.reads) <= 5


def test_a_deep_scan_is_sampled_not_read_whole():
    image = _balls_scan((1200, 48, 48), 12.0, seed=1)
    volume = _CountingVolume(image)
    assert estimate_particle_size_mm(volume, 0.01) == pytest.approx(0.12, rel=0.1)
    read = sum(z1 - z0 for z0, z1 in volume.reads)
    assert read < 0.7 * image.shape[0]


# --- no particles -------------------------------------------------------------------


def test_an_all_zero_image_is_an_error():
    with pytest.raises(ScanError, match="uniform.*particle_size_mm"):
        estimate_particle_size_mm(np.zeros((64, 64, 64), np.uint16), 0.01)


def test_an_image_without_particles_is_an_error():
    rng = np.random.default_rng(0)
    epoxy = ndimage.gaussian_filter(rng.normal(10000.0, 400.0, (96, 96, 96)), 1.0).astype(np.uint16)
    with pytest.raises(ScanError, match="no particles found.*particle_size_mm"):
        estimate_particle_size_mm(epoxy, 0.01)
    # dark bubbles (air) in the epoxy are not particles either
    bubbles = _balls_scan((96, 96, 96), 14.0)
    dark = np.where(bubbles > 15000, epoxy - 8000, epoxy).astype(np.uint16)
    with pytest.raises(ScanError, match="no particles found"):
        estimate_particle_size_mm(dark, 0.01)


def test_the_error_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((8, 32, 32), np.uint16))
    with open_volume(tmp_path / "empty.tif") as volume, pytest.raises(ScanError) as error:
        estimate_particle_size_mm(volume, 0.01)
    assert error.value.path == str(tmp_path / "empty.tif")


@pytest.mark.parametrize("spacing", [0.0, -0.01, float("nan"), (0.01, 0.01)])
def test_invalid_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match="spacing_zyx_mm"):
        estimate_particle_size_mm(np.zeros((8, 8, 8), np.uint16), spacing)
