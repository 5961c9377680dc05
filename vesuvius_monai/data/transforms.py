"""MONAI transforms: intensity normalisation and the training augmentation pipeline.

Samples are dictionaries ``{"image": (1, Z, Y, X) float32, "label": (1, Z, Y, X) float32}`` with label
values 0, 1 and the ignore value. Spatial transforms act on both keys with one random draw, so image and
label stay aligned; intensity transforms touch the image only. Validation and inference apply
:func:`normalize` and nothing random.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRange,
)

from vesuvius_monai.config import TransformConfig
from vesuvius_monai.data.readers import Region, VolumeReader, format_region
from vesuvius_monai.errors import VesuviusError

KEYS = ("image", "label")


def normalize(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map the intensity window (low, high percentile of the fragment) to [0, 1], clipped; float32, same shape."""
    low, high = window
    scale = ScaleIntensityRange(a_min=low, a_max=max(high, low + 1e-6), b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(np.asarray(image, dtype=np.float32)))


def read_normalized(reader: VolumeReader, window: tuple[float, float], region: Region | None = None) -> np.ndarray:
    """Read a region (default: all) of a volume as float32 (Z, Y, X), check it is finite, normalise it."""
    return normalize(read_finite(reader, region), window)


def read_finite(reader: VolumeReader, region: Region | None = None, raw: np.ndarray | None = None) -> np.ndarray:
    """Read a region (default: all) of a volume as float32 (Z, Y, X), checked finite (VesuviusError naming it).
    ``raw``: the values of that region read already."""
    image = (reader.read(region) if raw is None else raw).astype(np.float32)
    if not np.isfinite(image).all():
        where = f" in region {format_region(region)}" if region is not None else ""
        raise VesuviusError(f"image {reader.path} holds NaN or inf values{where}")
    return image


def train_augmentations(cfg: TransformConfig) -> Compose:
    """Random flips on every axis, 90-degree rotations in the y-x plane, intensity scale/shift and noise."""
    transforms = []
    if cfg.flip_prob > 0:
        transforms += [RandFlipd(keys=KEYS, prob=cfg.flip_prob, spatial_axis=axis) for axis in (0, 1, 2)]
    if cfg.rot90_prob > 0:
        transforms.append(RandRotate90d(keys=KEYS, prob=cfg.rot90_prob, max_k=3, spatial_axes=(1, 2)))
    if cfg.intensity_prob > 0:
        transforms.append(RandScaleIntensityd(keys="image", factors=cfg.intensity_scale, prob=cfg.intensity_prob))
        transforms.append(RandShiftIntensityd(keys="image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.noise_prob > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=cfg.noise_prob, std=cfg.noise_std))
    return Compose(transforms)
