"""Metrics of papyrus-surface predictions on NumPy volumes (z, y, x).

Every metric takes ``pred`` (binary mask, bool or 0/1) and ``label`` (0 background, 1 surface,
``ignore_index`` unlabeled; ignored voxels become background in both). :func:`compute_metrics` computes the
scalar metrics named in :data:`METRIC_NAMES`, several at once, sharing their intermediate results.

TopoScore matches features with exact Betti matching (the competition's library) by default; where that
library cannot be loaded it falls back to a stand-in with a warning. :func:`topo_matching_used` names the
matching that actually produces the figures, for reports.

Importing this package loads nothing: each name below comes from its module on first use (PEP 562), so that
:mod:`vesuvius_monai.metrics.names` stays a leaf that the config reads without loading SciPy or scikit-image.
(``cldice``, a module's name too, is imported from :mod:`vesuvius_monai.metrics.cldice`.)
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "METRIC_NAMES": "names", "MetricContext": "context", "betti_errors": "topology", "betti_numbers": "betti",
    "check_metric_names": "compute", "cldice_parts": "cldice", "compute_metrics": "compute", "dice": "overlap",
    "hausdorff95": "surface", "iou": "overlap", "leaderboard_score": "leaderboard", "surface_dice": "surface",
    "topo_matching_used": "compute", "topo_score": "topology", "variation_of_information": "voi",
    "voi_score": "voi",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vesuvius_monai.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vesuvius_monai.metrics.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
