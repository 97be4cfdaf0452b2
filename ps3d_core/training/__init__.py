"""Training border-core models on annotated scans with nnU-Net v2 (paper sections 3.2, 4.2).

* :mod:`~ps3d_core.training.dataset`: scans + instance labels -> nnU-Net raw dataset;
* :mod:`~ps3d_core.training.augment`: touching-particle and intensity augmentations;
* :mod:`~ps3d_core.training.trainer`: the nnU-Net trainer (instantiated directly);
* :mod:`~ps3d_core.training.run`: the whole recipe -> a model folder and its card;
* :mod:`~ps3d_core.training.evaluate`: held-out metrics against ThreshWater, promotion.

nnU-Net and torch are imported when training starts, not on import.
"""

from ps3d_core.training.dataset import (
    TrainingCase,
    bank_particles,
    crop_boxes,
    load_particle_bank,
    mean_equivalent_diameter_voxels,
    pair_scans_with_labels,
    prepare_case,
    save_particle_bank,
    split_cases,
    training_regions,
    write_raw_dataset,
)
from ps3d_core.training.evaluate import compare_models, evaluate_model
from ps3d_core.training.run import ResumeError, TrainingConfig, train_model, write_model_card

__all__ = [
    "TrainingCase",
    "TrainingConfig",
    "bank_particles",
    "compare_models",
    "crop_boxes",
    "evaluate_model",
    "load_particle_bank",
    "mean_equivalent_diameter_voxels",
    "pair_scans_with_labels",
    "prepare_case",
    "save_particle_bank",
    "split_cases",
    "ResumeError",
    "train_model",
    "training_regions",
    "write_model_card",
]
