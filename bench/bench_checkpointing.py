"""Gradient checkpointing on vs off for resunet3d: time and peak memory of one training step.

Each measurement runs in a fresh subprocess (one per mode and repetition, interleaved
off, on, off, on, ...) so that the peak-memory figure of one mode cannot hide the other's.
A worker builds the model, runs one unmeasured warm-up step at the full patch size (one-time
library set-up, AdamW state), then ``--steps`` timed steps (forward + Dice loss + backward +
AdamW step). Peak memory of a step: on CPU, the process's peak RSS (VmHWM, its own: ``ru_maxrss``
would include the parent's RSS at fork) minus its RSS after the warm-up; the worker runs with
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that glibc returns freed tensor memory to the OS and the RSS
after the warm-up is not inflated by freed-but-kept heap. On CUDA, ``torch.cuda.max_memory_allocated`` minus the
allocation after the warm-up.

Printed: a table of both modes (median and minimum seconds per step with the step count, median peak memory
with the process count), the ratios on / off, paired verdicts over the repetitions, and whether the measured
trade-off matches the usual expectation of gradient checkpointing, "about 50 % less memory for about 30 % more
time" (memory ratio on/off <= 0.6; time ratio on/off <= 1.4).

Example::

    python bench/bench_checkpointing.py --patch 64 64 64 --features 16 --reps 3
    python bench/bench_checkpointing.py --patch 16 16 16 --features 4 --depth 2 --reps 1 --steps 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import (format_table, run_main, synchronise, timed_call, verdict_rule, verdict_text, vm_hwm_kib,
                     write_json)
from vesuvius_monai.errors import VesuviusError

COLUMNS = [("median_s", "median s/step", ".2f"), ("min_s", "min s/step", ".2f"), ("steps", "steps", "d"),
           ("peak_mib", "median peak MiB", ".0f"), ("processes", "processes", "d")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, default=16, help="init_features of resunet3d")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="subprocesses per mode")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> dict:
    """Measure training steps in this process (torch is imported here only: the parent stays small); returns the
    device, torch threads, seconds per step and the peak memory rise in MiB."""
    import psutil
    import torch
    from monai.losses import DiceLoss

    from vesuvius_monai.models import build_model

    def training_step() -> None:
        """One forward + Dice loss + backward + AdamW step."""
        optimiser.zero_grad(set_to_none=True)
        loss = DiceLoss(sigmoid=True)(model(x), y)
        loss.backward()
        optimiser.step()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(
        "resunet3d", init_features=args.features, depth=args.depth, checkpointing=args.worker == "on"
    ).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    y = (torch.rand_like(x) > 0.5).float()
    training_step()  # warm-up
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = psutil.Process().memory_info().rss
    seconds = [timed_call(training_step, device) for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = vm_hwm_kib() * 1024
    return {"device": str(device), "threads": torch.get_num_threads(), "seconds": seconds,
            "peak_mib": (peak - base) / 2**20}


def run_worker(mode: str, argv: list[str]) -> dict[str, list[float] | float]:
    """Run one measurement in a fresh Python process."""
    cmd = [sys.executable, __file__, *argv, "--worker", mode]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise VesuviusError(f"worker '{mode}' failed with status {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> dict:
    """Print the table, ratios, verdicts and the comparison with the expected trade-off; returns the figures."""
    times = {mode: [t for r in runs for t in r["seconds"]] for mode, runs in results.items()}
    peaks = {mode: statistics.median(r["peak_mib"] for r in runs) for mode, runs in results.items()}
    rows = {f"checkpointing {mode}": {"median_s": statistics.median(times[mode]), "min_s": min(times[mode]),
                                      "steps": len(times[mode]), "peak_mib": peaks[mode], "processes": args.reps}
            for mode in ("off", "on")}
    print(format_table(rows, COLUMNS, row_header="mode"))
    time_ratio = statistics.median(times["on"]) / statistics.median(times["off"])
    min_ratio = min(times["on"]) / min(times["off"])
    mem_ratio = peaks["on"] / peaks["off"]
    print(f"ratio on/off: time {time_ratio:.2f}x (of medians; {min_ratio:.2f}x of minima; {len(times['on'])} steps "
          f"each), memory {mem_ratio:.2f}x (of medians over {args.reps} processes each)")
    reps = range(args.reps)
    per_rep = {mode: [statistics.median(r["seconds"]) for r in runs] for mode, runs in results.items()}
    lines = [verdict_text(f"{what} on vs off", dict(zip(reps, values["off"])), dict(zip(reps, values["on"])), 0.0,
                          unit="repetition", lower_is_better=True, spec=spec)
             for what, values, spec in (("s/step", per_rep, "+.3f"),
                                        ("peak MiB", {m: [r["peak_mib"] for r in runs] for m, runs in
                                                      results.items()}, "+.0f"))]
    print(verdict_rule("repetition", "0") + " (seconds and MiB: lower is better)")
    for line in lines:
        print(line)
    saved, added = 100 * (1 - mem_ratio), 100 * (time_ratio - 1)
    print(f"expected trade-off, memory (about 50% less): measured {saved:.0f}% less -> "
          f"{'held' if mem_ratio <= 0.6 else 'did not hold'}")
    print(f"expected trade-off, time (about 30% more): measured {added:+.0f}% -> "
          f"{'held (no worse)' if time_ratio <= 1.4 else 'did not hold (slower)'}")
    return {"modes": rows, "time_ratio": time_ratio, "min_time_ratio": min_ratio, "memory_ratio": mem_ratio,
            "verdicts": lines, "runs": results}


def run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(args.reps):
        for mode in ("off", "on"):
            result = run_worker(mode, argv)
            if rep == 0 and mode == "off":
                print(f"resunet3d init_features={args.features} depth={args.depth} patch={args.batch}x1x"
                      f"{'x'.join(map(str, args.patch))} device={result['device']} threads={result['threads']}")
            results[mode].append(result)
            steps = ", ".join(f"{t:.2f}" for t in result["seconds"])
            print(f"  rep {rep + 1}/{args.reps} checkpointing {mode:3s}: steps {steps} s, "
                  f"peak +{result['peak_mib']:.0f} MiB", flush=True)
    figures = report(args, results)
    if args.out:
        write_json(args.out, {"arguments": {k: v for k, v in vars(args).items() if k != "worker"}, **figures})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run_main(parse_args, lambda args: run(args, argv), argv)


if __name__ == "__main__":
    main()
