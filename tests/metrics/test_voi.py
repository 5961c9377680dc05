"""VOI against scikit-image and hand-computed entropies."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.metrics import variation_of_information as sk_voi

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.voi import variation_of_information, voi_from_components, voi_score


def _blobby(seed: int, shape=(20, 22, 24), threshold=0.56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 1.5) > threshold


@pytest.mark.parametrize("seed, connectivity", [(0, 26), (1, 26), (2, 6)])
def test_matches_skimage_on_random_components(seed, connectivity):
    pred, label = _blobby(seed), _blobby(seed + 100)
    sk_connectivity = {26: 3, 6: 1}[connectivity]
    gt_cc = sk_label(label, connectivity=sk_connectivity)
    pr_cc = sk_label(pred, connectivity=sk_connectivity)
    assert gt_cc.max() > 3 and pr_cc.max() > 3  # several components on both sides
    union = pred | label
    expected = sk_voi(gt_cc[union], pr_cc[union])  # [H(PR|GT), H(GT|PR)]: false splits, false merges
    split, merge = variation_of_information(pred, label.astype(np.uint8), connectivity=connectivity)
    assert split == pytest.approx(expected[0], abs=1e-9)
    assert merge == pytest.approx(expected[1], abs=1e-9)
    assert split > 0 and merge > 0


def test_from_components_matches_skimage_on_random_labelings():
    rng = np.random.default_rng(7)
    gt, pr = rng.integers(0, 6, size=500), rng.integers(0, 9, size=500)
    expected = sk_voi(gt, pr)
    assert voi_from_components(gt, pr) == pytest.approx(tuple(expected), abs=1e-9)


def test_split_and_merge_hand_computed():
    label = np.zeros((3, 3, 8), dtype=np.uint8)
    label[1, 1, :] = 1  # one rod of 8 voxels
    pred = label.copy()
    pred[1, 1, 4:] = 0
    pred[1, 1, 5:] = 1  # cut into pieces of 4 and 3; the gap voxel is label-only (pred background)
    # union: 8 voxels, GT = one component; PR labels {a: 4, 0: 1, b: 3} -> H(PR|GT) = H(4/8, 1/8, 3/8)
    expected_split = -(0.5 * np.log2(0.5) + 0.125 * np.log2(0.125) + 0.375 * np.log2(0.375))
    split, merge = variation_of_information(pred, label)
    assert split == pytest.approx(expected_split)
    assert merge == pytest.approx(0.0, abs=1e-12)
    # swapping roles swaps split and merge
    split_swapped, merge_swapped = variation_of_information(label, pred)
    assert (split_swapped, merge_swapped) == pytest.approx((0.0, expected_split), abs=1e-12)


def test_merge_of_two_components_is_one_bit():
    label = np.zeros((1, 1, 5), dtype=np.uint8)
    label[0, 0, [0, 1, 3, 4]] = 1  # two components of 2
    pred = np.ones((1, 1, 5), dtype=np.uint8)  # one component of 5 covering both
    label_ignored = label.copy()
    label_ignored[0, 0, 2] = 2  # ignore the bridge voxel: pred splits back into two, matching the label
    split, merge = variation_of_information(pred, label)
    # union 5 voxels: GT labels {1: 2, 0: 1, 2: 2}, PR one label -> H(GT|PR) = H(2/5, 1/5, 2/5)
    assert merge == pytest.approx(-(0.8 * np.log2(0.4) + 0.2 * np.log2(0.2)))
    assert split == pytest.approx(0.0, abs=1e-12)
    assert variation_of_information(pred, label_ignored) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_empty_and_perfect():
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    assert variation_of_information(empty, empty) == (0.0, 0.0)
    label = _blobby(3).astype(np.uint8)
    assert variation_of_information(label, label) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_voi_score():
    assert voi_score(0.0) == 1.0
    assert voi_score(1.0) == pytest.approx(1 / 1.3)
    assert voi_score(2.0, alpha=1.0) == pytest.approx(1 / 3)
    with pytest.raises(VesuviusError, match="alpha"):
        voi_score(1.0, alpha=-1)


def test_bad_connectivity_and_shapes():
    pred = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(VesuviusError, match="connectivity"):
        variation_of_information(pred, pred, connectivity=8)
    with pytest.raises(VesuviusError, match="shape"):
        variation_of_information(pred, pred[:, :, :2])
