"""Patch prediction and Gaussian-weighted aggregation, chunk by chunk or whole volume.

Per patch: for every fold, the network's logits (averaged over the mirrored
copies when test-time augmentation is on, as nnU-Net does), turned into
probabilities by softmax; the probabilities are averaged over the folds. Each
patch's probabilities are multiplied by the Gaussian of
:func:`~ps3d_core.inference.geometry.gaussian_weights` and summed into the
output; the class is the argmax of the sum (dividing by the summed weights
would not change it).

:func:`predict_region` computes one chunk from *every patch of the global
grid that intersects it*, in the global patch order, adding only the part of
each patch inside the chunk. A voxel therefore receives the same patches in
the same order as in :func:`sliding_window_predict`, the whole-volume
reference, and both give the same argmax (the per-voxel sums are the same
float operations; only the patch batches differ).

Mixed precision (the default): on CUDA the forward pass runs under
``torch.autocast`` in float16, as nnU-Net's does; on a CPU with native
bfloat16 arithmetic (AVX512-BF16 or AMX) in bfloat16, 2.2x faster than
float32 on the development machine (BENCHMARKS.md). Softmax, averaging and
accumulation stay float32. On CUDA the input is copied from pinned host memory
without blocking and the accumulation stays on the GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ps3d_core.inference.geometry import gaussian_weights, patch_grid, patches_in_region

__all__ = ["PatchPredictor", "cpu_has_native_bfloat16", "predict_region", "sliding_window_predict"]


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16 or AMX).

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, mixed_precision: bool = True) -> torch.dtype | None:
    """The dtype forward passes autocast to on ``device``: float16 on CUDA, bfloat16 on a CPU that has it, else None."""
    if not mixed_precision:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


class PatchPredictor:
    """Class probabilities of a batch of patches, averaged over folds (and mirrors).

    Parameters
    ----------
    networks : list of torch.nn.Module
        One per fold, in eval mode, on ``device``.
    device : torch.device or str
    mirror_axes : tuple of int
        Spatial axes (0 = z) for mirroring test-time augmentation; () for none.
    mixed_precision : bool
        Forward passes in float16 on CUDA, in bfloat16 on a CPU with native
        bfloat16 (:func:`autocast_dtype`); False: float32 everywhere.
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        device,
        mirror_axes: Sequence[int] = (),
        mixed_precision: bool = True,
    ) -> None:
        self.networks = list(networks)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype(self.device, mixed_precision)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one patch shape throughout, as nnU-Net does
        axes = sorted({int(a) for a in mirror_axes})
        self.mirrors = [()] + [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]

    @property
    def passes_per_patch(self) -> int:
        return len(self.networks) * len(self.mirrors)

    def _logits(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in self.mirrors:
            dims = [a + 2 for a in axes]
            xi = torch.flip(x, dims) if dims else x
            if self.autocast_dtype is None:
                y = network(xi)
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    y = network(xi)
            y = y.float()
            if dims:
                y = torch.flip(y, dims)
            total = y if total is None else total + y
        return total / len(self.mirrors) if len(self.mirrors) > 1 else total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 1, *patch) float32 on the device -> (B, 3, *patch) float32 probabilities."""
        probs = None
        for network in self.networks:
            p = torch.softmax(self._logits(network, x), dim=1)
            probs = p if probs is None else probs + p
        return probs / len(self.networks) if len(self.networks) > 1 else probs


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_region(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    image_origin: Sequence[int],
    region: Sequence[slice],
    starts: Sequence[Sequence[int]],
    patch: Sequence[int],
    *,
    batch_size: int = 4,
    device="cpu",
    return_probabilities: bool = False,
):
    """Border-core classes of one chunk from the global patch grid.

    Parameters
    ----------
    predictor : callable
        (B, 1, *patch) tensor -> (B, C, *patch) probabilities (:class:`PatchPredictor`).
    image : ndarray, float32, 3D
        Normalised target-grid image covering at least the union of the
        patches that intersect ``region`` (see
        :func:`~ps3d_core.inference.geometry.patches_in_region`), starting at
        ``image_origin``.
    region : tuple of slice
        The chunk, in target-grid coordinates.
    starts : per-axis patch starts of the global grid.
    patch : (int, int, int)
    batch_size : int
        Patches per forward pass.

    Returns
    -------
    ndarray, uint8, shape of ``region``
        Argmax class; with ``return_probabilities`` also the weighted sums
        (float32, (C, *region)).
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch)
    patches, _ = patches_in_region(starts, patch, region)
    shape = tuple(r.stop - r.start for r in region)
    gauss = torch.from_numpy(gaussian_weights(patch).copy()).to(device)
    x_all = _to_device(image, device)
    acc = None
    with torch.inference_mode():
        for batch in _batches(patches, batch_size):
            x = torch.stack(
                [x_all[tuple(slice(s - o, s - o + p) for s, o, p in zip(st, image_origin, patch))] for st in batch]
            )[:, None]
            probs = predictor(x)
            if acc is None:
                acc = torch.zeros((probs.shape[1], *shape), dtype=torch.float32, device=device)
            for b, st in enumerate(batch):
                # the part of the patch inside the chunk, in chunk and in patch coordinates
                dst, src = [slice(None)], [slice(None)]
                for s, p, r in zip(st, patch, region):
                    a, e = max(s, r.start), min(s + p, r.stop)
                    dst.append(slice(a - r.start, e - r.start))
                    src.append(slice(a - s, e - s))
                acc[tuple(dst)] += probs[b][tuple(src)] * gauss[tuple(src[1:])]
        labels = torch.argmax(acc, dim=0).to(torch.uint8).cpu().numpy()
        if return_probabilities:
            return labels, acc.cpu().numpy()
    return labels


def sliding_window_predict(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch: Sequence[int],
    step: float = 0.5,
    *,
    batch_size: int = 4,
    device="cpu",
    return_probabilities: bool = False,
):
    """Whole-volume sliding window (the reference :func:`predict_region` must equal).

    Every patch of :func:`~ps3d_core.inference.geometry.patch_grid` in C order,
    Gaussian-weighted probabilities summed over the whole volume at once.

    Returns
    -------
    ndarray, uint8, shape of ``image``
        Argmax class (and the weighted sums with ``return_probabilities``).
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch)
    starts = patch_grid(image.shape, patch, step)
    patches = list(itertools.product(*starts))
    gauss = torch.from_numpy(gaussian_weights(patch).copy()).to(device)
    x_all = _to_device(image, device)
    acc = None
    with torch.inference_mode():
        for batch in _batches(patches, batch_size):
            sl = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in batch]
            probs = predictor(torch.stack([x_all[s] for s in sl])[:, None])
            if acc is None:
                acc = torch.zeros((probs.shape[1], *image.shape), dtype=torch.float32, device=device)
            for b, s in enumerate(sl):
                acc[(slice(None), *s)] += probs[b] * gauss
        labels = torch.argmax(acc, dim=0).to(torch.uint8).cpu().numpy()
        if return_probabilities:
            return labels, acc.cpu().numpy()
    return labels
