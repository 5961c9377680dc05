"""Evaluation on held-out fragments: sliding-window inference, post-processing, metrics, exports.

Writes into the evaluation folder::

    metrics.csv            one row per fragment, one column per metric, and a final 'mean' row
    metrics.json           {"mean_dice", "mean": {...}, "fragments": {id: {...}}, ...}
    predictions/ID_prob.nii.gz   probability map (float32), the input's affine and spacing
    predictions/ID_mask.nii.gz   post-processed binary mask (uint8)
    predictions/ID_slices.png    orthogonal mid-slices, prediction over image, errors coloured
    component_sizes.png    histogram of connected-component sizes, prediction against label
    report.html            all of the above (and the run's learning curve) in one self-contained page
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vesuvius_monai.config import Config, to_dict
from vesuvius_monai.data.dataset import Fragment, load_splits
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.engine.ensemble import Ensemble, as_ensemble, ensemble_volume
from vesuvius_monai.engine.infer import load_normalized
from vesuvius_monai.engine.networks import NetworkSource
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import build_dir, check_replaceable, write_text
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.nifti import write_nifti
from vesuvius_monai.io.paths import check_parents, inside
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.metrics import compute_metrics, topo_matching_used
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.tuning.space import describe_chain
from vesuvius_monai.report import component_sizes, save_component_histogram, save_slices_png, write_html_report

log = logging.getLogger(__name__)


def select_fragments(cfg: Config, split: str, trained_on: list[str] = ()) -> list[Fragment]:
    """The labelled fragments of ``split`` ("test", "val" or "all"); no training fragments are needed.

    ``trained_on`` (the checkpoint's training fragments) may not appear in a val or test selection: a changed
    split seed or folder would otherwise score the model on its own training data.
    """
    splits = load_splits(cfg.data, require_train=False)
    chosen = splits["train"] + splits["val"] + splits["test"] if split == "all" else splits[split]
    if not chosen:
        raise VesuviusError(f"the '{split}' split of the data has no fragments (data.val_fragments / "
                            f"data.test_fragments, the fractions or the dataset YAML decide it)")
    leaked = [f.id for f in chosen if f.id in set(trained_on)]
    if leaked and split != "all":
        raise VesuviusError(f"fragments {leaked} of the '{split}' split were used to train this checkpoint; "
                            f"score it with the run's own data split (its config.yaml / splits.json)")
    return chosen


@dataclass
class FragmentResult:
    scores: dict[str, float]
    pred_sizes: np.ndarray  # connected-component sizes of the prediction
    label_sizes: np.ndarray  # ... and of the label (ignore region excluded)


def evaluate_fragment(network: Ensemble | NetworkSource | nn.Module, fragment: Fragment, cfg: Config,
                      device: torch.device, out: Path) -> FragmentResult:
    """Predict one fragment with ``network`` (an ensemble, or one network: a source or a model in memory, see
    :func:`~vesuvius_monai.engine.ensemble.as_ensemble`), score it and write its exports."""
    start = time.perf_counter()
    probs = ensemble_volume(as_ensemble(network, cfg), fragment.image, device)
    seconds = time.perf_counter() - start
    image = load_normalized(fragment.image, cfg.transforms.percentiles)  # for the slice figure
    mask = postprocess(probs, cfg.postprocess)
    label = fragment.label.read()
    # distances (surface-Dice tolerance, HD95) in voxels, as the competition scores them
    scores = compute_metrics(mask, label, cfg.evaluate.metrics, ignore_index=cfg.data.ignore_index,
                             spacing=(1.0, 1.0, 1.0), weights=cfg.evaluate.leaderboard)
    scores["inference_seconds"] = seconds
    affine = fragment.image.affine
    if cfg.evaluate.save_probabilities:
        write_nifti(inside(out / "predictions", f"{fragment.id}_prob.nii.gz"), probs.astype(np.float32), affine=affine)
    if cfg.evaluate.save_masks:
        write_nifti(inside(out / "predictions", f"{fragment.id}_mask.nii.gz"), mask.astype(np.uint8), affine=affine)
    save_slices_png(image, mask, inside(out / "predictions", f"{fragment.id}_slices.png"), label=label,
                    ignore_index=cfg.data.ignore_index,
                    title=f"{fragment.id}: Dice {scores.get('dice', float('nan')):.3f}")
    return FragmentResult(scores=scores, pred_sizes=component_sizes(mask & (label != cfg.data.ignore_index)),
                          label_sizes=component_sizes(label == 1))


def summarize(per_fragment: dict[str, dict]) -> dict[str, float]:
    """Mean of every metric over fragments (NaN-aware: a metric undefined on one fragment is skipped there)."""
    names = list(next(iter(per_fragment.values())))
    return {name: float(np.nanmean([scores[name] for scores in per_fragment.values()])) for name in names}


def write_tables(out: Path, per_fragment: dict[str, dict], mean: dict[str, float], meta: dict) -> dict:
    """metrics.csv (fragments + mean row) and metrics.json, both atomic; returns the JSON payload."""
    names = list(mean)
    text = io.StringIO()
    table = csv.writer(text)
    table.writerow(["fragment", *names])
    for frag_id, scores in per_fragment.items():
        table.writerow([frag_id, *(f"{scores[n]:.6g}" for n in names)])
    table.writerow(["mean", *(f"{mean[n]:.6g}" for n in names)])
    write_text(out / "metrics.csv", text.getvalue())
    payload = {"mean_dice": mean.get("dice"), "mean": mean, "fragments": per_fragment, **meta}
    write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=True))
    return payload


def _matching_note(matching: str) -> str:
    """How the TopoScore figures of this evaluation were matched, in words."""
    if matching == "exact":
        return "exact Betti matching (Betti-Matching-3D), as the competition scores"
    return f"'{matching}' stand-in, NOT the competition's exact Betti matching (see README, Metrics)"


def write_report(out: Path, results: dict[str, FragmentResult], mean: dict[str, float], cfg: Config,
                 checkpoint: Path, members: list[str] = ()) -> None:
    """component_sizes.png and the self-contained report.html (``members``: an ensemble's, one line each; the
    learning curve is ``checkpoint``'s run's)."""
    save_component_histogram([r.pred_sizes for r in results.values()], [r.label_sizes for r in results.values()],
                             out / "component_sizes.png")
    figures = [(RunDir.of_checkpoint(checkpoint).learning_curve, "learning curve of the training run")]
    figures += [(inside(out / "predictions", f"{i}_slices.png"), f"{i}: mid-slices") for i in results]
    figures.append((out / "component_sizes.png", "connected-component sizes"))
    notes = [*(members or [f"checkpoint: {checkpoint}"]), f"split: {cfg.evaluate.split}",
             f"inference: window {list(cfg.infer.roi_size)}, overlap {cfg.infer.overlap}, {cfg.infer.blend} blending, "
             f"TTA flips {cfg.infer.tta_flip_axes}, rot90 {cfg.infer.tta_rot90}",
             f"post-processing chain: {describe_chain(cfg.postprocess)} ({dataclasses.asdict(cfg.postprocess)})",
             f"TopoScore matching: {_matching_note(topo_matching_used(cfg.evaluate.leaderboard))}",
             "ignore-label voxels are excluded from every metric"]
    write_html_report(out / "report.html", title="vesuvius_monai evaluation", per_fragment={
        i: r.scores for i, r in results.items()}, mean=mean, figures=figures, notes=notes)


EVAL_KIND = "evaluation"


def evaluate(cfg: Config, checkpoint: str | Path | Checkpoint | Ensemble, out_dir: str | Path | None = None) -> dict:
    """Score the checkpoint's model (or an ensemble's fused prediction) on ``evaluate.split``; returns the
    metrics.json payload.

    The evaluation folder (default ``<output_dir>/eval``) is built beside its place and appears complete in one
    rename; an existing folder is only replaced when it holds nothing but an earlier evaluation.
    """
    ensemble = as_ensemble(checkpoint, cfg)
    ensemble.check_windows()
    ckpt = ensemble.members[0].checkpoint
    if ckpt is None:
        raise VesuviusError("evaluate needs checkpoints (the members of an ensemble are checkpoints)")
    out = (Path(out_dir) if out_dir else RunDir(cfg.output_dir).eval).resolve()
    check_parents(out, "evaluation folder")
    check_replaceable(out, EVAL_KIND, "evaluation folder")  # before the model is loaded: fail fast
    device = resolve_device(cfg.infer.device)
    if ensemble.single and (ckpt.model_name, ckpt.model_kwargs) != (cfg.model.name, cfg.model.kwargs):
        log.info("model comes from the checkpoint: %s %s", ckpt.model_name, ckpt.model_kwargs)
    fragments = select_fragments(cfg, cfg.evaluate.split, ensemble.trained_on)
    payload = build_dir(out, EVAL_KIND, lambda work: _evaluate_into(work, ensemble, fragments, cfg, device, ckpt.path),
                        "evaluation folder")
    log.info("mean Dice over %d %s fragments: %.4f", len(fragments), cfg.evaluate.split,
             payload["mean"].get("dice", float("nan")))
    return payload


def _evaluate_into(work: Path, ensemble: Ensemble, fragments: list[Fragment], cfg: Config, device: torch.device,
                   checkpoint: Path) -> dict:
    """Predict, score and export every fragment into ``work``; write the tables and the report there."""
    results = {}
    log.info("post-processing chain: %s", describe_chain(cfg.postprocess))
    for fragment in tqdm(fragments, desc="evaluate", unit="fragment", dynamic_ncols=True):
        results[fragment.id] = evaluate_fragment(ensemble, fragment, cfg, device, work)
        log.info("%s: %s", fragment.id, ", ".join(f"{k} {v:.4f}" for k, v in results[fragment.id].scores.items()))
    per_fragment = {frag_id: r.scores for frag_id, r in results.items()}
    mean = summarize(per_fragment)
    meta = {"checkpoint": str(checkpoint), "split": cfg.evaluate.split, "n_fragments": len(fragments),
            "topo_matching": topo_matching_used(cfg.evaluate.leaderboard),
            "postprocess_chain": describe_chain(cfg.postprocess), "config": to_dict(cfg)}
    members: list[str] = []
    if not ensemble.single:
        meta["ensemble"] = ensemble.record()
        members = [f"member {i}: {m.checkpoint.path if m.checkpoint else m.network.run_info()}, weight "
                   f"{m.weight:.4g}, window {list(m.cfg.infer.roi_size)}, TTA flips {m.cfg.infer.tta_flip_axes}"
                   for i, m in enumerate(ensemble.members)] + [f"fusion: {ensemble.fusion}"]
    payload = write_tables(work, per_fragment, mean, meta)
    write_report(work, results, mean, cfg, checkpoint, members)
    return payload
