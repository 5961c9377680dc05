"""Betti numbers of binary volumes (z, y, x), counted rather than computed by persistence (much faster).

With foreground connectivity c (26, or 6 for the exact Betti matching library's construction) and the other one
for the background (6, or 26), the volume treated as surrounded by background:

- b0 = number of c-connected foreground components;
- b2 = number of cavities = background components that do not touch the volume border;
- b1 = b0 + b2 - chi, with chi the Euler characteristic (``skimage.measure.euler_number``; connectivity 26 is
  the union of closed voxel cubes, the T-construction, e.g. ``cripser.compute_ph(..., filtration="T")``;
  connectivity 6 the complex with voxels as vertices, the V-construction).

The Betti errors and the stand-in matchings of TopoScore (:mod:`vesuvius_monai.metrics.topology`) count per tile
with :func:`tile_betti`, in the construction of the matching in use (:func:`betti_connectivity`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.measure import euler_number

from vesuvius_monai.config import choice
from vesuvius_monai.metrics._common import binary_mask, tile_slices
from vesuvius_monai.metrics.components import cavity_labels, label_components

EULER_CONNECTIVITY = {26: 3, 6: 1}  # foreground connectivity -> skimage's euler_number connectivity
BACKGROUND = {26: 6, 6: 26}  # foreground connectivity -> background connectivity


def betti_connectivity(matching: str) -> int:
    """Foreground connectivity of the Betti numbers that go with a matching in use: 6 for "exact", else 26."""
    return 6 if matching == "exact" else 26


def euler_characteristic(mask: np.ndarray, connectivity: int = 26) -> int:
    """Euler characteristic of a boolean volume (z, y, x) with a ``connectivity``-connected foreground (26 or 6).

    26: the union of the closed voxel cubes (V - E + F - C of the voxel grid's cells); 6: the complex with the
    voxels as vertices. Computed by ``skimage.measure.euler_number``.
    """
    return int(euler_number(mask, connectivity=EULER_CONNECTIVITY[connectivity]))


def betti_of_mask(mask: np.ndarray, connectivity: int = 26) -> tuple[int, int, int]:
    """(b0, b1, b2) of a boolean volume (z, y, x), foreground ``connectivity``-connected (26 or 6); no input checks."""
    if not mask.any():
        return 0, 0, 0
    _, b0 = label_components(mask, connectivity)
    _, is_cavity = cavity_labels(mask, BACKGROUND[connectivity])
    b2 = int(np.count_nonzero(is_cavity))
    b1 = b0 + b2 - euler_characteristic(mask, connectivity)
    return b0, b1, b2


def betti_numbers(mask: np.ndarray, connectivity: int = 26) -> tuple[int, int, int]:
    """Betti numbers (components, tunnels, cavities) of a binary 3D volume.

    Args:
        mask: binary (z, y, x), bool or 0/1. The volume is treated as surrounded by background.
        connectivity: 26 (foreground 26-connected, background 6-connected) or 6 (foreground 6-connected,
            background 26-connected: the exact Betti matching library's construction).

    Returns:
        (b0, b1, b2): e.g. (1, 0, 0) for a ball, (1, 1, 0) for a solid torus, (1, 0, 1) for a hollow shell.
    """
    choice("connectivity", connectivity, tuple(BACKGROUND))
    return betti_of_mask(binary_mask(mask, "mask"), connectivity)


def tile_betti(mask: np.ndarray, tiles: Sequence[int] = (2, 2, 2), connectivity: int = 26) -> np.ndarray:
    """Betti numbers of each tile of a boolean volume (z, y, x): int64 array (n_tiles, 3).

    ``tiles`` as :func:`vesuvius_monai.metrics._common.tile_slices` takes them; ``connectivity`` 26 or 6.
    """
    slices = tile_slices(mask.shape, tiles)
    rows = [betti_of_mask(mask[s], connectivity) for s in slices]
    return np.array(rows, dtype=np.int64).reshape(len(slices), 3)
