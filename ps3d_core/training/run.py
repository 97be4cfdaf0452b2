"""Train a border-core model with nnU-Net v2 and write a self-contained model folder.

:func:`train_model` runs the whole recipe in one work directory:

1. the raw dataset (:func:`ps3d_core.training.dataset.write_raw_dataset`);
2. plans of a small ``PlainConvUNet`` (:func:`ps3d_core.models.make_plans`)
   and nnU-Net's own preprocessing of the crops;
3. :class:`~ps3d_core.training.trainer.PS3DTrainer`, instantiated directly,
   optionally starting from an existing model's weights (fine-tuning);
4. the model folder (:func:`ps3d_core.models.save_model_folder`, weights
   only, ``trainer_name='nnUNetTrainer'``) with ``MODEL_CARD.md``.

A run that stops early (a machine restart, a killed job) resumes with
``resume=True``: the work directory's prepared data is reused and training
continues from the newest readable nnU-Net checkpoint, with the optimizer,
learning-rate schedule and history it had.

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` lazily; they are pointed into the work directory for the
duration of the run. nnU-Net starts its preprocessing workers with
``spawn``: scripts calling :func:`train_model` need a
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ps3d_core.io import open_scan
from ps3d_core.io.atomic import write_text_atomic
from ps3d_core.models import (
    CHECKPOINT,
    IntensityNormalization,
    ModelMetadata,
    load_model,
    make_plans,
    save_model_folder,
)
from ps3d_core.training.dataset import TrainingCase, write_raw_dataset, zscore_statistics

CONFIGURATION = "3d_fullres"
DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Particles"
MODEL_CARD = "MODEL_CARD.md"
#: The run's TrainingConfig, kept in the work directory so that a resume can check it continues the same run.
RUN_CONFIG = "training_config.json"
#: Settings a resumed run may change: the time budget counts from the restart, and it may move to another device.
RESUME_MAY_CHANGE = frozenset({"time_budget_minutes", "device"})


class ResumeError(ValueError):
    """The work directory holds a training run that the requested one cannot continue."""


class TrainingConfig(BaseModel):
    """Everything that defines a training run (recorded in the model card).

    Defaults: a 0.7 M-parameter ``PlainConvUNet`` (4 stages, 12-96 features,
    two convolutions per encoder stage and one per decoder stage, 64^3 patch)
    at a target particle size of 32 voxels: small enough to train and run on a
    CPU. BENCHMARKS.md has the measurements behind the target size (accuracy
    ceiling of the representation against inference work).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="ps3d-model", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    version: str = "0.1.0"
    target_particle_size: float = Field(default=32.0, gt=0)
    border_thickness: int = Field(default=3, ge=1)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    features_per_stage: tuple[int, ...] = (12, 24, 48, 96)
    n_conv_per_stage: int = 2
    n_conv_per_stage_decoder: int = 1
    batch_size: int = Field(default=2, ge=1)
    epochs: int = Field(default=10, ge=1)
    iterations_per_epoch: int = Field(default=50, ge=1)
    val_iterations_per_epoch: int = Field(default=5, ge=1)
    initial_lr: float = Field(default=1e-2, gt=0)
    normalization: Literal["quantile", "zscore"] = "quantile"
    quantiles: tuple[float, float] = (0.5, 0.99)
    touching_probability: float = Field(default=0.5, ge=0, le=1)
    seed: int = 0
    device: str = "auto"
    init_model: str | None = None
    #: nnU-Net's data-augmentation processes; None: none on the CPU, where a batch's augmentation costs
    #: a tenth of its step and a worker process would take cores from the step, else one per spare core (<= 8)
    augmentation_workers: int | None = Field(default=None, ge=0)
    time_budget_minutes: float | None = Field(default=None, gt=0)
    training_data: str = ""


@contextlib.contextmanager
def _nnunet_paths(work: Path) -> Iterator[dict[str, Path]]:
    paths = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    names = (*paths, "nnUNet_n_proc_DA", "nnUNet_compile", "nnUNet_def_n_proc")
    saved = {name: os.environ.get(name) for name in names}
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    try:
        yield paths
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _normalization(config: TrainingConfig, cases: Sequence[TrainingCase]) -> IntensityNormalization:
    if config.normalization == "quantile":
        return IntensityNormalization(method="quantile", quantiles=config.quantiles)
    images = []
    for case in cases:
        with open_scan(case.scan_dir) as scan:
            images.append(scan.volume.read(0, scan.volume.shape[0]))
    mean, std = zscore_statistics(images)
    return IntensityNormalization(method="zscore", mean=mean, std=std)


def _device(name: str):
    import torch

    from ps3d_core.inference.pipeline import resolve_device

    return torch.device(resolve_device(name))


def _augmentation_workers(requested: int | None, device) -> int:
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _weights(network) -> dict:
    """A CPU copy of the weights that keeps tensors shared between modules shared.

    nnU-Net's conv blocks register each convolution twice (``conv`` and
    ``all_modules.0``); a per-key clone would store it twice.
    """
    module = getattr(network, "_orig_mod", network)
    return copy.deepcopy({key: value.detach().cpu() for key, value in module.state_dict().items()})


def _prepare_dataset(
    cases: Sequence[TrainingCase],
    raw: Path,
    preprocessed: Path,
    normalization: IntensityNormalization,
    config: TrainingConfig,
    log: Callable[[str], None],
) -> tuple[dict, dict]:
    """nnU-Net's raw dataset, plans and preprocessed crops; returns the plans and the dataset summary."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    log(f"preparing {len(cases)} scans at {config.target_particle_size:g} voxels per particle")
    info = write_raw_dataset(
        cases,
        raw,
        normalization,
        target_particle_size=config.target_particle_size,
        border_thickness=config.border_thickness,
        seed=config.seed,
    )
    plans = make_plans(
        patch_size=config.patch_size,
        features_per_stage=config.features_per_stage,
        n_conv_per_stage=config.n_conv_per_stage,
        n_conv_per_stage_decoder=config.n_conv_per_stage_decoder,
        configuration=CONFIGURATION,
        batch_size=config.batch_size,
        dataset_name=DATASET_NAME,
    )
    preprocessed.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "splits_final.json"):
        shutil.copy(raw / name, preprocessed / name)
    write_text_atomic(preprocessed / "nnUNetPlans.json", json.dumps(plans, indent=1))
    log(f"nnU-Net fingerprint and preprocessing of {info['crops']} crops")
    extract_fingerprint_dataset(DATASET_ID, num_processes=2, check_dataset_integrity=True, verbose=False,
                                show_progress_bar=False)  # fmt: skip
    preprocess_dataset(DATASET_ID, "nnUNetPlans", (CONFIGURATION,), (2,), show_progress_bar=False)
    return plans, info


def _training_seconds(logged: dict) -> float:
    """Seconds spent in training epochs, over every invocation of a resumed run."""
    return sum(end - start for start, end in zip(logged["epoch_start_timestamps"], logged["epoch_end_timestamps"]))


def _resumable_checkpoint(work: Path, config: TrainingConfig, log: Callable[[str], None]) -> Path | None:
    """The newest readable checkpoint of an earlier run of ``config`` in ``work``, or None.

    A run of another configuration (time budget and device aside) cannot be
    continued: that is an error, not a silent fresh start.
    """
    import torch

    recorded = work / RUN_CONFIG
    if not recorded.is_file():
        return None
    before = json.loads(recorded.read_text())
    now = config.model_dump(mode="json")
    differing = sorted(k for k in now.keys() - RESUME_MAY_CHANGE if before.get(k) != now[k])
    if differing:
        raise ResumeError(f"{work} holds a training run with other settings ({', '.join(differing)}): "
                         "resume with the same settings, or start afresh without resume")  # fmt: skip
    newest, newest_epoch = None, -1
    folder = work / "nnUNet_results" / DATASET_NAME / f"PS3DTrainer__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    for path in sorted(folder.glob("checkpoint_*.pth")):
        try:
            epoch = torch.load(path, map_location="cpu", weights_only=False)["current_epoch"]
        except Exception as error:  # a checkpoint cut short by the interruption itself
            log(f"skipping unreadable {path.name}: {error}")
            continue
        if epoch > newest_epoch:
            newest, newest_epoch = path, epoch
    return newest


def train_model(
    cases: Sequence[TrainingCase],
    out_dir: str | os.PathLike[str],
    config: TrainingConfig | None = None,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train on ``cases`` and write the model folder ``out_dir``; returns it.

    ``work_dir`` (default ``<out_dir>.work``) holds nnU-Net's raw,
    preprocessed and results folders and is removed after success. The
    model folder is written atomically: an existing one is replaced only by
    a complete new one. With ``resume`` an interrupted run of the same
    ``config`` in ``work_dir`` continues from its newest checkpoint (a time
    budget then counts from the restart); without a checkpoint it starts
    afresh.
    """
    import torch

    from ps3d_core.training.trainer import ITERATIONS_LOG, PS3DTrainer

    config = config or TrainingConfig()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    checkpoint = _resumable_checkpoint(work, config, log) if resume else None
    if checkpoint is None and work.exists():
        shutil.rmtree(work)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    with _nnunet_paths(work) as paths:
        device = _device(config.device)
        os.environ["nnUNet_n_proc_DA"] = str(_augmentation_workers(config.augmentation_workers, device))
        os.environ["nnUNet_compile"] = "f"
        os.environ["nnUNet_def_n_proc"] = "2"
        normalization = _normalization(config, cases)
        raw = paths["nnUNet_raw"] / DATASET_NAME
        preprocessed = paths["nnUNet_preprocessed"] / DATASET_NAME
        if checkpoint is None:
            plans, info = _prepare_dataset(cases, raw, preprocessed, normalization, config, log)
            write_text_atomic(work / RUN_CONFIG, json.dumps(config.model_dump(mode="json"), indent=1))
        else:
            plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
            info = json.loads((raw / "cases.json").read_text())
        dataset_json = json.loads((raw / "dataset.json").read_text())
        trainer_plans = plans | {"continue_training": False}  # nnU-Net pops this key
        trainer = PS3DTrainer(trainer_plans, CONFIGURATION, 0, dataset_json, device=device)
        trainer.num_epochs = config.epochs
        trainer.num_iterations_per_epoch = config.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = config.val_iterations_per_epoch
        trainer.initial_lr = config.initial_lr
        trainer.save_every = max(1, config.epochs // 5)
        trainer.particle_bank = str(raw / "particle_bank.npz") if info["bank_particles"] else None
        trainer.touching_probability = config.touching_probability
        trainer.border_thickness = config.border_thickness
        trainer.time_budget_s = config.time_budget_minutes * 60 if config.time_budget_minutes else None
        trainer.initialize()
        if checkpoint is not None:
            trainer.load_checkpoint(str(checkpoint))
            log(f"resuming from {checkpoint.name} after epoch {trainer.current_epoch} of {config.epochs}")
        elif config.init_model is not None:
            start = load_model(config.init_model, device="cpu")
            trainer.network.load_state_dict(start.networks[0].state_dict())
            log(f"fine-tuning from {config.init_model} ({start.metadata.name} {start.metadata.version})")
        log(
            f"training {config.epochs} epochs x {config.iterations_per_epoch} iterations on {trainer.device} "
            f"({sum(p.numel() for p in trainer.network.parameters()):,} parameters)"
        )
        trainer.run_training()
        logged = trainer.logger.local_logger.my_fantastic_logging
        history = {key: [float(v) for v in logged[key]] for key in ("train_losses", "val_losses", "mean_fg_dice")}
        history["iterations_per_epoch"] = [int(v) for v in logged[ITERATIONS_LOG]]
        weights = _weights(trainer.network)
    metadata = ModelMetadata(
        name=config.name,
        version=config.version,
        configuration=CONFIGURATION,
        intensity_normalization=normalization,
        target_particle_size_voxels=config.target_particle_size,
        border_thickness=config.border_thickness,
        patch_size=config.patch_size,
        folds=(0,),
        training_data=config.training_data or f"{len(cases)} annotated scans",
        created_at=datetime.now(timezone.utc),
    )
    folder = save_model_folder(out_dir, plans, dataset_json, {0: weights}, metadata)
    record = {
        "config": config.model_dump(mode="json"),
        "dataset": {k: info[k] for k in ("crops", "bank_particles")} | {"scans": [c["sample_id"] for c in info["cases"]]},
        "history": history,
        "training_seconds": round(_training_seconds(logged), 1),
    }
    write_text_atomic(folder / "training.json", json.dumps(record, indent=1))
    write_model_card(folder)
    shutil.rmtree(work, ignore_errors=True)
    log(f"model written to {folder} in {record['training_seconds']:.0f} s")
    return folder


def _metrics_table(results: dict) -> list[str]:
    lines = ["| method | F1 | F1_match | F1_instance | MergerRatio | SplitterRatio |", "|---|---|---|---|---|---|"]
    for method in ("model", "threshwater"):
        m = results["mean"][method]
        lines.append(
            f"| {method} | {m['f1']:.3f} | {m['f1_match']:.3f} | {m['f1_instance']:.3f} | "
            f"{m['merger_ratio']:.4f} | {m['splitter_ratio']:.4f} |"
        )
    return lines


def write_model_card(folder: str | os.PathLike[str], evaluations: Sequence[dict] = (), recipe: str | None = None) -> Path:
    """(Re)write ``MODEL_CARD.md`` from ``ps3d_model.json``, ``training.json`` and evaluation results."""
    folder = Path(folder)
    meta = json.loads((folder / "ps3d_model.json").read_text())
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    config = training.get("config", {})
    size = sum(p.stat().st_size for p in folder.rglob(CHECKPOINT))
    lines = [
        f"# {meta['name']} {meta['version']}",
        "",
        "Border-core particle segmentation model (ParticleSeg3D method) for micro-CT scans of particles in epoxy.",
        "",
        "## Model",
        f"- nnU-Net v2 `PlainConvUNet`, configuration `{meta['configuration']}`, patch {meta['patch_size']}, "
        f"features {config.get('features_per_stage', '?')}, folds {meta['folds']}, weights {size / 1e6:.1f} MB.",
        f"- Intensity normalisation: `{json.dumps(meta['intensity_normalization'])}` (ps3d_core.intensity).",
        f"- Target particle size {meta['target_particle_size_voxels']:g} voxels; border thickness "
        f"{meta['border_thickness']}.",
        f"- Created {meta['created_at']}.",
        "",
        "## Training",
        f"- Data: {meta.get('training_data', '')}",
    ]
    if training:
        history = training["history"]
        dice = history.get("mean_fg_dice") or [float("nan")]
        lines += [
            f"- {config['epochs']} epochs x {config['iterations_per_epoch']} iterations "
            f"({sum(history['iterations_per_epoch'])} run), batch {config['batch_size']}, "
            f"SGD lr {config['initial_lr']:g}, touching augmentation p={config['touching_probability']}, "
            f"device `{config['device']}`, seed {config['seed']}; {training['training_seconds'] / 60:.0f} min.",
            f"- {training['dataset']['crops']} training crops, {training['dataset']['bank_particles']} particles in "
            f"the touching-augmentation bank; final pseudo-Dice (validation patches) {dice[-1]:.3f}.",
        ]
    if recipe:
        lines += ["", "## Recipe", "", "```", recipe, "```"]
    for evaluation in evaluations:
        lines += [
            "",
            f"## Held-out evaluation: preset `{evaluation['preset']}`, {len(evaluation['scans'])} scans, "
            f"seed {evaluation['seed']}",
            "",
            *_metrics_table(evaluation),
        ]
    card = folder / MODEL_CARD
    write_text_atomic(card, "\n".join(lines) + "\n")
    return card
