"""nnU-Net v2 at equal CPU minutes on the fragments of a ``bench_recipes.py`` run, scored as that bench scores.

The fragments (and their train / val / test split) are read from ``<recipes>/dataset.yaml`` of a finished
``bench_recipes.py`` run. They are written as an nnU-Net raw dataset (NIfTI, read and written with nnU-Net's
NibabelIO so the arrays keep their (z, y, x) order; label 2 becomes nnU-Net's ``ignore`` label; one channel, per-image
z-score normalisation unless ``--channel-name CT``), planned and preprocessed by nnU-Net's own planner
(``nnUNetv2_plan_and_preprocess -c 3d_fullres``: its patch size, batch size and network), and trained on the train
fragments with the val fragments as its validation fold (``splits_final.json``), for each of ``--seeds``, for
``--minutes`` of wall-clock time by ``bench/nnunet_timed.py`` (nnU-Net's trainer with the epoch loop cut by the clock
and its poly decay on elapsed time), which then predicts the test fragments with nnU-Net's predictor (mirrored
test-time augmentation unless ``--no-mirroring``). The masks are scored with the project's metrics exactly as
``bench_recipes.py`` scores its systems (same metric list, ignore label, leaderboard settings of ``--config``, octant
component counts), and printed per family beside that run's systems (means over the same seeds).

nnU-Net runs in its own environment, ``.venv-nnunet`` (``bash bench/setup_nnunet.sh``: nnunetv2 and the CPU torch of
the project's pin; it is not a project dependency). The systems of the recipes run were trained in that earlier run,
not beside nnU-Net in this one: the load average of every run is recorded in both results files.

Usage::

    bash bench/setup_nnunet.sh
    PYTHONPATH=. .venv/bin/python bench/bench_nnunet.py --recipes runs/recipes_final --minutes 6 --seeds 0 1
    # nnU-Net planned for a 1 GB GPU: 64^3 patches, cheaper steps (one plan per --out-dir)
    PYTHONPATH=. .venv/bin/python bench/bench_nnunet.py --recipes runs/recipes_final --minutes 6 --seeds 0 1 \
        --gpu-memory-target 1 --out-dir runs/nnunet_1gb
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from _common import format_table, run_main, write_json
from recipes_report import COLUMNS, leaders, seed_rows, summarize_run
from recipes_runs import METRICS, mask_components
from vesuvius_monai.config import Config, config_from_raw
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.metrics import compute_metrics
from vesuvius_monai.metrics.betti import betti_connectivity

log = logging.getLogger("bench_nnunet")

DATASET = "Dataset501_VesuviusBench"
DRIVER = Path(__file__).with_name("nnunet_timed.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipes", type=Path, default=Path("runs/recipes_final"),
                        help="a finished bench_recipes.py run folder (its dataset.yaml and results.json)")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/nnunet"), help="nnU-Net's raw, preprocessed and "
                        "results folders, and <out-dir>/seed<S>/ per run")
    parser.add_argument("--python", type=Path, default=Path(".venv-nnunet/bin/python"),
                        help="the Python of nnU-Net's environment")
    parser.add_argument("--channel-name", default="MicroCT", help="nnU-Net channel name: 'CT' selects its CT "
                        "normalisation (global foreground percentiles), anything else per-image z-score")
    parser.add_argument("--iterations", type=int, default=25, help="steps per nnU-Net epoch (its default: 250)")
    parser.add_argument("--val-iterations", type=int, default=5, help="validation batches per epoch (default 50)")
    parser.add_argument("--da-processes", type=int, default=1, help="nnUNet_n_proc_DA: augmentation worker "
                        "processes (0: in the training process)")
    parser.add_argument("--no-mirroring", action="store_true", help="predict without nnU-Net's mirrored TTA")
    parser.add_argument("--gpu-memory-target", type=float, help="nnU-Net planner's -gpu_memory_target in GB (its "
                        "default 8): a smaller target plans smaller patches, i.e. cheaper steps; one plan per "
                        "--out-dir")
    args = parser.parse_args(argv)
    if not args.minutes > 0 or args.iterations < 1 or args.val_iterations < 1 or args.da_processes < 0:
        raise VesuviusError("--minutes must be > 0, --iterations and --val-iterations >= 1, --da-processes >= 0")
    return args


# --------------------------------------------------------------------------- nnU-Net's dataset


def nnunet_env(args: argparse.Namespace, seed: int | None = None) -> dict[str, str]:
    """The environment of nnU-Net's commands: its raw and preprocessed folders under ``--out-dir``, its results
    folder under the seed's run folder, augmentation processes (at least 1 for its planner, ``seed`` None, which
    sets that many torch threads)."""
    out = args.out_dir.resolve()
    processes = max(1, args.da_processes) if seed is None else args.da_processes
    results = out / ("results" if seed is None else f"seed{seed}/results")
    return dict(os.environ, nnUNet_raw=str(out / "raw"), nnUNet_preprocessed=str(out / "preprocessed"),
                nnUNet_results=str(results), nnUNet_n_proc_DA=str(processes),
                nnUNet_def_n_proc=str(os.cpu_count() or 1))  # also the threads of its prediction


def nnunet_run(command: list[str], args: argparse.Namespace, seed: int | None = None) -> None:
    """Run one of nnU-Net's commands in its environment; a failure is one VesuviusError naming the command."""
    if not Path(command[0]).is_file():
        raise VesuviusError(f"{command[0]} not found: set up nnU-Net's environment with 'bash bench/setup_nnunet.sh' "
                            f"(or pass --python)")
    done = subprocess.run(command, env=nnunet_env(args, seed))
    if done.returncode:
        raise VesuviusError(f"nnU-Net command failed with exit status {done.returncode} (its output is above): "
                            f"{' '.join(command)}")


def write_case(source: str, target: Path, *, label: bool) -> None:
    """Copy one NIfTI volume to ``target`` (.nii.gz) with its affine; labels as uint8 with values 0, 1, 2. (The
    export folder, not each file, is published atomically: see :func:`export_dataset`.)"""
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)
    if label:
        values = set(np.unique(data).tolist())
        if not values <= {0, 1, 2}:
            raise VesuviusError(f"{source}: label values {sorted(values)}; nnU-Net export expects 0, 1 and 2")
        data = data.astype(np.uint8)
    nib.save(nib.Nifti1Image(data, image.affine), target)


def export_dataset(args: argparse.Namespace, fragments: list[dict]) -> Path:
    """Write nnU-Net's raw dataset (train + val as imagesTr / labelsTr, test as imagesTs); returns its folder.

    An existing export is reused when its ``fragments.json`` lists the same fragments and its channel name is
    ``--channel-name``. The export is built in ``<folder>.partial`` (this bench's own, replaced after a crash) and
    published with one rename."""
    raw = args.out_dir / "raw" / DATASET
    manifest = raw / "fragments.json"
    listing = json.dumps([[f["id"], f["image"], f["label"], f["split"]] for f in fragments])
    if manifest.is_file():
        if manifest.read_text() != listing:
            raise VesuviusError(f"{manifest}: an nnU-Net export of other fragments is there; choose another --out-dir")
        channel = json.loads((raw / "dataset.json").read_text())["channel_names"]["0"]
        if channel != args.channel_name:
            raise VesuviusError(f"{raw / 'dataset.json'}: exported with channel name {channel!r}, not "
                                f"--channel-name {args.channel_name!r}; choose another --out-dir")
        return raw
    if raw.exists():
        raise VesuviusError(f"{raw} exists without fragments.json: not written by this bench; choose another --out-dir")
    final, raw = raw, raw.with_name(raw.name + ".partial")
    if raw.exists():
        log.info("replacing %s, an export this bench left unfinished", raw)
        shutil.rmtree(raw)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    trained = [f for f in fragments if f["split"] in ("train", "val")]
    for frag in fragments:
        images = "imagesTs" if frag["split"] == "test" else "imagesTr"
        write_case(frag["image"], raw / images / f"{frag['id']}_0000.nii.gz", label=False)
        if frag["split"] != "test":
            write_case(frag["label"], raw / "labelsTr" / f"{frag['id']}.nii.gz", label=True)
    dataset_json = {"channel_names": {"0": args.channel_name}, "labels": {"background": 0, "surface": 1, "ignore": 2},
                    "numTraining": len(trained), "file_ending": ".nii.gz",
                    "overwrite_image_reader_writer": "NibabelIO"}
    write_text(raw / "dataset.json", json.dumps(dataset_json, indent=1))
    write_text(raw / manifest.name, listing)
    raw.rename(final)
    return final


def plan_and_preprocess(args: argparse.Namespace, fragments: list[dict]) -> float:
    """nnU-Net's fingerprint, plans and preprocessing (once per ``--out-dir``; ``planned_with.json``, written when
    they are done, marks them and their ``--gpu-memory-target``) and the fold-0 split: train fragments train, val
    fragments validate. Returns the seconds spent (0 when reused)."""
    folder = args.out_dir / "preprocessed" / DATASET
    mark = args.out_dir / "planned_with.json"
    target = json.dumps({"gpu_memory_target": args.gpu_memory_target})
    seconds = 0.0
    if mark.is_file():
        if mark.read_text() != target:
            raise VesuviusError(f"{args.out_dir} holds nnU-Net plans made with {mark.read_text()}, not "
                                f"--gpu-memory-target {args.gpu_memory_target}: choose another --out-dir")
    else:
        start = time.perf_counter()
        command = [str(args.python.parent / "nnUNetv2_plan_and_preprocess"), "-d", DATASET.split("_")[0][7:],
                   "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"]
        if args.gpu_memory_target is not None:
            command += ["-gpu_memory_target", str(args.gpu_memory_target)]
        log.info("nnU-Net planning and preprocessing: %s", " ".join(command))
        nnunet_run(command, args)
        write_text(mark, target)
        seconds = time.perf_counter() - start
    split = [{"train": [f["id"] for f in fragments if f["split"] == "train"],
              "val": [f["id"] for f in fragments if f["split"] == "val"]}]
    write_text(folder / "splits_final.json", json.dumps(split, indent=1))
    return seconds


def train_and_predict(args: argparse.Namespace, seed: int) -> dict:
    """Run ``nnunet_timed.py`` for one seed (unless its summary with these settings is there); its summary."""
    run = args.out_dir / f"seed{seed}"
    summary_path = run / "summary.json"
    settings = {"minutes": args.minutes, "seed": seed, "mirroring": not args.no_mirroring,
                "iterations": args.iterations, "val_iterations": args.val_iterations,
                "da_processes": args.da_processes}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if all(summary.get(k) == v for k, v in settings.items()):
            return dict(summary, reused=True)
        summary_path.unlink()  # this bench's own, of other settings: no longer the mark of this seed's run
    if (run / "predictions").exists():
        log.info("seed %d: earlier predictions in %s are replaced by this run's", seed, run / "predictions")
    run.mkdir(parents=True, exist_ok=True)
    command = [str(args.python), str(DRIVER), "--dataset", DATASET, "--minutes", str(args.minutes), "--seed",
               str(seed), "--iterations", str(args.iterations), "--val-iterations", str(args.val_iterations),
               "--predict-in", str(args.out_dir / "raw" / DATASET / "imagesTs"), "--predict-out",
               str(run / "predictions"), "--summary", str(summary_path)]
    if args.no_mirroring:
        command.append("--no-mirroring")
    load_before = list(os.getloadavg())
    log.info("seed %d: nnU-Net training %.2f min, then predicting: %s", seed, args.minutes, " ".join(command))
    nnunet_run(command, args, seed)
    summary = json.loads(summary_path.read_text())
    summary.update(settings, load_before=load_before, load_after=list(os.getloadavg()))
    write_json(summary_path, summary)
    return dict(summary, reused=False)


# --------------------------------------------------------------------------- scores


def score_run(args: argparse.Namespace, seed: int, summary: dict, fragments: list[dict], info: dict,
              cfg: Config) -> dict:
    """A row like bench_recipes' (system 'nnunet'): per test fragment the bench's metrics and octant components,
    scored with ``cfg``'s ignore label and leaderboard settings (those of the recipes run) as ``evaluate`` scores."""
    connectivity = betti_connectivity(cfg.evaluate.leaderboard.topo_matching)
    scored = {}
    for frag in (f for f in fragments if f["split"] == "test"):
        path = args.out_dir / f"seed{seed}" / "predictions" / f"{frag['id']}.nii.gz"
        if not path.is_file():
            raise VesuviusError(f"{path} not found: nnU-Net did not predict test fragment {frag['id']}")
        label = open_volume(frag["label"]).read()
        mask = open_volume(path).read() == 1
        if mask.shape != label.shape:
            raise VesuviusError(f"{path}: shape {mask.shape}, label {frag['label']} {label.shape}")
        scores = compute_metrics(mask, label, METRICS, ignore_index=cfg.data.ignore_index,
                                 spacing=(1.0, 1.0, 1.0), weights=cfg.evaluate.leaderboard)  # as evaluate
        pred_c, label_c = mask_components(mask, label, cfg.data.ignore_index, connectivity)
        scored[frag["id"]] = {"family": info[frag["id"]]["family"], "generator": info[frag["id"]]["generator"],
                              **scores, "pred_components": pred_c, "label_components": label_c}
    return {"system": "nnunet", "seed": seed, "steps": summary["steps"], "scored_step": summary["steps"],
            **summary, "fragments": scored}


def run(args: argparse.Namespace) -> None:
    for name in ("results.json", "dataset.yaml"):
        if not (args.recipes / name).is_file():
            raise VesuviusError(f"{args.recipes / name} not found: --recipes must be a finished bench_recipes.py run "
                                f"folder")
    recipes = json.loads((args.recipes / "results.json").read_text())
    fragments = yaml.safe_load((args.recipes / "dataset.yaml").read_text())["fragments"]
    families = list(recipes["families"])
    info = recipes["fragments"]
    missing = [s for s in args.seeds if s not in recipes["seeds"]]
    if missing:
        raise VesuviusError(f"--seeds {missing}: not in the recipes run {args.recipes} (seeds {recipes['seeds']})")
    export_dataset(args, fragments)
    plan_seconds = plan_and_preprocess(args, fragments)
    cfg = config_from_raw(recipes["runs"][0]["config"], [])  # the recipes run's scoring settings
    rows = [score_run(args, seed, train_and_predict(args, seed), fragments, info, cfg) for seed in args.seeds]
    others = [r for r in recipes["runs"] if r["seed"] in args.seeds]
    results = [*others, *rows]
    summaries = [r["summary"] if "summary" in r else summarize_run(r, families) for r in results]
    systems = [*recipes["systems"], "nnunet"]
    target = f"-gpu_memory_target {args.gpu_memory_target:g}" if args.gpu_memory_target else "its default plan"
    print(f"\nnnU-Net 3d_fullres ({target}), {args.minutes:g} min of training per seed on this CPU "
          f"(planning and preprocessing {plan_seconds:.0f} s{' (reused)' if not plan_seconds else ''}, not counted), "
          f"beside the systems of {args.recipes} (trained there, the same fragments):")
    for r in rows:
        print(f"  seed {r['seed']}: patch {r['patch_size']}, batch {r['batch_size']}, "
              f"features {r['features_per_stage']}"
              f", {r['steps']} steps in {r['train_seconds']:.0f} s ({r['epochs']} epochs), prediction of "
              f"{len(r['fragments'])} test fragments {r['predict_seconds']:.0f} s (mirroring {r['mirroring']}), load "
              f"{r.get('load_before', [float('nan')])[0]:.1f} -> {r.get('load_after', [float('nan')])[0]:.1f}"
              + (" (reused)" if r["reused"] else ""))
    print(f"\nmeans over seeds {args.seeds}: cells are the mean of the per-seed means [min-max over seeds]")
    print(format_table(seed_rows(results, summaries), COLUMNS, row_header="system family"))
    print("\nleader per family (nnunet among the plain pipelines):")
    for line in leaders(results, summaries, families, systems):
        print("  " + line)
    write_json(args.out_dir / "results.json", {"command": sys.argv, "recipes": str(args.recipes),
                                               "plan_seconds": plan_seconds, "families": families,
                                               "gpu_memory_target": args.gpu_memory_target,
                                               "runs": [dict(r, summary=summarize_run(r, families)) for r in rows]})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
