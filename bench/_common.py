"""Shared helpers of the benchmarks in this folder.

Set-up (logging, ``error:`` lines, config overrides), synthetic data written by ``vesuvius-monai synth`` (training
fragments in a data root, or large Zarr volumes tiled from its fragments), scores (the full metric set of a binary
mask, per-fragment means), one paired "helped / hurt / no measurable change" verdict, one plain-text table and one
atomic JSON writer, timing and peak-memory probes, spreads, connected components over the scorer's octants and the
last row of a run's training log. Arrays are (z, y, x).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vesuvius_monai.config import Config, load_config
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text

log = logging.getLogger(__name__)


def verdict_rule(unit: str = "fragment", floor: str = "--min-delta") -> str:
    """The text of the verdict rule of :func:`paired_verdict`, for deltas paired per ``unit`` (fragment, round)."""
    return (f"verdict rule: paired per-{unit} deltas d_i vs the baseline; 'helped' / 'hurt' only when every d_i "
            f"has the sign of the mean and |mean| > max(2 standard errors of the d_i, {floor}); "
            f"otherwise 'no measurable change'")


VERDICT_RULE = verdict_rule()


def setup_logging() -> None:
    """INFO logs of the package on stderr (the benchmark tables go to stdout)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_main(parse_args, run, argv: list[str] | None = None) -> None:
    """Parse arguments and run a benchmark; a VesuviusError becomes one ``error:`` line and exit status 2."""
    setup_logging()
    args = parse_args(argv)
    try:
        run(args)
    except VesuviusError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- config and synthetic data


def run_synth(cfg_path: str | Path | None, overrides: Sequence[str]) -> None:
    """``vesuvius-monai synth --config cfg_path overrides...``, in this process (the command's own function): writes
    the fragments of the ``synth`` section to ``data.root``, or does nothing when they are already there; a
    VesuviusError when ``data.root`` holds anything else."""
    from vesuvius_monai.cli import cmd_synth

    cmd_synth(argparse.Namespace(config=cfg_path, overrides=list(overrides)))


def synthetic_root(cfg_path: str | Path | None, overrides: Sequence[str], spare_root: str | Path) -> str:
    """A data root holding the synthetic fragments of the config's ``synth`` section, written by :func:`run_synth`.

    The config's ``data.root`` when it holds them or nothing (they are written there), else ``spare_root`` (written
    there when empty). Add ``data.root=<the result>`` to the run's overrides. Raises VesuviusError when both hold
    other data.
    """
    errors = []
    for root in dict.fromkeys((load_config(cfg_path, list(overrides)).data.root, str(spare_root))):
        try:
            run_synth(cfg_path, [*overrides, f"data.root={root}"])
        except VesuviusError as err:
            errors.append(str(err))
            continue
        log.info("synthetic fragments: %s", root)
        return root
    raise VesuviusError(f"no folder for the synthetic fragments of this config: {'; '.join(errors)}; pass "
                        f"--run-dir elsewhere")


def synthetic_zarr(path: str | Path, size: int, *, tile: int = 128, distinct: int = 8, seed: int = 0) -> Path:
    """Write a ``size``^3 uint16 Zarr (chunks ``tile``^3) of synthetic scroll fragments laid side by side.

    :func:`run_synth` writes ``min(distinct, tiles)`` fragments of ``min(tile, size)``^3 (uint16, uncompressed NIfTI)
    into a temporary folder beside ``path``; grid tile ``i`` (z, y, x order) is fragment ``i mod distinct``, cropped
    at the far faces. Memory holds one tile at a time. Returns ``path``.
    """
    import zarr

    from vesuvius_monai.data.readers import open_volume

    edge = min(tile, size)
    starts = range(0, size, edge)
    corners = [(z, y, x) for z in starts for y in starts for x in starts]
    n = min(distinct, len(corners))
    path = Path(path)
    tiles = Path(tempfile.mkdtemp(prefix="synth_tiles_", dir=path.parent))
    try:
        run_synth(None, [f"data.root={tiles / 'data'}", f"synth.n_fragments={n}", f"synth.seed={seed}",
                         "synth.fmt=nii", f"synth.params.shape=[{edge},{edge},{edge}]", "synth.params.dtype=uint16"])
        array = zarr.create_array(str(path), shape=(size,) * 3, chunks=(edge,) * 3, dtype="uint16")
        for i, (z, y, x) in enumerate(corners):
            block = open_volume(tiles / "data" / "images" / f"frag_{i % n:03d}.nii").read()
            array[z:z + edge, y:y + edge, x:x + edge] = block[:size - z, :size - y, :size - x]
    finally:
        shutil.rmtree(tiles, ignore_errors=True)  # the temporary folder made here
    return path


# --------------------------------------------------------------------------- scores and verdicts


def all_metrics() -> list[str]:
    """Every scalar metric name: dice, iou, surface_dice, hd95, voi_*, betti_error_0..2, topo_score, cldice,
    leaderboard."""
    from vesuvius_monai.metrics.context import SCALAR_GETTERS

    return list(SCALAR_GETTERS)


def __getattr__(name: str):
    """``ALL_METRICS`` (:func:`all_metrics`), computed on first use: the metrics package takes 0.5 s to import, which
    the timing benchmarks (and their worker processes) need not pay."""
    if name == "ALL_METRICS":
        return all_metrics()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def score_mask(mask: np.ndarray, label: np.ndarray, spacing: Sequence[float], cfg: Config) -> dict[str, float]:
    """Every scalar metric (ALL_METRICS) of a bool mask (z, y, x) against its label (z, y, x), as in evaluation."""
    from vesuvius_monai.metrics import compute_metrics

    return compute_metrics(mask, label, all_metrics(), ignore_index=cfg.data.ignore_index, spacing=tuple(spacing),
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


def paired_verdict(base: dict, new: dict, min_delta: float, *, lower_is_better: bool = False
                   ) -> tuple[float, list[float], str]:
    """(mean delta, per-item deltas, verdict) of ``new - base``, both ``{item: value}`` with the same items (fragment
    ids, interleaved rounds, ...); higher values are better unless ``lower_is_better`` (seconds, memory).

    See :func:`verdict_rule`. A single item gives no spread, so its verdict is always 'no measurable change'.
    """
    deltas = [float(new[i] - base[i]) for i in base]
    mean = float(np.mean(deltas))
    if len(deltas) < 2 or not math.isfinite(mean):
        return mean, deltas, "no measurable change"
    stderr = float(np.std(deltas, ddof=1)) / math.sqrt(len(deltas))
    same_sign = all(d * mean > 0 for d in deltas)
    if same_sign and abs(mean) > max(2 * stderr, min_delta):
        return mean, deltas, "helped" if (mean > 0) != lower_is_better else "hurt"
    return mean, deltas, "no measurable change"


def verdict_text(metric: str, base: dict, new: dict, min_delta: float, *, unit: str = "fragment",
                 lower_is_better: bool = False, spec: str = "+.4f") -> str:
    """'leaderboard -0.0123 (per fragment -0.0100, -0.0146): hurt' (see :func:`paired_verdict`)."""
    mean, deltas, word = paired_verdict(base, new, min_delta, lower_is_better=lower_is_better)
    return f"{metric} {mean:{spec}} (per {unit} {', '.join(f'{d:{spec}}' for d in deltas)}): {word}"


def verdict_lines(results: dict[str, dict], baseline: str, metrics: Sequence[str], min_delta: float, *,
                  unit: str = "fragment") -> list[str]:
    """One line per result other than ``baseline``: each metric's paired per-fragment delta against it, with its
    verdict. ``results``: ``{name: {"fragments": {fragment id: {metric: value}}}}``; none without the baseline."""
    if baseline not in results:
        return []
    base = results[baseline]["fragments"]
    lines = []
    for name, result in results.items():
        if name == baseline:
            continue
        parts = [verdict_text(metric, {i: s[metric] for i, s in base.items()},
                              {i: s[metric] for i, s in result["fragments"].items()}, min_delta, unit=unit)
                 for metric in metrics]
        lines.append(f"{name} vs {baseline}: {'; '.join(parts)}")
    return lines


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


# --------------------------------------------------------------------------- timing and memory


def synchronise(device) -> None:
    """Wait for a CUDA device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn``, the device's queued work included."""
    synchronise(device)
    start = time.perf_counter()
    fn()
    synchronise(device)
    return time.perf_counter() - start


def vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak resident memory (KiB, VmHWM) of a process so far; 0 once it has gone or without /proc.

    Unlike ``ru_maxrss`` of a child process, it does not include the parent's memory inherited at fork."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def load_average() -> float:
    """The 1-minute load average (NaN where the system does not report one)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


# --------------------------------------------------------------------------- spreads, components, training logs


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
    ``np.array_split``), each tile labelled on its own as the metrics label (26-connected by default)."""
    from vesuvius_monai.metrics._common import tile_slices
    from vesuvius_monai.metrics.components import label_components

    return sum(label_components(mask[s], connectivity)[1] for s in tile_slices(mask.shape, tiles))


def read_train_log(run: Path) -> dict[str, float]:
    """Last row of ``run/train_log.csv``: steps done, training loop seconds and steps/s."""
    import csv

    from vesuvius_monai.io.run_dir import RunDir

    path = RunDir(run).train_log
    if not path.is_file():
        raise VesuviusError(f"{path} not found: the run did not log a single step")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise VesuviusError(f"{path} holds no rows")
    last = rows[-1]
    return {"steps": int(last["step"]), "train_seconds": float(last["seconds"]),
            "steps_per_s": float(last["steps_per_s"])}
