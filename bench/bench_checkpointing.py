"""Gradient checkpointing on vs off for resunet3d: time and peak memory of one training step.

Each measurement runs in a fresh subprocess (one per mode and repetition, interleaved
off, on, off, on, ...) so that the peak-memory figure of one mode cannot hide the other's.
A worker builds the model, runs one unmeasured warm-up step at the full patch size (one-time
library set-up, AdamW state), then ``--steps`` timed steps (forward + Dice loss + backward +
AdamW step). Peak memory of a step: on CPU, the process's peak RSS (``resource.getrusage``)
minus its RSS after the warm-up; the worker runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB
so that glibc returns freed tensor memory to the OS and the RSS after the warm-up is not
inflated by freed-but-kept heap. On CUDA, ``torch.cuda.max_memory_allocated`` minus the
allocation after the warm-up.

The design notebook claims checkpointing saves ~50 % memory for ~30 % more time; the script
prints whether each half held (memory ratio on/off <= 0.6; time ratio on/off <= 1.4).

Example::

    python bench/bench_checkpointing.py --patch 64 64 64 --features 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch
from monai.losses import DiceLoss

from vesuvius_monai.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, default=16, help="init_features of resunet3d")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="subprocesses per mode")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def training_step(model: torch.nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + Dice loss + backward + AdamW step."""
    optimiser.zero_grad(set_to_none=True)
    loss = DiceLoss(sigmoid=True)(model(x), y)
    loss.backward()
    optimiser.step()


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> dict[str, list[float] | float]:
    """Measure training steps in this process; returns seconds per step and the peak memory rise in MiB."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(
        "resunet3d", init_features=args.features, depth=args.depth, checkpointing=args.worker == "on"
    ).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    y = (torch.rand_like(x) > 0.5).float()
    training_step(model, optimiser, x, y)  # warm-up
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = psutil.Process().memory_info().rss
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        training_step(model, optimiser, x, y)
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": seconds, "peak_mib": (peak - base) / 2**20}


def run_worker(mode: str, argv: list[str]) -> dict[str, list[float] | float]:
    """Run one measurement in a fresh Python process."""
    cmd = [sys.executable, __file__, *argv, "--worker", mode]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker '{mode}' failed with status {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(
        f"resunet3d init_features={args.features} depth={args.depth} patch={args.batch}x1x"
        f"{'x'.join(map(str, args.patch))} device={args.device} threads={args.threads or torch.get_num_threads()}"
    )
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(args.reps):
        for mode in ("off", "on"):
            result = run_worker(mode, argv)
            results[mode].append(result)
            steps = ", ".join(f"{t:.2f}" for t in result["seconds"])
            print(f"  rep {rep + 1}/{args.reps} checkpointing {mode:3s}: steps {steps} s, "
                  f"peak +{result['peak_mib']:.0f} MiB", flush=True)
    times = {mode: [t for r in runs for t in r["seconds"]] for mode, runs in results.items()}
    peaks = {mode: statistics.median(r["peak_mib"] for r in runs) for mode, runs in results.items()}
    for mode in ("off", "on"):
        print(f"checkpointing {mode:3s}: median {statistics.median(times[mode]):.2f} s/step "
              f"(min {min(times[mode]):.2f}) over {len(times[mode])} steps, "
              f"median peak +{peaks[mode]:.0f} MiB over {args.reps} processes")
    time_ratio = statistics.median(times["on"]) / statistics.median(times["off"])
    min_ratio = min(times["on"]) / min(times["off"])
    mem_ratio = peaks["on"] / peaks["off"]
    print(f"ratio on/off: time {time_ratio:.2f}x (of medians; {min_ratio:.2f}x of minima), memory {mem_ratio:.2f}x")
    saved, added = 100 * (1 - mem_ratio), 100 * (time_ratio - 1)
    print(f"notebook claim, memory (~50% less): measured {saved:.0f}% less -> "
          f"{'held' if mem_ratio <= 0.6 else 'did not hold'}")
    print(f"notebook claim, time (~30% more): measured {added:+.0f}% -> "
          f"{'held (no worse)' if time_ratio <= 1.4 else 'did not hold (slower)'}")


if __name__ == "__main__":
    main()
