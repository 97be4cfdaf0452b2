"""Metrics of paper section 4.1 on hand-made cases with values computed by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ps3d_core.errors import ScanError
from ps3d_core.io import write_tiff
from ps3d_core.metrics import evaluate, evaluate_files


def _strict(pred, ref):
    """evaluate() with every warning (division by zero, ...) an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return evaluate(pred, ref)


def _two_cubes() -> np.ndarray:
    """A 4^3 cube (label 1, 64 voxels) touching a 3^3 cube (label 2, 27 voxels)."""
    ref = np.zeros((8, 8, 10), dtype=np.uint16)
    ref[1:5, 1:5, 1:5] = 1
    ref[1:4, 1:4, 5:8] = 2
    return ref


def _line(*segments: tuple[int, int, int], length: int = 300) -> np.ndarray:
    """A (1, 1, length) volume with ``label`` on x in [start, stop) per (start, stop, label)."""
    volume = np.zeros((1, 1, length), dtype=np.int32)
    for start, stop, label in segments:
        volume[0, 0, start:stop] = label
    return volume


def test_perfect_prediction():
    ref = _two_cubes()
    result = _strict(ref, ref)
    assert result == {
        "f1": 1.0,
        "f1_match": 1.0,
        "f1_instance": 1.0,
        "merger_ratio": 0.0,
        "splitter_ratio": 0.0,
        "mergers": 0,
        "splitters": 0,
        "n_pred": 2,
        "n_ref": 2,
        "tp": 2,
        "fp": 0,
        "fn": 0,
    }


def test_permuted_and_large_ids_give_the_same_result():
    ref = _two_cubes()
    pred = ref.copy()
    pred[4, 1:3, 1:3] = 0  # some imperfection so the values are not trivial
    base = evaluate(pred, ref)
    permuted = np.zeros(pred.shape, dtype=np.uint64)
    permuted[pred == 1] = 2**40 + 7
    permuted[pred == 2] = 3
    assert evaluate(permuted, ref) == base
    ref_permuted = np.where(ref == 1, 9, np.where(ref == 2, 4, 0)).astype(np.int64)
    assert evaluate(pred, ref_permuted) == base


def test_one_merger():
    ref = _two_cubes()
    pred = (ref > 0).astype(np.uint8)  # both reference particles as one
    result = _strict(pred, ref)
    # Dice(pred, cube 1) = 2*64 / (91 + 64) = 128/155 > Dice(pred, cube 2) = 54/118:
    # pred matches cube 1, cube 2 is a false negative.
    assert result["f1"] == 1.0
    assert (result["tp"], result["fp"], result["fn"]) == (1, 0, 1)
    assert result["f1_match"] == pytest.approx(2 / 3)
    assert result["f1_instance"] == pytest.approx((128 / 155) / 2)
    assert (result["mergers"], result["splitters"]) == (1, 0)
    assert result["merger_ratio"] == pytest.approx(0.5)  # (|M| - |GM|) / |P| = (2 - 1) / 2
    assert result["splitter_ratio"] == 0.0


def test_one_splitter():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:5, 1:5, 1:5] = 1  # 64 voxels
    pred = np.zeros_like(ref)
    pred[1:4, 1:5, 1:5] = 3  # 48 voxels
    pred[4:5, 1:5, 1:5] = 8  # 16 voxels
    result = _strict(pred, ref)
    # Dice 96/112 = 6/7 (matched) and 32/80 = 0.4 (candidate, unmatched).
    assert result["f1"] == 1.0
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["f1_match"] == pytest.approx(2 / 3)
    assert result["f1_instance"] == pytest.approx((6 / 7) / 2)
    assert (result["mergers"], result["splitters"]) == (0, 1)
    assert result["splitter_ratio"] == pytest.approx(1.0)  # (2 - 1) / 1
    assert result["merger_ratio"] == 0.0


def test_speck_inside_a_particle_is_a_false_positive_not_a_splitter():
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[1:11, 1:11, 1:11] = 1  # 1000 voxels
    pred = ref.copy()
    pred[5, 5, 5] = 2  # Dice 2/1001 < 0.1: no candidate
    result = _strict(pred, ref)
    assert (result["tp"], result["fp"], result["splitters"]) == (1, 1, 0)


def test_empty_prediction():
    ref = _two_cubes()
    result = _strict(np.zeros_like(ref), ref)
    assert (result["f1"], result["f1_match"], result["f1_instance"]) == (0.0, 0.0, 0.0)
    assert (result["n_pred"], result["n_ref"], result["tp"], result["fp"], result["fn"]) == (0, 2, 0, 0, 2)
    assert (result["merger_ratio"], result["splitter_ratio"]) == (0.0, 0.0)


def test_empty_reference():
    ref = _two_cubes()
    result = _strict(ref, np.zeros_like(ref))
    assert (result["f1"], result["f1_match"], result["f1_instance"]) == (0.0, 0.0, 0.0)
    assert (result["n_pred"], result["n_ref"], result["tp"], result["fp"], result["fn"]) == (2, 0, 0, 2, 0)
    assert (result["merger_ratio"], result["splitter_ratio"]) == (0.0, 0.0)


def test_background_only_volumes_are_a_perfect_match():
    empty = np.zeros((3, 4, 5), dtype=np.uint32)
    result = _strict(empty, empty)
    assert (result["f1"], result["f1_match"], result["f1_instance"]) == (1.0, 1.0, 1.0)
    assert (result["n_pred"], result["n_ref"], result["tp"], result["fp"], result["fn"]) == (0, 0, 0, 0, 0)
    assert (result["mergers"], result["splitters"], result["merger_ratio"], result["splitter_ratio"]) == (0, 0, 0.0, 0.0)


def test_match_threshold_boundary():
    ref = _line((0, 100, 1))
    # 10 shared voxels of 100 + 100: Dice = 20/200 = 0.1 exactly, a match.
    at = _strict(_line((90, 190, 5)), ref)
    assert (at["tp"], at["fp"], at["fn"]) == (1, 0, 0)
    assert at["f1_match"] == 1.0
    assert at["f1_instance"] == pytest.approx(0.1)
    assert at["f1"] == pytest.approx(0.1)
    # 9 shared voxels: Dice 0.09, no match.
    below = _strict(_line((91, 191, 5)), ref)
    assert (below["tp"], below["fp"], below["fn"]) == (0, 1, 1)
    assert (below["f1_match"], below["f1_instance"]) == (0.0, 0.0)
    assert below["f1"] == pytest.approx(0.09)


def test_matching_maximises_the_number_of_matches_then_dice():
    # r1 = [0, 100), r2 = [100, 130); A = [40, 130) covers 60 of r1 and all of r2,
    # B = [0, 40) covers the rest of r1. Dice: A-r1 120/190, A-r2 60/120, B-r1 80/140.
    # Greedy by Dice would take A-r1 and leave B and r2 unmatched; the documented
    # matching takes A-r2 and B-r1.
    ref = _line((0, 100, 1), (100, 130, 2))
    pred = _line((40, 130, 7), (0, 40, 9))
    result = _strict(pred, ref)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)
    assert result["f1_match"] == 1.0
    assert result["f1_instance"] == pytest.approx((60 / 120 + 80 / 140) / 2)
    # A holds the majority of r1 and r2 (merger); r1 holds all of B and 2/3 of A (splitter).
    assert (result["mergers"], result["splitters"]) == (1, 1)
    assert result["merger_ratio"] == pytest.approx(0.5)
    assert result["splitter_ratio"] == pytest.approx(0.5)


def test_inputs_are_not_modified():
    ref = _two_cubes()
    pred = np.roll(ref, 1, axis=0) * 5
    pred_copy, ref_copy = pred.copy(), ref.copy()
    evaluate(pred, ref)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(ref, ref_copy)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 2, 3\)"):
        evaluate(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8))


def test_evaluate_files_tiff(tmp_path):
    ref = _two_cubes()
    pred = (ref > 0).astype(np.uint16)
    write_tiff(tmp_path / "pred.tif", pred)
    write_tiff(tmp_path / "ref.tif", ref)
    assert evaluate_files(tmp_path / "pred.tif", tmp_path / "ref.tif") == evaluate(pred, ref)


def test_evaluate_files_shape_mismatch_names_both_shapes(tmp_path):
    write_tiff(tmp_path / "pred.tif", np.zeros((4, 16, 17), np.uint16))
    write_tiff(tmp_path / "ref.tif", np.zeros((4, 16, 18), np.uint16))
    with pytest.raises(ScanError) as info:
        evaluate_files(tmp_path / "pred.tif", tmp_path / "ref.tif")
    assert info.value.path == str(tmp_path / "pred.tif")
    assert "(4, 16, 17)" in info.value.problem and "(4, 16, 18)" in info.value.problem


_labels = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.uint64]),
    shape=hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
    elements=st.integers(0, 6),
)


@settings(max_examples=60, deadline=None)
@given(_labels)
def test_self_evaluation_is_perfect(x):
    result = evaluate(x, x)
    n = int(np.unique(x[x != 0]).size)
    assert result["f1"] == 1.0
    assert result["f1_match"] == 1.0
    assert result["f1_instance"] == pytest.approx(1.0)
    assert (result["tp"], result["fp"], result["fn"], result["n_pred"], result["n_ref"]) == (n, 0, 0, n, n)
    assert (result["mergers"], result["splitters"]) == (0, 0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_swapping_prediction_and_reference(data):
    x = data.draw(_labels)
    y = data.draw(hnp.arrays(dtype=np.uint16, shape=x.shape, elements=st.integers(0, 6)))
    xy, yx = evaluate(x, y), evaluate(y, x)
    assert xy["f1"] == yx["f1"]
    assert xy["f1_match"] == yx["f1_match"]
    assert xy["f1_instance"] == pytest.approx(yx["f1_instance"])
    assert (xy["tp"], xy["fp"], xy["fn"]) == (yx["tp"], yx["fn"], yx["fp"])
    # A merger of x against y is a splitter of y against x.
    assert (xy["mergers"], xy["splitters"]) == (yx["splitters"], yx["mergers"])
    for key in ("f1", "f1_match", "f1_instance", "merger_ratio", "splitter_ratio"):
        assert 0.0 <= xy[key] and (key.endswith("ratio") or xy[key] <= 1.0)


def test_huge_candidate_components_fall_back_to_greedy(monkeypatch):
    import ps3d_core.metrics as metrics

    ref = _line((0, 100, 1), (100, 130, 2))
    pred = _line((40, 130, 7), (0, 40, 9))
    monkeypatch.setattr(metrics, "_HUNGARIAN_MAX_CELLS", 0)
    result = evaluate(pred, ref)
    # Greedy by descending Dice takes A-r1 (120/190) first: one match only.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 1)
    assert result["f1_instance"] == pytest.approx((120 / 190) / 3)
