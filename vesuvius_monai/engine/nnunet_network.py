"""nnU-Net v2 models as network sources of the prediction engine (see :mod:`vesuvius_monai.engine.networks`).

:class:`NnunetNetwork` runs one or several folds of a trained-model folder (:mod:`vesuvius_monai.models.nnunet`)
as nnU-Net's predictor does: the logits of every fold, averaged over the mirrored copies (``infer.tta_flip_axes``,
by default the checkpoint's ``inference_allowed_mirroring_axes``) and over the folds.

By default (:meth:`NnunetNetwork.config_layer`) the result is nnU-Net v2's ``nnUNetPredictor``'s: its window
starts (``infer.grid=nnunet``), its Gaussian (``infer.blend=nnunet``) and its blending of logits, softmax once at
the end (``infer.blend_space=logit``). For a plan of two classes the softmax of blended logits is the sigmoid of the
blended logit difference (blending is linear, with the same weights for both), so a window's prediction is
``l_fg - l_bg`` and the engine applies the sigmoid after blending. A plan of more classes blends each window's
softmax probability of the foreground instead (``blend_space=prob``; logit blending is refused for it). With
``blend_space=prob`` the window's prediction is that probability, as nnU-Net v1 blended. The input is normalised
with the plan's scheme (:meth:`normalizer`), and :meth:`config_layer` gives the plan's window (patch size), step
(overlap 0.5) and mirroring as the ``infer`` keys a user leaves out.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from vesuvius_monai.config import Config, InferConfig, config_from_raw
from vesuvius_monai.data.readers import VolumeReader, sample_regions
from vesuvius_monai.engine.blockwise import Predictor
from vesuvius_monai.engine.device import autocast
from vesuvius_monai.engine.infer import Normalize
from vesuvius_monai.engine.tta import tta_predict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.models.nnunet import FoldCheckpoint, NnunetFolder, check_spacing, normalizer

log = logging.getLogger(__name__)

STATS_VOXELS = 8_000_000  # per-image statistics (z-score) from at most this many voxels: exact below


@dataclass(frozen=True)
class NnunetNetwork:
    """Folds of an nnU-Net v2 model folder, read once; their networks are built on the device of each run."""

    folder: NnunetFolder
    folds: tuple[FoldCheckpoint, ...]

    def predictor(self, cfg: InferConfig, device: torch.device) -> contextlib.AbstractContextManager[Predictor]:
        return _predicting(self, cfg, device)

    def run_info(self) -> dict:
        """The folder, the checkpoint files and their modification times."""
        files = [Path(f.path).resolve() for f in self.folds]
        return {"nnunet": str(Path(self.folder.path).resolve()), "checkpoints": [str(p) for p in files],
                "checkpoint_mtime_ns": [p.stat().st_mtime_ns for p in files]}

    def check_volume(self, reader: VolumeReader) -> None:
        """Refuse a volume at another spacing than the plan's (naming both)."""
        check_spacing(reader.path, reader.spacing, self.folder)

    def normalizer(self, reader: VolumeReader, cfg: Config) -> Normalize:
        """The plan's normalisation of ``reader``; a volume at another spacing than the plan's is refused."""
        self.check_volume(reader)
        scheme = self.folder.normalization
        if scheme == "CTNormalization":
            return normalizer(scheme, self.folder.intensity_properties())
        if scheme in ("ZScoreNormalization", "RescaleTo01Normalization"):
            return normalizer(scheme, volume_statistics(reader))
        return normalizer(scheme, {})

    @property
    def binary(self) -> bool:
        """Whether the plan has two classes (background and foreground): logits can be blended exactly."""
        return len(self.folder.labels) == 2

    def own_config(self) -> Config:
        """The built-in defaults with the plan's settings (:meth:`config_layer`): what this member predicts with
        where the user sets nothing (``engine.ensemble.member_config``)."""
        return config_from_raw(self.config_layer())

    def config_layer(self) -> dict:
        """The plan's inference settings as a config mapping: window = patch size, overlap 0.5 (nnU-Net's
        tile_step_size), the first fold's mirroring axes as TTA, and nnU-Net's window starts, Gaussian (sigma 1/8)
        and logit blending (probabilities for a plan of more than two classes, see the module docstring)."""
        if not self.binary:
            log.info("%s: %d classes: the windows' foreground probabilities are blended (nnU-Net blends every "
                     "class's logits), so the result differs slightly from nnU-Net's where windows overlap",
                     self.folder.path, len(self.folder.labels))
        return {"infer": {"roi_size": list(self.folder.patch_size), "overlap": 0.5,
                          "tta_flip_axes": list(self.folds[0].mirror_axes), "tta_rot90": False,
                          "blend": "nnunet", "sigma_scale": 0.125, "grid": "nnunet",
                          "blend_space": "logit" if self.binary else "prob"}}

    def check_window(self, infer: InferConfig) -> None:
        """Refuse an ``infer.roi_size`` the network cannot take (not a multiple of its total stride per axis), and
        logit blending for a plan of more than two classes."""
        if infer.blend_space == "logit" and not self.binary:
            raise VesuviusError(f"infer.blend_space=logit needs a plan of two classes; {self.folder.path} has "
                                f"{len(self.folder.labels)}: use infer.blend_space=prob")
        strides = self.folder.strides
        if any(r % s for r, s in zip(infer.roi_size, strides)):
            raise VesuviusError(f"infer.roi_size {tuple(infer.roi_size)} must be a multiple of {strides} (z, y, x) "
                                f"for the network of {self.folder.path} (its plan's patch size is "
                                f"{self.folder.patch_size})")


def nnunet_network(folder: str | Path, folds: Sequence[str] | None = None,
                   checkpoint_name: str = "checkpoint_final.pth") -> NnunetNetwork:
    """The folds ``folds`` (default: every ``fold_*`` present, as nnU-Net does) of the model folder ``folder``,
    averaged as one network source."""
    model = NnunetFolder.read(folder)
    chosen = [str(f) for f in folds] if folds else model.folds()
    if len(set(chosen)) != len(chosen):
        raise VesuviusError(f"--folds {' '.join(chosen)} repeats a fold")
    network = NnunetNetwork(model, tuple(model.checkpoint(f, checkpoint_name) for f in chosen))
    log.info("nnU-Net model %s: configuration %s, folds %s (%s)", model.path, model.configuration,
             ", ".join(chosen), checkpoint_name)
    return network


def nnunet_sources(folder: str | Path, folds: Sequence[str] | None = None,
                   checkpoint_name: str = "checkpoint_final.pth") -> list[NnunetNetwork]:
    """One network source per fold (for an ensemble that averages its members' probabilities)."""
    network = nnunet_network(folder, folds, checkpoint_name)
    return [NnunetNetwork(network.folder, (fold,)) for fold in network.folds]


def volume_statistics(reader: VolumeReader, max_voxels: int = STATS_VOXELS) -> dict:
    """Mean, std, min and max of a volume (float64), from at most ``max_voxels`` voxels spread over it (exact when
    the volume is smaller). nnU-Net computes them after cropping the image to its nonzero bounding box: the same
    for a volume without all-zero border slabs."""
    sample = np.concatenate([reader.read(r).ravel() for r in sample_regions(reader.shape, max_voxels)])
    sample = sample.astype(np.float64)
    if not np.isfinite(sample).all():
        raise VesuviusError(f"{reader.path}: volume contains NaN or infinite values")
    return {"mean": float(sample.mean()), "std": float(sample.std()), "min": float(sample.min()),
            "max": float(sample.max())}


@contextlib.contextmanager
def _predicting(source: NnunetNetwork, cfg: InferConfig, device: torch.device) -> Iterator[Predictor]:
    """(B, 1, z, y, x) normalised windows -> (B, 1, z, y, x) foreground probabilities, or with
    ``infer.blend_space=logit`` foreground minus background logits (see the module docstring)."""
    source.check_window(cfg)
    networks = [source.folder.model(fold).to(device) for fold in source.folds]
    channel = source.folder.foreground_channel
    logit_space = cfg.blend_space == "logit"

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in networks:
            def logits(t: torch.Tensor, network=network) -> torch.Tensor:
                with autocast(device, cfg.amp):
                    return network(t).float()

            mean = tta_predict(logits, x, flip_axes=tuple(cfg.tta_flip_axes), rot90=cfg.tta_rot90)
            total = mean if total is None else total + mean
        if logit_space:
            return (total[:, channel:channel + 1] - total[:, 1 - channel:2 - channel]) / len(networks)
        return torch.softmax(total / len(networks), dim=1)[:, channel:channel + 1]

    yield predict
