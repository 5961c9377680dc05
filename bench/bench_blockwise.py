"""Benchmark the block machinery of inference (read, normalise, blend, spill, write) with a tiny network.

For each size N it writes an N^3 uint16 Zarr (chunks 128^3) chunk by chunk, then predicts it into a Zarr store
with ``infer_volume`` and a 3-convolution network (4 channels) in a fresh subprocess, and prints:

* peak resident memory of the prediction process (VmHWM), which must stay < 3 GiB and not grow with N;
* output voxels per second of the whole run;
* overhead = whole-run time / time spent inside the network during the run, and the grid's window count
  (each window is computed once). With so cheap a network this shows what the machinery itself costs.

Usage::

    python bench/bench_blockwise.py                      # 512^3 and 256^3
    python bench/bench_blockwise.py --sizes 96 64 --block 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHUNK = 128
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="volume edge lengths N (N^3)")
    parser.add_argument("--block", type=int, default=128, help="block edge (infer.block_size)")
    parser.add_argument("--window", type=int, default=64, help="sliding window edge (infer.roi_size)")
    parser.add_argument("--batch", type=int, default=4, help="windows per network call (infer.sw_batch_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    parser.add_argument("--workdir", default=None, help="where the temporary volumes go (default: system temp)")
    parser.add_argument("--worker", choices=["generate", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--zarr", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def generate(path: Path, size: int) -> None:
    """Write a size^3 uint16 Zarr (chunks 128^3) one chunk at a time: smooth-ish sheets plus noise."""
    import zarr

    array = zarr.create_array(str(path), shape=(size,) * 3, chunks=(CHUNK,) * 3, dtype="uint16")
    rng = np.random.default_rng(0)
    for z0 in range(0, size, CHUNK):
        for y0 in range(0, size, CHUNK):
            for x0 in range(0, size, CHUNK):
                z, y, x = np.ogrid[z0:min(z0 + CHUNK, size), y0:min(y0 + CHUNK, size), x0:min(x0 + CHUNK, size)]
                sheets = 20000 + 15000 * np.sin(0.15 * z + 0.02 * y + 0 * x).astype(np.float32)
                noise = rng.normal(0, 3000, sheets.shape).astype(np.float32)
                block = np.clip(sheets + noise, 0, 65535).astype(np.uint16)
                array[z0:z0 + block.shape[0], y0:y0 + block.shape[1], x0:x0 + block.shape[2]] = block


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
    from vesuvius_monai.engine.infer import infer_volume
    from vesuvius_monai.engine.windows import WindowGrid

    torch.set_num_threads(args.threads)
    reader = open_volume(args.zarr)
    cfg = load_config(None, [f"infer.roi_size={[args.window] * 3}", f"infer.block_size={[args.block] * 3}",
                             f"infer.sw_batch_size={args.batch}", f"infer.device={args.device}"])
    net = TimedNet().to(args.device).eval()
    with torch.inference_mode():
        net(torch.zeros(args.batch, 1, *cfg.infer.roi_size, device=args.device))  # warm-up
    net.seconds = 0.0
    start = time.perf_counter()
    out = infer_volume(net, reader, cfg, output=Path(args.zarr).with_name("probs.zarr"))
    total = time.perf_counter() - start
    grid = WindowGrid(reader.shape, cfg.infer.roi_size, cfg.infer.overlap, cfg.infer.block_size)
    return {"size": reader.shape[0], "voxels": int(np.prod(reader.shape)), "seconds": total,
            "voxels_per_s": np.prod(reader.shape) / total, "model_seconds": net.seconds,
            "overhead": total / net.seconds, "windows": grid.n_windows, "blocks": len(grid.blocks()),
            "peak_rss_gib": peak_rss_kib() * 1024 / GIB, "output": str(out)}


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_worker(args: argparse.Namespace, *extra: str) -> str:
    """Run this script as a fresh subprocess (so ru_maxrss is its own) and return its stdout."""
    command = [sys.executable, __file__, "--block", str(args.block), "--window", str(args.window), "--batch",
               str(args.batch), "--threads", str(args.threads), "--device", args.device, *extra]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "generate":
        generate(Path(args.zarr), args.sizes[0])
        return 0
    if args.worker == "predict":
        print(json.dumps(predict(args)))
        return 0
    print(f"tiny 3-conv network, window {args.window}, overlap 0.25, block {args.block}, batch {args.batch}, "
          f"threads {args.threads}, device {args.device}")
    print(f"{'size':>6} {'blocks':>7} {'windows':>8} {'seconds':>9} {'Mvox/s':>8} {'model s':>9} {'overhead':>9} "
          f"{'peak RSS':>10}")
    peaks = []
    for size in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench_blockwise_", dir=args.workdir))
        try:
            scan = tmp / "scan.zarr"
            run_worker(args, "--worker", "generate", "--sizes", str(size), "--zarr", str(scan))
            r = json.loads(run_worker(args, "--worker", "predict", "--zarr", str(scan)).strip().splitlines()[-1])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        peaks.append((r["voxels"], r["peak_rss_gib"]))
        print(f"{size:>5}^3 {r['blocks']:>7} {r['windows']:>8} {r['seconds']:>9.1f} {r['voxels_per_s'] / 1e6:>8.2f} "
              f"{r['model_seconds']:>9.1f} {r['overhead']:>9.2f} {r['peak_rss_gib']:>8.2f} GiB", flush=True)
    peaks.sort()
    print(f"peak RSS < 3 GiB: {'yes' if max(p for _, p in peaks) < 3 else 'NO'}; "
          f"peak RSS of the largest / the smallest volume: {peaks[-1][1] / peaks[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
