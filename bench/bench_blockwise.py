"""Benchmark block-wise whole-volume prediction on synthetic uint16 OME-style Zarr scans.

For each size N it writes an N^3 uint16 Zarr (chunks 128^3) chunk by chunk, then predicts it block-wise
with a small torch model in a fresh subprocess and prints:

* peak resident memory of the prediction process (``ru_maxrss``), which must stay < 3 GiB and not
  grow with N;
* output voxels per second of the whole run (reading, normalising, model, encoding, Zarr writes);
* overhead = whole-run time / model-only time. The model-only time is the time spent inside
  ``predict_fn`` on the in-memory (haloed) blocks during the run ("model s"); as a cross-check,
  "alone s" times ``predict_fn`` on an in-memory block (block + 2 * halo) outside the run and scales
  it to the voxels the run fed it (noisier on shared CPUs).

Usage::

    python bench/bench_blockwise.py                      # 512^3 and 256^3, tiny 3-conv model
    python bench/bench_blockwise.py --sizes 96 64 --model resunet
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 128
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="volume edge lengths N (N^3)")
    parser.add_argument("--model", choices=["tiny", "resunet"], default="tiny",
                        help="tiny: 3 convs with 4 channels; resunet: build_model('resunet3d', init_features=4)")
    parser.add_argument("--block", type=int, default=128, help="block edge (output chunks)")
    parser.add_argument("--halo", type=int, default=16, help="halo edge")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    parser.add_argument("--workdir", default=None, help="where the temporary volumes go (default: system temp)")
    parser.add_argument("--worker", choices=["generate", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--zarr", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ workers


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


def build_net(name: str):
    """The benchmark model and the multiple its input sizes must have."""
    from torch import nn

    if name == "resunet":
        from vesuvius_monai.models import build_model

        return build_model("resunet3d", init_features=4), 8
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 1, 3, padding=1),
    ), 1


def make_predict_fn(name: str, device: str):
    """float32 block (z, y, x) -> float32 probabilities (z, y, x), padding to the model's size multiple."""
    import torch

    net, multiple = build_net(name)
    net = net.to(device).eval()

    def predict_fn(block: np.ndarray) -> np.ndarray:
        pad = [(0, -s % multiple) for s in block.shape]
        padded = np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block
        with torch.inference_mode():
            logits = net(torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device))
            probs = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
        return probs[: block.shape[0], : block.shape[1], : block.shape[2]]

    return predict_fn


def fed_voxels(shape: tuple[int, int, int], block: int, halo: int) -> int:
    """Voxels passed to predict_fn over a whole run: every block grown by the halo, clipped at the borders."""
    from vesuvius_monai.data.readers import block_grid

    total = 0
    for _, region in block_grid(shape, (block,) * 3):
        total += int(np.prod([min(d, s.stop + halo) - max(0, s.start - halo) for s, d in zip(region, shape)]))
    return total


def predict(args: argparse.Namespace) -> dict:
    """Predict ``args.zarr`` block-wise and measure time, throughput and peak memory."""
    import torch

    from vesuvius_monai.data.readers import open_volume, sample_percentiles
    from vesuvius_monai.engine.blockwise import predict_volume_blockwise

    torch.set_num_threads(args.threads)
    reader = open_volume(args.zarr)
    predict_fn = make_predict_fn(args.model, args.device)
    edge = args.block + 2 * args.halo
    sample_block = np.random.default_rng(1).normal(0, 1, (edge,) * 3).astype(np.float32)
    predict_fn(sample_block)  # warm-up (allocator, kernels)

    in_run = {"seconds": 0.0}

    def timed_fn(block: np.ndarray) -> np.ndarray:
        tic = time.perf_counter()
        probs = predict_fn(block)
        in_run["seconds"] += time.perf_counter() - tic
        return probs

    start = time.perf_counter()
    lo, hi = sample_percentiles(reader)
    out = predict_volume_blockwise(reader, timed_fn, Path(args.zarr).with_name("probs.zarr"),
                                   block_size=(args.block,) * 3, halo=(args.halo,) * 3, dtype="uint8",
                                   normalize=lambda b: (b - lo) / max(hi - lo, 1e-6), progress=False)
    total = time.perf_counter() - start

    repeats = 2
    model_start = time.perf_counter()
    for _ in range(repeats):
        predict_fn(sample_block)
    seconds_per_voxel = (time.perf_counter() - model_start) / (repeats * sample_block.size)
    model_time = seconds_per_voxel * fed_voxels(reader.shape, args.block, args.halo)
    return {
        "size": reader.shape[0],
        "voxels": int(np.prod(reader.shape)),
        "seconds": total,
        "voxels_per_s": np.prod(reader.shape) / total,
        "model_seconds": in_run["seconds"],
        "overhead": total / in_run["seconds"],
        "model_seconds_standalone": model_time,
        "overhead_standalone": total / model_time,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "output": str(out),
    }


# ------------------------------------------------------------------------------------------ driver


def run_worker(args: argparse.Namespace, *extra: str) -> str:
    """Run this script as a fresh subprocess (so ru_maxrss is its own) and return its stdout."""
    command = [sys.executable, __file__, "--model", args.model, "--block", str(args.block), "--halo", str(args.halo),
               "--threads", str(args.threads), "--device", args.device, *extra]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "generate":
        generate(Path(args.zarr), args.sizes[0])
        return 0
    if args.worker == "predict":
        print(json.dumps(predict(args)))
        return 0
    print(f"model={args.model} block={args.block} halo={args.halo} threads={args.threads} device={args.device}")
    print(f"{'size':>6} {'voxels':>12} {'seconds':>9} {'Mvox/s':>8} {'model s':>9} {'overhead':>9} "
          f"{'alone s':>9} {'overhead':>9} {'peak RSS':>10}")
    results = []
    for size in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench_blockwise_", dir=args.workdir))
        try:
            scan = tmp / "scan.zarr"
            run_worker(args, "--worker", "generate", "--sizes", str(size), "--zarr", str(scan))
            result = json.loads(run_worker(args, "--worker", "predict", "--zarr", str(scan)).strip().splitlines()[-1])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results.append(result)
        print(f"{size:>5}^3 {result['voxels']:>12,} {result['seconds']:>9.1f} {result['voxels_per_s'] / 1e6:>8.2f} "
              f"{result['model_seconds']:>9.1f} {result['overhead']:>9.2f} {result['model_seconds_standalone']:>9.1f} "
              f"{result['overhead_standalone']:>9.2f} {result['peak_rss_gib']:>8.2f} GiB")
    by_size = sorted(results, key=lambda r: r["voxels"])
    peaks = [r["peak_rss_gib"] for r in by_size]
    print(f"peak RSS < 3 GiB: {'yes' if max(peaks) < 3 else 'NO'}; "
          f"peak RSS of the largest / the smallest volume: {peaks[-1] / peaks[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
