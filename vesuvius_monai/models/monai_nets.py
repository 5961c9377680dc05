"""MONAI networks registered as 3D models with small defaults.

Every factory builds a 3D network mapping (B, in_channels, Z, Y, X) to logits
(B, out_channels, Z, Y, X); any constructor keyword of the MONAI class overrides the defaults
below, except ``spatial_dims`` (always 3).

========== ================================= ====================================================
name       MONAI class                       defaults (size divisor)
========== ================================= ====================================================
basicunet  monai.networks.nets.BasicUNet     features (8, 8, 16, 32, 64, 8) (16: four poolings)
unet       monai.networks.nets.UNet          channels (8, 16, 32, 64), strides (2, 2, 2),
                                             num_res_units 2 (product of strides: 8)
segresnet  monai.networks.nets.SegResNet     init_filters 8, blocks_down (1, 2, 2, 4)
                                             (2 ** (len(blocks_down) - 1): 8)
dynunet    monai.networks.nets.DynUNet       kernel_size [3, 3, 3, 3], strides [1, 2, 2, 2],
                                             filters [8, 16, 32, 64] (product of strides: 8)
========== ================================= ====================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.models.registry import register_model

_UNET_DEFAULTS = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 2}
_DYNUNET_DEFAULTS = {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "filters": [8, 16, 32, 64]}


def _options(name: str, defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by kwargs; ``spatial_dims`` is refused because the models are 3D only."""
    if "spatial_dims" in kwargs:
        raise VesuviusError(f"model '{name}' is 3D only; do not pass spatial_dims (got {kwargs['spatial_dims']!r})")
    return {**defaults, **kwargs}


def stride_divisor(strides: Sequence[int | Sequence[int]]) -> int:
    """Size divisor of a stack of strided stages: lcm over axes of the per-axis stride product.

    ``strides`` holds one entry per stage, each an int (isotropic) or a 3-sequence (z, y, x).
    """
    per_axis = [1, 1, 1]
    for stride in strides:
        axis = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        per_axis = [total * step for total, step in zip(per_axis, axis)]
    return math.lcm(*per_axis)


@register_model("basicunet", size_divisor=16, forwards_to=BasicUNet)
def basicunet(*, in_channels: int = 1, out_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI BasicUNet (four poolings), features default (8, 8, 16, 32, 64, 8)."""
    options = _options("basicunet", {"features": (8, 8, 16, 32, 64, 8)}, kwargs)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


@register_model(
    "unet",
    size_divisor=lambda kw: stride_divisor(kw.get("strides", _UNET_DEFAULTS["strides"])),
    forwards_to=UNet,
)
def unet(*, in_channels: int = 1, out_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI UNet with residual units: channels (8, 16, 32, 64), strides (2, 2, 2), num_res_units 2."""
    options = _options("unet", _UNET_DEFAULTS, kwargs)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


@register_model(
    "segresnet",
    size_divisor=lambda kw: 2 ** (len(kw.get("blocks_down", (1, 2, 2, 4))) - 1),
    forwards_to=SegResNet,
)
def segresnet(*, in_channels: int = 1, out_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI SegResNet with init_filters 8."""
    options = _options("segresnet", {"init_filters": 8}, kwargs)
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


@register_model(
    "dynunet",
    size_divisor=lambda kw: stride_divisor(kw.get("strides", _DYNUNET_DEFAULTS["strides"])),
    forwards_to=DynUNet,
)
def dynunet(*, in_channels: int = 1, out_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI DynUNet: kernels [3, 3, 3, 3], strides [1, 2, 2, 2], filters [8, 16, 32, 64].

    ``upsample_kernel_size`` defaults to ``strides[1:]`` (also when strides are overridden).
    """
    options = _options("dynunet", _DYNUNET_DEFAULTS, kwargs)
    options.setdefault("upsample_kernel_size", list(options["strides"])[1:])
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)
