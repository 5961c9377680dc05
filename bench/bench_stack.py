"""The inference stack on the benchmark families: topology post-processing chosen by the exact score, and ensembles.

Trains (or reuses) runs on the families' train split with the schedule on steps (``stack_runs.py``), predicts the
val and test fragments of each once (the default's inference: mirrored TTA), then post-processes and scores:

1. operators: the chain tuned on the val fragments (``tune-postprocess``'s search), and each operator's gain on the
   test fragments in the order the search accepted them, for the default and for MONAI's UNet;
2. the tuned chain against today's tuner (threshold and dust only) and the field's best published fixed chain (12th
   place: hysteresis 0.30 / 0.85, opening, anisotropic closing z2 / yx1, dust 100) on the same probabilities;
3. ensembles of 2 and 3 default runs against one run, at equal steps per member and at equal total steps, each with
   its chain tuned on val.

Usage::

    PYTHONPATH=bench .venv/bin/python bench/bench_stack.py --steps 1500
    PYTHONPATH=bench .venv/bin/python bench/bench_stack.py --steps 1500 --train-only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from _common import format_table, run_main, write_json
from bench_recipes import prepare_data
from families import FAMILY_NAMES
from stack_analysis import FIXED_12TH, OLD_TUNER, chain_row, operator_gains, predict_split, tune
from stack_runs import RunSpec, ensure_trained, run_config
from vesuvius_monai.config import Config, TuneConfig, build, dotted_layer, load_config, mapping_layer, to_dict

log = logging.getLogger("bench_stack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps of a single run (and of each "
                        "member at equal steps per member)")
    parser.add_argument("--members", type=int, default=3, help="largest ensemble")
    parser.add_argument("--systems", nargs="+", default=["default", "unet"], help="systems whose chain is tuned")
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES))
    parser.add_argument("--fragment-shape", type=int, default=96)
    parser.add_argument("--split", type=int, nargs=3, default=[2, 1, 2], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_stack"))
    parser.add_argument("--train-only", action="store_true", help="train the runs, then stop")
    parser.add_argument("--report", action="store_true", help="print the report of <run-dir>/results.json again")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every run")
    return parser.parse_args(argv)


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Every run the bench needs: each system at ``--steps`` (seed 0), the default's further seeds at ``--steps``,
    and k runs of ``--steps / k`` steps for k = 2 .. ``--members`` (equal total steps)."""
    specs = [RunSpec(system, 0, args.steps) for system in args.systems]
    specs += [RunSpec("default", seed, args.steps) for seed in range(1, args.members)]
    for k in range(2, args.members + 1):
        specs += [RunSpec("default", seed, args.steps // k) for seed in range(k)]
    return specs


def systems(args: argparse.Namespace) -> dict[str, list[RunSpec]]:
    """The scored systems: each trained system alone, then the default's ensembles of k = 2 .. ``--members`` runs at
    equal steps per member (``ens<k>_per_member``) and at equal total steps (``ens<k>_total``)."""
    out = {spec.system: [spec] for spec in (RunSpec(system, 0, args.steps) for system in args.systems)}
    for k in range(2, args.members + 1):
        out[f"ens{k}_per_member"] = [RunSpec("default", seed, args.steps) for seed in range(k)]
        out[f"ens{k}_total"] = [RunSpec("default", seed, args.steps // k) for seed in range(k)]
    return out


def inference_config(args: argparse.Namespace, spec: RunSpec, dataset: Path) -> Config:
    """The config every system predicts with: the run's, with the default's inference (its test-time augmentation),
    so that systems differ only in their networks."""
    default_tta = load_config(None, args.overrides).infer.tta_flip_axes
    own = run_config(spec, dataset, args.run_dir, args.overrides)
    return build([mapping_layer("", to_dict(own)), dotted_layer("bench_stack", {"infer.tta_flip_axes": default_tta})])


def score_system(args, name: str, specs: list[RunSpec], dataset: Path, families: dict[str, str]) -> dict:
    """Predict val and test once, tune (old and new tuner) on val, score the chains on test."""
    cfg = inference_config(args, specs[0], dataset)
    checkpoints = [ensure_trained(spec, dataset, args.run_dir, args.overrides) for spec in specs]
    val = predict_split(cfg, checkpoints, "val", args.run_dir / "probs" / f"{name}_val.npz")
    test = predict_split(cfg, checkpoints, "test", args.run_dir / "probs" / f"{name}_test.npz")
    rows = {"base": chain_row(f"{name} base", cfg.postprocess, test, families),
            "fixed_12th": chain_row(f"{name} fixed 12th", FIXED_12TH, test, families)}
    result = {"runs": [spec.name for spec in specs], "steps": [spec.steps for spec in specs]}
    for tuner, tune_cfg in (("old_tuned", OLD_TUNER), ("chain_tuned", TuneConfig())):
        start = time.perf_counter()
        choice = tune(val, cfg.postprocess, tune_cfg)
        result[f"{tuner}_seconds"] = time.perf_counter() - start
        rows[tuner] = chain_row(f"{name} {tuner}", choice.chosen, test, families)
        rows[tuner]["reason"] = choice.reason
        if tuner == "chain_tuned":
            result["operator_gains"] = operator_gains(choice, test)
    result["rows"] = rows
    return result


COLUMNS = [("score", "LB score", ".4f"), ("dice", "Dice", ".4f"), ("topo_score", "TopoScore", ".3f"),
           ("surface_dice", "SurfDice", ".4f"), ("voi_score", "VOI score", ".4f")]


def print_report(results: dict[str, dict]) -> None:
    """The tables of the module docstring, on stdout."""
    table = {f"{name} / {row}": values for name, r in results.items() for row, values in r["rows"].items()}
    print("\nmean over the test fragments (same probabilities per system; tuned on the val fragments)")
    print(format_table(table, COLUMNS, "system / chain"))
    ref = results["default"]["rows"]["old_tuned"] if "default" in results else None
    if ref is not None:
        print("\nagainst today's tuned default (default / old_tuned: threshold and dust tuned on val); steps trained")
        for name, r in results.items():
            row = r["rows"]["chain_tuned"]
            print(f"  {name} / chain_tuned: LB {row['score'] - ref['score']:+.4f}, "
                  f"Dice {row['dice'] - ref['dice']:+.4f}"
                  f"  ({len(r['steps'])} run(s) of {r['steps'][0]} steps, {sum(r['steps'])} in all)")
    print("\nheld out: test fragments on which the chain chosen on val scores below the base (threshold 0.5)")
    for name, r in results.items():
        base = r["rows"]["base"]["fragments"]
        for row in ("old_tuned", "chain_tuned"):
            frags = r["rows"][row]["fragments"]
            worse = [f for f in frags if frags[f]["score"] < base[f]["score"]]
            worse_dice = [f for f in frags if frags[f]["dice"] < base[f]["dice"]]
            print(f"  {name} {row}: score worse on {len(worse)} of {len(frags)}, Dice worse on {len(worse_dice)} "
                  f"of {len(frags)}")
    print("\nchosen chains")
    for name, r in results.items():
        for row in ("old_tuned", "chain_tuned"):
            print(f"  {name} {row} ({r[f'{row}_seconds']:.0f} s): {r['rows'][row]['chain']}")
    print("\neach operator's gain, in the order the search accepted them (val gain; test gain)")
    for name, r in results.items():
        steps = r["operator_gains"] or [{"operator": "(none)", "val_score_gain": 0.0, "test_score_gain": 0.0,
                                         "val_dice_gain": 0.0, "test_dice_gain": 0.0, "after": ""}]
        for g in steps:
            print(f"  {name}: {g['operator']} -> {g['after']}: score {g['val_score_gain']:+.4f}; "
                  f"{g['test_score_gain']:+.4f}   Dice {g['val_dice_gain']:+.4f}; {g['test_dice_gain']:+.4f}")
    families = sorted(next(iter(results.values()))["rows"]["base"]["family_scores"])
    print("\nper family: test LB score, tuned chain vs the fixed 12th-place chain")
    fam = {name: {**{f"{f}_t": r["rows"]["chain_tuned"]["family_scores"][f] for f in families},
                  **{f"{f}_f": r["rows"]["fixed_12th"]["family_scores"][f] for f in families}}
           for name, r in results.items()}
    print(format_table(fam, [c for f in families for c in ((f"{f}_t", f"{f[:8]} tuned", ".4f"),
                                                          (f"{f}_f", f"{f[:8]} 12th", ".4f"))], "system"))


def run(args: argparse.Namespace) -> None:
    if args.report:
        print_report(json.loads((args.run_dir / "results.json").read_text())["systems"])
        return
    dataset, info = prepare_data(args)
    for spec in run_specs(args):
        ensure_trained(spec, dataset, args.run_dir, args.overrides)
    if args.train_only:
        return
    families = {frag_id: v["family"] for frag_id, v in info.items()}
    results = {name: score_system(args, name, specs, dataset, families) for name, specs in systems(args).items()}
    print_report(results)
    write_json(args.run_dir / "results.json", {"command": sys.argv, "steps": args.steps, "systems": results})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
