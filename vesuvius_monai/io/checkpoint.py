"""Checkpoints that rebuild their own model.

A checkpoint holds the weights, the optimiser / scheduler / grad-scaler state and step (for exact resume)
and the resolved run config, from which the model name and keyword arguments come.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
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
    """Read a checkpoint onto the CPU; clear errors for a missing, corrupt, unsafe or foreign file.

    Only plain tensors and Python values load (``weights_only``): a file holding other objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: code, not data
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise VesuviusError(f"checkpoint {path} holds objects that are not allowed to load (only tensors and plain "
                            f"values are); it was not loaded: {first}") from None
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


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read once: its path (for messages and records) and its loaded payload."""

    path: Path
    payload: dict

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        return cls(Path(path), load_checkpoint(path))

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with its weights, in eval mode, on ``device``."""
        return model_from_payload(self.payload, device)

    def check_window(self, roi_size: tuple[int, int, int]) -> None:
        """Raise a VesuviusError naming ``infer.roi_size`` unless the checkpoint's network can take that window."""
        from vesuvius_monai.models import check_input_sizes

        check_input_sizes(self.payload["model_name"], self.payload["model_kwargs"], {"infer.roi_size": roi_size})

    @property
    def trained_on(self) -> list[str]:
        """Ids of the fragments the checkpoint was trained on (empty if it does not record them)."""
        return list(self.payload.get("splits", {}).get("train", []))


def as_checkpoint(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    """``checkpoint`` itself, or the checkpoint at that path loaded."""
    return checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
