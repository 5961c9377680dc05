"""Does test-time augmentation and/or post-processing improve the leaderboard score on held-out fragments?

Predicts the test fragments once per inference setting and scores every setting with the full metric set:

    a_plain         no TTA, threshold 0.5, no post-processing (the baseline)
    b_tta           mirror TTA over z, y and x (8 views), threshold 0.5
    c_postproc      no TTA; threshold, min_size and fill_holes_max chosen on the VALIDATION fragments
    d_tta_postproc  both (post-processing tuned again on the TTA validation probabilities)
    e_tta_rot90     with --rot90: mirror z, y + 4 quarter turns in y-x (16 distinct views), threshold 0.5

Post-processing is tuned by the leaderboard score: for every (min_size, fill_holes_max) of a small grid,
:func:`pick_threshold` picks the threshold; the best combination wins (ties go to the
earlier, simpler grid entry). Each change gets a paired verdict against a_plain ("helped", "hurt" or "no
measurable change", judged on the per-fragment deltas). Without --checkpoint a model is trained with the config
into <run-dir>/train first (configs/demo.yaml: ~2-3 minutes on 2 CPU cores).

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_tta_postprocess.py
    PYTHONPATH=. .venv/bin/python bench/bench_tta_postprocess.py --checkpoint runs/demo/checkpoints/best.pt --rot90
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from _common import (ALL_METRICS, VERDICT_RULE, format_table, mean_and_std, run_main, score_mask, synthetic_root,
                     verdict_lines, write_json)
from vesuvius_monai.config import Config, load_config, to_dict
from vesuvius_monai.data.dataset import Fragment, load_splits
from vesuvius_monai.data.readers import VolumeReader
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.engine.infer import infer_volume
from vesuvius_monai.engine.train import train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.metrics.leaderboard import leaderboard_score
from vesuvius_monai.postprocess import PostprocessConfig, postprocess

log = logging.getLogger("bench_tta_postprocess")

# inference mode -> (TTA flip axes, y-x quarter turns)
INFERENCE_MODES = {"plain": ((), False), "flips": ((0, 1, 2), False), "flips_rot90": ((0, 1), True)}


@dataclass(frozen=True)
class Setting:
    """One benchmark row: an inference mode and whether post-processing is tuned on validation."""

    name: str
    mode: str  # key of INFERENCE_MODES
    tuned: bool


SETTINGS = [Setting("a_plain", "plain", False), Setting("b_tta", "flips", False),
            Setting("c_postproc", "plain", True), Setting("d_tta_postproc", "flips", True)]
ROT90_SETTING = Setting("e_tta_rot90", "flips_rot90", False)

METRIC_COLUMNS = [("leaderboard", "leaderboard", ".4f"), ("dice", "dice", ".4f"), ("iou", "iou", ".4f"),
                  ("surface_dice", "surf_dice", ".4f"), ("voi_score", "voi_score", ".4f"),
                  ("voi_split", "voi_split", ".4f"), ("voi_merge", "voi_merge", ".4f"),
                  ("topo_score", "topo", ".4f"), ("betti_error_0", "betti0_err", ".1f"),
                  ("betti_error_1", "betti1_err", ".1f"), ("betti_error_2", "betti2_err", ".1f"),
                  ("cldice", "cldice", ".4f"), ("hd95", "hd95", ".2f")]
SETTING_COLUMNS = [("views", "tta_views", "d"), ("threshold", "threshold", ".3f"), ("min_size", "min_size", "d"),
                   ("fill_holes_max", "fill_holes", "d"), ("n_fragments", "fragments", "d"),
                   ("inference_seconds", "infer_s", ".1f"), ("postprocess_seconds", "postproc_s", ".2f")]


@dataclass
class Split:
    """Fragments of one split: image readers (normalised at inference), labels (z, y, x) in memory, spacings."""

    ids: list[str]
    images: list[VolumeReader]
    labels: list[np.ndarray]
    spacings: list[tuple[float, float, float]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (data, model, inference)")
    parser.add_argument("--checkpoint", type=Path, help="a .pt written by train; default: train one first")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_tta"),
                        help="where the model is trained (<run-dir>/train) and spare synthetic data goes")
    parser.add_argument("--out", type=Path, help="results JSON (default: <run-dir>/results.json)")
    parser.add_argument("--rot90", action="store_true", help="add row e: mirror z, y + y-x quarter turns")
    parser.add_argument("--min-sizes", type=int, nargs="+", default=[0, 100, 1000],
                        help="min_size grid searched on the validation fragments")
    parser.add_argument("--fill-holes", type=int, nargs="+", default=[0, 10, 100],
                        help="fill_holes_max grid searched on the validation fragments")
    parser.add_argument("--min-delta", type=float, default=0.002,
                        help="smallest mean delta called a change in the verdicts")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. infer.overlap=0.5")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- model and data


def train_default(cfg: Config, run_dir: Path) -> Path:
    """Train ``cfg`` into ``run_dir/train`` and return its best checkpoint (by validation Dice)."""
    run_cfg = dataclasses.replace(cfg, output_dir=str(run_dir / "train"))
    log.info("no --checkpoint: training %s for %d steps into %s", cfg.model.name, cfg.train.steps, run_cfg.output_dir)
    return RunDir(train(run_cfg)).best


def load_split(fragments: list[Fragment], cfg: Config) -> Split:
    """Read and normalise the images and read the labels of ``fragments``."""
    if any(f.label is None for f in fragments):
        unlabeled = [f.id for f in fragments if f.label is None]
        raise VesuviusError(f"fragments without labels cannot be scored: {unlabeled}")
    return Split(ids=[f.id for f in fragments],
                 images=[f.image for f in fragments],
                 labels=[f.label.read() for f in fragments],
                 spacings=[tuple(f.image.spacing) for f in fragments])


def predict_split(model: nn.Module, split: Split, mode: str, cfg: Config, device: torch.device
                  ) -> tuple[list[np.ndarray], float]:
    """Probabilities (z, y, x) of every image of ``split`` under inference ``mode``, and the seconds they took."""
    axes, rot90 = INFERENCE_MODES[mode]
    infer_cfg = dataclasses.replace(cfg.infer, tta_flip_axes=list(axes), tta_rot90=rot90)
    start = time.perf_counter()
    probs = [infer_volume(model, image, dataclasses.replace(cfg, infer=infer_cfg), device=device)
             for image in tqdm(split.images, desc=f"predict {mode}", leave=False)]
    return probs, time.perf_counter() - start


# --------------------------------------------------------------------------- post-processing


def leaderboard_fn(cfg: Config) -> Callable[[np.ndarray, np.ndarray], float]:
    """score(bool mask, label) -> leaderboard score with the config's weights and ignore label."""

    def score(mask: np.ndarray, label: np.ndarray) -> float:
        return leaderboard_score(mask, label, weights=cfg.evaluate.leaderboard,
                                 ignore_index=cfg.data.ignore_index)["score"]

    return score


THRESHOLDS = np.linspace(0.2, 0.8, 13)


def pick_threshold(probs: list[np.ndarray], labels: list[np.ndarray],
                   score_fn: Callable[[np.ndarray, np.ndarray], float], candidates: Sequence[float] = THRESHOLDS, *,
                   base: PostprocessConfig | None = None) -> tuple[float, dict[float, float]]:
    """The threshold of best mean ``score_fn(pred, label)`` over the fragments, without a guard (this bench's grid
    search); ``pred`` is ``postprocess(prob, base with that threshold)``, ``base`` plain thresholding by default.
    Ties go to the candidate closest to 0.5. Returns (best threshold, {threshold: mean score})."""
    if len(candidates) == 0:
        raise VesuviusError("pick_threshold 'candidates' is empty")
    if len(probs) == 0 or len(probs) != len(labels):
        raise VesuviusError(f"pick_threshold needs equally many probs and labels (> 0), got {len(probs)} and "
                            f"{len(labels)}")
    for i, (prob, label) in enumerate(zip(probs, labels)):
        if prob.shape != label.shape:
            raise VesuviusError(f"pick_threshold fragment {i}: prob shape {prob.shape} != label shape {label.shape}")
    base = base or PostprocessConfig()
    scores = {}
    for t in candidates:
        values = [float(score_fn(postprocess(prob, dataclasses.replace(base, threshold=float(t))), label))
                  for prob, label in zip(probs, labels)]
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise VesuviusError(f"pick_threshold: score_fn gave {value} for fragment {i} at threshold {float(t)}")
        scores[float(t)] = float(np.mean(values))
    best_score = max(scores.values())
    best = min((t for t, s in scores.items() if s == best_score), key=lambda t: abs(t - 0.5))
    log.info("best threshold %.3f with mean score %.4f", best, best_score)
    return best, scores


def grid_search_postprocess(probs: list[np.ndarray], val: Split, cfg: Config, min_sizes: list[int],
                            fills: list[int]) -> tuple[PostprocessConfig, list[dict]]:
    """Best PostprocessConfig on the validation fragments, and one row per (min_size, fill) tried (this bench's grid
    search; ``tune-postprocess`` is ``vesuvius_monai.engine.tune.tune_postprocess``)."""
    score, rows = leaderboard_fn(cfg), []
    for min_size in min_sizes:
        for fill in fills:
            base = PostprocessConfig(min_size=min_size, fill_holes_max=fill)
            best, scores = pick_threshold(probs, val.labels, score, base=base)
            rows.append({"min_size": min_size, "fill_holes_max": fill, "threshold": best, "val_score": scores[best]})
            log.info("val: min_size %d, fill_holes_max %d -> threshold %.3f, leaderboard %.4f",
                     min_size, fill, best, scores[best])
    top = max(rows, key=lambda r: r["val_score"])  # max keeps the first of equal scores
    return PostprocessConfig(threshold=top["threshold"], min_size=top["min_size"],
                             fill_holes_max=top["fill_holes_max"]), rows


def score_split(probs: list[np.ndarray], split: Split, pp: PostprocessConfig, cfg: Config
                ) -> tuple[dict[str, dict[str, float]], float]:
    """({fragment id: every metric}, post-processing seconds) of ``probs`` post-processed with ``pp``."""
    per_fragment, seconds = {}, 0.0
    for frag_id, prob, label, spacing in zip(split.ids, probs, split.labels, split.spacings):
        start = time.perf_counter()
        mask = postprocess(prob, pp)
        seconds += time.perf_counter() - start
        per_fragment[frag_id] = score_mask(mask, label, spacing, cfg)
    return per_fragment, seconds


# --------------------------------------------------------------------------- benchmark


def run_setting(setting: Setting, predicted: dict, val: Split, test: Split, cfg: Config,
                args: argparse.Namespace) -> dict:
    """Result of one setting: its post-processing, timings, mean / std / per-fragment metrics."""
    tuning = None
    pp = PostprocessConfig()  # threshold 0.5, nothing else
    if setting.tuned:
        pp, tuning = grid_search_postprocess(predicted[setting.mode]["val"], val, cfg, args.min_sizes, args.fill_holes)
    per_fragment, pp_seconds = score_split(predicted[setting.mode]["test"], test, pp, cfg)
    mean, std = mean_and_std(per_fragment)
    axes, rot90 = INFERENCE_MODES[setting.mode]
    log.info("%s: leaderboard %.4f, dice %.4f", setting.name, mean["leaderboard"], mean["dice"])
    return {"tta_flip_axes": list(axes), "tta_rot90": rot90, "views": 2 ** len(axes) * (4 if rot90 else 1),
            "postprocess": dataclasses.asdict(pp), "tuning_on_val": tuning,
            "inference_seconds": predicted[setting.mode]["test_seconds"], "postprocess_seconds": pp_seconds,
            "n_fragments": len(test.ids), "mean": mean, "std": std, "fragments": per_fragment}


def predict_modes(model: nn.Module, settings: list[Setting], val: Split, test: Split, cfg: Config,
                  device: torch.device) -> dict[str, dict]:
    """Predict test (and, where tuning needs it, validation) fragments once per inference mode in use."""
    predicted = {}
    for mode in dict.fromkeys(s.mode for s in settings):
        test_probs, seconds = predict_split(model, test, mode, cfg, device)
        needs_val = any(s.tuned for s in settings if s.mode == mode)
        val_probs = predict_split(model, val, mode, cfg, device)[0] if needs_val else None
        predicted[mode] = {"test": test_probs, "val": val_probs, "test_seconds": seconds}
        log.info("mode %s: %d test fragments predicted in %.1f s", mode, len(test.ids), seconds)
    return predicted


def print_report(results: dict[str, dict], lines: list[str], checkpoint: Path, test: Split) -> None:
    """Settings table, mean-metric table, per-fragment spread note and verdict lines, on stdout."""
    print(f"\ncheckpoint {checkpoint}; test fragments {', '.join(test.ids)}; metrics are means over fragments")
    setting_rows = {name: {**r, **r["postprocess"]} for name, r in results.items()}
    print(format_table(setting_rows, SETTING_COLUMNS))
    print()
    print(format_table({name: r["mean"] for name, r in results.items()}, METRIC_COLUMNS))
    print("\nspread (std over fragments) of leaderboard / dice: " + "; ".join(
        f"{name} {r['std']['leaderboard']:.4f} / {r['std']['dice']:.4f}" for name, r in results.items()))
    print(VERDICT_RULE)
    for line in lines:
        print(line)


def run(args: argparse.Namespace) -> None:
    data_root = synthetic_root(args.config, args.overrides, args.run_dir / "data")
    cfg = load_config(args.config, [*args.overrides, f"data.root={data_root}"])
    checkpoint = args.checkpoint or train_default(cfg, args.run_dir)
    device = resolve_device(cfg.infer.device)
    model = Checkpoint.load(checkpoint).model(device)
    splits = load_splits(cfg.data)
    if not splits["val"] or not splits["test"]:
        raise VesuviusError("the benchmark needs validation and test fragments (data.val_fraction, data.test_fraction)")
    val, test = load_split(splits["val"], cfg), load_split(splits["test"], cfg)
    settings = SETTINGS + ([ROT90_SETTING] if args.rot90 else [])
    predicted = predict_modes(model, settings, val, test, cfg, device)
    results = {s.name: run_setting(s, predicted, val, test, cfg, args) for s in settings}
    lines = verdict_lines(results, "a_plain", ("leaderboard", "dice"), args.min_delta)
    print_report(results, lines, checkpoint, test)
    payload = {"checkpoint": str(checkpoint), "val_fragments": val.ids, "test_fragments": test.ids,
               "metrics": ALL_METRICS, "settings": results, "verdicts": lines, "verdict_rule": VERDICT_RULE,
               "min_delta": args.min_delta, "torch_threads": torch.get_num_threads(), "config": to_dict(cfg)}
    write_json(args.out or args.run_dir / "results.json", payload)


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
