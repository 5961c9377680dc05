"""Shared helpers of the quality benchmarks (bench_tta_postprocess.py, bench_losses.py, bench_recipes.py).

Config and synthetic data set-up, scoring a binary mask with the full metric set, per-fragment means and
spreads, a paired "helped / hurt / no measurable change" verdict, a plain-text table and atomic JSON output,
connected components over the scorer's octants and the last row of a run's training log. Arrays are (z, y, x).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from vesuvius_monai.config import Config, load_config, to_dict
from vesuvius_monai.data.synthetic import SynthParams, write_synthetic_dataset
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.metrics import compute_metrics
from vesuvius_monai.metrics.context import SCALAR_GETTERS

log = logging.getLogger(__name__)

# dice, iou, surface_dice, hd95, voi_split, voi_merge, voi, voi_score, betti_error_0..2, topo_score, cldice, leaderboard
ALL_METRICS = list(SCALAR_GETTERS)
VERDICT_RULE = ("verdict rule: paired per-fragment deltas d_i vs the baseline; 'helped' / 'hurt' only when every d_i "
                "has the sign of the mean and |mean| > max(2 standard errors of the d_i, --min-delta); "
                "otherwise 'no measurable change'")


def setup_logging() -> None:
    """INFO logs of the package on stderr (the benchmark tables go to stdout)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


# --------------------------------------------------------------------------- config and data


def with_overrides(cfg_path: str | Path, overrides: Sequence[str]) -> Config:
    """``load_config`` of a YAML file plus ``key=value`` overrides (later ones win)."""
    return load_config(cfg_path, list(overrides))


def synth_params(cfg: Config) -> SynthParams:
    """The SynthParams described by the ``synth`` section."""
    return cfg.synth.params


def synth_state(root: Path, cfg: Config) -> str:
    """'match' if ``root`` holds the synthetic fragments of ``cfg.synth``, 'absent' if no data, else 'other'."""
    record = root / "synth.yaml"
    if record.is_file():
        found = yaml.safe_load(record.read_text()) or {}
        wanted = {"n": cfg.synth.n_fragments, "seed": cfg.synth.seed, "fmt": cfg.synth.fmt,
                  "params": to_dict(synth_params(cfg))}
        same = {k: found.get(k) for k in wanted} == yaml.safe_load(yaml.safe_dump(wanted))
        return "match" if same else "other"
    has_data = any((root / d).exists() for d in ("images", "labels", "train_images", "train_labels"))
    return "other" if has_data else "absent"


def ensure_synthetic(cfg: Config, spare_root: str | Path) -> Config:
    """``cfg`` with ``data.root`` pointing at the synthetic fragments of ``cfg.synth``.

    Uses ``data.root`` when it already holds them (or is empty: they are written there), else ``spare_root``
    (written there when empty). Raises VesuviusError when both hold other data.
    """
    for root in (Path(cfg.data.root), Path(spare_root)):
        state = synth_state(root, cfg)
        if state == "absent":
            write_synthetic_dataset(root, cfg.synth.n_fragments, seed=cfg.synth.seed, params=synth_params(cfg),
                                    fmt=cfg.synth.fmt)
        if state in ("absent", "match"):
            log.info("synthetic fragments: %s", root)
            return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
    raise VesuviusError(f"neither data.root {cfg.data.root} nor {spare_root} holds the synthetic fragments of this "
                        f"config (both hold other data); delete {spare_root} or pass --run-dir elsewhere")


# --------------------------------------------------------------------------- scores


def score_mask(mask: np.ndarray, label: np.ndarray, spacing: Sequence[float], cfg: Config) -> dict[str, float]:
    """Every scalar metric (ALL_METRICS) of a bool mask (z, y, x) against its label (z, y, x), as in evaluation."""
    return compute_metrics(mask, label, ALL_METRICS, ignore_index=cfg.data.ignore_index, spacing=tuple(spacing),
                           weights=cfg.evaluate.leaderboard)


def mean_and_std(per_fragment: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """NaN-aware mean and standard deviation (ddof=0) over fragments of every metric of ``{id: {metric: value}}``."""
    names = list(next(iter(per_fragment.values())))
    mean, std = {}, {}
    for name in names:
        values = np.array([scores[name] for scores in per_fragment.values()], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean[name] = float(finite.mean()) if finite.size else float("nan")
        std[name] = float(finite.std()) if finite.size else float("nan")
    return mean, std


def paired_verdict(base: dict[str, float], new: dict[str, float], min_delta: float) -> tuple[float, list[float], str]:
    """(mean delta, per-fragment deltas, verdict) of ``new - base``, both ``{fragment id: value}``, higher = better.

    See VERDICT_RULE. A single fragment gives no spread, so its verdict is always 'no measurable change'.
    """
    deltas = [float(new[i] - base[i]) for i in base]
    mean = float(np.mean(deltas))
    if len(deltas) < 2 or not math.isfinite(mean):
        return mean, deltas, "no measurable change"
    stderr = float(np.std(deltas, ddof=1)) / math.sqrt(len(deltas))
    same_sign = all(d * mean > 0 for d in deltas)
    if same_sign and abs(mean) > max(2 * stderr, min_delta):
        return mean, deltas, "helped" if mean > 0 else "hurt"
    return mean, deltas, "no measurable change"


def verdict_text(metric: str, base: dict[str, float], new: dict[str, float], min_delta: float) -> str:
    """'leaderboard -0.0123 (per fragment -0.0100, -0.0146): hurt'."""
    mean, deltas, word = paired_verdict(base, new, min_delta)
    return f"{metric} {mean:+.4f} (per fragment {', '.join(f'{d:+.4f}' for d in deltas)}): {word}"


# --------------------------------------------------------------------------- output


def format_table(rows: dict[str, dict], columns: Sequence[tuple[str, str, str]], row_header: str = "setting") -> str:
    """Plain-text table: one line per row name, columns given as (key, header, format spec such as '.4f')."""
    first = max(len(row_header), *(len(name) for name in rows))
    cells = {name: [format(values[key], spec) if key in values else "-" for key, _, spec in columns]
             for name, values in rows.items()}
    widths = [max(len(header), 8, *(len(c[i]) for c in cells.values())) for i, (_, header, _) in enumerate(columns)]
    lines = ["  ".join([f"{row_header:<{first}}", *(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths))])]
    for name, row in cells.items():
        lines.append("  ".join([f"{name:<{first}}", *(f"{c:>{w}}" for c, w in zip(row, widths))]))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (NaN / inf written as JSON's NaN / Infinity)."""
    write_text(path, json.dumps(payload, indent=2, allow_nan=True, default=float))
    log.info("results written to %s", path)


def run_main(parse_args, run, argv: list[str] | None = None) -> None:
    """Parse arguments and run a benchmark; a VesuviusError becomes one ``error:`` line and exit status 2."""
    setup_logging()
    args = parse_args(argv)
    try:
        run(args)
    except VesuviusError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- spreads, components, timings


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{mean, std, min, max, n}`` of the finite values (std with ddof=0; NaN everywhere when none is finite)."""
    array = np.asarray(list(values), dtype=np.float64)
    finite = array[np.isfinite(array)]
    if not finite.size:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "n": int(finite.size)}


def spread_text(stats: dict[str, float], spec: str = ".4f") -> str:
    """'0.9512 [0.9401-0.9633]': mean and min-max of a :func:`spread` (just the mean for one value)."""
    if stats["n"] <= 1:
        return format(stats["mean"], spec)
    return f"{stats['mean']:{spec}} [{stats['min']:{spec}}-{stats['max']:{spec}}]"


def octant_components(mask: np.ndarray, tiles: Sequence[int] = (2, 2, 2), connectivity: int = 26) -> int:
    """Connected components of a bool volume (z, y, x) summed over the scorer's tiles (2 x 2 x 2 octants, split like
    ``np.array_split``), each tile labelled on its own with scipy.ndimage (26-connected by default)."""
    from scipy import ndimage

    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    structure = ndimage.generate_binary_structure(3, rank)
    total = 0
    for z in np.array_split(np.arange(mask.shape[0]), tiles[0]):
        for y in np.array_split(np.arange(mask.shape[1]), tiles[1]):
            for x in np.array_split(np.arange(mask.shape[2]), tiles[2]):
                tile = mask[z[0]:z[-1] + 1, y[0]:y[-1] + 1, x[0]:x[-1] + 1]
                total += int(ndimage.label(tile, structure=structure)[1])
    return total


def read_train_log(run: Path) -> dict[str, float]:
    """Last row of ``run/train_log.csv``: steps done, training loop seconds and steps/s."""
    import csv

    path = Path(run) / "train_log.csv"
    if not path.is_file():
        raise VesuviusError(f"{path} not found: the run did not log a single step")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise VesuviusError(f"{path} holds no rows")
    last = rows[-1]
    return {"steps": int(last["step"]), "train_seconds": float(last["seconds"]),
            "steps_per_s": float(last["steps_per_s"])}
