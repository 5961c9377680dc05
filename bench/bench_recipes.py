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
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import (format_table, octant_components, read_train_log, run_main, spread, spread_text,
                     verdict_lines, verdict_rule, with_overrides, write_json)
from families import FAMILIES, FAMILY_NAMES, SplitCounts, check_families, read_family_info, write_families
from vesuvius_monai.config import Config, build, config_from_raw, mapping_layer, to_dict
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.evaluate import evaluate
from vesuvius_monai.engine.infer import with_tta, without_tta
from vesuvius_monai.engine.train import train
from vesuvius_monai.engine.tune import read_choice, tune_postprocess
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import POSTPROCESS_FILE, RunDir
from vesuvius_monai.metrics.betti import betti_connectivity
from vesuvius_monai.models import list_models

log = logging.getLogger("bench_recipes")

PLAIN_MONAI = ["model.kwargs={}", "transforms.patch_size=[64,64,64]", "infer.roi_size=[64,64,64]",
               "train.loss={dice: 1.0, bce: 1.0}", "train.lr=0.001", "train.weight_decay=0.00001",
               "infer.tta_flip_axes=[]", "infer.tta_rot90=false"]
DEFAULT_SYSTEMS = ["default", "basicunet", "segresnet", "dynunet", "unet"]
METRICS = ["dice", "leaderboard", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge",
           "betti_error_0", "betti_error_1", "betti_error_2"]
# (key, header, format) of the per-fragment figures shown in the tables
SHOWN = [("dice", "dice", ".4f"), ("leaderboard", "score", ".4f"), ("topo_score", "topo", ".3f"),
         ("surface_dice", "surf_dice", ".4f"), ("voi_score", "voi_score", ".3f"), ("voi_merge", "voi_merge", ".3f"),
         ("betti_error_1", "b1_err", ".1f"), ("pred_components", "comp_pred", ".1f"),
         ("label_components", "comp_label", ".1f")]


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


# --------------------------------------------------------------------------- one run


def system_config(args: argparse.Namespace, name: str, extra: list[str], dataset: Path, seed: int) -> Config:
    """Config of one run: recipe, common overrides, the system's --set overrides, then the bench's fixed keys.

    ``train.steps`` becomes the cap; ``train.warmup_steps`` is scaled with it so that the warm-up keeps the recipe's
    share of the run (warmup_steps / steps of the recipe, e.g. 20 / 400 = 5 % of the time budget).
    """
    recipe = [] if name == "default" else [f"model.name={name}", *PLAIN_MONAI]
    own = with_overrides(args.config, [*recipe, *args.overrides, *extra])
    warmup = round(args.step_cap * own.train.warmup_steps / own.train.steps)
    fixed = [f"seed={seed}", f"output_dir={args.run_dir / f'seed{seed}' / name}", f"data.dataset={dataset}",
             f"train.max_minutes={args.minutes}", f"train.steps={args.step_cap}", f"train.warmup_steps={warmup}",
             "evaluate.split=test", f"evaluate.metrics={json.dumps(METRICS)}", "evaluate.save_probabilities=false",
             "evaluate.save_masks=true"]
    return with_overrides(args.config, [*recipe, *args.overrides, *extra, *fixed])


def finished_run(cfg: Config) -> dict | None:
    """The metrics.json of a finished run of exactly this config in ``output_dir``, else None (the saved config is
    resolved first, so that sections added since it was saved compare at their defaults)."""
    run = RunDir(cfg.output_dir)
    metrics, saved = run.eval / "metrics.json", run.config
    if metrics.is_file() and saved.is_file() and to_dict(config_from_raw(yaml.safe_load(saved.read_text()), [])) \
            == to_dict(cfg):
        return json.loads(metrics.read_text())
    return None


def mask_components(mask: np.ndarray, label: np.ndarray, ignore_index: int, connectivity: int) -> tuple[int, int]:
    """Octant component counts (prediction, label) of a bool mask and its label (z, y, x), ignore region set to
    background in both, components ``connectivity``-connected (the scorer's Betti numbers' connectivity)."""
    keep = label != ignore_index
    return (octant_components(mask & keep, connectivity=connectivity),
            octant_components((label == 1) & keep, connectivity=connectivity))


def fragment_components(eval_dir: Path, frag_id: str, label_path: str, ignore_index: int,
                        connectivity: int) -> tuple[int, int]:
    """:func:`mask_components` of one test fragment's mask written by ``evaluate`` into ``eval_dir``."""
    mask_path = eval_dir / "predictions" / f"{frag_id}_mask.nii.gz"
    if not mask_path.is_file():
        raise VesuviusError(f"{mask_path} not found: evaluate did not write the predicted mask")
    return mask_components(open_volume(mask_path).read().astype(bool), open_volume(label_path).read(),
                           ignore_index, connectivity)


def scored_fragments(eval_dir: Path, payload: dict, cfg: Config, dataset: Path, info: dict[str, dict]) -> dict:
    """``{fragment id: figures}`` of one evaluation, with the octant component counts of its masks."""
    labels = {e["id"]: e["label"] for e in yaml.safe_load(dataset.read_text())["fragments"]}
    connectivity = betti_connectivity(cfg.evaluate.leaderboard.topo_matching)
    fragments = {}
    for frag_id, scores in payload["fragments"].items():
        pred_c, label_c = fragment_components(eval_dir, frag_id, labels[frag_id], cfg.data.ignore_index,
                                              connectivity)
        fragments[frag_id] = {"family": info[frag_id]["family"], "generator": info[frag_id]["generator"],
                              **{m: scores[m] for m in METRICS}, "pred_components": pred_c,
                              "label_components": label_c}
    return fragments


def tuned_config(cfg: Config, checkpoint: Path, folder: Path) -> tuple[Config, float]:
    """``cfg`` with the post-processing chosen on the val fragments into ``folder/postprocess.json`` (tuned now unless
    an earlier choice is there) and the seconds the tuning took (NaN when reused)."""
    seconds = float("nan")
    if not (folder / POSTPROCESS_FILE).is_file():
        start = time.perf_counter()
        tune_postprocess(cfg, checkpoint, folder)
        seconds = time.perf_counter() - start
    return build([mapping_layer("", to_dict(cfg)), read_choice(folder / POSTPROCESS_FILE)]), seconds


def default_inference(args: argparse.Namespace, name: str, cfg: Config, run: Path,
                      checkpoint: Path) -> tuple[list[tuple], float]:
    """Variants of a MONAI system's run given the default's inference: (row name, config, evaluation folder) of
    ``<name>_tta`` (the test-time augmentation of ``--config`` with its overrides, the config's post-processing)
    and ``<name>_tta_tuned`` (that TTA, post-processing tuned on the val fragments into ``<run>/tune_tta/``); and
    the seconds the tuning took (NaN when an earlier tuning there is reused)."""
    recipe = with_overrides(args.config, args.overrides).infer
    tta = with_tta(cfg, recipe.tta_flip_axes, recipe.tta_rot90)
    tuned, seconds = tuned_config(tta, checkpoint, run / "tune_tta")
    return [(f"{name}_tta", tta, "eval_tta"), (f"{name}_tta_tuned", tuned, "eval_tta_tuned")], seconds


def same_scoring(saved: dict, cfg: Config) -> bool:
    """Whether an evaluation's saved config used ``cfg``'s inference, post-processing and evaluation settings (the
    bench's metrics and saved masks)."""
    mine = to_dict(cfg)
    return all(saved.get(key) == mine[key] for key in ("infer", "postprocess", "evaluate"))


def evaluation(cfg: Config, checkpoint: Path, out: Path) -> tuple[dict, float]:
    """``out/metrics.json`` when it holds an evaluation with ``cfg``'s inference and post-processing, else a new one
    into ``out``; returns it and the seconds spent (0 when reused)."""
    metrics = out / "metrics.json"
    if metrics.is_file():
        payload = json.loads(metrics.read_text())
        if same_scoring(payload.get("config", {}), cfg):
            return payload, 0.0
    start = time.perf_counter()
    payload = evaluate(cfg, checkpoint, out)
    return payload, time.perf_counter() - start


def run_system(args: argparse.Namespace, name: str, extra: list[str], dataset: Path, seed: int,
               info: dict[str, dict]) -> list[dict]:
    """Train (or reuse) and evaluate one system for one seed; returns its rows: timings and per-fragment figures.

    A system in ``--tune`` gets its post-processing chosen on the val fragments after training (``tune-postprocess``;
    a reused run is tuned now if it never was) and two rows: ``name`` scored with that choice, ``<name>_untuned``
    with the config's post-processing (one checkpoint); with test-time augmentation in its config also
    ``<name>_plain``, without TTA and with the config's post-processing. A system in ``--default-inference`` also
    gets the rows of :func:`default_inference`. A fresh run's first evaluation goes to ``eval/`` (tuned for a
    ``--tune`` system), the others to ``eval_tuned/``, ``eval_untuned/``, ``eval_plain/``, ``eval_tta/``,
    ``eval_tta_tuned/``.
    """
    cfg = system_config(args, name, extra, dataset, seed)
    run_dir = RunDir(cfg.output_dir)
    run, checkpoint = run_dir.path, run_dir.checkpoint(args.checkpoint)
    load_before = os.getloadavg()
    reused = finished_run(cfg) is not None
    if not reused:
        log.info("system %s, seed %d: training %.2f min (%s %s) into %s", name, seed, args.minutes, cfg.model.name,
                 cfg.model.kwargs, run)
        train(cfg)
    tune_seconds = float("nan")
    variants = [(name, cfg, "eval_untuned")]  # (row name, config, its evaluation folder unless it is the first)
    if name in args.tune:
        tuned, tune_seconds = tuned_config(cfg, checkpoint, run)
        variants = [(name, tuned, "eval_tuned"), (f"{name}_untuned", cfg, "eval_untuned")]
        if cfg.infer.tta_flip_axes or cfg.infer.tta_rot90:
            variants.append((f"{name}_plain", without_tta(cfg), "eval_plain"))
    tune_times = {}  # row name -> seconds of its own tuning, where it is not the run's
    if name in args.default_inference:
        tta_variants, tune_times[f"{name}_tta_tuned"] = default_inference(args, name, cfg, run, checkpoint)
        variants += tta_variants
    first = json.loads((run_dir.eval / "metrics.json").read_text()) if reused else None
    common = {"seed": seed, "run": str(run), "reused": reused, "model": cfg.model.name,
              "model_kwargs": cfg.model.kwargs, "patch_size": list(cfg.transforms.patch_size),
              "component_connectivity": betti_connectivity(cfg.evaluate.leaderboard.topo_matching),
              "checkpoint": args.checkpoint, "scored_step": Checkpoint.load(checkpoint).step,
              **read_train_log(run), "tune_seconds": tune_seconds, "load_before": list(load_before)}
    rows = []
    for system, variant, folder in variants:
        pp = to_dict(variant)["postprocess"]
        in_eval = first is None and not rows or first is not None and same_scoring(first["config"], variant)
        out = run_dir.eval if in_eval else run / folder
        payload, seconds = evaluation(variant, checkpoint, out)
        rows.append(dict(common, system=system, eval_seconds=seconds, postprocess=pp, config=to_dict(variant),
                         tune_seconds=tune_times.get(system, common["tune_seconds"]),
                         fragments=scored_fragments(out, payload, variant, dataset, info)))
    load_after = list(os.getloadavg())
    return [dict(r, load_after=load_after) for r in rows]


# --------------------------------------------------------------------------- summaries and tables


def family_groups(fragments: dict[str, dict], families: list[str]) -> dict[str, list[str]]:
    """Fragment ids per family (in ``families`` order, those with test fragments) plus 'all'."""
    groups = {f: [i for i, r in fragments.items() if r["family"] == f] for f in families}
    groups = {f: ids for f, ids in groups.items() if ids}
    groups["all"] = list(fragments)
    return groups


def summarize_run(result: dict, families: list[str]) -> dict[str, dict[str, dict]]:
    """``{family or 'all': {figure: spread over its test fragments}}`` of one run."""
    frags = result["fragments"]
    return {group: {key: spread([frags[i][key] for i in ids]) for key, _, _ in SHOWN}
            for group, ids in family_groups(frags, families).items()}


def run_rows(result: dict, summary: dict) -> dict[str, dict]:
    """Table rows '<system> <family>' of one run: counts, steps, and mean [min-max] of every shown figure."""
    rows = {}
    for group, stats in summary.items():
        row = {"n": str(stats["dice"]["n"]), "steps": str(result["steps"]), "scored": str(result["scored_step"])}
        row.update({key: spread_text(stats[key], spec) for key, _, spec in SHOWN})
        rows[f"{result['system']} {group}"] = row
    return rows


def seed_rows(results: list[dict], summaries: list[dict]) -> dict[str, dict]:
    """Rows '<system> <family>' of the means over seeds: per-seed means [min-max over seeds], steps per seed."""
    rows: dict[str, dict] = {}
    systems = list(dict.fromkeys(r["system"] for r in results))
    for system in systems:
        mine = [(r, s) for r, s in zip(results, summaries) if r["system"] == system]
        for group in mine[0][1]:
            row = {"n": f"{len(mine)}x{mine[0][1][group]['dice']['n']}",
                   "steps": "/".join(str(r["steps"]) for r, _ in mine),
                   "scored": "/".join(str(r["scored_step"]) for r, _ in mine)}
            for key, _, spec in SHOWN:
                row[key] = spread_text(spread([s[group][key]["mean"] for _, s in mine if group in s]), spec)
            rows[f"{system} {group}"] = row
    return rows


COLUMNS = [("n", "n", "s"), ("steps", "steps", "s"), ("scored", "ckpt_step", "s"),
           *((key, header, "s") for key, header, _ in SHOWN)]
VERDICT_UNIT = "(seed, test fragment)"


def family_means(results: list[dict], summaries: list[dict], group: str, key: str) -> dict[str, float]:
    """``{system: mean over seeds of its per-seed mean of key}`` in one family (or 'all')."""
    per_system: dict[str, list[float]] = {}
    for r, s in zip(results, summaries):
        if group in s:
            per_system.setdefault(r["system"], []).append(s[group][key]["mean"])
    return {system: statistics.mean(values) for system, values in per_system.items()}


def leaders(results: list[dict], summaries: list[dict], families: list[str], systems: list[str]) -> list[str]:
    """Per family (and 'all'): the recipe (one of ``systems``; the ``_untuned`` / ``_plain`` / ``_tta`` rows are
    parts of a recipe, not recipes) of highest Dice and of highest leaderboard score, then how many families
    'default' leads."""
    lines, led, ranked = [], {"dice": 0, "leaderboard": 0}, 0
    for group in [*families, "all"]:
        best = []
        for key in ("dice", "leaderboard"):
            means = {k: v for k, v in family_means(results, summaries, group, key).items() if k in systems}
            if not means:
                continue
            winner = max(means, key=means.get)
            runner = max((v for k, v in means.items() if k != winner), default=float("nan"))
            best.append(f"{key} {winner} {means[winner]:.4f}" + (f" (next {runner:.4f})" if len(means) > 1 else ""))
            led[key] += winner == "default" and group != "all"
        if best:
            lines.append(f"{group:13s} " + "; ".join(best))
            ranked += group != "all"
    if "default" in systems and len(systems) > 1:
        lines.append(f"default leads {led['dice']} of {ranked} families in Dice and {led['leaderboard']} of "
                     f"{ranked} in leaderboard score")
    return lines


def verdicts(results: list[dict], min_delta: float) -> list[str]:
    """Leaderboard and Dice of every system against 'default', paired per (seed, test fragment); [] without it."""
    systems: dict[str, dict] = {}
    for r in results:
        fragments = systems.setdefault(r["system"], {"fragments": {}})["fragments"]
        fragments.update({f"seed {r['seed']} {i}": scores for i, scores in r["fragments"].items()})
    return verdict_lines(systems, "default", ("leaderboard", "dice"), min_delta, unit=VERDICT_UNIT)


def print_report(args: argparse.Namespace, results: list[dict], summaries: list[dict], info: dict[str, dict],
                 lines: list[str]) -> None:
    """Families, then one table per seed, the means over seeds and the verdicts against 'default', on stdout."""
    first = next((r for r in results if r["system"] not in args.tune), results[0])["config"]
    print(f"\nbenchmark families ({args.fragment_shape}^3, data seed {args.data_seed}); measured property on the "
          f"test fragments (mean [min-max]):")
    for family in args.families:
        prop = FAMILIES[family].property
        values = [v["measured"][prop] for v in info.values() if v["family"] == family and v["split"] == "test"]
        print(f"  {family:13s} {FAMILIES[family].stresses}; {prop} {spread_text(spread(values), '.3f')}")
    lb = first["evaluate"]["leaderboard"]
    print(f"\n{args.minutes:g} min of training per run (train.steps cap {args.step_cap}, warm-up the recipe's share of "
          f"the budget); {args.checkpoint}.pt scored "
          f"(its step: ckpt_step); post-processing: threshold {first['postprocess']['threshold']} (the config's), "
          f"chosen on the val fragments for {', '.join(args.tune) or 'no system'} (see 'runs'); TopoScore matching "
          f"'{lb['topo_matching']}'; cells: mean [min-max] over the test fragments of a family; comp_*: "
          f"{results[0]['component_connectivity']}-connected components (the scorer's Betti-0) summed over the 2x2x2 "
          f"octants; torch threads {torch.get_num_threads()}")
    for seed in args.seeds:
        rows = {}
        for result, summary in zip(results, summaries):
            if result["seed"] == seed:
                rows.update(run_rows(result, summary))
        print(f"\nseed {seed}")
        print(format_table(rows, COLUMNS, row_header="system family"))
    if len(args.seeds) > 1:
        print(f"\nmeans over seeds {args.seeds}: cells are the mean of the per-seed means [min-max over seeds]; "
              f"steps and ckpt_step per seed")
        print(format_table(seed_rows(results, summaries), COLUMNS, row_header="system family"))
    print("\nleader per family (mean over seeds of the per-seed means; most families led = the recipe to beat):")
    for line in leaders(results, summaries, args.families, args.systems):
        print("  " + line)
    if args.default_inference:
        rivals = [*args.systems, *(f"{name}_tta_tuned" for name in args.default_inference)]
        print(f"\nthe same with {', '.join(args.default_inference)} also given the default's inference:")
        for line in leaders(results, summaries, args.families, rivals):
            print("  " + line)
    if lines:
        print("\n" + verdict_rule(VERDICT_UNIT))
        for line in lines:
            print(line)
    print("\nruns (training steps, seconds, steps/s, evaluation seconds, load average before -> after):")
    for r in results:
        print(f"  seed {r['seed']} {r['system']:10s} {r['model']} {r['model_kwargs']} patch {r['patch_size']}: "
              f"{r['steps']} steps in {r['train_seconds']:.0f} s ({r['steps_per_s']:.2f}/s), eval "
              f"{r['eval_seconds']:.0f} s, tuning {r['tune_seconds']:.0f} s, postprocess {r['postprocess']}, load "
              f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"
              + (" (reused)" if r["reused"] else ""))


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
    recipes = {name: ([] if name == "default" else [f"model.name={name}", *PLAIN_MONAI]) + args.overrides
               + per_system[name] for name in args.systems}
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
