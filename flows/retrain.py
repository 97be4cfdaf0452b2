"""Model maintenance flows: weekly retraining with promotion, re-segmentation, evaluation.

* ``retrain``: trains a candidate on the annotated scans of
  ``<home>/annotations/`` (``scans/<scan dirs>`` and ``labels/<sample_id>_labels.tif``),
  starting from the current model's weights when it has the same
  architecture (``init_from_current``), into ``<home>/models/<name>-<UTC time>/``;
  scores candidate and current model on the same held-out synthetic scans
  (:func:`ps3d_core.training.compare_models`) and promotes the candidate only
  when it is better (``<home>/models/current.json`` is replaced atomically).
  Every candidate folder is kept, promoted or not, with its ``evaluation.json``.
* ``resegment``: re-ingests every stored sample whose model version is not the
  current one (all with ``force``) from its archived scan (``<home>/scans/``).
* ``evaluate``: the current model's metrics on held-out synthetic scans, as an artifact.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ps3d_core import __version__, catalog
from ps3d_core.io import write_text_atomic
from ps3d_core.model_registry import (
    current_record,
    describe_model,
    models_dir,
    promote,
    resolve_model,
    update_retrain_state,
)

ANNOTATIONS_DIR = "annotations"
EVALUATION_JSON = "evaluation.json"


def _metrics_table(comparison: dict[str, Any]) -> str:
    rows = ["| model | F1_instance | F1_match | F1 | merger ratio | splitter ratio |", "|---|---|---|---|---|---|"]
    for label in ("candidate", "current"):
        result = comparison.get(label)
        if result is None:
            continue
        m = result["mean"]["model"]
        rows.append(f"| {label} | {m['f1_instance']:.3f} | {m['f1_match']:.3f} | {m['f1']:.3f} | "
                    f"{m['merger_ratio']:.3f} | {m['splitter_ratio']:.3f} |")  # fmt: skip
    return "\n".join(rows)


def decide_promotion(home: str | Path, candidate: str | Path, comparison: dict[str, Any]) -> dict[str, Any]:
    """Record the comparison beside the candidate and promote it when ``comparison["promote"]``."""
    candidate = Path(candidate)
    write_text_atomic(candidate / EVALUATION_JSON, json.dumps(comparison, indent=1, default=str) + "\n")
    if comparison["promote"]:
        return {"promoted": True, "current": promote(home, candidate, comparison.get("reason", ""))}
    return {"promoted": False, "current": current_record(home)}


def same_architecture(model_dir: str | Path, config: Any) -> bool:
    """Whether a model folder's network has the patch size and stages of a ``TrainingConfig``."""
    try:
        plans = json.loads((Path(model_dir) / "plans.json").read_text(encoding="utf-8"))
        metadata = json.loads((Path(model_dir) / "ps3d_model.json").read_text(encoding="utf-8"))
        arch = next(iter(plans["configurations"].values()))["architecture"]["arch_kwargs"]
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return False
    return (
        tuple(metadata.get("patch_size", ())) == tuple(config.patch_size)
        and tuple(arch.get("features_per_stage", ())) == tuple(config.features_per_stage)
        and arch.get("n_conv_per_stage") in (config.n_conv_per_stage, [config.n_conv_per_stage] * len(config.features_per_stage))
        and arch.get("n_conv_per_stage_decoder")
        in (config.n_conv_per_stage_decoder, [config.n_conv_per_stage_decoder] * (len(config.features_per_stage) - 1))
    )


def _record_completion(home: Path, status: str, run_id: str | None) -> None:
    """The time of this completed retraining, for the platform's catch-up of missed ones."""
    from prefect.runtime import flow_run

    update_retrain_state(home, last_completed_at=datetime.now(timezone.utc), last_status=status,
                         last_run_id=run_id, last_flow_run_id=str(flow_run.id) if flow_run.id else None)  # fmt: skip


@flow(name="retrain", log_prints=True)
def retrain(
    home: str | None = None,
    epochs: int = 10,
    iterations: int = 50,
    device: str = "auto",
    init_from_current: bool = True,
    time_budget_minutes: float | None = None,
    eval_preset: str = "typical",
    eval_samples: int = 4,
    eval_seed: int = 1000,
    margin: float = 0.0,
    training_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a candidate on ``<home>/annotations/``, evaluate it against the current model, promote if better."""
    from flows.isolated import run_isolated
    from ps3d_core.training import TrainingConfig, pair_scans_with_labels

    logger = get_run_logger()
    home_path = catalog.resolve_home(home)
    annotations = home_path / ANNOTATIONS_DIR
    scans, labels = annotations / "scans", annotations / "labels"
    if not scans.is_dir() or not any(p.is_dir() for p in scans.iterdir()):
        logger.info("no annotated scans in %s: nothing to train", scans)
        _record_completion(home_path, "no annotations", None)
        return {"status": "no annotations", "annotations": str(annotations)}
    started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
    run_id = f"retrain-{started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    current = resolve_model(home_path)
    current_info = describe_model(current)
    stamp = f"{started_at:%Y%m%dT%H%M%SZ}"
    name = current_info["name"]
    candidate_dir = models_dir(home_path) / f"{name}-{stamp}"
    options = dict(training_options or {})
    config = TrainingConfig(
        name=name, version=stamp, epochs=epochs, iterations_per_epoch=iterations, device=device,
        time_budget_minutes=time_budget_minutes,
        training_data=f"annotated scans of {annotations} (retrain run {run_id})", **options,
    )  # fmt: skip
    if init_from_current:
        if same_architecture(current, config):
            config = config.model_copy(update={"init_model": str(current)})
        else:
            logger.info("the current model %s has another architecture than the training configuration: "
                        "training from scratch", current)  # fmt: skip
    parameters = {"flow": "retrain", "config": config.model_dump(mode="json"), "current": current_info}
    catalog.record_run(home_path, {"run_id": run_id, "status": "running", "started_at": started_at,
                                   "parameters": parameters, "host": socket.gethostname()})  # fmt: skip
    try:
        cases = pair_scans_with_labels(scans, labels)  # every scan has its labels: fail early and clearly
        logger.info("training a candidate on %d annotated scans into %s", len(cases), candidate_dir)
        # in a fresh process: nnU-Net's process pools hang inside a flow-run process (flows/isolated.py)
        comparison = run_isolated("train_and_compare", {
            "scans": str(scans), "labels": str(labels), "candidate_dir": str(candidate_dir),
            "config": config.model_dump(mode="json"), "current": str(current),
            "evaluation": {"preset": eval_preset, "samples": eval_samples, "seed": eval_seed, "margin": margin,
                           "device": device},
        }, log=logger.info)  # fmt: skip
        t_train = time.perf_counter() - t0
        decision = decide_promotion(home_path, candidate_dir, comparison)
    except Exception as error:
        catalog.record_run(home_path, {"run_id": run_id, "status": "failed", "started_at": started_at,
                                       "finished_at": datetime.now(timezone.utc), "parameters": parameters,
                                       "error": f"{type(error).__name__}: {error}"[:10_000]})  # fmt: skip
        raise
    timings = {"train_and_compare": round(t_train, 3), "total": round(time.perf_counter() - t0, 3)}
    catalog.record_run(home_path, {"run_id": run_id, "status": "succeeded", "started_at": started_at,
                                   "finished_at": datetime.now(timezone.utc), "timings": timings,
                                   "parameters": parameters | {"candidate": str(candidate_dir),
                                                               "promoted": decision["promoted"],
                                                               "reason": comparison["reason"]},
                                   "versions": {"ps3d": __version__}})  # fmt: skip
    verdict = "promoted" if decision["promoted"] else "not promoted (current model kept)"
    _record_completion(home_path, verdict, run_id)
    create_markdown_artifact(
        key="retrain",
        markdown=f"# Retraining {stamp}: candidate {verdict}\n\n{comparison['reason']}\n\n"
        + _metrics_table(comparison) + f"\n\nCandidate: `{candidate_dir}`",
        description=f"candidate {verdict}",
    )
    logger.info("candidate %s %s: %s", candidate_dir.name, verdict, comparison["reason"])
    return {"status": verdict, "promoted": decision["promoted"], "candidate": str(candidate_dir),
            "reason": comparison["reason"], "run_id": run_id, "timings": timings}  # fmt: skip


@flow(name="resegment", log_prints=True)
def resegment_all(
    home: str | None = None,
    model_dir: str | None = None,
    segment_options: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Re-ingest every stored sample not yet segmented with the current model (all with ``force``)."""
    from flows.ingest import SCANS_DIR, ingest_scan

    logger = get_run_logger()
    home_path = catalog.resolve_home(home)
    model = describe_model(resolve_model(home_path, model_dir))
    if not (home_path / "snapshot").exists():
        return {"status": "no samples", "results": []}
    rows = catalog.query(home_path, "SELECT sample_id, model_version, status FROM samples ORDER BY sample_id",
                         limit=None).table.to_pylist()  # fmt: skip
    results = []
    for row in rows:
        archived = home_path / SCANS_DIR / row["sample_id"]
        if not force and row["model_version"] == model["version"] and row["status"] == "ingested":
            continue
        if not archived.is_dir():
            logger.warning("%s: no archived scan in %s; skipped", row["sample_id"], archived)
            continue
        try:
            result = ingest_scan(scan_path=str(archived), model_dir=model["path"], segment_options=segment_options,
                                 home=str(home_path), force=force, quarantine_failed=False)  # fmt: skip
            results.append({"sample_id": row["sample_id"], "status": result["status"]})
        except Exception as error:  # noqa: BLE001 - one sample's failure does not stop the others
            results.append({"sample_id": row["sample_id"], "status": "failed", "error": str(error)})
    logger.info("resegmented %d sample(s) with %s %s", len(results), model["name"], model["version"])
    return {"status": "done", "model": model, "results": results}


@flow(name="evaluate", log_prints=True)
def evaluate_current(
    home: str | None = None,
    preset: str = "typical",
    samples: int = 4,
    seed: int = 1000,
    device: str = "auto",
) -> dict[str, Any]:
    """The current model's metrics (and ThreshWater's) on held-out synthetic scans; a markdown artifact."""
    from flows.isolated import run_isolated

    home_path = catalog.resolve_home(home)
    current = resolve_model(home_path)
    result = run_isolated("evaluate", {"model_dir": str(current), "preset": preset, "samples": samples,
                                       "seed": seed, "device": device}, log=get_run_logger().info)  # fmt: skip
    info = describe_model(current)
    create_markdown_artifact(
        key="evaluate",
        markdown=f"# Model {info['name']} {info['version']} on {samples} held-out '{preset}' scans\n\n"
        + _metrics_table({"current": result}),
        description=f"{info['name']} {info['version']}",
    )
    return {"model": info, "mean": result["mean"]}
