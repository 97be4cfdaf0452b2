"""Held-out evaluation of a model against ThreshWater, and model comparison for promotion.

Scans are synthesised with :func:`ps3d_core.synth.synthesize_samples` from a
seed the training recipes never use (training draws from 2000-2999; see
``scripts/train_default_model.py``), segmented by the model through the
production pipeline (:func:`ps3d_core.inference.run_segmentation`) and by
ThreshWater, and scored with the paper's five metrics against the exact
ground truth.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ps3d_core.baseline import threshwater
from ps3d_core.inference import SegmentParams, run_segmentation
from ps3d_core.io import read_image
from ps3d_core.metrics import evaluate
from ps3d_core.synth import synthesize_samples

METRICS = ("f1", "f1_match", "f1_instance", "merger_ratio", "splitter_ratio")


def _mean(rows: list[dict]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in METRICS}


def evaluate_model(
    model_dir: str | os.PathLike[str] | None,
    *,
    preset: str = "typical",
    samples: int = 4,
    seed: int = 1000,
    device: str = "auto",
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The five paper metrics of the model and of ThreshWater on ``samples`` held-out synthetic scans.

    Returns
    -------
    dict
        ``preset``, ``seed``, ``model`` (folder), ``scans``: one entry per scan
        (``sample_id``, ``particles``, ``model`` and ``threshwater`` metrics),
        and ``mean``: the metrics averaged over scans, per method.
    """
    # a weak candidate that finds nothing scores zero; it is not a bad scan
    params = SegmentParams(model_dir=model_dir, device=device, require_particles=False)
    scans = []
    with tempfile.TemporaryDirectory(prefix="ps3d-evaluate-") as tmp:
        tmp = Path(tmp)
        paths = synthesize_samples(tmp / "scans", preset, samples, seed, workers=workers)
        for scan_dir in paths:
            sample_id = scan_dir.name
            truth = read_image(tmp / "scans" / "_truth" / f"{sample_id}_labels.tif")
            run_segmentation(scan_dir, tmp / "out" / sample_id, params)
            predicted = read_image(tmp / "out" / sample_id / "labels.ome.zarr")
            image = read_image(scan_dir / "scan.tif")
            entry = {
                "sample_id": sample_id,
                "particles": int(len(np.unique(truth)) - 1),
                "model": {k: float(v) for k, v in evaluate(predicted, truth).items() if k in METRICS},
                "threshwater": {k: float(v) for k, v in evaluate(threshwater(image), truth).items() if k in METRICS},
            }
            scans.append(entry)
            if progress is not None:
                progress(
                    f"{sample_id}: model F1_instance {entry['model']['f1_instance']:.3f}, "
                    f"ThreshWater {entry['threshwater']['f1_instance']:.3f}"
                )
    return {
        "preset": preset,
        "seed": seed,
        "model": str(model_dir) if model_dir is not None else "default",
        "scans": scans,
        "mean": {method: _mean([s[method] for s in scans]) for method in ("model", "threshwater")},
    }


def compare_models(
    candidate: str | os.PathLike[str],
    current: str | os.PathLike[str] | None,
    *,
    preset: str = "typical",
    samples: int = 4,
    seed: int = 1000,
    margin: float = 0.0,
    device: str = "auto",
) -> dict:
    """Evaluate two models on the same held-out scans; ``promote`` when the candidate is better.

    Better means a higher mean F1_instance by more than ``margin``, with the
    mean MergerRatio and SplitterRatio not worse by more than 0.01 each (a
    model that trades separation for overlap is not promoted). With no
    ``current`` model the candidate is promoted.
    """
    new = evaluate_model(candidate, preset=preset, samples=samples, seed=seed, device=device)
    if current is None:
        return {"candidate": new, "current": None, "promote": True, "reason": "no current model"}
    old = evaluate_model(current, preset=preset, samples=samples, seed=seed, device=device)
    a, b = new["mean"]["model"], old["mean"]["model"]
    gain = a["f1_instance"] - b["f1_instance"]
    worse = [k for k in ("merger_ratio", "splitter_ratio") if a[k] > b[k] + 0.01]
    promote = gain > margin and not worse
    reason = (
        f"F1_instance {a['f1_instance']:.3f} vs {b['f1_instance']:.3f} ({gain:+.3f}, margin {margin})"
        + (f"; worse {', '.join(worse)}" if worse else "")
    )
    return {"candidate": new, "current": old, "promote": promote, "reason": reason}
