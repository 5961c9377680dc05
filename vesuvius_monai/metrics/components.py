"""Connected components of boolean volumes (z, y, x): the one labelling that metrics and post-processing share.

A connectivity is the number of neighbours a voxel is connected to: 6 (faces), 18 (faces and edges) or 26 (the
full 3x3x3 cube). :data:`CONNECTIVITY_RANK` maps it to the rank of ``scipy.ndimage.generate_binary_structure(3,
rank)`` and of ``skimage``'s ``connectivity`` argument. Callers pass a connectivity already checked (by the config
or a public function).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITIES = (6, 18, 26)
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean volume (z, y, x): (int32 labels, 0 = background; count)."""
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def cavity_labels(mask: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``connectivity``-connected background components of a boolean volume (z, y, x) and which are cavities.

    Returns:
        (labels, is_cavity): int32 labels of ``~mask`` (0 on the foreground), and a boolean array indexed by
        label (entry 0 is False) that is True for components not touching the volume border.
    """
    labels, count = label_components(~mask, connectivity)
    is_cavity = np.ones(count + 1, dtype=bool)
    is_cavity[0] = False
    for axis in range(3):
        for index in (0, -1):
            is_cavity[np.take(labels, index, axis=axis)] = False
    return labels, is_cavity
