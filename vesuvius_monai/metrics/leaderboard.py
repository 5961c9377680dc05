"""The surface-detection leaderboard score: 0.30 TopoScore + 0.35 SurfaceDice + 0.35 VOI_score.

Parts, as the competition's public description and scorer define them:

- TopoScore: :func:`vesuvius_monai.metrics.topology.topo_score` on 2 x 2 x 2 tiles, Betti weights
  0.34 / 0.33 / 0.33, features matched by exact Betti matching (``topo_matching="exact"``, the competition's
  library). Where that library cannot be loaded the "persistence" stand-in is used, with a warning;
  :func:`vesuvius_monai.metrics.betti_matching.matching_used` says which matching produced a figure.
- SurfaceDice: DeepMind's normalised surface Dice at tolerance 2 voxels (surfel areas weighted).
- VOI_score = 1 / (1 + alpha VOI), alpha = 0.3, VOI in bits between 26-connected components over the union
  of both foregrounds.

Label value 2 (``ignore_index``) is set to background in both volumes before any part is computed. The three
part weights are clamped at >= 0 and renormalised to sum to 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics._common import check_spacing, check_tiles, prepare_pair
from vesuvius_monai.metrics.surface import surface_dice_masks
from vesuvius_monai.metrics.topology import topo_counts
from vesuvius_monai.metrics.voi import voi_masks, voi_score


def combine_parts(
    topo: float, surface: float, voi_split: float, voi_merge: float, weights: LeaderboardWeights
) -> dict[str, float]:
    """Leaderboard dict from the three raw parts: score, topo_score, surface_dice, voi_score, voi, split, merge."""
    voi = voi_split + voi_merge
    v_score = voi_score(voi, weights.voi_alpha)
    w_topo, w_surface, w_voi = weights.part_weights()
    return {
        "score": w_topo * topo + w_surface * surface + w_voi * v_score,
        "topo_score": float(topo),
        "surface_dice": float(surface),
        "voi_score": v_score,
        "voi": voi,
        "voi_split": voi_split,
        "voi_merge": voi_merge,
    }


def leaderboard_score(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    weights: LeaderboardWeights = LeaderboardWeights(),
    ignore_index: int | None = 2,
    spacing: Sequence[float] = (1, 1, 1),
) -> dict[str, float]:
    """The competition's leaderboard score of a binary prediction against a label.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels become background in both
            before any part is computed.
        weights: part weights and settings, see :class:`LeaderboardWeights`.
        ignore_index: the unlabeled value, or None.
        spacing: voxel size along (z, y, x), used by the surface Dice only.

    Returns:
        {"score", "topo_score", "surface_dice", "voi_score", "voi", "voi_split", "voi_merge"}; score in [0, 1],
        1.0 for a perfect prediction. ``matching_used(weights.topo_matching)`` names the TopoScore's matching.
    """
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    spacing = check_spacing(spacing)
    check_tiles(weights.tiles, pred_mask.shape)
    topo = topo_counts(pred_mask, label_mask, weights.tiles, weights.topo_matching).score(weights.betti_weights)
    surface = surface_dice_masks(pred_mask, label_mask, weights.tolerance, spacing)
    split, merge = voi_masks(pred_mask, label_mask, weights.connectivity)
    return combine_parts(topo, surface, split, merge, weights)
