"""A tiny real border-core model, trained in seconds on the CPU, for tests.

Not a mock: a 3-stage nnU-Net ``PlainConvUNet`` (8/16/32 features, patch
32^3, 77 k parameters) built from a valid nnU-Net plans document, trained
for 200 Adam steps of 2 random crops (about 12 s on one core) on CE + soft
Dice against border-core targets of synthetic ``tiny`` scans, prepared
exactly as the paper prescribes (global z-score, Eq. 1; resampling
to a common particle size, here 16 voxels instead of 60 so that tests are
fast; border thickness 3). Saved with :func:`ps3d_core.models.save_model_folder`
with two folds (fold 1 is fold 0 trained a little further on other crops), so
that fold ensembling and test-time mirroring can be exercised.

Run as a script to build one: ``python tests/tiny_model.py OUT_DIR``.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ps3d_core.models import ModelMetadata, build_network, make_dataset_json, make_plans, save_model_folder
from ps3d_core.synth import synthesize
from ps3d_core.training.dataset import prepare_case, zscore_statistics

TARGET_PARTICLE_SIZE = 16
PATCH = (32, 32, 32)
FEATURES = (8, 16, 32)
TRAIN_SEEDS = (1, 2, 3)
CONFIGURATION = "3d_fullres"


def prepare(scan, mean: float, std: float, target: float = TARGET_PARTICLE_SIZE):
    """(normalised target-grid image float32, border-core target uint8) of a synthetic scan."""
    meta = scan.metadata
    image, _, border_core = prepare_case(
        scan.image, scan.labels, meta.spacing_zyx_mm, meta.particle_size_mm, (mean, std), target
    )
    return image, border_core


def _crop(rng, image, target, patch):
    if rng.random() < 0.67:
        fg = np.flatnonzero(target)
        centre = np.unravel_index(fg[rng.integers(fg.size)], target.shape)
        start = [
            int(np.clip(c - p // 2 + rng.integers(-4, 5), 0, n - p)) for c, p, n in zip(centre, patch, target.shape)
        ]
    else:
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(target.shape, patch)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    x, y = image[sl], target[sl]
    for axis in range(3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    x = x * np.float32(rng.normal(1.0, 0.1)) + np.float32(rng.normal(0.0, 0.1))
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)


def _train(network, data, iterations: int, seed: int, batch: int = 2, lr: float = 3e-3) -> None:
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for _ in range(iterations):
        pairs = [_crop(rng, *data[rng.integers(len(data))], PATCH) for _ in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))
        logits = network(x)
        ce = torch.nn.functional.cross_entropy(logits, y)
        probs = torch.softmax(logits, 1)
        onehot = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).float()
        inter = (probs * onehot).sum((0, 2, 3, 4))
        dice = (2 * inter + 1) / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1)
        loss = ce + (1 - dice[1:].mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    network.eval()


def build_tiny_model(folder: str | Path, *, iterations: int = 200, extra_fold_iterations: int = 20) -> Path:
    """Train the tiny model and save it as a 2-fold model folder; returns ``folder``.

    Deterministic: fixed seeds, and one torch thread while training (also
    the fastest on a busy 2-core machine: 0.06 s per step of 2 patches).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(folder), iterations, extra_fold_iterations)
    finally:
        torch.set_num_threads(threads)


def _build(folder: Path, iterations: int, extra_fold_iterations: int) -> Path:
    torch.manual_seed(0)
    scans = [synthesize("tiny", s, workers=1) for s in TRAIN_SEEDS]
    mean, std = zscore_statistics([s.image for s in scans])
    data = [prepare(s, mean, std) for s in scans]
    plans = make_plans(
        patch_size=PATCH,
        features_per_stage=FEATURES,
        n_conv_per_stage=2,
        n_conv_per_stage_decoder=1,
        configuration=CONFIGURATION,
        batch_size=2,
        dataset_name="Dataset990_PS3DTiny",
        intensity_mean=mean,
        intensity_std=std,
    )
    dataset_json = make_dataset_json(len(scans))
    network = build_network(plans, CONFIGURATION, dataset_json)
    _train(network, data, iterations, seed=0)
    fold0 = {k: v.detach().clone() for k, v in network.state_dict().items()}
    _train(network, data, extra_fold_iterations, seed=1, lr=1e-3)
    fold1 = {k: v.detach().clone() for k, v in network.state_dict().items()}
    metadata = ModelMetadata(
        name="ps3d-tiny-test",
        version="0.0.1-test",
        configuration=CONFIGURATION,
        intensity_normalization={"method": "zscore", "mean": mean, "std": std},
        target_particle_size_voxels=TARGET_PARTICLE_SIZE,
        border_thickness=3,
        patch_size=PATCH,
        folds=(0, 1),
        training_data=f"synthetic 'tiny' scans, seeds {list(TRAIN_SEEDS)} (ps3d_core.synth); test fixture",
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    return save_model_folder(folder, plans, dataset_json, {0: fold0, 1: fold1}, metadata)


if __name__ == "__main__":
    t0 = time.perf_counter()
    out = build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
    print(f"{out} in {time.perf_counter() - t0:.1f} s")
