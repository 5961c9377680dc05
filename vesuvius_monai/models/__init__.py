"""3D segmentation networks, built by name.

Importing this package registers ``resunet3d`` (the residual UNet3D) and the MONAI networks
``basicunet``, ``unet``, ``segresnet`` and ``dynunet``. All map (B, C_in, Z, Y, X) to logits
(B, C_out, Z, Y, X); spatial sizes must be multiples of :func:`size_divisor`.
"""

from vesuvius_monai.models import monai_nets, resunet  # noqa: F401  (imported to register the models)
from vesuvius_monai.models.registry import (
    build_model,
    check_input_sizes,
    check_model,
    list_models,
    register_model,
    size_divisor,
)
from vesuvius_monai.models.resunet import ResidualBlock, UNet3D

__all__ = [
    "ResidualBlock", "UNet3D", "build_model", "check_input_sizes", "check_model", "list_models", "register_model",
    "size_divisor",
]
