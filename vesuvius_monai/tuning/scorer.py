"""The exact leaderboard score of many candidate masks against one label, with the label's work done once.

:class:`FragmentScorer` gives the same figures as :func:`vesuvius_monai.metrics.leaderboard.leaderboard_score`
(tested to 1e-9) but is built for a search that scores dozens of masks per fragment:

- the label side is prepared once: its mask without the ignore region, its TopoScore tiles, its surface elements
  and the distance of every grid corner to them (one Euclidean distance transform);
- a mask seen before (the same bytes: e.g. a dust size that removes nothing) returns its cached figures;
- TopoScore tiles are matched only when they changed: the Betti matching of each (tile, tile content) is cached,
  so an operator that edits a few tiles costs only their matching;
- the surface Dice uses distance transforms on the corner grid instead of KD-trees (the same exact distances:
  surfels lie on that grid).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
from scipy import ndimage

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics._common import check_spacing, check_tiles, prepare_pair, tile_slices
from vesuvius_monai.metrics.betti_matching import match_tiles, matching_used
from vesuvius_monai.metrics.leaderboard import combine_parts
from vesuvius_monai.metrics.overlap import dice_masks
from vesuvius_monai.metrics.surface import neighbour_codes, surfel_area_table
from vesuvius_monai.metrics.topology import topo_counts, topo_score_from_counts
from vesuvius_monai.metrics.voi import voi_masks


def _digest(mask: np.ndarray) -> bytes:
    """A 16-byte digest of a boolean array's contents (its shape is fixed per scorer)."""
    return hashlib.blake2b(np.ascontiguousarray(mask).view(np.uint8).data, digest_size=16).digest()


class _Surfaces:
    """Surface elements of a boolean volume (Z, Y, X) on the (Z+1, Y+1, X+1) corner grid: where they are, their
    areas, and the distance of every corner to the nearest one (``inf`` everywhere when there is none)."""

    def __init__(self, mask: np.ndarray, spacing: tuple[float, float, float]):
        codes = neighbour_codes(mask)
        self.where = (codes != 0) & (codes != 255)
        self.areas = surfel_area_table(spacing)[codes]
        self.any = bool(self.where.any())
        self.spacing = spacing
        self._distance: np.ndarray | None = None

    @property
    def distance(self) -> np.ndarray:
        """float64 (Z+1, Y+1, X+1): Euclidean distance (spacing units) of each corner to the nearest surfel."""
        if self._distance is None:
            self._distance = (ndimage.distance_transform_edt(~self.where, sampling=self.spacing) if self.any
                              else np.full(self.where.shape, np.inf))
        return self._distance

    def area_within(self, other: "_Surfaces", tolerance: float) -> float:
        """Area of this volume's surfels within ``tolerance`` of ``other``'s."""
        return float(self.areas[self.where & (other.distance <= tolerance)].sum())


class FragmentScorer:
    """Leaderboard score and Dice of boolean candidate masks (Z, Y, X) against one label (the same shape).

    ``label``: values 0, 1 and ``ignore_index``; ignored voxels become background in every mask before scoring.
    :meth:`score` returns the dict of :func:`leaderboard_score` plus ``"dice"``; ``scored`` counts the masks
    scored, ``reused`` those answered from the cache.
    """

    def __init__(self, label: np.ndarray, *, weights: LeaderboardWeights = LeaderboardWeights(),
                 ignore_index: int | None = 2, spacing: Sequence[float] = (1, 1, 1)):
        empty = np.zeros(np.shape(label), dtype=bool)
        _, self.label = prepare_pair(empty, label, ignore_index)  # checks the label
        self.keep = None if ignore_index is None else np.asarray(label) != ignore_index
        self.weights, self.spacing = weights, check_spacing(spacing)
        self.slices = tile_slices(self.label.shape, check_tiles(weights.tiles, self.label.shape))
        self.exact = matching_used(weights.topo_matching) == "exact"
        self.label_surfaces = _Surfaces(self.label, self.spacing)
        self._tiles: dict[tuple[int, bytes], np.ndarray] = {}
        self._masks: dict[bytes, dict[str, float]] = {}
        self.scored = self.reused = 0

    def score(self, mask: np.ndarray) -> dict[str, float]:
        """Leaderboard parts and ``"dice"`` of a boolean (Z, Y, X) mask (cached by its contents)."""
        if mask.shape != self.label.shape or mask.dtype != bool:
            raise ValueError(f"mask must be bool {self.label.shape}, got {mask.dtype} {mask.shape}")
        if self.keep is not None:
            mask = mask & self.keep
        key = _digest(mask)
        if key in self._masks:
            self.reused += 1
            return self._masks[key]
        self.scored += 1
        split, merge = voi_masks(mask, self.label, self.weights.connectivity)
        result = combine_parts(self._topo(mask), self._surface(mask), split, merge, self.weights)
        result["dice"] = dice_masks(mask, self.label)
        self._masks[key] = result
        return result

    def _topo(self, mask: np.ndarray) -> float:
        """TopoScore of ``mask``; exact matchings of unchanged tiles come from the cache."""
        if not self.exact:
            return topo_counts(mask, self.label, self.weights.tiles, self.weights.topo_matching).score(
                self.weights.betti_weights)
        keys = [(i, _digest(mask[s])) for i, s in enumerate(self.slices)]
        todo = [i for i, key in enumerate(keys) if key not in self._tiles]
        if todo:
            rows = match_tiles([mask[self.slices[i]] for i in todo], [self.label[self.slices[i]] for i in todo], 1)
            self._tiles.update({keys[i]: row for i, row in zip(todo, rows)})
        m, p, g = np.sum([self._tiles[key] for key in keys], axis=0)
        return topo_score_from_counts(p, g, m, self.weights.betti_weights)

    def _surface(self, mask: np.ndarray) -> float:
        """Normalised surface Dice of ``mask`` against the label (DeepMind's definition, as the metric module)."""
        has_pred, has_label = bool(mask.any()), bool(self.label.any())
        if not (has_pred or has_label):
            return 1.0
        if not (has_pred and has_label):
            return 0.0
        pred, label, tolerance = _Surfaces(mask, self.spacing), self.label_surfaces, self.weights.tolerance
        total = label.areas[label.where].sum() + pred.areas[pred.where].sum()
        return float((label.area_within(pred, tolerance) + pred.area_within(label, tolerance)) / total)


class FnScorer:
    """A :class:`FragmentScorer` stand-in from plain functions: ``score_fn(mask, label)`` and ``dice_fn(mask,
    label)`` (without it "dice" is 0.0 for every mask, so that the Dice rule never refuses)."""

    def __init__(self, label: np.ndarray, score_fn, dice_fn=None):
        self.label, self.score_fn, self.dice_fn = label, score_fn, dice_fn
        self.scored = 0

    def score(self, mask: np.ndarray) -> dict[str, float]:
        """{"score", "dice"} of a bool mask (Z, Y, X)."""
        self.scored += 1
        dice = 0.0 if self.dice_fn is None else float(self.dice_fn(mask, self.label))
        return {"score": float(self.score_fn(mask, self.label)), "dice": dice}
