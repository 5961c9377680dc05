"""Checkpoints that rebuild their own model.

A checkpoint holds the weights, the optimiser / scheduler / grad-scaler state and step (for exact resume)
and the resolved run config, from which the model name and keyword arguments come.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vesuvius_monai import __version__
from vesuvius_monai.config import Config, config_from_raw, to_dict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path
from vesuvius_monai.models import build_model

log = logging.getLogger(__name__)


def save_checkpoint(path: str | Path, *, cfg: Config, model: nn.Module, step: int, **state: Any) -> None:
    """Write a checkpoint atomically. ``state`` may hold optimizer, scheduler, scaler (objects with
    ``state_dict``) and plain values such as ``best_metric``."""
    payload = {
        "format": "vesuvius_monai.checkpoint/1",
        "version": __version__,
        "step": step,
        "config": to_dict(cfg),
        "model_name": cfg.model.name,
        "model_kwargs": dict(cfg.model.kwargs),
        "model": model.state_dict(),
    }
    for key, value in state.items():
        payload[key] = value.state_dict() if hasattr(value, "state_dict") else value
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU; clear errors for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise VesuviusError(f"checkpoint {path} is corrupt or not a torch file: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != "vesuvius_monai.checkpoint/1":
        raise VesuviusError(f"{path} is not a vesuvius_monai checkpoint")
    return payload


def config_from_checkpoint(payload: dict) -> Config:
    """The run config stored in a loaded checkpoint."""
    return config_from_raw(payload["config"])


def model_from_payload(payload: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The network of a loaded checkpoint with its weights, in eval mode."""
    model = build_model(payload["model_name"], **payload["model_kwargs"])
    model.load_state_dict(payload["model"])
    log.info("loaded %s (step %d)", payload["model_name"], payload["step"])
    return model.to(device).eval()


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network of a checkpoint with its weights, in eval mode, plus the run config."""
    payload = load_checkpoint(path)
    return model_from_payload(payload, device), config_from_checkpoint(payload)
