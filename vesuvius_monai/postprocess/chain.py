"""The post-processing chain: probabilities (Z, Y, X) in [0, 1] -> bool mask, the operators in one order.

1. threshold ``prob > threshold``, or hysteresis (``hysteresis_high`` > 0: the components of ``prob > threshold``
   that touch ``prob > hysteresis_high``);
2. opening with the ellipsoid of ``open_radius``;
3. closing with the ellipsoid of ``close_radius``, of the whole mask or of each sheet on its own
   (``close_per_sheet``);
4. removal of the components of fewer than ``min_size`` voxels (``connectivity``);
5. sheet hole patching (``patch_holes``);
6. 2x2x2 hole plugging (``plug_holes``);
7. cavity filling: cavities of at most ``fill_holes_max`` voxels, then all of them (``fill_voids``).

Every step but the threshold is off by default (then the chain is threshold, min_size, fill_holes_max as before).
"""

from __future__ import annotations

import numpy as np

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.postprocess import operators as ops
from vesuvius_monai.postprocess.patching import patch_holes


def check_prob(prob: np.ndarray) -> None:
    """Raise VesuviusError unless prob is a finite (Z, Y, X) array of values in [0, 1]."""
    if not isinstance(prob, np.ndarray) or prob.ndim != 3:
        raise VesuviusError(f"postprocess prob must be a (Z, Y, X) array, got shape {getattr(prob, 'shape', None)}")
    if not np.isfinite(prob).all():
        raise VesuviusError("postprocess prob contains NaN or infinite values")
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise VesuviusError(f"postprocess prob must be in [0, 1], got range [{prob.min()}, {prob.max()}]")


def postprocess(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The chain of the module docstring on (Z, Y, X) probabilities in [0, 1] (checked); bool (Z, Y, X)."""
    check_prob(prob)
    return apply_chain(prob, cfg)


def apply_chain(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """:func:`postprocess` of a checked ``prob``."""
    mask = binarize(prob, cfg)
    mask = ops.opening(mask, cfg.open_radius)
    if cfg.close_per_sheet:
        mask = ops.closing_per_sheet(mask, cfg.close_radius, cfg.connectivity)
    else:
        mask = ops.closing(mask, cfg.close_radius)
    mask = ops.remove_small_components(mask, cfg.min_size, cfg.connectivity)
    if cfg.patch_holes:
        mask = patch_holes(mask, cfg.connectivity)
    if cfg.plug_holes:
        mask = ops.plug_holes(mask)
    mask = ops.fill_small_holes(mask, cfg.fill_holes_max)
    return ops.fill_cavities(mask) if cfg.fill_voids else mask


def binarize(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Step 1: threshold, or hysteresis when ``hysteresis_high`` > 0; bool (Z, Y, X)."""
    if cfg.hysteresis_high > 0:
        return ops.hysteresis(prob, cfg.threshold, cfg.hysteresis_high, cfg.connectivity)
    return ops.threshold(prob, cfg.threshold)
