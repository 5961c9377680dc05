"""Thin-structure losses: train the same model on the same data with the same budget under several loss weightings.

Every run shares the config's model, seed, patch size, learning rate, schedule and ``--steps``; only
``train.loss`` changes. ``train.max_minutes`` is set to 0 so that no run is cut short by the clock (pass
``train.max_minutes=...`` to bring the limit back). Each model (``last.pt`` by default, so the budget is
exactly ``--steps``) is scored on the test fragments by ``vesuvius_monai.engine.evaluate.evaluate`` with the full
metric set and the config's post-processing (threshold 0.5 in configs/demo.yaml).

    dice              {dice: 1}
    dice_bce          {dice: 1, bce: 1}
    dice_cldice       {dice: 1, cldice: 0.5}
    dice_skel_recall  {dice: 1, skel_recall: 0.5}

Timings come from each run's train_log.csv (training loop seconds, validation passes included) and are printed
with their step counts: the CPU may be shared, so compare quality, not speed. Runs go to <run-dir>/<loss>;
an existing run there is an error (delete it or pass another --run-dir).

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_losses.py
    PYTHONPATH=. .venv/bin/python bench/bench_losses.py --steps 100 --losses dice dice_cldice
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from _common import (ALL_METRICS, VERDICT_RULE, format_table, mean_and_std, read_train_log, run_main,
                     synthetic_root, verdict_lines, write_json)
from vesuvius_monai.config import Config, load_config, to_dict
from vesuvius_monai.engine.evaluate import evaluate
from vesuvius_monai.engine.train import train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.run_dir import RunDir

log = logging.getLogger("bench_losses")

LOSSES = {"dice": {"dice": 1.0}, "dice_bce": {"dice": 1.0, "bce": 1.0}, "dice_cldice": {"dice": 1.0, "cldice": 0.5},
          "dice_skel_recall": {"dice": 1.0, "skel_recall": 0.5}}
COLUMNS = [("leaderboard", "leaderboard", ".4f"), ("dice", "dice", ".4f"), ("surface_dice", "surf_dice", ".4f"),
           ("voi_score", "voi_score", ".4f"), ("topo_score", "topo", ".4f"), ("cldice", "cldice", ".4f"),
           ("steps", "steps", "d"), ("train_seconds", "train_s", ".0f"), ("steps_per_s", "steps/s", ".2f"),
           ("eval_seconds", "eval_s", ".0f")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (data, model, training)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES), help="losses to compare")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last",
                        help="score last.pt (exactly --steps) or best.pt (best validation Dice)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_losses"),
                        help="runs go to <run-dir>/<loss>; spare synthetic data to <run-dir>/data")
    parser.add_argument("--out", type=Path, help="results JSON (default: <run-dir>/results.json)")
    parser.add_argument("--min-delta", type=float, default=0.002,
                        help="smallest mean delta called a change in the verdicts against 'dice'")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.001")
    return parser.parse_args(argv)


def loss_config(args: argparse.Namespace, name: str, data_root: str) -> Config:
    """The config of one run: user overrides, then this benchmark's data root, steps, loss, run folder and metrics."""
    fixed = [f"data.root={data_root}", f"train.steps={args.steps}", f"train.loss={json.dumps(LOSSES[name])}",
             f"output_dir={args.run_dir / name}", "evaluate.split=test", f"evaluate.metrics={json.dumps(ALL_METRICS)}",
             "evaluate.save_probabilities=false"]
    return load_config(args.config, ["train.max_minutes=0", *args.overrides, *fixed])


def run_loss(args: argparse.Namespace, name: str, data_root: str) -> dict:
    """Train and evaluate one loss weighting; returns its timings, loss weights and metrics."""
    cfg = loss_config(args, name, data_root)
    log.info("loss %s %s: training %d steps into %s", name, LOSSES[name], cfg.train.steps, cfg.output_dir)
    run_dir = RunDir(train(cfg))
    start = time.perf_counter()
    payload = evaluate(cfg, run_dir.checkpoint(args.checkpoint), run_dir.eval)
    run = run_dir.path
    eval_seconds = time.perf_counter() - start
    per_fragment = {i: {m: s[m] for m in ALL_METRICS} for i, s in payload["fragments"].items()}
    mean, std = mean_and_std(per_fragment)
    log.info("loss %s: leaderboard %.4f, dice %.4f", name, mean["leaderboard"], mean["dice"])
    return {"loss": LOSSES[name], "run": str(run), "checkpoint": args.checkpoint, **read_train_log(run),
            "eval_seconds": eval_seconds, "mean": mean, "std": std, "fragments": per_fragment,
            "config": to_dict(cfg)}


def print_report(results: dict[str, dict], lines: list[str]) -> None:
    """The results table (means over test fragments), the spread, and the verdict lines, on stdout."""
    first = next(iter(results.values()))
    print(f"\n{len(first['fragments'])} test fragments ({', '.join(first['fragments'])}); {first['checkpoint']}.pt; "
          f"metrics are means over fragments; train_s = training loop seconds for 'steps' steps "
          f"(validation included), eval_s = evaluation seconds")
    rows = {name: {**r["mean"], **{k: r[k] for k in ("steps", "train_seconds", "steps_per_s", "eval_seconds")}}
            for name, r in results.items()}
    print(format_table(rows, COLUMNS, row_header="loss"))
    print("\nspread (std over fragments) of leaderboard / dice: " + "; ".join(
        f"{name} {r['std']['leaderboard']:.4f} / {r['std']['dice']:.4f}" for name, r in results.items()))
    if lines:
        print(VERDICT_RULE + " (one training seed: seed-to-seed variation is not measured)")
    for line in lines:
        print(line)


def run(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise VesuviusError(f"--steps must be >= 1, got {args.steps}")
    data_root = synthetic_root(args.config, args.overrides, args.run_dir / "data")
    results = {name: run_loss(args, name, data_root) for name in dict.fromkeys(args.losses)}
    lines = verdict_lines(results, "dice", ("leaderboard", "dice"), args.min_delta)
    print_report(results, lines)
    payload = {"steps": args.steps, "metrics": ALL_METRICS, "losses": results, "verdicts": lines,
               "verdict_rule": VERDICT_RULE, "min_delta": args.min_delta, "torch_threads": torch.get_num_threads()}
    write_json(args.out or args.run_dir / "results.json", payload)


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
