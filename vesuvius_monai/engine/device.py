"""Where the network runs and how: the device, mixed precision (CUDA only), the channels-last-3D layout, and waiting
for the device before reading a clock. Training, inference and the planner's measurements all use these.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vesuvius_monai.errors import VesuviusError

CHANNELS_LAST = torch.channels_last_3d


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VesuviusError("device is 'cuda' (train.device / infer.device) but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16 on older GPUs) autocast on CUDA; a no-op on CPU, where half precision is slow."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU. Call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, z, y, x) tensor in channels-last-3D layout (itself when it is already)."""
    return x.contiguous(memory_format=CHANNELS_LAST)


def channels_last_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers, 5-D ones as channels-last-3D copies (the model itself is not changed).

    Convolutions run about twice as fast in that layout on the CPU (bench/bench_predict.py).
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v.detach().contiguous(memory_format=CHANNELS_LAST) if v.dim() == 5 else v for k, v in state.items()}
