"""Data-parallel speed: the same training with 1 process x 2 threads and with 2 processes x 1 thread (torchrun).

Both modes train the same model on the same synthetic fragments with the same effective batch (``--batch`` patches
per step: 1 process of batch B, or 2 processes of batch B/2 whose gradients are averaged), through the real
command: ``python -m vesuvius_monai train`` and ``torchrun --standalone --nproc_per_node=2 -m vesuvius_monai train``.
The figure is the training speed the run logs itself (``steps_per_s`` of train_log.csv: steps of this session /
seconds since its first step). Runs are interleaved (1, 2, 1, 2, ...) so that a
change in the machine's load hits both modes; medians over ``--reps`` are printed, each with its step count, and
the ratio of the medians.

On this project's 2-core CPU the question is whether 2 gloo processes of 1 thread beat 1 process of 2 threads;
on a GPU node the same command with ``--nproc`` = GPUs and ``--device cuda`` measures NCCL data parallelism.

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_distributed.py --steps 20 --reps 2
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    args = parser.parse_args(argv)
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    return args


# --------------------------------------------------------------------------- training


def overrides(args: argparse.Namespace, data: Path, out: Path, nproc: int) -> list[str]:
    threads = args.threads if nproc == 1 else max(args.threads // nproc, 1)
    patch = f"[{args.patch},{args.patch},{args.patch}]"
    return [f"data.root={data}", f"output_dir={out}", "data.val_fraction=0.0", "data.test_fraction=0.0",
            f"model.kwargs={{init_features: {args.features}}}", f"transforms.patch_size={patch}",
            f"infer.roi_size={patch}", f"train.steps={args.steps}", f"train.batch_size={args.batch // nproc}",
            "train.log_every=1", f"train.num_threads={threads}", f"train.device={args.device}",
            "train.warmup_steps=1"]  # no validation fragments: nothing but training steps


def run_training(args: argparse.Namespace, data: Path, out: Path, nproc: int) -> dict:
    """One run of ``args.steps`` steps with ``nproc`` processes; its logged speed and wall time."""
    launcher = [sys.executable, "-m", "vesuvius_monai"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
        "vesuvius_monai"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    began = time.perf_counter()
    done = subprocess.run([*launcher, "train", *overrides(args, data, out, nproc)], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"training with {nproc} processes failed:\n{done.stderr[-4000:]}")
    with (out / "train_log.csv").open(newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    return {"steps": int(last["step"]), "steps_per_s": float(last["steps_per_s"]), "wall_s": wall}


def bench_training(args: argparse.Namespace, work: Path) -> None:
    data = work / "data"
    write_synthetic_dataset(data, 3, seed=0, params=SynthParams(shape=(64, 96, 96)))
    modes = {1: f"1 process x {args.threads} threads, batch {args.batch}",
             args.nproc: f"{args.nproc} processes x {max(args.threads // args.nproc, 1)} thread(s), "
                         f"batch {args.batch // args.nproc} each"}
    results: dict[int, list[dict]] = {n: [] for n in modes}
    for rep in range(args.reps):
        for nproc in modes:
            result = run_training(args, data, work / f"run_{nproc}_{rep}", nproc)
            results[nproc].append(result)
            print(f"  rep {rep + 1}: {modes[nproc]}: {result['steps_per_s']:.3f} steps/s over {result['steps']} "
                  f"steps (whole command {result['wall_s']:.1f} s)", flush=True)
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
# Data-parallel prediction (the other half of issue 10) is measured here later: a bench_prediction(args, work)
# beside bench_training, with its own flag in parse_args, printing voxels/s with 1 and N processes side by side.


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        bench_training(args, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as work:
        bench_training(args, Path(work))


if __name__ == "__main__":
    main()
