"""The runs of ``bench_recipes.py``: each system's config, training (or reusing a finished run), the variants (table
rows) scored from its checkpoint, and their evaluations with the bench's octant component counts.

One system and seed is one run folder ``<run-dir>/seed<S>/<system>`` and one checkpoint; its rows are
:class:`Variant` s, listed by :func:`system_variants`:

    <name>              the system's config; with ``--tune``, the post-processing chosen on the val fragments
    <name>_untuned      (``--tune``) the config's post-processing
    <name>_plain        (``--tune``, TTA in the config) no test-time augmentation, the config's post-processing
    <name>_tta          (``--default-inference``) the TTA of ``--config``, the config's post-processing
    <name>_tta_tuned    (``--default-inference``) that TTA, post-processing chosen on the val fragments

Each row is evaluated into the folder of :func:`evaluation_folders`: ``eval/`` holds the run's first evaluation,
every other row goes to its own folder (``eval_tuned/``, ``eval_untuned/`` ...); an evaluation there with the same
scoring is reused (:func:`evaluation`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from _common import octant_components, read_train_log
from vesuvius_monai.config import build, Config, config_from_raw, dotted_layer, load_config, mapping_layer, to_dict
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.evaluate import evaluate
from vesuvius_monai.engine.infer import with_tta, without_tta
from vesuvius_monai.engine.train import train
from vesuvius_monai.engine.tune import read_choice, tune_postprocess
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import POSTPROCESS_FILE, RunDir
from vesuvius_monai.metrics.betti import betti_connectivity

log = logging.getLogger("bench_recipes")

PLAIN_MONAI = ["model.kwargs={}", "transforms.patch_size=[64,64,64]", "infer.roi_size=[64,64,64]",
               "train.loss={dice: 1.0, bce: 1.0}", "train.lr=0.001", "train.weight_decay=0.00001",
               "infer.tta_flip_axes=[]", "infer.tta_rot90=false"]
METRICS = ["dice", "leaderboard", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge",
           "betti_error_0", "betti_error_1", "betti_error_2"]


def recipe(name: str) -> list[str]:
    """The overrides of a system's recipe: none for 'default' (``--config`` as it is), else :data:`PLAIN_MONAI`
    for the model ``name``."""
    return [] if name == "default" else [f"model.name={name}", *PLAIN_MONAI]


# --------------------------------------------------------------------------- one run's config


def system_config(args: argparse.Namespace, name: str, extra: list[str], dataset: Path, seed: int) -> Config:
    """Config of one run: recipe, common overrides, the system's --set overrides, then the bench's fixed keys.

    ``train.steps`` becomes the cap; ``train.warmup_steps`` is scaled with it so that the warm-up keeps the recipe's
    share of the run (warmup_steps / steps of the recipe, e.g. 20 / 400 = 5 % of the time budget).
    """
    own = load_config(args.config, [*recipe(name), *args.overrides, *extra])
    warmup = round(args.step_cap * own.train.warmup_steps / own.train.steps)
    fixed = {"seed": seed, "output_dir": str(args.run_dir / f"seed{seed}" / name), "data.dataset": str(dataset),
             "train.max_minutes": args.minutes, "train.steps": args.step_cap, "train.warmup_steps": warmup,
             "evaluate.split": "test", "evaluate.metrics": list(METRICS), "evaluate.save_probabilities": False,
             "evaluate.save_masks": True}
    return build([mapping_layer("", to_dict(own)), dotted_layer("bench_recipes", fixed)])


def finished_run(cfg: Config) -> dict | None:
    """The metrics.json of a finished run of exactly this config in ``output_dir``, else None (the saved config is
    resolved first, so that sections added since it was saved compare at their defaults)."""
    run = RunDir(cfg.output_dir)
    metrics, saved = run.eval / "metrics.json", run.config
    if metrics.is_file() and saved.is_file() and to_dict(config_from_raw(yaml.safe_load(saved.read_text()), [])) \
            == to_dict(cfg):
        return json.loads(metrics.read_text())
    return None


def tuned_config(cfg: Config, checkpoint: Path, choice: Path) -> tuple[Config, float]:
    """``cfg`` with the post-processing chosen on the val fragments into ``choice`` (a ``postprocess.json``; tuned
    now unless an earlier choice is there) and the seconds the tuning took (NaN when reused)."""
    seconds = float("nan")
    if not choice.is_file():
        start = time.perf_counter()
        tune_postprocess(cfg, checkpoint, choice.parent)
        seconds = time.perf_counter() - start
    return build([mapping_layer("", to_dict(cfg)), read_choice(choice)]), seconds


def has_tta(cfg: Config) -> bool:
    return bool(cfg.infer.tta_flip_axes or cfg.infer.tta_rot90)


# --------------------------------------------------------------------------- variants: the rows of one run


@dataclass(frozen=True)
class Variant:
    """One table row of a run: its ``row`` name, the ``cfg`` its checkpoint is scored with, its own evaluation
    ``folder`` (under the run folder; :func:`evaluation_folders` may send it to ``eval/`` instead) and the seconds of
    its own post-processing tuning (``tune_seconds``; None: the row reports the run's tuning, that of ``--tune``)."""

    row: str
    cfg: Config
    folder: str
    tune_seconds: float | None = None


def untuned_variants(name: str, cfg: Config) -> list[Variant]:
    """A system not in ``--tune``: one row, the config as it is."""
    return [Variant(name, cfg, "eval_untuned")]


def tuned_variants(name: str, cfg: Config, tuned: Config) -> list[Variant]:
    """A system in ``--tune``: ``name`` with the tuned post-processing (``tuned``), ``<name>_untuned`` with the
    config's, and, when the config has test-time augmentation, ``<name>_plain`` without it."""
    rows = [Variant(name, tuned, "eval_tuned"), Variant(f"{name}_untuned", cfg, "eval_untuned")]
    if has_tta(cfg):
        rows.append(Variant(f"{name}_plain", without_tta(cfg), "eval_plain"))
    return rows


def tta_variants(name: str, tta: Config, tta_tuned: Config, tune_seconds: float) -> list[Variant]:
    """A system in ``--default-inference``: ``<name>_tta`` (the default's test-time augmentation, ``tta``) and
    ``<name>_tta_tuned`` (that TTA with post-processing tuned in ``tune_seconds``, ``tta_tuned``)."""
    return [Variant(f"{name}_tta", tta, "eval_tta"),
            Variant(f"{name}_tta_tuned", tta_tuned, "eval_tta_tuned", tune_seconds)]


def system_variants(args: argparse.Namespace, name: str, cfg: Config, run: RunDir,
                    checkpoint: Path) -> tuple[list[Variant], float]:
    """The variants of one system's run (tuning its post-processing now where ``--tune`` or
    ``--default-inference`` asks and no earlier choice is there) and the seconds of its ``--tune`` tuning (NaN when
    none or reused).

    The ``--tune`` choice goes to ``<run>/postprocess.json``, the ``--default-inference`` one to
    ``<run>/tune_tta/postprocess.json``.
    """
    tune_seconds = float("nan")
    if name in args.tune:
        tuned, tune_seconds = tuned_config(cfg, checkpoint, run.postprocess)
        variants = tuned_variants(name, cfg, tuned)
    else:
        variants = untuned_variants(name, cfg)
    if name in args.default_inference:
        default = load_config(args.config, args.overrides).infer
        tta = with_tta(cfg, default.tta_flip_axes, default.tta_rot90)
        tta_tuned, seconds = tuned_config(tta, checkpoint, run.path / "tune_tta" / POSTPROCESS_FILE)
        variants += tta_variants(name, tta, tta_tuned, seconds)
    return variants, tune_seconds


def same_scoring(saved: dict, cfg: Config) -> bool:
    """Whether an evaluation's saved config used ``cfg``'s inference, post-processing and evaluation settings (the
    bench's metrics and saved masks)."""
    mine = to_dict(cfg)
    return all(saved.get(key) == mine[key] for key in ("infer", "postprocess", "evaluate"))


def evaluation_folders(variants: list[Variant], run: RunDir, first: dict | None) -> list[Path]:
    """Where each variant is evaluated: ``eval/`` holds the run's first evaluation (``first``: its metrics.json,
    None for a fresh run). A fresh run's first variant goes there; a reused run's variants whose scoring is the one
    there are scored from it; every other variant goes to its own folder."""
    if first is None:
        return [run.eval if i == 0 else run.path / v.folder for i, v in enumerate(variants)]
    return [run.eval if same_scoring(first["config"], v.cfg) else run.path / v.folder for v in variants]


# --------------------------------------------------------------------------- evaluations and their components


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


# --------------------------------------------------------------------------- one system, one seed


def run_system(args: argparse.Namespace, name: str, extra: list[str], dataset: Path, seed: int,
               info: dict[str, dict]) -> list[dict]:
    """Train (or reuse) one system for one seed, then score each of its variants (:func:`system_variants`) into
    its folder (:func:`evaluation_folders`); returns one row per variant: timings and per-fragment figures."""
    cfg = system_config(args, name, extra, dataset, seed)
    run = RunDir(cfg.output_dir)
    checkpoint = run.checkpoint(args.checkpoint)
    load_before = os.getloadavg()
    first = finished_run(cfg)
    if first is None:
        log.info("system %s, seed %d: training %.2f min (%s %s) into %s", name, seed, args.minutes, cfg.model.name,
                 cfg.model.kwargs, run.path)
        train(cfg)
    variants, tune_seconds = system_variants(args, name, cfg, run, checkpoint)
    common = {"seed": seed, "run": str(run.path), "reused": first is not None, "model": cfg.model.name,
              "model_kwargs": cfg.model.kwargs, "patch_size": list(cfg.transforms.patch_size),
              "component_connectivity": betti_connectivity(cfg.evaluate.leaderboard.topo_matching),
              "checkpoint": args.checkpoint, "scored_step": Checkpoint.load(checkpoint).step,
              **read_train_log(run.path), "tune_seconds": tune_seconds, "load_before": list(load_before)}
    rows = []
    for variant, out in zip(variants, evaluation_folders(variants, run, first)):
        payload, seconds = evaluation(variant.cfg, checkpoint, out)
        config = to_dict(variant.cfg)
        tuning = tune_seconds if variant.tune_seconds is None else variant.tune_seconds
        rows.append(dict(common, system=variant.row, eval_seconds=seconds, postprocess=config["postprocess"],
                         config=config, tune_seconds=tuning,
                         fragments=scored_fragments(out, payload, variant.cfg, dataset, info)))
    load_after = list(os.getloadavg())
    return [dict(r, load_after=load_after) for r in rows]
