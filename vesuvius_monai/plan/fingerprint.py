"""The dataset's fingerprint for the planner: sizes, spacing, dtype, foreground / ignore shares, intensities."""

from __future__ import annotations

from typing import Any

import numpy as np

from vesuvius_monai.config import DataConfig
from vesuvius_monai.errors import VesuviusError


def dataset_fingerprint(data: DataConfig, max_voxels: int = 4_000_000) -> dict[str, Any]:
    """What the planner needs to know about the data, read lazily from at most ``max_voxels`` voxels.

    Returns a plain dict: ``n_train``, ``n_val``, ``shapes`` (z, y, x of each training fragment), ``min_shape``,
    ``median_shape``, ``spacing`` (median, z, y, x), ``dtype``, ``val_voxels`` (total voxels of the validation
    fragments), ``foreground_fraction`` and ``ignore_fraction`` (of the sampled label voxels),
    ``intensity`` (percentiles 0.5 / 50 / 99.5, mean and std of the sampled image voxels) and ``sampled_voxels``.
    """
    from vesuvius_monai.data.dataset import find_fragments, open_fragment, split_fragments
    from vesuvius_monai.data.readers import sample_regions

    splits = split_fragments(find_fragments(data), data)
    if not splits["train"]:
        raise VesuviusError("the data config leaves no training fragments to plan for")
    train = [open_fragment(f, data, check_labels=False) for f in splits["train"]]
    val = [open_fragment(f, data, check_labels=False) for f in splits["val"]]
    per_fragment = max(max_voxels // len(train), 32**3)
    counts, values = np.zeros(3, np.int64), []  # label 0 / 1 / ignore
    for fragment in train:
        for region in sample_regions(fragment.image.shape, per_fragment):
            values.append(fragment.image.read(region).ravel())
            if fragment.label is not None:
                label = fragment.label.read(region)
                counts += [np.sum(label == 0), np.sum(label == 1), np.sum(label == data.ignore_index)]
    sample = np.concatenate(values).astype(np.float64)
    shapes = [list(f.image.shape) for f in train]
    labelled = max(int(counts.sum()), 1)
    return {
        "n_train": len(train), "n_val": len(val), "shapes": shapes,
        "min_shape": [int(v) for v in np.min(shapes, axis=0)],
        "median_shape": [int(v) for v in np.median(shapes, axis=0)],
        "spacing": [float(v) for v in np.median([f.image.spacing for f in train], axis=0)],
        "dtype": str(train[0].image.dtype),
        "val_voxels": int(sum(int(np.prod(f.image.shape)) for f in val)),
        "foreground_fraction": float(counts[1] / labelled),
        "ignore_fraction": float(counts[2] / labelled),
        "intensity": {"p0.5": float(np.percentile(sample, 0.5)), "p50": float(np.percentile(sample, 50)),
                      "p99.5": float(np.percentile(sample, 99.5)), "mean": float(sample.mean()),
                      "std": float(sample.std())},
        "sampled_voxels": int(sample.size),
    }
