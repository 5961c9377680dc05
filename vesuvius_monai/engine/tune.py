"""Post-processing chosen on the validation fragments by the leaderboard score (``vesuvius-monai tune-postprocess``).

The checkpoint's model predicts every validation fragment once; :func:`vesuvius_monai.tuning.search.search_chain`
then searches the post-processing chain operator by operator (the config's ``tune`` section), scoring each candidate
with the competition's exact leaderboard score (:class:`vesuvius_monai.tuning.scorer.FragmentScorer`); candidates
that lose more than ``tune.max_dice_drop`` of mean Dice are not allowed, and a change is taken only by ``tune.rule``
(default "robust": better on most fragments by more than the per-fragment noise) when it also holds on resampled
halves of the fragments (``tune.halves``), guards against fitting the validation fragments. ``postprocess.json``
records each accepted change with its validation and held-out gains (``steps``).
The choice goes to ``<run>/postprocess.json`` (with the run folder locked meanwhile), recording the checkpoint's path,
step and SHA-256; ``evaluate``, ``predict`` and ``tune-postprocess`` with a checkpoint of that run use it for every
``postprocess`` key the user's config and overrides do not set (:func:`tuned_layer`), and say so when it was tuned on
another checkpoint.

With several checkpoints (an ensemble, :mod:`vesuvius_monai.engine.ensemble`) the fused probabilities are tuned; the
choice records the members (``ensemble``: checkpoint, SHA-256, weight, window of each; the fusion) and goes only where
``--out`` says (it belongs to no one member's run); ``evaluate`` and ``predict`` take it with ``--postprocess FILE``
(:func:`choice_layer`); :func:`check_tuned_members` warns when it was tuned on other members, weights or fusion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vesuvius_monai.config import Config, Layer, PostprocessConfig, dotted_layer, to_dict
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.engine.ensemble import Ensemble, as_ensemble, ensemble_volume
from vesuvius_monai.engine.evaluate import select_fragments
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import check_replaceable_file, write_text
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.paths import check_parents
from vesuvius_monai.io.run_dir import POSTPROCESS_FILE
from vesuvius_monai.metrics import topo_matching_used
from vesuvius_monai.tuning.scorer import FragmentScorer
from vesuvius_monai.tuning.search import search_chain
from vesuvius_monai.tuning.space import describe_chain

log = logging.getLogger(__name__)


def tune_postprocess(cfg: Config, checkpoint: str | Path | Checkpoint | Ensemble,
                     out_dir: str | Path | None = None) -> dict:
    """Choose ``postprocess`` settings on the validation fragments; writes and returns ``postprocess.json``.

    ``checkpoint``: one checkpoint, or an ensemble (its fused probabilities are tuned). ``out_dir`` defaults to the
    checkpoint's run folder (``<run>/checkpoints/x.pt`` -> ``<run>``); an ensemble needs it.
    """
    ensemble = as_ensemble(checkpoint, cfg)
    ensemble.check_windows()
    ckpt = ensemble.members[0].checkpoint
    if out_dir is None and (not ensemble.single or ckpt is None):
        raise VesuviusError(f"tune-postprocess with {len(ensemble.members)} --checkpoint needs --out FOLDER: the "
                            f"choice of an ensemble belongs to no one member's run folder; then give evaluate and "
                            f"predict --postprocess FOLDER/{POSTPROCESS_FILE} (nothing was written)")
    path = Path(out_dir) / POSTPROCESS_FILE if out_dir else ckpt.run.postprocess  # type: ignore[union-attr]
    check_parents(path, "--out")
    check_replaceable_choice(path)
    into_run = ckpt is not None and path.parent.resolve() == ckpt.run.path.resolve()
    with ckpt.run.lock("tune-postprocess") if into_run else contextlib.nullcontext():  # type: ignore[union-attr]
        payload = _choose(cfg, ensemble)
        write_text(path, json.dumps(payload, indent=2))
    log.info("%s (%d validation fragments); written to %s", payload["reason"], len(payload["fragments"]), path)
    return payload


def _choose(cfg: Config, ensemble: Ensemble) -> dict:
    """Predict the validation fragments with ``ensemble`` and choose; the payload of ``postprocess.json``."""
    fragments = select_fragments(cfg, "val", ensemble.trained_on)
    device = resolve_device(cfg.infer.device)
    probs, labels = [], []
    for fragment in tqdm(fragments, desc="predict val", unit="fragment", dynamic_ncols=True):
        probs.append(ensemble_volume(ensemble, fragment.image, device))
        labels.append(fragment.label.read())

    return choice_payload(cfg, ensemble, [f.id for f in fragments], probs, labels)


def choice_payload(cfg: Config, ensemble: Ensemble, ids: list[str], probs: list[np.ndarray],
                   labels: list[np.ndarray]) -> dict:
    """Search the chain on predicted validation ``probs`` (Z, Y, X) against ``labels``; the ``postprocess.json``
    payload: the choice, every candidate's per-fragment scores and Dice, the accepted steps with their gains
    (``steps``, in order; their gains sum to the chosen chain's), the search's cost, and what was tuned (the
    checkpoint, or the ensemble's members)."""
    scorers = [FragmentScorer(label, weights=cfg.evaluate.leaderboard, ignore_index=cfg.data.ignore_index)
               for label in labels]
    choice = search_chain(probs, scorers, base=cfg.postprocess, tune=cfg.tune)
    payload = {"postprocess": to_dict(choice.chosen), "chain": describe_chain(choice.chosen), "reason": choice.reason,
               "base": to_dict(choice.base), "fragments": ids, "scores": choice.scores, "dices": choice.dices,
               "steps": [dataclasses.asdict(step) for step in choice.steps],
               "gain": {"score": sum(s.score_gain for s in choice.steps),
                        "dice": sum(s.dice_gain for s in choice.steps)},
               "cost": {"candidates": choice.candidates, "masks_scored": choice.scored, "seconds": choice.seconds,
                        **{f"{k}_seconds": v for k, v in choice.timings.items()}},
               "search": to_dict(cfg.tune), "topo_matching": topo_matching_used(cfg.evaluate.leaderboard)}
    ckpt = ensemble.members[0].checkpoint
    if ensemble.single and ckpt is not None:
        payload.update(checkpoint=str(ckpt.path), checkpoint_step=ckpt.step, checkpoint_sha256=ckpt.digest())
    else:
        payload["ensemble"] = ensemble.record()
    return payload


def check_replaceable_choice(path: Path) -> None:
    """Raise unless ``path`` is free or an earlier ``postprocess.json`` of tune-postprocess (never replace a file
    this command did not write)."""
    check_replaceable_file(
        path, lambda p: {"postprocess", "reason", "base", "scores"} <= set(json.loads(p.read_text())),
        f"{path} exists and is not a choice written by tune-postprocess; move it away or pass --out to another "
        f"folder (nothing was written)")


def tuned_layer(checkpoint: Checkpoint) -> Layer | None:
    """The post-processing that ``tune-postprocess`` chose for the checkpoint's run (``<run>/postprocess.json``) as a
    config layer (:func:`vesuvius_monai.config.resolve_config` fills with it only the ``postprocess`` keys the user's
    config file and overrides leave out); None when the run has no choice recorded. A choice tuned on another
    checkpoint (or not saying on which) is used with a warning."""
    path = checkpoint.run.postprocess
    if not path.is_file():
        return None
    layer = read_choice(path)
    _check_tuned_on(path, checkpoint)
    return layer


def _check_tuned_on(path: Path, checkpoint: Checkpoint) -> None:
    """Warn unless the choice at ``path`` was tuned on ``checkpoint`` (the same file: SHA-256)."""
    record = json.loads(path.read_text())
    tuned = record.get("checkpoint_sha256")
    if tuned == checkpoint.digest():
        return
    if tuned is None:
        log.warning("%s does not record the checkpoint it was tuned on (written by an older version): its "
                    "post-processing may not suit %s; run tune-postprocess again to be sure", path, checkpoint.path)
        return
    log.warning("%s was tuned on another checkpoint (%s, step %s) than %s (step %d): its post-processing may not suit "
                "this one; run tune-postprocess with it again", path, record.get("checkpoint"),
                record.get("checkpoint_step", "?"), checkpoint.path, checkpoint.step)


def choice_layer(path: str | Path) -> Layer:
    """The post-processing of the choice file ``path`` (``--postprocess FILE``) as a config layer (see
    :func:`tuned_layer`); :func:`check_tuned_members` then says whether it suits the ensemble built with it."""
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"--postprocess {path}: no such file (a postprocess.json written by tune-postprocess)")
    return read_choice(path)


def check_tuned_members(path: str | Path, ensemble: Ensemble) -> None:
    """Warn unless the choice file ``path`` was tuned on the same members, weights and fusion as ``ensemble``."""
    tuned, wanted = _tuned_members(json.loads(Path(path).read_text())), _members_of(ensemble)
    if tuned != wanted:
        log.warning("--postprocess %s was tuned on %s, not on %s: its post-processing may not suit these; run "
                    "tune-postprocess with them again", path, _describe(tuned), _describe(wanted))


def _members_of(ensemble: Ensemble) -> tuple:
    """(((checkpoint, sha256, weight), ...), fusion) of ``ensemble``; the fusion None for a single member."""
    members = tuple((m.checkpoint.path.name if m.checkpoint else "?", m.checkpoint.digest() if m.checkpoint else None,
                     round(m.weight, 6)) for m in ensemble.members)
    return members, None if ensemble.single else ensemble.fusion


def _tuned_members(record: dict) -> tuple:
    """What a choice record says it was tuned on, as :func:`_members_of` puts it (sha256 None when unknown)."""
    if "ensemble" in record:
        members = record["ensemble"].get("members", {})
        return tuple((Path(str(m.get("checkpoint", "?"))).name, m.get("sha256"), round(float(m.get("weight", 0)), 6))
                     for _, m in sorted(members.items(), key=lambda kv: int(kv[0]))), record["ensemble"].get("fusion")
    return ((Path(str(record.get("checkpoint", "?"))).name, record.get("checkpoint_sha256"), 1.0),), None


def _describe(members: tuple) -> str:
    """``a.pt (weight 0.5, sha256 1234abcd), b.pt (...); fusion prob`` for messages."""
    listed, fusion = members
    text = ", ".join(f"{name} (weight {w:g}, sha256 {(sha or '?')[:8]})" for name, sha, w in listed)
    return text + (f"; fusion {fusion}" if fusion else "")


def read_choice(path: Path) -> Layer:
    """The ``postprocess`` settings of a ``postprocess.json`` written by :func:`tune_postprocess`, as a config layer."""
    try:
        chosen = json.loads(path.read_text())["postprocess"]
        keys = [f.name for f in dataclasses.fields(PostprocessConfig)]
        return dotted_layer(str(path), {f"postprocess.{k}": chosen[k] for k in keys if k in chosen})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VesuviusError(f"{path}: not a post-processing choice written by tune-postprocess ({err})") from None
