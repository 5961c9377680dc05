"""Tests for vesuvius_monai.engine.tta: flip / rot90 test-time augmentation."""

import logging

import numpy as np
import pytest
import torch

from vesuvius_monai.engine.tta import tta_predict, tta_transforms
from vesuvius_monai.errors import VesuviusError


def volume(shape=(2, 1, 5, 6, 6), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shift_x(x: torch.Tensor) -> torch.Tensor:
    """Not mirror-equivariant along x: output voxel i takes input voxel i - 1 (wrapping)."""
    return torch.roll(x, 1, dims=4)


class Counter:
    """predict_fn wrapper that counts calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
        return self.fn(x)


def test_equivariant_predict_fn_is_unchanged():
    x = volume()
    out = tta_predict(torch.sigmoid, x, flip_axes=(0, 1, 2), rot90=True)
    assert torch.allclose(out, torch.sigmoid(x).float(), atol=1e-6)


def test_x_flip_of_shift_averages_both_directions():
    x = volume()
    a = x.numpy()
    expected = (np.roll(a, 1, axis=4) + np.roll(a, -1, axis=4)) / 2
    out = tta_predict(shift_x, x, flip_axes=(2,))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_z_flip_of_x_shift_changes_nothing():
    x = volume()
    expected = np.roll(x.numpy(), 1, axis=4)
    np.testing.assert_allclose(tta_predict(shift_x, x, flip_axes=(0,)).numpy(), expected, atol=1e-6)


def test_rot90_of_shift_averages_four_directions():
    x = volume()
    a = x.numpy()
    expected = sum(np.roll(a, s, axis=ax) for s in (1, -1) for ax in (3, 4)) / 4
    out = tta_predict(shift_x, x, rot90=True)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_directional_filter_with_y_and_x_flips():
    """Forward difference along y, averaged over y/x mirrors: (roll(+1) - roll(-1)) / 2 in y, i.e. zero-mean."""

    def diff_y(t):
        return t - torch.roll(t, 1, dims=3)

    x = volume()
    a = x.numpy()
    # y-mirror turns t - roll(t, +1) into t - roll(t, -1); x-mirrors leave it unchanged.
    expected = a - (np.roll(a, 1, axis=3) + np.roll(a, -1, axis=3)) / 2
    out = tta_predict(diff_y, x, flip_axes=(1, 2))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("flip_axes", [(), (0,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("rot90", [False, True])
def test_number_of_calls(flip_axes, rot90):
    counter = Counter(torch.sigmoid)
    tta_predict(counter, volume(), flip_axes=flip_axes, rot90=rot90)
    assert counter.calls == 2 ** len(flip_axes) * (4 if rot90 else 1)


def test_rot90_skipped_with_warning_when_not_square(caplog):
    counter = Counter(torch.sigmoid)
    with caplog.at_level(logging.WARNING, logger="vesuvius_monai.engine.tta"):
        tta_predict(counter, volume((1, 1, 4, 6, 8)), flip_axes=(1,), rot90=True)
    assert counter.calls == 2
    assert "rotation" in caplog.text


@pytest.mark.parametrize("flip_axes, distinct", [((0,), 8), ((0, 1), 16), ((0, 1, 2), 16)])
def test_transforms_invert_and_cover_the_group(flip_axes, distinct):
    """Flipping y and x is a 180 degree turn, so with rot90 the y+x flips repeat every element exactly twice."""
    x = volume()
    pairs = tta_transforms(flip_axes, rot90=True)
    assert len(pairs) == 2 ** len(flip_axes) * 4
    images = []
    for forward, inverse in pairs:
        assert torch.equal(inverse(forward(x)), x)
        images.append(forward(x))
    copies = [sum(torch.equal(image, other) for other in images) for image in images]
    assert len(images) // copies[0] == distinct
    assert set(copies) == {len(images) // distinct}


def test_output_may_change_channels():
    x = volume()
    out = tta_predict(lambda t: torch.cat([t, 1 - t], dim=1), x, flip_axes=(0, 2))
    assert out.shape == (2, 2, 5, 6, 6)
    assert torch.allclose(out[:, 1], 1 - x[:, 0].float(), atol=1e-6)


def test_input_not_modified():
    x = volume()
    before = x.clone()
    tta_predict(torch.sigmoid, x, flip_axes=(0, 1, 2), rot90=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize("flip_axes", [(3,), (0, 0), (-1,)])
def test_bad_flip_axes_rejected(flip_axes):
    with pytest.raises(VesuviusError, match="flip_axes"):
        tta_predict(torch.sigmoid, volume(), flip_axes=flip_axes)


def test_bad_input_rank_rejected():
    with pytest.raises(VesuviusError, match="B, C, Z, Y, X"):
        tta_predict(torch.sigmoid, torch.zeros(1, 4, 4, 4))
