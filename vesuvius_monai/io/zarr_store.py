"""Chunked Zarr store for probability maps too large for memory, with per-block completion markers.

Layout (zarr v2 format, OME-Zarr 0.4 style so viewers and :func:`open_volume` read it)::

    out.zarr/.zgroup, .zattrs      multiscales (axes z, y, x; scale = spacing) + "vesuvius_prediction" metadata
    out.zarr/0/                    the (z, y, x) array, chunks = prediction blocks
    out.zarr/1/, 2/, ...           the pyramid (io/pyramid.py), built once level 0 is complete
    out.zarr/.blocks_done/z.y.x    marker per finished block, created only after its data are written; holds the
                                   block's windows "run skipped" (summed into the metadata when complete)
    out.zarr/.spills/a.b.c-z.y.x.npy   partial sums block a.b.c left for block z.y.x (float32, atomic files)

Several processes (torchrun ranks, possibly on several nodes over a shared file system) may fill one store at the
same time: blocks are chunks, so each chunk has one writer, and markers and spills are one file each.

Probabilities are stored as uint8 (round(p * 255)), float16 or float32. A full disk or a file-size limit while
writing is a VesuviusError naming the store; a block is marked done only once its data are written, so the blocks
written before stay and a rerun writes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from vesuvius_monai.errors import VesuviusError, disk_errors
from vesuvius_monai.io.atomic import atomic_path
from vesuvius_monai.io.nifti import affine_to_spacing, spacing_to_affine
from vesuvius_monai.io.pyramid import DONE_DIR, build_levels, multiscales

logger = logging.getLogger(__name__)

STORE_DTYPES = ("uint8", "float16", "float32")
ARRAY_NAME = "0"
MARKER_DIR = ".blocks_done"
SPILL_DIR = ".spills"
META_KEY = "vesuvius_prediction"

BlockIndex = tuple[int, int, int]


def encode_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] -> stored values: uint8 ``round(clip(p) * 255)``, or a float16/float32 cast."""
    if dtype not in STORE_DTYPES:
        raise VesuviusError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.asarray(probs).astype(dtype)


def decode_probabilities(stored: np.ndarray) -> np.ndarray:
    """Stored values -> float32 probabilities (uint8 / 255; floats unchanged)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255.0)
    return stored.astype(np.float32)


def _ome_attrs(spacing: tuple[float, float, float], translation: tuple[float, float, float]) -> list[dict]:
    """OME-Zarr 0.4 ``multiscales`` for a single (z, y, x) level ``0``."""
    transforms = [{"type": "scale", "scale": list(spacing)}]
    if any(translation):
        transforms.append({"type": "translation", "translation": list(translation)})
    return [{
        "version": "0.4",
        "name": "probabilities",
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": ARRAY_NAME, "coordinateTransformations": transforms}],
    }]


class PredictionStore:
    """A (z, y, x) probability array in a Zarr group plus its block-completion markers."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._windows: dict[BlockIndex, tuple[int, int]] = {}  # note_windows, until the block's marker is written
        try:
            self.array: zarr.Array = group[ARRAY_NAME]  # indexing, not listing: the marker folder is no zarr node
        except KeyError:
            raise VesuviusError(f"{path}: prediction store has no array {ARRAY_NAME!r}") from None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        shape: tuple[int, int, int],
        *,
        block_size: tuple[int, int, int],
        dtype: str = "uint8",
        affine: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> PredictionStore:
        """Create an empty store (fill 0) with chunks = ``block_size``; ``path`` must not exist.

        ``affine`` (4x4, (x, y, z) -> world) gives the OME scale and translation (identity if None);
        ``meta`` (JSON-serialisable) is kept in the attrs for later compatibility checks.
        """
        path = Path(path)
        if dtype not in STORE_DTYPES:
            raise VesuviusError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        if path.exists():
            raise VesuviusError(f"{path}: already exists; refusing to overwrite it")
        matrix = spacing_to_affine((1.0, 1.0, 1.0)) if affine is None else np.asarray(affine, dtype=np.float64)
        chunks = tuple(max(1, min(int(b), int(d))) for b, d in zip(block_size, shape))
        with disk_errors(path):
            group = zarr.open_group(str(path), mode="w-", zarr_format=2)
            group.create_array(ARRAY_NAME, shape=tuple(int(d) for d in shape), chunks=chunks, dtype=dtype,
                               fill_value=0)
            group.attrs.update({
                "multiscales": _ome_attrs(affine_to_spacing(matrix), tuple(float(t) for t in matrix[2::-1, 3])),
                "affine": matrix.tolist(),
                META_KEY: {**json.loads(json.dumps(meta or {})), "dtype": dtype, "complete": False},
            })
            (path / MARKER_DIR).mkdir()
        return cls(path, group)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> PredictionStore:
        """Open an existing store (``mode`` "r+" or "r"); VesuviusError if ``path`` is not one."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as exc:
            raise VesuviusError(f"{path}: not a readable Zarr prediction store ({exc})") from exc
        if META_KEY not in group.attrs:
            raise VesuviusError(f"{path}: Zarr store was not written by block-wise prediction")
        return cls(path, group)

    @property
    def meta(self) -> dict:
        """The ``vesuvius_prediction`` attrs: the creator's ``meta`` plus ``dtype`` and ``complete``."""
        return dict(self.group.attrs[META_KEY])

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 (x, y, z) -> world affine given at creation."""
        return np.array(self.group.attrs["affine"], dtype=np.float64)

    def _marker(self, index: BlockIndex) -> Path:
        return self.path / MARKER_DIR / ".".join(str(int(i)) for i in index)

    def is_done(self, index: BlockIndex) -> bool:
        """True when block ``index`` was written completely (its marker exists)."""
        return self._marker(index).exists()

    def done_blocks(self) -> set[BlockIndex]:
        """Indices of all finished blocks."""
        folder = self.path / MARKER_DIR
        if not folder.is_dir():
            return set()
        return {tuple(int(i) for i in p.name.split(".")) for p in folder.iterdir()}  # type: ignore[misc]

    def write_block(self, index: BlockIndex, region: tuple[slice, slice, slice], probs: np.ndarray) -> None:
        """Write float probabilities (shape of ``region``) into ``region``, then mark block ``index`` done."""
        windows = self._windows.pop(tuple(index), None)  # type: ignore[arg-type]
        with disk_errors(self.path):
            self.array[region] = encode_probabilities(probs, str(self.array.dtype))
            self._marker(index).write_text("" if windows is None else f"{windows[0]} {windows[1]}")

    def note_windows(self, index: BlockIndex, run: int, skipped: int) -> None:
        """Record with block ``index``'s marker how many of its windows were run and skipped (empty space)."""
        self._windows[tuple(index)] = (int(run), int(skipped))  # type: ignore[index]

    def window_counts(self) -> dict[str, int] | None:
        """Windows run and skipped over the done blocks (None when a marker holds no counts)."""
        folder, run, skipped = self.path / MARKER_DIR, 0, 0
        for marker in folder.iterdir() if folder.is_dir() else []:
            text = marker.read_text().split()
            if len(text) != 2:
                return None
            run, skipped = run + int(text[0]), skipped + int(text[1])
        return {"run": run, "skipped": skipped}

    def build_pyramid(self, levels: int, method: str = "mean", progress: bool = False) -> None:
        """Levels ``1 .. levels - 1`` of the OME-Zarr pyramid from the complete level 0 (resumes a build that
        stopped; ``method`` "mean" for probabilities, "max" for masks), and the ``multiscales`` metadata of all."""
        dtype = str(self.array.dtype)
        decode, encode = (decode_probabilities, lambda p: encode_probabilities(p, dtype)) if method == "mean" \
            else (lambda a: a, lambda a: a)
        with disk_errors(self.path):
            build_levels(self.group, self.path, levels, method, decode, encode, progress)
            matrix = self.affine
            self.group.attrs["multiscales"] = multiscales(affine_to_spacing(matrix), tuple(matrix[2::-1, 3]),
                                                          levels, "probabilities" if method == "mean" else "mask")

    def mark_complete(self) -> None:
        """Record that every block is written and drop the markers (the store is then final)."""
        counts = None if self.meta.get("complete") else self.window_counts()
        with disk_errors(self.path):
            self.group.attrs[META_KEY] = {**self.meta, "complete": True, **({"windows": counts} if counts else {})}
        shutil.rmtree(self.path / MARKER_DIR, ignore_errors=True)
        shutil.rmtree(self.path / DONE_DIR, ignore_errors=True)
        shutil.rmtree(self.path / SPILL_DIR, ignore_errors=True)

    def spills(self) -> SpillFolder:
        """The folder of partial sums passed between blocks of an unfinished prediction."""
        return SpillFolder(self.path / SPILL_DIR)

    def read_probabilities(self, region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Float32 probabilities (z, y, x) of ``region`` (whole array if None)."""
        data = self.array[region] if region is not None else self.array[...]
        return decode_probabilities(np.asarray(data))


def _block_name(index: BlockIndex) -> str:
    return ".".join(str(int(i)) for i in index)


class SpillFolder:
    """Float32 arrays keyed by (source block, destination block), one atomic ``.npy`` file each.

    Read back bit-exactly, so a resumed prediction adds the same partial sums as an uninterrupted one. Processes
    sharing a store may write the same key at the same time (the owner of the source block and a neighbour that
    recomputed it): each writes its own temporary file and renames it, so the file is always one whole copy.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: tuple[BlockIndex, BlockIndex]) -> Path:
        return self.folder / f"{_block_name(key[0])}-{_block_name(key[1])}.npy"

    def put(self, key: tuple[BlockIndex, BlockIndex], array: np.ndarray) -> None:
        """Store ``array`` (as float32) under ``key``, replacing an earlier one atomically."""
        with atomic_path(self._file(key)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))

    def take(self, key: tuple[BlockIndex, BlockIndex]) -> np.ndarray:
        """The array stored under ``key``; VesuviusError naming the file when it is missing or unreadable."""
        try:
            return np.load(self._file(key), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise VesuviusError(f"{self._file(key)}: cannot read partial sums of an unfinished prediction "
                                f"({exc}); delete {self.folder.parent} to start over") from exc

    def drop(self, key: tuple[BlockIndex, BlockIndex]) -> None:
        self._file(key).unlink(missing_ok=True)

    def has(self, key: tuple[BlockIndex, BlockIndex]) -> bool:
        """True when an array is stored under ``key`` (it is complete: files appear by an atomic rename)."""
        return self._file(key).is_file()

    def keys(self) -> list[tuple[BlockIndex, BlockIndex]]:
        """Keys of every stored array (temporary files of an interrupted write are skipped)."""
        out = []
        for path in self.folder.glob("*.npy"):
            if path.name.startswith("."):
                continue
            src, dst = path.stem.split("-")
            out.append((tuple(int(i) for i in src.split(".")), tuple(int(i) for i in dst.split("."))))
        return out  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes on disk of every stored array."""
        return sum(p.stat().st_size for p in self.folder.glob("*.npy") if not p.name.startswith("."))
