"""How often does a post-processing choice made on validation fragments lose on held-out test fragments?

Makes ``--fragments`` labelled folded-sheet fragments (:func:`vesuvius_monai.data.folded.make_folded_fragment`, the
benchmark families' second generator) and their probabilities ONCE, then for ``--splits`` random splits into
``--val`` validation and the rest test fragments: tunes on val and scores the chosen chain and the base (threshold
0.5, nothing else) on test, by the exact leaderboard score (one cached FragmentScorer per fragment, shared by all
splits). Two tuners:

    old     threshold + dust only, the tuner's guard before the chain search (tune.rule=majority)
    new     the whole chain, coordinate-wise, tune.rule=robust (default TuneConfig)

Probabilities: NOT a network. Each fragment's label is blurred, shifted by a smooth random field (errors that are
correlated in space, as a network's are: missed sheet parts, bridges between sheets, blobs), plus voxel noise, with
a per-fragment error strength, clipped to [0, 1]. This keeps the bench within minutes; it measures the rule's
held-out behaviour, not the gain a real network's probabilities would see.

Prints, per tuner: how often the chosen chain is worse than the base on test (score; Dice), the mean test gain
(score; Dice) and how often it changed the base. Usage::

    PYTHONPATH=. python bench/bench_tune_heldout.py            # 8 fragments of 48^3, 10 splits of 3 val / 5 test
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
from scipy import ndimage

from vesuvius_monai.config import PostprocessConfig, TuneConfig
from vesuvius_monai.data.folded import FoldedParams, make_folded_fragment
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.tuning.scorer import FragmentScorer
from vesuvius_monai.tuning.search import search_chain

log = logging.getLogger("bench_tune_heldout")

TUNERS = {
    "old": TuneConfig(operators=("threshold", "dust"), rule="majority", sweeps=1),
    "new": TuneConfig(),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fragments", type=int, default=8, help="labelled fragments made")
    parser.add_argument("--size", type=int, default=48, help="fragment edge (voxels)")
    parser.add_argument("--val", type=int, default=3, help="validation fragments per split (the rest is test)")
    parser.add_argument("--splits", type=int, default=10, help="random val / test splits")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_probs(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label-derived probabilities (Z, Y, X) in [0, 1] with spatially correlated errors (see the module docstring)."""
    strength = rng.uniform(0.15, 0.45)
    sheet = ndimage.gaussian_filter((label == 1).astype(np.float32), 1.0)
    field = ndimage.gaussian_filter(rng.normal(size=label.shape), 3.0)
    field *= strength / (field.std() + 1e-9)
    noise = ndimage.gaussian_filter(rng.normal(size=label.shape), 0.7) * strength * 0.5
    return np.clip(sheet * 1.2 - 0.1 + field + noise + rng.normal(0, 0.05), 0, 1).astype(np.float32)


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    params = FoldedParams(shape=(args.size,) * 3)
    labels = [make_folded_fragment((args.seed, i), params)[1] for i in range(args.fragments)]
    probs = [make_probs(label, rng) for label in labels]
    scorers = [FragmentScorer(label) for label in labels]
    base = PostprocessConfig()
    results = {name: [] for name in TUNERS}
    seconds = {name: 0.0 for name in TUNERS}
    for split in range(args.splits):
        order = rng.permutation(args.fragments)
        val, test = order[: args.val], order[args.val:]
        for name, tune in TUNERS.items():
            start = time.perf_counter()
            choice = search_chain([probs[i] for i in val], [scorers[i] for i in val], base=base, tune=tune)
            seconds[name] += time.perf_counter() - start
            chosen, kept = ([scorers[i].score(postprocess(probs[i], cfg)) for i in test] for cfg in (choice.chosen,
                                                                                                       base))
            gain = np.mean([c["score"] - k["score"] for c, k in zip(chosen, kept)])
            dice_gain = np.mean([c["dice"] - k["dice"] for c, k in zip(chosen, kept)])
            results[name].append((choice.chosen != base, gain, dice_gain))
            log.info("split %d %s: %s; test gain %+.4f, Dice %+.4f", split, name, choice.reason, gain, dice_gain)
    print(f"{args.splits} splits of {args.fragments} folded {args.size}^3 fragments: {args.val} val / "
          f"{args.fragments - args.val} test; base {dataclasses.asdict(base)['threshold']} threshold only")
    print("| tuner | changed base | worse on test (score) | worse on test (Dice) | mean test gain (score) | "
          "mean test gain (Dice) | search s / split |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        changed, gain, dice_gain = (np.array(col) for col in zip(*rows))
        print(f"| {name} | {changed.mean():.0%} | {np.mean(gain < 0):.0%} | {np.mean(dice_gain < 0):.0%} | "
              f"{gain.mean():+.4f} | {dice_gain.mean():+.4f} | {seconds[name] / args.splits:.1f} |")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
