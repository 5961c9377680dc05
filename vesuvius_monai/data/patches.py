"""Lazy, foreground-balanced patch sampling for training.

Patches are read from disk region by region (only the chunks a patch touches), so a training set larger
than memory trains in bounded memory. A share ``pos_fraction`` of patches is centred on a surface voxel
drawn from a small precomputed index of surface locations per fragment (cached), the rest anywhere.

Item ``i`` depends only on ``(seed, i)``: the batch of step ``s`` is items ``s*B .. s*B+B-1`` whatever
happened before, which is what makes resuming a run exact. With ``W`` data-parallel processes of batch ``b``,
the global batch of a step is ``W*b`` consecutive items and process ``r`` takes the ``r``-th run of ``b``
(:func:`rank_items`), so ``W`` processes of batch ``b`` see exactly the patches of one process of batch ``W*b``
and no two processes share a patch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vesuvius_monai.config import TransformConfig
from vesuvius_monai.data.dataset import Fragment
from vesuvius_monai.data.fg_index import check_training_labels, load_or_build_foreground_index
from vesuvius_monai.data.readers import sample_percentiles
from vesuvius_monai.data.transforms import read_normalized, train_augmentations
from vesuvius_monai.errors import VesuviusError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PatchSource:
    """A labelled fragment ready for sampling: its intensity window and surface index (N, 3) (z, y, x)."""

    fragment: Fragment
    window: tuple[float, float]
    surface: np.ndarray


def prepare_sources(fragments: list[Fragment], cfg: TransformConfig, cache_dir: Path,
                    ignore_index: int = 2) -> list[PatchSource]:
    """Intensity windows and surface indices for every labelled fragment (indices cached in ``cache_dir``).

    Building an index also checks the label's values (0, 1, ``ignore_index``), once per label file.
    """
    sources = []
    for fragment in fragments:
        if fragment.label is None:
            raise VesuviusError(f"training fragment {fragment.image.path} has no label")
        window = sample_percentiles(fragment.image, q=cfg.percentiles)
        surface = load_or_build_foreground_index(fragment.label, cache_dir, allowed=(0, 1, ignore_index))
        log.info("fragment %s: window %.1f..%.1f, %d surface points indexed", fragment.id, *window, len(surface))
        sources.append(PatchSource(fragment=fragment, window=window, surface=surface))
    check_training_labels([f.label for f in fragments], sum(len(s.surface) for s in sources))
    return sources


def rank_items(first_item: int, steps: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Item indices one process reads for ``steps`` steps, in order, when the first step's global batch starts at
    item ``first_item``: per step ``world_size * batch_size`` consecutive items, of which process ``rank`` takes
    ``batch_size`` starting at ``rank * batch_size``."""
    if not 0 <= rank < world_size or batch_size < 1 or steps < 0 or first_item < 0:
        raise VesuviusError(f"bad item range: first_item={first_item}, steps={steps}, batch_size={batch_size}, "
                            f"rank={rank}, world_size={world_size}")
    global_batch = world_size * batch_size
    return [first_item + step * global_batch + rank * batch_size + k
            for step in range(steps) for k in range(batch_size)]


def patch_region(shape: tuple[int, ...], patch: tuple[int, ...], centre: np.ndarray) -> tuple[slice, ...]:
    """The patch-sized region around ``centre``, shifted to lie inside the volume where it fits."""
    starts = [int(np.clip(c - p // 2, 0, max(s - p, 0))) for s, p, c in zip(shape, patch, centre)]
    return tuple(slice(start, min(start + p, s)) for start, p, s in zip(starts, patch, shape))


def pad_to(array: np.ndarray, patch: tuple[int, ...], value: float) -> np.ndarray:
    """Pad (at the end of each axis) a (Z, Y, X) array smaller than ``patch`` with ``value``."""
    pad = [(0, max(p - s, 0)) for s, p in zip(array.shape, patch)]
    return np.pad(array, pad, constant_values=value) if any(after for _, after in pad) else array


class PatchDataset(Dataset):
    """Random training patches. Item ``i`` -> ``{"image": (1, *patch) float32, "label": (1, *patch) float32}``.

    Label values: 0 background, 1 surface, ``ignore_index`` unlabeled (also used for padding at borders).
    """

    def __init__(self, sources: list[PatchSource], cfg: TransformConfig, *, seed: int, length: int, ignore_index: int):
        if not sources:
            raise VesuviusError("no training fragments to sample patches from")
        self.sources = sources
        self.cfg = cfg
        self.seed = seed
        self.length = length
        self.ignore_index = ignore_index
        self.augment = train_augmentations(cfg)
        sizes = np.array([np.prod(s.fragment.image.shape, dtype=np.float64) for s in sources])
        self.weights = sizes / sizes.sum()  # fragments drawn in proportion to their volume

    def __len__(self) -> int:
        return self.length

    def sample_centre(self, source: PatchSource, rng: np.random.Generator) -> np.ndarray:
        """A surface voxel with probability ``pos_fraction``, else any voxel: (z, y, x)."""
        if len(source.surface) and rng.random() < self.cfg.pos_fraction:
            return source.surface[rng.integers(len(source.surface))]
        return np.array([rng.integers(s) for s in source.fragment.image.shape])

    def _read(self, source: PatchSource, region: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        image = read_normalized(source.fragment.image, source.window, region)
        label = source.fragment.label.read(region)
        patch = self.cfg.patch_size
        image = pad_to(image, patch, 0.0)
        label = pad_to(label.astype(np.float32), patch, float(self.ignore_index))
        return image, label

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        source = self.sources[rng.choice(len(self.sources), p=self.weights)]
        region = patch_region(source.fragment.image.shape, self.cfg.patch_size, self.sample_centre(source, rng))
        image, label = self._read(source, region)
        self.augment.set_random_state(seed=int(rng.integers(2**31)))
        sample = self.augment({"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None])})
        return {key: torch.as_tensor(sample[key]).as_subclass(torch.Tensor).contiguous() for key in ("image", "label")}
