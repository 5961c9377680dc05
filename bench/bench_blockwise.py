"""Benchmark the block machinery of inference (read, normalise, blend, spill, write) with a tiny network.

For each size N it writes an N^3 uint16 Zarr of synthetic scroll fragments (``_common.synthetic_zarr``: tiles of
``vesuvius-monai synth``, chunks 128^3), then predicts it into a Zarr store through ``predict``'s own driver
(``predict_zarr``) with a 3-convolution network (4 channels) in a fresh subprocess, and prints a table of:

* peak resident memory of the prediction process (VmHWM), which must stay < 3 GiB and not grow with N;
* output voxels per second of the whole run;
* overhead = whole-run time / time spent inside the network during the run, and the grid's window count
  (each window is computed once). With so cheap a network this shows what the machinery itself costs.

Usage::

    python bench/bench_blockwise.py                      # 512^3 and 256^3
    python bench/bench_blockwise.py --sizes 96 64 --block 64 --device cuda
    python bench/bench_blockwise.py --sizes 32 --block 32 --window 16 --batch 1 --threads 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import format_table, run_main, synthetic_zarr, vm_hwm_kib, write_json
from vesuvius_monai.errors import VesuviusError

log = logging.getLogger("bench_blockwise")

CHUNK = 128
GIB = 1024**3
COLUMNS = [("blocks", "blocks", "d"), ("windows", "windows", "d"), ("seconds", "seconds", ".1f"),
           ("mvox_s", "Mvox/s", ".2f"), ("model_seconds", "model s", ".1f"), ("overhead", "overhead", ".2f"),
           ("peak_rss_gib", "peak RSS GiB", ".2f")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="volume edge lengths N (N^3)")
    parser.add_argument("--block", type=int, default=128, help="block edge (infer.block_size)")
    parser.add_argument("--window", type=int, default=64, help="sliding window edge (infer.roi_size)")
    parser.add_argument("--batch", type=int, default=4, help="windows per network call (infer.sw_batch_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    parser.add_argument("--workdir", default=None, help="where the temporary volumes go (default: system temp)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--worker", choices=["predict"], help=argparse.SUPPRESS)
    parser.add_argument("--zarr", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class TimedNet(nn.Module):
    """A 3-convolution network (4 channels) that adds the time spent in its forward calls to ``seconds``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv3d(4, 1, 3, padding=1))
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.net(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def predict(args: argparse.Namespace) -> dict:
    """Predict ``args.zarr`` into a Zarr store and measure time, network time and peak memory."""
    from vesuvius_monai.config import load_config
    from vesuvius_monai.data.readers import open_volume
    from vesuvius_monai.engine.networks import ModuleNetwork
    from vesuvius_monai.engine.zarr_predict import predict_zarr
    from vesuvius_monai.engine.windows import WindowGrid

    torch.set_num_threads(args.threads)
    reader = open_volume(args.zarr)
    cfg = load_config(None, [f"infer.roi_size={[args.window] * 3}", f"infer.block_size={[args.block] * 3}",
                             f"infer.sw_batch_size={args.batch}", f"infer.device={args.device}",
                             "infer.tta_flip_axes=[]"])
    net = TimedNet().to(args.device).eval()
    with torch.inference_mode():
        net(torch.zeros(args.batch, 1, *cfg.infer.roi_size, device=args.device))  # warm-up
    net.seconds = 0.0
    start = time.perf_counter()
    out = Path(args.zarr).with_name("probs.zarr")
    predict_zarr(cfg, ModuleNetwork(net), [(Path(args.zarr), out)], None)
    total = time.perf_counter() - start
    grid = WindowGrid(reader.shape, cfg.infer.roi_size, cfg.infer.overlap, cfg.infer.block_size)
    return {"size": reader.shape[0], "voxels": int(np.prod(reader.shape)), "seconds": total,
            "voxels_per_s": np.prod(reader.shape) / total, "model_seconds": net.seconds,
            "overhead": total / net.seconds, "windows": grid.n_windows, "blocks": len(grid.blocks()),
            "peak_rss_gib": vm_hwm_kib() * 1024 / GIB, "output": str(out)}


def run_worker(args: argparse.Namespace, *extra: str) -> str:
    """Run this script as a fresh subprocess (so its peak memory is its own) and return its stdout."""
    command = [sys.executable, __file__, "--block", str(args.block), "--window", str(args.window), "--batch",
               str(args.batch), "--threads", str(args.threads), "--device", args.device, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise VesuviusError(f"prediction worker failed with status {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


def measure(args: argparse.Namespace, size: int) -> dict:
    """Write a size^3 synthetic Zarr in a temporary folder and predict it in a worker; the worker's figures."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_blockwise_", dir=args.workdir))
    try:
        scan = synthetic_zarr(tmp / "scan.zarr", size, tile=CHUNK)
        return json.loads(run_worker(args, "--worker", "predict", "--zarr", str(scan)).strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary folder made here


def run(args: argparse.Namespace) -> None:
    if args.worker == "predict":
        print(json.dumps(predict(args)))
        return
    rows = {}
    for size in args.sizes:
        r = measure(args, size)
        rows[f"{size}^3"] = {**r, "mvox_s": r["voxels_per_s"] / 1e6}
        log.info("%d^3: %.1f s, peak RSS %.2f GiB", size, r["seconds"], r["peak_rss_gib"])
    print(f"tiny 3-conv network, window {args.window}, overlap 0.25, block {args.block}, batch {args.batch}, "
          f"threads {args.threads}, device {args.device}")
    print(format_table(rows, COLUMNS, row_header="volume"))
    peaks = sorted((r["voxels"], r["peak_rss_gib"]) for r in rows.values())
    print(f"peak RSS < 3 GiB: {'yes' if max(p for _, p in peaks) < 3 else 'NO'}; "
          f"peak RSS of the largest / the smallest volume: {peaks[-1][1] / peaks[0][1]:.2f}")
    if args.out:
        write_json(args.out, {"arguments": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": rows})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
