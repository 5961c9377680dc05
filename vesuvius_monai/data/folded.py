"""The folded-sheet generator: a second, structurally different source of synthetic fragments.

:func:`make_folded_fragment` draws a stack of sheets given as height fields over a plane at a random orientation,
folded by a shared undulation and a tanh fold, squeezed together in places until they touch, with per-sheet
thickness and smooth gap variation, holes and sheets that end inside the volume; a 3D texture with fibres along a
random in-sheet direction, filler material between sheets, anisotropic blur, CT ring and streak artefacts,
signal-dependent (Poisson-like) noise, unlabeled balls and whole unlabeled sheets, uint16 by default.
Arrays are (z, y, x); labels are 0 background, 1 sheet, ``ignore_index`` (2) unlabeled. The benchmark families
(``bench/families.py``) draw every other fragment from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vesuvius_monai.config import Triple, check_fields, choice, finite, require
from vesuvius_monai.errors import VesuviusError


@dataclass(frozen=True, kw_only=True)
class FoldedParams:
    """Parameters of :func:`make_folded_fragment`. Lengths in voxels, intensities in fractions of full scale."""

    shape: Triple = (96, 96, 96)  # (z, y, x), every size >= 8
    sheet_thickness: float = 5.0  # mean labelled thickness (along s, see _stack_geometry)
    thickness_jitter: float = 0.15  # relative std of each sheet's thickness
    sheet_gap: float = 4.0  # mean free gap between neighbouring sheets
    gap_jitter: float = 0.3  # relative amplitude of the smooth gap variation along a sheet
    fold_amplitude: float = 4.0  # RMS of the shared undulation of the stack
    fold_wavelength: float = 56.0  # typical wavelength of the undulation
    fold_height: float = 6.0  # height of one tanh fold across the stack
    squeeze: float = 0.6  # the sheet pitch shrinks by this fraction at the centre of a squeezed region
    squeeze_regions: int = 2  # squeezed regions per 96^3 (scaled with the volume)
    squeeze_radius: float = 14.0  # Gaussian sigma of a squeezed region
    hole_fraction: float = 0.03  # area fraction of each sheet cut out as holes
    end_probability: float = 0.25  # chance that a sheet ends inside the volume
    sheet_intensity: float = 0.5
    between_intensity: float = 0.15  # filler material between sheets
    intensity_jitter: float = 0.12  # relative std of each sheet's density
    texture_strength: float = 0.25  # relative std of the texture inside sheets
    texture_length: float = 4.0  # texture correlation length along its fibre direction
    blur_sigma: tuple[float, float, float] = (1.1, 0.7, 0.7)  # anisotropic (z, y, x)
    noise_std: float = 0.04  # additive Gaussian noise
    photons: float = 150.0  # signal-dependent noise of variance image / photons; 0 disables it
    ring_strength: float = 0.04  # CT ring artefacts around an axis parallel to z
    streaks: int = 3  # CT streak artefacts (lines in y-x planes over a range of z)
    streak_strength: float = 0.12
    ignore_sheet_fraction: float = 0.0  # chance that a sheet is left unlabeled (its whole slab becomes ignore)
    ignore_blob_fraction: float = 0.03  # volume fraction in unlabeled balls
    ignore_index: int = 2
    dtype: str = "uint16"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        key = "folded"
        check_fields(self, key)
        require(min(self.shape) >= 8, f"{key}.shape", f"every size must be >= 8, got {self.shape}")
        for name in ("sheet_thickness", "fold_wavelength", "squeeze_radius", "texture_length"):
            finite(f"{key}.{name}", getattr(self, name), 0.0, open_low=True)
        for name in ("thickness_jitter", "sheet_gap", "gap_jitter", "fold_amplitude", "fold_height",
                     "sheet_intensity", "between_intensity", "intensity_jitter", "texture_strength", "noise_std",
                     "photons", "ring_strength", "streak_strength"):
            finite(f"{key}.{name}", getattr(self, name), 0.0)
        for name in ("squeeze", "hole_fraction", "end_probability", "ignore_sheet_fraction"):
            finite(f"{key}.{name}", getattr(self, name), 0.0, 1.0)
        finite(f"{key}.ignore_blob_fraction", self.ignore_blob_fraction, 0.0, 0.5)
        for name in ("squeeze_regions", "streaks"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        for value in self.blur_sigma:
            finite(f"{key}.blur_sigma", value, 0.0)
        require(2 <= self.ignore_index <= 255, f"{key}.ignore_index", f"must be in 2..255, got {self.ignore_index}")
        choice(f"{key}.dtype", self.dtype, ("uint8", "uint16"))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _smooth_noise_2d(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) float32 Gaussian-filtered white noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return ((field - field.mean()) / max(field.std(), 1e-9)).astype(np.float32)


def _undulation(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, params: FoldedParams) -> np.ndarray:
    """Shared height H(a, b) of the stack: random cosines of RMS ``fold_amplitude`` plus one tanh fold."""
    height = np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32)
    n_modes = 6
    for _ in range(n_modes):
        angle = rng.uniform(0, 2 * math.pi)
        k = 2 * math.pi / (params.fold_wavelength * rng.uniform(0.7, 1.4))
        height += np.cos(k * (a * math.cos(angle) + b * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    height *= params.fold_amplitude * math.sqrt(2.0 / n_modes)
    angle, width = rng.uniform(0, 2 * math.pi), rng.uniform(10.0, 20.0)
    offset = rng.uniform(-0.25, 0.25) * params.shape[1]
    height += params.fold_height * np.tanh((a * math.cos(angle) + b * math.sin(angle) - offset) / width)
    return height


@dataclass(frozen=True)
class _Squeeze:
    """A squeezed region: sheets are pulled toward s = s0 near (a0, b0), so gaps there shrink by up to ``strength``."""

    s0: float
    a0: float
    b0: float
    strength: float
    sigma_ab: float
    sigma_s: float

    def displace(self, s: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """D(s, a, b) = -strength G(a, b) (s - s0) exp(-(s - s0)^2 / (2 sigma_s^2)), G a unit Gaussian bump.

        dD/ds = -strength at the centre (the local pitch shrinks by that fraction), D -> 0 far away, so sheets are
        pressed together locally without shifting the rest of the stack.
        """
        bump = np.exp(-((a - self.a0) ** 2 + (b - self.b0) ** 2) / (2 * self.sigma_ab**2))
        rel = s - self.s0
        return -self.strength * bump * rel * np.exp(-(rel**2) / (2 * self.sigma_s**2))


def _squeezes(rng: np.random.Generator, params: FoldedParams) -> list[_Squeeze]:
    """``squeeze_regions`` per 96^3 (scaled with the volume) squeezed regions centred inside the visible volume."""
    count = int(round(params.squeeze_regions * float(np.prod(params.shape)) / 96.0**3))
    reach = 0.35 * min(params.shape)
    return [_Squeeze(*(float(v) for v in rng.uniform(-reach, reach, size=3)),
                     strength=params.squeeze * float(rng.uniform(0.85, 1.0)), sigma_ab=params.squeeze_radius,
                     sigma_s=0.6 * params.squeeze_radius) for _ in range(count)] if params.squeeze > 0 else []


def _presence(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, params: FoldedParams) -> np.ndarray:
    """Where one sheet exists over the (a, b) grid: holes (top ``hole_fraction`` of a smooth field) and maybe an end."""
    size = a.shape[0]
    present = np.ones((size, size), bool)
    if params.hole_fraction > 0:
        field = _smooth_noise_2d(rng, size, 4.0)
        present &= field < np.quantile(field, 1 - params.hole_fraction)
    if rng.uniform() < params.end_probability:
        angle = rng.uniform(0, 2 * math.pi)
        edge = rng.uniform(-0.3, 0.3) * min(params.shape)
        wiggle = 3.0 * _smooth_noise_2d(rng, size, 8.0)
        present &= (a * math.cos(angle) + b * math.sin(angle) + wiggle) > edge
    return present


@dataclass(kw_only=True)
class _Stack:
    """Sheet-space geometry on an (s, a, b) grid of side ``size`` centred on the volume centre."""

    margin: np.ndarray  # (size,)*3 float32: min over sheets of the signed distance to the sheet's edge
    nearest: np.ndarray  # (size,)*3 int16: index of the sheet that gives the margin (-1: none)
    n_sheets: int


def _stack_geometry(rng: np.random.Generator, params: FoldedParams, size: int) -> _Stack:
    """Stack sheets along s until the grid is covered; record each voxel's margin and nearest sheet.

    Sheet k's mid-surface is s = c_k(a, b): first c_k = c_{k-1} + t_{k-1}/2 + gap_{k-1}(a, b) + t_k/2 on top of the
    shared undulation, then every squeezed region displaces it by D(c_k, a, b) (see :class:`_Squeeze`); sheets never
    cross (c_k >= c_{k-1} is kept) and touch or merge where the squeeze closes a gap. Thickness and gaps are measured
    along s ("similar folds": sheets thin out on steep flanks); the margin is the signed distance to the sheet's edge
    across it, (|s - c_k| - t_k / 2) / sqrt(1 + |grad c_k|^2), negative inside.
    """
    half = (size - 1) / 2
    axis = np.arange(size, dtype=np.float32) - half
    a, b = np.meshgrid(axis, axis, indexing="ij")
    height = _undulation(rng, a, b, params)
    squeezes = _squeezes(rng, params)
    reach = max([q.strength * q.sigma_s for q in squeezes], default=0.0) * len(squeezes)
    margin = np.full((size,) * 3, np.inf, np.float32)
    nearest = np.full((size,) * 3, -1, np.int16)
    thickness = params.sheet_thickness * max(1 + params.thickness_jitter * rng.standard_normal(), 0.3)
    base = height - half - float(height.max() - height.min()) - thickness - reach - 2
    previous = np.full_like(base, -np.inf)
    k = 0
    while float((base - thickness / 2).min()) <= half + reach + 1 and k < 2000:
        centre = base + sum((q.displace(base, a, b) for q in squeezes), np.zeros_like(base))
        centre = np.maximum(centre, previous)
        previous = centre
        present = _presence(rng, a, b, params)
        grad_a, grad_b = np.gradient(centre)
        stretch = np.sqrt(1 + grad_a**2 + grad_b**2)
        lo = max(int(math.floor(float(centre.min()) - thickness - 2 + half)), 0)
        hi = min(int(math.ceil(float(centre.max()) + thickness + 2 + half)) + 1, size)
        if lo < hi:
            s = axis[lo:hi, None, None]
            m = (np.abs(s - centre[None]) - thickness / 2) / stretch[None]
            m[:, ~present] = np.inf
            better = m < margin[lo:hi]
            margin[lo:hi][better] = m[better]
            nearest[lo:hi][better] = k
        jitter = np.maximum(1 + params.gap_jitter * _smooth_noise_2d(rng, size, 12.0), 0.2)
        following = params.sheet_thickness * max(1 + params.thickness_jitter * rng.standard_normal(), 0.3)
        base = base + thickness / 2 + params.sheet_gap * jitter + following / 2
        thickness = following
        k += 1
    return _Stack(margin=margin, nearest=nearest, n_sheets=k)


def _ct_artefacts(rng: np.random.Generator, shape: tuple[int, int, int], params: FoldedParams) -> np.ndarray:
    """(z, y, x) float32 additive rings (around an axis parallel to z) and streaks (lines in y-x planes)."""
    nz, ny, nx = shape
    y, x = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
    cy, cx = rng.uniform(-0.5, 1.5) * ny, rng.uniform(-0.5, 1.5) * nx
    r = np.hypot(y - cy, x - cx)
    rings = np.zeros((ny, nx), np.float32)
    for radius in rng.uniform(0, float(r.max()), size=10):
        rings += params.ring_strength * rng.standard_normal() * np.exp(-((r - radius) ** 2) / (2 * 0.6**2))
    out = np.broadcast_to(rings, shape).copy()
    for _ in range(params.streaks):
        angle = rng.uniform(0, math.pi)
        py, px = rng.uniform(0, ny), rng.uniform(0, nx)
        dist = np.abs((y - py) * math.cos(angle) - (x - px) * math.sin(angle))
        line = params.streak_strength * rng.choice((-1.0, 1.0)) * np.exp(-(dist**2) / 2)
        z0 = int(rng.integers(0, nz))
        out[z0:z0 + int(rng.integers(1, max(2, nz // 4)))] += line
    return out


def _ignore_balls(rng: np.random.Generator, shape: tuple[int, int, int], fraction: float) -> np.ndarray:
    """(z, y, x) bool: random balls (radius 5-12 voxels) until about ``fraction`` of the volume is covered."""
    mask = np.zeros(shape, bool)
    if fraction == 0:
        return mask
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    target = fraction * mask.size
    for _ in range(1000):
        if mask.sum() >= target:
            break
        centre = [rng.uniform(0, n) for n in shape]
        radius = rng.uniform(5.0, 12.0)
        mask |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    return mask


def make_folded_fragment(seed: int | tuple[int, ...], params: FoldedParams = FoldedParams()
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Generate one folded-stack fragment: ``(image, label)``, image (z, y, x) of ``params.dtype``, label (z, y, x)
    uint8 with 0 background, 1 sheet, ``params.ignore_index`` unlabeled. Same seed and params: bit-identical output.
    """
    if not isinstance(params, FoldedParams):
        raise VesuviusError(f"params must be a FoldedParams, got {type(params).__name__}")
    rng = np.random.default_rng(seed)
    shape = params.shape
    size = int(math.ceil(math.sqrt(sum(n * n for n in shape)))) + 4
    stack = _stack_geometry(rng, params, size)
    rotation = _rotation(rng)
    centred = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape]
    zyx = np.stack(np.meshgrid(*centred, indexing="ij")).reshape(3, -1)
    coords = rotation @ zyx + (size - 1) / 2  # (s, a, b) grid indices of every voxel
    margin = ndimage.map_coordinates(stack.margin, coords, order=1, mode="nearest").reshape(shape)
    nearest = ndimage.map_coordinates(stack.nearest, coords, order=0, mode="nearest").reshape(shape)
    texture = ndimage.gaussian_filter(rng.standard_normal((size,) * 3, dtype=np.float32),
                                      (0.8, params.texture_length, 0.8))  # fibres along a, in the sheet plane
    texture /= max(float(texture.std()), 1e-9)
    texture = ndimage.map_coordinates(texture, coords, order=1, mode="nearest").reshape(shape)
    del coords, zyx
    label = (margin <= 0).astype(np.uint8)
    occupancy = np.clip(0.5 - margin, 0.0, 1.0)
    density = 1 + params.intensity_jitter * rng.standard_normal(stack.n_sheets + 1).astype(np.float32)
    sheet = params.sheet_intensity * density[np.maximum(nearest, 0)] * (1 + params.texture_strength * texture)
    image = params.between_intensity + occupancy * (sheet - params.between_intensity)
    image = ndimage.gaussian_filter(image, params.blur_sigma, mode="reflect")
    image += _ct_artefacts(rng, shape, params)
    if params.photons > 0:
        image += np.sqrt(np.clip(image, 0, None) / params.photons) * rng.standard_normal(shape, dtype=np.float32)
    image += params.noise_std * rng.standard_normal(shape, dtype=np.float32)
    unlabeled = np.flatnonzero(rng.uniform(size=stack.n_sheets) < params.ignore_sheet_fraction)
    ignore = np.isin(nearest, unlabeled) | _ignore_balls(rng, shape, params.ignore_blob_fraction)
    label[ignore] = params.ignore_index
    top = np.iinfo(params.dtype).max
    return np.rint(np.clip(image, 0.0, 1.0) * top).astype(params.dtype), label
