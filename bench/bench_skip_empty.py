"""Skipping empty space: a volume half outside its scanned cylinder, predicted with every window and with the windows
over empty space skipped (``infer.skip_background=0``), by the command's own Zarr driver (``predict_zarr``).

The volume is (Z, N, N): inside a cylinder along z (radius chosen so that half the volume lies outside) a scan-like
noise of uint16 values around 1000, outside it 0, as a scanner leaves the space around a scroll. The network is the
recipe's resunet3d (random weights, seed 0; the time per window does not depend on training), no test-time
augmentation. Printed per setting: windows run and skipped (the store's own counts), wall time, output Mvox/s, the
speed-up over running every window, and how far the outputs differ (max |p| difference, and the share of voxels
that differ: only those that a skipped window reaches can).

    python bench/bench_skip_empty.py                   # 96 x 768 x 768, window 32: about 80 s on 2 cores
    python bench/bench_skip_empty.py --z 64 --n 320    # seconds
    python bench/bench_skip_empty.py --z 96 --n 512 infer.roi_size=[64,64,64]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import format_table, run_main, write_json
from vesuvius_monai.config import load_config
from vesuvius_monai.engine.networks import ModuleNetwork
from vesuvius_monai.engine.zarr_predict import predict_zarr
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=96, help="volume depth (along the cylinder)")
    parser.add_argument("--n", type=int, default=768, help="volume side across the cylinder")
    parser.add_argument("--outside", type=float, default=0.5, help="share of the volume outside the cylinder")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. infer.roi_size=[64,64,64]")
    return parser.parse_args(argv)


def cylinder_volume(z: int, n: int, outside: float) -> np.ndarray:
    """uint16 (z, n, n): noise around 1000 inside a z-cylinder covering ``1 - outside`` of the volume, 0 outside."""
    radius = n * math.sqrt((1.0 - outside) / math.pi)
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    inside = np.hypot(yy, xx) <= radius
    scan = np.random.default_rng(0).normal(1000, 200, (z, n, n)).clip(1, 65535).astype(np.uint16)
    return scan * inside[None]


def run(args: argparse.Namespace) -> None:
    base = ["infer.roi_size=[32,32,32]", "infer.block_size=[96,96,96]", "infer.tta_flip_axes=[]", "infer.device=cpu",
            "infer.out_dtype=float16", "infer.sw_batch_size=4"]
    rows, outputs = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        volume = cylinder_volume(args.z, args.n, args.outside)
        np.save(Path(folder) / "scan.npy", volume)
        print(f"volume {volume.shape}: {np.mean(volume == 0):.1%} of the voxels outside the cylinder (0)")
        for name, extra in (("every window", []), ("skip_background=0", ["infer.skip_background=0"])):
            cfg = load_config(None, base + list(args.overrides) + extra)
            torch.manual_seed(0)
            model = build_model(cfg.model.name, **cfg.model.kwargs)
            out = Path(folder) / f"{len(rows)}.zarr"
            tic = time.perf_counter()
            predict_zarr(cfg, ModuleNetwork(model), [(Path(folder) / "scan.npy", out)], None, resume=False)
            seconds = time.perf_counter() - tic
            store = PredictionStore.open(out, "r")
            counts = store.meta["windows"]
            outputs[name] = store.read_probabilities()
            rows[name] = {"run": counts["run"], "skipped": counts["skipped"], "seconds": seconds,
                          "mvox": volume.size / seconds / 1e6}
    first = next(iter(rows.values()))
    for row in rows.values():
        row["speedup"] = first["seconds"] / row["seconds"]
    full, skipped = outputs.values()
    diff = np.abs(full - skipped)
    print(format_table(rows, [("run", "windows run", "d"), ("skipped", "skipped", "d"), ("seconds", "seconds", ".1f"),
                              ("mvox", "Mvox/s", ".3f"), ("speedup", "speed-up", ".2f")]))
    print(f"outputs: max |difference| {diff.max():.4f}, {np.mean(diff > 0):.1%} of the voxels differ "
          f"(only where a skipped window reaches; a skipped window counts as predicting 0)")
    print(f"config: {' '.join(base + list(args.overrides))}; model resunet3d (recipe kwargs), random weights")
    if args.out:
        write_json(args.out, {"rows": rows, "max_diff": float(diff.max()), "share_differs": float(np.mean(diff > 0))})


if __name__ == "__main__":
    run_main(parse_args, run)
