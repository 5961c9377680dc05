"""Recipes at equal compute: train each system for the same wall-clock minutes on the benchmark families, score the
held-out test fragments of every family.

Systems (``--systems``):

    default     the recipe of ``--config`` as it is (by default the built-in recipe: resunet3d at half resolution
                behind a strided stem, init_features 8, depth 3, 64^3 patches, Dice + BCE, mirrored test-time
                augmentation, ...), then its post-processing chosen on the val fragments (``--tune``)
    <model>     a plain MONAI-pipeline recipe for a registered model (basicunet, segresnet, dynunet, unet, resunet3d):
                the model's registry defaults (``model.kwargs={}``), 64^3 patches and windows, Dice + BCE, AdamW
                lr 1e-3, weight decay 1e-5, plain sliding-window inference (no test-time augmentation); everything
                else (augmentation, batch, schedule, validation interval, window overlap and blending,
                post-processing) from ``--config``. ``--default-inference unet`` also scores the same checkpoints
                with the default's inference (its TTA, then post-processing tuned on the val fragments).

Every system trains on the train split of the families (``bench/families.py``; the train split mixes
all families, the val split picks the checkpoint, ``--checkpoint best`` by default) for ``--minutes`` of wall-clock
time (``train.max_minutes``; ``train.steps`` is only a cap, ``--step-cap``, and the learning-rate schedule runs on
the time budget, with the warm-up scaled to keep the recipe's warmup_steps / steps share of it), one system after
the other, for each of ``--seeds``. Then ``vesuvius_monai.engine.evaluate``
predicts every test fragment and scores it (Dice, the leaderboard score and its three parts, VOI split / merge,
Betti errors); the bench adds the number of connected components of the prediction and of the label summed over
the scorer's 2 x 2 x 2 octants (ignore region set to background in both, connected as the scorer's Betti numbers:
6-connected with the exact Betti matching, else 26).

Overrides, applied in this order: the system's recipe, the trailing ``key=value`` overrides (every system), then
``--set SYSTEM:key=value`` (one system; repeatable). The bench sets the data, run folder, seed, time budget, step
cap and evaluation settings last.

Output: per seed, one table row per system and family (and 'all'): test fragments, steps trained, step of the
scored checkpoint, then mean [min-max] over the family's test fragments of every figure; then the means over seeds.
``<run-dir>/results.json`` (written atomically) holds everything, per fragment. Runs go to
``<run-dir>/seed<S>/<system>``; a finished run there with the same config is reused (not retrained), any other run
there is an error. The benchmark data are written once, one folder per family, under ``--data-dir`` (default under
data/bench_families/), and reused by later runs.
The CPU may be shared: the load average before and after each run is recorded beside its timings.

This file holds the command line; ``recipes_runs.py`` the runs (configs, training or reuse, the rows of a run and
the folders they are evaluated into), ``recipes_report.py`` the summaries, tables, leaders and verdicts.

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_recipes.py --minutes 6 --seeds 0 1 --default-inference unet
    PYTHONPATH=. .venv/bin/python bench/bench_recipes.py --minutes 1 --seeds 0 --systems default basicunet
    PYTHONPATH=. .venv/bin/python bench/bench_recipes.py --minutes 6 --set basicunet:train.lr=0.0005 train.batch_size=4
    # smoke: a few seconds
    PYTHONPATH=. .venv/bin/python bench/bench_recipes.py --minutes 0.03 --fragment-shape 32 --split 1 1 1 \\
        --families packed thin --systems default basicunet transforms.patch_size=[32,32,32] infer.roi_size=[32,32,32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from _common import run_main, verdict_rule, write_json
from families import FAMILIES, FAMILY_NAMES, SplitCounts, check_families, read_family_info, write_families
from recipes_report import VERDICT_UNIT, print_report, summarize_run, verdicts
from recipes_runs import METRICS, recipe, run_system
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.models import list_models

DEFAULT_SYSTEMS = ["default", "basicunet", "segresnet", "dynunet", "unet"]


def system_names() -> list[str]:
    return ["default", *list_models()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML config: the default recipe, and the settings the MONAI recipes "
                        "inherit (default: the built-in recipe)")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget of every run "
                        "(train.max_minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (cfg.seed)")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, help=f"of {system_names()}")
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES), help=f"of {list(FAMILY_NAMES)}")
    parser.add_argument("--fragment-shape", type=int, default=96, help="edge of the cubic benchmark fragments")
    parser.add_argument("--split", type=int, nargs=3, default=[2, 1, 2], metavar=("TRAIN", "VAL", "TEST"),
                        help="fragments per family in each split")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the benchmark fragments")
    parser.add_argument("--data-dir", type=Path, help="benchmark data folder (default: data/bench_families/"
                        "<shape>_s<data-seed>_<train>-<val>-<test>)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_recipes"), help="runs go to "
                        "<run-dir>/seed<S>/<system>")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="score best.pt (best validation Dice) or last.pt")
    parser.add_argument("--step-cap", type=int, default=100_000, help="train.steps of every run: a cap only, the "
                        "time budget ends the runs")
    parser.add_argument("--set", dest="system_overrides", action="append", default=[], metavar="SYSTEM:key=value",
                        help="an override for one system (repeatable)")
    parser.add_argument("--tune", nargs="*", default=["default"], metavar="SYSTEM",
                        help="systems whose post-processing is chosen on the val fragments after training "
                             "(tune-postprocess, part of the recipe; its seconds are reported); default: default")
    parser.add_argument("--default-inference", nargs="*", default=[], metavar="SYSTEM",
                        help="MONAI systems also scored with the default's inference: the same checkpoint with the "
                             "test-time augmentation of --config (row <system>_tta) and then with post-processing "
                             "tuned on the val fragments as the default's is (row <system>_tta_tuned, a competitor "
                             "in the leader counts)")
    parser.add_argument("--min-delta", type=float, default=0.002,
                        help="smallest mean delta called a change in the verdicts against 'default'")
    parser.add_argument("--out", type=Path, help="results JSON (default: <run-dir>/results.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every system")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """Validate the arguments; returns the per-system overrides of ``--set``."""
    known = system_names()
    for name in args.systems:
        if name not in known:
            raise VesuviusError(f"--systems: unknown system {name!r}; known: {', '.join(known)}")
    if len(set(args.systems)) != len(args.systems) or len(set(args.seeds)) != len(args.seeds):
        raise VesuviusError("--systems and --seeds must not repeat a value")
    for name in args.default_inference:
        if name == "default" or name not in args.systems or name in args.tune:
            raise VesuviusError(f"--default-inference: {name!r} must be one of --systems other than 'default' and "
                                f"not in --tune")
    if not args.minutes > 0:
        raise VesuviusError(f"--minutes must be > 0, got {args.minutes}")
    if args.step_cap < 1 or args.fragment_shape < 8:
        raise VesuviusError("--step-cap must be >= 1 and --fragment-shape >= 8")
    per_system: dict[str, list[str]] = {name: [] for name in args.systems}
    for item in args.system_overrides:
        name, sep, override = item.partition(":")
        if not sep or name not in per_system or "=" not in override:
            raise VesuviusError(f"--set {item!r}: expected SYSTEM:key=value with SYSTEM one of {args.systems}")
        per_system[name].append(override)
    return per_system


# --------------------------------------------------------------------------- data


def prepare_data(args: argparse.Namespace) -> tuple[Path, dict[str, dict]]:
    """Write (or reuse) each chosen family in its own folder ``<data-dir>/<family>``; a dataset YAML in the run
    folder lists their fragments (absolute paths). Returns that YAML and ``{fragment id: {family, generator, split,
    measured}}`` of its fragments.
    """
    counts = SplitCounts(train=args.split[0], val=args.split[1], test=args.split[2])
    shape = (args.fragment_shape,) * 3
    data_dir = args.data_dir or Path("data/bench_families") / (
        f"{args.fragment_shape}_s{args.data_seed}_{counts.train}-{counts.val}-{counts.test}")
    check_families(args.families)
    chosen, info = [], {}
    for family in args.families:
        dataset = write_families(data_dir / family, [family], seed=args.data_seed, shape=shape, counts=counts)
        info.update(read_family_info(dataset))
        chosen += [dict(e, image=str((dataset.parent / e["image"]).resolve()),
                        label=str((dataset.parent / e["label"]).resolve()))
                   for e in yaml.safe_load(dataset.read_text())["fragments"]]
    dataset = args.run_dir / "dataset.yaml"
    write_text(dataset, yaml.safe_dump({"source": str(data_dir.resolve()), "fragments": chosen}, sort_keys=False))
    return dataset, info


def run(args: argparse.Namespace) -> None:
    per_system = check_args(args)
    dataset, info = prepare_data(args)
    results, summaries = [], []
    for seed in args.seeds:
        for name in args.systems:
            for row in run_system(args, name, per_system[name], dataset, seed, info):
                results.append(row)
                summaries.append(summarize_run(row, args.families))
    lines = verdicts(results, args.min_delta)
    print_report(args, results, summaries, info, lines)
    recipes = {name: [*recipe(name), *args.overrides, *per_system[name]] for name in args.systems}
    payload = {"command": sys.argv, "minutes": args.minutes, "seeds": args.seeds, "systems": args.systems,
               "recipes": recipes, "families": {f: dict(stresses=FAMILIES[f].stresses, property=FAMILIES[f].property)
                                               for f in args.families},
               "dataset": str(dataset), "fragments": info, "metrics": METRICS, "step_cap": args.step_cap,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "runs": [dict(r, summary=s) for r, s in zip(results, summaries)], "verdicts": lines,
               "verdict_rule": verdict_rule(VERDICT_UNIT), "min_delta": args.min_delta}
    write_json(args.out or args.run_dir / "results.json", payload)


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
