"""Typed run configuration, loaded from YAML.

One keyword-only dataclass per YAML section. Loading rejects unknown keys (with a did-you-mean hint)
and checks every value, naming the offending key in a :class:`VesuviusError`. YAML holds plain values;
turning them into models, losses and transforms happens in Python (``models.build_model``,
``losses.build_loss``, ``data.transforms.train_transforms`` ...).

CLI overrides are ``dotted.key=value`` strings (the value is parsed as YAML), applied before checking:
``train.steps=50 model.kwargs.init_features=8``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vesuvius_monai.errors import VesuviusError, did_you_mean
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.losses import LossWeights
from vesuvius_monai.metrics import check_metric_names
from vesuvius_monai.metrics.leaderboard import LeaderboardWeights
from vesuvius_monai.postprocess import PostprocessConfig

Triple = tuple[int, int, int]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise VesuviusError(f"config key '{key}': {message}")


@dataclass(kw_only=True)
class SynthConfig:
    """``synth``: the synthetic scroll fragments written to ``data.root`` by ``vesuvius-monai synth``."""

    SECTION: ClassVar[str] = "synth"
    n_fragments: int = 8
    shape: Triple = (96, 96, 96)
    seed: int = 0
    fmt: str = "nii.gz"
    params: dict = field(default_factory=dict)  # extra SynthParams fields, e.g. {noise_std: 0.1}

    def __post_init__(self) -> None:
        _require(self.n_fragments >= 1, "synth.n_fragments", f"must be >= 1, got {self.n_fragments}")
        _require(min(self.shape) >= 16, "synth.shape", f"every size must be >= 16, got {self.shape}")
        _require(self.fmt in ("nii.gz", "nii", "tif"), "synth.fmt", f"must be nii.gz, nii or tif, got {self.fmt!r}")


@dataclass(kw_only=True)
class DataConfig:
    """``data``: where fragments live and how they are split.

    ``root`` holds ``images/`` + ``labels/`` (matching names) or the competition's ``train_images/`` +
    ``train_labels/``; ``dataset`` may instead name a YAML listing fragments explicitly.
    Fragments named in ``val_fragments`` / ``test_fragments`` go there; otherwise the split is drawn
    by ``split_seed`` with the given fractions. Splits are always by whole fragment.
    """

    SECTION: ClassVar[str] = "data"
    root: str = "data/synthetic"
    dataset: str | None = None
    ids_csv: str | None = None
    ignore_index: int = 2
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (z, y, x), for formats without spacing metadata
    val_fragments: list[str] = field(default_factory=list)
    test_fragments: list[str] = field(default_factory=list)
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    split_seed: int = 0
    cache_dir: str | None = None  # foreground-index cache; default <output_dir>/cache
    zarr_level: int = 0  # OME-Zarr pyramid level to read (0 = full resolution)
    zarr_key: str | None = None  # array inside a plain Zarr group

    def __post_init__(self) -> None:
        _require(self.ignore_index not in (0, 1), "data.ignore_index", "must differ from 0 and 1")
        _require(all(s > 0 for s in self.spacing), "data.spacing", f"must be positive, got {self.spacing}")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"data.{key}", f"must be in [0, 1), got {value}")
        _require(self.val_fraction + self.test_fraction < 1.0, "data.val_fraction",
                 "val_fraction + test_fraction must leave fragments for training")
        _require(not (self.dataset and self.ids_csv), "data.ids_csv",
                 "cannot be combined with data.dataset (list the fragments in the dataset YAML instead)")
        _require(self.zarr_level >= 0, "data.zarr_level", f"must be >= 0, got {self.zarr_level}")


@dataclass(kw_only=True)
class ModelConfig:
    """``model``: a registered network name and its keyword arguments (checked by ``build_model``)."""

    SECTION: ClassVar[str] = "model"
    name: str = "resunet3d"
    kwargs: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class TransformConfig:
    """``transforms``: patch sampling, normalisation and augmentation (training only)."""

    SECTION: ClassVar[str] = "transforms"
    patch_size: Triple = (64, 64, 64)
    pos_fraction: float = 0.5  # share of patches centred on a surface voxel
    percentiles: tuple[float, float] = (1.0, 99.0)  # per-fragment intensity window mapped to [0, 1]
    flip_prob: float = 0.5  # per axis, every axis
    rot90_prob: float = 0.5  # random multiple of 90 degrees in the y-x plane
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1  # image *= 1 + U(-s, s)
    intensity_shift: float = 0.1  # image += U(-s, s)
    noise_prob: float = 0.0
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        _require(min(self.patch_size) >= 8, "transforms.patch_size", f"every size must be >= 8, got {self.patch_size}")
        lo, hi = self.percentiles
        _require(0 <= lo < hi <= 100, "transforms.percentiles", f"need 0 <= low < high <= 100, got {self.percentiles}")
        for key in ("pos_fraction", "flip_prob", "rot90_prob", "intensity_prob", "noise_prob"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"transforms.{key}", f"must be in [0, 1], got {value}")
        _require(self.rot90_prob == 0 or self.patch_size[1] == self.patch_size[2], "transforms.rot90_prob",
                 f"rotations in the y-x plane need a square y-x patch, got patch_size {self.patch_size}")


@dataclass(kw_only=True)
class TrainConfig:
    """``train``: optimisation, validation and checkpointing."""

    SECTION: ClassVar[str] = "train"
    steps: int = 400
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | poly | constant
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    loss: LossWeights = field(default_factory=LossWeights)  # terms left out keep their defaults: dice 1, others 0
    val_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision, CUDA only (never on CPU)
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    num_workers: int = 0  # DataLoader workers
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. Stops early, saves, and says so.

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "val_every", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.schedule in ("cosine", "poly", "constant"), "train.schedule",
                 f"must be cosine, poly or constant, got {self.schedule!r}")
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {self.device!r}")
        for key in ("grad_clip", "weight_decay", "max_minutes", "num_threads", "num_workers"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass(kw_only=True)
class InferConfig:
    """``infer``: sliding-window inference (validation, evaluation, prediction)."""

    SECTION: ClassVar[str] = "infer"
    roi_size: Triple = (64, 64, 64)
    overlap: float = 0.25
    sw_batch_size: int = 2
    blend: str = "gaussian"  # gaussian | constant
    sigma_scale: float = 0.125
    tta_flip_axes: list[int] = field(default_factory=list)  # any of 0 (z), 1 (y), 2 (x)
    tta_rot90: bool = False
    block_size: Triple = (192, 192, 192)  # block-wise prediction: rounded up to multiples of the window stride
    halo: Triple = (32, 32, 32)  # context per side; raised to the reach of the windows (see engine.predict)
    out_dtype: str = "uint8"  # zarr probability output: uint8 (p*255), float16 or float32

    def __post_init__(self) -> None:
        _require(0.0 <= self.overlap < 1.0, "infer.overlap", f"must be in [0, 1), got {self.overlap}")
        _require(min(self.roi_size) >= 1, "infer.roi_size", f"every size must be >= 1, got {self.roi_size}")
        _require(min(self.block_size) >= 1, "infer.block_size", f"every size must be >= 1, got {self.block_size}")
        _require(self.sigma_scale > 0, "infer.sigma_scale", f"must be > 0, got {self.sigma_scale}")
        _require(self.sw_batch_size >= 1, "infer.sw_batch_size", "must be >= 1")
        _require(self.blend in ("gaussian", "constant"), "infer.blend", f"must be gaussian or constant, got {self.blend!r}")
        _require(set(self.tta_flip_axes) <= {0, 1, 2}, "infer.tta_flip_axes", f"axes must be 0, 1 or 2, got {self.tta_flip_axes}")
        _require(self.out_dtype in ("uint8", "float16", "float32"), "infer.out_dtype",
                 f"must be uint8, float16 or float32, got {self.out_dtype!r}")
        _require(min(self.halo) >= 0, "infer.halo", "must be >= 0")


DEFAULT_METRICS = ["dice", "iou", "surface_dice", "hd95", "voi_split", "voi_merge", "topo_score", "cldice", "leaderboard"]


@dataclass(kw_only=True)
class EvaluateConfig:
    """``evaluate``: which fragments to score, which metrics, what to write."""

    SECTION: ClassVar[str] = "evaluate"
    split: str = "test"  # test | val | all
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    save_probabilities: bool = True
    save_masks: bool = True
    leaderboard: LeaderboardWeights = field(default_factory=LeaderboardWeights)

    def __post_init__(self) -> None:
        _require(self.split in ("test", "val", "all"), "evaluate.split", f"must be test, val or all, got {self.split!r}")
        try:
            check_metric_names(self.metrics)
        except VesuviusError as err:
            raise VesuviusError(f"config key 'evaluate.metrics': {err}") from None


@dataclass(kw_only=True)
class Config:
    """A whole run: every section plus the seed and the run folder."""

    SECTION: ClassVar[str] = ""
    seed: int = 0
    output_dir: str = "runs/default"
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, X | None, tuple[...], list[X], dict)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        _require(len(value) == len(args), key, f"must have {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list or hint is list:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        args = typing.get_args(hint)
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and bad values."""
    where = prefix or "top level"
    if data is None:
        data = {}
    _require(isinstance(data, dict), where, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise VesuviusError(f"unknown config key '{full}'{did_you_mean(str(key), names)} "
                                f"(known in {where}: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except VesuviusError as err:
        if prefix and f"'{prefix}." not in str(err):
            raise VesuviusError(f"config section '{prefix}': {err}") from None
        raise


def set_override(raw: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in override:
        raise VesuviusError(f"override '{override}' must look like key=value (e.g. train.steps=50)")
    key, text = override.split("=", 1)
    value = yaml.safe_load(text) if text else None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VesuviusError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping; ``what`` names the file's role in errors ("config file", ...)."""
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise VesuviusError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise VesuviusError(f"{what} {path} must hold a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    for override in overrides:
        set_override(raw, override)
    try:
        return from_dict(Config, raw)
    except VesuviusError as err:
        raise VesuviusError(f"{path}: {err}" if path else str(err)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config, ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
