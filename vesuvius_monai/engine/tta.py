"""Test-time augmentation: average predictions over mirrored and y-x rotated copies of the input.

Each augmentation is a pair (forward, inverse) acting on (B, C, Z, Y, X) tensors: the input is mapped with
``forward``, predicted, and the prediction mapped back with ``inverse`` before averaging.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Sequence

import torch
from torch import Tensor

from vesuvius_monai.errors import VesuviusError

logger = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]
SPATIAL_DIM_OFFSET = 2  # spatial axis a (0 = z, 1 = y, 2 = x) is tensor dim a + 2 in (B, C, Z, Y, X)
YX_DIMS = (3, 4)


def _check_flip_axes(flip_axes: Sequence[int]) -> tuple[int, ...]:
    """Return flip_axes as a tuple after checking they are distinct spatial axes in {0, 1, 2}."""
    axes = tuple(flip_axes)
    if any(isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in axes):
        raise VesuviusError(f"flip_axes must hold spatial axes 0 (z), 1 (y), 2 (x), got {list(axes)}")
    if len(set(axes)) != len(axes):
        raise VesuviusError(f"flip_axes must not repeat an axis, got {list(axes)}")
    return axes


def _flip_and_rotate(dims: tuple[int, ...], k: int) -> tuple[Transform, Transform]:
    """(forward, inverse) for: mirror tensor ``dims``, then rotate k quarter turns in the y-x plane."""

    def forward(t: Tensor) -> Tensor:
        if dims:
            t = torch.flip(t, dims)
        return torch.rot90(t, k, YX_DIMS) if k else t

    def inverse(t: Tensor) -> Tensor:
        if k:
            t = torch.rot90(t, -k, YX_DIMS)
        return torch.flip(t, dims) if dims else t

    return forward, inverse


def tta_transforms(flip_axes: Sequence[int] = (), rot90: bool = False) -> list[tuple[Transform, Transform]]:
    """All (forward, inverse) pairs: every subset of ``flip_axes`` times (with ``rot90``) 4 y-x rotations.

    The first pair is the identity. There are ``2 ** len(flip_axes)`` pairs, times 4 with ``rot90``.
    Rotations need y size == x size; ``tta_predict`` checks that. Mirroring both y and x is a 180 degree
    turn, so with ``rot90`` flipping both y and x repeats every view twice: ``flip_axes=(0, 1), rot90=True``
    already gives all 16 distinct views (equal weights either way, half the calls).
    """
    axes = _check_flip_axes(flip_axes)
    subsets = [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]
    turns = range(4) if rot90 else range(1)
    return [_flip_and_rotate(tuple(a + SPATIAL_DIM_OFFSET for a in subset), k) for subset in subsets for k in turns]


def tta_predict(
    predict_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    flip_axes: Sequence[int] = (),
    rot90: bool = False,
) -> Tensor:
    """Average ``predict_fn`` over mirrored (and optionally y-x rotated) copies of ``x``.

    x: (B, C, Z, Y, X). predict_fn maps such a tensor to probabilities (B, C', Z, Y, X) with the same spatial
    shape. flip_axes: spatial axes to mirror (0 = z, 1 = y, 2 = x); all subsets are used. rot90: also average
    the 4 quarter turns in the y-x plane, only when Y == X (otherwise skipped with a warning).
    Returns the float32 mean of the un-augmented predictions, shape (B, C', Z, Y, X).
    """
    if x.ndim != 5:
        raise VesuviusError(f"TTA input must have shape (B, C, Z, Y, X), got {tuple(x.shape)}")
    if rot90 and x.shape[3] != x.shape[4]:
        logger.warning("TTA: skipping y-x rotations because y size %d != x size %d", x.shape[3], x.shape[4])
        rot90 = False
    transforms = tta_transforms(flip_axes, rot90)
    total: Tensor | None = None
    for forward, inverse in transforms:
        pred = inverse(predict_fn(forward(x)))
        if pred.ndim != 5 or pred.shape[0] != x.shape[0] or pred.shape[2:] != x.shape[2:]:
            raise VesuviusError(f"TTA prediction shape {tuple(pred.shape)} does not match input shape {tuple(x.shape)}")
        if total is None:
            total = pred.to(torch.float32, copy=True)
        else:
            total += pred
    return total / len(transforms)
