"""Synthetic scroll fragments: seeded 3D volumes that look like a patch of a rolled Herculaneum scroll in
micro-CT, each with a voxel label of the papyrus sheets. This is the project's embedded default dataset.

All geometry is in voxels; arrays are (z, y, x). What a fragment contains:

* **Rolled papyrus.** One spiral sheet wound around a scroll axis parallel to z. Its centre (cy, cx) lies
  at a random distance ``scroll_radius * max(ny, nx)`` from the volume centre (outside the volume with the
  default range), so the sheets look gently curved, like a patch cut from a scroll. The sheet phase is
  ``u = (r + w) / pitch + spin * theta / (2 pi) + phase`` with ``pitch = sheet_thickness + sheet_gap``;
  mid-surfaces are where ``u`` is an integer, and successive turns are one pitch apart.
* **Warp.** ``w`` (voxels) is a smooth random displacement of the radius: a sum of separable
  low-frequency cosine modes (RMS ``warp_amplitude``, wavelength about ``warp_wavelength``), so sheets
  undulate in all three directions.
* **Compressed gaps.** Gaussian "compression" regions add ``c * (r - r_k) * G(p)`` to ``w``: locally the
  pitch shrinks to ``pitch / (1 + c)`` (about ``sheet_thickness``), so adjacent turns touch or merge, while
  the gaps just around the region open up a little, as in a real crushed scroll.
* **Label.** The distance to the nearest mid-surface is ``d = |u - round(u)| / |grad u|`` (grad u is
  computed analytically). Label 1 where ``d <= sheet_thickness / 2``, 0 elsewhere; then one or two boxes
  (``ignore_fraction`` of the volume in total) get ``ignore_index`` (the image there is normal).
* **Image.** Papyrus occupancy is ``clip(t/2 + 0.5 - d, 0, 1)`` (partial volume at the edge), so the blurred
  sheet edge sits where the label ends. Inside the sheets the intensity carries fibre texture: the inner
  half of each sheet has fibres along the scroll axis (z), the outer half fibres across it (along the
  sheet), from two periodic anisotropic noise textures looked up in sheet coordinates (arc, z), shifted
  per turn; each turn also has its own slight density. The air between sheets is dark with a little
  noise of its own, and a few bright specks (inclusions) are scattered through the volume. Then:
  Gaussian blur (``blur_sigma``), a slow multiplicative intensity drift across the volume
  (``drift_strength``), additive Gaussian noise (``noise_std``), clipping to [0, 1] and quantisation to
  ``dtype`` (intensities are fractions of the dtype's full range).

``make_fragment`` is deterministic: the same seed and params give bit-identical arrays.
``write_synthetic_dataset`` writes ``images/frag_XXX.<fmt>`` + ``labels/frag_XXX.<fmt>`` and ``synth.yaml``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml
from scipy import ndimage
from tqdm import tqdm

from vesuvius_monai.config import SynthParams, integer, require, to_dict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path, write_text
from vesuvius_monai.io.memory import check_memory
from vesuvius_monai.io.nifti import write_nifti

logger = logging.getLogger(__name__)

FORMATS = ("nii.gz", "nii", "tif")
TEXTURE_SIZE = 256  # periodic fibre texture, (z, arc) pixels
BYTES_PER_VOXEL = 40  # peak memory of make_fragment per voxel (float32 fields; tracemalloc: 32-35 B at 48^3-64^3)


# ---------------------------------------------------------------------------------------------------
# Separable fields: every smooth field here is a sum of outer products f_i(z) * F_i(y, x).
# ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Field:
    """Sum of separable terms ``f_i(z) F_i(y, x)`` for a value and its z, y, x derivatives.

    Each entry of ``terms`` maps "v", "z", "y", "x" to lists of (f: (nz,), F: (ny, nx)) pairs.
    """

    terms: dict[str, list[tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
        default_factory=lambda: {"v": [], "z": [], "y": [], "x": []})

    def add(self, key: str, f: np.ndarray, big_f: np.ndarray) -> None:
        """Append one term ``f (nz,) x F (ny, nx)`` to the value ("v") or a derivative ("z", "y", "x")."""
        self.terms[key].append((np.asarray(f, np.float32), np.asarray(big_f, np.float32)))

    def evaluate(self, key: str, shape: tuple[int, int, int]) -> np.ndarray:
        """The (z, y, x) float32 array of the value or a derivative (zeros when it has no terms)."""
        pairs = self.terms[key]
        if not pairs:
            return np.zeros(shape, np.float32)
        fz = np.stack([p[0] for p in pairs])  # (n, nz)
        fyx = np.stack([p[1].ravel() for p in pairs])  # (n, ny * nx)
        return (fz.T @ fyx).reshape(shape)


def _axes(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates along z, y, x as float32 vectors."""
    return tuple(np.arange(n, dtype=np.float32) for n in shape)  # type: ignore[return-value]


def _add_warp_modes(field: _Field, rng: np.random.Generator, shape: tuple[int, int, int],
                    params: SynthParams) -> None:
    """Add ``n_warp_modes`` products of cosines ``a cos(kz z + pz) cos(ky y + py) cos(kx x + px)``.

    Wave vectors have random directions and magnitudes 2 pi / (L * U(0.7, 1.4)); amplitudes give an
    RMS of ``warp_amplitude`` for the whole sum (each product of cosines has RMS (1/2)^(3/2)).
    """
    n = params.n_warp_modes
    if n == 0 or params.warp_amplitude == 0:
        return
    z, y, x = _axes(shape)
    amp = params.warp_amplitude / (0.5 ** 1.5 * math.sqrt(n))
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = direction * 2 * math.pi / (params.warp_wavelength * rng.uniform(0.7, 1.4))
        phase = rng.uniform(0, 2 * math.pi, size=3)
        cz, cy, cx = (np.cos(k[i] * c + phase[i]) for i, c in enumerate((z, y, x)))
        sz, sy, sx = (-k[i] * np.sin(k[i] * c + phase[i]) for i, c in enumerate((z, y, x)))
        field.add("v", amp * cz, np.outer(cy, cx))
        field.add("z", amp * sz, np.outer(cy, cx))
        field.add("y", amp * cz, np.outer(sy, cx))
        field.add("x", amp * cz, np.outer(cy, sx))


def _add_compressions(field: _Field, rng: np.random.Generator, shape: tuple[int, int, int],
                      params: SynthParams, r: np.ndarray, dr: tuple[np.ndarray, np.ndarray]) -> None:
    """Add compressed regions ``c (r - r_k) G(z, y, x)`` to the radial warp.

    ``r`` (ny, nx) is the distance to the scroll axis and ``dr`` its (d/dy, d/dx). At a region's centre
    d(w)/dr = c, so the local pitch is pitch / (1 + c); G is an isotropic Gaussian of sigma
    ``compression_radius``. c = compression_strength * U(0.7, 1.2).
    """
    count = int(round(params.compression_density * float(np.prod(shape)) / 1e6))
    if count == 0 or params.compression_strength == 0:
        return
    z, y, x = _axes(shape)
    sigma2 = params.compression_radius ** 2
    for _ in range(count):
        centre = [rng.uniform(0, n - 1) for n in shape]
        c = params.compression_strength * rng.uniform(0.7, 1.2)
        gz, gy, gx = (np.exp(-((a - m) ** 2) / (2 * sigma2)) for a, m in zip((z, y, x), centre))
        dgz, dgy, dgx = (-(a - m) / sigma2 * g for a, m, g in zip((z, y, x), centre, (gz, gy, gx)))
        rel = c * (r - r[int(round(centre[1])), int(round(centre[2]))])  # (ny, nx)
        field.add("v", gz, rel * np.outer(gy, gx))
        field.add("z", dgz, rel * np.outer(gy, gx))
        field.add("y", gz, c * dr[0] * np.outer(gy, gx) + rel * np.outer(dgy, gx))
        field.add("x", gz, c * dr[1] * np.outer(gy, gx) + rel * np.outer(gy, dgx))


@dataclass(kw_only=True)
class _Sheets:
    """Sheet geometry of one fragment, all (z, y, x) float32 except ``arc`` (ny, nx)."""

    distance: np.ndarray  # distance to the nearest mid-surface, voxels
    side: np.ndarray  # signed phase offset u - round(u), in [-0.5, 0.5]
    turn: np.ndarray  # integer turn index round(u), int32
    arc: np.ndarray  # (ny, nx) arc length along the sheets, voxels


def _sheet_geometry(rng: np.random.Generator, params: SynthParams) -> _Sheets:
    """Spiral sheet phase field and distance to the nearest sheet mid-surface for ``params.shape``."""
    shape = params.shape
    _, y, x = _axes(shape)
    ny, nx = shape[1], shape[2]
    pitch = params.sheet_thickness + params.sheet_gap
    lo, hi = params.scroll_radius
    radius = math.exp(rng.uniform(math.log(lo), math.log(hi))) * max(ny, nx)
    alpha = rng.uniform(0, 2 * math.pi)  # direction from the scroll axis to the volume centre
    cy = (ny - 1) / 2 - radius * math.sin(alpha)
    cx = (nx - 1) / 2 - radius * math.cos(alpha)
    dy, dx = np.meshgrid(y - cy, x - cx, indexing="ij")
    r = np.maximum(np.hypot(dy, dx), 1e-3)
    theta = np.arctan2(dy * math.cos(alpha) - dx * math.sin(alpha), dx * math.cos(alpha) + dy * math.sin(alpha))
    spin = rng.choice((-1.0, 1.0)) / (2 * math.pi)
    # u = (r + w) / pitch + spin * theta + phase; d(theta)/dy = dx / r^2, d(theta)/dx = -dy / r^2
    ones = np.ones(shape[0], np.float32)
    field = _Field()
    field.add("v", ones, r + pitch * (spin * theta + rng.uniform(0, 1)))
    field.add("y", ones, dy / r + pitch * spin * dx / r**2)
    field.add("x", ones, dx / r - pitch * spin * dy / r**2)
    _add_warp_modes(field, rng, shape, params)
    _add_compressions(field, rng, shape, params, r, (dy / r, dx / r))
    u = field.evaluate("v", shape)
    u /= pitch
    grad2 = np.zeros(shape, np.float32)
    for key in ("z", "y", "x"):
        grad2 += np.square(field.evaluate(key, shape) / pitch)
    turn = np.rint(u)
    side = u - turn
    distance = np.abs(side) / np.maximum(np.sqrt(grad2), 1e-3)
    return _Sheets(distance=distance, side=side, turn=turn.astype(np.int32), arc=(theta * radius).astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# Image formation
# ---------------------------------------------------------------------------------------------------


def _fibre_textures(rng: np.random.Generator, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Two periodic (TEXTURE_SIZE, TEXTURE_SIZE) unit-std textures over (z, arc).

    The first has fibres along z (long correlation in z), the second fibres along the arc.
    """
    out = []
    for sigma in ((length, 0.7), (0.7, length)):
        tex = ndimage.gaussian_filter(rng.standard_normal((TEXTURE_SIZE, TEXTURE_SIZE)), sigma, mode="wrap")
        out.append(((tex - tex.mean()) / tex.std()).astype(np.float32))
    return out[0], out[1]


def _papyrus_intensity(rng: np.random.Generator, sheets: _Sheets, params: SynthParams) -> np.ndarray:
    """(z, y, x) float32 papyrus intensity with fibre texture and per-turn density (valid inside sheets).

    Inner half of each turn (side < 0): fibres along z; outer half: fibres along the sheet.
    """
    along_z, across = _fibre_textures(rng, params.fibre_length)
    nz = params.shape[0]
    z_idx = (np.arange(nz) % TEXTURE_SIZE).astype(np.int32)[:, None, None] * TEXTURE_SIZE
    arc_idx = np.floor(sheets.arc).astype(np.int32)[None]
    flat = z_idx + (arc_idx + sheets.turn * 97) % TEXTURE_SIZE  # 97: shift the texture from turn to turn
    texture = np.where(sheets.side < 0, along_z.ravel()[flat], across.ravel()[flat])
    density = 1 + params.sheet_density_jitter * rng.standard_normal(64).astype(np.float32)
    texture *= params.fibre_strength
    texture += 1.0
    texture *= density[sheets.turn % 64]
    texture *= params.sheet_intensity
    return texture


def _add_specks(image: np.ndarray, rng: np.random.Generator, params: SynthParams) -> None:
    """Set small 6-connected crosses of ``speck_intensity`` at random positions, in place."""
    count = int(round(params.speck_density * image.size))
    if count == 0:
        return
    centres = [rng.integers(0, n, size=count) for n in image.shape]
    offsets = [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    for off in offsets:
        idx = tuple(np.clip(c + o, 0, n - 1) for c, o, n in zip(centres, off, image.shape))
        image[idx] = params.speck_intensity


def _drift(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """(z, y, x) float32 multiplicative drift: 1 + strength * (linear ramp + one slow cosine), in about
    1 +- strength."""
    z, y, x = (a / max(len(a) - 1, 1) - 0.5 for a in _axes(shape))
    slope = rng.normal(size=3)
    slope *= 1.2 / np.abs(slope).sum()  # ramp in [-0.6, 0.6]
    phase = rng.uniform(0, 2 * math.pi, size=3)
    field = _Field()
    ones_z, ones_yx = np.ones(shape[0], np.float32), np.ones(shape[1:], np.float32)
    field.add("v", slope[0] * z, ones_yx)
    field.add("v", ones_z, slope[1] * y[:, None] + slope[2] * x[None, :])
    field.add("v", 0.4 * np.cos(2 * z + phase[0]), np.outer(np.cos(2 * y + phase[1]), np.cos(2 * x + phase[2])))
    drift = field.evaluate("v", shape)
    drift *= strength
    drift += 1.0
    return drift


def _ignore_boxes(rng: np.random.Generator, shape: tuple[int, int, int], fraction: float) -> list[tuple[slice, ...]]:
    """One or two non-overlapping boxes covering about ``fraction`` of the volume (each in its own z slab)."""
    if fraction == 0:
        return []
    n_boxes = int(rng.integers(1, 3))
    boxes = []
    for i in range(n_boxes):
        slab = (shape[0] * i // n_boxes, shape[0] * (i + 1) // n_boxes)
        target = fraction / n_boxes * float(np.prod(shape))
        sz = int(rng.integers(max(1, (slab[1] - slab[0]) // 2), slab[1] - slab[0] + 1))
        sy = int(np.clip(round(shape[1] * rng.uniform(0.3, 0.7)), 1, shape[1]))
        sx = int(np.clip(round(target / (sz * sy)), 1, shape[2]))
        if sz * sy * sx < target * 0.8:  # x alone could not take the rest: grow y
            sy = int(np.clip(round(target / (sz * sx)), 1, shape[1]))
        z0 = int(rng.integers(slab[0], slab[1] - sz + 1))
        y0 = int(rng.integers(0, shape[1] - sy + 1))
        x0 = int(rng.integers(0, shape[2] - sx + 1))
        boxes.append((slice(z0, z0 + sz), slice(y0, y0 + sy), slice(x0, x0 + sx)))
    return boxes


def _quantise(image: np.ndarray, dtype: str) -> np.ndarray:
    """Clip a [0, 1] float image and scale it to the full range of ``dtype`` (rounded)."""
    top = np.iinfo(dtype).max
    np.clip(image, 0.0, 1.0, out=image)
    image *= top
    return np.rint(image).astype(dtype)


def _check_seed(seed: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """Return ``seed`` if it is an int >= 0 or a non-empty tuple of them, else raise VesuviusError."""
    parts = seed if isinstance(seed, tuple) else (seed,)
    require(len(parts) > 0, "synth.seed", "must be an integer >= 0 or a tuple of them, got ()")
    for part in parts:
        integer("synth.seed", part, 0)
    return seed


def make_fragment(seed: int | tuple[int, ...], params: SynthParams = SynthParams()) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic scroll fragment.

    ``seed`` is an int or a tuple of ints (numpy SeedSequence entropy); same seed and params give
    bit-identical output. Returns ``(image, label)``: image (z, y, x) of ``params.dtype``; label
    (z, y, x) uint8 with 0 background, 1 papyrus sheet, ``params.ignore_index`` unlabeled.
    """
    if not isinstance(params, SynthParams):
        raise VesuviusError(f"params must be a SynthParams, got {type(params).__name__}")
    check_memory(BYTES_PER_VOXEL * math.prod(params.shape), f"synth.params.shape {list(params.shape)}")
    rng = np.random.default_rng(_check_seed(seed))
    shape = params.shape
    sheets = _sheet_geometry(rng, params)
    half = params.sheet_thickness / 2
    label = (sheets.distance <= half).astype(np.uint8)
    occupancy = np.clip(half + 0.5 - sheets.distance, 0.0, 1.0)
    del sheets.distance
    image = _papyrus_intensity(rng, sheets, params)
    air = params.air_intensity + params.air_noise_std * rng.standard_normal(shape, dtype=np.float32)
    image -= air
    image *= occupancy
    image += air  # occupancy * papyrus + (1 - occupancy) * air
    del air, occupancy, sheets
    _add_specks(image, rng, params)
    if params.blur_sigma > 0:
        image = ndimage.gaussian_filter(image, params.blur_sigma, mode="reflect")
    image *= _drift(rng, shape, params.drift_strength)
    image += params.noise_std * rng.standard_normal(shape, dtype=np.float32)
    for box in _ignore_boxes(rng, shape, params.ignore_fraction):
        label[box] = params.ignore_index
    return _quantise(image, params.dtype), label


# ---------------------------------------------------------------------------------------------------
# Writing a dataset
# ---------------------------------------------------------------------------------------------------


def _write_tif(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a (z, y, x) array as one ImageJ multi-page TIFF (pages = z) atomically, spacing in metadata."""
    sz, sy, sx = spacing
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, imagej=True, resolution=(1.0 / sx, 1.0 / sy),
                         metadata={"axes": "ZYX", "spacing": sz, "unit": "mm"})


def _write_volume(path: Path, array: np.ndarray, params: SynthParams) -> None:
    """Write one (z, y, x) volume in the format given by ``path``'s suffix."""
    if path.suffix == ".tif":
        _write_tif(path, array, params.spacing)
    else:
        write_nifti(path, array, spacing=params.spacing)


def write_synthetic_dataset(out_dir: str | os.PathLike, n: int, *, seed: int = 0,
                            params: SynthParams = SynthParams(), fmt: str = "nii.gz") -> list[tuple[Path, Path]]:
    """Write ``n`` fragments as ``out_dir/images/frag_000.<fmt>`` and ``out_dir/labels/frag_000.<fmt>``, ...

    Fragment i is ``make_fragment((seed, i), params)``. ``fmt`` is "nii.gz", "nii" (NIfTI, file axes
    (x, y, z), affine diag(sx, sy, sz, 1)) or "tif" (one ImageJ multi-page TIFF, pages = z). Every
    file, and ``out_dir/synth.yaml`` recording n, seed, fmt and params, is written atomically.
    Returns the (image_path, label_path) pairs in fragment order.
    """
    if fmt not in FORMATS:
        raise VesuviusError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    integer("n (synth.n_fragments)", n, 1)
    integer("synth.seed", seed, 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VesuviusError(f"{out}: output directory for synthetic data is an existing file")
    pairs = []
    for i in tqdm(range(n), desc="synthetic fragments", leave=False):
        image, label = make_fragment((int(seed), i), params)
        pair = (out / "images" / f"frag_{i:03d}.{fmt}", out / "labels" / f"frag_{i:03d}.{fmt}")
        _write_volume(pair[0], image, params)
        _write_volume(pair[1], label, params)
        pairs.append(pair)
    record = {"generator": __name__, "n": int(n), "seed": int(seed), "fmt": fmt, "params": to_dict(params)}
    write_text(out / "synth.yaml", yaml.safe_dump(record, sort_keys=False))
    logger.info("wrote %d synthetic fragments of shape %s to %s", n, params.shape, out)
    return pairs
