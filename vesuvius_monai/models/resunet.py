"""A residual 3D UNet with GroupNorm (for batches of 1-2), returning logits.

Encoder: residual blocks with MaxPool3d(2) between levels (features f, 2f, 4f for depth 3),
bottleneck 8f; decoder: ConvTranspose3d(kernel 2, stride 2), concatenation with the encoder
skip, residual block; a final 1x1x1 conv. Every spatial input size must be a multiple of
``stem_stride * 2 ** depth``.

``stem_stride=2`` runs the whole UNet at half resolution: a Conv3d(kernel 3, stride 2) stem
with GroupNorm and LeakyReLU before the first level, and a ConvTranspose3d(kernel 3, stride 2)
with LeakyReLU after the last (overlapping kernels, so neighbouring half-resolution cells blend
at full resolution), whose features are concatenated with the input for the final 1x1x1 conv.
Almost nothing runs at full resolution, so a training step is several times cheaper than the
full-resolution network's (``python bench/bench_model_speed.py --settings 8:64x64x64:depth=4
8:64x64x64:depth=3,stem_stride=2``; figures in the README).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vesuvius_monai.config.checks import choice, finite, integer
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.models.registry import register_model

logger = logging.getLogger(__name__)


def _groups(norm_groups: int, channels: int) -> int:
    """GroupNorm group count for ``channels``: gcd(norm_groups, channels), which always divides channels."""
    return math.gcd(norm_groups, channels)


class ResidualBlock(nn.Module):
    """Conv3d(3) -> GroupNorm -> LeakyReLU -> Conv3d(3) -> GroupNorm, plus shortcut, then LeakyReLU.

    The shortcut is a 1x1x1 conv when the channel count changes, identity otherwise.
    Maps (B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm_groups: GroupNorm groups; reduced to gcd(norm_groups, out_channels) so any
            channel count works.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 8, negative_slope: float = 0.01):
        super().__init__()
        groups = _groups(norm_groups, out_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.act = nn.LeakyReLU(negative_slope)
        same = in_channels == out_channels
        self.shortcut = nn.Identity() if same else nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X)."""
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


DOWNSAMPLE = {
    "maxpool": lambda channels: nn.MaxPool3d(kernel_size=2, stride=2),
    "avgpool": lambda channels: nn.AvgPool3d(kernel_size=2, stride=2),
    "conv": lambda channels: nn.Conv3d(channels, channels, kernel_size=3, stride=2, padding=1),
}


KEY = "model.kwargs"  # the network's keywords come from this config key


def _resolve_features(init_features: int, depth: int, features: Sequence[int] | None) -> tuple[int, ...]:
    """Channel counts per level, encoder levels then bottleneck: length ``depth + 1``."""
    integer(f"{KEY}.depth", depth, 1)
    if features is None:
        integer(f"{KEY}.init_features", init_features, 1)
        return tuple(init_features * 2**level for level in range(depth + 1))
    feats = tuple(features)
    if len(feats) != depth + 1:
        raise VesuviusError(f"UNet3D features {feats} must have depth + 1 = {depth + 1} entries, got {len(feats)}")
    for f in feats:
        integer(f"{KEY}.features", f, 1)
    return feats


class UNet3D(nn.Module):
    """Residual 3D UNet: (B, in_channels, Z, Y, X) -> logits (B, out_channels, Z, Y, X).

    Z, Y and X must each be a multiple of ``size_divisor`` (``stem_stride * 2 ** depth``). No sigmoid is applied.

    Args:
        in_channels: input channels.
        out_channels: output (logit) channels.
        init_features: channels of the first level; level ``i`` has ``init_features * 2**i``,
            the bottleneck ``init_features * 2**depth``.
        depth: number of pooling levels (>= 1).
        features: explicit channels per level, length ``depth + 1`` (last = bottleneck);
            overrides ``init_features``.
        norm_groups: GroupNorm groups (>= 1); per layer gcd(norm_groups, channels) is used.
        negative_slope: LeakyReLU slope (>= 0).
        checkpointing: recompute each encoder level and the bottleneck in the backward pass
            (less memory, more time); only active in training mode with grad enabled.
        stem_stride: 1 (the network above at full resolution) or 2 (the same network at half
            resolution between a strided stem and an upsampling head; see the module docstring).
        downsample: between levels, ``"maxpool"`` (MaxPool3d(2), the seed design's), ``"avgpool"``
            (AvgPool3d(2)) or ``"conv"`` (Conv3d(kernel 3, stride 2, padding 1), channels kept).
        up_kernel_size: decoder ConvTranspose3d kernel, 2 (the seed design's) or 3 (padding 1,
            output_padding 1: overlapping kernels, still stride 2).
        final_kernel_size: kernel of the final conv, 1 (the seed design's) or 3 (padding 1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        init_features: int = 16,
        *,
        depth: int = 3,
        features: Sequence[int] | None = None,
        norm_groups: int = 8,
        negative_slope: float = 0.01,
        checkpointing: bool = False,
        stem_stride: int = 1,
        downsample: str = "maxpool",
        up_kernel_size: int = 2,
        final_kernel_size: int = 1,
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels), ("norm_groups", norm_groups)):
            integer(f"{KEY}.{key}", value, 1)
        finite(f"{KEY}.negative_slope", negative_slope, 0.0)
        choice(f"{KEY}.stem_stride", stem_stride, (1, 2))
        choice(f"{KEY}.downsample", downsample, tuple(DOWNSAMPLE))
        choice(f"{KEY}.up_kernel_size", up_kernel_size, (2, 3))
        choice(f"{KEY}.final_kernel_size", final_kernel_size, (1, 3))
        feats = _resolve_features(init_features, depth, features)
        self.in_channels = in_channels
        self.depth = depth
        self.features = feats
        self.checkpointing = bool(checkpointing)
        self.stem_stride = stem_stride

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, norm_groups, negative_slope)

        first_in = in_channels
        self.stem = self.head = None
        if stem_stride == 2:
            first_in = feats[0]
            self.stem = nn.Sequential(nn.Conv3d(in_channels, feats[0], kernel_size=3, stride=2, padding=1),
                                      nn.GroupNorm(_groups(norm_groups, feats[0]), feats[0]),
                                      nn.LeakyReLU(negative_slope))
            self.head = nn.Sequential(nn.ConvTranspose3d(feats[0], feats[0], kernel_size=3, stride=2, padding=1,
                                                         output_padding=1),
                                      nn.LeakyReLU(negative_slope))
        self.encoders = nn.ModuleList(block(cin, cout) for cin, cout in zip((first_in,) + feats[:-2], feats[:-1]))
        self.downs = nn.ModuleList(DOWNSAMPLE[downsample](c) for c in feats[:-1])
        self.bottleneck = block(feats[-2], feats[-1])
        # decoder level i (deepest first) upsamples feats[i + 1] -> feats[i], concatenates the skip,
        # 2 feats[i] -> feats[i]
        levels = range(depth - 1, -1, -1)
        pad = up_kernel_size - 2  # kernel 3: padding 1 and output_padding 1 double the size, as kernel 2 does
        self.upconvs = nn.ModuleList(nn.ConvTranspose3d(feats[i + 1], feats[i], kernel_size=up_kernel_size, stride=2,
                                                        padding=pad, output_padding=pad) for i in levels)
        self.decoders = nn.ModuleList(block(2 * feats[i], feats[i]) for i in levels)
        self.final = nn.Conv3d(feats[0] + (in_channels if stem_stride == 2 else 0), out_channels,
                               kernel_size=final_kernel_size, padding=final_kernel_size // 2)

    @property
    def size_divisor(self) -> int:
        """Every spatial input size must be a multiple of this (``stem_stride * 2 ** depth``)."""
        return self.stem_stride * 2**self.depth

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise VesuviusError unless x is (B, in_channels, Z, Y, X) with Z, Y, X multiples of size_divisor."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise VesuviusError(
                f"UNet3D input must be (B, {self.in_channels}, Z, Y, X), got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        bad = [size for size in spatial if size % self.size_divisor]
        if bad:
            raise VesuviusError(
                f"UNet3D input spatial size {spatial}: {bad[0]} is not divisible by "
                f"stem_stride * 2**depth = {self.size_divisor}"
            )

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply ``module``, under gradient checkpointing when enabled and training with grad."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, Z, Y, X) -> logits (B, out_channels, Z, Y, X)."""
        self._check_input(x)
        image = x
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for index, encoder in enumerate(self.encoders):
            x = self._run(encoder, x if index == 0 else self.downs[index - 1](x))
            skips.append(x)
        x = self._run(self.bottleneck, self.downs[-1](x))
        for upconv, decoder, skip in zip(self.upconvs, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upconv(x), skip], dim=1))
        if self.head is not None:
            x = torch.cat([self.head(x), image], dim=1)
        return self.final(x)


@register_model("resunet3d", size_divisor=lambda kw: kw.get("stem_stride", 1) * 2 ** kw.get("depth", 3),
                forwards_to=UNet3D)
def resunet3d(*, in_channels: int = 1, out_channels: int = 1, **kwargs) -> nn.Module:
    """The residual UNet3D; ``kwargs`` go to :class:`UNet3D` (init_features, depth, features, ...)."""
    return UNet3D(in_channels=in_channels, out_channels=out_channels, **kwargs)
