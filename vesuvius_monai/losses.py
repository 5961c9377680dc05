"""Segmentation losses for papyrus surfaces: Dice, BCE, soft clDice and Skeleton Recall, with an ignore label.

Labels: 0 background, 1 surface, ``ignore_index`` (default 2) unlabeled. Inputs are logits (B, 1, Z, Y, X)
and a target of the same shape. Every loss masks the unlabeled region (``mask = target != ignore_index``):
probabilities and target are multiplied by the mask before Dice-like sums and BCE is averaged over the
labeled voxels only, so neither the loss value nor its gradient depends on the logits inside the mask.

All sums run over the whole batch (MONAI's ``batch=True`` convention), so a patch without any surface does
not produce a degenerate per-sample ratio.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses.cldice import soft_skel
from scipy import ndimage
from skimage.morphology import skeletonize
from torch import Tensor, nn

from vesuvius_monai.config import LossWeights, choice, from_dict, integer, require
from vesuvius_monai.errors import VesuviusError

logger = logging.getLogger(__name__)

SMOOTH = 1e-5
SKELETON_MODES = ("slices", "3d")


# ---------------------------------------------------------------- skeleton of the target (Skeleton Recall)


def skeleton_target(label: np.ndarray, *, dilate: bool = True, mode: str = "slices") -> np.ndarray:
    """Skeleton of the surface voxels (label == 1) of a (Z, Y, X) label volume; bool (Z, Y, X).

    ``mode`` is one of :data:`SKELETON_MODES` (checked by :class:`SurfaceLoss`). ``mode="3d"`` uses skimage's 3D
    thinning (Lee 1994), as in Kirchhoff et al. 2024; it thins to curves, so a thin sheet can collapse to a few
    voxels or vanish. ``mode="slices"`` (default) is the union of the 2D skeletons of every slice along z, y and
    x: for a sheet this contains its medial surface. ``dilate`` grows the skeleton by one voxel (6-neighbourhood);
    the result is always restricted to the surface voxels, so the ignore region and the background are never part
    of it.
    """
    surface = label == 1
    if not surface.any():
        return np.zeros(label.shape, dtype=bool)
    skel = skeletonize(surface) if mode == "3d" else _skeleton_of_slices(surface)
    skel = skel.astype(bool)
    if dilate:
        skel = ndimage.binary_dilation(skel, structure=ndimage.generate_binary_structure(3, 1))
    return skel & surface


def _skeleton_of_slices(surface: np.ndarray) -> np.ndarray:
    """Union of the 2D skeletons of all slices of a bool (Z, Y, X) volume along each axis; bool (Z, Y, X)."""
    skel = np.zeros(surface.shape, dtype=bool)
    for axis in range(3):
        surface_view = np.moveaxis(surface, axis, 0)
        skel_view = np.moveaxis(skel, axis, 0)  # a view: writing into it fills ``skel``
        for index in range(surface_view.shape[0]):
            if surface_view[index].any():
                skel_view[index] |= skeletonize(surface_view[index])
    return skel


def skeleton_batch(target: Tensor, *, dilate: bool = True, mode: str = "slices") -> Tensor:
    """Skeletons of a (B, 1, Z, Y, X) target, computed on the CPU; float (B, 1, Z, Y, X) on target's device."""
    labels = target.detach().cpu().numpy()
    skels = [skeleton_target(labels[b, 0], dilate=dilate, mode=mode) for b in range(labels.shape[0])]
    return torch.from_numpy(np.stack(skels)[:, None].astype(np.float32)).to(target.device)


# ---------------------------------------------------------------- loss components


def masked_bce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """BCE-with-logits averaged over the voxels where ``mask`` is True; 0 when none is. All (B, 1, Z, Y, X)."""
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_voxel = torch.where(mask, per_voxel, torch.zeros_like(per_voxel))
    return per_voxel.sum() / mask.sum().clamp(min=1)


def soft_cldice(prob: Tensor, target: Tensor, iters: int) -> Tensor:
    """Soft clDice loss 1 - clDice of masked probabilities and masked target, both (B, 1, Z, Y, X) in [0, 1].

    Soft skeletons (Shit et al. 2021) by MONAI's ``soft_skel`` (soft erosion = minimum over the 6 face neighbours,
    dilation = 3x3x3 maximum); ``iters`` erosions, so structures up to about ``2 * iters + 1`` voxels thick thin.
    """
    skel_prob = soft_skel(prob, iters)
    skel_target = soft_skel(target, iters)
    precision = ((skel_prob * target).sum() + SMOOTH) / (skel_prob.sum() + SMOOTH)
    sensitivity = ((skel_target * prob).sum() + SMOOTH) / (skel_target.sum() + SMOOTH)
    return 1.0 - 2.0 * precision * sensitivity / (precision + sensitivity)


def skeleton_recall(prob: Tensor, skel: Tensor) -> Tensor:
    """Skeleton Recall loss 1 - sum(prob * skel) / sum(skel); prob, skel (B, 1, Z, Y, X); 0 for an empty skeleton."""
    return 1.0 - ((prob * skel).sum() + SMOOTH) / (skel.sum() + SMOOTH)


def check_loss_inputs(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    """Raise VesuviusError unless logits are (B, 1, Z, Y, X) and target has their shape and values {0, 1, ignore}."""
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise VesuviusError(f"loss logits must have shape (B, 1, Z, Y, X), got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise VesuviusError(
            f"loss target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    bad = (target != 0) & (target != 1) & (target != ignore_index)
    if bool(bad.any()):
        values = torch.unique(target[bad])[:5].tolist()
        raise VesuviusError(
            f"loss target has values {values}; allowed are 0 (background), 1 (surface) and {ignore_index} (ignore)"
        )


class SurfaceLoss(nn.Module):
    """Weighted sum of masked Dice, BCE, soft clDice and Skeleton Recall losses.

    ``forward(logits, target)`` takes logits (B, 1, Z, Y, X) and a target of the same shape with values
    {0, 1, ignore_index} and returns a scalar tensor. After each call ``last_parts`` holds the unweighted value
    of each active component as a detached scalar tensor on the input's device (reading them as floats is left
    to the caller, so a training step does not wait for the GPU).
    """

    def __init__(
        self,
        weights: LossWeights,
        *,
        ignore_index: int = 2,
        cldice_iters: int = 3,
        skel_mode: str = "slices",
        skel_dilate: bool = True,
    ) -> None:
        super().__init__()
        require(integer("data.ignore_index", ignore_index) not in (0, 1), "data.ignore_index",
                f"must differ from 0 and 1, got {ignore_index}")
        integer("cldice_iters", cldice_iters, 1)
        choice("skel_mode", skel_mode, SKELETON_MODES)
        self.weights = weights
        self.ignore_index = ignore_index
        self.cldice_iters = cldice_iters
        self.skel_mode = skel_mode
        self.skel_dilate = skel_dilate
        self.dice = DiceLoss(sigmoid=False, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=True)
        self.last_parts: dict[str, Tensor] = {}

    def components(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Return the unweighted scalar loss of each active component, keyed by its LossWeights name."""
        check_loss_inputs(logits, target, self.ignore_index)
        logits = logits.float()
        mask = target != self.ignore_index
        surface = (target == 1).float()  # already 0 inside the ignore region
        prob = torch.sigmoid(logits) * mask.float()
        active = self.weights.active()
        parts: dict[str, Tensor] = {}
        if "dice" in active:
            parts["dice"] = self.dice(prob, surface)
        if "bce" in active:
            parts["bce"] = masked_bce(logits, surface, mask)
        if "cldice" in active:
            parts["cldice"] = soft_cldice(prob, surface, self.cldice_iters)
        if "skel_recall" in active:
            skel = skeleton_batch(target, dilate=self.skel_dilate, mode=self.skel_mode)
            parts["skel_recall"] = skeleton_recall(prob, skel)
        return parts

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Weighted sum of the active components; a scalar tensor."""
        parts = self.components(logits, target)
        active = self.weights.active()
        total = sum(active[name] * value for name, value in parts.items())
        self.last_parts = {name: value.detach() for name, value in parts.items()}
        return total


def build_loss(
    weights: dict | LossWeights,
    *,
    ignore_index: int = 2,
    cldice_iters: int = 3,
    skel_mode: str = "slices",
) -> SurfaceLoss:
    """Build a SurfaceLoss from LossWeights or a dict of weights, read like ``train.loss`` (omitted terms keep
    their defaults: dice 1, the others 0)."""
    if isinstance(weights, dict):
        weights = from_dict(LossWeights, weights, "train.loss")
    if not isinstance(weights, LossWeights):
        raise VesuviusError(f"loss weights must be a dict or LossWeights, got {type(weights).__name__}")
    logger.debug("loss weights %s", weights.active())
    return SurfaceLoss(weights, ignore_index=ignore_index, cldice_iters=cldice_iters, skel_mode=skel_mode)
