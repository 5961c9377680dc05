"""Fragments: discovery on disk, checks, and the train / val / test split.

A fragment is one image volume with (usually) a label volume of the same shape. They are found by
1. a dataset YAML (``data.dataset``) listing ``fragments: [{id, image, label, split}]``, paths relative to it (or
   ``http(s)://`` / ``s3://`` addresses of Zarr stores, see :mod:`vesuvius_monai.data.remote`);
2. ``<root>/images`` + ``<root>/labels`` with matching file names (``frag_000.nii.gz`` in both); or
3. the competition layout ``<root>/train_images/ID.tif`` + ``<root>/train_labels/ID.tif``
   (optionally restricted to the ids of ``data.ids_csv``).
Splits are by whole fragment, never by patch.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesuvius_monai.config import DataConfig, read_yaml_mapping
from vesuvius_monai.data.fg_index import LabelCounts, check_label_block, check_split_labels, count_labels
from vesuvius_monai.data.readers import VolumeReader, block_grid, open_volume, volume_kind
from vesuvius_monai.data.remote import RemoteAddress, RemoteOptions, as_location, is_remote
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.paths import safe_name

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".zarr", ".npy")
LAYOUTS = (("images", "labels"), ("train_images", "train_labels"))


@dataclass(frozen=True, kw_only=True)
class FragmentFiles:
    """Paths of one fragment; ``label`` is None for unlabeled volumes."""

    id: str
    image: Path | RemoteAddress
    label: Path | RemoteAddress | None
    split: str | None = None  # fixed split from a dataset YAML, else drawn


@dataclass(kw_only=True)
class Fragment:
    """An opened fragment: lazy readers, nothing loaded yet."""

    id: str
    image: VolumeReader
    label: VolumeReader | None


def volume_id(path: Path | RemoteAddress) -> str:
    """``frag_000.nii.gz`` -> ``frag_000``; folders of slices keep their name; an address's last component counts
    (``https://host/scroll1.zarr`` -> ``scroll1``)."""
    name = as_location(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes_in(folder: Path) -> dict[str, Path]:
    """The volumes in ``folder`` by id (hidden names skipped); two volumes with one id are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or volume_kind(path) is None:
            continue
        frag_id = safe_name(volume_id(path), f"the id of {path}")
        if frag_id in found:
            raise VesuviusError(f"{found[frag_id]} and {path} have the same fragment id '{frag_id}'; "
                                f"keep one of them in {folder}")
        found[frag_id] = path
    return found


def _read_ids_csv(path: Path) -> list[str]:
    if not path.is_file():
        raise VesuviusError(f"data.ids_csv not found: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "id" not in rows[0]:
        raise VesuviusError(f"{path}: needs a header row with an 'id' column")
    return [safe_name(str(row["id"]).strip(), f"{path}: id") for row in rows]


def find_in_folders(root: Path, ids_csv: Path | None = None) -> list[FragmentFiles]:
    """Pair images and labels by name under ``root`` (``images/labels`` or ``train_images/train_labels``)."""
    for image_dir, label_dir in LAYOUTS:
        if (root / image_dir).is_dir():
            break
    else:
        raise VesuviusError(f"data.root {root}: no 'images/' or 'train_images/' folder found "
                            f"(run 'vesuvius-monai synth' to make synthetic data there)")
    images = _volumes_in(root / image_dir)
    labels = _volumes_in(root / label_dir) if (root / label_dir).is_dir() else {}
    if ids_csv is not None:
        wanted = _read_ids_csv(ids_csv)
        missing = [i for i in wanted if i not in images]
        if missing:
            raise VesuviusError(f"{ids_csv}: ids with no image in {root / image_dir}: {missing[:5]}")
        images = {i: images[i] for i in wanted}
    if not images:
        raise VesuviusError(f"no volumes found in {root / image_dir}")
    fragments = []
    for frag_id, image in images.items():
        if frag_id not in labels:
            raise VesuviusError(f"image {image} has no label: expected {root / label_dir / image.name}")
        fragments.append(FragmentFiles(id=frag_id, image=image, label=labels[frag_id]))
    return fragments


def find_in_yaml(path: Path) -> list[FragmentFiles]:
    """Read a dataset YAML: ``fragments: [{id, image, label, split}]`` with paths relative to the file.

    Ids (given, or the image's name) must be safe file names (:func:`safe_name`) and unique.
    """
    entries = read_yaml_mapping(path, "dataset file").get("fragments")
    if not isinstance(entries, list) or not entries:
        raise VesuviusError(f"{path}: needs a non-empty list under 'fragments'")
    fragments = [_yaml_entry(path, n, entry) for n, entry in enumerate(entries)]
    first: dict[str, int] = {}
    for n, fragment in enumerate(fragments):
        if fragment.id in first:
            raise VesuviusError(f"{path}: fragments[{first[fragment.id]}] and fragments[{n}] have the same id "
                                f"'{fragment.id}'; ids must be unique (they name the fragment's output files)")
        first[fragment.id] = n
    return fragments


def _yaml_entry(path: Path, n: int, entry: object) -> FragmentFiles:
    """Fragment ``n`` of the dataset YAML at ``path``, its values checked."""
    where = f"{path}: fragments[{n}]"
    unknown = set(entry) - {"id", "image", "label", "split"} if isinstance(entry, dict) else {"?"}
    if unknown or "image" not in entry:
        raise VesuviusError(f"{where} must be a mapping with 'image' (and optional id, label, split); unknown keys "
                            f"{sorted(map(str, unknown))}")
    if not isinstance(entry["image"], str) or not entry["image"].strip():
        raise VesuviusError(f"{where}.image must be a path (a non-empty string), got {entry['image']!r}")
    if not isinstance(entry.get("label") or "", str):
        raise VesuviusError(f"{where}.label must be a path (a string), got {entry['label']!r}")
    split = entry.get("split")
    if split not in (None, "train", "val", "test"):
        raise VesuviusError(f"{where}.split must be train, val or test, got {split!r}")
    image = _yaml_location(path, entry["image"])
    label = _yaml_location(path, entry["label"]) if entry.get("label") else None
    given = entry.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
        raise VesuviusError(f"{where}.id must be a string, got {given!r}")
    fragment_id = safe_name(str(given) if given is not None else volume_id(image), f"{where}.id")
    return FragmentFiles(id=fragment_id, image=image, label=label, split=split)


def _yaml_location(path: Path, value: str) -> Path | RemoteAddress:
    """A dataset YAML's ``image`` / ``label``: an address as it is, a path relative to the YAML file."""
    return as_location(value) if is_remote(value) else path.parent / value


def find_fragments(cfg: DataConfig) -> list[FragmentFiles]:
    """All fragments the data config describes, in a stable order."""
    if cfg.dataset:
        return find_in_yaml(Path(cfg.dataset))
    return find_in_folders(Path(cfg.root), Path(cfg.ids_csv) if cfg.ids_csv else None)


def split_fragments(files: list[FragmentFiles], cfg: DataConfig) -> dict[str, list[FragmentFiles]]:
    """Assign every fragment to train / val / test: fixed splits first, then a seeded draw by fractions."""
    by_id = {f.id: f for f in files}
    for key in ("val_fragments", "test_fragments"):
        unknown = [i for i in getattr(cfg, key) if i not in by_id]
        if unknown:
            raise VesuviusError(f"config key 'data.{key}': unknown fragment ids {unknown}; known: {sorted(by_id)}")
    fixed = {f.id: f.split for f in files if f.split}
    fixed.update({i: "val" for i in cfg.val_fragments})
    fixed.update({i: "test" for i in cfg.test_fragments})
    free = [f.id for f in files if f.id not in fixed]
    if not cfg.val_fragments and not cfg.test_fragments and not any(f.split for f in files):
        random.Random(cfg.split_seed).shuffle(free)
        n_test = round(len(free) * cfg.test_fraction)
        n_val = round(len(free) * cfg.val_fraction)
        if len(free) >= 3:  # a non-zero fraction of a small set still gets one fragment
            n_test = max(n_test, 1) if cfg.test_fraction > 0 else 0
            n_val = max(n_val, 1) if cfg.val_fraction > 0 else 0
        fixed.update({i: "test" for i in free[:n_test]})
        fixed.update({i: "val" for i in free[n_test:n_test + n_val]})
    splits: dict[str, list[FragmentFiles]] = {"train": [], "val": [], "test": []}
    for f in files:
        splits[fixed.get(f.id, "train")].append(f)
    return splits


def check_label_values(reader: VolumeReader, ignore_index: int, block: int = 128) -> LabelCounts:
    """Raise if the label holds values outside {0, 1, ignore_index}; reads block by block. Returns its counts of
    labelled and surface voxels."""
    counts = LabelCounts()
    for _, region in block_grid(reader.shape, (block, block, block)):
        labels = reader.read(region)
        check_label_block(reader, labels, (0, 1, ignore_index))
        counts += count_labels(labels)
    return counts


def open_fragment(files: FragmentFiles, cfg: DataConfig, *, check_labels: bool = True) -> Fragment:
    """Open both volumes lazily and check that they fit together."""
    remote = RemoteOptions.from_config(cfg)
    image = open_volume(files.image, spacing=cfg.spacing, level=cfg.zarr_level, key=cfg.zarr_key,
                        missing_chunks=cfg.missing_chunks, remote=remote)
    label = None
    if files.label:
        label = open_volume(files.label, spacing=cfg.spacing, level=cfg.zarr_level, key=cfg.zarr_key,
                            missing_chunks=cfg.missing_chunks, remote=remote)
    if label is not None:
        if tuple(label.shape) != tuple(image.shape):
            raise VesuviusError(f"label {files.label} has shape {tuple(label.shape)} but image {files.image} "
                                f"has shape {tuple(image.shape)}")
        if not np.allclose(label.spacing, image.spacing, rtol=1e-3):
            raise VesuviusError(f"label {files.label} has spacing {tuple(label.spacing)} but image {files.image} "
                                f"has spacing {tuple(image.spacing)}")
        if check_labels:
            check_label_values(label, cfg.ignore_index)
    return Fragment(id=files.id, image=image, label=label)


def load_splits(cfg: DataConfig, *, require_train: bool = True) -> dict[str, list[Fragment]]:
    """Find, split and open every fragment; logs the split.

    Label values of val and test fragments are checked here, and each of these splits needs a labelled voxel
    (:func:`check_split_labels`); training labels are checked (once per file, cached) while their surface index is
    built (``data.patches.prepare_sources``). ``require_train=False`` (evaluation of a trained model) accepts a data
    set without training fragments.
    """
    splits = split_fragments(find_fragments(cfg), cfg)
    unlabeled = [f.image for items in splits.values() for f in items if f.label is None]
    if unlabeled:
        raise VesuviusError(f"fragments without a label cannot be trained or scored: {unlabeled[0]}"
                            + (f" and {len(unlabeled) - 1} more" if len(unlabeled) > 1 else "")
                            + " (use 'vesuvius-monai predict' for unlabeled volumes)")
    if require_train and not splits["train"]:
        raise VesuviusError("no training fragments left after the split (check data.val_fragments / test_fragments)")
    for name, items in splits.items():
        log.info("%s fragments (%d): %s", name, len(items), ", ".join(f.id for f in items))
    opened = {name: [open_fragment(f, cfg, check_labels=False) for f in items] for name, items in splits.items()}
    for name in ("val", "test"):
        labels = [f.label for f in opened[name]]
        counts = sum((check_label_values(label, cfg.ignore_index) for label in labels), LabelCounts())
        check_split_labels(name, labels, counts)
    return opened
