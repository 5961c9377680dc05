"""The report of ``bench_recipes.py``: per-run summaries over the families' test fragments, the tables (per seed and
the means over seeds), the leader of every family and the verdicts against 'default', printed on stdout.

A run's row (:func:`recipes_runs.run_system`) holds ``{fragment id: figures}`` in ``fragments``; its summary is
``{family or 'all': {figure: spread over the family's test fragments}}``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import format_table, spread, spread_text, verdict_lines, verdict_rule
from families import FAMILIES

# (key, header, format) of the per-fragment figures shown in the tables
SHOWN = [("dice", "dice", ".4f"), ("leaderboard", "score", ".4f"), ("topo_score", "topo", ".3f"),
         ("surface_dice", "surf_dice", ".4f"), ("voi_score", "voi_score", ".3f"), ("voi_merge", "voi_merge", ".3f"),
         ("betti_error_1", "b1_err", ".1f"), ("pred_components", "comp_pred", ".1f"),
         ("label_components", "comp_label", ".1f")]
COLUMNS = [("n", "n", "s"), ("steps", "steps", "s"), ("scored", "ckpt_step", "s"),
           *((key, header, "s") for key, header, _ in SHOWN)]
VERDICT_UNIT = "(seed, test fragment)"


# --------------------------------------------------------------------------- summaries and table rows


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


# --------------------------------------------------------------------------- leaders and verdicts


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


# --------------------------------------------------------------------------- the printed report


def print_families(args: argparse.Namespace, info: dict[str, dict]) -> None:
    """The families and their measured property on the test fragments."""
    print(f"\nbenchmark families ({args.fragment_shape}^3, data seed {args.data_seed}); measured property on the "
          f"test fragments (mean [min-max]):")
    for family in args.families:
        prop = FAMILIES[family].property
        values = [v["measured"][prop] for v in info.values() if v["family"] == family and v["split"] == "test"]
        print(f"  {family:13s} {FAMILIES[family].stresses}; {prop} {spread_text(spread(values), '.3f')}")


def print_settings(args: argparse.Namespace, results: list[dict]) -> None:
    """The training budget, the scored checkpoint, the post-processing and the meaning of the cells."""
    first = next((r for r in results if r["system"] not in args.tune), results[0])["config"]
    lb = first["evaluate"]["leaderboard"]
    print(f"\n{args.minutes:g} min of training per run (train.steps cap {args.step_cap}, warm-up the recipe's share of "
          f"the budget); {args.checkpoint}.pt scored "
          f"(its step: ckpt_step); post-processing: threshold {first['postprocess']['threshold']} (the config's), "
          f"chosen on the val fragments for {', '.join(args.tune) or 'no system'} (see 'runs'); TopoScore matching "
          f"'{lb['topo_matching']}'; cells: mean [min-max] over the test fragments of a family; comp_*: "
          f"{results[0]['component_connectivity']}-connected components (the scorer's Betti-0) summed over the 2x2x2 "
          f"octants; torch threads {torch.get_num_threads()}")


def print_tables(args: argparse.Namespace, results: list[dict], summaries: list[dict]) -> None:
    """One table per seed, then (several seeds) the means over seeds."""
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


def print_leaders(args: argparse.Namespace, results: list[dict], summaries: list[dict]) -> None:
    """The leader of every family among the systems, then with the ``--default-inference`` rows as rivals."""
    print("\nleader per family (mean over seeds of the per-seed means; most families led = the recipe to beat):")
    for line in leaders(results, summaries, args.families, args.systems):
        print("  " + line)
    if args.default_inference:
        rivals = [*args.systems, *(f"{name}_tta_tuned" for name in args.default_inference)]
        print(f"\nthe same with {', '.join(args.default_inference)} also given the default's inference:")
        for line in leaders(results, summaries, args.families, rivals):
            print("  " + line)


def print_runs(results: list[dict]) -> None:
    """One line per row: training steps and seconds, evaluation and tuning seconds, load average."""
    print("\nruns (training steps, seconds, steps/s, evaluation seconds, load average before -> after):")
    for r in results:
        print(f"  seed {r['seed']} {r['system']:10s} {r['model']} {r['model_kwargs']} patch {r['patch_size']}: "
              f"{r['steps']} steps in {r['train_seconds']:.0f} s ({r['steps_per_s']:.2f}/s), eval "
              f"{r['eval_seconds']:.0f} s, tuning {r['tune_seconds']:.0f} s, postprocess {r['postprocess']}, load "
              f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"
              + (" (reused)" if r["reused"] else ""))


def print_report(args: argparse.Namespace, results: list[dict], summaries: list[dict], info: dict[str, dict],
                 lines: list[str]) -> None:
    """Families, then one table per seed, the means over seeds and the verdicts against 'default', on stdout."""
    print_families(args, info)
    print_settings(args, results)
    print_tables(args, results, summaries)
    print_leaders(args, results, summaries)
    if lines:
        print("\n" + verdict_rule(VERDICT_UNIT))
        for line in lines:
            print(line)
    print_runs(results)
