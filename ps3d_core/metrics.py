"""Instance segmentation metrics of the ParticleSeg3D paper (section 4.1, Eqs. 1-6).

Everything is computed from one sparse contingency table: the number of
voxels shared by each (predicted particle, reference particle) pair, with
label 0 standing for background on either side. No per-particle mask is ever
built, so a 512^3 volume with 10^4 particles is evaluated in seconds (see
``bench/metrics_speed.py``).

Definitions (the paper is exact about F1, F1_match's 0.1 threshold and Eqs.
4-6; where it is silent, the choices below are ours and are stated in
:func:`evaluate`):

* pairwise Dice of predicted particle ``p`` and reference particle ``r``:
  ``2 |p & r| / (|p| + |r|)``;
* *candidate match*: a pair with Dice >= 0.1 (the paper's "minimum 0.1 F1
  overlap of its particle voxels");
* *matching*: one-to-one, a maximum-cardinality matching over candidate pairs
  that, among those, maximises the total Dice (solved exactly with the
  Hungarian algorithm on each connected component of the candidate graph);
* *merger*: a predicted particle holding the majority (> 50 %) of the voxels of
  two or more reference particles, each of which is also a candidate match of
  it; *splitter*: the same with the roles of prediction and reference swapped.
"""

from __future__ import annotations

import os

import fastremap
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ps3d_core.errors import ScanError

#: Minimum pairwise Dice of a match (paper, section 4.1.1).
MATCH_THRESHOLD = 0.1

#: Candidate-graph components larger than this (n_pred * n_ref) are matched
#: greedily instead of with the Hungarian algorithm, whose dense cost matrix
#: would not fit in memory. They only arise for pathological predictions (for
#: example a whole dense packing shifted by half a particle).
_HUNGARIAN_MAX_CELLS = 4_000_000


def contingency(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Sparse contingency table of two label volumes.

    Parameters
    ----------
    pred, ref : ndarray, shape (Z, Y, X), integer dtype
        Instance labels, 0 = background. Label ids need not be consecutive.

    Returns
    -------
    p, r : ndarray, shape (K,), int64
        Renumbered label of each non-empty pair: predicted particles are
        ``1..n_pred``, reference particles ``1..n_ref``, 0 is background.
        The pair (0, 0) is never listed.
    count : ndarray, shape (K,), int64
        Number of voxels in each pair.
    n_pred, n_ref : int
        Number of distinct non-zero labels in ``pred`` and ``ref``.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    # Only voxels where either side is foreground can contribute; extracting
    # them first makes the renumbering and the unique below work on a
    # fraction of the volume and leaves the caller's arrays untouched.
    foreground = pred != 0
    foreground |= ref != 0
    # Boolean masks count as one particle each; fastremap needs integers.
    p = pred[foreground].view(np.uint8) if pred.dtype == bool else pred[foreground]
    r = ref[foreground].view(np.uint8) if ref.dtype == bool else ref[foreground]
    del foreground
    # Renumber to 1..n so that the pair key p * (n_ref + 1) + r fits in int64
    # whatever the original ids (uint64 ids would overflow otherwise).
    p, _ = fastremap.renumber(p, preserve_zero=True, in_place=True)
    r, _ = fastremap.renumber(r, preserve_zero=True, in_place=True)
    n_pred = int(p.max()) if p.size else 0
    n_ref = int(r.max()) if r.size else 0
    key = p.astype(np.int64)
    del p
    key *= n_ref + 1
    key += r.astype(np.int64, copy=False)
    del r
    # fastremap.unique is a counting/sorting hybrid, ~4x faster than np.unique here.
    keys, counts = fastremap.unique(key, return_counts=True)
    keys = np.asarray(keys, dtype=np.int64)
    return keys // (n_ref + 1), keys % (n_ref + 1), np.asarray(counts, dtype=np.int64), n_pred, n_ref


def _ratio(numerator: float, denominator: float, empty: float) -> float:
    """``numerator / denominator``, or ``empty`` when both are zero."""
    return float(numerator / denominator) if denominator else float(empty)


def _match(pi: np.ndarray, ri: np.ndarray, dice: np.ndarray, n_pred: int) -> np.ndarray:
    """One-to-one matching of candidate pairs.

    Parameters
    ----------
    pi, ri : ndarray, shape (E,), int64
        Predicted and reference particle (1-based, renumbered) of each candidate pair.
    dice : ndarray, shape (E,), float64
        Pairwise Dice of each candidate pair (all >= the match threshold).
    n_pred : int
        Number of predicted particles (node offset of reference particles).

    Returns
    -------
    ndarray, shape (E,), bool
        Which candidate pairs are matched.
    """
    matched = np.zeros(pi.size, dtype=bool)
    if pi.size == 0:
        return matched
    # Components of the bipartite candidate graph (predicted nodes 0..n_pred-1,
    # reference nodes n_pred..): the matching decomposes over them, and almost
    # all are a single pair, matched without any solver.
    nodes = n_pred + int(ri.max())
    graph = coo_matrix((np.ones(pi.size, dtype=np.int8), (pi - 1, n_pred + ri - 1)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    edge_component = component[pi - 1]
    order = np.argsort(edge_component, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(edge_component[order]) != 0])
    sizes = np.diff(np.r_[starts, order.size])
    matched[order[starts[sizes == 1]]] = True
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        edges = order[start : start + size]
        preds, p_local = np.unique(pi[edges], return_inverse=True)
        refs, r_local = np.unique(ri[edges], return_inverse=True)
        if preds.size * refs.size > _HUNGARIAN_MAX_CELLS:
            matched[edges[_greedy(p_local, r_local, dice[edges])]] = True
            continue
        # Lexicographic objective (as in StarDist's matching): every match is
        # worth 1, plus its Dice scaled so that all the Dice together weigh
        # less than one extra match. The Hungarian solution then has the
        # largest possible number of matches and, among those, the largest
        # total Dice; both are symmetric in prediction and reference.
        weight = np.zeros((preds.size, refs.size))
        weight[p_local, r_local] = 1.0 + dice[edges] / (2.0 * (min(preds.size, refs.size) + 1))
        rows, cols = linear_sum_assignment(weight, maximize=True)
        chosen = np.zeros((preds.size, refs.size), dtype=bool)
        chosen[rows, cols] = weight[rows, cols] > 0
        matched[edges] = chosen[p_local, r_local]
    return matched


def _greedy(p_local: np.ndarray, r_local: np.ndarray, dice: np.ndarray) -> np.ndarray:
    """Greedy one-to-one matching by descending Dice (ties: lower ids first)."""
    order = np.lexsort((r_local, p_local, -dice))
    used_p: set[int] = set()
    used_r: set[int] = set()
    keep = np.zeros(dice.size, dtype=bool)
    for e in order:
        a, b = int(p_local[e]), int(r_local[e])
        if a not in used_p and b not in used_r:
            used_p.add(a)
            used_r.add(b)
            keep[e] = True
    return keep


def _group_errors(owner: np.ndarray) -> tuple[int, int]:
    """Count groups of size >= 2 in ``owner`` and their excess members.

    Parameters
    ----------
    owner : ndarray, shape (N,), int64
        For each particle on one side that is associated with a particle on
        the other side, the id of that particle (each particle appears once).

    Returns
    -------
    n_groups : int
        Number of particles on the other side owning two or more (|G|).
    excess : int
        Sum over those groups of (size - 1), the numerator of Eqs. 5 and 6.
    """
    if owner.size == 0:
        return 0, 0
    _, sizes = np.unique(owner, return_counts=True)
    big = sizes[sizes >= 2]
    return int(big.size), int((big - 1).sum())


def evaluate(pred: np.ndarray, ref: np.ndarray, *, match_threshold: float = MATCH_THRESHOLD) -> dict:
    """Segmentation and separation accuracy of a prediction (paper Eqs. 2-6).

    Parameters
    ----------
    pred : ndarray, shape (Z, Y, X), integer dtype
        Predicted instance labels, 0 = background; ids need not be consecutive.
    ref : ndarray, shape (Z, Y, X), integer dtype
        Reference (ground-truth) instance labels, same convention.
    match_threshold : float, optional
        Minimum pairwise Dice of a match; 0.1 in the paper.

    Returns
    -------
    dict
        JSON-ready (Python ``float`` and ``int``):

        ``f1`` : float
            Voxel Dice of the foreground (Eq. 2), labels ignored.
        ``f1_match`` : float
            ``2 TP / (2 TP + FP + FN)`` over particles (Eq. 3), ``TP`` the
            matched pairs, ``FP = n_pred - TP``, ``FN = n_ref - TP``.
        ``f1_instance`` : float
            Eq. 4: the sum of the matched pairs' Dice divided by the number of
            instances ``TP + FP + FN``; unmatched predicted and unmatched
            reference particles count as instances with Dice 0.
        ``merger_ratio``, ``splitter_ratio`` : float
            Eqs. 5 and 6: ``(sum |M| - |GM|) / n_ref`` and
            ``(sum |S| - |GS|) / n_ref``.
        ``mergers``, ``splitters`` : int
            ``|GM|`` and ``|GS|``: number of merged predicted particles and of
            split reference particles.
        ``n_pred``, ``n_ref``, ``tp``, ``fp``, ``fn`` : int
            Particle counts.

    Notes
    -----
    Matching. The Dice of every overlapping pair is computed from the
    contingency table. Pairs with Dice >= ``match_threshold`` are candidates
    (the paper's criterion); a particle may have several candidates (a merged
    prediction is a candidate for each of the particles it covers). The
    matching is one-to-one: among all one-to-one selections of candidate pairs
    it has the largest number of pairs and, among those, the largest sum of
    Dice (Hungarian algorithm on each connected component of the candidate
    graph; components with more than 4e6 pred x ref cells, which only a
    pathological prediction produces, are matched greedily by descending Dice).

    Mergers and splitters. The paper defines a merger set ``M`` as the
    reference particles "incorrectly merged into a single" predicted particle
    and a splitter set ``S`` as the predicted particles that are "all part of
    the same reference particle", but gives no overlap rule. We use: a
    reference particle ``r`` belongs to the merger set of predicted particle
    ``p`` when more than half of ``r``'s voxels lie in ``p`` *and* ``(p, r)``
    is a candidate match (Dice >= ``match_threshold``); ``p`` is a merger when
    its set has two or more members. Symmetrically, ``p`` belongs to the
    splitter set of ``r`` when more than half of ``p``'s voxels lie in ``r``
    and ``(p, r)`` is a candidate; ``r`` is split when its set has two or more
    members. The majority condition makes the sets disjoint (no particle is
    counted twice); the candidate condition ignores specks (a few false
    positive voxels inside a particle are not a split, a tiny reference
    particle swallowed by a large prediction is not a merger), which is the
    paper's own notion of two particles corresponding to each other.

    Empty volumes. When both prediction and reference have no foreground,
    ``f1``, ``f1_match`` and ``f1_instance`` are 1.0 (nothing to find, nothing
    found); when only one is empty they are 0.0. The ratios are 0.0 when there
    is no reference particle. No division warnings are raised.
    """
    p, r, count, n_pred, n_ref = contingency(np.asarray(pred), np.asarray(ref))

    # Voxel confusion matrix (Eq. 2); background-background voxels are never listed.
    tp_v = int(count[(p > 0) & (r > 0)].sum())
    fp_v = int(count[r == 0].sum())
    fn_v = int(count[p == 0].sum())
    f1 = _ratio(2 * tp_v, 2 * tp_v + fp_v + fn_v, empty=1.0)

    pred_size = np.bincount(p, weights=count, minlength=n_pred + 1)
    ref_size = np.bincount(r, weights=count, minlength=n_ref + 1)
    pair = (p > 0) & (r > 0)
    pi, ri, inter = p[pair], r[pair], count[pair].astype(np.float64)
    dice = 2.0 * inter / (pred_size[pi] + ref_size[ri])

    candidate = dice >= match_threshold
    matched = _match(pi[candidate], ri[candidate], dice[candidate], n_pred)
    tp = int(matched.sum())
    fp = n_pred - tp
    fn = n_ref - tp
    f1_match = _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)
    # Eq. 4: unmatched particles are instances whose TP_i is 0, i.e. Dice 0.
    f1_instance = _ratio(float(dice[candidate][matched].sum()), tp + fp + fn, empty=1.0)

    # More than half of r inside p (resp. of p inside r): at most one owner each.
    merge_link = candidate & (inter * 2 > ref_size[ri])
    split_link = candidate & (inter * 2 > pred_size[pi])
    mergers, merged_excess = _group_errors(pi[merge_link])
    splitters, split_excess = _group_errors(ri[split_link])

    return {
        "f1": f1,
        "f1_match": f1_match,
        "f1_instance": f1_instance,
        "merger_ratio": _ratio(merged_excess, n_ref, empty=0.0),
        "splitter_ratio": _ratio(split_excess, n_ref, empty=0.0),
        "mergers": mergers,
        "splitters": splitters,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (Z, Y, X) integer label volume with the platform's reader (TIFF, zarr, OME-Zarr, NIfTI)."""
    from ps3d_core.io import read_image

    volume = read_image(path)
    if not np.issubdtype(volume.dtype, np.integer):
        raise ScanError(path, f"expected integer labels, got dtype {volume.dtype}")
    return volume


def evaluate_files(pred_path: str | os.PathLike[str], ref_path: str | os.PathLike[str], **kwargs) -> dict:
    """:func:`evaluate` on two label files (TIFF or OME-Zarr).

    Parameters
    ----------
    pred_path, ref_path : path
        Predicted and reference label volumes, shape (Z, Y, X), integer dtype.
    **kwargs
        Passed to :func:`evaluate`.

    Returns
    -------
    dict
        As :func:`evaluate`.

    Raises
    ------
    ScanError
        A file cannot be read, is not a 3D integer volume, or the two shapes differ.
    """
    pred = _read_labels(pred_path)
    ref = _read_labels(ref_path)
    if pred.shape != ref.shape:
        raise ScanError(
            pred_path,
            f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)} ({ref_path})",
        )
    return evaluate(pred, ref, **kwargs)
