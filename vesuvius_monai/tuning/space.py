"""The dimensions the chain tuner searches: one table entry per operator (``tune.operators``).

Each :class:`Dimension` names the ``postprocess`` keys it sets and lists its values, ordered from the mildest (off)
to the strongest, so that "closest to the current choice" is a distance in that order. Adding an operator to the
search is one entry in :data:`DIMENSIONS` (and its name in ``vesuvius_monai.config.scoring.TUNE_OPERATORS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from vesuvius_monai.config import PostprocessConfig, TuneConfig
from vesuvius_monai.errors import VesuviusError

Value = tuple[Any, ...]  # the values of a dimension's keys, in the order of Dimension.keys


@dataclass(frozen=True)
class Dimension:
    """One searched operator: ``keys`` of ``postprocess`` and ``values(tune)``, the candidate values (each a tuple
    over ``keys``), mildest first, the operator's "off" among them."""

    name: str
    keys: tuple[str, ...]
    values: Callable[[TuneConfig], list[Value]]

    def value_of(self, cfg: PostprocessConfig) -> Value:
        """The current value of this dimension's keys in ``cfg``."""
        return tuple(getattr(cfg, key) for key in self.keys)

    def candidates(self, current: PostprocessConfig, tune: TuneConfig) -> list[PostprocessConfig]:
        """``current`` with each value of this dimension (``current`` itself included, mildest first), skipping the
        values that make an invalid config (e.g. a hysteresis high at or below the threshold)."""
        values = list(dict.fromkeys([*self.values(tune), self.value_of(current)]))
        values.sort(key=lambda v: self.order(v, tune))
        out = []
        for value in values:
            try:
                out.append(dataclasses.replace(current, **dict(zip(self.keys, value))))
            except VesuviusError:
                continue
        return out

    def order(self, value: Value, tune: TuneConfig) -> float:
        """Rank of ``value`` from mildest to strongest (the current value's rank when it is not in the table)."""
        table = self.values(tune)
        if self.name == "threshold":
            return float(value[0])
        return float(table.index(value)) if value in table else -0.5


def _bools(key: str) -> Dimension:
    return Dimension(key, (key,), lambda tune: [(False,), (True,)])


def _closings(tune: TuneConfig) -> list[Value]:
    modes = [mode == "per_sheet" for mode in tune.close_modes]
    return [((0, 0, 0), False)] + [(tuple(r), m) for r in tune.close_radii for m in modes if max(r) > 0]


DIMENSIONS: dict[str, Dimension] = {d.name: d for d in [
    Dimension("threshold", ("threshold",), lambda tune: sorted({(float(t),) for t in tune.thresholds})),
    Dimension("hysteresis", ("hysteresis_high",), lambda tune: [(0.0,)] + [(float(h),) for h in
                                                                          sorted(set(tune.hysteresis_highs))]),
    Dimension("opening", ("open_radius",), lambda tune: [((0, 0, 0),)] + [(tuple(r),) for r in tune.open_radii
                                                                          if max(r) > 0]),
    Dimension("closing", ("close_radius", "close_per_sheet"), _closings),
    Dimension("dust", ("min_size", "connectivity"), lambda tune: [(0, 26)] + [
        (int(m), int(c)) for m in sorted(tune.min_sizes) for c in tune.connectivities]),
    _bools("patch_holes"),
    _bools("plug_holes"),
    _bools("fill_voids"),
]}


def searched(tune: TuneConfig) -> list[Dimension]:
    """The dimensions of ``tune.operators`` in chain order (the order of :data:`DIMENSIONS`)."""
    return [d for name, d in DIMENSIONS.items() if name in tune.operators]


def describe_chain(cfg: PostprocessConfig) -> str:
    """The chain of ``cfg`` in words, operators that are off left out: ``threshold 0.50, closing (2, 1, 1) per
    sheet, dust < 64 (26-connected)``; a candidate's name in ``postprocess.json``."""
    parts = [f"threshold {cfg.threshold:.2f}"]
    if cfg.hysteresis_high > 0:
        parts.append(f"hysteresis high {cfg.hysteresis_high:.2f}")
    if max(cfg.open_radius) > 0:
        parts.append(f"opening {tuple(cfg.open_radius)}")
    if max(cfg.close_radius) > 0:
        parts.append(f"closing {tuple(cfg.close_radius)}{' per sheet' if cfg.close_per_sheet else ''}")
    if cfg.min_size > 0:
        parts.append(f"dust < {cfg.min_size} ({cfg.connectivity}-connected)")
    parts += [name.replace("_", " ") for name in ("patch_holes", "plug_holes") if getattr(cfg, name)]
    if cfg.fill_holes_max > 0:
        parts.append(f"fill holes <= {cfg.fill_holes_max}")
    if cfg.fill_voids:
        parts.append("fill voids")
    return ", ".join(parts)
