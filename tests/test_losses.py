"""Tests for vesuvius_monai.losses: masked Dice / BCE / clDice / Skeleton Recall."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses.cldice import soft_skel

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.losses import (
    LossWeights,
    SurfaceLoss,
    build_loss,
    skeleton_target,
)

COMPONENTS = ["dice", "bce", "cldice", "skel_recall"]
SHAPE = (2, 1, 12, 16, 16)


def only(name: str, **kwargs) -> SurfaceLoss:
    """A SurfaceLoss with just one component active (terms left out keep their defaults, so all are given)."""
    return build_loss({c: float(c == name) for c in COMPONENTS}, **kwargs)


def make_target(ignore_value: int = 2) -> torch.Tensor:
    """(2, 1, 12, 16, 16) target: a 3-voxel-thick sheet, a bar, and an ignore slab at x < 4."""
    target = torch.zeros(SHAPE)
    target[:, :, 4:7, 2:14, 2:14] = 1
    target[1, :, 8:11, 6:9, 2:14] = 1
    target[:, :, :, :, :4] = ignore_value
    return target


def random_logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def perfect_logits(target: torch.Tensor) -> torch.Tensor:
    return 20.0 * (2.0 * (target == 1).float() - 1.0)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_finite_and_in_range(name):
    loss = only(name)
    value = loss(random_logits(), make_target())
    assert torch.isfinite(value)
    upper = 10.0 if name == "bce" else 1.0
    assert 0.0 < value.item() <= upper
    assert float(loss.last_parts[name]) == pytest.approx(value.item())


@pytest.mark.parametrize("name", ["dice", "cldice", "skel_recall"])
def test_perfect_logits_give_near_zero_loss(name):
    target = make_target()
    assert only(name)(perfect_logits(target), target).item() < 1e-4


def test_perfect_logits_give_near_zero_bce():
    target = make_target()
    assert only("bce")(perfect_logits(target), target).item() < 1e-6


def test_dice_matches_monai_without_ignore():
    target = make_target()
    target[target == 2] = 0
    logits = random_logits()
    reference = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)(logits, target)
    assert only("dice")(logits, target).item() == pytest.approx(reference.item(), rel=1e-6)


def test_dice_with_ignore_equals_hand_formula_on_labeled_voxels():
    """With logits 0 (p = 0.5): dice = 1 - 2 * 0.5 * n_fg / (0.5 * n_labeled + n_fg) over labeled voxels."""
    target = make_target()
    n_fg = float((target == 1).sum())
    n_labeled = float((target != 2).sum())
    expected = 1.0 - (2 * 0.5 * n_fg + 1e-5) / (0.5 * n_labeled + n_fg + 1e-5)
    assert only("dice")(torch.zeros(SHAPE), target).item() == pytest.approx(expected, rel=1e-6)


def test_bce_with_ignore_equals_plain_bce_on_labeled_voxels():
    target = make_target()
    logits = random_logits()
    keep = target != 2
    expected = F.binary_cross_entropy_with_logits(logits[keep], target[keep])
    assert only("bce")(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_skel_recall_with_half_probability_is_one_half():
    assert only("skel_recall")(torch.zeros(SHAPE), make_target()).item() == pytest.approx(0.5, abs=1e-6)


def test_combined_total_is_weighted_sum():
    target, logits = make_target(), random_logits()
    loss = build_loss(LossWeights(dice=1.0, bce=2.0, cldice=0.5, skel_recall=0.25))
    total = loss(logits, target).item()
    parts = {name: only(name)(logits, target).item() for name in COMPONENTS}
    expected = parts["dice"] + 2.0 * parts["bce"] + 0.5 * parts["cldice"] + 0.25 * parts["skel_recall"]
    assert total == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- ignore region


@pytest.mark.parametrize("name", COMPONENTS)
def test_ignore_region_changes_neither_loss_nor_gradients(name):
    target = make_target()
    ignore = target == 2
    base = random_logits(0)
    changed = torch.where(ignore, 50.0 * random_logits(1), base)
    grads, values = [], []
    for logits in (base, changed):
        logits = logits.clone().requires_grad_(True)
        value = only(name)(logits, target)
        value.backward()
        values.append(value.item())
        grads.append(logits.grad)
    assert values[0] == pytest.approx(values[1], abs=1e-7)
    assert torch.allclose(grads[0], grads[1], atol=1e-9)
    assert torch.count_nonzero(grads[0][ignore]) == 0
    assert torch.count_nonzero(grads[0][~ignore]) > 0


@pytest.mark.parametrize("name", COMPONENTS)
def test_ignore_label_value_does_not_matter(name):
    """The same unlabeled region coded 2 (ignore_index=2) or 7 (ignore_index=7) gives the same loss."""
    logits = random_logits()
    two = only(name, ignore_index=2)(logits, make_target(2)).item()
    seven = only(name, ignore_index=7)(logits, make_target(7)).item()
    assert two == pytest.approx(seven, abs=1e-7)


# ---------------------------------------------------------------- optimisation


@pytest.mark.parametrize("name", COMPONENTS)
def test_one_adamw_step_lowers_loss(name):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1)
    )
    target = make_target()
    image = (target == 1).float() + 0.3 * random_logits(2)
    loss_fn = only(name)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = loss_fn(net(image), target)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(net(image), target)
    assert after.item() < before.item()


# ---------------------------------------------------------------- skeletons


def _former_soft_skeleton(x: torch.Tensor, iters: int) -> torch.Tensor:
    """The hand-written soft skeleton this project used before MONAI's ``soft_skel`` (kept as the reference)."""

    def erode(v):
        along_z = -F.max_pool3d(-v, (3, 1, 1), stride=1, padding=(1, 0, 0))
        along_y = -F.max_pool3d(-v, (1, 3, 1), stride=1, padding=(0, 1, 0))
        along_x = -F.max_pool3d(-v, (1, 1, 3), stride=1, padding=(0, 0, 1))
        return torch.minimum(torch.minimum(along_z, along_y), along_x)

    def opened(v):
        return F.max_pool3d(erode(v), kernel_size=3, stride=1, padding=1)

    skel = F.relu(x - opened(x))
    for _ in range(iters):
        x = erode(x)
        delta = F.relu(x - opened(x))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def test_soft_skel_equals_the_former_hand_written_one():
    """MONAI's soft_skel (used now) gives the numbers of the former copy, on random shapes, values and iterations."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 3)), *rng.integers(2, 18, size=3).tolist())
        x = torch.from_numpy(rng.random(shape, dtype=np.float32))
        if rng.random() < 0.5:
            x = (x > 0.5).float()  # binary inputs too, like a target
        iters = int(rng.integers(1, 6))
        assert torch.equal(soft_skel(x, iters), _former_soft_skeleton(x, iters))


def test_last_parts_are_tensors_until_read():
    loss = build_loss({"dice": 1.0, "bce": 0.5})
    total = loss(random_logits(), make_target())
    assert set(loss.last_parts) == {"dice", "bce"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in loss.last_parts.values())
    parts = {name: float(value) for name, value in loss.last_parts.items()}
    assert total.item() == pytest.approx(parts["dice"] + 0.5 * parts["bce"])


def test_soft_skel_of_thick_bar_is_thinner():
    bar = torch.zeros(1, 1, 15, 15, 20)
    bar[:, :, 4:11, 4:11, 2:18] = 1  # 7 x 7 cross-section along x
    skel = soft_skel(bar, 3)
    assert skel.sum() < 0.25 * bar.sum()
    assert torch.count_nonzero(skel[bar == 0]) == 0
    assert skel[0, 0, 7, 7, 5:15].min() > 0.5  # the centre line survives
    assert skel[0, 0, 4, 4:11, 5:15].max() == 0  # the faces of the bar are gone


def test_skeleton_target_of_sheet_contains_its_middle_plane():
    label = np.zeros((9, 20, 20), dtype=np.uint8)
    label[3:6, 2:18, 2:18] = 1
    skel = skeleton_target(label, dilate=False)
    assert skel[4, 4:16, 4:16].all()
    assert not skel[label != 1].any()
    assert skel.sum() < label.sum()


def test_skeleton_target_3d_mode_of_bar_is_its_centre_line():
    label = np.zeros((9, 9, 20), dtype=np.uint8)
    label[3:6, 3:6, 2:18] = 1
    skel = skeleton_target(label, dilate=False, mode="3d")
    assert skel[4, 4, 4:16].all()
    assert skel.sum() == skel[4, 4].sum()


def test_skeleton_target_dilation_stays_in_surface_and_skips_ignore():
    label = np.zeros((9, 20, 20), dtype=np.uint8)
    label[3:6, 2:18, 2:18] = 1
    label[:, :, :8] = 2
    thin = skeleton_target(label, dilate=False)
    thick = skeleton_target(label, dilate=True)
    assert (thick >= thin).all() and thick.sum() > thin.sum()
    assert thick[3:6, 4:16, 10:16].all()  # the middle plane grown by one voxel covers the 3-thick sheet
    assert not thick[label != 1].any()
    assert not thick[:, :, :8].any()


def test_skeleton_target_empty_label():
    assert not skeleton_target(np.zeros((4, 5, 6), dtype=np.uint8)).any()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "weights, key",
    [
        ({"dice": -1.0}, "dice"),
        ({"bce": math.nan}, "bce"),
        ({"cldice": "1"}, "cldice"),
        ({"skel_recall": True}, "skel_recall"),
        ({"dcie": 1.0}, "dcie"),
    ],
)
def test_bad_weights_name_the_key(weights, key):
    with pytest.raises(VesuviusError, match=rf"'train\.loss\.{key}'"):
        build_loss(weights)


def test_all_zero_weights_rejected():
    with pytest.raises(VesuviusError, match="'dice'"):
        LossWeights(dice=0.0)


def test_bad_target_values_rejected():
    target = make_target()
    target[0, 0, 0, 0, 5] = 3
    with pytest.raises(VesuviusError, match=r"\[3\.0\]"):
        only("dice")(random_logits(), target)


def test_shape_mismatch_rejected():
    with pytest.raises(VesuviusError, match="shape"):
        only("dice")(random_logits(), make_target()[:, :, :-1])


@pytest.mark.parametrize("kwargs, key", [({"ignore_index": 1}, "ignore_index"), ({"cldice_iters": 0}, "cldice_iters")])
def test_bad_loss_parameters_rejected(kwargs, key):
    with pytest.raises(VesuviusError, match=key):
        SurfaceLoss(LossWeights(), **kwargs)
