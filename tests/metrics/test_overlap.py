"""Dice and IoU against hand-computed values and MONAI; input checks shared by every metric."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.overlap import dice, iou


def _random_pair(seed: int, shape=(12, 14, 16)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < 0.3).astype(np.uint8), (rng.random(shape) < 0.4).astype(np.uint8)


def test_hand_computed_values():
    pred = np.zeros((2, 2, 4), dtype=bool)
    label = np.zeros((2, 2, 4), dtype=np.uint8)
    pred[0, 0, :3] = True  # 3 voxels
    label[0, 0, 1:] = 1  # 3 voxels, 2 shared
    assert dice(pred, label) == pytest.approx(2 * 2 / 6)
    assert iou(pred, label) == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_monai(seed):
    pred, label = _random_pair(seed)
    p = torch.as_tensor(pred[None, None], dtype=torch.float32)
    g = torch.as_tensor(label[None, None], dtype=torch.float32)
    expected_dice = DiceMetric(include_background=True)(p, g).item()
    expected_iou = MeanIoU(include_background=True)(p, g).item()
    assert dice(pred, label) == pytest.approx(expected_dice, rel=1e-6)
    assert iou(pred, label) == pytest.approx(expected_iou, rel=1e-6)


def test_ignore_region_does_not_change_the_result():
    pred, label = _random_pair(3)
    reference_dice, reference_iou = dice(pred, label), iou(pred, label)
    rng = np.random.default_rng(4)
    # widen the volume with an unlabeled band where the prediction is noise
    label_ignored = np.concatenate([label, np.full((12, 14, 5), 2, np.uint8)], axis=2)
    pred_noisy = np.concatenate([pred, (rng.random((12, 14, 5)) < 0.5).astype(np.uint8)], axis=2)
    assert dice(pred_noisy, label_ignored) == pytest.approx(reference_dice)
    assert iou(pred_noisy, label_ignored) == pytest.approx(reference_iou)
    # a custom ignore value works the same way
    label_custom = np.where(label_ignored == 2, 255, label_ignored)
    assert dice(pred_noisy, label_custom, ignore_index=255) == pytest.approx(reference_dice)


def test_ignored_voxels_inside_the_volume():
    pred = np.ones((1, 1, 4), dtype=np.uint8)
    label = np.array([[[1, 2, 0, 2]]], dtype=np.uint8)
    # only voxels 0 and 2 count: pred {0, 2}, label {0}
    assert dice(pred, label) == pytest.approx(2 * 1 / 3)
    assert iou(pred, label) == pytest.approx(1 / 2)


def test_empty_masks():
    empty = np.zeros((3, 3, 3), dtype=np.uint8)
    one = empty.copy()
    one[1, 1, 1] = 1
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(one, empty) == 0.0 and iou(empty, one) == 0.0


def test_inputs_are_not_modified():
    pred, label = _random_pair(5)
    label[0] = 2
    pred_copy, label_copy = pred.copy(), label.copy()
    dice(pred, label)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(label, label_copy)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(VesuviusError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        dice(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))


def test_bad_label_values_are_named():
    label = np.zeros((2, 2, 2), dtype=np.int64)
    label[0, 0, 0] = 7
    with pytest.raises(VesuviusError, match=r"label values.*\[7\]"):
        iou(np.zeros((2, 2, 2)), label)
    with pytest.raises(VesuviusError, match="label"):
        dice(np.zeros((2, 2, 2)), np.ones((2, 2, 2)) * 2, ignore_index=None)


@pytest.mark.parametrize(
    "pred, message",
    [
        (np.full((2, 2, 2), 0.5), "binary"),
        (np.full((2, 2, 2), np.nan), "NaN"),
        (np.zeros((2, 2)), "3D"),
    ],
)
def test_bad_prediction(pred, message):
    with pytest.raises(VesuviusError, match=message):
        dice(pred, np.zeros(pred.shape, dtype=np.uint8))


def test_bad_ignore_index():
    with pytest.raises(VesuviusError, match="ignore_index"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), ignore_index=1)
