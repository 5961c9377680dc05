"""Data-parallel speed: 1 process x 2 threads against 2 processes x 1 thread (torchrun), for training and prediction.

Training: both modes train the same model on the same synthetic fragments with the same effective batch
(``--batch`` patches per step: 1 process of batch B, or 2 processes of batch B/2 whose gradients are averaged),
through the real command: ``python -m vesuvius_monai train`` and ``torchrun --standalone --nproc_per_node=2 -m
vesuvius_monai train``. The figure is the training speed the run logs itself (``steps_per_s`` of train_log.csv: steps
of this session / seconds since its first step).

Prediction: both modes predict the same ``--predict-size``^3 uint16 Zarr volume into a fresh ``.zarr`` output
block by block, through the real command (``python -m vesuvius_monai predict`` and the same under torchrun, whose
ranks split the blocks in contiguous z-planes). The figure is output voxels / wall time of the whole command
(process start, model load and the final rename included); the windows recomputed at the seams between ranks (the
command logs them) are printed beside it.

Runs are interleaved (1, 2, 1, 2, ...) so that a change in the machine's load hits both modes; medians over
``--reps`` are printed, each with its sizes, and the ratio of the medians.

On this project's 2-core CPU the question is whether 2 gloo processes of 1 thread beat 1 process of 2 threads;
on a GPU node the same command with ``--nproc`` = GPUs and ``--device cuda`` measures NCCL data parallelism.

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_distributed.py --steps 20 --reps 2             # both halves
    PYTHONPATH=. .venv/bin/python bench/bench_distributed.py --parts predict --predict-size 192 --reps 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import read_train_log
from vesuvius_monai.data.synthetic import SynthParams, write_synthetic_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--reps", type=int, default=2, help="runs per mode (interleaved)")
    parser.add_argument("--batch", type=int, default=2, help="effective batch: patches per step, all processes")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel mode")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    parser.add_argument("--features", type=int, default=8, help="init_features of resunet3d")
    parser.add_argument("--patch", type=int, default=48, help="cubic patch edge")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--parts", nargs="+", choices=["train", "predict"], default=["train", "predict"],
                        help="which halves to measure")
    parser.add_argument("--predict-size", type=int, default=192, help="edge of the predicted cubic volume")
    parser.add_argument("--predict-block", type=int, default=96, help="infer.block_size edge (rounded up to a "
                        "multiple of the window stride)")
    args = parser.parse_args(argv)
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    return args


# --------------------------------------------------------------------------- training


def overrides(args: argparse.Namespace, data: Path, out: Path, nproc: int) -> list[str]:
    threads = threads_per_process(args, nproc)
    patch = f"[{args.patch},{args.patch},{args.patch}]"
    return [f"data.root={data}", f"output_dir={out}", "data.val_fraction=0.0", "data.test_fraction=0.0",
            f"model.kwargs={{init_features: {args.features}}}", f"transforms.patch_size={patch}",
            f"infer.roi_size={patch}", f"train.steps={args.steps}", f"train.batch_size={args.batch // nproc}",
            "train.log_every=1", f"train.num_threads={threads}", f"train.device={args.device}",
            "train.warmup_steps=1", "train.loss={dice: 1.0}"]  # no validation fragments: nothing but training steps


def threads_per_process(args: argparse.Namespace, nproc: int) -> int:
    """Torch threads of each of ``nproc`` processes: ``--threads`` shared between them (at least 1)."""
    return args.threads if nproc == 1 else max(args.threads // nproc, 1)


def run_command(nproc: int, words: list[str], what: str,
                omp_threads: int | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m vesuvius_monai words...`` in 1 process or under torchrun with ``nproc``; (result, wall seconds).

    torchrun's variables of this shell are dropped; ``OMP_NUM_THREADS`` is set to ``omp_threads`` (None: unset).
    A failed command ends the benchmark with its stderr, naming ``what``.
    """
    launcher = [sys.executable, "-m", "vesuvius_monai"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
        "vesuvius_monai"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    began = time.perf_counter()
    done = subprocess.run([*launcher, *words], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{what} with {nproc} processes failed:\n{done.stderr[-4000:]}")
    return done, wall


def interleaved(args: argparse.Namespace, modes: dict[int, str], run_one: Callable[[int, int], dict],
                line: Callable[[dict], str]) -> dict[int, list[dict]]:
    """``--reps`` rounds of ``run_one(rep, nproc)`` for every mode, interleaved; one printed line per run."""
    results: dict[int, list[dict]] = {n: [] for n in modes}
    for rep in range(args.reps):
        for nproc in modes:
            result = run_one(rep, nproc)
            results[nproc].append(result)
            print(f"  rep {rep + 1}: {modes[nproc]}: {line(result)}", flush=True)
    return results


def run_training(args: argparse.Namespace, data: Path, out: Path, nproc: int) -> dict:
    """One run of ``args.steps`` steps with ``nproc`` processes; its logged speed and wall time."""
    _, wall = run_command(nproc, ["train", *overrides(args, data, out, nproc)], "training")
    logged = read_train_log(out)
    return {"steps": logged["steps"], "steps_per_s": logged["steps_per_s"], "wall_s": wall}


def bench_training(args: argparse.Namespace, work: Path) -> None:
    data = work / "data"
    write_synthetic_dataset(data, 3, seed=0, params=SynthParams(shape=(64, 96, 96)))
    modes = {1: f"1 process x {args.threads} threads, batch {args.batch}",
             args.nproc: f"{args.nproc} processes x {threads_per_process(args, args.nproc)} thread(s), "
                         f"batch {args.batch // args.nproc} each"}
    results = interleaved(
        args, modes, lambda rep, nproc: run_training(args, data, work / f"run_{nproc}_{rep}", nproc),
        lambda r: f"{r['steps_per_s']:.3f} steps/s over {r['steps']} steps (whole command {r['wall_s']:.1f} s)")
    print(f"\ntraining, resunet3d init_features {args.features}, {args.patch}^3 patches, effective batch "
          f"{args.batch}, {args.device}, median of {args.reps} runs:")
    speed = {n: statistics.median(r["steps_per_s"] for r in results[n]) for n in modes}
    for nproc, name in modes.items():
        steps = results[nproc][0]["steps"]
        print(f"  {name:45s} {speed[nproc]:.3f} steps/s ({speed[nproc] * args.batch:.2f} patches/s) over "
              f"{steps} steps")
    print(f"  ratio {args.nproc} processes / 1 process: {speed[args.nproc] / speed[1]:.2f} "
          f"(steps/s, {args.steps} steps per run)")


# --------------------------------------------------------------------------- prediction


def write_volume(path: Path, size: int) -> None:
    """A ``size``^3 uint16 Zarr (chunks 128^3) of sheets and noise, written slab by slab."""
    import numpy as np
    import zarr

    array = zarr.create_array(str(path), shape=(size,) * 3, chunks=(128,) * 3, dtype="uint16")
    rng = np.random.default_rng(0)
    for z in range(0, size, 128):
        zz = np.arange(z, min(z + 128, size))[:, None, None]
        sheets = (np.sin((zz + np.arange(size)[None, :, None]) / 4.0) > 0) * 20000.0 + 10000.0
        array[z:z + len(zz)] = np.clip(sheets + rng.normal(0, 3000, (len(zz), size, size)), 0, 65535).astype("uint16")


def write_model(path: Path, args: argparse.Namespace) -> None:
    """A freshly initialised resunet3d checkpoint (``--features``; speed does not depend on the weights)."""
    import torch

    from vesuvius_monai.config import load_config
    from vesuvius_monai.io.checkpoint import Checkpoint
    from vesuvius_monai.models import build_model

    cfg = load_config(None, [f"model.kwargs={{init_features: {args.features}}}"])
    torch.manual_seed(0)
    Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(path)


def predict_overrides(args: argparse.Namespace) -> list[str]:
    edge, block = args.patch, args.predict_block
    return [f"infer.roi_size=[{edge},{edge},{edge}]", "infer.overlap=0.25", f"infer.block_size=[{block},{block},"
            f"{block}]", "infer.out_dtype=uint8", f"infer.device={args.device}", "infer.sw_batch_size=2",
            "infer.tta_flip_axes=[]"]


def run_prediction(args: argparse.Namespace, work: Path, out: Path, nproc: int) -> dict:
    """One ``predict`` command with ``nproc`` processes into a fresh ``out``; wall time and recomputed windows."""
    words = ["predict", "--checkpoint", str(work / "model.pt"), "--input", str(work / "volume.zarr"), "--output",
             str(out), *predict_overrides(args)]
    done, wall = run_command(nproc, words, "prediction", omp_threads=threads_per_process(args, nproc))
    seams = re.search(r"(\d+) more \(([\d.]+)%\) recomputed at the seams", done.stderr)
    return {"wall_s": wall, "mvox_s": args.predict_size ** 3 / wall / 1e6,
            "recomputed": int(seams[1]) if seams else 0}


def bench_prediction(args: argparse.Namespace, work: Path) -> None:
    from vesuvius_monai.engine.windows import WindowGrid

    size, edge = args.predict_size, args.patch
    write_volume(work / "volume.zarr", size)
    write_model(work / "model.pt", args)
    grid = WindowGrid((size,) * 3, (edge,) * 3, 0.25, (args.predict_block,) * 3)
    volume = (f"{size}^3 uint16 Zarr, {len(grid.blocks())} blocks of {grid.block_size[0]}^3 in {grid.counts[0]} "
              f"z-planes, {grid.n_windows} windows of {edge}^3")
    modes = {1: f"1 process x {args.threads} threads",
             args.nproc: f"{args.nproc} processes x {threads_per_process(args, args.nproc)} thread(s)"}
    results = interleaved(
        args, modes, lambda rep, nproc: run_prediction(args, work, work / f"pred_{nproc}_{rep}.zarr", nproc),
        lambda r: f"{r['mvox_s']:.3f} output Mvox/s ({r['wall_s']:.1f} s, {r['recomputed']} windows recomputed "
                  f"at seams; {volume})")
    print(f"\nblock-wise prediction, resunet3d init_features {args.features}, window {edge}^3, overlap 0.25, "
          f"{args.device}, {volume}, median of {args.reps} runs (whole command):")
    speed = {n: statistics.median(r["mvox_s"] for r in results[n]) for n in modes}
    for nproc, name in modes.items():
        wall = statistics.median(r["wall_s"] for r in results[nproc])
        print(f"  {name:45s} {speed[nproc]:.3f} output Mvox/s (wall {wall:.1f} s; "
              f"{results[nproc][0]['recomputed']} of {grid.n_windows} windows recomputed at seams)")
    print(f"  ratio {args.nproc} processes / 1 process: {speed[args.nproc] / speed[1]:.2f} (output Mvox/s, {volume})")


def run(args: argparse.Namespace, work: Path) -> None:
    if "train" in args.parts:
        bench_training(args, work)
    if "predict" in args.parts:
        bench_prediction(args, work)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as work:
        run(args, Path(work))


if __name__ == "__main__":
    main()
