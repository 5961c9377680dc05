"""nnU-Net v2's sliding-window prediction written out from its algorithm (nnUNetPredictor's
predict_sliding_window_return_logits, compute_steps_for_sliding_window and compute_gaussian), independent of the
package's code: pad to the patch, nnU-Net's window starts, logits averaged over folds and mirrorings, weighted by
nnU-Net's Gaussian, summed and divided by the summed weights (float64), softmax once at the end."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def steps(size: int, patch: int, step: float) -> list[int]:
    """Window starts along an axis of (padded) ``size``: as many windows as a step of ``patch * step`` needs,
    spread evenly, rounded half to even."""
    n = math.ceil((size - patch) / (patch * step)) + 1
    if n == 1:
        return [0]
    return [int(np.round((size - patch) / (n - 1) * i)) for i in range(n)]


def gaussian(patch, sigma_scale: float = 1 / 8) -> np.ndarray:
    """A unit delta at patch // 2 smoothed by a Gaussian of sigma patch * sigma_scale truncated at 4 sigma (kernel
    normalised to sum 1 per axis, zero outside), scaled to a peak of 10, float32, zeros raised to the smallest
    nonzero value."""
    axes = []
    for p in patch:
        sigma = p * sigma_scale
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * offsets ** 2 / sigma ** 2)
        kernel /= kernel.sum()
        d = np.arange(p) - p // 2
        axes.append(np.where(np.abs(d) <= radius, kernel[np.clip(d + radius, 0, 2 * radius)], 0.0))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = (g / g.max() * 10).astype(np.float32)
    g[g == 0] = g[g != 0].min()
    return g


def window_logits(nets, x: torch.Tensor, mirror_axes) -> torch.Tensor:
    """(1, 1, *patch) -> (1, C, *patch) logits averaged over every mirroring of ``mirror_axes`` and over ``nets``."""
    dims = [a + 2 for a in mirror_axes]
    flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    total = 0
    for net in nets:
        for f in flips:
            out = net(torch.flip(x, f) if f else x)
            out = out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: full resolution first
            total = total + (torch.flip(out, f) if f else out).double()
    return total / (len(flips) * len(nets))


def nnunet_predict(nets, image: np.ndarray, norm, patch, mirror_axes=(0, 1, 2), step: float = 0.5,
                   channel: int = 1, probs: bool = False) -> np.ndarray:
    """Foreground probability (float64, ``image``'s shape) as nnUNetPredictor computes it (module docstring); with
    ``probs`` each window's softmax is blended instead of its logits (as nnU-Net v1 did)."""
    x = norm(image.astype(np.float64)).astype(np.float32)
    diff = [max(p - d, 0) for d, p in zip(x.shape, patch)]
    x = np.pad(x, [(d // 2, d - d // 2) for d in diff])
    g = torch.from_numpy(gaussian(patch)).double()
    logits, weights = None, torch.zeros(x.shape, dtype=torch.float64)
    with torch.inference_mode():
        for start in itertools.product(*(steps(s, p, step) for s, p in zip(x.shape, patch))):
            sl = tuple(slice(t, t + p) for t, p in zip(start, patch))
            out = window_logits(nets, torch.from_numpy(np.ascontiguousarray(x[sl]))[None, None], mirror_axes)[0]
            out = torch.softmax(out, 0) if probs else out
            if logits is None:
                logits = torch.zeros((out.shape[0], *x.shape), dtype=torch.float64)
            logits[(slice(None), *sl)] += out * g
            weights[sl] += g
    blended = logits / weights
    result = (blended if probs else torch.softmax(blended, 0))[channel].numpy()
    return result[tuple(slice(d // 2, d // 2 + s) for d, s in zip(diff, image.shape))]
