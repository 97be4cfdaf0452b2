"""Particle splitting tool (paper section 3.1, Figure 5)."""

from __future__ import annotations

import numpy as np
import pytest

from ps3d_core.annotate import rasterize_polyline, split_particle, split_particle_file
from ps3d_core.io import read_image, write_tiff

CENTRE_Z = CENTRE_Y = 12
LEFT_X, RIGHT_X, NECK_X = 10, 34, 22


def _dumbbell() -> np.ndarray:
    """Two radius-8 balls at x=10 and x=34 joined by a radius-3 neck (label 5),
    plus an unrelated ball (label 7) and a background speck-free margin."""
    z, y, x = np.ogrid[:25, :25, :60]
    r2 = (z - CENTRE_Z) ** 2 + (y - CENTRE_Y) ** 2
    labels = np.zeros((25, 25, 60), dtype=np.uint16)
    left = r2 + (x - LEFT_X) ** 2 <= 64
    right = r2 + (x - RIGHT_X) ** 2 <= 64
    neck = (r2 <= 9) & (x >= LEFT_X) & (x <= RIGHT_X)
    labels[left | right | neck] = 5
    labels[r2 + (x - 52) ** 2 <= 16] = 7
    return labels


def _border() -> list[tuple[int, int, int]]:
    """A line across the neck in the slice z=12, as a user would draw it."""
    return [(CENTRE_Z, y, NECK_X) for y in range(CENTRE_Y - 4, CENTRE_Y + 5)]


def test_dumbbell_is_split_at_the_drawn_border():
    labels = _dumbbell()
    before = labels.copy()
    out = split_particle(labels, 5, [(12, 12, LEFT_X), (12, 12, RIGHT_X)], _border())
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert out.dtype == labels.dtype
    # Fresh ids max+1, max+2 in marker order; the old id is gone.
    assert set(np.unique(out).tolist()) == {0, 7, 8, 9}
    particle = labels == 5
    np.testing.assert_array_equal(out > 0, labels > 0)
    x = np.broadcast_to(np.arange(60), labels.shape)
    # The 3D cut follows the plane of the drawn line, through the whole neck.
    assert np.all(out[particle & (x < NECK_X)] == 8)
    assert np.all(out[particle & (x > NECK_X)] == 9)
    # Other particles and the background are untouched.
    np.testing.assert_array_equal(out[~particle], labels[~particle])


def test_polyline_border_and_float_markers():
    labels = _dumbbell()
    border = rasterize_polyline([(12, 8, NECK_X), (12, 16, NECK_X)])
    assert border.shape == (9, 3)
    out = split_particle(labels, 5, [(11.8, 12.3, 9.6), (12.2, 11.9, 34.4)], border)
    # The dumbbell is symmetric about x=22: the halves differ by at most the
    # neck's cross-section in that plane, which goes to one side or the other.
    cross_section = int((labels[:, :, NECK_X] == 5).sum())
    assert abs(int((out == 8).sum()) - int((out == 9).sum())) <= cross_section


def test_three_markers_give_three_particles():
    labels = _dumbbell()
    border = _border() + [(CENTRE_Z, y, LEFT_X) for y in range(0, 25)]
    out = split_particle(labels, 5, [(12, 12, 5), (12, 12, 15), (12, 12, RIGHT_X)], border)
    assert set(np.unique(out).tolist()) == {0, 7, 8, 9, 10}


@pytest.mark.parametrize(
    ("label", "markers", "border", "message"),
    [
        (3, [(12, 12, 10), (12, 12, 34)], _border(), "label 3 is not in the volume"),
        (0, [(12, 12, 10), (12, 12, 34)], _border(), "background"),
        (5, [(12, 12, 10)], _border(), "at least 2 markers"),
        (5, [(12, 12, 10), (12, 12, 52)], _border(), "marker 1 at \\(12, 12, 52\\) lies on particle 7, not on particle 5"),
        (5, [(12, 12, 10), (0, 0, 0)], _border(), "lies on the background"),
        (5, [(12, 12, 10), (12, 12, 99)], _border(), "outside the volume"),
        (5, [(12, 12, 10), (12, 12, 10)], _border(), "same voxel"),
        (5, [(12, 12, 10), (12, 12, 34)], [(0, 0, 0)], "no border point lies on particle 5"),
    ],
)
def test_errors(label, markers, border, message):
    with pytest.raises(ValueError, match=message):
        split_particle(_dumbbell(), label, markers, border)


def test_new_ids_widen_the_dtype_when_needed():
    labels = _dumbbell().astype(np.uint8)
    labels[0, 0, 0] = 255
    out = split_particle(labels, 5, [(12, 12, 10), (12, 12, 34)], _border())
    assert out.dtype == np.uint16
    assert set(np.unique(out).tolist()) == {0, 7, 255, 256, 257}


def test_split_particle_file_tiff_and_zarr(tmp_path):
    labels = _dumbbell()
    source = tmp_path / "labels.tif"
    write_tiff(source, labels, spacing_zyx_mm=(0.01, 0.01, 0.01))
    expected = split_particle(labels, 5, [(12, 12, 10), (12, 12, 34)], _border())
    ids = split_particle_file(source, tmp_path / "split.tif", 5, [(12, 12, 10), (12, 12, 34)], _border())
    assert ids == [8, 9]
    np.testing.assert_array_equal(read_image(tmp_path / "split.tif"), expected)
    split_particle_file(source, tmp_path / "split.zarr", 5, [(12, 12, 10), (12, 12, 34)], _border())
    np.testing.assert_array_equal(read_image(tmp_path / "split.zarr"), expected)
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind
