"""clDice (Shit et al., CVPR 2021): Dice of skeleton-in-mask precision and recall.

With S(X) the 3D skeleton of X (``skimage.morphology.skeletonize``, Lee's thinning for 3D volumes):

- topology precision Tprec = |S(P) ∩ L| / |S(P)|;
- topology sensitivity Tsens = |S(L) ∩ P| / |S(L)|;
- clDice = 2 Tprec Tsens / (Tprec + Tsens).

Caveats of skimage's 3D thinning (scikit-image issue #3757, still open): it keeps curves, not medial
surfaces, and it can delete an object entirely when its thickness is even (a 2x2x8 rod, a 6x6x6 cube, a
2- or 3-voxel-thick flat slab). A component whose skeleton vanishes is kept whole as its own skeleton here,
so it still counts; a component that keeps only part of its skeleton is left as thinning made it. On thin
sheets clDice therefore measures how well the surviving centre curves of each mask stay inside the other.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import skeletonize

from vesuvius_monai.metrics._common import bounding_box, prepare_pair
from vesuvius_monai.metrics.components import label_components


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Boolean 3D skeleton of a boolean volume (z, y, x), same shape; computed on its bounding box.

    A 26-connected component that thinning deletes entirely stands in for its own skeleton.
    """
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return out
    crop = mask[box]
    thin = skeletonize(crop) > 0  # skimage pads with background itself
    components, count = label_components(crop, 26)
    lost = np.ones(count + 1, dtype=bool)
    lost[components[thin]] = False
    lost[0] = False
    out[box] = thin | lost[components]
    return out


def cldice_from_skeletons(
    pred: np.ndarray, label: np.ndarray, pred_skeleton: np.ndarray, label_skeleton: np.ndarray
) -> tuple[float, float, float]:
    """(clDice, Tprec, Tsens) from boolean masks and their skeletons, all (z, y, x) of one shape.

    An empty skeleton (empty mask) has precision (or sensitivity) 1.0 when the other mask is empty too and
    0.0 otherwise, so clDice is 1.0 when both masks are empty and 0.0 when exactly one is.
    """
    n_pred, n_label = int(np.count_nonzero(pred_skeleton)), int(np.count_nonzero(label_skeleton))
    if n_pred == 0 and n_label == 0:
        return 1.0, 1.0, 1.0
    tprec = np.count_nonzero(pred_skeleton & label) / n_pred if n_pred else 0.0
    tsens = np.count_nonzero(label_skeleton & pred) / n_label if n_label else 0.0
    if tprec + tsens == 0:
        return 0.0, float(tprec), float(tsens)
    return 2.0 * tprec * tsens / (tprec + tsens), float(tprec), float(tsens)


def cldice_parts(
    pred: np.ndarray, label: np.ndarray, *, ignore_index: int | None = 2
) -> tuple[float, float, float]:
    """(clDice, topology precision, topology sensitivity) of a prediction against a label.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        ignore_index: the unlabeled value, or None.
    """
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    return cldice_from_skeletons(pred_mask, label_mask, skeleton(pred_mask), skeleton(label_mask))


def cldice(pred: np.ndarray, label: np.ndarray, *, ignore_index: int | None = 2) -> float:
    """clDice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is. See :func:`cldice_parts`."""
    return cldice_parts(pred, label, ignore_index=ignore_index)[0]
