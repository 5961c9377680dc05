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
    """The ``--checkpoint`` (read once) and the run config: without ``--config``, the checkpoint's own config is the
    base; the post-processing that ``tune-postprocess`` chose for the checkpoint's run fills the ``postprocess`` keys
    the user's config file and overrides leave out."""
    from vesuvius_monai.engine.tune import tuned_layer
    from vesuvius_monai.io.checkpoint import Checkpoint
    from vesuvius_monai.models.nnunet import is_nnunet_folder

    if is_nnunet_folder(args.checkpoint):
        return _nnunet_and_config(args)
    if args.folds:
        raise VesuviusError(f"--folds goes with an nnU-Net model folder; {args.checkpoint} is not one")
    checkpoint = Checkpoint.load(args.checkpoint)
    base = mapping_layer(str(checkpoint.path), checkpoint.config) if args.config is None else None
    return checkpoint, _config(args, base=base, fills=[tuned_layer(checkpoint)])


def _nnunet_and_config(args: argparse.Namespace):
    """An nnU-Net v2 model folder as ``--checkpoint`` (its ``--folds``) and the run config: the plan's inference
    settings fill the ``infer`` keys the user leaves out."""
    from vesuvius_monai.engine.nnunet_network import nnunet_network

    if args.command not in ("predict",):
        raise VesuviusError(f"{args.command} does not take an nnU-Net model folder yet ({args.checkpoint}); "
                            f"predict does")
    network = nnunet_network(args.checkpoint, args.folds, args.nnunet_checkpoint)
    return network, _config(args, fills=[mapping_layer(f"the plan of {args.checkpoint}", network.config_layer())])


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
    if path.is_file() and not args.resume:
        cfg = _config(args, fills=[load_plan(path).layer(str(path))])
    train(cfg, resume=args.resume)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.evaluate import evaluate

    checkpoint, cfg = _checkpoint_and_config(args)
    payload = evaluate(cfg, checkpoint, args.out)
    summary = {k: round(v, 4) for k, v in payload["mean"].items()}
    log.info("mean over %d fragments: %s", payload["n_fragments"], json.dumps(summary))


def cmd_predict(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.predict import parse_roi, predict

    checkpoint, cfg = _checkpoint_and_config(args)
    predict(cfg, checkpoint, args.input, args.output, mask_output=args.mask, nifti_output=args.nifti,
            roi=parse_roi(args.roi))


def cmd_tune_postprocess(args: argparse.Namespace) -> None:
    from vesuvius_monai.engine.tune import tune_postprocess

    checkpoint, cfg = _checkpoint_and_config(args)
    tune_postprocess(cfg, checkpoint, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vesuvius-monai", description="3D papyrus-surface detection for Vesuvius "
                                     "Challenge scroll CT: synth, plan, train, tune-postprocess, evaluate, predict.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, checkpoint: bool = False, aliases: list[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, aliases=list(aliases))
        p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, or the checkpoint's)")
        if checkpoint:
            p.add_argument("--checkpoint", type=Path, required=True,
                           help="a .pt written by train, or an nnU-Net v2 trained-model folder (predict)")
            p.add_argument("--folds", nargs="+", help="with an nnU-Net folder: the folds to average (default: all "
                           "fold_* present)")
            p.add_argument("--nnunet-checkpoint", default="checkpoint_final.pth",
                           help="with an nnU-Net folder: the file of each fold (default: checkpoint_final.pth)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
        p.set_defaults(func=func)
        return p

    add("synth", cmd_synth, "write synthetic scroll fragments to data.root")
    add("plan", cmd_plan, "choose patch size, network, batch and steps for the data and train.max_minutes; "
        "saved in output_dir for train")
    add("train", cmd_train, "train a model").add_argument("--resume", action="store_true",
                                                         help="continue the run in output_dir from checkpoints/last.pt")
    ev = add("evaluate", cmd_evaluate, "score a checkpoint on held-out fragments", checkpoint=True)
    ev.add_argument("--out", type=Path, help="evaluation folder (default: <output_dir>/eval)")
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
    pr.add_argument("--input", type=Path, required=True, action="append",
                    help="volume: .nii(.gz), .tif, folder of .tif, .zarr, .npy; with a folder --output: repeat it, "
                         "or give a folder of such volumes")
    pr.add_argument("--output", type=Path, required=True,
                    help="probability map: .nii.gz, .nii or .zarr; or a folder (a name without suffix) for one "
                         "<id>.zarr per input volume (files there not written by predict are left alone)")
    pr.add_argument("--mask", type=Path, help="also write the post-processed binary mask here (NIfTI)")
    pr.add_argument("--nifti", type=Path, help="with a .zarr --output: also export the probabilities as NIfTI")
    pr.add_argument("--roi", help="region of interest z0:z1,y0:y1,x0:x1 (of every input volume)")
    tt = add("tune-postprocess", cmd_tune_postprocess, "choose threshold and small-component removal on the "
             "validation fragments (leaderboard score); later commands use the choice", checkpoint=True,
             aliases=["tune-threshold"])
    tt.add_argument("--out", type=Path, help="where to write postprocess.json (default: the checkpoint's run folder)")
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
