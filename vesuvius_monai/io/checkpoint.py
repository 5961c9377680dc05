"""Checkpoints that rebuild their own model: :class:`Checkpoint`, typed fields read once from a file.

A checkpoint holds the weights, the resolved run config (from which the model name and keyword arguments come),
the data split, and for an exact resume the optimiser / grad-scaler state, the step, the patches drawn so far,
the run clock and the number of processes that trained it. Files hold a plain dict (``format``
``vesuvius_monai.checkpoint/1``) and load with ``weights_only``: tensors and plain values, nothing that runs code.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vesuvius_monai import __version__
from vesuvius_monai.config import Config, InferConfig, config_from_raw, to_dict
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.models import build_model, check_input_sizes, check_model
from vesuvius_monai.models.memory import check_window_memory

log = logging.getLogger(__name__)

FORMAT = "vesuvius_monai.checkpoint/1"


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A checkpoint's contents. ``path`` is where it was read from (for messages and records; None before saving).

    ``model_state``: the network's ``state_dict``; ``config``: the resolved run config as a plain mapping;
    ``splits``: fragment ids per split; ``optimizer`` / ``scaler``: their ``state_dict``s (None in a checkpoint
    written only for inference); ``items``: training patches drawn by all processes together; ``clock``: the run
    clock's state (see ``engine.schedule.RunClock``); ``world_size``: processes that trained it.
    """

    path: Path | None = None
    step: int
    config: dict
    model_name: str
    model_kwargs: dict
    model_state: dict[str, torch.Tensor]
    splits: dict[str, list[str]] = field(default_factory=dict)
    best_metric: float = float("-inf")
    optimizer: dict | None = None
    scaler: dict | None = None
    items: int | None = None
    clock: dict | None = None
    world_size: int = 1
    version: str = __version__

    # ----------------------------------------------------------------- files

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint onto the CPU; a clear error for a missing, corrupt, unsafe or foreign file."""
        path = Path(path)
        payload = _read(path)
        try:
            checkpoint = cls(path=path, step=int(payload["step"]), config=dict(payload["config"]),
                       model_name=str(payload["model_name"]), model_kwargs=dict(payload["model_kwargs"]),
                       model_state=_weights(payload["model"], path), splits=_splits(payload.get("splits") or {}, path),
                       best_metric=float(payload.get("best_metric", float("-inf"))),
                       optimizer=payload.get("optimizer"), scaler=payload.get("scaler"), items=payload.get("items"),
                       clock=payload.get("clock"), world_size=int(payload.get("world_size", 1)),
                       version=str(payload.get("version", "?")))
        except KeyError as err:
            raise VesuviusError(f"checkpoint {path} lacks the entry {err}; it is damaged or from another program") \
                from None
        except (TypeError, ValueError) as err:
            raise VesuviusError(f"checkpoint {path} holds an entry of the wrong type ({err})") from None
        try:
            check_model(checkpoint.model_name, checkpoint.model_kwargs)
        except VesuviusError as err:
            raise VesuviusError(f"checkpoint {path}: its network cannot be built here: {err}") from None
        return checkpoint

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically (a crash leaves the previous file, never a truncated one; a full disk is a
        VesuviusError naming ``path``)."""
        payload = {"format": FORMAT, "version": self.version, "step": self.step, "config": self.config,
                   "model_name": self.model_name, "model_kwargs": self.model_kwargs, "model": self.model_state,
                   "splits": self.splits, "best_metric": self.best_metric, "world_size": self.world_size}
        for key in ("optimizer", "scaler", "items", "clock"):
            if getattr(self, key) is not None:
                payload[key] = getattr(self, key)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a file object: a failed write keeps its errno
            torch.save(payload, handle)

    @classmethod
    def of(cls, cfg: Config, model: nn.Module, step: int, **state: Any) -> Checkpoint:
        """A checkpoint of ``model`` trained with ``cfg``; ``state``: the other fields (``optimizer`` and ``scaler``
        may be given as the objects themselves)."""
        for key in ("optimizer", "scaler"):
            if hasattr(state.get(key), "state_dict"):
                state[key] = state[key].state_dict()
        return cls(step=step, config=to_dict(cfg), model_name=cfg.model.name, model_kwargs=dict(cfg.model.kwargs),
                   model_state=model.state_dict(), **state)

    # ----------------------------------------------------------------- what it gives

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with its weights, in eval mode, on ``device``."""
        model = build_model(self.model_name, **self.model_kwargs)
        load_weights(model, self.model_state, f"checkpoint {self.path}: its weights do not fit its network "
                     f"{self.model_name} {self.model_kwargs}")
        log.info("loaded %s (step %d)", self.model_name, self.step)
        return model.to(device).eval()

    def run_config(self, overrides: list[str] = ()) -> Config:
        """The run config stored in the checkpoint, read with today's defaults, plus ``key=value`` overrides."""
        return config_from_raw(self.config, overrides)

    def check_window(self, infer: InferConfig) -> None:
        """Raise a VesuviusError naming ``infer.roi_size`` unless the checkpoint's network can take that window and
        a batch of ``infer.sw_batch_size`` of them fits the memory of ``infer.device``."""
        check_input_sizes(self.model_name, self.model_kwargs, {"infer.roi_size": infer.roi_size})
        check_window_memory(self.model_name, self.model_kwargs, infer, resolve_device(infer.device))

    def digest(self) -> str:
        """SHA-256 of the checkpoint's file (hex): tells two checkpoints apart, also two of the same step."""
        with open(self.path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    @property
    def trained_on(self) -> list[str]:
        """Ids of the fragments the checkpoint was trained on (empty if it does not record them)."""
        return list(self.splits.get("train", []))

    @property
    def run(self) -> RunDir:
        """The run folder the checkpoint lies in (``<run>/checkpoints/<name>.pt``)."""
        return RunDir.of_checkpoint(self.path)


def _read(path: Path) -> dict:
    """The plain dict of a checkpoint file, loaded with ``weights_only``."""
    payload = load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise VesuviusError(f"{path} is not a vesuvius_monai checkpoint")
    return payload


def load_plain(path: Path) -> Any:
    """A torch file's contents on the CPU, loaded with ``weights_only`` (tensors, plain values and the globals
    allowed by the caller's ``torch.serialization.safe_globals``); a VesuviusError naming ``path`` for a missing,
    corrupt or unsafe file (naming the refused global)."""
    if not path.is_file():
        raise VesuviusError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if found:  # weights_only refused a global: code, not data
            raise VesuviusError(f"checkpoint {path} holds objects that are not allowed to load (only tensors and "
                                f"plain values are); it was not loaded: {found.group(1)}") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
        raise VesuviusError(f"checkpoint {path} is corrupt or not a torch file"
                            f"{f' ({detail.group(1).strip()})' if detail else ''}") from None
    except Exception as err:  # torch raises many types for a damaged file
        raise VesuviusError(f"checkpoint {path} is corrupt or not a torch file: {err}") from None
    return payload


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], misfit: str) -> None:
    """``model.load_state_dict(state)``; weights that do not fit raise a VesuviusError: ``misfit`` and the first two
    lines of torch's message."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise VesuviusError(f"{misfit} ({' '.join(lines[:2])[:300]})") from None


def _weights(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``model`` entry, checked to map parameter names to tensors."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise VesuviusError(f"checkpoint {path}: its 'model' entry must map parameter names to tensors; it is damaged "
                            f"or from another program")
    return dict(state)


def _splits(splits: Any, path: Path) -> dict[str, list[str]]:
    """A checkpoint's ``splits`` entry, checked to map split names to lists of fragment ids."""
    if not isinstance(splits, dict) or not all(isinstance(ids, list) and all(isinstance(i, str) for i in ids)
                                               for ids in splits.values()):
        raise VesuviusError(f"checkpoint {path}: its 'splits' entry must map split names to lists of fragment ids")
    return dict(splits)


def as_checkpoint(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    """``checkpoint`` itself, or the checkpoint at that path loaded."""
    return checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
