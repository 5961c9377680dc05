"""The memory a network needs for a training patch or an inference window, estimated without allocating it.

The network is built on the CPU and run once on a small reference input (1, C_in, 2d, d, d), ``d`` its size
divisor (so the deepest level keeps two voxels): in train mode with gradients, the bytes of the activations
autograd keeps for the backward pass are summed (``torch.autograd.graph.saved_tensors_hooks``, weights left out);
in eval mode without gradients, the largest input + output of one layer is kept. The registered networks are fully
convolutional, so both grow with the input's voxels: divided by the reference's voxels they give bytes per voxel
(within a few per cent of a measurement at 64^3), cached per model and keywords. A check costs one small forward
per model and process (about 10-70 ms of CPU) and microseconds after that.

The figures are about the least a step needs: a config refused here cannot fit; one that passes may still run out
of memory in what is not counted (allocator caches, blending buffers, the data loader). The device's memory is the
CPU's available memory (psutil) or the GPU's total memory (the same on every torchrun rank, read without creating a
CUDA context).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from vesuvius_monai.io import memory as host
from vesuvius_monai.models.registry import build_model, size_divisor

if TYPE_CHECKING:
    from vesuvius_monai.config import Config, InferConfig

logger = logging.getLogger(__name__)

OPTIMIZER_COPIES = 4  # weights, gradients and AdamW's two moments, float32 each


@dataclass(frozen=True)
class Footprint:
    """A network's memory per input voxel of one sample: ``saved`` bytes autograd keeps for the backward pass (train
    mode), ``peak`` the largest input + output of one layer (eval mode, no gradients); ``params``: weight bytes."""

    saved: float
    peak: float
    params: int


_MEASURED: dict[str, Footprint] = {}


def footprint(name: str, kwargs: dict[str, Any]) -> Footprint:
    """The :class:`Footprint` of ``build_model(name, **kwargs)``, measured once on a reference input (cached)."""
    key = json.dumps([name, kwargs], sort_keys=True, default=repr)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(name, kwargs)
    return _MEASURED[key]


def _measure(name: str, kwargs: dict[str, Any]) -> Footprint:
    """Build the network and run it once on the reference input (see the module docstring)."""
    side = size_divisor(name, **kwargs)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's random stream alone
        model = build_model(name, **kwargs)
    x = torch.zeros((1, int(kwargs.get("in_channels", 1)), 2 * side, side, side))
    try:
        saved, peak = _saved_bytes(model, x), _peak_bytes(model, x)
    except Exception as err:  # a network that cannot run this input: count its input and output only
        logger.debug("model %r: no reference forward (%s); counting input and output only", name, err)
        saved = peak = 2 * x.numel() * x.element_size()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Footprint(saved=saved / x.numel(), peak=peak / x.numel(), params=params)


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for the backward pass of ``model(x)`` (views counted once, the
    weights left out)."""
    weights = {id(p) for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in weights:
            kept[id(base)] = base.numel() * base.element_size()
        return t

    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def _peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The largest input + output bytes of one layer of ``model(x)`` in eval mode, without gradients."""
    peak = [x.numel() * x.element_size()]

    def nbytes(value: Any) -> int:
        values = value if isinstance(value, (tuple, list)) else [value]
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        peak[0] = max(peak[0], nbytes(inputs) + nbytes(output))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]


def training_bytes(name: str, kwargs: dict[str, Any], size: Sequence[int], batch: int, half: bool) -> int:
    """At least the bytes one training step of ``batch`` patches of ``size`` (z, y, x) needs: the activations kept
    for the backward pass (halved under mixed precision, ``half``) plus weights, gradients and optimiser state."""
    foot = footprint(name, kwargs)
    activations = foot.saved * batch * math.prod(int(s) for s in size) * (0.5 if half else 1.0)
    return int(activations) + OPTIMIZER_COPIES * foot.params


def inference_bytes(name: str, kwargs: dict[str, Any], size: Sequence[int], batch: int, half: bool) -> int:
    """At least the bytes the network needs for a batch of ``batch`` windows of ``size`` (z, y, x): the largest
    layer's input + output (halved under mixed precision, ``half``) plus the weights."""
    foot = footprint(name, kwargs)
    return int(foot.peak * batch * math.prod(int(s) for s in size) * (0.5 if half else 1.0)) + foot.params


def available_bytes(device: torch.device) -> int:
    """Memory of ``device``: the host's available memory, or a GPU's total memory."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    return host.available_memory()


def check_fits(need: int, device: torch.device, what: str) -> None:
    """Raise a VesuviusError naming ``what`` when ``need`` bytes exceed the memory of ``device``."""
    host.check_memory(need, what, available_bytes(device), device.type)


def check_window_memory(name: str, kwargs: dict[str, Any], infer: InferConfig, device: torch.device) -> None:
    """Raise a VesuviusError naming ``infer.roi_size`` when a batch of ``infer.sw_batch_size`` windows cannot fit
    on ``device`` (see :func:`inference_bytes`)."""
    half = infer.amp and device.type == "cuda"
    need = inference_bytes(name, kwargs, infer.roi_size, infer.sw_batch_size, half)
    check_fits(need, device, f"config key 'infer.roi_size': a batch of {infer.sw_batch_size} (infer.sw_batch_size) "
                             f"windows of {list(infer.roi_size)} through model '{name}'")


def check_training_memory(cfg: Config, device: torch.device | None = None) -> None:
    """Raise a VesuviusError naming ``transforms.patch_size`` (or ``infer.roi_size``) when a training step of
    ``train.batch_size`` patches (or a validation batch of windows) cannot fit on ``device`` (default:
    ``train.device``). Call it before anything is created."""
    if device is None:
        from vesuvius_monai.engine.device import resolve_device

        device = resolve_device(cfg.train.device)
    name, kwargs, batch = cfg.model.name, cfg.model.kwargs, cfg.train.batch_size
    half = cfg.train.amp and device.type == "cuda"
    need = training_bytes(name, kwargs, cfg.transforms.patch_size, batch, half)
    check_fits(need, device, f"config key 'transforms.patch_size': a training step on {batch} (train.batch_size) "
                             f"patches of {list(cfg.transforms.patch_size)} through model '{name}'")
    check_window_memory(name, kwargs, cfg.infer, device)
