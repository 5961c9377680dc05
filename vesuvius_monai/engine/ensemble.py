"""Ensembles: several networks predicting one volume, their probabilities fused voxel by voxel.

An :class:`Ensemble` is a list of :class:`Member` s, each a network source (see
:mod:`vesuvius_monai.engine.networks`: a checkpoint, or any source of that shape), the config it predicts with (its
own window, overlap, blending, TTA and normalisation: :data:`MEMBER_KEYS`) and a weight (positive, normalised to sum
to 1), plus the ``infer.fusion`` rule (:func:`fuse`):

* ``prob``: the weighted mean of the members' probabilities;
* ``logit``: the sigmoid of the weighted mean of the members' logits, where a member's logit is the logit of its
  (TTA-averaged, blended) probability clipped to [:data:`LOGIT_EPS`, 1 - :data:`LOGIT_EPS`] (no infinities).

An ensemble of one gives its member's probabilities unchanged, whatever the weight and the fusion: the single model,
bit for bit. Every command predicts through it (:func:`ensemble_volume` in memory; Zarr outputs block by block in
:mod:`vesuvius_monai.engine.ensemble_zarr`), a single checkpoint being an ensemble of one.

Each member predicts with its checkpoint's stored settings for :data:`MEMBER_KEYS` unless the user's ``--config`` or
``key=value`` overrides set them, which then hold for every member (:func:`member_config`); every other key (block
size, batch, device, AMP, output dtype, post-processing) is the run's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from vesuvius_monai.config import Config, covered
from vesuvius_monai.data.readers import VolumeReader
from vesuvius_monai.data.regions import Region
from vesuvius_monai.engine.infer import predict_source
from vesuvius_monai.engine.networks import CheckpointNetwork, ModuleNetwork, NetworkSource
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint, as_checkpoint

log = logging.getLogger(__name__)

FUSIONS = ("prob", "logit")
LOGIT_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before their logit: |logit| <= 13.8
# the settings a member keeps from its own checkpoint unless the user sets them (for every member)
MEMBER_KEYS = ("infer.roi_size", "infer.overlap", "infer.blend", "infer.sigma_scale", "infer.tta_flip_axes",
               "infer.tta_rot90", "transforms.percentiles", "infer.grid", "infer.blend_space")


@dataclass(frozen=True)
class Member:
    """One network of an ensemble: its source, the config it predicts with, its normalised weight and its
    checkpoint (None for a source that is not a checkpoint of this project)."""

    network: NetworkSource
    cfg: Config
    weight: float = 1.0
    checkpoint: Checkpoint | None = None

    def record(self) -> dict:
        """What identifies the member in stores and choices: checkpoint path and SHA-256 (or the source's
        ``run_info``), weight and its own settings (:data:`MEMBER_KEYS`)."""
        if self.checkpoint is not None:
            source = {"checkpoint": str(Path(self.checkpoint.path).resolve()), "sha256": self.checkpoint.digest()}
        else:
            source = dict(self.network.run_info())
        return {**source, "weight": self.weight, **{key: _get(self.cfg, key) for key in MEMBER_KEYS}}


@dataclass(frozen=True)
class Ensemble:
    """Members and the fusion rule (see the module docstring)."""

    members: tuple[Member, ...]
    fusion: str = "prob"

    def __post_init__(self) -> None:
        if not self.members:
            raise VesuviusError("an ensemble needs at least one member (--checkpoint)")
        if self.fusion not in FUSIONS:
            raise VesuviusError(f"config key 'infer.fusion': must be one of {FUSIONS}, got {self.fusion!r}")

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    @property
    def trained_on(self) -> list[str]:
        """Fragments any member's checkpoint was trained on (sorted)."""
        return sorted({i for m in self.members if m.checkpoint is not None for i in m.checkpoint.trained_on})

    def record(self) -> dict:
        """The members (:meth:`Member.record`, keyed "0", "1", ...), their number and the fusion (JSON)."""
        return {"fusion": self.fusion, "n_members": len(self.members),
                "members": {str(i): m.record() for i, m in enumerate(self.members)}}

    def run_info(self) -> dict:
        """What a resumable store records of the network(s): a single member's own ``run_info`` (the single model's
        store, unchanged), else ``{"ensemble": record()}``."""
        return self.members[0].network.run_info() if self.single else {"ensemble": self.record()}

    def check_windows(self) -> None:
        """Every member's network takes its window, where its source can tell (``check_window``: a checkpoint's,
        an nnU-Net model's)."""
        for member in self.members:
            if hasattr(member.network, "check_window"):
                member.network.check_window(member.cfg.infer)


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` (None: equal) divided by their sum; VesuviusError naming ``--weights`` unless there are ``n`` of
    them, each finite and > 0."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise VesuviusError(f"--weights: {len(weights)} weights for {n} --checkpoint; give one weight per checkpoint")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise VesuviusError(f"--weights must be finite and > 0, got {bad[0]}")
    total = sum(weights)
    return [w / total for w in weights]


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return list(value) if isinstance(value, (tuple, list)) else value


def member_config(run: Config, own: Config, explicit: set[str]) -> Config:
    """``run`` with every key of :data:`MEMBER_KEYS` that ``explicit`` (the keys the user set) leaves out taken from
    the member's ``own`` config (its checkpoint's)."""
    changes: dict[str, dict] = {}
    for key in MEMBER_KEYS:
        if not covered(key, explicit):
            section, name = key.split(".")
            changes.setdefault(section, {})[name] = getattr(getattr(own, section), name)
    return dataclasses.replace(run, **{section: dataclasses.replace(getattr(run, section), **values)
                                       for section, values in changes.items()})


def build_ensemble(run: Config, sources: Sequence[str | Path | Checkpoint | NetworkSource],
                   weights: Sequence[float] | None = None, explicit: set[str] | None = None) -> Ensemble:
    """The ensemble of ``sources`` with the run config ``run``, ``weights`` (None: equal) and ``run.infer.fusion``.
    A source is a project checkpoint (or its path; read once) or a network source that gives its own settings
    (``own_config()``, e.g. an nnU-Net model's plan). ``explicit``: the keys the user set (:func:`member_config`:
    each member takes the other :data:`MEMBER_KEYS` from its own config); None: every member predicts with ``run``
    as it is."""
    return Ensemble(tuple(_member(run, source, weight, explicit) for source, weight
                          in zip(sources, normalized_weights(weights, len(sources)))), run.infer.fusion)


def _member(run: Config, source: str | Path | Checkpoint | NetworkSource, weight: float,
            explicit: set[str] | None) -> Member:
    """One member of :func:`build_ensemble`."""
    if isinstance(source, (str, Path, Checkpoint)):
        ckpt = as_checkpoint(source)
        cfg = run if explicit is None else member_config(run, ckpt.run_config(), explicit)
        return Member(CheckpointNetwork(ckpt), cfg, weight, ckpt)
    cfg = run if explicit is None else member_config(run, source.own_config(), explicit)
    return Member(source, cfg, weight)


def as_ensemble(network: Ensemble | Checkpoint | str | Path | NetworkSource | nn.Module, cfg: Config) -> Ensemble:
    """``network`` as an ensemble predicting with ``cfg``: an ensemble itself, else an ensemble of one (a checkpoint
    or its path, a network source, or a model in memory)."""
    if isinstance(network, Ensemble):
        return network
    if isinstance(network, (Checkpoint, str, Path)):
        return build_ensemble(cfg, [network])
    if isinstance(network, nn.Module):
        network = ModuleNetwork(network)
    return Ensemble((Member(network, cfg),), cfg.infer.fusion)


class Fuser:
    """Accumulates members' probabilities (:meth:`add`) into the fused probabilities (:meth:`result`) one member at a
    time: memory of one float64 sum. One member added: its array itself, unchanged."""

    def __init__(self, fusion: str) -> None:
        self.fusion = fusion
        self.first: np.ndarray | None = None
        self.first_weight = 1.0
        self.total: np.ndarray | None = None

    def _term(self, probs: np.ndarray, weight: float) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if self.fusion == "logit":
            p = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
            p = np.log(p) - np.log1p(-p)
        return weight * p

    def add(self, probs: np.ndarray, weight: float) -> None:
        if self.first is None and self.total is None:
            self.first, self.first_weight = probs, weight
            return
        if self.total is None:
            self.total = self._term(self.first, self.first_weight)
            self.first = None
        self.total += self._term(probs, weight)

    def result(self) -> np.ndarray:
        """Float32 fused probabilities (the only member's array itself when one was added)."""
        if self.total is None:
            if self.first is None:
                raise ValueError("nothing to fuse")
            return self.first
        if self.fusion == "logit":
            return (1.0 / (1.0 + np.exp(-self.total))).astype(np.float32)
        return self.total.astype(np.float32)


def fuse(probs: Sequence[np.ndarray], weights: Sequence[float], fusion: str) -> np.ndarray:
    """The fused probabilities of the members' ``probs`` (same shapes) with normalised ``weights`` (module
    docstring); float32 of their shape."""
    fuser = Fuser(fusion)
    for p, w in zip(probs, weights):
        fuser.add(p, w)
    return fuser.result()


def ensemble_volume(ensemble: Ensemble, reader: VolumeReader, device: torch.device, *, roi: Region | None = None,
                    progress: bool = False) -> np.ndarray:
    """The fused probabilities of ``reader`` (or its ``roi``): each member's in-memory prediction
    (:func:`~vesuvius_monai.engine.infer.predict_source`, its own config), fused member by member; float32
    (z, y, x)."""
    fuser = Fuser(ensemble.fusion)
    for i, member in enumerate(ensemble.members):
        if not ensemble.single:
            log.info("%s: member %d of %d", reader.path, i + 1, len(ensemble.members))
        fuser.add(predict_source(member.network, reader, member.cfg, device, roi=roi, progress=progress),
                  member.weight)
    return fuser.result()
