"""nnU-Net v2 trained-model folders, read without nnU-Net: plans, folds, networks and the plan's normalisation.

A folder ``<trainer>__<plans>__<configuration>/`` holds ``plans.json``, ``dataset.json`` and one
``fold_<f>/checkpoint_final.pth`` (or ``checkpoint_best.pth``) per trained fold. The network is built from the plan's
``architecture`` (class name, keyword arguments and the ones naming classes, ``_kw_requires_import``) with
``dynamic-network-architectures``, the library nnU-Net uses; only its U-Nets and ``torch.nn`` layers are accepted,
never an arbitrary import. Checkpoints load with ``weights_only``: tensors, plain values, ``torch.device`` and numpy
scalars (nnU-Net's training log) only. Arrays are (z, y, x), nnU-Net's array order, as are the plan's spacing,
patch size and mirroring axes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import load_plain, load_weights

log = logging.getLogger(__name__)

PLANS, DATASET = "plans.json", "dataset.json"
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")  # of dynamic_network_architectures.architectures.unet
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d,
          nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
          nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU)
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")

Normalize = Callable[[np.ndarray], np.ndarray]


def _layer_names() -> dict[str, type]:
    """The layer classes a plan may name, under their module path and as ``torch.nn.<Name>``."""
    names = {}
    for layer in LAYERS:
        names[f"{layer.__module__}.{layer.__name__}"] = layer
        names[f"torch.nn.{layer.__name__}"] = layer
    return names


def _checkpoint_globals() -> list:
    """What ``weights_only`` may load besides tensors and plain values: numpy scalars of nnU-Net's training log."""
    allowed: list = [np.dtype]
    scalar = getattr(np, "_core", np.core).multiarray.scalar  # numpy 2 / numpy 1
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType",
                                                  "BoolDType") if hasattr(dtypes, n)]
    return allowed


def is_nnunet_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 trained-model folder (plans.json, dataset.json and a ``fold_*`` folder)."""
    path = Path(path)
    return (path.is_dir() and (path / PLANS).is_file() and (path / DATASET).is_file()
            and any(p.is_dir() for p in path.glob("fold_*")))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VesuviusError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise VesuviusError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class FoldCheckpoint:
    """One trained fold: its file, network weights, mirroring axes (z, y, x axes 0-2) and trainer name."""

    path: Path
    weights: dict[str, torch.Tensor]
    mirror_axes: tuple[int, ...]
    trainer: str

    @classmethod
    def load(cls, path: Path) -> FoldCheckpoint:
        """Read an nnU-Net checkpoint onto the CPU (``weights_only``, see the module docstring)."""
        with torch.serialization.safe_globals(_checkpoint_globals()):
            payload = load_plain(path)
        if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict):
            raise VesuviusError(f"{path} is not an nnU-Net v2 checkpoint (no 'network_weights')")
        weights = {}
        for key, value in payload["network_weights"].items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise VesuviusError(f"{path}: 'network_weights' must map parameter names to tensors")
            for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, as nnU-Net strips them
                key = key.removeprefix(prefix)
            weights[key] = value
        axes = payload.get("inference_allowed_mirroring_axes") or ()
        if not all(isinstance(a, int) and 0 <= a <= 2 for a in axes):
            raise VesuviusError(f"{path}: 'inference_allowed_mirroring_axes' must hold axes 0-2, got {axes!r}")
        return cls(path, weights, tuple(sorted(set(axes))), str(payload.get("trainer_name", "?")))


@dataclass(frozen=True)
class NnunetFolder:
    """An nnU-Net v2 trained-model folder: ``plans``, ``dataset`` (dataset.json) and its ``configuration``."""

    path: Path
    plans: dict
    dataset: dict
    configuration: str

    @classmethod
    def read(cls, path: str | Path) -> NnunetFolder:
        """Read the folder's plans and dataset.json; the configuration is the last ``__`` part of its name."""
        path = Path(path)
        if not is_nnunet_folder(path):
            raise VesuviusError(f"{path} is not an nnU-Net v2 trained-model folder (plans.json, dataset.json, "
                                f"fold_* folders)")
        plans, dataset = _read_json(path / PLANS), _read_json(path / DATASET)
        configurations = plans.get("configurations")
        name = path.resolve().name.split("__")[-1]
        if not isinstance(configurations, dict) or name not in configurations:
            raise VesuviusError(f"{path}: the configuration '{name}' (from the folder name "
                                f"<trainer>__<plans>__<configuration>) is not in {path / PLANS} "
                                f"({sorted(configurations or {})})")
        folder = cls(path, plans, dataset, name)
        folder.network()  # refuse a plan this cannot build, before anything else
        return folder

    # ----------------------------------------------------------------- plan

    @property
    def config(self) -> dict:
        """The configuration's entry of the plans, with ``inherits_from`` resolved."""
        entries, name, seen = [], self.configuration, set()
        while name is not None:
            if name in seen or name not in self.plans["configurations"]:
                raise VesuviusError(f"{self.path / PLANS}: configuration '{name}' is missing or inherits in a loop")
            seen.add(name)
            entries.append(self.plans["configurations"][name])
            name = entries[-1].get("inherits_from")
        merged: dict = {}
        for entry in reversed(entries):
            merged.update(entry)
        return merged

    def _entry(self, key: str) -> Any:
        try:
            return self.config[key]
        except KeyError:
            raise VesuviusError(f"{self.path / PLANS}: configuration '{self.configuration}' lacks '{key}'") from None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The plan's patch size (z, y, x): the sliding window."""
        size = self._entry("patch_size")
        if len(size) != 3:
            raise VesuviusError(f"{self.path}: configuration '{self.configuration}' is not 3D (patch size {size})")
        return tuple(int(s) for s in size)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """The plan's voxel spacing (z, y, x)."""
        return tuple(float(s) for s in self._entry("spacing"))  # type: ignore[return-value]

    @property
    def labels(self) -> dict:
        labels = self.dataset.get("labels")
        if not isinstance(labels, dict) or len(labels) < 2:
            raise VesuviusError(f"{self.path / DATASET}: 'labels' must map at least two label names to values")
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise VesuviusError(f"{self.path / DATASET}: region-based labels (sigmoid outputs) are not supported")
        return labels

    @property
    def foreground_channel(self) -> int:
        """The output channel whose softmax probability is the prediction: label value 1."""
        values = sorted(int(v) for v in self.labels.values())
        if 1 not in values:
            raise VesuviusError(f"{self.path / DATASET}: no label with value 1 (the foreground) in {self.labels}")
        return values.index(1)

    def network(self) -> nn.Module:
        """The plan's network (no deep supervision, weights uninitialised), on the CPU, in eval mode."""
        from dynamic_network_architectures.architectures import unet

        arch = self._entry("architecture")
        class_name = str(arch.get("network_class_name", ""))
        if class_name.rsplit(".", 1)[-1] not in NETWORKS or not class_name.startswith("dynamic_network_architectures"):
            raise VesuviusError(f"{self.path / PLANS}: network {class_name!r} is not one of "
                                f"dynamic_network_architectures' {', '.join(NETWORKS)}")
        kwargs, layers = dict(arch.get("arch_kwargs") or {}), _layer_names()
        for key in arch.get("_kw_requires_import") or ():
            if kwargs.get(key) is not None:
                if kwargs[key] not in layers:
                    raise VesuviusError(f"{self.path / PLANS}: {key} {kwargs[key]!r} is not an allowed torch.nn layer")
                kwargs[key] = layers[kwargs[key]]
        kwargs["deep_supervision"] = False
        channels = self.dataset.get("channel_names") or self.dataset.get("modality") or {}
        if len(channels) != 1:
            raise VesuviusError(f"{self.path / DATASET}: the model takes {len(channels)} input channels; only "
                                f"one-channel (CT) models are supported")
        try:
            network = getattr(unet, class_name.rsplit(".", 1)[-1])(input_channels=1, num_classes=len(self.labels),
                                                                    **kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            raise VesuviusError(f"{self.path / PLANS}: the network cannot be built from its plan ({err})") from None
        return network.eval()

    @property
    def strides(self) -> tuple[int, int, int]:
        """How many voxels of each axis one voxel of the coarsest stage stands for: windows must be multiples."""
        product = np.ones(3, dtype=int)
        for stride in self._entry("architecture")["arch_kwargs"]["strides"]:
            product *= np.broadcast_to(np.asarray(stride, dtype=int), 3)
        return tuple(int(s) for s in product)  # type: ignore[return-value]

    # ----------------------------------------------------------------- folds

    def folds(self) -> list[str]:
        """The folds present (``fold_<f>`` folders), numbers in order, then ``all``."""
        found = [p.name.removeprefix("fold_") for p in self.path.glob("fold_*") if p.is_dir()]
        return sorted(found, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))

    def checkpoint(self, fold: str, name: str = "checkpoint_final.pth") -> FoldCheckpoint:
        """Read fold ``fold``'s checkpoint file ``name``; a VesuviusError naming the folder when it is missing."""
        fold_dir = self.path / f"fold_{fold}"
        if not fold_dir.is_dir():
            raise VesuviusError(f"{self.path}: fold {fold} is not there (folds present: {', '.join(self.folds())})")
        path = fold_dir / name
        if not path.is_file():
            others = [n for n in CHECKPOINT_NAMES if (fold_dir / n).is_file()]
            hint = f"; it holds {', '.join(others)} (--nnunet-checkpoint picks one)" if others else ""
            raise VesuviusError(f"{fold_dir} has no {name}{hint}")
        return FoldCheckpoint.load(path)

    def model(self, fold: FoldCheckpoint) -> nn.Module:
        """The plan's network with ``fold``'s weights, on the CPU, in eval mode."""
        network = self.network()
        load_weights(network, fold.weights, f"{fold.path}: its weights do not fit the network of {self.path / PLANS}")
        return network.eval()

    # ----------------------------------------------------------------- normalisation

    @property
    def normalization(self) -> str:
        """The plan's normalisation scheme of the one input channel."""
        schemes = self._entry("normalization_schemes")
        scheme = str(schemes[0])
        if scheme not in NORMALIZATIONS:
            raise VesuviusError(f"{self.path / PLANS}: normalisation {scheme} is not supported ({NORMALIZATIONS})")
        if any(self.config.get("use_mask_for_norm") or ()) and scheme == "ZScoreNormalization":
            raise VesuviusError(f"{self.path / PLANS}: z-score normalisation within the nonzero mask "
                                f"(use_mask_for_norm) is not supported")
        return scheme

    def intensity_properties(self) -> dict:
        """The training set's foreground intensity statistics of channel 0 (CT normalisation)."""
        props = (self.plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
        if not isinstance(props, dict) or not {"mean", "std", "percentile_00_5", "percentile_99_5"} <= set(props):
            raise VesuviusError(f"{self.path / PLANS}: CT normalisation needs foreground_intensity_properties_per_"
                                f"channel['0'] with mean, std, percentile_00_5, percentile_99_5")
        return props


def normalizer(scheme: str, props: dict) -> Normalize:
    """The pointwise map raw float32 (z, y, x) -> the network's input, as nnU-Net's scheme ``scheme`` computes it.

    ``props``: CTNormalization the plan's ``mean``, ``std``, ``percentile_00_5``, ``percentile_99_5``;
    ZScoreNormalization the image's ``mean`` and ``std``; RescaleTo01Normalization the image's ``min`` and ``max``.
    """
    if scheme == "CTNormalization":
        low, high = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
        return lambda image: ((np.clip(image, low, high) - np.float32(mean)) / np.float32(std)).astype(np.float32)
    if scheme == "ZScoreNormalization":
        mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
        return lambda image: ((image - np.float32(mean)) / np.float32(std)).astype(np.float32)
    if scheme == "RescaleTo01Normalization":
        low, span = float(props["min"]), max(float(props["max"]) - float(props["min"]), 1e-8)
        return lambda image: ((image - np.float32(low)) / np.float32(span)).astype(np.float32)
    return lambda image: np.asarray(image, dtype=np.float32)


def check_spacing(path: str | Path, spacing: tuple[float, ...], folder: NnunetFolder) -> None:
    """Refuse a volume whose spacing (z, y, x) differs from the plan's (1e-3 relative), naming both and the command
    that resamples it (never silently: :mod:`vesuvius_monai.data.resample`)."""
    if not np.allclose(spacing, folder.spacing, rtol=1e-3, atol=0):
        raise VesuviusError(f"{path}: spacing {tuple(spacing)} (z, y, x) differs from the plan's {folder.spacing} "
                            f"({folder.path / PLANS}); nnU-Net models are run here only at their plan's spacing: "
                            f"resample the volume first ('vesuvius-monai resample --input {path} --like "
                            f"{folder.path} --output VOLUME.nii.gz', and the probabilities back with '--like {path} "
                            f"--order 1'), or set data.spacing if the file's spacing is wrong")
