"""clDice on hand-built volumes."""

import numpy as np
import pytest
from skimage.morphology import skeletonize

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.cldice import cldice, cldice_parts


def rod(length: int, start: int = 2) -> np.ndarray:
    out = np.zeros((5, 5, 16), dtype=np.uint8)
    out[2, 2, start : start + length] = 1
    return out


def test_perfect_and_empty():
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[3:9, 3:9, 3:9] = 1
    assert cldice(label, label) == 1.0
    empty = np.zeros_like(label)
    assert cldice_parts(empty, empty) == (1.0, 1.0, 1.0)
    assert cldice(empty, label) == 0.0
    assert cldice(label, empty) == 0.0


def test_half_rod_hand_computed():
    label = rod(10)
    pred = rod(5)
    # a one-voxel rod is its own skeleton: Tprec = 5/5, Tsens = 5/10
    assert skeletonize(label.astype(bool)).sum() == 10
    score, tprec, tsens = cldice_parts(pred, label)
    assert (tprec, tsens) == pytest.approx((1.0, 0.5))
    assert score == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_thick_prediction_around_a_thin_label():
    label = rod(10)
    pred = np.zeros_like(label)
    pred[1:4, 1:4, 2:12] = 1  # a 3x3 tube holding the label rod
    score, tprec, tsens = cldice_parts(pred, label)
    assert tsens == 1.0  # the label skeleton lies inside the prediction
    assert 0.0 < tprec <= 1.0  # the tube skeleton is its central rod, which lies inside the label
    assert score == pytest.approx(2 * tprec * tsens / (tprec + tsens))


def test_ignore_region():
    label = rod(10)
    label[2, 2, 7:12] = 2  # the second half of the rod is unlabeled
    pred = rod(10)
    assert cldice(pred, label) == 1.0
    with pytest.raises(VesuviusError, match="label values"):
        cldice(pred, label, ignore_index=None)


def test_objects_that_thinning_deletes_still_count():
    """skimage deletes even-thickness objects (issue #3757); they stand in for their own skeleton."""
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[3:9, 3:9, 3:9] = 1
    assert skeletonize(label.astype(bool)).sum() == 0  # the skimage behaviour worked around
    pred = label.copy()
    pred[3:9, 3:9, 6:9] = 0  # half the cube
    score, tprec, tsens = cldice_parts(pred, label)
    assert tprec == 1.0  # all prediction voxels lie in the label
    assert tsens == pytest.approx(0.5)  # half the label cube lies in the prediction
    assert score == pytest.approx(2 / 3)
