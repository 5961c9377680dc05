"""Benchmark families: held-out synthetic data, harder and more varied than the demo's, to judge recipes.

Benchmark code (``bench_recipes.py`` writes and reads them, ``bench_nnunet.py`` trains on the same fragments), never
used for the demo or to pick its settings. Each family stresses one thing a recipe can fail at:

=============== ==============================================================================================
family          what it stresses (the measured property that defines it, see :func:`measure_fragment`)
=============== ==============================================================================================
packed          sheets 1-2 voxels apart (``gap``: mean free gap between sheets)
touching        sheets pressed together until they touch and merge (``merged_fraction``)
thin            sheets 2-3 voxels thick (``thickness``: mean sheet thickness)
low_contrast    low contrast and strong noise (``cnr``: contrast-to-noise ratio)
fibre           strong fibre texture inside the sheets (``core_cov``: intensity variation inside sheets)
ignore          large unlabeled regions (``ignore_fraction``)
=============== ==============================================================================================

Every family draws its fragments from two structurally different generators, alternately:

* ``spiral``: the demo's generator (:func:`vesuvius_monai.data.synthetic.make_fragment`) with the family's
  parameters: one warped spiral of sheets around an axis outside the volume, fibre texture in sheet coordinates,
  isotropic blur, Gaussian noise, multiplicative drift, unlabeled boxes, uint8.
* ``folded``: :func:`vesuvius_monai.data.folded.make_folded_fragment` with the family's parameters: folded,
  squeezed stacks of height-field sheets with holes and ends, fibre texture, anisotropic blur, CT ring and streak
  artefacts, signal-dependent noise, unlabeled balls and sheets, uint16.

:func:`write_families` writes ``images/ID.nii`` + ``labels/ID.nii`` (uncompressed, so training reads regions fast)
and ``dataset.yaml`` with an explicit train / val / test split per family (every family has held-out test fragments
from both generators; the train split mixes all families), plus each fragment's family, generator and measured
properties. Arrays are (z, y, x); labels are 0 background, 1 sheet, ``ignore_index`` (2) unlabeled.
Fragments are deterministic per (seed, family, index), and differ from the demo's for every seed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import ndimage
from tqdm import tqdm

from vesuvius_monai.config import SynthParams, Triple, choice, require, to_dict
from vesuvius_monai.data.folded import FoldedParams, make_folded_fragment
from vesuvius_monai.data.synthetic import make_fragment
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import build_dir
from vesuvius_monai.io.nifti import write_nifti

log = logging.getLogger(__name__)

GENERATORS = ("spiral", "folded")
FORMATS = ("nii", "nii.gz")
OUTPUT_KIND = "benchmark families"
SEED_OFFSET = 7001  # family seeds are (seed, SEED_OFFSET + family number, index): never a demo fragment's seed
# the writer's name in dataset.yaml, as written before this module moved from vesuvius_monai/data/ to bench/:
# data sets written then compare equal and are reused
RECORD_GENERATOR = "vesuvius_monai.data.families"


# ---------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Family:
    """One benchmark family: what it stresses, the measured property that defines it, and each generator's
    parameter overrides (``spiral``: SynthParams fields, ``folded``: FoldedParams fields)."""

    name: str
    stresses: str
    property: str  # key of measure_fragment's result
    spiral: dict[str, Any]
    folded: dict[str, Any]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="packed", stresses="tightly packed sheets, 1-2 voxel gaps", property="gap",
           spiral={"sheet_thickness": 4.0, "sheet_gap": 1.5, "compression_density": 0.0, "warp_amplitude": 1.0},
           folded={"sheet_thickness": 4.0, "sheet_gap": 1.5, "gap_jitter": 0.2, "squeeze": 0.0}),
    Family(name="touching", stresses="touching and compressed sheets that merge", property="merged_fraction",
           spiral={"sheet_gap": 3.0, "compression_density": 12.0, "compression_strength": 1.3,
                   "compression_radius": 12.0},
           folded={"sheet_gap": 3.0, "squeeze": 1.0, "squeeze_regions": 10, "squeeze_radius": 16.0}),
    Family(name="thin", stresses="thin sheets, 2-3 voxels", property="thickness",
           spiral={"sheet_thickness": 2.5, "sheet_gap": 4.0},
           folded={"sheet_thickness": 3.0, "thickness_jitter": 0.1}),
    Family(name="low_contrast", stresses="low contrast and strong noise", property="cnr",
           spiral={"sheet_intensity": 0.32, "air_intensity": 0.2, "noise_std": 0.2, "air_noise_std": 0.15},
           folded={"sheet_intensity": 0.32, "between_intensity": 0.22, "noise_std": 0.1, "photons": 40.0}),
    Family(name="fibre", stresses="strong fibre texture inside the sheets", property="core_cov",
           spiral={"fibre_strength": 1.0, "fibre_length": 10.0, "sheet_density_jitter": 0.25},
           folded={"texture_strength": 0.9, "texture_length": 8.0, "intensity_jitter": 0.25}),
    Family(name="ignore", stresses="large unlabeled regions (label 2)", property="ignore_fraction",
           spiral={"ignore_fraction": 0.35},
           folded={"ignore_sheet_fraction": 0.25, "ignore_blob_fraction": 0.12}),
)}
FAMILY_NAMES = tuple(FAMILIES)


def check_families(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as a list of distinct known family names, or a VesuviusError with a did-you-mean hint."""
    for name in names:
        choice("families", name, FAMILY_NAMES)
    require(len(names) > 0 and len(set(names)) == len(names), "families",
            f"need distinct family names, got {list(names)}")
    return list(names)


def generator_of(family: str, index: int) -> str:
    """Generator of fragment ``index`` of ``family``: they alternate, shifted by the family's number."""
    return GENERATORS[(index + FAMILY_NAMES.index(family)) % len(GENERATORS)]


def family_params(family: str, generator: str, shape: Triple = (96, 96, 96)) -> SynthParams | FoldedParams:
    """The generator's parameters for ``family`` (a known name) at ``shape``; ``generator`` one of GENERATORS."""
    spec = FAMILIES[family]
    if generator == "spiral":
        return SynthParams(**{**spec.spiral, "shape": tuple(shape)})
    return FoldedParams(**{**spec.folded, "shape": tuple(shape)})


def make_family_fragment(family: str, index: int, *, seed: int = 0, shape: Triple = (96, 96, 96)
                         ) -> tuple[np.ndarray, np.ndarray, str]:
    """Fragment ``index`` of ``family``: ``(image, label, generator name)``; deterministic per (seed, family, index)."""
    check_families([family])
    require(isinstance(index, int) and index >= 0, "index", f"must be an integer >= 0, got {index!r}")
    require(isinstance(seed, int) and seed >= 0, "seed", f"must be an integer >= 0, got {seed!r}")
    generator = generator_of(family, index)
    params = family_params(family, generator, shape)
    entropy = (seed, SEED_OFFSET + FAMILY_NAMES.index(family), index)
    if generator == "spiral":
        image, label = make_fragment(entropy, params)
    else:
        image, label = make_folded_fragment(entropy, params)
    return image, label, generator


# ---------------------------------------------------------------------------------------------------
# Measured properties
# ---------------------------------------------------------------------------------------------------


def _depth(mask: np.ndarray, blocked: np.ndarray, border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(d, valid): d = Euclidean distance of every voxel of ``mask`` (z, y, x) to the nearest voxel outside it;
    valid = voxels of ``mask`` farther than 2 voxels from ``blocked`` (e.g. the ignore region, whose content is
    unknown) and than ``border`` voxels from the volume's faces."""
    dist = ndimage.distance_transform_edt(mask)
    valid = mask.copy()
    if blocked.any():
        valid &= ~ndimage.binary_dilation(blocked, iterations=2)
    inner = np.zeros_like(valid)
    inner[tuple(slice(border, max(border, n - border)) for n in mask.shape)] = True
    return dist, valid & inner


def ridge_widths(mask: np.ndarray, blocked: np.ndarray, border: int = 2) -> np.ndarray:
    """Local widths (voxels) of the structures of ``mask`` (z, y, x): ``2 d - 1`` at ridge voxels, where d is the
    Euclidean distance to the nearest voxel outside ``mask`` and ridge voxels are local maxima of d (3^3).

    A slab of odd width T gives T exactly, an even one T - 1 (so widths are within a voxel). Ridge voxels near
    ``blocked`` or the volume's faces are left out (see :func:`_depth`). Returns a float array (possibly empty).
    """
    if not mask.any():
        return np.zeros(0)
    dist, valid = _depth(mask, blocked, border)
    ridge = valid & (dist >= ndimage.maximum_filter(dist, size=3))
    return 2 * dist[ridge] - 1


def merged_fraction(mask: np.ndarray, blocked: np.ndarray, thickness: float) -> float:
    """Share of the voxels of ``mask`` at least ``thickness`` deep inside it: a voxel of a single sheet of width T is
    at most (T + 1) / 2 deep, so these voxels lie where sheets are pressed into each other (NaN if none valid)."""
    dist, valid = _depth(mask, blocked)
    return float(np.mean(dist[valid] >= thickness)) if valid.any() else float("nan")


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` eroded by one voxel (6-neighbourhood), or ``mask`` itself when erosion leaves nothing."""
    core = ndimage.binary_erosion(mask)
    return core if core.any() else mask


def measure_fragment(image: np.ndarray, label: np.ndarray, ignore_index: int = 2) -> dict[str, float]:
    """The properties that define the families, measured on one fragment (image and label (z, y, x)).

    thickness: mean sheet width (ridge_widths of label 1); gap: mean free gap between sheets (ridge_widths of
    label 0); merged_fraction: share of sheet voxels at least that thickness deep (:func:`merged_fraction`, sheets
    pressed together); cnr: (mean sheet core - mean background core) / std of the background core, on the image
    scaled to [0, 1] by its dtype (cores: eroded by one voxel); core_cov: std / mean of the image in the sheet cores;
    fg_fraction, ignore_fraction: shares of the volume labelled 1 and ignore.
    """
    fg, bg, ignore = label == 1, label == 0, label == ignore_index
    widths = ridge_widths(fg, ignore)
    gaps = ridge_widths(bg, ignore)
    scale = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    values = image.astype(np.float64) / scale
    fg_core, bg_core = values[_eroded(fg)], values[_eroded(bg)]
    thickness = float(np.mean(widths)) if widths.size else float("nan")
    return {
        "thickness": thickness,
        "gap": float(np.mean(gaps)) if gaps.size else float("nan"),
        "merged_fraction": merged_fraction(fg, ignore, thickness) if widths.size else float("nan"),
        "cnr": float((fg_core.mean() - bg_core.mean()) / max(bg_core.std(), 1e-9)),
        "core_cov": float(fg_core.std() / max(fg_core.mean(), 1e-9)),
        "fg_fraction": float(fg.mean()),
        "ignore_fraction": float(ignore.mean()),
    }


# ---------------------------------------------------------------------------------------------------
# Writing the benchmark data set
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SplitCounts:
    """Fragments per family in each split (test first, then val, then train, by fragment index)."""

    train: int = 2
    val: int = 1
    test: int = 2

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            require(getattr(self, name) >= 0, f"split.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(self.train >= 1 and self.test >= 1, "split",
                f"need >= 1 train and test fragment per family, got {self}")

    def split_of(self, index: int) -> str:
        """Split of fragment ``index`` of a family."""
        if index < self.test:
            return "test"
        return "val" if index < self.test + self.val else "train"

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


def families_record(families: list[str], *, seed: int, shape: Triple, counts: SplitCounts, fmt: str) -> dict:
    """What identifies a written benchmark data set (compared before reusing one)."""
    params = {f: {g: to_dict(family_params(f, g, shape)) for g in GENERATORS} for f in families}
    return {"generator": RECORD_GENERATOR, "seed": int(seed), "shape": [int(n) for n in shape], "fmt": fmt,
            "split_counts": dataclasses.asdict(counts), "families": list(families), "params": params}


def _same_record(path: Path, record: dict) -> bool:
    found = yaml.safe_load(path.read_text()) or {}
    return {k: found.get(k) for k in record} == yaml.safe_load(yaml.safe_dump(record))


def write_families(out_dir: str | Path, families: list[str] | tuple[str, ...] = FAMILY_NAMES, *, seed: int = 0,
                   shape: Triple = (96, 96, 96), counts: SplitCounts = SplitCounts(), fmt: str = "nii") -> Path:
    """Write the benchmark families to ``out_dir`` and return its ``dataset.yaml`` (use it as ``data.dataset``).

    Fragment ``FAMILY_II`` is ``make_family_fragment(FAMILY, II, seed=seed, shape=shape)``. When ``out_dir`` already
    holds this exact data set it is reused as it is; other data there is an error. The folder is built beside its
    place and published with one rename, so it appears complete or not at all.
    """
    families = check_families(list(families))
    choice("fmt", fmt, FORMATS)
    out = Path(out_dir)
    record = families_record(families, seed=seed, shape=shape, counts=counts, fmt=fmt)
    dataset = out / "dataset.yaml"
    if dataset.is_file():
        if _same_record(dataset, record):
            log.info("%s already holds these benchmark families", out)
            return dataset
        raise VesuviusError(f"{out} holds benchmark data made with other settings ({dataset}); delete it or choose "
                            f"another folder")
    build_dir(out, OUTPUT_KIND, lambda work: _write_into(work, record, families, counts))
    log.info("wrote %d benchmark fragments (%s) to %s", len(families) * counts.total, ", ".join(families), out)
    return dataset


def _write_into(work: Path, record: dict, families: list[str], counts: SplitCounts) -> None:
    """Generate every fragment, write images/ + labels/ and dataset.yaml into ``work``."""
    shape, fmt = tuple(record["shape"]), record["fmt"]
    entries, info = [], {}
    jobs = [(f, i) for f in families for i in range(counts.total)]
    for family, index in tqdm(jobs, desc="benchmark fragments", leave=False):
        image, label, generator = make_family_fragment(family, index, seed=record["seed"], shape=shape)
        frag_id = f"{family}_{index:02d}"
        spacing = family_params(family, generator, shape).spacing
        write_nifti(work / "images" / f"{frag_id}.{fmt}", image, spacing=spacing)
        write_nifti(work / "labels" / f"{frag_id}.{fmt}", label, spacing=spacing)
        split = counts.split_of(index)
        entries.append({"id": frag_id, "image": f"images/{frag_id}.{fmt}", "label": f"labels/{frag_id}.{fmt}",
                        "split": split})
        measured = {k: round(v, 4) for k, v in measure_fragment(image, label).items()}
        info[frag_id] = {"family": family, "generator": generator, "split": split, "measured": measured}
    summary = {f: {"stresses": FAMILIES[f].stresses, "property": FAMILIES[f].property} for f in families}
    payload = {**record, "family_info": summary, "fragment_info": info, "fragments": entries}
    (work / "dataset.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))


def read_family_info(dataset: str | Path) -> dict[str, dict]:
    """``{fragment id: {family, generator, split, measured}}`` from a dataset.yaml written by :func:`write_families`."""
    path = Path(dataset)
    info = (yaml.safe_load(path.read_text()) or {}).get("fragment_info") if path.is_file() else None
    if not isinstance(info, dict):
        raise VesuviusError(f"{path}: not a benchmark-families dataset.yaml (no 'fragment_info'); write it with "
                            f"write_families of bench/families.py")
    return info
