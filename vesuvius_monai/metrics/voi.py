"""Variation of information (VOI) between the connected components of prediction and label.

Both binary masks are cut into connected components (26-connectivity by default). Only voxels in the union
of the two foregrounds count; there, each voxel carries a pair (label component, prediction component),
where 0 means "background in that mask". With entropies in bits (log2, as scikit-image):

- split = H(PR | GT): how much the prediction cuts label components apart (over-segmentation);
- merge = H(GT | PR): how much the prediction glues label components together (under-segmentation);
- VOI = split + merge.

Computed by ``skimage.metrics.variation_of_information(gt_cc[union], pr_cc[union])``, which returns
``[H(image1 | image0), H(image0 | image1)]`` = ``[H(PR | GT), H(GT | PR)]`` and documents the pair as
"false splits, false merges". (Some write split = H(GT | PR), swapping the two names; the sum, and so the
score, is the same either way.)
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import variation_of_information as _skimage_voi

from vesuvius_monai.config import choice
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import prepare_pair
from vesuvius_monai.metrics.components import CONNECTIVITIES, label_components


def voi_from_components(gt_cc: np.ndarray, pr_cc: np.ndarray) -> tuple[float, float]:
    """(split, merge) = (H(PR|GT), H(GT|PR)) in bits between two label images restricted to a region.

    Args:
        gt_cc: non-negative integer labels of the voxels that count (any shape, usually 1D).
        pr_cc: same shape; labels of the same voxels in the prediction.

    Returns:
        (0.0, 0.0) when there is no voxel.
    """
    if gt_cc.size == 0:
        return 0.0, 0.0
    split, merge = _skimage_voi(gt_cc.ravel(), pr_cc.ravel())
    return max(float(split), 0.0), max(float(merge), 0.0)


def voi_masks(
    pred: np.ndarray,
    label: np.ndarray,
    connectivity: int = 26,
    pred_cc: np.ndarray | None = None,
    label_cc: np.ndarray | None = None,
) -> tuple[float, float]:
    """(split, merge) of two boolean masks (z, y, x); component labelings may be passed in to share work."""
    union = pred | label
    if not union.any():
        return 0.0, 0.0
    if pred_cc is None:
        pred_cc, _ = label_components(pred, connectivity)
    if label_cc is None:
        label_cc, _ = label_components(label, connectivity)
    return voi_from_components(label_cc[union], pred_cc[union])


def variation_of_information(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    connectivity: int = 26,
    ignore_index: int | None = 2,
) -> tuple[float, float]:
    """Split and merge entropies (bits) between the connected components of prediction and label.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        connectivity: 6 (faces), 18 (faces and edges) or 26 (full 3x3x3) neighbourhood for the components.
        ignore_index: the unlabeled value, or None.

    Returns:
        (split, merge) = (H(PR|GT), H(GT|PR)) over the union of both foregrounds, each >= 0;
        (0.0, 0.0) when both foregrounds are empty. VOI is their sum.
    """
    choice("connectivity", connectivity, CONNECTIVITIES)
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    return voi_masks(pred_mask, label_mask, connectivity)


def voi_score(voi: float, alpha: float = 0.3) -> float:
    """Map a VOI (split + merge, >= 0) to (0, 1]: 1 / (1 + alpha * voi). The competition uses alpha = 0.3."""
    if not np.isfinite(alpha) or alpha < 0:
        raise VesuviusError(f"voi alpha must be a finite number >= 0, got {alpha!r}")
    if not np.isfinite(voi) or voi < 0:
        raise VesuviusError(f"voi must be a finite number >= 0, got {voi!r}")
    return 1.0 / (1.0 + alpha * voi)
