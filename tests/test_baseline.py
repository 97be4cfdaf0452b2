"""ThreshWater baseline (paper section 4.3.1)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from ps3d_core.baseline import (
    DEFAULTS_PATH,
    ThreshWaterParams,
    estimate_particle_radius,
    fill_small_holes,
    auto_threshold,
    threshwater,
)
from ps3d_core.metrics import evaluate


def _balls(shape, centres, radius) -> np.ndarray:
    """Reference labels 1..N of balls (z, y, x centres, radius in voxels)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    labels = np.zeros(shape, dtype=np.uint16)
    for i, centre in enumerate(centres, start=1):
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside & (labels == 0)] = i
    return labels


def _scan(labels: np.ndarray, noise: float = 40.0, seed: int = 0) -> np.ndarray:
    """A CT-like image, float32: particles 120, epoxy 20, Gaussian noise, then a
    1-voxel blur (reconstruction correlates CT noise; ``noise`` is the
    standard deviation before the blur, about 6x the one after it)."""
    image = np.where(labels > 0, 120.0, 20.0)
    image += np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return ndi.gaussian_filter(image, 1.0).astype(np.float32)


def test_touching_spheres_are_separated():
    ref = _balls((48, 48, 64), [(24, 24, 21), (24, 24, 42)], 10)  # centres 21 apart: in contact
    labels = threshwater(_scan(ref))
    assert labels.dtype == np.uint32 and labels.shape == ref.shape
    result = evaluate(labels, ref)
    assert (result["n_pred"], result["tp"], result["mergers"], result["splitters"]) == (2, 2, 0, 0)
    assert result["f1_instance"] > 0.8


def test_spheres_with_a_neck_are_separated_with_enough_erosion():
    ref = _balls((48, 48, 64), [(24, 24, 22), (24, 24, 40)], 10)  # neck radius ~4.4 voxels
    labels = threshwater(_scan(ref), replace(ThreshWaterParams(), erosion_rel=0.6))
    result = evaluate(labels, ref)
    assert (result["n_pred"], result["tp"], result["mergers"]) == (2, 2, 0)


def test_single_particle_is_not_split():
    # An ellipsoid (semi-axes 8, 11, 16 voxels): elongated, not split by the seeds.
    z, y, x = np.ogrid[:40, :40, :56]
    ref = (((z - 20) / 8.0) ** 2 + ((y - 20) / 11.0) ** 2 + ((x - 28) / 16.0) ** 2 <= 1).astype(np.uint8)
    labels = threshwater(_scan(ref, seed=1))
    assert labels.max() == 1
    assert evaluate(labels, ref)["f1_instance"] > 0.85


def test_noise_specks_are_removed():
    ref = _balls((40, 40, 40), [(20, 20, 20)], 9)
    image = _scan(ref)
    rng = np.random.default_rng(3)
    specks = rng.integers(0, 40, (30, 3))
    specks = specks[np.linalg.norm(specks - 20, axis=1) > 14]
    image[tuple(specks.T)] = 200.0  # isolated bright voxels in the epoxy
    assert threshwater(image).max() == 1  # removed by the size filter
    # ... and by the opening alone.
    assert threshwater(image, ThreshWaterParams(opening_rel=0.2, min_size_rel=0.0)).max() == 1
    assert threshwater(image, ThreshWaterParams(opening_rel=0.0, min_size_rel=0.0)).max() > 1


def test_empty_and_constant_images():
    for image in (np.zeros((16, 16, 16), np.uint16), np.full((16, 16, 16), 7.0, np.float32)):
        labels = threshwater(image)
        assert labels.dtype == np.uint32 and labels.shape == image.shape and labels.max() == 0


def test_dark_particles_and_explicit_threshold():
    ref = _balls((40, 40, 40), [(20, 20, 20)], 9)
    image = 140.0 - _scan(ref)  # particles dark (20), epoxy bright (120)
    labels = threshwater(image, ThreshWaterParams(threshold=70.0, bright_particles=False))
    assert labels.max() == 1
    assert evaluate(labels, ref)["f1"] > 0.9


def test_otsu_ignores_the_zero_field_of_view_padding():
    ref = _balls((40, 40, 40), [(20, 20, 20)], 12)
    image = _scan(ref, noise=10.0) + 1000.0  # grey values far from zero
    _, y, x = np.ogrid[:40, :40, :40]
    image[:, (y[0] - 20) ** 2 + (x[0] - 20) ** 2 > 19**2] = 0.0  # outside the cylindrical FOV
    threshold = auto_threshold(image)
    assert 1040.0 < threshold < 1100.0
    assert auto_threshold(image, ignore_zero=False) < 1000.0  # what the padding would do
    # Subsampling changes nothing for a clear bimodal image.
    assert abs(auto_threshold(image, samples=5000) - threshold) < 10.0


def test_radius_estimate():
    for radius in (6, 12, 20):
        ball = _balls((2 * radius + 6,) * 3, [(radius + 3,) * 3], radius) > 0
        assert estimate_particle_radius(ball) == pytest.approx(radius, rel=0.1)
    # Noise holes and specks barely move the estimate.
    ball = _balls((40, 40, 40), [(20, 20, 20)], 12) > 0
    rng = np.random.default_rng(0)
    noisy = ball ^ (rng.random(ball.shape) < 0.02)
    assert estimate_particle_radius(noisy) == pytest.approx(12, rel=0.15)


def test_fill_small_holes_keeps_open_background():
    mask = np.ones((10, 10, 10), dtype=bool)
    mask[5, 5, 5] = False  # a cavity
    mask[0, :, :] = False  # background on the volume edge
    filled = fill_small_holes(mask, max_size=5)
    assert filled[5, 5, 5] and not filled[0].any()
    assert not fill_small_holes(mask, max_size=1)[5, 5, 5]  # only cavities under max_size


def test_multiotsu_finds_the_particle_epoxy_threshold_with_a_dense_phase():
    # Epoxy 20, most particles 60, a few very dense ones 250: Otsu separates
    # the dense phase; the lowest multi-Otsu threshold separates particles.
    ref = _balls((40, 40, 40), [(12, 12, 12), (28, 28, 28), (12, 28, 20)], 7)
    image = np.where(ref == 3, 250.0, np.where(ref > 0, 60.0, 20.0))
    image = image + np.random.default_rng(0).normal(0, 3, image.shape)
    assert auto_threshold(image) > 60.0
    assert 25.0 < auto_threshold(image, method="multiotsu") < 55.0
    labels = threshwater(image, ThreshWaterParams(threshold_method="multiotsu"))
    assert evaluate(labels, ref)["tp"] == 3
    with pytest.raises(ValueError, match="threshold_method"):
        ThreshWaterParams(threshold_method="li")


def test_defaults_come_from_the_json_file():
    stored = json.loads(DEFAULTS_PATH.read_text())
    params = ThreshWaterParams()
    for name, value in stored["params"].items():
        assert getattr(params, name) == value
    assert ThreshWaterParams.from_dict(params.to_dict() | {"note": "ignored"}) == params
