"""Surface Dice and HD95 against MONAI and hand-computed values."""

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage as ndi

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.surface import hausdorff95, surface_dice, surfel_area_table


def _blobs(seed: int, shape=(24, 28, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random blob label and a prediction that overlaps it partly."""
    rng = np.random.default_rng(seed)
    label = ndi.gaussian_filter(rng.random(shape), 2.5) > 0.5
    other = ndi.gaussian_filter(rng.random(shape), 2.5) > 0.5
    pred = other | (label & (rng.random(shape) > 0.2))
    return pred, label


def _tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask[None, None].astype(np.float32))


def _monai_nsd(pred, label, tolerance, spacing, subvoxels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_surface_dice(
            _tensor(pred), _tensor(label), [tolerance], include_background=True,
            spacing=spacing, use_subvoxels=subvoxels,
        ).item()


CASES = [(0, (1, 1, 1), 2.0), (1, (1, 1, 1), 1.0), (2, (0.7, 1.3, 2.1), 2.0)]


@pytest.mark.parametrize("seed, spacing, tolerance", CASES)
def test_surface_dice_matches_monai_subvoxels(seed, spacing, tolerance):
    """MONAI's use_subvoxels=True is DeepMind's definition; agreement to float32 precision (1e-5)."""
    pred, label = _blobs(seed)
    ours = surface_dice(pred, label.astype(np.uint8), tolerance=tolerance, spacing=spacing)
    assert ours == pytest.approx(_monai_nsd(pred, label, tolerance, spacing, True), abs=1e-5)
    assert 0.0 < ours < 1.0


@pytest.mark.parametrize("seed, spacing, tolerance", CASES)
def test_surface_dice_close_to_monai_voxel_counting(seed, spacing, tolerance):
    """MONAI's default counts boundary voxels instead of surfel areas: close, not equal.

    Measured on these random blobs: ours - MONAI = +0.021, +0.053 (tolerance 1), +0.018 (anisotropic).
    """
    pred, label = _blobs(seed)
    ours = surface_dice(pred, label.astype(np.uint8), tolerance=tolerance, spacing=spacing)
    difference = ours - _monai_nsd(pred, label, tolerance, spacing, False)
    assert 1e-4 < abs(difference) < 0.1


def test_surfel_areas_hand_computed():
    # one corner voxel: the triangle cutting the corner at edge midpoints, area sqrt(3) / 8
    assert surfel_area_table((1.0, 1.0, 1.0))[1] == pytest.approx(math.sqrt(3) / 8)
    # voxels with z-offset 0 set (bits 128, 64, 32, 16): a square normal to z, area sy * sx
    # voxels with x-offset 0 set (bits 128, 32, 8, 2): a square normal to x, area sz * sy
    table = surfel_area_table((2.0, 1.0, 1.0))
    assert table[128 + 64 + 32 + 16] == pytest.approx(1.0)
    assert table[128 + 32 + 8 + 2] == pytest.approx(2.0)
    assert table[0] == 0 and table[255] == 0


def test_surface_dice_hand_computed():
    label = np.zeros((9, 9, 20), dtype=np.uint8)
    label[4, 4, 3] = 1
    label[4, 4, 15] = 1
    pred = np.zeros_like(label)
    pred[4, 4, 3] = 1
    # both isolated voxels have the same surface area A: NSD = (A + A) / (2A + A)
    assert surface_dice(pred, label) == pytest.approx(2 / 3)
    assert surface_dice(label, label) == 1.0


def test_surface_dice_tolerance_is_inclusive():
    label = np.zeros((7, 7, 12), dtype=np.uint8)
    label[3, 3, 2] = 1
    pred = np.zeros_like(label)
    pred[3, 3, 5] = 1
    # surfels sit on voxel corners: label corners at x in {2, 3}, pred corners at x in {5, 6};
    # the nearest other corner is 2 away for the inner half of each voxel's 8 equal surfels, 3 for the rest
    assert surface_dice(pred, label, tolerance=3.0) == 1.0
    assert surface_dice(pred, label, tolerance=2.0) == pytest.approx(0.5)
    assert surface_dice(pred, label, tolerance=1.9) == 0.0


def test_surface_dice_empty_cases():
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    one = empty.copy()
    one[2, 2, 2] = 1
    assert surface_dice(empty, empty) == 1.0
    assert surface_dice(one, empty) == 0.0
    assert surface_dice(empty, one) == 0.0
    # ignored voxels are background in both: a prediction only on ignored voxels meets an empty label
    assert surface_dice(one, np.where(one == 1, 2, 0)) == 1.0


def test_surface_dice_ignore_region():
    pred, label = _blobs(3)
    reference = surface_dice(pred, label.astype(np.uint8))
    wide_label = np.concatenate([label.astype(np.uint8), np.full((24, 28, 6), 2, np.uint8)], axis=2)
    wide_pred = np.concatenate([pred, np.ones((24, 28, 6), bool)], axis=2)
    assert surface_dice(wide_pred, wide_label) == pytest.approx(reference)


def _monai_hd95(pred, label, spacing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(
            _tensor(pred), _tensor(label), include_background=True, percentile=95, spacing=spacing
        ).item()


@pytest.mark.parametrize("seed, spacing", [(0, (1, 1, 1)), (4, (1, 1, 1)), (2, (0.7, 1.3, 2.1))])
def test_hd95_matches_monai(seed, spacing):
    pred, label = _blobs(seed)
    ours = hausdorff95(pred, label.astype(np.uint8), spacing=spacing)
    assert ours == pytest.approx(_monai_hd95(pred, label, spacing), rel=1e-5)
    assert ours > 0


def test_hd95_hand_computed_and_empty_cases():
    label = np.zeros((7, 7, 12), dtype=np.uint8)
    label[3, 3, 2] = 1
    pred = np.zeros_like(label)
    pred[3, 3, 7] = 1
    assert hausdorff95(pred, label) == pytest.approx(5.0)
    assert hausdorff95(pred, label, spacing=(1, 1, 0.5)) == pytest.approx(2.5)
    empty = np.zeros_like(label)
    assert hausdorff95(empty, empty) == 0.0
    assert hausdorff95(pred, empty) == math.inf
    assert hausdorff95(empty, label) == math.inf


def test_bad_parameters():
    pred, label = _blobs(0)
    with pytest.raises(VesuviusError, match="tolerance"):
        surface_dice(pred, label, tolerance=-1)
    with pytest.raises(VesuviusError, match="spacing"):
        surface_dice(pred, label, spacing=(1, 1))
    with pytest.raises(VesuviusError, match="spacing"):
        hausdorff95(pred, label, spacing=(1, 0, 1))
    with pytest.raises(VesuviusError, match="shape"):
        hausdorff95(pred, label[:-1])
