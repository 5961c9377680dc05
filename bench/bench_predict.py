"""Whole-volume prediction through the real command: `vesuvius-monai predict --output probs.zarr`.

Writes synthetic uint16 Zarr volumes (chunks 128^3) of each ``--sizes`` edge, saves a checkpoint of an
(untrained: speed does not depend on the weights) resunet3d, then for each size runs the CLI in a fresh
process and prints its peak resident memory, output voxels per second, and the ratio of its wall time to
the model's own time on the same number of voxels (the network run on non-overlapping windows of the
configured size, measured in the same run). The ratio shows the cost of window overlap, block halos
aligned to the window grid, reading, normalising and writing.

    python bench/bench_predict.py --sizes 256 512
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from vesuvius_monai.config import load_config
from vesuvius_monai.io.checkpoint import save_checkpoint
from vesuvius_monai.models import build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="volume edges N (N^3 voxels)")
    parser.add_argument("--features", type=int, default=8, help="init_features of resunet3d")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. infer.overlap=0.5")
    return parser.parse_args()


def write_volume(path: Path, size: int) -> None:
    """An N^3 uint16 Zarr with smooth structure, written chunk by chunk (bounded memory)."""
    arr = zarr.create_array(str(path), shape=(size,) * 3, chunks=(128,) * 3, dtype="uint16")
    rng = np.random.default_rng(0)
    for z in range(0, size, 128):
        zz = np.arange(z, min(z + 128, size))[:, None, None]
        yy = np.arange(size)[None, :, None]
        sheets = (np.sin((zz + yy) / 4.0) > 0).astype(np.float32) * 20000 + 10000
        noise = rng.normal(0, 3000, (len(zz), size, size))
        arr[z:z + len(zz)] = np.clip(sheets + noise, 0, 65535).astype(np.uint16)


def model_seconds_per_voxel(cfg) -> float:
    """Seconds per voxel of the bare network on batches of windows (no overlap, no I/O)."""
    model = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    x = torch.randn(cfg.infer.sw_batch_size, 1, *cfg.infer.roi_size)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(3):
            model(x)
    return (time.perf_counter() - start) / 3 / x.numel()


def run_cli(ckpt: Path, volume: Path, out: Path, overrides: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint", str(ckpt), "--input",
                    str(volume), "--output", str(out), *overrides], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    cfg = load_config(None, [f"model.kwargs={{init_features: {args.features}}}", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.pt"
        torch.manual_seed(0)
        save_checkpoint(ckpt, cfg=cfg, model=build_model(cfg.model.name, **cfg.model.kwargs), step=0)
        per_voxel = model_seconds_per_voxel(cfg)
        print(f"resunet3d init_features={args.features}, window {list(cfg.infer.roi_size)}, overlap "
              f"{cfg.infer.overlap}, blocks {list(cfg.infer.block_size)}, halo {list(cfg.infer.halo)}, "
              f"torch threads {torch.get_num_threads()}; model alone: {1 / per_voxel / 1e6:.2f} Mvox/s "
              f"(3 passes of {cfg.infer.sw_batch_size} windows)")
        for size in args.sizes:
            volume = tmp / f"vol{size}.zarr"
            write_volume(volume, size)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            seconds = run_cli(ckpt, volume, tmp / f"probs{size}.zarr", args.overrides)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            note = "" if peak > before else " (not above an earlier, larger run: compare sizes in separate runs)"
            voxels = size**3
            print(f"{size}^3: {seconds:.1f} s, {voxels / seconds / 1e6:.2f} Mvox/s, peak RSS {peak / 2**20:.2f} GiB"
                  f"{note}, whole-volume time / model time on {voxels} voxels = {seconds / (per_voxel * voxels):.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
