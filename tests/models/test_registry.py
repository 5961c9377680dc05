"""Registry: lookup errors with suggestions, keyword checking, duplicate registration, divisors."""

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.models import build_model, list_models, register_model, size_divisor
from vesuvius_monai.models import registry
from vesuvius_monai.models.resunet import UNet3D


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so test registrations do not leak into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_unknown_name_suggests_the_closest():
    with pytest.raises(VesuviusError) as info:
        build_model("resunt3d")
    message = str(info.value)
    assert "unknown model 'resunt3d'" in message
    assert "did you mean 'resunet3d'?" in message
    assert "known: basicunet, dynunet, resunet3d, segresnet, unet" in message


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(VesuviusError) as info:
        size_divisor("zzzzzzzz")
    assert str(info.value).startswith("unknown model 'zzzzzzzz'; known: ")
    assert "did you mean" not in str(info.value)
    assert "resunet3d" in str(info.value)


def test_bad_keyword_is_named():
    with pytest.raises(VesuviusError) as info:
        build_model("resunet3d", init_featurez=8)
    assert "'resunet3d'" in str(info.value) and "'init_featurez'" in str(info.value)


def test_bad_keyword_on_monai_model_is_named():
    with pytest.raises(VesuviusError) as info:
        build_model("unet", chanels=(4, 8))
    assert "'unet'" in str(info.value) and "'chanels'" in str(info.value)


def test_spatial_dims_is_refused():
    with pytest.raises(VesuviusError, match="spatial_dims"):
        build_model("basicunet", spatial_dims=2)


def test_bad_value_becomes_vesuvius_error():
    with pytest.raises(VesuviusError, match="depth"):
        build_model("resunet3d", depth=0)
    with pytest.raises(VesuviusError, match="'unet'"):
        build_model("unet", channels=(8, 16, 32), strides=(2,))  # MONAI: len(strides) must be len(channels) - 1


def test_keyword_overrides_default():
    model = build_model("unet", channels=(4, 8, 16), strides=(2, 2))
    assert isinstance(model, UNet)
    assert model.channels == (4, 8, 16)
    model = build_model("resunet3d", init_features=4, depth=2)
    assert isinstance(model, UNet3D) and model.features == (4, 8, 16)


def test_duplicate_registration_raises(scratch_registry):
    @register_model("tiny_test_net", size_divisor=1)
    def tiny(*, channels: int = 2) -> nn.Module:
        return nn.Conv3d(1, channels, 1)

    assert "tiny_test_net" in list_models()
    with pytest.raises(VesuviusError, match="already registered"):
        register_model("tiny_test_net", size_divisor=1)(tiny)
    with pytest.raises(VesuviusError, match="already registered"):
        register_model("resunet3d", size_divisor=8)(tiny)


def test_factory_without_var_kwargs_is_checked(scratch_registry):
    @register_model("tiny_test_net", size_divisor=1)
    def tiny(*, channels: int = 2) -> nn.Module:
        return nn.Conv3d(1, channels, 1)

    assert build_model("tiny_test_net", channels=3).out_channels == 3
    with pytest.raises(VesuviusError, match="'tiny_test_net' got an unknown keyword 'chanels'"):
        build_model("tiny_test_net", chanels=3)


def test_size_divisors_follow_kwargs():
    assert size_divisor("resunet3d") == 8
    assert size_divisor("resunet3d", depth=2) == 4
    assert size_divisor("resunet3d", depth=4) == 16
    assert size_divisor("basicunet") == 16
    assert size_divisor("unet") == 8
    assert size_divisor("unet", strides=(2, 2)) == 4
    assert size_divisor("unet", strides=((1, 2, 2), (2, 2, 2))) == 4  # lcm of per-axis products (2, 4, 4)
    assert size_divisor("unet", strides=((1, 1, 2), (3, 1, 2))) == 12  # lcm(3, 1, 4)
    assert size_divisor("segresnet") == 8
    assert size_divisor("segresnet", blocks_down=(1, 2, 2)) == 4
    assert size_divisor("dynunet") == 8


def test_overridden_strides_give_a_working_divisor():
    kwargs = {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}
    d = size_divisor("dynunet", **kwargs)
    assert d == 4
    model = build_model("dynunet", **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, d, 3 * d, 5 * d)).shape == (1, 1, d, 3 * d, 5 * d)


def test_check_input_sizes_names_the_key_that_does_not_fit():
    from vesuvius_monai.models import check_input_sizes

    check_input_sizes("resunet3d", {"depth": 2}, {"transforms.patch_size": (4, 8, 12), "infer.roi_size": [16, 16, 16]})
    with pytest.raises(VesuviusError, match=r"'infer.roi_size': \[16, 16, 20\] must be multiples of 8 .*'resunet3d'"):
        check_input_sizes("resunet3d", {}, {"transforms.patch_size": (64, 64, 64), "infer.roi_size": (16, 16, 20)})
    with pytest.raises(VesuviusError, match=r"'transforms.patch_size'.*multiples of 16 .*'basicunet'"):
        check_input_sizes("basicunet", {}, {"transforms.patch_size": (8, 16, 16)})
    with pytest.raises(VesuviusError, match="unknown model"):
        check_input_sizes("resunt3d", {}, {"transforms.patch_size": (8, 8, 8)})
