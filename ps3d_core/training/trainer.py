"""The nnU-Net v2 trainer of ParticleSeg3D models, instantiated directly (no by-name lookup).

:class:`PS3DTrainer` is nnU-Net's ``nnUNetTrainer`` (SGD, lr 1e-2, momentum
0.99, weight decay 3e-5, poly schedule, CE + Dice with deep supervision: the
paper's section 4.2) with two changes, both from the paper: the stronger
intensity augmentations and the touching-particle augmentation
(:mod:`ps3d_core.training.augment`). Epoch length and count are set per run,
because the paper's 1000 x 250 iterations are a GPU-week budget.

On a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX) the steps run
in mixed precision with channels-last tensors, as nnU-Net's steps on CUDA run
in float16: 2.6x faster per step on the development machine (BENCHMARKS.md), where
nnU-Net itself leaves CPU training in float32.
"""

from __future__ import annotations

import time

import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from ps3d_core.inference.predict import cpu_has_native_bfloat16
from ps3d_core.training.augment import TouchingParticleTransform, intensity_transforms

#: nnU-Net's default intensity transforms that ParticleSeg3D's stronger ones replace.
_REPLACED = (MultiplicativeBrightnessTransform, ContrastTransform, GammaTransform)

#: Key of the training steps run per epoch in nnU-Net's logger (saved in its checkpoints).
ITERATIONS_LOG = "iterations"


def _inner(transform):
    return transform.transform if isinstance(transform, RandomTransform) else transform


class PS3DTrainer(nnUNetTrainer):
    """nnU-Net trainer with ParticleSeg3D's augmentations.

    Set before :meth:`run_training`: ``particle_bank`` (path of the dataset's
    ``particle_bank.npz``; None disables the touching augmentation),
    ``touching_probability``, ``border_thickness``, ``time_budget_s`` (None:
    no limit), and nnU-Net's own ``num_epochs``, ``num_iterations_per_epoch``,
    ``num_val_iterations_per_epoch``, and ``cpu_mixed_precision`` (default: the
    CPU has native bfloat16, :func:`cpu_has_native_bfloat16`).

    With a time budget the number of epochs (and so nnU-Net's poly learning
    rate schedule) is kept and the iterations of the remaining epochs are
    shortened to fit, measured after every epoch: a run that must end by a
    deadline still anneals its learning rate to zero.

    The iterations run in each epoch are logged beside nnU-Net's losses
    (``logger.get_value(ITERATIONS_LOG, step=None)``), so that checkpoints
    carry them and a resumed run reports its whole history.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.particle_bank: str | None = None
        self.touching_probability = 0.5
        self.border_thickness = 3
        self.time_budget_s: float | None = None
        self._iterations_requested = self.num_iterations_per_epoch
        self._started = 0.0
        self.logger.local_logger.my_fantastic_logging[ITERATIONS_LOG] = []
        self.cpu_mixed_precision = self.device.type == "cpu" and cpu_has_native_bfloat16()

    def initialize(self):
        super().initialize()
        if self.cpu_mixed_precision:
            self.network.to(memory_format=torch.channels_last_3d)

    def _cpu_autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def train_step(self, batch: dict) -> dict:
        if not self.cpu_mixed_precision:
            return super().train_step(batch)
        # nnU-Net's step without its float16 grad scaler (bfloat16 has float32's range)
        data = batch["data"].to(memory_format=torch.channels_last_3d)
        self.optimizer.zero_grad(set_to_none=True)
        with self._cpu_autocast():
            loss = self.loss(self.network(data), batch["target"])
        loss.backward()
        nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        if not self.cpu_mixed_precision:
            return super().validation_step(batch)
        with self._cpu_autocast():
            return super().validation_step(batch)

    def on_train_start(self):
        self._iterations_requested = self.num_iterations_per_epoch
        self._started = time.monotonic()
        super().on_train_start()

    def on_epoch_end(self):
        self.logger.log(ITERATIONS_LOG, self.num_iterations_per_epoch, self.current_epoch)
        super().on_epoch_end()
        if self.time_budget_s is None or self.current_epoch >= self.num_epochs:
            return
        start = self.logger.get_value("epoch_start_timestamps", step=-1)
        end = self.logger.get_value("epoch_end_timestamps", step=-1)
        per_iteration = (end - start) / max(1, self.num_iterations_per_epoch)
        remaining = self.time_budget_s - (time.monotonic() - self._started)
        affordable = int(remaining / per_iteration / (self.num_epochs - self.current_epoch))
        self.num_iterations_per_epoch = max(1, min(self._iterations_requested, affordable))

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):  # fmt: skip
        pipeline = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm, is_cascaded, foreground_labels, regions, ignore_label,
        )  # fmt: skip
        transforms = [t for t in pipeline.transforms if not isinstance(_inner(t), _REPLACED)]
        spatial = next(i for i, t in enumerate(transforms) if isinstance(t, SpatialTransform))
        stronger = intensity_transforms()
        transforms[spatial + 1 : spatial + 1] = stronger
        if self.particle_bank is not None:
            touching = TouchingParticleTransform(self.particle_bank, self.touching_probability, self.border_thickness)
            transforms.insert(spatial, touching)
        return ComposeTransforms(transforms)
