"""Where the block engine (:mod:`vesuvius_monai.engine.blockwise`) puts its results: a :class:`Sink` takes finished
blocks, :class:`Spills` hold the partial sums a block leaves for its successors. :class:`ArraySink` and
:class:`MemorySpills` are the in-memory ones; a resumable Zarr store (``io.zarr_store.PredictionStore``) and its
spill folder are the on-disk ones. Arrays are (z, y, x) float32.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vesuvius_monai.data.regions import Region, Triple

SpillKey = tuple[Triple, Triple]  # (source block, destination block)


class Sink(Protocol):
    """Where finished blocks go: ``write_block`` stores a block's probabilities and records it as done."""

    def done_blocks(self) -> set[Triple]: ...

    def write_block(self, index: Triple, region: Region, probs: np.ndarray) -> None: ...


class Spills(Protocol):
    """Partial sums a block leaves for a successor, keyed by (source block, destination block)."""

    def put(self, key: SpillKey, array: np.ndarray) -> None: ...

    def take(self, key: SpillKey) -> np.ndarray: ...

    def drop(self, key: SpillKey) -> None: ...

    def keys(self) -> list[SpillKey]: ...

    def has(self, key: SpillKey) -> bool: ...


class MemorySpills:
    """Spills in a dict (in-memory outputs: bounded by one plane of blocks' spills, less than the output)."""

    def __init__(self) -> None:
        self._data: dict[SpillKey, np.ndarray] = {}

    def put(self, key: SpillKey, array: np.ndarray) -> None:
        self._data[key] = np.array(array, dtype=np.float32)

    def take(self, key: SpillKey) -> np.ndarray:
        return self._data[key]

    def drop(self, key: SpillKey) -> None:
        self._data.pop(key, None)

    def keys(self) -> list[SpillKey]:
        return list(self._data)

    def has(self, key: SpillKey) -> bool:
        return key in self._data

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._data.values())


class ArraySink:
    """An in-memory float32 output (z, y, x) of ``shape``."""

    def __init__(self, shape: Triple) -> None:
        self.array = np.zeros(shape, dtype=np.float32)

    def done_blocks(self) -> set[Triple]:
        return set()

    def write_block(self, index: Triple, region: Region, probs: np.ndarray) -> None:
        self.array[region] = probs
