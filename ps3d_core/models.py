"""Segmentation model folders: nnU-Net v2 layout plus this platform's ``ps3d_model.json``.

A model folder is what nnU-Net itself loads for inference (so
``nnUNetPredictor.initialize_from_trained_model_folder`` accepts it too)::

    MODEL/plans.json                 nnU-Net plans (architecture, patch size)
    MODEL/dataset.json               channel names and labels (background/core/border)
    MODEL/ps3d_model.json            ModelMetadata: name, version, intensity and
                                     particle-size normalisation, ...
    MODEL/fold_<k>/checkpoint_final.pth
        {"network_weights": state_dict, "trainer_name": "nnUNetTrainer",
         "init_args": {"configuration": ..., "fold": k},
         "inference_allowed_mirroring_axes": (0, 1, 2)}

Networks are built from the plans with
``nnunetv2.utilities.get_network_from_plans`` (no trainer class is looked up
by name: that lookup imports timm, which cannot be imported in this
environment). The model normalises intensities itself (paper Eq. 1, with the
training set's global mean and standard deviation from ``ps3d_model.json``):
the plans declare ``noNorm``/``NoNormalization`` so that nnU-Net tools do not
normalise a second time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ps3d_core.errors import ScanError
from ps3d_core.intensity import quantile_levels
from ps3d_core.io.atomic import atomic_output
from schemas.scan import describe_validation_error

#: The shipped default model (recipe: ``scripts/train_default_model.py``; see its MODEL_CARD.md).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "ps3d-default"

PLANS_JSON = "plans.json"
DATASET_JSON = "dataset.json"
MODEL_JSON = "ps3d_model.json"
CHECKPOINT = "checkpoint_final.pth"
TRAINER_NAME = "nnUNetTrainer"
#: The network's output channels, in this order (paper section 3.2.2).
LABELS = {"background": 0, "core": 1, "border": 2}
#: Architectures whose import is known to be safe here (Primus imports timm).
_ALLOWED_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.",
    "dynamic_network_architectures.architectures.residual_unet.",
)

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class IntensityNormalization(BaseModel):
    """How a model normalises intensities (:mod:`ps3d_core.intensity`).

    ``zscore``: paper Eq. 1, ``(I - mean) / std`` with the training set's
    global statistics (``mean``, ``std`` required). ``quantile``: per scan,
    ``(I - q_lo) / (q_hi - q_lo)`` with the scan's own ``quantiles`` of its
    non-zero voxels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["zscore", "quantile"] = "zscore"
    mean: float | None = Field(default=None, allow_inf_nan=False)
    std: PositiveFloat | None = None
    quantiles: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.method == "zscore" and (self.mean is None or self.std is None):
            raise ValueError("method 'zscore' needs mean and std")
        if self.method == "quantile":
            if self.quantiles is None or not 0 <= self.quantiles[0] < self.quantiles[1] <= 1:
                raise ValueError(f"method 'quantile' needs quantiles 0 <= low < high <= 1, got {self.quantiles}")
        return self

    def levels(self, volume) -> tuple[float, float]:
        """``(offset, scale)`` for ``volume``: ``(mean, std)``, or the scan's quantile levels."""
        if self.method == "zscore":
            return float(self.mean), float(self.std)
        return quantile_levels(volume, self.quantiles)


class ModelMetadata(BaseModel):
    """``ps3d_model.json``: what the platform needs beyond nnU-Net's files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1, max_length=64)
    configuration: str = Field(min_length=1, description="nnU-Net configuration name in plans.json")
    intensity_normalization: IntensityNormalization
    target_particle_size_voxels: PositiveFloat = Field(
        default=60.0, description="Mean particle diameter, in voxels, the model was trained at (paper: 60)."
    )
    border_thickness: int = Field(default=3, ge=1, description="Border width of the training targets in voxels.")
    patch_size: tuple[int, int, int]
    folds: tuple[int, ...] = Field(min_length=1)
    training_data: str = Field(default="", max_length=10_000, description="What the model was trained on.")
    created_at: datetime
    notes: str | None = Field(default=None, max_length=10_000)

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(p < 1 for p in value):
            raise ValueError(f"patch sizes must be positive, got {list(value)}")
        return value

    @field_validator("folds")
    @classmethod
    def _unique_folds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value) or any(f < 0 for f in value):
            raise ValueError(f"folds must be distinct non-negative integers, got {list(value)}")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _timezone(self):
        if self.created_at.tzinfo is None:
            raise ValueError("created_at needs a time zone (e.g. 2026-01-01T00:00:00Z)")
        return self


@dataclass
class LoadedModel:
    """A model ready for inference: one network per fold, in eval mode, on ``device``.

    Attributes
    ----------
    folder : Path
    metadata : ModelMetadata
    networks : list of torch.nn.Module
        One per fold of ``folds``, same order.
    folds : tuple of int
    patch_size : (int, int, int)
    mirroring_axes : tuple of int
        Spatial axes (0 = z) mirroring test-time augmentation may flip; empty
        when the checkpoints allow none.
    device : torch.device
    num_input_channels : int
        Always 1 (grey values).
    plans : dict
    dataset_json : dict
    """

    folder: Path
    metadata: ModelMetadata
    networks: list
    folds: tuple[int, ...]
    patch_size: tuple[int, int, int]
    mirroring_axes: tuple[int, ...]
    device: Any
    num_input_channels: int
    plans: dict = field(repr=False)
    dataset_json: dict = field(repr=False)

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.networks[0].parameters())


# --------------------------------------------------------------------------
# plans and dataset.json for our own networks
# --------------------------------------------------------------------------


def make_plans(
    *,
    patch_size: tuple[int, int, int],
    features_per_stage: tuple[int, ...],
    n_conv_per_stage: int | tuple[int, ...] = 2,
    n_conv_per_stage_decoder: int | tuple[int, ...] | None = None,
    configuration: str = "3d_fullres",
    batch_size: int = 2,
    dataset_name: str = "Dataset501_Particles",
    intensity_mean: float = 0.0,
    intensity_std: float = 1.0,
) -> dict:
    """A valid nnU-Net v2 plans document for a 3D ``PlainConvUNet``.

    Laid out like ``ExperimentPlanner.plan_experiment`` writes it (keys of
    ``nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py``),
    for data already resampled to the model's particle size (spacing 1) and
    normalised by us (``NoNormalization``). Stage ``k`` downsamples by 2 on
    every axis (``k >= 1``), kernels are 3x3x3.

    Parameters
    ----------
    patch_size : (int, int, int)
        Divisible by ``2 ** (stages - 1)``.
    features_per_stage : tuple of int
        Encoder features per stage, e.g. ``(16, 32, 64, 128)``.
    n_conv_per_stage, n_conv_per_stage_decoder : int or tuple
        Convolutions per encoder stage and per decoder stage (default: the
        encoder's).
    """
    n = len(features_per_stage)
    if n < 2:
        raise ValueError("a U-Net needs at least 2 stages")
    if any(p % 2 ** (n - 1) for p in patch_size):
        raise ValueError(f"patch size {list(patch_size)} must be divisible by {2 ** (n - 1)} for {n} stages")
    enc = [int(n_conv_per_stage)] * n if isinstance(n_conv_per_stage, int) else [int(c) for c in n_conv_per_stage]
    if n_conv_per_stage_decoder is None:
        dec = enc[: n - 1]
    elif isinstance(n_conv_per_stage_decoder, int):
        dec = [int(n_conv_per_stage_decoder)] * (n - 1)
    else:
        dec = [int(c) for c in n_conv_per_stage_decoder]
    if len(enc) != n or len(dec) != n - 1:
        raise ValueError("n_conv_per_stage needs one entry per stage, the decoder one per stage but the last")
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [int(f) for f in features_per_stage],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": enc,
            "n_conv_per_stage_decoder": dec,
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch_size),
        "patch_size": [int(p) for p in patch_size],
        "median_image_size_in_voxels": [int(p) for p in patch_size],
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["NoNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample,
        "resampling_fn_seg_kwargs": resample | {"is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample | {"order": 1},
        "architecture": architecture,
        "batch_dice": True,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [int(p) for p in patch_size],
        "image_reader_writer": "Tiff3DIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": float(intensity_mean + 10 * intensity_std),
                "mean": float(intensity_mean),
                "median": float(intensity_mean),
                "min": float(intensity_mean - 10 * intensity_std),
                "percentile_00_5": float(intensity_mean - 3 * intensity_std),
                "percentile_99_5": float(intensity_mean + 3 * intensity_std),
                "std": float(intensity_std),
            }
        },
    }


def make_dataset_json(num_training: int = 0) -> dict:
    """nnU-Net ``dataset.json`` of a border-core model: one grey channel, 3 labels."""
    return {
        "channel_names": {"0": "noNorm"},
        "labels": dict(LABELS),
        "numTraining": int(num_training),
        "file_ending": ".tif",
        "overwrite_image_reader_writer": "Tiff3DIO",
    }


# --------------------------------------------------------------------------
# building networks
# --------------------------------------------------------------------------


def _configuration(plans: dict, name: str, source: Path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        manager = PlansManager(copy.deepcopy(plans))
        config = manager.get_configuration(name)
        config.network_arch_class_name  # noqa: B018 - KeyError for plans without architecture
        patch = tuple(int(p) for p in config.patch_size)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise ScanError(source, f"has no usable configuration {name!r}: {error}") from None
    return manager, config, patch


def _label_check(manager, dataset_json: dict, source: Path) -> int:
    """Number of input channels; ScanError unless the labels are background/core/border."""
    try:
        labels = dataset_json["labels"]
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        n_classes = manager.get_label_manager(dataset_json).num_segmentation_heads
    except (KeyError, TypeError, AttributeError, AssertionError, ValueError) as error:
        raise ScanError(source, f"is not a valid nnU-Net dataset.json: {error!r}") from None
    if channels is None:
        raise ScanError(source, "has no 'channel_names'")
    if n_classes != 3 or {k: labels.get(k) for k in LABELS} != LABELS:
        raise ScanError(
            source,
            f"declares {n_classes} classes ({labels}); a border-core model has exactly 3: "
            "background 0, core 1, border 2",
        )
    return len(channels)


def build_network(
    plans: dict, configuration: str, dataset_json: dict, *, source: Path | None = None, initialize: bool = True
):
    """The (randomly initialised) network of a plans configuration, deep supervision off.

    Raises
    ------
    ScanError
        Unknown configuration, unsupported architecture, labels other than
        background/core/border.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    source = Path(source) if source is not None else Path(PLANS_JSON)
    manager, config, _ = _configuration(plans, configuration, source)
    n_in = _label_check(manager, dataset_json, source.with_name(DATASET_JSON))
    name = config.network_arch_class_name
    if not name.startswith(_ALLOWED_ARCHITECTURES):
        raise ScanError(source, f"uses architecture {name!r}; supported are PlainConvUNet and ResidualEncoderUNet")
    try:
        return get_network_from_plans(
            name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            n_in,
            3,
            allow_init=initialize,
            deep_supervision=False,
        )
    except (TypeError, ValueError, KeyError, ImportError, AssertionError) as error:
        raise ScanError(source, f"architecture of configuration {configuration!r} cannot be built: {error}") from None


# --------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ScanError(path, f"missing: a model folder needs {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ScanError(path, f"is not valid JSON: {error}") from None


def read_metadata(folder: str | os.PathLike[str]) -> ModelMetadata:
    """Validated ``ps3d_model.json`` of a model folder."""
    folder = _existing_folder(folder)
    path = folder / MODEL_JSON
    document = _read_json(path, f"{MODEL_JSON} (name, version, normalisation; see ps3d_core.models.ModelMetadata)")
    if not isinstance(document, dict):
        raise ScanError(path, f"must hold a JSON object, got {type(document).__name__}")
    try:
        return ModelMetadata.model_validate(document)
    except ValidationError as error:
        raise ScanError(path, describe_validation_error(error)) from None


def _existing_folder(folder: str | os.PathLike[str] | None) -> Path:
    path = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    if path.is_dir():
        return path
    if path.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise ScanError(
            path,
            "the default model folder is missing (it ships with the project; re-create it with "
            "scripts/train_default_model.py) or pass a model folder explicitly",
        )
    what = "does not exist" if not path.exists() else "is not a directory"
    raise ScanError(path, f"{what}; expected an nnU-Net model folder with plans.json, dataset.json, {MODEL_JSON}")


def model_version(folder: str | os.PathLike[str] | None = None) -> str:
    """``ps3d_model.json``'s version of a model folder (default: :data:`DEFAULT_MODEL_DIR`)."""
    return read_metadata(folder).version


def model_fingerprint(folder: str | os.PathLike[str] | None = None) -> str:
    """Hash of a model folder's identity: its version and the size and mtime of every file.

    Changes when the model is retrained in place, even with the same version.
    """
    folder = _existing_folder(folder)
    digest = hashlib.sha256(model_version(folder).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_checkpoint(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ScanError(path, "missing: the fold's checkpoint (checkpoint_final.pth) is not there")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # nnU-Net training checkpoints hold numpy scalars in their logs; model folders are trusted files
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for damaged files
        raise ScanError(path, f"is not a readable PyTorch checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ScanError(path, "is not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def _mirroring(checkpoint: dict) -> tuple[int, ...]:
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return tuple(sorted(int(a) for a in axes)) if axes is not None else ()


def load_model(
    folder: str | os.PathLike[str] | None = None,
    folds: tuple[int, ...] | list[int] | None = None,
    device: Any = "cpu",
) -> LoadedModel:
    """Load a model folder for inference.

    Parameters
    ----------
    folder : path, optional
        Model folder; default :data:`DEFAULT_MODEL_DIR`.
    folds : sequence of int, optional
        Folds to load; default all folds named in ``ps3d_model.json``.
    device : str or torch.device
        Where the networks live (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises
    ------
    ScanError
        Naming the file: missing or not a folder (the default one: "not
        trained yet"), missing/invalid ``plans.json``, ``dataset.json`` or
        ``ps3d_model.json``, a missing fold, a checkpoint that does not load
        into the network of the plans, a class count other than 3, a model
        for more than one input channel.
    """
    import torch

    folder = _existing_folder(folder)
    metadata = read_metadata(folder)
    plans = _read_json(folder / PLANS_JSON, "plans.json (nnU-Net plans)")
    dataset_json = _read_json(folder / DATASET_JSON, "dataset.json (nnU-Net labels and channels)")
    if not isinstance(plans, dict) or not isinstance(dataset_json, dict):
        bad = folder / (PLANS_JSON if not isinstance(plans, dict) else DATASET_JSON)
        raise ScanError(bad, "must hold a JSON object")
    manager, _, patch = _configuration(plans, metadata.configuration, folder / PLANS_JSON)
    n_in = _label_check(manager, dataset_json, folder / DATASET_JSON)
    if n_in != 1:
        raise ScanError(
            folder / DATASET_JSON,
            f"the model expects {n_in} input channels; micro-CT scans have one grey value per voxel",
        )
    if len(patch) != 3:
        raise ScanError(
            folder / PLANS_JSON, f"configuration {metadata.configuration!r} is not 3D (patch {list(patch)})"
        )
    if patch != tuple(metadata.patch_size):
        raise ScanError(
            folder / MODEL_JSON,
            f"patch_size {list(metadata.patch_size)} differs from plans.json's {list(patch)}",
        )
    folds = tuple(metadata.folds) if folds is None else tuple(int(f) for f in folds)
    if not folds:
        raise ScanError(folder, "no folds requested")
    device = torch.device(device)
    networks = []
    mirroring: tuple[int, ...] | None = None
    for fold in folds:
        path = folder / f"fold_{fold}" / CHECKPOINT
        if not (folder / f"fold_{fold}").is_dir():
            have = sorted(p.name for p in folder.glob("fold_*"))
            raise ScanError(
                folder / f"fold_{fold}", f"missing: fold {fold} is not in the model (found {have or 'none'})"
            )
        checkpoint = _load_checkpoint(path)
        network = build_network(
            plans, metadata.configuration, dataset_json, source=folder / PLANS_JSON, initialize=False
        )
        try:
            network.load_state_dict(checkpoint["network_weights"], strict=True)
        except (RuntimeError, KeyError, TypeError, AttributeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ScanError(path, f"does not load into the network of plans.json: {first}") from None
        axes = _mirroring(checkpoint)
        mirroring = axes if mirroring is None else tuple(a for a in mirroring if a in axes)
        networks.append(network.to(device).eval())
    return LoadedModel(
        folder=folder,
        metadata=metadata,
        networks=networks,
        folds=folds,
        patch_size=patch,
        mirroring_axes=mirroring or (),
        device=device,
        num_input_channels=n_in,
        plans=plans,
        dataset_json=dataset_json,
    )


def save_model_folder(
    folder: str | os.PathLike[str],
    plans: dict,
    dataset_json: dict,
    fold_weights: dict[int, dict],
    metadata: ModelMetadata | dict,
    *,
    mirroring_axes: tuple[int, ...] | None = (0, 1, 2),
) -> Path:
    """Write a model folder atomically (an existing one is replaced once the new one is complete).

    Every fold's weights are loaded into the network of the plans first, so a
    folder that :func:`load_model` would reject is never written.

    Parameters
    ----------
    folder : path
    plans, dataset_json : dict
        nnU-Net documents (see :func:`make_plans`, :func:`make_dataset_json`).
    fold_weights : dict int -> state_dict
        Network weights per fold; the keys must equal ``metadata.folds``.
    metadata : ModelMetadata or dict
        ``ps3d_model.json``; its ``patch_size`` must equal the plans'.
    mirroring_axes : tuple of int or None
        Axes test-time mirroring may flip (``inference_allowed_mirroring_axes``).

    Returns
    -------
    Path
        ``folder``.
    """
    import torch

    folder = Path(folder)
    if not isinstance(metadata, ModelMetadata):
        try:
            metadata = ModelMetadata.model_validate(metadata)
        except ValidationError as error:
            raise ScanError(folder / MODEL_JSON, describe_validation_error(error)) from None
    if sorted(fold_weights) != list(metadata.folds):
        raise ValueError(f"fold_weights has folds {sorted(fold_weights)}, metadata lists {list(metadata.folds)}")
    _, _, patch = _configuration(plans, metadata.configuration, folder / PLANS_JSON)
    if patch != tuple(metadata.patch_size):
        raise ValueError(f"metadata patch_size {list(metadata.patch_size)} differs from the plans' {list(patch)}")
    for fold, weights in fold_weights.items():
        network = build_network(plans, metadata.configuration, dataset_json, source=folder / PLANS_JSON)
        try:
            network.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise ValueError(f"fold {fold}: weights do not fit the network of the plans: {error}") from None
    with atomic_output(folder) as tmp:
        tmp.mkdir()
        (tmp / PLANS_JSON).write_text(json.dumps(plans, indent=2), encoding="utf-8")
        (tmp / DATASET_JSON).write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
        (tmp / MODEL_JSON).write_text(metadata.model_dump_json(indent=2), encoding="utf-8")
        for fold, weights in sorted(fold_weights.items()):
            (tmp / f"fold_{fold}").mkdir()
            checkpoint = {
                "network_weights": {k: v.detach().cpu() for k, v in weights.items()},
                "trainer_name": TRAINER_NAME,
                "init_args": {"configuration": metadata.configuration, "fold": int(fold)},
                "inference_allowed_mirroring_axes": tuple(mirroring_axes) if mirroring_axes is not None else None,
                "current_epoch": 0,
            }
            torch.save(checkpoint, tmp / f"fold_{fold}" / CHECKPOINT)
    return folder


def now_utc() -> datetime:
    """Current time with time zone, for ``ModelMetadata.created_at``."""
    return datetime.now(timezone.utc).replace(microsecond=0)
