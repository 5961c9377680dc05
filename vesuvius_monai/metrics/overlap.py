"""Voxel-overlap metrics: Dice and IoU (Jaccard) of the surface class."""

from __future__ import annotations

import numpy as np

from vesuvius_monai.metrics._common import prepare_pair


def dice_masks(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice 2|P∩L| / (|P| + |L|) of two boolean masks of one shape; 1.0 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(label))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & label)) / total


def iou_masks(pred: np.ndarray, label: np.ndarray) -> float:
    """IoU |P∩L| / |P∪L| of two boolean masks of one shape; 1.0 when both are empty."""
    union = int(np.count_nonzero(pred | label))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & label)) / union


def dice(pred: np.ndarray, label: np.ndarray, *, ignore_index: int | None = 2) -> float:
    """Dice coefficient of the surface class.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        ignore_index: the unlabeled value, or None.

    Returns:
        Dice in [0, 1]; 1.0 when prediction and label are both empty.
    """
    return dice_masks(*prepare_pair(pred, label, ignore_index))


def iou(pred: np.ndarray, label: np.ndarray, *, ignore_index: int | None = 2) -> float:
    """Intersection over union of the surface class; same inputs and conventions as :func:`dice`."""
    return iou_masks(*prepare_pair(pred, label, ignore_index))
