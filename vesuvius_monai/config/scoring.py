"""The config's scoring sections: post-processing, its tuning, and evaluation (metrics, leaderboard settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vesuvius_monai.config.checks import check_fields, choice, finite, integer, require
from vesuvius_monai.metrics.names import DEFAULT_METRICS, METRIC_NAMES, TOPO_MATCHINGS

Triple = tuple[int, int, int]

@dataclass(frozen=True, kw_only=True)
class PostprocessConfig:
    """``postprocess``: probabilities (Z, Y, X) -> bool mask, by :func:`vesuvius_monai.postprocess.postprocess`.

    The operators run in this order; every one but the threshold is off by default:
    1. threshold (or hysteresis) -> 2. opening -> 3. closing (whole, or per sheet) -> 4. small components removed
    (min_size, connectivity) -> 5. sheet hole patching -> 6. 2x2x2 hole plugging -> 7. cavity filling
    (fill_holes_max, then fill_voids).

    threshold: foreground is ``prob > threshold``, in [0, 1].
    hysteresis_high: 0 (off) or in (threshold, 1]: keep only the components of ``prob > threshold`` that touch
        ``prob > hysteresis_high`` (``connectivity``-connected; with 6, ``skimage.filters.apply_hysteresis_threshold``).
    open_radius, close_radius: (z, y, x) radii >= 0 of the ellipsoid of a binary opening / closing ((0, 0, 0): off).
    close_per_sheet: close each connected component (``connectivity``) on its own, so that closing never bridges two
        sheets (nothing to do without ``close_radius``).
    min_size: foreground components with fewer voxels are removed (0 keeps all).
    connectivity: neighbourhood of foreground components, 6, 18 or 26.
    patch_holes: fill each component's holes by interpolating its height map along its dominant axis; a patch that
        adds a tunnel or cavity is rejected.
    plug_holes: plug 1-voxel holes through a sheet: every 2x2x2 cube whose voxels are not face-connected gets the
        fewest voxels that make them so (:func:`vesuvius_monai.postprocess.operators.plug_holes`).
    fill_holes_max: enclosed background cavities of at most this many voxels are filled (0 fills none).
    fill_voids: fill every enclosed background cavity (``fill_voids.fill``).
    max_whole_voxels: the operators that need whole components (hysteresis, min_size, close_per_sheet, patch_holes,
        fill_holes_max, fill_voids) refuse a block-wise (Zarr) volume of more voxels than this (>= 1).
    """

    threshold: float = 0.5
    hysteresis_high: float = 0.0
    open_radius: Triple = (0, 0, 0)
    close_radius: Triple = (0, 0, 0)
    close_per_sheet: bool = False
    min_size: int = 0
    fill_holes_max: int = 0
    connectivity: int = 26
    patch_holes: bool = False
    plug_holes: bool = False
    fill_voids: bool = False
    max_whole_voxels: int = 512**3

    def __post_init__(self) -> None:
        check_fields(self, "postprocess")
        finite("postprocess.threshold", self.threshold, 0.0, 1.0)
        finite("postprocess.hysteresis_high", self.hysteresis_high, 0.0, 1.0)
        require(self.hysteresis_high == 0 or self.hysteresis_high > self.threshold, "postprocess.hysteresis_high",
                f"must be 0 (off) or in (threshold, 1] = ({self.threshold}, 1], got {self.hysteresis_high}")
        for key in ("min_size", "fill_holes_max"):
            require(getattr(self, key) >= 0, f"postprocess.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("open_radius", "close_radius"):
            require(min(getattr(self, key)) >= 0, f"postprocess.{key}",
                    f"must be three integers (z, y, x) >= 0, got {getattr(self, key)}")
        integer("postprocess.max_whole_voxels", self.max_whole_voxels, 1)
        choice("postprocess.connectivity", self.connectivity, (6, 18, 26))


TUNE_OPERATORS = ("threshold", "hysteresis", "opening", "closing", "dust", "patch_holes", "plug_holes", "fill_voids")
TUNE_RULES = ("robust", "majority")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """``tune``: what ``tune-postprocess`` tries on the validation fragments (scored by the exact leaderboard score).

    The search is coordinate-wise (:mod:`vesuvius_monai.tuning.search`): each operator of ``operators`` in chain
    order, its candidates tried with every other key at the current choice, for ``sweeps`` sweeps.

    operators: the dimensions searched, a subset of threshold, hysteresis, opening, closing, dust, patch_holes,
        plug_holes, fill_voids (default: all).
    thresholds: candidate thresholds, each in [0, 1].
    hysteresis_highs: candidate ``postprocess.hysteresis_high`` values, each in (0, 1] (off is always a candidate;
        a high at or below the threshold is skipped).
    open_radii, close_radii: candidate (z, y, x) radii of the opening / closing, each >= 0 (off is always tried).
    close_modes: how each closing radius is tried: "whole" and/or "per_sheet" (``postprocess.close_per_sheet``).
    min_sizes: candidate small-component sizes (dust), each > 0, tried with each of ``connectivities``.
    connectivities: dust connectivities tried, each 6, 18 or 26.
    sweeps: passes over the operators (>= 1; a pass that changes nothing ends the search).
    rule: when a candidate replaces the current choice. "robust" (default): it must be better on a strict majority
        of the fragments (at least two) and its mean gain must exceed ``noise_k`` standard errors of the
        per-fragment gains (with two fragments and noise_k 1: better on both), and among the candidates within
        noise of the best the one closest to the current choice is taken. "majority": the best mean score, better
        on the mean and a strict majority (at least two), as the tuner did before.
    noise_k: standard errors of the per-fragment gains a "robust" change must clear (>= 0).
    halves: resampled halves that check each change (>= 0; 0 turns the check off): the rule is run on the larger
        half of the validation fragments and its pick scored on the other half, over every split or this many
        drawn at random; an operator changes only when that held-out gain is positive on the mean and on more
        splits than not, at a held-out Dice loss within ``max_dice_drop``. It costs no extra scoring.
    max_dice_drop: a candidate whose mean validation Dice is more than this below the config's post-processing's is
        never chosen, so that the score is not bought with overlap (>= 0; 1 turns the rule off); with rule "robust"
        the per-fragment Dice losses count with ``noise_k`` standard errors added.
    """

    operators: tuple[str, ...] = TUNE_OPERATORS
    thresholds: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30 .. 0.80
    hysteresis_highs: tuple[float, ...] = (0.7, 0.85, 0.9)
    open_radii: tuple[Triple, ...] = ((1, 1, 1),)
    close_radii: tuple[Triple, ...] = ((1, 1, 1), (2, 1, 1), (3, 3, 3))
    close_modes: tuple[str, ...] = ("whole", "per_sheet")
    min_sizes: tuple[int, ...] = (64, 256, 1024)
    connectivities: tuple[int, ...] = (6, 26)
    sweeps: int = 2
    rule: str = "robust"
    noise_k: float = 1.0
    halves: int = 20
    max_dice_drop: float = 0.005

    def __post_init__(self) -> None:
        check_fields(self, "tune")
        for name in self.operators:
            choice("tune.operators", name, TUNE_OPERATORS)
        require(len(set(self.operators)) == len(self.operators), "tune.operators",
                f"must not repeat an operator, got {list(self.operators)}")
        require(len(self.thresholds) > 0, "tune.thresholds", "must not be empty")
        for value in self.thresholds:
            finite("tune.thresholds", value, 0.0, 1.0)
        for value in self.hysteresis_highs:
            finite("tune.hysteresis_highs", value, 0.0, 1.0, open_low=True)
        for key in ("open_radii", "close_radii"):
            require(all(min(r) >= 0 for r in getattr(self, key)), f"tune.{key}",
                    f"must be (z, y, x) radii >= 0, got {[list(r) for r in getattr(self, key)]}")
        for mode in self.close_modes:
            choice("tune.close_modes", mode, ("whole", "per_sheet"))
        require(all(m > 0 for m in self.min_sizes), "tune.min_sizes", f"must all be > 0, got {list(self.min_sizes)}")
        for value in self.connectivities:
            choice("tune.connectivities", value, (6, 18, 26))
        integer("tune.sweeps", self.sweeps, 1)
        choice("tune.rule", self.rule, TUNE_RULES)
        finite("tune.noise_k", self.noise_k, 0.0)
        integer("tune.halves", self.halves, 0)
        finite("tune.max_dice_drop", self.max_dice_drop, 0.0)


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


@dataclass(kw_only=True)
class EvaluateConfig:
    """``evaluate``: which fragments to score, which metrics, what to write."""

    split: str = "test"  # test | val | all
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    save_probabilities: bool = True
    save_masks: bool = True
    leaderboard: LeaderboardWeights = field(default_factory=LeaderboardWeights)

    def __post_init__(self) -> None:
        check_fields(self, "evaluate")
        choice("evaluate.split", self.split, ("test", "val", "all"))
        for name in self.metrics:
            choice("evaluate.metrics", name, METRIC_NAMES)


