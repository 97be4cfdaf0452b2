"""Training augmentations of ParticleSeg3D (paper sections 3.2.3, 3.2.4, 4.2).

* :func:`paste_touching` / :class:`TouchingParticleTransform`: the touching
  particle augmentation. A particle D from anywhere in the training set (the
  particle bank written with the dataset) is placed so that it touches a
  particle P of the current patch, and the border-core target is updated.
* :func:`intensity_transforms`: the stronger intensity augmentations
  (brightness, contrast, gamma, brightness gradient, local gamma), with the
  ranges of ParticleSeg3D's published augmentation pipeline, written with
  batchgeneratorsv2 transforms (nnU-Net v2's augmentation library).

Everything here runs inside nnU-Net's data-augmentation worker processes, so
random parameters are module-level functions (picklable), not lambdas.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cc3d
import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import (
    BrightnessAdditiveTransform,
    MultiplicativeBrightnessTransform,
)
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.local.brightness_gradient import BrightnessGradientAdditiveTransform
from batchgeneratorsv2.transforms.local.local_gamma import LocalGammaTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform

from ps3d_core.bordercore import instances_to_border_core

#: Unit vectors tried for the placement direction: 26 neighbours, normalised.
_DIRECTIONS = np.array(
    [(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1) for x in (-1, 0, 1) if (z, y, x) != (0, 0, 0)], dtype=float
)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# touching particles
# --------------------------------------------------------------------------


def _paste_window(shape: Sequence[int], corner: np.ndarray, size: Sequence[int]):
    """(patch slices, particle slices) of a particle crop of ``size`` at ``corner``, clipped to ``shape``; or None."""
    lo = np.maximum(corner, 0)
    hi = np.minimum(corner + np.asarray(size), np.asarray(shape))
    if np.any(hi <= lo):
        return None
    patch = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    part = tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(lo, hi, corner))
    return patch, part


def _touches(occupied: np.ndarray, target: np.ndarray, mask: np.ndarray, corner: np.ndarray) -> tuple[bool, bool]:
    """(overlaps anything occupied, 6-touches ``target``) for the mask placed at ``corner``."""
    window = _paste_window(occupied.shape, corner, mask.shape)
    if window is None:
        return False, False
    patch, part = window
    m = mask[part]
    if (occupied[patch] & m).any():
        return True, False
    grown = np.zeros(tuple(s + 2 for s in m.shape), bool)
    for axis in range(3):
        for shift in (0, 2):
            index = [slice(1, 1 + s) for s in m.shape]
            index[axis] = slice(shift, shift + m.shape[axis])
            grown[tuple(index)] |= m
    lo = [s.start - 1 for s in patch]
    hi = [s.stop + 1 for s in patch]
    clip_lo = [max(0, a) for a in lo]
    clip_hi = [min(n, b) for n, b in zip(target.shape, hi)]
    sub = tuple(slice(a - l, b - l) for a, b, l in zip(clip_lo, clip_hi, lo))
    touching = (grown[sub] & target[tuple(slice(a, b) for a, b in zip(clip_lo, clip_hi))]).any()
    return False, bool(touching)


def _approach_by_axis(occupied, target, mask, start: np.ndarray, stop: np.ndarray) -> np.ndarray | None:
    """A touching, non-overlapping corner on the axis-by-axis path from ``start`` to ``stop``, or None."""
    corner = start.copy()
    for axis in np.flatnonzero(stop != start):
        trial = corner.copy()
        trial[axis] = stop[axis]
        overlaps, touching = _touches(occupied, target, mask, trial)
        if touching:
            return trial
        if not overlaps:
            corner = trial
    return None


def paste_touching(
    image: np.ndarray,
    border_core: np.ndarray,
    particle_image: np.ndarray,
    particle_mask: np.ndarray,
    rng: np.random.Generator,
    border_thickness: int = 3,
) -> bool:
    """Place a particle so that it touches a particle of the patch, in place; True when pasted.

    Parameters
    ----------
    image : ndarray (Z, Y, X) float32
        Normalised patch intensities; the particle's voxels are written.
    border_core : ndarray (Z, Y, X) integer
        The patch's target: 0 background, 1 core, 2 border, negative for
        padding (never written). The pasted particle's own border-core
        (eroded by ``border_thickness`` on its own, as in the dataset) is
        written.
    particle_image, particle_mask : ndarray (z, y, x)
        The particle D: intensities and its voxels.
    rng : numpy Generator

    The particle P is the 6-connected foreground component of a random
    foreground voxel. D starts outside P along a random direction and is
    moved towards P's centre one voxel at a time; it is placed at the last
    position where it overlaps nothing (particles or padding) and touches P
    face-to-face. Nothing is pasted when no such position exists along the
    direction (e.g. P is enclosed) or the patch holds no particle.
    """
    foreground = border_core > 0
    if not foreground.any() or not particle_mask.any():
        return False
    components = cc3d.connected_components(foreground, connectivity=6)
    seeds = np.flatnonzero(foreground)
    target = components == components.flat[seeds[rng.integers(seeds.size)]]
    occupied = border_core != 0
    centre = np.array([c.mean() for c in np.nonzero(target)])
    size = np.asarray(particle_mask.shape)
    direction = _DIRECTIONS[rng.integers(len(_DIRECTIONS))]
    reach = float(np.ptp(np.nonzero(target), axis=1).max() + size.max() + 2)
    placed, previous = None, None
    for distance in np.arange(reach, -0.5, -1.0):
        corner = np.round(centre + direction * distance - size / 2).astype(int)
        overlaps, touching = _touches(occupied, target, particle_mask, corner)
        if overlaps:
            if placed is None and previous is not None:
                # a diagonal step can jump from "apart" to "overlapping": approach one axis at a time
                placed = _approach_by_axis(occupied, target, particle_mask, previous, corner)
            break
        if touching:
            placed = corner
        previous = corner
    if placed is None:
        return False
    window = _paste_window(image.shape, placed, particle_mask.shape)
    patch, part = window
    mask = particle_mask[part]
    core = instances_to_border_core(np.pad(particle_mask, 1).astype(np.uint32), border_thickness)[1:-1, 1:-1, 1:-1]
    image[patch][mask] = particle_image[part][mask]
    border_core[patch][mask] = core[part][mask]
    return True


class TouchingParticleTransform(BasicTransform):
    """nnU-Net v2 transform: :func:`paste_touching` with probability ``p`` per sample.

    Runs before the spatial transform (on the larger initial patch), so the
    pasted particle is rotated and scaled with the rest. The particle bank
    (``particle_bank.npz`` of :func:`ps3d_core.training.dataset.save_particle_bank`)
    is loaded on first use in each worker process.
    """

    def __init__(self, bank_path: str | os.PathLike[str], p: float = 0.5, border_thickness: int = 3) -> None:
        super().__init__()
        self.bank_path = os.fspath(bank_path)
        self.p = p
        self.border_thickness = border_thickness
        self._bank: list | None = None

    def apply(self, data_dict: dict, **params) -> dict:
        if self._bank is None:
            from ps3d_core.training.dataset import load_particle_bank

            self._bank = load_particle_bank(self.bank_path)
        if not self._bank or np.random.random() >= self.p:
            return data_dict
        rng = np.random.default_rng(np.random.randint(0, 2**31))
        particle_image, particle_mask = self._bank[rng.integers(len(self._bank))]
        image = data_dict["image"][0].numpy().copy()
        target = data_dict["segmentation"][0].numpy().copy()
        if paste_touching(image, target, particle_image, particle_mask, rng, self.border_thickness):
            data_dict["image"] = torch.from_numpy(image)[None]
            data_dict["segmentation"] = torch.from_numpy(target)[None]
        return data_dict


# --------------------------------------------------------------------------
# intensity augmentations
# --------------------------------------------------------------------------


def _local_scale(image_shape: Sequence[int], axis: int) -> float:
    """Kernel width: log-uniform between a sixth of the patch edge and the edge."""
    edge = image_shape[axis]
    return float(np.exp(np.random.uniform(np.log(max(edge // 6, 1)), np.log(edge))))


def _gradient_strength(*_args) -> float:
    """Brightness-gradient amplitude: +-1..5 (in normalised intensity units)."""
    sign = 1.0 if np.random.uniform() < 0.5 else -1.0
    return sign * float(np.random.uniform(1.0, 5.0))


def _local_gamma() -> float:
    """Local gamma: strong darkening (0.01-0.8) or brightening (1.5-4), equally often."""
    return float(np.random.uniform(0.01, 0.8) if np.random.uniform() < 0.5 else np.random.uniform(1.5, 4.0))


def intensity_transforms() -> list[BasicTransform]:
    """ParticleSeg3D's stronger intensity augmentations as batchgeneratorsv2 transforms.

    Multiplicative brightness 0.75-1.25 (p 0.15), additive brightness
    N(0, 0.5) (p 0.1), contrast 0.5-2 with or without range preservation
    (p 0.2), two gamma 0.7-1.5 on the inverted image (p 0.1 each), an additive
    brightness gradient (p 0.3) and a local gamma (p 0.3). Noise, blur,
    low-resolution simulation and mirroring stay nnU-Net's own.
    """
    contrast = [
        ContrastTransform(BGContrast((0.5, 2.0)), preserve_range=keep, synchronize_channels=False, p_per_channel=1)
        for keep in (True, False)
    ]
    return [
        RandomTransform(
            MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), synchronize_channels=False, p_per_channel=1),
            apply_probability=0.15,
        ),
        RandomTransform(BrightnessAdditiveTransform(0.0, 0.5, synchronize_channels=False), apply_probability=0.1),
        RandomTransform(OneOfTransform(contrast), apply_probability=0.2),
        *[
            RandomTransform(
                GammaTransform(
                    (0.7, 1.5), p_invert_image=1, synchronize_channels=False, p_per_channel=1, p_retain_stats=1
                ),
                apply_probability=0.1,
            )
            for _ in range(2)
        ],
        RandomTransform(
            BrightnessGradientAdditiveTransform(
                _local_scale, (-0.5, 1.5), max_strength=_gradient_strength, mean_centered=False
            ),
            apply_probability=0.3,
        ),
        RandomTransform(LocalGammaTransform(_local_scale, (-0.5, 1.5), _local_gamma), apply_probability=0.3),
    ]
