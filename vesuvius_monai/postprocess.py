"""Post-processing of surface probabilities: threshold, drop small components, fill small cavities.

Also :func:`pick_threshold`, which picks the threshold that maximises a score over validation fragments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects
from tqdm import tqdm

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.errors import VesuviusError

logger = logging.getLogger(__name__)

CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}  # neighbours -> rank for ndimage.generate_binary_structure(3, rank)
DEFAULT_CANDIDATES = np.linspace(0.2, 0.8, 13)


def _check_prob(prob: np.ndarray) -> None:
    """Raise VesuviusError unless prob is a finite (Z, Y, X) array of values in [0, 1]."""
    if not isinstance(prob, np.ndarray) or prob.ndim != 3:
        raise VesuviusError(f"postprocess prob must be a (Z, Y, X) array, got shape {getattr(prob, 'shape', None)}")
    if not np.isfinite(prob).all():
        raise VesuviusError("postprocess prob contains NaN or infinite values")
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise VesuviusError(f"postprocess prob must be in [0, 1], got range [{prob.min()}, {prob.max()}]")


def remove_small_components(mask: np.ndarray, min_size: int, connectivity: int = 26) -> np.ndarray:
    """Drop foreground components of a bool (Z, Y, X) mask with fewer than ``min_size`` voxels; new bool array."""
    if min_size <= 0:
        return mask.copy()
    return remove_small_objects(mask, max_size=min_size - 1, connectivity=CONNECTIVITY_RANK[connectivity])


def fill_small_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """Fill enclosed background cavities of at most ``max_size`` voxels in a bool (Z, Y, X) mask; new bool array.

    Background components are 6-connected; one that touches the volume border is not enclosed and is kept.
    (Hand-written: ``skimage.morphology.remove_small_holes`` would also fill small pockets open to the border.)
    """
    if max_size <= 0:
        return mask.copy()
    labels, _ = ndimage.label(~mask, structure=ndimage.generate_binary_structure(3, 1))
    sizes = np.bincount(labels.ravel())
    fill = sizes <= max_size
    fill[0] = False
    fill[_border_labels(labels)] = False
    return mask | fill[labels]


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Unique label values on the six faces of a (Z, Y, X) label volume."""
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    return np.unique(np.concatenate([face.ravel() for face in faces]))


def postprocess(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Threshold (Z, Y, X) probabilities, remove small components, fill small cavities; bool (Z, Y, X)."""
    _check_prob(prob)
    mask = prob > cfg.threshold
    mask = remove_small_components(mask, cfg.min_size, cfg.connectivity)
    return fill_small_holes(mask, cfg.fill_holes_max)


def pick_threshold(
    probs: list[np.ndarray],
    labels: list[np.ndarray],
    score_fn: Callable[[np.ndarray, np.ndarray], float],
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    *,
    base: PostprocessConfig | None = None,
) -> tuple[float, dict[float, float]]:
    """Pick the threshold that maximises the mean of ``score_fn(pred, label)`` over fragments.

    probs[i] (Z, Y, X) in [0, 1] and labels[i] of the same shape are passed as ``score_fn(bool pred, label)``,
    higher is better. ``pred`` is ``postprocess(prob, base with that threshold)``; ``base`` defaults to plain
    thresholding. Ties go to the candidate closest to 0.5. Returns (best threshold, {threshold: mean score}).
    """
    if len(probs) == 0 or len(probs) != len(labels):
        raise VesuviusError(
            f"pick_threshold needs equally many probs and labels (> 0), got {len(probs)} and {len(labels)}"
        )
    for i, (prob, label) in enumerate(zip(probs, labels)):
        if prob.shape != label.shape:
            raise VesuviusError(f"pick_threshold fragment {i}: prob shape {prob.shape} != label shape {label.shape}")
    thresholds = [float(t) for t in candidates]
    if not thresholds:
        raise VesuviusError("pick_threshold 'candidates' is empty")
    base = base or PostprocessConfig()
    scores = {}
    for t in tqdm(thresholds, desc="thresholds", leave=False):
        scores[t] = _mean_score(probs, labels, score_fn, dataclasses.replace(base, threshold=t))
    best_score = max(scores.values())
    best = min((t for t, s in scores.items() if s == best_score), key=lambda t: abs(t - 0.5))
    logger.info("best threshold %.3f with mean score %.4f", best, best_score)
    return best, scores


def _mean_score(
    probs: list[np.ndarray],
    labels: list[np.ndarray],
    score_fn: Callable[[np.ndarray, np.ndarray], float],
    cfg: PostprocessConfig,
) -> float:
    """Mean of score_fn(postprocess(prob, cfg), label) over the fragments; raises on a non-finite score."""
    values = []
    for i, (prob, label) in enumerate(zip(probs, labels)):
        value = float(score_fn(postprocess(prob, cfg), label))
        if not math.isfinite(value):
            raise VesuviusError(f"pick_threshold: score_fn gave {value} for fragment {i} at threshold {cfg.threshold}")
        values.append(value)
    return float(np.mean(values))

