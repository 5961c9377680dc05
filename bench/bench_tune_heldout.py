"""How often does a post-processing choice made on validation fragments lose on held-out test fragments?

For ``--splits`` random splits of a set of labelled fragments into validation and test, each tuner chooses the chain
on val (:func:`vesuvius_monai.tuning.search.search_chain`) and the chosen chain and the base (the config's
post-processing: threshold 0.5, nothing else) are scored on test by the exact leaderboard score. Every (fragment,
chain) is scored once and shared by all splits and tuners (the search's memo). Tuners:

    old       threshold + dust only, the majority guard, one sweep (the tuner before the chain search)
    majority  the whole chain, tune.rule=majority, no held-out check (tune.halves=0)
    robust    the whole chain, tune.rule=robust, no held-out check (the default before tune.halves)
    halves    the whole chain, tune.rule=robust, each change checked on resampled halves (the default TuneConfig)

Two sets of fragments:

* ``--probs DIR`` (default ``runs/bench_stack/probs``, written by ``bench_stack.py``): a network's probabilities of the
  benchmark families' val and test fragments (``<system>_val.npz`` and ``<system>_test.npz``, the labels from the
  ``dataset.yaml`` beside DIR), pooled; each split draws one validation fragment per family (``tune-postprocess``'s
  setting in bench_stack: 6 val) and tests on the rest. This is the measure that counts.
* ``--synthetic``: folded-sheet fragments (:func:`vesuvius_monai.data.folded.make_folded_fragment`) with
  label-derived probabilities (the label blurred, shifted by a smooth random field and voxel noise, a per-fragment
  error strength): within seconds, but not a network's errors.

Prints, per tuner: how often it changed the base, how often the chosen chain is worse than the base on test (score;
Dice), the mean test gain (score; Dice) and the mean search time (with the shared memo: later splits reuse earlier
scores). Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_tune_heldout.py --system default --splits 12
    PYTHONPATH=. .venv/bin/python bench/bench_tune_heldout.py --synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from vesuvius_monai.config import PostprocessConfig, TuneConfig
from vesuvius_monai.data.folded import FoldedParams, make_folded_fragment
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.tuning.scorer import FragmentScorer
from vesuvius_monai.tuning.search import score_chain, search_chain
from vesuvius_monai.tuning.space import describe_chain

log = logging.getLogger("bench_tune_heldout")

TUNERS = {
    "old": TuneConfig(operators=("threshold", "dust"), rule="majority", sweeps=1, halves=0),
    "majority": TuneConfig(rule="majority", halves=0),
    "robust": TuneConfig(halves=0),
    "halves": TuneConfig(),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--probs", type=Path, default=Path("runs/bench_stack/probs"),
                        help="bench_stack's probabilities folder")
    parser.add_argument("--system", default="default", help="whose probabilities (<system>_val.npz, _test.npz)")
    parser.add_argument("--synthetic", action="store_true", help="folded fragments with label-derived probabilities")
    parser.add_argument("--fragments", type=int, default=8, help="--synthetic: fragments made")
    parser.add_argument("--size", type=int, default=48, help="--synthetic: fragment edge (voxels)")
    parser.add_argument("--val", type=int, default=3, help="--synthetic: validation fragments per split")
    parser.add_argument("--splits", type=int, default=10, help="random val / test splits")
    parser.add_argument("--tuners", nargs="+", default=list(TUNERS), choices=list(TUNERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the per-split results here (JSON)")
    parser.add_argument("--memo", type=Path, help="keep every (fragment, chain) score here (JSON), read on a rerun")
    return parser.parse_args(argv)


def make_probs(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label-derived probabilities (Z, Y, X) in [0, 1] with spatially correlated errors (see the module docstring)."""
    strength = rng.uniform(0.15, 0.45)
    sheet = ndimage.gaussian_filter((label == 1).astype(np.float32), 1.0)
    field = ndimage.gaussian_filter(rng.normal(size=label.shape), 3.0)
    field *= strength / (field.std() + 1e-9)
    noise = ndimage.gaussian_filter(rng.normal(size=label.shape), 0.7) * strength * 0.5
    return np.clip(sheet * 1.2 - 0.1 + field + noise + rng.normal(0, 0.05), 0, 1).astype(np.float32)


def synthetic_set(args: argparse.Namespace, rng: np.random.Generator) -> tuple[list, list, list[str]]:
    """(probs, labels, groups): ``--fragments`` folded fragments, each its own group."""
    params = FoldedParams(shape=(args.size,) * 3)
    labels = [make_folded_fragment((args.seed, i), params)[1] for i in range(args.fragments)]
    return [make_probs(label, rng) for label in labels], labels, [str(i) for i in range(args.fragments)]


def network_set(args: argparse.Namespace) -> tuple[list, list, list[str], list[str]]:
    """(probs, labels, families, ids) of bench_stack's val and test fragments of ``--system``, pooled."""
    needed = [args.probs.parent / "dataset.yaml", *(args.probs / f"{args.system}_{s}.npz" for s in ("val", "test"))]
    if missing := [str(path) for path in needed if not path.is_file()]:
        raise SystemExit(f"error: {', '.join(missing)} not found: run bench_stack.py first (it predicts the "
                         f"fragments), or pass --synthetic")
    dataset = yaml.safe_load((args.probs.parent / "dataset.yaml").read_text())
    label_paths = {f["id"]: f["label"] for f in dataset["fragments"]}
    probs, labels, ids = [], [], []
    for split in ("val", "test"):
        stored = np.load(args.probs / f"{args.system}_{split}.npz")
        for fragment_id in stored.files:
            probs.append(stored[fragment_id])
            labels.append(open_volume(label_paths[fragment_id]).read())
            ids.append(fragment_id)
    return probs, labels, [i.rsplit("_", 1)[0] for i in ids], ids


def memo_source(args: argparse.Namespace) -> dict:
    """What a memo's scores belong to: the fragments and probabilities they were scored on."""
    if args.synthetic:
        return {"synthetic": True, "seed": args.seed, "size": args.size, "fragments": args.fragments}
    return {"probs": str(args.probs.resolve()), "system": args.system}


def read_memo(path: Path | None, source: dict, scorers: list, ids: list[str]) -> dict:
    """The search memo ((scorer, chain name) -> (score, dice)) kept at ``path`` by :func:`write_memo`; a memo of
    other fragments or probabilities is refused."""
    if path is None or not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    if stored.get("source") != source:
        raise SystemExit(f"error: --memo {path} holds scores of {stored.get('source')}, not of {source}: choose "
                         f"another --memo")
    by_id = dict(zip(ids, scorers))
    cells = (key.split("\t") + [value] for key, value in stored["cells"].items())
    return {(by_id[fragment], name): tuple(value) for fragment, name, value in cells if fragment in by_id}


def write_memo(path: Path | None, source: dict, memo: dict, scorers: list, ids: list[str]) -> None:
    """Keep ``memo`` at ``path`` as {"source": ..., "cells": {"<fragment id>\t<chain>": [score, dice]}}
    (atomically)."""
    if path is None:
        return
    name_of = {id(scorer): fragment_id for scorer, fragment_id in zip(scorers, ids)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"source": source, "cells": {f"{name_of[id(scorer)]}\t{name}": list(value)
                                                             for (scorer, name), value in memo.items()}}))


def draw_split(groups: list[str], val_count: int | None, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(val, test) indices: ``val_count`` at random, or (None) one per group."""
    if val_count is not None:
        order = rng.permutation(len(groups))
        return sorted(order[:val_count].tolist()), sorted(order[val_count:].tolist())
    val = [int(rng.choice([i for i, g in enumerate(groups) if g == group])) for group in sorted(set(groups))]
    return sorted(val), [i for i in range(len(groups)) if i not in val]


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    if args.synthetic:
        probs, labels, groups = synthetic_set(args, rng)
        ids = [f"folded_{i}" for i in range(len(probs))]
    else:
        probs, labels, groups, ids = network_set(args)
    scorers = [FragmentScorer(label) for label in labels]
    source_key = memo_source(args)
    memo = read_memo(args.memo, source_key, scorers, ids)

    def test_scores(cfg: PostprocessConfig, test: list[int]) -> np.ndarray:
        """(test fragments, 2): score and Dice of ``cfg`` on each, through the shared memo."""
        return np.stack(score_chain([probs[i] for i in test], [scorers[i] for i in test], cfg, memo=memo), axis=1)

    base = PostprocessConfig()
    rows: dict[str, list[dict]] = {name: [] for name in args.tuners}
    for split in range(args.splits):
        val, test = draw_split(groups, args.val if args.synthetic else None, rng)
        for name in args.tuners:
            start = time.perf_counter()
            choice = search_chain([probs[i] for i in val], [scorers[i] for i in val], base=base, tune=TUNERS[name],
                                  memo=memo)
            seconds = time.perf_counter() - start
            gain = (test_scores(choice.chosen, test) - test_scores(base, test)).mean(axis=0)
            rows[name].append({"split": split, "val": val, "chain": describe_chain(choice.chosen),
                               "changed": choice.chosen != base, "score_gain": float(gain[0]),
                               "dice_gain": float(gain[1]), "seconds": seconds})
            log.warning("split %d %s: %s; test gain %+.4f, Dice %+.4f (%.0f s)", split, name, describe_chain(
                choice.chosen), gain[0], gain[1], seconds)
        write_memo(args.memo, source_key, memo, scorers, ids)
    source = (f"{args.fragments} folded {args.size}^3 fragments, {args.val} val / {args.fragments - args.val} test"
              if args.synthetic else f"{len(groups)} fragments of {args.system} in {args.probs}, one val per family "
                                     f"({len(set(groups))}) / {len(groups) - len(set(groups))} test")
    print(f"{args.splits} splits of {source}; base: {describe_chain(base)}")
    print("| tuner | changed base | worse on test (score) | worse on test (Dice) | mean test gain (score) | "
          "mean test gain (Dice) | search s / split |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        changed, gain, dice, seconds = (np.array([r[k] for r in results], dtype=float) for k in
                                        ("changed", "score_gain", "dice_gain", "seconds"))
        print(f"| {name} | {changed.mean():.0%} | {np.mean(gain < 0):.0%} | {np.mean(dice < 0):.0%} | "
              f"{gain.mean():+.4f} | {dice.mean():+.4f} | {seconds.mean():.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps({"source": source, "rows": rows}, indent=2))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
