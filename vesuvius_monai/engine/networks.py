"""What a prediction runs: a source of the network, which the Zarr driver
(:func:`vesuvius_monai.engine.zarr_predict.predict_zarr`) turns into a predictor on its device.

A source gives two things: ``predictor(infer_cfg, device)``, a context manager yielding the function
(B, 1, z, y, x) -> probabilities (B, 1, z, y, x) that every window goes through (the network in eval mode, TTA
applied), and ``run_info()``, what identifies the network(s) in a resumable store, so that a rerun resumes only a
prediction made by the same ones. :class:`CheckpointNetwork` is what ``predict`` runs; :class:`ModuleNetwork` wraps
a network already in memory (tests, benchmarks). A source of several networks (an ensemble averaging its members'
probabilities) is one more class of this shape."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from vesuvius_monai.config import InferConfig
from vesuvius_monai.engine.blockwise import Predictor
from vesuvius_monai.engine.infer import evaluating
from vesuvius_monai.io.checkpoint import Checkpoint


class NetworkSource(Protocol):
    """The network(s) of a prediction (see the module docstring)."""

    def predictor(self, cfg: InferConfig, device: torch.device) -> contextlib.AbstractContextManager[Predictor]: ...

    def run_info(self) -> dict: ...


@dataclass(frozen=True)
class CheckpointNetwork:
    """The network of a checkpoint read once; built on the device for each prediction run."""

    checkpoint: Checkpoint

    def predictor(self, cfg: InferConfig, device: torch.device) -> contextlib.AbstractContextManager[Predictor]:
        return evaluating(self.checkpoint.model(device), cfg, device)

    def check_window(self, cfg: InferConfig) -> None:
        """Refuse an ``infer`` window the network cannot take or whose batch does not fit (see Checkpoint)."""
        self.checkpoint.check_window(cfg)

    def run_info(self) -> dict:
        """The checkpoint file and its modification time (a retrained checkpoint at the same path differs)."""
        path = Path(self.checkpoint.path).resolve()
        return {"checkpoint": str(path), "checkpoint_mtime_ns": path.stat().st_mtime_ns}


@dataclass(frozen=True)
class ModuleNetwork:
    """A network in memory, moved to the device of the run (in place) and put in eval mode while it predicts.

    Nothing identifies it in a store: a store of the same settings resumes whatever network made it.
    """

    model: nn.Module

    def predictor(self, cfg: InferConfig, device: torch.device) -> contextlib.AbstractContextManager[Predictor]:
        return evaluating(self.model.to(device), cfg, device)

    def run_info(self) -> dict:
        return {}
