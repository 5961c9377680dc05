"""The post-processing chain on volumes larger than memory: block by block where it is local, whole otherwise.

Threshold, opening, closing (of the whole mask) and 2x2x2 plugging are local: a voxel's output depends on the
probabilities within :func:`halo` of it, so each block is computed from itself and that margin and equals the
whole-volume result (tested). Hysteresis, small-component removal, per-sheet closing, hole patching and cavity
filling need whole components: with any of them on, the volume is read into memory whole, and refused when it has
more than ``postprocess.max_whole_voxels`` voxels. :func:`write_mask_zarr` writes the mask of a finished Zarr
probability store as a uint8 Zarr store beside it.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from tqdm import tqdm

from vesuvius_monai.config import PostprocessConfig, to_dict
from vesuvius_monai.errors import VesuviusError, disk_errors
from vesuvius_monai.io.atomic import build_dir, check_replaceable
from vesuvius_monai.io.pyramid import build_levels
from vesuvius_monai.io.zarr_store import ARRAY_NAME, PredictionStore
from vesuvius_monai.postprocess.chain import apply_chain, check_prob
from vesuvius_monai.postprocess.operators import PLUG_PASSES

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]
Region = tuple[slice, slice, slice]
MASK_KIND = "postprocessed mask"
MASK_META = "vesuvius_mask"


def whole_keys(cfg: PostprocessConfig) -> list[str]:
    """The keys of ``cfg`` whose operators need the whole volume (connected components), in chain order."""
    on = {"hysteresis_high": cfg.hysteresis_high > 0,
          "close_per_sheet": cfg.close_per_sheet and max(cfg.close_radius) > 0,
          "min_size": cfg.min_size > 0, "patch_holes": cfg.patch_holes,
          "fill_holes_max": cfg.fill_holes_max > 0, "fill_voids": cfg.fill_voids}
    return [key for key, value in on.items() if value]


def halo(cfg: PostprocessConfig) -> Triple:
    """Per axis (z, y, x), how far a voxel's output reaches into the probabilities under the local chain: twice the
    opening's and the closing's radii (erosion and dilation each), plus :data:`PLUG_PASSES` with plugging."""
    plug = PLUG_PASSES if cfg.plug_holes else 0
    return tuple(2 * (o + c) + plug for o, c in zip(cfg.open_radius, cfg.close_radius))  # type: ignore[return-value]


def postprocess_blocks(read: Callable[[Region], np.ndarray], write: Callable[[Region, np.ndarray], None],
                       shape: Triple, cfg: PostprocessConfig, block: Triple, *, progress: bool = False) -> None:
    """Post-process a (Z, Y, X) volume of ``shape`` read by ``read(region) -> probabilities`` into
    ``write(region, bool mask)``, block by block (``block`` (z, y, x)) when the chain is local, else whole.

    The result equals :func:`vesuvius_monai.postprocess.postprocess` of the whole volume. A chain with an operator
    that needs whole components on a volume of more than ``cfg.max_whole_voxels`` voxels is a VesuviusError naming
    the key.
    """
    if whole_keys(cfg):
        check_whole(shape, cfg)
        whole = tuple(slice(0, n) for n in shape)
        write(whole, _chain(read(whole), cfg))  # type: ignore[arg-type]
        return
    margin = halo(cfg)
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    for start in tqdm(list(itertools.product(*starts)), desc="post-processing", disable=not progress):
        inner = tuple(slice(s, min(s + b, n)) for s, b, n in zip(start, block, shape))
        outer = tuple(slice(max(r.start - m, 0), min(r.stop + m, n)) for r, m, n in zip(inner, margin, shape))
        mask = _chain(read(outer), cfg)  # type: ignore[arg-type]
        write(inner, mask[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))])  # type: ignore[arg-type]


def check_whole(shape: Triple, cfg: PostprocessConfig) -> None:
    """Raise a VesuviusError naming the key when ``cfg`` needs the whole volume and ``shape`` has more voxels than
    ``cfg.max_whole_voxels``."""
    keys, voxels = whole_keys(cfg), math.prod(shape)
    if keys and voxels > cfg.max_whole_voxels:
        raise VesuviusError(f"config key 'postprocess.{keys[0]}' needs the whole volume in memory (connected "
                            f"components), and this one has {voxels} voxels, more than "
                            f"postprocess.max_whole_voxels = {cfg.max_whole_voxels}: turn "
                            f"{', '.join('postprocess.' + k for k in keys)} off or raise max_whole_voxels")


def check_mask_target(out: str | Path, shape: Triple, cfg: PostprocessConfig) -> None:
    """Before predicting: raise unless :func:`write_mask_zarr` could write ``out`` for a volume of ``shape``."""
    check_whole(shape, cfg)
    check_replaceable(out, MASK_KIND, "--mask")


def _chain(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    check_prob(prob)
    return apply_chain(prob, cfg)


def write_mask_zarr(probs: str | Path, out: str | Path, cfg: PostprocessConfig, *, progress: bool = True) -> Path:
    """Post-process the finished Zarr probability store ``probs`` into a uint8 (0 / 1) Zarr store ``out``.

    ``out`` has the chunks, spacing, affine and pyramid levels of ``probs`` (OME-Zarr 0.4; coarser levels the
    2x2x2 max) and records its
    source and the ``postprocess`` settings; it is built beside ``out`` and renamed in place when finished, and only
    an earlier mask written here is ever replaced.
    """
    store = PredictionStore.open(probs, mode="r")
    if not store.meta.get("complete"):
        raise VesuviusError(f"{probs}: prediction is not complete; finish it before post-processing")
    shape, chunks = tuple(store.array.shape), tuple(store.array.chunks)

    def build(work: Path) -> None:
        with disk_errors(Path(out)):
            group = zarr.open_group(str(work), mode="a", zarr_format=2)
            array = group.create_array(ARRAY_NAME, shape=shape, chunks=chunks, dtype="uint8", fill_value=0)
            multiscales = [{**m, "name": "mask"} for m in store.group.attrs["multiscales"]]
            group.attrs.update({"multiscales": multiscales, "affine": store.group.attrs["affine"],
                                MASK_META: {"source": str(Path(probs).resolve()), "postprocess": to_dict(cfg)}})

            def write(region: Region, mask: np.ndarray) -> None:
                array[region] = mask.astype(np.uint8)

            postprocess_blocks(store.read_probabilities, write, shape, cfg, chunks, progress=progress)  # type: ignore[arg-type]
            levels = len(multiscales[0]["datasets"])  # the probabilities' pyramid, each level the max of 2x2x2
            build_levels(group, work, levels, "max", lambda a: a, lambda a: a, progress)

    build_dir(out, MASK_KIND, build, name="--mask")
    log.info("wrote %s", out)
    return Path(out)
