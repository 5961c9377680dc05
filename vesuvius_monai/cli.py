"""The ``vesuvius-monai`` command: synth, plan, train, tune-postprocess, evaluate, predict.

Every subcommand takes ``--config FILE`` and trailing ``key=value`` overrides (``train.steps=50``).
A user error prints one line ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vesuvius_monai.config import Config, Layer, explicit_keys, mapping_layer, read_yaml_mapping, resolve_config
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import build_dir
from vesuvius_monai.io.run_dir import RunDir

log = logging.getLogger("vesuvius_monai")


def _config(args: argparse.Namespace, *, base: Layer | None = None, fills: list[Layer | None] = ()) -> Config:
    """The run config of a command, resolved in one step (:func:`resolve_config`): built-in defaults < ``base`` <
    ``fills`` (for keys the user leaves out) < ``--config`` < ``key=value`` overrides."""
    return resolve_config(args.config, args.overrides, base=base, fills=[f for f in fills if f is not None])


def _checkpoint_and_config(args: argparse.Namespace):
    """The ensemble of the ``--checkpoint`` s (each read once; one checkpoint: an ensemble of one) with their
    ``--weights``, and the run config: without ``--config``, the first checkpoint's own config is the base; the
    post-processing of ``--postprocess FILE``, or else the one ``tune-postprocess`` chose for a single checkpoint's
    run, fills the ``postprocess`` keys the user's config file and overrides leave out. A ``--checkpoint`` may be an
    nnU-Net v2 model folder (its ``--folds`` averaged as nnU-Net does): the plan of the first such folder fills the
    ``infer`` keys the user leaves out. Each member predicts with its own checkpoint's (or plan's) window and TTA
    unless the user sets them (:func:`~vesuvius_monai.engine.ensemble.member_config`).
    """
    from vesuvius_monai.engine.ensemble import build_ensemble, normalized_weights
    from vesuvius_monai.engine.tune import check_tuned_members, choice_layer, tuned_layer
    from vesuvius_monai.io.checkpoint import Checkpoint
    from vesuvius_monai.models.nnunet import is_nnunet_folder

    normalized_weights(args.weights, len(args.checkpoint))  # a wrong --weights fails before anything is read
    nnunet = [is_nnunet_folder(path) for path in args.checkpoint]
    if args.folds and not any(nnunet):
        raise VesuviusError("--folds goes with an nnU-Net model folder as --checkpoint; none was given")
    if any(nnunet):
        from vesuvius_monai.engine.nnunet_network import nnunet_network
    sources = [nnunet_network(path, args.folds, args.nnunet_checkpoint) if folder else Checkpoint.load(path)
               for path, folder in zip(args.checkpoint, nnunet)]
    first = sources[0]
    is_checkpoint = isinstance(first, Checkpoint)
    base = mapping_layer(str(first.path), first.config) if args.config is None and is_checkpoint else None
    choice = getattr(args, "postprocess", None)
    tuned = choice_layer(choice) if choice else tuned_layer(first) if len(sources) == 1 and is_checkpoint else None
    plan = next((mapping_layer(f"the plan of {s.folder.path}", s.config_layer()) for s in sources
                 if not isinstance(s, Checkpoint)), None)
    cfg = _config(args, base=base, fills=[tuned, plan])
    raw = read_yaml_mapping(args.config, "config file") if args.config is not None else {}
    ensemble = build_ensemble(cfg, sources, args.weights, explicit_keys(raw, args.overrides))
    if choice:
        check_tuned_members(choice, ensemble)
    return ensemble, cfg


SYNTH_KIND = "synthetic data"


def cmd_synth(args: argparse.Namespace) -> None:
    import yaml

    from vesuvius_monai.config import to_dict
    from vesuvius_monai.data.synthetic import write_synthetic_dataset

    cfg = _config(args)
    params = cfg.synth.params
    root = Path(cfg.data.root)
    record = root / "synth.yaml"
    wanted = {"n": cfg.synth.n_fragments, "seed": cfg.synth.seed, "fmt": cfg.synth.fmt, "params": to_dict(params)}
    if record.is_file():
        found = read_yaml_mapping(record, "synthetic data record")
        if {k: found.get(k) for k in wanted} == yaml.safe_load(yaml.safe_dump(wanted)):
            log.info("%s already holds these synthetic fragments; nothing to do", root)
            return
        raise VesuviusError(f"data.root {root} holds synthetic data made with other settings ({record}); "
                            f"delete it or choose another data.root")
    synth = cfg.synth
    build_dir(root, SYNTH_KIND, lambda work: write_synthetic_dataset(work, synth.n_fragments, seed=synth.seed,
                                                                      params=params, fmt=synth.fmt), "data.root")
    log.info("wrote %d synthetic fragments to %s", cfg.synth.n_fragments, root)


def cmd_plan(args: argparse.Namespace) -> None:
    from vesuvius_monai.plan import format_plan, make_plan, save_plan

    cfg = _config(args)
    raw = read_yaml_mapping(args.config, "config file") if args.config is not None else {}
    plan = make_plan(cfg, keep=explicit_keys(raw, args.overrides))
    run = RunDir(cfg.output_dir)
    if not run.is_run():
        run.check_new()  # before the lock: nothing is written into a folder that is not a run
    with run.lock("plan"):
        path = run.start().plan
        save_plan(plan, path)
    print(format_plan(plan))
    print(f"saved to {path}; 'vesuvius-monai train' with the same config and output_dir uses it for every key the "
          f"config does not set")


def cmd_train(args: argparse.Namespace) -> None:
    """Train; a new run uses the plan of its run folder (``vesuvius-monai plan``) for every key the user leaves out."""
    from vesuvius_monai.engine.train import train
    from vesuvius_monai.plan import load_plan

    cfg = _config(args)
    path = RunDir(cfg.output_dir).plan
    plan = [load_plan(path).layer(str(path))] if path.is_file() and not args.resume else []
    if args.seeds or args.folds:
        _train_many(args, cfg, plan)
        return
    if plan:
        cfg = _config(args, fills=plan)
    train(cfg, resume=args.resume)


def _train_many(args: argparse.Namespace, cfg: Config, plan: list[Layer]) -> None:
    """``train --seeds`` / ``--folds``: one run per seed or fold under output_dir (see engine.multi_run)."""
    from vesuvius_monai.engine.multi_run import fold_overrides, parse_seeds, seed_overrides, train_runs
    from vesuvius_monai.engine.train import train

    if args.seeds and args.folds:
        raise VesuviusError("--seeds and --folds: give one of them (runs differing by seed, or by fold)")
    runs = seed_overrides(parse_seeds(args.seeds)) if args.seeds else fold_overrides(cfg, args.folds)

    def config_of(extra: list[str]) -> Config:
        return _config(argparse.Namespace(config=args.config, overrides=[*args.overrides, *extra]), fills=plan)

    train_runs(runs, cfg.output_dir, config_of, lambda run_cfg: train(run_cfg, resume=args.resume))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.evaluate import evaluate

    checkpoint, cfg = _checkpoint_and_config(args)
    payload = evaluate(cfg, checkpoint, args.out)
    summary = {k: round(v, 4) for k, v in payload["mean"].items()}
    log.info("mean over %d fragments: %s", payload["n_fragments"], json.dumps(summary))


def cmd_predict(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.predict import parse_roi, predict

    checkpoint, cfg = _checkpoint_and_config(args)
    if args.support is not None:  # the flag is the config key infer.support
        cfg.infer.support = str(args.support)
    predict(cfg, checkpoint, args.input, args.output, mask_output=args.mask, nifti_output=args.nifti,
            roi=parse_roi(args.roi))


def cmd_tune_postprocess(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.tune import tune_postprocess

    checkpoint, cfg = _checkpoint_and_config(args)
    tune_postprocess(cfg, checkpoint, args.out)


def cmd_resample(args: argparse.Namespace) -> None:
    from vesuvius_monai.data.resample import resample_file

    path = resample_file(args.input, args.output, spacing=args.spacing, like=args.like, order=args.order)
    log.info("wrote %s", path)


def _location(text: str):
    """A command-line volume or output: an ``http(s)://`` / ``s3://`` address stays a string (``Path`` would turn
    ``http://host`` into ``http:/host``), anything else is a ``Path``."""
    from vesuvius_monai.data.remote import is_remote

    return text if is_remote(text) else Path(text)


POSTPROCESS_HELP = ("a postprocess.json written by tune-postprocess (e.g. with --out for an ensemble): its choice "
                    "fills the postprocess keys the config leaves out (a warning when tuned on other checkpoints)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vesuvius-monai", description="3D papyrus-surface detection for Vesuvius "
                                     "Challenge scroll CT: synth, plan, train, tune-postprocess, evaluate, predict, "
                                     "resample.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, checkpoint: bool = False, aliases: list[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, aliases=list(aliases))
        p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, or the checkpoint's)")
        if checkpoint:
            p.add_argument("--checkpoint", type=Path, required=True, action="append",
                           help="a .pt written by train, or an nnU-Net v2 trained-model folder; repeat it for "
                                "an ensemble (probabilities fused as infer.fusion says: prob or logit; each member "
                                "with its own window and TTA)")
            p.add_argument("--folds", nargs="+", help="with an nnU-Net folder: the folds averaged (default: every "
                           "fold_* present)")
            p.add_argument("--nnunet-checkpoint", default="checkpoint_final.pth",
                           help="with an nnU-Net folder: each fold's file (default: checkpoint_final.pth)")
            p.add_argument("--weights", type=float, nargs="+", metavar="W",
                           help="ensemble weights, one per --checkpoint, > 0 (normalised; default equal); "
                                "key=value overrides go before it")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
        p.set_defaults(func=func)
        return p

    add("synth", cmd_synth, "write synthetic scroll fragments to data.root")
    add("plan", cmd_plan, "choose patch size, network, batch and steps for the data and train.max_minutes; "
        "saved in output_dir for train")
    tr = add("train", cmd_train, "train a model")
    tr.add_argument("--resume", action="store_true", help="continue the run in output_dir from checkpoints/last.pt")
    tr.add_argument("--seeds", metavar="S0,S1,...", help="train one run per seed into <output_dir>/seed<s> (for an "
                    "ensemble); logs the evaluate command of their ensemble")
    tr.add_argument("--folds", type=int, metavar="K", help="train K runs into <output_dir>/fold<i>: run i validates "
                    "on fold i of the train + val fragments and trains on the others (test fragments stay out)")
    ev = add("evaluate", cmd_evaluate, "score a checkpoint on held-out fragments", checkpoint=True)
    ev.add_argument("--out", type=Path, help="evaluation folder (default: <output_dir>/eval)")
    ev.add_argument("--postprocess", type=Path, metavar="FILE", help=POSTPROCESS_HELP)
    pr = add("predict", cmd_predict, "predict volumes (in one process, or shared by the processes of torchrun)",
             checkpoint=True)
    pr.description = (
        "Predict the probability map of a volume, or of several into a folder. A .zarr --output is written block by "
        "block and resumable: the same command again finishes an interrupted run. Under torchrun (e.g. 'torchrun "
        "--nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m vesuvius_monai predict "
        "...') the processes share the blocks of the Zarr outputs (a file system all of them see); a run in which "
        "a process died is finished by the same command with any number of processes. A folder --output (a name "
        "without suffix) gets one <id>.zarr per input volume: repeat --input, or give folders of volumes "
        "(a.nii.gz -> OUT/a.zarr).")
    pr.add_argument("--input", type=_location, required=True, action="append",
                    help="volume: .nii(.gz), .tif, folder of .tif, .zarr, .npy, or an http(s):// or s3:// address of a "
                         "Zarr / OME-Zarr (data.remote_* keys: cache, retries); with a folder --output: repeat it, "
                         "or give a folder of such volumes")
    pr.add_argument("--output", type=_location, required=True,
                    help="probability map: .nii.gz, .nii or .zarr; or a folder (a name without suffix) for one "
                         "<id>.zarr per input volume (files there not written by predict are left alone)")
    pr.add_argument("--mask", type=_location, help="also write the post-processed binary mask here (NIfTI; .zarr "
                    "with a .zarr --output, post-processed block by block)")
    pr.add_argument("--nifti", type=_location, help="with a .zarr --output: also export the probabilities as NIfTI")
    pr.add_argument("--roi", help="region of interest z0:z1,y0:y1,x0:x1 (of every input volume)")
    pr.add_argument("--postprocess", type=Path, metavar="FILE", help=POSTPROCESS_HELP)
    pr.add_argument("--support", type=Path, help="mask volume of where the scroll is (values > "
                    "infer.support_threshold; the input's size or a coarser one): windows outside it are not run "
                    "(infer.support)")
    rs = sub.add_parser("resample", help="resample a volume to a voxel spacing, an nnU-Net plan's spacing, or "
                        "another volume's grid (NIfTI output)")
    rs.add_argument("--input", type=_location, required=True, help="volume: .nii(.gz), .tif, folder of .tif, .zarr, "
                    ".npy, or an http(s):// or s3:// address of a Zarr")
    rs.add_argument("--output", type=Path, required=True, help="the resampled volume (.nii.gz or .nii)")
    rs.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="the new voxel spacing")
    rs.add_argument("--like", type=_location, help="an nnU-Net model folder (its plan's spacing) or a volume (its "
                    "shape, spacing and orientation: e.g. probabilities back onto the scan's grid)")
    rs.add_argument("--order", type=int, default=3, choices=[0, 1, 3], help="spline order: 3 for images, 0 for "
                    "labels, 1 for probabilities (default 3)")
    rs.set_defaults(func=cmd_resample)
    tt = add("tune-postprocess", cmd_tune_postprocess, "choose threshold and small-component removal on the "
             "validation fragments (leaderboard score); later commands use the choice", checkpoint=True,
             aliases=["tune-threshold"])
    tt.add_argument("--out", type=Path, help="where to write postprocess.json (default: the checkpoint's run folder; "
                    "required with several --checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except VesuviusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
