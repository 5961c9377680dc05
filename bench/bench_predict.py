"""Whole-volume prediction through the real command (`vesuvius-monai predict --output probs.zarr`), before and after.

1. Inference options, on one batch of windows of the bench model (medians of interleaved repeats): no_grad vs
   inference_mode, channels-last 3D input, sliding-window batch size, larger windows, optionally torch.compile.
2. For each ``--sizes`` N: an N^3 uint16 Zarr of synthetic scroll fragments (``_common.synthetic_zarr``: tiles
   of ``vesuvius-monai synth``, chunks 128^3), predicted by the CLI in a fresh process, "after"
   (this tree) and "before" (the CLI of git commit BEFORE, extracted with ``git archive`` into a temporary folder
   and run from there: the old halo engine, measured in the same run on the same volume). Printed per run: wall
   time, output Mvox/s, peak resident memory of that process (VmHWM) and the ratio of wall time to the
   model's time on the windows of the volume's own sliding-window grid (grid windows x the time of one window
   batch / batch size, measured here in this run with the engine's own predictor).

    python bench/bench_predict.py --sizes 256 512                  # CPU, before and after
    python bench/bench_predict.py --sizes 256 512 --device cuda     # a GPU, AMP on (infer.amp)
    python bench/bench_predict.py --sizes 32 --features 4 --no-before --repeats 1 --window-edges 32 \
        infer.roi_size=[16,16,16] infer.sw_batch_size=1                # seconds

Every table is followed by paired verdicts: each inference option against the first row (per interleaved round,
Mvox/s) and, with the old engine, "after" against "before" (per volume size, Mvox/s).
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

import torch

from _common import (format_table, load_average, run_main, synthetic_zarr, timed_call, verdict_rule, verdict_text,
                     vm_hwm_kib, write_json)
from vesuvius_monai.config import load_config
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.engine.infer import make_predictor
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.models import build_model

BEFORE = "61bbcb3"  # last commit with the halo engine (block-wise halos, a separate in-memory path)
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512], help="volume edges N (N^3 voxels)")
    parser.add_argument("--features", type=int, default=8, help="init_features of resunet3d")
    parser.add_argument("--device", default="cpu", help="infer.device of the runs (cpu, cuda)")
    parser.add_argument("--no-before", action="store_true", help="skip the runs of the old engine")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the options table (slow)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the options table")
    parser.add_argument("--window-edges", type=int, nargs="*", default=[96, 128],
                        help="larger cubic windows (batch 1) in the options table")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. infer.overlap=0.5")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ options


def option_rows(cfg, device: torch.device, compile_too: bool, edges: list[int]) -> dict[str, tuple]:
    """name -> (callable, input batch) for the options table; the first row is the old path."""
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device).eval()
    roi, batch = tuple(cfg.infer.roi_size), cfg.infer.sw_batch_size
    cl = torch.channels_last_3d
    model_cl = build_model(cfg.model.name, **cfg.model.kwargs).to(device).eval().to(memory_format=cl)
    model_cl.load_state_dict(model.state_dict())

    def grad_free(m, mode):
        def run(x):
            with mode():
                return m(x)
        return run

    x = torch.randn(batch, 1, *roi, device=device)
    rows = {
        f"no_grad, batch {batch} (before)": (grad_free(model, torch.no_grad), x),
        f"inference_mode, batch {batch}": (grad_free(model, torch.inference_mode), x),
        f"inference_mode, channels-last input, batch {batch}": (grad_free(model, torch.inference_mode),
                                                                x.to(memory_format=cl)),
        f"inference_mode, channels-last model+input, batch {batch}": (grad_free(model_cl, torch.inference_mode),
                                                                      x.to(memory_format=cl)),
    }
    for b in (1, 4):
        xb = torch.randn(b, 1, *roi, device=device)
        rows[f"inference_mode, batch {b}"] = (grad_free(model, torch.inference_mode), xb)
        rows[f"inference_mode, channels-last model+input, batch {b}"] = (grad_free(model_cl, torch.inference_mode),
                                                                         xb.to(memory_format=cl))
    for edge in edges:
        xw = torch.randn(1, 1, edge, edge, edge, device=device)
        rows[f"inference_mode, window {edge}^3, batch 1"] = (grad_free(model, torch.inference_mode), xw)
        rows[f"inference_mode, channels-last model+input, window {edge}^3"] = (
            grad_free(model_cl, torch.inference_mode), xw.to(memory_format=cl))
    if compile_too:
        rows[f"torch.compile, inference_mode, batch {batch}"] = (grad_free(torch.compile(model), torch.inference_mode),
                                                                 x)
    return rows


OPTION_COLUMNS = [("mvox_s", "Mvox/s", ".2f"), ("ms", "ms/batch", ".0f"), ("rounds", "rounds", "d")]


def print_options(cfg, device: torch.device, repeats: int, compile_too: bool, edges: list[int]) -> dict:
    """Mvox/s of each option on one batch (medians of ``repeats`` interleaved rounds after one warm-up), with a
    paired verdict per option against the first row; returns the figures."""
    rows = option_rows(cfg, device, compile_too, edges)
    seconds = {name: [] for name in rows}
    for name, (fn, x) in rows.items():
        start = time.perf_counter()
        fn(x)
        if name.startswith("torch.compile"):
            print(f"  (torch.compile: first call with compilation {time.perf_counter() - start:.1f} s)")
    for _ in range(repeats):
        for name, (fn, x) in rows.items():
            seconds[name].append(timed_call(lambda: fn(x), x.device))
    speed = {name: [x.numel() / t / 1e6 for t in seconds[name]] for name, (_, x) in rows.items()}
    table = {name: {"mvox_s": statistics.median(speed[name]), "ms": statistics.median(seconds[name]) * 1000,
                    "rounds": repeats, "seconds": seconds[name]} for name in rows}
    print(f"inference options ({device}, torch threads {torch.get_num_threads()}, medians of {repeats} interleaved "
          f"rounds of one batch; window voxels per second):")
    print(format_table(table, OPTION_COLUMNS, row_header="option"))
    first, rounds = next(iter(rows)), range(repeats)
    lines = [f"{name} vs {first}: " + verdict_text("Mvox/s", dict(zip(rounds, speed[first])),
                                                   dict(zip(rounds, speed[name])), 0.0, unit="round", spec="+.2f")
             for name in list(rows)[1:]]
    print(verdict_rule("round", "0") + " (Mvox/s: higher is better)")
    for line in lines:
        print(line)
    print("  kept in the engine (from these figures on the 2-core CPU): channels-last 3D model + input (~1.8x), "
          "inference_mode (no measurable change, free), sw_batch_size 2 (batch 1 and 4 were slower per voxel);\n"
          "  not kept: windows larger than the training patch (fewer Mvox/s), torch.compile (~90 s to compile, no "
          "steady gain; --compile measures it)")
    return {"options": table, "verdicts": lines}


# ------------------------------------------------------------------------------------------ runs


def model_seconds_per_window(cfg, device: torch.device, repeats: int = 5) -> float:
    """Seconds per window of the engine's own predictor on one batch (median of ``repeats`` after a warm-up)."""
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device).eval()
    predictor = make_predictor(model, cfg.infer, device, cfg.infer.amp)
    x = torch.randn(cfg.infer.sw_batch_size, 1, *cfg.infer.roi_size, device=device)
    with torch.inference_mode():
        predictor(x)
        times = [timed_call(lambda: predictor(x), device) for _ in range(repeats)]
    return statistics.median(times) / x.shape[0]


def run_cli(command: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """Run a command in a fresh process; (wall seconds, its peak resident memory in GiB, its stderr).

    The peak is the process's own VmHWM, polled from /proc every 0.1 s (``ru_maxrss`` of a child would include
    this process's memory, which the child inherits at fork).
    """
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stderr=log, env=env, cwd=cwd)
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise VesuviusError(f"command failed: {' '.join(command)}\n{text[-2000:]}")
    return seconds, peak_kib / 2**20, text


def network_busy(stderr: str) -> float | None:
    """Seconds the engine's network thread was busy, from its log line (None for the old engine)."""
    found = re.search(r"network thread was busy ([0-9.]+) s", stderr)
    return float(found[1]) if found else None


def old_tree(tmp: Path) -> Path:
    """The package as of commit BEFORE, extracted (read-only use of the repository) into ``tmp/before``."""
    target = tmp / "before"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE, "vesuvius_monai"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def old_checkpoint(tree: Path, path: Path, overrides: list[str]) -> dict:
    """Save the bench model with the old code (its own config format); returns the env that runs the old CLI."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = ("import sys, torch; from vesuvius_monai.config import load_config; "
              "from vesuvius_monai.io.checkpoint import Checkpoint; from vesuvius_monai.models import build_model; "
              "import vesuvius_monai; assert vesuvius_monai.__file__.startswith(sys.argv[2]), vesuvius_monai.__file__; "
              "cfg = load_config(None, sys.argv[3:]); torch.manual_seed(0); "
              "Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(path), str(tree), *overrides], check=True, env=env, cwd=tree)
    return env


RUN_COLUMNS = [("wall_s", "wall s", ".1f"), ("mvox_s", "Mvox/s", ".2f"), ("peak_gib", "peak GiB", ".2f"),
               ("windows", "windows", "d"), ("model_s", "model s", ".1f"), ("wall_model", "wall/model", ".2f"),
               ("busy_s", "busy s", ".1f"), ("wall_busy", "wall/busy", ".2f"), ("load", "load", "s")]


def measure_run(name: str, command: list[str], env: dict | None, cwd: Path | None, size: int, volume: Path,
                out: Path, overrides: list[str], cfg, device: torch.device) -> dict:
    """One CLI prediction of ``volume`` with its wall time, peak memory, model time and the load around it."""
    grid = WindowGrid((size,) * 3, cfg.infer.roi_size, cfg.infer.overlap, cfg.infer.block_size)
    per_window = model_seconds_per_window(cfg, device)
    load_before = load_average()
    seconds, peak, stderr = run_cli([*command, "--input", str(volume), "--output", str(out), *overrides], env, cwd)
    model_s = grid.n_windows * (per_window + model_seconds_per_window(cfg, device)) / 2
    busy = network_busy(stderr)
    row = {"size": size, "engine": name, "wall_s": seconds, "mvox_s": size**3 / seconds / 1e6, "peak_gib": peak,
           "windows": grid.n_windows, "model_s": model_s, "wall_model": seconds / model_s,
           "load": f"{load_before:.2f}->{load_average():.2f}"}
    if busy:
        row.update(busy_s=busy, wall_busy=seconds / busy)
    return row


def run(args: argparse.Namespace) -> None:
    overrides = [f"model.kwargs={{init_features: {args.features}}}", f"infer.device={args.device}",
                 "infer.tta_flip_axes=[]", *args.overrides]  # the network's windows alone: no TTA unless asked
    cfg = load_config(None, overrides)
    device = resolve_device(cfg.infer.device)
    options = print_options(cfg, device, args.repeats, args.compile, args.window_edges)
    per_window = model_seconds_per_window(cfg, device)
    print(f"\nruns: resunet3d init_features={args.features}, window {list(cfg.infer.roi_size)}, overlap "
          f"{cfg.infer.overlap}, batch {cfg.infer.sw_batch_size}, blocks {list(cfg.infer.block_size)}, {device}, "
          f"amp {cfg.infer.amp and device.type == 'cuda'}; model alone {per_window * 1000:.0f} ms per window "
          f"(engine predictor, batch of {cfg.infer.sw_batch_size})")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.pt"
        torch.manual_seed(0)
        Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(ckpt)
        tree = None if args.no_before else old_tree(tmp)
        old_env = None if tree is None else old_checkpoint(tree, tmp / "old.pt", overrides)
        for size in args.sizes:
            volume = synthetic_zarr(tmp / f"vol{size}.zarr", size)
            runs = [("after", [sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint", str(ckpt)],
                     None, None)]
            if tree is not None:
                runs.insert(0, ("before", [sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint",
                                           str(tmp / "old.pt")], old_env, tree))
            for name, command, env, cwd in runs:
                rows[f"{size}^3 {name}"] = measure_run(name, command, env, cwd, size, volume,
                                                       tmp / f"probs{size}_{name}.zarr", overrides, cfg, device)
                print(f"  {size}^3 {name}: {rows[f'{size}^3 {name}']['wall_s']:.1f} s", flush=True)
    print(format_table(rows, RUN_COLUMNS, row_header="volume engine"))
    print("model s: grid windows x seconds per window of one batch (engine predictor), the mean of a measurement just "
          "before and just after the run; "
          "busy s: the engine's network thread, from its log; load: 1-minute load average before -> after (2 cores)")
    lines = []
    if tree is not None:
        speed = {engine: {r["size"]: r["mvox_s"] for r in rows.values() if r["engine"] == engine}
                 for engine in ("before", "after")}
        lines.append("after vs before: " + verdict_text("Mvox/s", speed["before"], speed["after"], 0.0, unit="size",
                                                        spec="+.2f"))
        print(verdict_rule("size", "0") + " (Mvox/s: higher is better)")
        print(lines[-1])
    if args.out:
        write_json(args.out, {"arguments": vars(args), "config_overrides": overrides, **options, "runs": rows,
                              "run_verdicts": lines})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
