"""Several metrics of one pair at once (:func:`compute_metrics`), metric names checked, and the TopoScore matching
in use (:func:`topo_matching_used`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.errors import VesuviusError, did_you_mean
from vesuvius_monai.metrics.betti_matching import matching_used
from vesuvius_monai.metrics.context import SCALAR_GETTERS, MetricContext
from vesuvius_monai.metrics.names import METRIC_NAMES

assert METRIC_NAMES == tuple(SCALAR_GETTERS), "metrics/names.py and metrics/context.py must list the same metrics"


def topo_matching_used(weights: LeaderboardWeights | str = LeaderboardWeights()) -> str:
    """The matching that produces TopoScore and Betti-error figures for these settings, in this process.

    Args:
        weights: the leaderboard settings (their ``topo_matching``) or a matching name.

    Returns:
        "exact" (Betti matching, the competition's), or the stand-in in use: "persistence" (also where
        "exact" was asked for but the library cannot be loaded; a warning says so once per process) or "betti".
    """
    return matching_used(weights if isinstance(weights, str) else weights.topo_matching)


def check_metric_names(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list, raising VesuviusError on an unknown name (with a did-you-mean hint)."""
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name not in SCALAR_GETTERS:
            hint = did_you_mean(name, SCALAR_GETTERS) or f"; known metrics: {', '.join(SCALAR_GETTERS)}"
            raise VesuviusError(f"unknown metric {name!r}{hint}")
    return list(names)


def compute_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    names: Sequence[str],
    *,
    ignore_index: int | None = 2,
    spacing: Sequence[float] = (1, 1, 1),
    weights: LeaderboardWeights = LeaderboardWeights(),
) -> dict[str, float]:
    """Compute the named scalar metrics of one pair, sharing intermediate results.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``.
        names: of :data:`METRIC_NAMES`, e.g. ["dice", "surface_dice", "leaderboard"].
        ignore_index: the unlabeled value, or None.
        spacing: voxel size along (z, y, x) for the surface metrics.
        weights: settings of the VOI, TopoScore, surface Dice and leaderboard (see LeaderboardWeights).

    Returns:
        {name: value} in the order of ``names``.
    """
    names = check_metric_names(names)
    context = MetricContext(pred, label, ignore_index=ignore_index, spacing=spacing, weights=weights)
    return {name: context.value(name) for name in names}

