"""Every registered model: shape, finiteness and gradient flow on an odd-but-valid input size."""

import pytest
import torch

from vesuvius_monai.models import build_model, list_models, size_divisor


def test_expected_models_are_registered():
    assert {"resunet3d", "basicunet", "unet", "segresnet", "dynunet"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_shape_finite_and_gradients(name):
    torch.manual_seed(0)
    d = size_divisor(name)
    model = build_model(name)
    x = torch.randn(1, 1, 2 * d, 3 * d, 5 * d)
    out = model(x)
    assert out.shape == (1, 1, 2 * d, 3 * d, 5 * d)
    assert torch.isfinite(out).all()
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_out_channels_and_in_channels(name):
    d = size_divisor(name)
    model = build_model(name, in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, d, d, 2 * d))
    assert out.shape == (1, 3, d, d, 2 * d)


@pytest.mark.parametrize("name", list_models())
def test_output_is_logits_not_probabilities(name):
    # a sigmoid/softmax head would keep every value inside [0, 1]; logits of a random net do not
    torch.manual_seed(1)
    d = size_divisor(name)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(10 * torch.randn(1, 1, d, d, 2 * d))
    assert out.min() < 0 or out.max() > 1
