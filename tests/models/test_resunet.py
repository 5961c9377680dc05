"""The residual UNet3D: shapes, configuration, errors, one training step, gradient checkpointing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.models import build_model, size_divisor
from vesuvius_monai.models import resunet
from vesuvius_monai.models.resunet import ResidualBlock, UNet3D


def test_full_size_patch_shape():
    torch.manual_seed(0)
    model = build_model("resunet3d", init_features=16).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 128, 128))
    assert out.shape == (1, 1, 32, 128, 128)
    assert torch.isfinite(out).all()


def test_default_architecture_matches_the_seed_design():
    model = UNet3D()
    assert model.features == (16, 32, 64, 128)
    assert [b.conv1.out_channels for b in model.encoders] == [16, 32, 64]
    assert model.bottleneck.conv1.out_channels == 128
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in model.upconvs] == [
        (128, 64, (2, 2, 2), (2, 2, 2)),
        (64, 32, (2, 2, 2), (2, 2, 2)),
        (32, 16, (2, 2, 2), (2, 2, 2)),
    ]
    assert [d.conv1.in_channels for d in model.decoders] == [128, 64, 32]
    assert model.final.kernel_size == (1, 1, 1) and model.final.out_channels == 1
    assert model.encoders[0].norm1.num_groups == 8


def test_residual_block_matches_functional_reference():
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, norm_groups=8, negative_slope=0.2).eval()
    x = torch.randn(2, 4, 5, 6, 7)
    h = F.conv3d(x, block.conv1.weight, block.conv1.bias, padding=1)
    h = F.leaky_relu(F.group_norm(h, 2, block.norm1.weight, block.norm1.bias), 0.2)  # gcd(8, 6) = 2 groups
    h = F.conv3d(h, block.conv2.weight, block.conv2.bias, padding=1)
    h = F.group_norm(h, 2, block.norm2.weight, block.norm2.bias)
    shortcut = F.conv3d(x, block.shortcut.weight, block.shortcut.bias)
    expected = F.leaky_relu(h + shortcut, 0.2)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_residual_block_identity_shortcut():
    torch.manual_seed(0)
    block = ResidualBlock(8, 8).eval()
    assert isinstance(block.shortcut, nn.Identity)
    x = torch.randn(1, 8, 4, 4, 4)
    h = F.leaky_relu(block.norm1(block.conv1(x)), 0.01)
    expected = F.leaky_relu(block.norm2(block.conv2(h)) + x, 0.01)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 33, 64, 64), (1, 1, 32, 64, 60)])
def test_indivisible_input_names_size_and_divisor(shape):
    model = UNet3D(init_features=4)
    with pytest.raises(VesuviusError) as info:
        model(torch.randn(*shape))
    message = str(info.value)
    assert str(tuple(shape[2:])) in message
    assert "2**depth = 8" in message


def test_wrong_channel_count_is_an_error():
    with pytest.raises(VesuviusError, match=r"\(B, 1, Z, Y, X\)"):
        UNet3D(init_features=4)(torch.randn(1, 2, 8, 8, 8))


@pytest.mark.parametrize("depth, size", [(2, 4), (4, 16)])
def test_other_depths(depth, size):
    model = build_model("resunet3d", init_features=4, depth=depth).eval()
    assert len(model.encoders) == depth and len(model.decoders) == depth
    assert model.features == tuple(4 * 2**i for i in range(depth + 1))
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, 2 * size, 3 * size))
    assert out.shape == (1, 1, size, 2 * size, 3 * size)
    with pytest.raises(VesuviusError, match=f"2\\*\\*depth = {2**depth}"):
        model(torch.randn(1, 1, size + 2, 2 * size, 3 * size))


def test_explicit_features_and_odd_channel_counts():
    model = build_model("resunet3d", features=(6, 12, 20), depth=2, norm_groups=8).eval()
    assert [b.conv1.out_channels for b in model.encoders] == [6, 12]
    assert model.bottleneck.conv1.out_channels == 20
    assert [b.norm1.num_groups for b in model.encoders] == [2, 4]  # gcd(8, 6), gcd(8, 12)
    assert model.bottleneck.norm1.num_groups == 4  # gcd(8, 20)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 12, 4)).shape == (2, 1, 8, 12, 4)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"features": (8, 16)}, "features"),
        ({"features": (8, 0, 16, 32)}, "features"),
        ({"init_features": 0}, "init_features"),
        ({"depth": 0}, "depth"),
        ({"norm_groups": 0}, "norm_groups"),
        ({"negative_slope": -0.1}, "negative_slope"),
        ({"negative_slope": float("nan")}, "negative_slope"),
        ({"stem_stride": 3}, "stem_stride"),
        ({"stem_stride": True}, "stem_stride"),
        ({"stem_stride": 2.0}, "stem_stride"),
        ({"downsample": "median"}, "downsample"),
        ({"up_kernel_size": 4}, "up_kernel_size"),
        ({"up_kernel_size": True}, "up_kernel_size"),
        ({"up_kernel_size": 3.0}, "up_kernel_size"),
        ({"downsample": 2}, "downsample"),
        ({"final_kernel_size": 2}, "final_kernel_size"),
    ],
)
def test_bad_parameters(kwargs, word):
    with pytest.raises(VesuviusError, match=word):
        UNet3D(**kwargs)


def test_negative_slope_is_used():
    model = UNet3D(init_features=4, negative_slope=0.3)
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.3}


def test_one_adamw_step_lowers_dice_loss():
    torch.manual_seed(0)
    model = build_model("resunet3d", init_features=4).train()
    x = torch.randn(2, 1, 16, 16, 16)
    y = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    loss_fn = DiceLoss(sigmoid=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = loss_fn(model(x), y)
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = loss_fn(model(x), y)
    assert after.item() < before.item()


def _output_and_grads(model: nn.Module, x: torch.Tensor, weights: torch.Tensor):
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_strided_stem_layout():
    model = UNet3D(init_features=8, depth=2, stem_stride=2)
    conv, norm, _ = model.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (1, 8, (3, 3, 3), (2, 2, 2))
    assert norm.num_groups == 8
    up = model.head[0]
    assert (up.in_channels, up.out_channels, up.kernel_size, up.stride) == (8, 8, (3, 3, 3), (2, 2, 2))
    assert model.encoders[0].conv1.in_channels == 8  # the first level reads the stem, not the image
    assert model.final.in_channels == 8 + 1  # head features and the image
    assert model.size_divisor == 8
    assert UNet3D(init_features=8, depth=2).stem is None


def test_downsampling_and_upsampling_choices():
    model = UNet3D(init_features=4, depth=2, downsample="conv", up_kernel_size=3, final_kernel_size=3)
    assert (model.final.kernel_size, model.final.padding) == ((3, 3, 3), (1, 1, 1))
    assert [(d.in_channels, d.out_channels, d.kernel_size, d.stride, d.padding) for d in model.downs] == [
        (4, 4, (3, 3, 3), (2, 2, 2), (1, 1, 1)), (8, 8, (3, 3, 3), (2, 2, 2), (1, 1, 1))]
    assert [(u.kernel_size, u.padding, u.output_padding) for u in model.upconvs] == [((3, 3, 3), (1, 1, 1),
                                                                                      (1, 1, 1))] * 2
    assert all(isinstance(d, nn.AvgPool3d) for d in UNet3D(depth=2, downsample="avgpool").downs)
    assert all(isinstance(d, nn.MaxPool3d) for d in UNet3D(depth=2).downs)  # the seed design's
    assert [u.kernel_size for u in UNet3D(depth=2).upconvs] == [(2, 2, 2)] * 2


@pytest.mark.parametrize("seed", range(8))
def test_strided_stem_keeps_the_input_shape_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 4))
    divisor = 2 * 2**depth
    shape = tuple(int(divisor * rng.integers(1, 4)) for _ in range(3))
    batch, channels = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    options = {"downsample": str(rng.choice(["maxpool", "avgpool", "conv"])), "up_kernel_size": int(rng.choice([2, 3])),
               "final_kernel_size": int(rng.choice([1, 3]))}
    model = build_model("resunet3d", in_channels=channels, out_channels=2, init_features=4, depth=depth,
                        stem_stride=2, **options).eval()
    assert size_divisor("resunet3d", depth=depth, stem_stride=2, **options) == divisor == model.size_divisor
    with torch.no_grad():
        out = model(torch.randn(batch, channels, *shape))
    assert out.shape == (batch, 2, *shape) and torch.isfinite(out).all()
    bad = (shape[0] + divisor // 2, *shape[1:])
    with pytest.raises(VesuviusError, match=f"stem_stride \\* 2\\*\\*depth = {divisor}"):
        model(torch.randn(1, channels, *bad))


def test_strided_stem_sees_every_input_voxel():
    """A change of any one voxel of a 2 x 2 x 2 stem cell reaches the logits at that voxel (the head's skip of
    the image) and the cell's half-resolution features (the stem's kernel covers the whole cell)."""
    torch.manual_seed(0)
    model = UNet3D(init_features=8, depth=1, stem_stride=2).eval()
    x = torch.randn(1, 1, 4, 4, 4)
    with torch.no_grad():
        base, base_stem = model(x), model.stem(x)
        for index in np.ndindex(2, 2, 2):
            moved = x.clone()
            moved[(0, 0, *index)] += 1.0
            assert not torch.allclose(model(moved)[(0, 0, *index)], base[(0, 0, *index)])
            assert not torch.allclose(model.stem(moved)[0, :, 0, 0, 0], base_stem[0, :, 0, 0, 0])


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_checkpointing_gives_same_outputs_and_gradients(monkeypatch, stem_stride):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(resunet, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    plain = UNet3D(init_features=4, checkpointing=False, stem_stride=stem_stride).train()
    ckpt = UNet3D(init_features=4, checkpointing=True, stem_stride=stem_stride).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16, 32)
    weights = torch.randn(1, 1, 16, 16, 32)
    out_plain, grads_plain = _output_and_grads(plain, x, weights)
    assert calls == []
    out_ckpt, grads_ckpt = _output_and_grads(ckpt, x, weights)
    assert calls == [False] * 4  # three encoder levels and the bottleneck, non-reentrant
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6), name


def test_checkpointing_is_off_in_eval_and_no_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(resunet, "checkpoint", lambda *a, **k: calls.append(1))
    model = UNet3D(init_features=4, checkpointing=True)
    with torch.no_grad():
        model.train()(torch.randn(1, 1, 8, 8, 8))
    model.eval()(torch.randn(1, 1, 8, 8, 8))
    assert calls == []
