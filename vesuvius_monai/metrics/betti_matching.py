"""Exact Betti matching of tile pairs, the matching of the competition's TopoScore.

The competition matches topological features with Betti matching (persistent homology with induced
matchings, Stucki et al. 2023/2024) through the compiled Betti-Matching-3D library. That library ships,
compiled, inside the ``topolosses`` wheel as ``topolosses/losses/betti_matching/src/betti_matching*.so``
(installed by ``scripts/setup_env.sh`` with ``--no-deps``: the wheel's declared dependencies, torchvision and
opencv among them, are not wanted here). Only that extension file is loaded, never the ``topolosses``
package, whose ``__init__`` modules import those dependencies.

Inputs are float64 C-contiguous tiles of the inverted masks (foreground 0.0, background 1.0), prediction
first, label second. In that sublevel filtration the library's cubical complex has the voxels as vertices:
the foreground is 6-connected (voxels sharing only an edge or a corner are separate components), the
background 26-connected, and the one essential class of a tile is not counted (a tile whose foreground is
one component has no dimension-0 feature; a hollow cube has one dimension-2 feature).

Where the extension cannot be loaded (another platform or Python version), TopoScore falls back to the
"persistence" stand-in of :mod:`vesuvius_monai.metrics.topology`; a warning says so once per process, and
:func:`matching_used` names the matching that actually produces the figures.

Speed: one matching of a 160^3 tile takes seconds and about 5 GB of memory. The tiles are matched in a pool of
worker processes, as many as there are cores and memory for, which measured faster than matching them one after
another and than the extension's own threaded list overload (``bench/bench_metrics.py --compare-parallel``; the
figures are in the README). Scripts that score large volumes need the usual ``if __name__ == "__main__":``
guard, as for any ``multiprocessing`` spawn pool.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
from tqdm import tqdm

from vesuvius_monai.config.checks import choice
from vesuvius_monai.metrics.names import TOPO_MATCHINGS
from vesuvius_monai.errors import VesuviusError

logger = logging.getLogger(__name__)

EXTENSION_GLOB = "losses/betti_matching/src/betti_matching*"
FALLBACK = "persistence"
BYTES_PER_VOXEL = 1500  # peak memory of one matching per tile voxel (measured 1.2 kB: 5 GB for a 160^3 tile)
MIN_PARALLEL_VOXELS = 64**3  # smaller tiles match in under a second: starting worker processes costs more
MIN_PROGRESS_VOXELS = 100**3  # show a progress bar only for tiles that take seconds each

_warned = False


def extension_paths() -> list[Path]:
    """Betti-Matching-3D extension files for this Python inside the installed ``topolosses`` (not imported)."""
    spec = importlib.util.find_spec("topolosses")
    if spec is None or not spec.submodule_search_locations:
        return []
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = [p for d in spec.submodule_search_locations for p in Path(d).glob(EXTENSION_GLOB)]
    return sorted(p for p in found if p.name.endswith(suffixes))


def load_extension_file(path: Path) -> ModuleType:
    """Load the compiled module ``betti_matching`` from ``path`` alone (its package is not imported)."""
    spec = importlib.util.spec_from_file_location("betti_matching", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "compute_matching"):
        raise ImportError(f"{path} has no compute_matching")
    return module


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    """(extension module or None, where it came from or why it could not be loaded); tried once per process."""
    paths = extension_paths()
    if not paths:
        return None, "the topolosses wheel (with the Betti-Matching-3D extension) is not installed"
    try:
        return load_extension_file(paths[0]), str(paths[0])
    except (ImportError, OSError) as err:
        return None, f"loading {paths[0]} failed: {err}"


def extension() -> ModuleType | None:
    """The Betti-Matching-3D extension module, or None where it cannot be loaded."""
    return _load()[0]


def extension_status() -> str:
    """The extension's file path, or the reason it could not be loaded."""
    return _load()[1]


def matching_used(matching: str) -> str:
    """The matching that produces TopoScore figures when ``matching`` is asked for, in this process.

    "exact" stays "exact" where the extension loads; elsewhere it becomes the "persistence" stand-in and a
    warning says so (once per process). The stand-ins are returned as they are; another name raises.
    """
    global _warned
    choice("matching", matching, TOPO_MATCHINGS)
    if matching != "exact" or extension() is not None:
        return matching
    if not _warned:
        _warned = True
        logger.warning(
            "exact Betti matching is unavailable (%s); TopoScore and Betti errors use the %r stand-in, which "
            "differs from the competition's score (install topolosses==0.2.0 with --no-deps: scripts/setup_env.sh)",
            extension_status(), FALLBACK,
        )
    return FALLBACK


def inverted(mask: np.ndarray) -> np.ndarray:
    """The library's input for a boolean tile (z, y, x): float64, C-contiguous, foreground 0.0, background 1.0."""
    return np.ascontiguousarray(np.where(mask, 0.0, 1.0))


def match_pair(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Exact Betti matching of one tile pair of boolean masks (z, y, x) of one shape.

    Returns:
        int64 (3, 3): rows m_k (matched), p_k = m_k + unmatched prediction features, g_k = m_k + unmatched
        label features; columns dimensions k = 0, 1, 2.
    """
    module = extension()
    if module is None:
        raise VesuviusError(f"exact Betti matching is unavailable: {extension_status()}")
    result = module.compute_matching(inverted(pred), inverted(label))
    matched = np.asarray(result.num_matched, dtype=np.int64)
    return np.stack([
        matched,
        matched + np.asarray(result.num_unmatched_input1, dtype=np.int64),
        matched + np.asarray(result.num_unmatched_input2, dtype=np.int64),
    ])


def _available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_workers(n_tiles: int, tile_voxels: int) -> int:
    """Worker processes for matching ``n_tiles`` tiles of up to ``tile_voxels`` voxels: 1 means in-process.

    Bounded by the tiles, the cores and the available memory (``BYTES_PER_VOXEL`` per tile voxel per worker);
    1 for small tiles, where starting workers costs more than it saves.
    """
    if n_tiles < 2 or tile_voxels < MIN_PARALLEL_VOXELS:
        return 1
    import psutil

    by_memory = int(0.8 * psutil.virtual_memory().available // (BYTES_PER_VOXEL * tile_voxels))
    return max(1, min(n_tiles, _available_cores(), by_memory))


def match_tiles(
    pred_tiles: Sequence[np.ndarray], label_tiles: Sequence[np.ndarray], workers: int | None = None
) -> np.ndarray:
    """Exact Betti matching of each tile pair (boolean masks (z, y, x), pair i of one shape).

    Args:
        pred_tiles, label_tiles: equally many tiles.
        workers: worker processes; None chooses with :func:`choose_workers`, 1 matches in this process.

    Returns:
        int64 (n_tiles, 3, 3), each tile as :func:`match_pair` gives it.
    """
    if len(pred_tiles) != len(label_tiles):
        raise VesuviusError(f"match_tiles needs equally many tiles, got {len(pred_tiles)} and {len(label_tiles)}")
    if not pred_tiles:
        return np.zeros((0, 3, 3), dtype=np.int64)
    largest = max(tile.size for tile in pred_tiles)
    workers = choose_workers(len(pred_tiles), largest) if workers is None else max(1, int(workers))
    bar = tqdm(total=len(pred_tiles), desc="Betti matching", unit="tile", leave=False,
               disable=largest < MIN_PROGRESS_VOXELS)
    with bar:
        if workers == 1:
            rows = []
            for pred, label in zip(pred_tiles, label_tiles):
                rows.append(match_pair(pred, label))
                bar.update()
        else:
            if extension() is None:  # fail here with the reason, not in every worker
                raise VesuviusError(f"exact Betti matching is unavailable: {extension_status()}")
            context = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch's threads
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                rows = []
                for row in pool.map(match_pair, pred_tiles, label_tiles):
                    rows.append(row)
                    bar.update()
    return np.stack(rows)
