"""Typed run configuration, loaded from YAML.

One keyword-only dataclass per YAML section (nested ones for ``synth.params``, ``train.loss`` and
``evaluate.leaderboard``). Every section checks itself the same way when it is built, from YAML or from
Python: field types come from the type hints (:func:`check_fields`), ranges from :func:`require`, choices from
MONAI's ``look_up_option`` (:func:`choice`, with its did-you-mean); a problem raises a
:class:`VesuviusError` naming the key (``config key 'train.lr': ...``). Unknown keys are rejected with a
did-you-mean hint.

YAML holds plain values; turning them into models, losses and transforms happens in Python
(``models.build_model``, ``losses.build_loss``, ``data.transforms.train_augmentations`` ...). Importing this
module pulls in nothing heavier than PyYAML.

CLI overrides are ``dotted.key=value`` strings (the value is parsed as YAML), applied before checking:
``train.steps=50 model.kwargs.init_features=8``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vesuvius_monai.errors import VesuviusError, did_you_mean
from vesuvius_monai.io.atomic import write_text

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------- checks


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``VesuviusError("config key '<key>': <message>")`` unless ``ok``."""
    if not ok:
        raise VesuviusError(f"config key '{key}': {message}")


def choice(key: str, value: Any, options: typing.Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``; else MONAI's ``look_up_option`` error (with did-you-mean) for ``key``."""
    if value in options and not isinstance(value, bool):
        return value
    from monai.utils import look_up_option  # only for its message: it names the closest option

    try:
        return look_up_option(value, options)
    except ValueError as err:
        raise VesuviusError(f"config key '{key}': {' '.join(str(err).split())}") from None


def finite(key: str, value: float, low: float | None = None, high: float | None = None, *,
           open_low: bool = False) -> None:
    """Raise unless ``value`` is finite and within [low, high] (``(low, high]`` with ``open_low``)."""
    ok = math.isfinite(value) and (high is None or value <= high)
    if low is not None:
        ok = ok and (value > low if open_low else value >= low)
    bounds = [f"{'>' if open_low else '>='} {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    require(ok, key, " ".join(["must be a finite number", " and ".join(bounds)]).rstrip() + f", got {value!r}")


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of dataclass ``obj`` against its type hint and store the coerced value.

    Lists become tuples where the hint says tuple, ints become floats where it says float; a wrong type
    raises a VesuviusError naming ``prefix.field``. Works on frozen dataclasses too.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}")
        object.__setattr__(obj, f.name, value)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class SynthParams:
    """``synth.params``: the synthetic fragment generator (``data.synthetic.make_fragment``).

    Lengths are in voxels, intensities in fractions of the dtype's full scale.
    """

    shape: Triple = (96, 96, 96)  # (z, y, x), every size >= 8
    sheet_thickness: float = 5.0  # labelled core thickness
    sheet_gap: float = 4.0  # mean free gap between successive turns
    scroll_radius: tuple[float, float] = (0.75, 2.5)  # axis distance from volume centre, x max(ny, nx), log-uniform
    warp_amplitude: float = 2.0  # RMS radial displacement
    warp_wavelength: float = 48.0  # typical wavelength of the warp modes
    n_warp_modes: int = 8
    compression_density: float = 2.5  # compressed regions per 10**6 voxels (rounded; 96^3 -> 2)
    compression_strength: float = 0.8  # c: local pitch becomes pitch / (1 + c), c jittered x[0.7, 1.2]
    compression_radius: float = 10.0  # Gaussian sigma of a compressed region
    sheet_intensity: float = 0.55
    air_intensity: float = 0.12
    fibre_strength: float = 0.45  # relative std of the fibre texture inside sheets
    fibre_length: float = 6.0  # Gaussian sigma of the texture along the fibres
    sheet_density_jitter: float = 0.12  # relative std of the per-turn density
    air_noise_std: float = 0.1  # white noise in the air before the blur
    speck_density: float = 2e-5  # bright inclusions per voxel
    speck_intensity: float = 0.9
    blur_sigma: float = 0.8
    noise_std: float = 0.12  # additive Gaussian noise after the blur
    drift_strength: float = 0.3  # multiplicative drift, about 1 +- drift_strength across the volume
    ignore_fraction: float = 0.07  # fraction of the volume in the unlabeled boxes (0 disables them)
    ignore_index: int = 2
    dtype: str = "uint8"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (z, y, x), written to file headers

    def __post_init__(self) -> None:
        key = "synth.params"
        check_fields(self, key)
        require(min(self.shape) >= 8, f"{key}.shape", f"every size must be >= 8, got {self.shape}")
        for name in ("sheet_thickness", "warp_wavelength", "compression_radius", "fibre_length"):
            finite(f"{key}.{name}", getattr(self, name), 0.0, open_low=True)
        for name in ("sheet_gap", "warp_amplitude", "compression_density", "compression_strength",
                     "sheet_intensity", "air_intensity", "fibre_strength", "sheet_density_jitter",
                     "air_noise_std", "speck_density", "speck_intensity", "blur_sigma", "noise_std"):
            finite(f"{key}.{name}", getattr(self, name), 0.0)
        finite(f"{key}.drift_strength", self.drift_strength, 0.0, 0.9)
        finite(f"{key}.ignore_fraction", self.ignore_fraction, 0.0, 0.5)
        for value in self.scroll_radius:
            finite(f"{key}.scroll_radius", value, 0.0, open_low=True)
        require(self.scroll_radius[0] <= self.scroll_radius[1], f"{key}.scroll_radius",
                f"must be (min, max) with min <= max, got {self.scroll_radius}")
        require(self.n_warp_modes >= 0, f"{key}.n_warp_modes", f"must be >= 0, got {self.n_warp_modes}")
        require(2 <= self.ignore_index <= 255, f"{key}.ignore_index", f"must be in 2..255, got {self.ignore_index}")
        choice(f"{key}.dtype", self.dtype, ("uint8", "uint16"))
        for value in self.spacing:
            finite(f"{key}.spacing", value, 0.0, open_low=True)


@dataclass(kw_only=True)
class SynthConfig:
    """``synth``: the synthetic scroll fragments written to ``data.root`` by ``vesuvius-monai synth``."""

    n_fragments: int = 8
    seed: int = 0
    fmt: str = "nii.gz"
    params: SynthParams = field(default_factory=SynthParams)

    def __post_init__(self) -> None:
        check_fields(self, "synth")
        require(self.n_fragments >= 1, "synth.n_fragments", f"must be >= 1, got {self.n_fragments}")
        require(self.seed >= 0, "synth.seed", f"must be >= 0, got {self.seed}")
        choice("synth.fmt", self.fmt, ("nii.gz", "nii", "tif"))


@dataclass(kw_only=True)
class DataConfig:
    """``data``: where fragments live and how they are split.

    ``root`` holds ``images/`` + ``labels/`` (matching names) or the competition's ``train_images/`` +
    ``train_labels/``; ``dataset`` may instead name a YAML listing fragments explicitly.
    Fragments named in ``val_fragments`` / ``test_fragments`` go there; otherwise the split is drawn
    by ``split_seed`` with the given fractions. Splits are always by whole fragment.
    """

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
        check_fields(self, "data")
        require(self.ignore_index not in (0, 1), "data.ignore_index", "must differ from 0 and 1")
        for value in self.spacing:
            finite("data.spacing", value, 0.0, open_low=True)
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"data.{key}", f"must be in [0, 1), got {value}")
        require(self.val_fraction + self.test_fraction < 1.0, "data.val_fraction",
                "val_fraction + test_fraction must leave fragments for training")
        require(not (self.dataset and self.ids_csv), "data.ids_csv",
                "cannot be combined with data.dataset (list the fragments in the dataset YAML instead)")
        require(self.zarr_level >= 0, "data.zarr_level", f"must be >= 0, got {self.zarr_level}")


@dataclass(kw_only=True)
class ModelConfig:
    """``model``: a registered network name and its keyword arguments (checked by ``build_model``)."""

    name: str = "resunet3d"
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass(kw_only=True)
class TransformConfig:
    """``transforms``: patch sampling, normalisation and augmentation (training only)."""

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
        check_fields(self, "transforms")
        require(min(self.patch_size) >= 8, "transforms.patch_size", f"every size must be >= 8, got {self.patch_size}")
        lo, hi = self.percentiles
        require(0 <= lo < hi <= 100, "transforms.percentiles", f"need 0 <= low < high <= 100, got {self.percentiles}")
        for key in ("pos_fraction", "flip_prob", "rot90_prob", "intensity_prob", "noise_prob"):
            finite(f"transforms.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("intensity_scale", "intensity_shift", "noise_std"):
            finite(f"transforms.{key}", getattr(self, key), 0.0)
        require(self.rot90_prob == 0 or self.patch_size[1] == self.patch_size[2], "transforms.rot90_prob",
                f"rotations in the y-x plane need a square y-x patch, got patch_size {self.patch_size}")


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """``train.loss``: weights of the loss terms, each a finite number >= 0, at least one > 0.

    One rule, from YAML and from Python alike: a term left out keeps its default (dice 1, the others 0), so
    ``{bce: 1}`` trains Dice + BCE and ``{dice: 0, bce: 1}`` BCE alone.
    """

    dice: float = 1.0
    bce: float = 0.0
    cldice: float = 0.0
    skel_recall: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "train.loss")
        names = [f.name for f in dataclasses.fields(self)]
        for name in names:
            finite(f"train.loss.{name}", getattr(self, name), 0.0)
        require(any(getattr(self, name) > 0 for name in names), "train.loss",
                f"at least one of {', '.join(repr(n) for n in names)} must be > 0, all are 0")

    def active(self) -> dict[str, float]:
        """``{term: weight}`` of the terms with weight > 0."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) > 0}


@dataclass(kw_only=True)
class TrainConfig:
    """``train``: optimisation, validation and checkpointing.

    With ``max_minutes`` the learning-rate schedule (warm-up, then cosine / poly decay) runs on elapsed time and
    ends annealed at the budget, less the time measured for the final validation and save; ``steps`` then only
    caps the run (the schedule follows the steps instead while they run ahead of the time).
    """

    steps: int = 400
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | poly | constant
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    loss: LossWeights = field(default_factory=LossWeights)
    val_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision, CUDA only (never on CPU)
    channels_last: bool = True  # channels-last-3D model and batches: 1.4-1.9x faster steps on a 2-core CPU
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    num_workers: int = 0  # DataLoader workers
    max_minutes: float = 0.0  # time budget of the run, final validation + save included; 0 = none (see below)

    def __post_init__(self) -> None:
        check_fields(self, "train")
        for key in ("steps", "batch_size", "val_every", "log_every"):
            require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        finite("train.lr", self.lr, 0.0, open_low=True)
        require(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        choice("train.schedule", self.schedule, ("cosine", "poly", "constant"))
        choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for key in ("grad_clip", "weight_decay", "max_minutes"):
            finite(f"train.{key}", getattr(self, key), 0.0)
        for key in ("num_threads", "num_workers"):
            require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass(kw_only=True)
class InferConfig:
    """``infer``: sliding-window inference (validation, evaluation, prediction)."""

    roi_size: Triple = (64, 64, 64)
    overlap: float = 0.25
    sw_batch_size: int = 2
    blend: str = "gaussian"  # gaussian | constant
    sigma_scale: float = 0.125
    tta_flip_axes: list[int] = field(default_factory=list)  # any of 0 (z), 1 (y), 2 (x)
    tta_rot90: bool = False
    block_size: Triple = (192, 192, 192)  # inference blocks: rounded up to multiples of the stride, >= the window
    out_dtype: str = "uint8"  # zarr probability output: uint8 (p*255), float16 or float32
    device: str = "auto"  # auto | cpu | cuda (evaluate, predict, tune-postprocess; validation runs on train.device)
    amp: bool = True  # mixed precision, CUDA only (never on CPU)

    def __post_init__(self) -> None:
        check_fields(self, "infer")
        require(0.0 <= self.overlap < 1.0, "infer.overlap", f"must be in [0, 1), got {self.overlap}")
        require(min(self.roi_size) >= 1, "infer.roi_size", f"every size must be >= 1, got {self.roi_size}")
        require(min(self.block_size) >= 1, "infer.block_size", f"every size must be >= 1, got {self.block_size}")
        finite("infer.sigma_scale", self.sigma_scale, 0.0, open_low=True)
        require(self.sw_batch_size >= 1, "infer.sw_batch_size", f"must be >= 1, got {self.sw_batch_size}")
        choice("infer.blend", self.blend, ("gaussian", "constant"))
        require(set(self.tta_flip_axes) <= {0, 1, 2} and len(set(self.tta_flip_axes)) == len(self.tta_flip_axes),
                "infer.tta_flip_axes", f"distinct axes 0, 1 or 2, got {self.tta_flip_axes}")
        choice("infer.out_dtype", self.out_dtype, ("uint8", "float16", "float32"))
        choice("infer.device", self.device, ("auto", "cpu", "cuda"))


@dataclass(frozen=True, kw_only=True)
class PostprocessConfig:
    """``postprocess``: threshold, then removal of small components, then filling of small cavities.

    threshold: foreground is ``prob > threshold``, in [0, 1].
    min_size: foreground components with fewer voxels are removed (0 keeps all).
    fill_holes_max: enclosed background cavities of at most this many voxels are filled (0 fills none).
    connectivity: neighbourhood of foreground components, 6, 18 or 26.
    """

    threshold: float = 0.5
    min_size: int = 0
    fill_holes_max: int = 0
    connectivity: int = 26

    def __post_init__(self) -> None:
        check_fields(self, "postprocess")
        finite("postprocess.threshold", self.threshold, 0.0, 1.0)
        for key in ("min_size", "fill_holes_max"):
            require(getattr(self, key) >= 0, f"postprocess.{key}", f"must be >= 0, got {getattr(self, key)}")
        choice("postprocess.connectivity", self.connectivity, (6, 18, 26))


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """``tune``: what ``tune-postprocess`` tries on the validation fragments (scored by the leaderboard score).

    thresholds: candidate thresholds, each in [0, 1] (tried first).
    min_sizes: candidate small-component sizes, each > 0, tried 6- and 26-connected at the chosen threshold (empty:
        thresholds only).
    max_dice_drop: a candidate whose mean validation Dice is more than this below the config's post-processing's is
        never chosen, so that the score is not bought with overlap (>= 0; 1 turns the rule off).
    """

    thresholds: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30 .. 0.80
    min_sizes: tuple[int, ...] = (64, 256, 1024)
    max_dice_drop: float = 0.005

    def __post_init__(self) -> None:
        check_fields(self, "tune")
        require(len(self.thresholds) > 0, "tune.thresholds", "must not be empty")
        for value in self.thresholds:
            finite("tune.thresholds", value, 0.0, 1.0)
        require(all(m > 0 for m in self.min_sizes), "tune.min_sizes", f"must all be > 0, got {list(self.min_sizes)}")
        finite("tune.max_dice_drop", self.max_dice_drop, 0.0)


TOPO_MATCHINGS = ("exact", "persistence", "betti")


@dataclass(frozen=True, kw_only=True)
class LeaderboardWeights:
    """``evaluate.leaderboard``: weights and settings of the leaderboard score.

    topo, surface_dice, voi: weights of the three parts; clamped at >= 0 and renormalised (not all <= 0).
    tolerance: surface Dice tolerance in spacing units (>= 0).
    voi_alpha: alpha of VOI_score = 1 / (1 + alpha VOI) (>= 0).
    betti_weights: TopoScore weights of dimensions 0, 1, 2 (>= 0, not all zero).
    tiles: TopoScore tiles along (z, y, x).
    connectivity: VOI component connectivity, 6, 18 or 26.
    topo_matching: TopoScore feature matching: "exact" (default; Betti matching by the competition's library,
        installed by scripts/setup_env.sh), or the stand-ins "persistence" (spatial matching through the union)
        and "betti" (m_k = min(p_k, g_k), an upper bound). Where the library cannot be loaded, "exact" falls back
        to "persistence" with a warning; ``vesuvius_monai.metrics.topo_matching_used(weights)`` names the
        matching that produced a figure.
    """

    topo: float = 0.30
    surface_dice: float = 0.35
    voi: float = 0.35
    tolerance: float = 2.0
    voi_alpha: float = 0.3
    betti_weights: tuple[float, float, float] = (0.34, 0.33, 0.33)
    tiles: Triple = (2, 2, 2)
    connectivity: int = 26
    topo_matching: str = "exact"

    def __post_init__(self) -> None:
        key = "evaluate.leaderboard"
        check_fields(self, key)
        for name in ("topo", "surface_dice", "voi"):
            finite(f"{key}.{name}", getattr(self, name))
        require(max(self.topo, self.surface_dice, self.voi) > 0, key,
                "weights topo, surface_dice and voi must not all be <= 0")
        finite(f"{key}.tolerance", self.tolerance, 0.0)
        finite(f"{key}.voi_alpha", self.voi_alpha, 0.0)
        for value in self.betti_weights:
            finite(f"{key}.betti_weights", value, 0.0)
        require(sum(self.betti_weights) > 0, f"{key}.betti_weights", "must not all be zero")
        require(min(self.tiles) >= 1, f"{key}.tiles", f"must be three integers >= 1, got {self.tiles}")
        choice(f"{key}.connectivity", self.connectivity, (6, 18, 26))
        choice(f"{key}.topo_matching", self.topo_matching, TOPO_MATCHINGS)

    def part_weights(self) -> tuple[float, float, float]:
        """(topo, surface_dice, voi) weights clamped at >= 0 and renormalised to sum to 1."""
        clamped = [max(w, 0.0) for w in (self.topo, self.surface_dice, self.voi)]
        total = sum(clamped)
        return clamped[0] / total, clamped[1] / total, clamped[2] / total


DEFAULT_METRICS = ["dice", "iou", "surface_dice", "hd95", "voi_split", "voi_merge", "topo_score", "cldice", "leaderboard"]


@dataclass(kw_only=True)
class EvaluateConfig:
    """``evaluate``: which fragments to score, which metrics, what to write."""

    split: str = "test"  # test | val | all
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    save_probabilities: bool = True
    save_masks: bool = True
    leaderboard: LeaderboardWeights = field(default_factory=LeaderboardWeights)

    def __post_init__(self) -> None:
        from vesuvius_monai.metrics import METRIC_NAMES

        check_fields(self, "evaluate")
        choice("evaluate.split", self.split, ("test", "val", "all"))
        for name in self.metrics:
            choice("evaluate.metrics", name, METRIC_NAMES)


@dataclass(kw_only=True)
class Config:
    """A whole run: every section plus the seed and the run folder."""

    seed: int = 0
    output_dir: str = "runs/default"
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        check_fields(self, "config")


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, X | None, tuple[...], list[X], dict, a section)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, key)
    if hint is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        require(len(value) == len(args), key, f"must have {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list or hint is list:
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        args = typing.get_args(hint)
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys (values are checked by ``cls``)."""
    where = prefix or "top level"
    if data is None:
        data = {}
    require(isinstance(data, dict), where, f"must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise VesuviusError(f"unknown config key '{full}'{did_you_mean(str(key), names)} "
                                f"(known in {where}: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{prefix}.{key}" if prefix else str(key)) for key, value in data.items()}
    return cls(**kwargs)


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


# Keys that older versions wrote (into config.yaml and checkpoints): old dotted key -> new key, or None (dropped).
RENAMED_KEYS: dict[str, str | None] = {"synth.shape": "synth.params.shape",
                                       "infer.halo": None}  # blocks share partial sums now: no halo


def upgrade_raw(raw: dict) -> dict:
    """A copy of a raw config mapping with the keys of :data:`RENAMED_KEYS` moved (or dropped), logged once each."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if new is None:
            log.warning("config key '%s' is no longer used; ignoring it", old)
            continue
        set_override(raw, f"{new}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        log.info("config key '%s' is now '%s'", old, new)
    return raw


def config_from_raw(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from a raw mapping (as stored in a run's config.yaml or a checkpoint) plus overrides."""
    raw = upgrade_raw(raw)
    for override in overrides:
        set_override(raw, override)
    return from_dict(Config, raw)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    try:
        return config_from_raw(raw, overrides)
    except VesuviusError as err:
        raise VesuviusError(f"{path}: {err}" if path else str(err)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config or one of its sections, ready for YAML or a checkpoint."""

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
