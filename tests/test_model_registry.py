"""Current-model resolution and promotion (ps3d_core.model_registry, flows.retrain.decide_promotion)."""

from __future__ import annotations

import json
import shutil

from ps3d_core.model_registry import CURRENT_JSON, current_record, promote, resolve_model
from ps3d_core.models import DEFAULT_MODEL_DIR


def _comparison(promote_it: bool) -> dict:
    metrics = {"f1": 0.9, "f1_match": 0.8, "f1_instance": 0.7, "merger_ratio": 0.01, "splitter_ratio": 0.02}
    return {"candidate": {"mean": {"model": metrics}}, "current": {"mean": {"model": metrics}},
            "promote": promote_it, "reason": "F1_instance 0.700 vs 0.600"}


def test_resolution_order(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("PS3D_MODEL", raising=False)
    home = tmp_path / "home"
    assert resolve_model(home) == DEFAULT_MODEL_DIR.absolute()
    candidate = home / "models" / "tiny-1"
    shutil.copytree(tiny_model_dir, candidate)
    promote(home, candidate, "first")
    assert json.loads((home / "models" / CURRENT_JSON).read_text())["path"] == "tiny-1"
    assert resolve_model(home) == candidate.absolute()
    monkeypatch.setenv("PS3D_MODEL", str(tiny_model_dir))
    assert resolve_model(home) == tiny_model_dir.absolute()
    assert resolve_model(home, "/x").as_posix() == "/x"


def test_better_candidate_promoted_worse_kept_out(tmp_path, tiny_model_dir, monkeypatch):
    from flows.retrain import EVALUATION_JSON, decide_promotion

    monkeypatch.delenv("PS3D_MODEL", raising=False)
    home = tmp_path / "home"
    first, second, third = (home / "models" / f"tiny-{i}" for i in (1, 2, 3))
    for folder in (first, second, third):
        shutil.copytree(tiny_model_dir, folder)
    assert decide_promotion(home, first, _comparison(True))["promoted"]
    assert resolve_model(home) == first.absolute()
    decision = decide_promotion(home, second, _comparison(False))
    assert not decision["promoted"] and current_record(home)["path"] == "tiny-1"
    assert resolve_model(home) == first.absolute()  # the worse candidate stays out
    assert (second / EVALUATION_JSON).is_file() and second.is_dir()  # but is kept, with its evaluation
    assert decide_promotion(home, third, _comparison(True))["promoted"]
    assert resolve_model(home) == third.absolute() and first.is_dir()  # earlier versions kept
