"""The config's sections: one keyword-only dataclass per YAML section, and :class:`Config`, the whole run.

Each section checks itself when it is built, from YAML or from Python (:mod:`vesuvius_monai.config.checks`).
The defaults are the benchmarked recipe (README, "Choosing the default recipe"): the residual UNet3D at half
resolution behind a strided stem (init_features 8, depth 3), 64^3 patches, Dice + BCE, AdamW at 3e-3 with a
cosine decay over 2000 steps, mirrored test-time augmentation. ``configs/`` holds only what differs from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vesuvius_monai.config.checks import check_fields, choice, finite, integer, require
from vesuvius_monai.config.scoring import EvaluateConfig, PostprocessConfig, TuneConfig

Triple = tuple[int, int, int]

RECIPE_MODEL_KWARGS = {"init_features": 8, "depth": 3, "stem_stride": 2}  # resunet3d at half resolution
WHOLE = {"whole": True}  # field metadata: a config layer that gives this section as a mapping gives all of it

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
    missing_chunks: str = "warn"  # chunks missing from a Zarr store (read as its fill value): warn | error | allow
    remote_cache_mb: float = 1024.0  # http(s):// and s3:// volumes: memory chunk cache (MiB)
    remote_cache_dir: str | None = None  # and an optional disk chunk cache folder, reused by later runs
    remote_retries: int = 5  # tries per request (dropped connection, timeout, 5xx) before the run stops
    remote_backoff_s: float = 0.5  # wait before the second try, doubled for each further one
    remote_timeout_s: float = 60.0  # one request's time limit

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
        choice("data.missing_chunks", self.missing_chunks, ("warn", "error", "allow"))
        finite("data.remote_cache_mb", self.remote_cache_mb, 0.0)
        integer("data.remote_retries", self.remote_retries, 1)
        finite("data.remote_backoff_s", self.remote_backoff_s, 0.0)
        finite("data.remote_timeout_s", self.remote_timeout_s, 0.0, open_low=True)


@dataclass(kw_only=True)
class ModelConfig:
    """``model``: a registered network name and its keyword arguments (checked by ``build_model``).

    ``kwargs`` default to the recipe's for resunet3d (:data:`RECIPE_MODEL_KWARGS`) and to none for another network.
    """

    name: str = "resunet3d"
    kwargs: dict | None = None

    def __post_init__(self) -> None:
        if self.kwargs is None:
            self.kwargs = dict(RECIPE_MODEL_KWARGS) if self.name == "resunet3d" else {}
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

    steps: int = 2000
    batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | poly | constant
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    loss: LossWeights = field(default_factory=lambda: LossWeights(dice=1.0, bce=1.0), metadata=WHOLE)
    val_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision, CUDA only (never on CPU)
    channels_last: bool = True  # channels-last-3D model and batches: faster steps on a CPU (bench_model_speed.py)
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
    blend: str = "gaussian"  # gaussian | constant (MONAI's importance maps) | nnunet (nnU-Net v2's Gaussian)
    sigma_scale: float = 0.125
    grid: str = "monai"  # window starts: monai (sliding_window_inference's) | nnunet (nnU-Net v2's, step 1 - overlap)
    blend_space: str = "prob"  # blend each window's probabilities, or its logits (sigmoid once after blending)
    tta_flip_axes: list[int] = field(default_factory=lambda: [0, 1, 2])  # any of 0 (z), 1 (y), 2 (x); [] for none
    tta_rot90: bool = False
    block_size: Triple = (192, 192, 192)  # inference blocks: rounded up to multiples of the stride, >= the window
    out_dtype: str = "uint8"  # zarr probability output: uint8 (p*255), float16 or float32
    device: str = "auto"  # auto | cpu | cuda (evaluate, predict, tune-postprocess; validation runs on train.device)
    amp: bool = True  # mixed precision, CUDA only (never on CPU)
    fusion: str = "prob"  # ensembles (several --checkpoint): weighted mean of probabilities, or of logits (logit)
    # skipping empty space (engine/support.py): a window whose raw input is all skip_background, or lies outside the
    # support (the volume `support`, or the input's OME-Zarr level support_level, > support_threshold), is not run
    skip_background: float | None = None  # raw value of empty space (e.g. 0); None: every window runs
    support: str | None = None  # a mask volume (any size: scaled to the input) whose values > threshold hold scroll
    support_level: int | None = None  # pyramid level of `support` (default 0), or of the input when support is None
    support_threshold: float = 0.0
    pyramid_levels: int = 0  # Zarr outputs: OME-Zarr levels (2x each); 0 = until the coarsest is <= 128 per side

    def __post_init__(self) -> None:
        check_fields(self, "infer")
        if self.skip_background is not None:
            finite("infer.skip_background", self.skip_background)
        finite("infer.support_threshold", self.support_threshold)
        require(self.support_level is None or self.support_level >= 0, "infer.support_level",
                f"must be >= 0, got {self.support_level}")
        require(self.pyramid_levels >= 0, "infer.pyramid_levels", f"must be >= 0 (0: automatic), got "
                f"{self.pyramid_levels}")
        require(0.0 <= self.overlap < 1.0, "infer.overlap", f"must be in [0, 1), got {self.overlap}")
        require(min(self.roi_size) >= 1, "infer.roi_size", f"every size must be >= 1, got {self.roi_size}")
        require(min(self.block_size) >= 1, "infer.block_size", f"every size must be >= 1, got {self.block_size}")
        finite("infer.sigma_scale", self.sigma_scale, 0.0, open_low=True)
        require(self.sw_batch_size >= 1, "infer.sw_batch_size", f"must be >= 1, got {self.sw_batch_size}")
        choice("infer.blend", self.blend, ("gaussian", "constant", "nnunet"))
        choice("infer.grid", self.grid, ("monai", "nnunet"))
        choice("infer.blend_space", self.blend_space, ("prob", "logit"))
        require(set(self.tta_flip_axes) <= {0, 1, 2} and len(set(self.tta_flip_axes)) == len(self.tta_flip_axes),
                "infer.tta_flip_axes", f"distinct axes 0, 1 or 2, got {self.tta_flip_axes}")
        choice("infer.out_dtype", self.out_dtype, ("uint8", "float16", "float32"))
        choice("infer.device", self.device, ("auto", "cpu", "cuda"))
        choice("infer.fusion", self.fusion, ("prob", "logit"))



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
