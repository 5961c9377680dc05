"""Time every metric of vesuvius_monai.metrics on a synthetic fragment (warped thin sheets).

Usage:
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 320
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 128 --compare-monai

The label holds a few warped sheets (3 voxels thick) and an unlabeled box (value 2); the prediction is the
label with one sheet shifted by a voxel, a hole cut in another, one sheet split by a gap, a bridge merging two
sheets, a few spurious blobs and some surface voxels dropped. Metrics run through one MetricContext, so each
line is the extra time that metric needs on top of those before it (shared work is counted once).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vesuvius_monai.metrics import METRICS, MetricContext, check_metric_names
from vesuvius_monai.metrics.leaderboard import LeaderboardWeights


def sheet_heights(size: int, n_sheets: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Heights z(y, x) of ``n_sheets`` warped sheets, int arrays (size, size), evenly spaced along z."""
    y, x = np.mgrid[:size, :size].astype(np.float64)
    gap = size / n_sheets
    heights = []
    for s in range(n_sheets):
        amp = rng.uniform(0.1, 0.25) * gap
        fy, fx = rng.uniform(1.0, 3.0, size=2) * 2 * np.pi / size
        phase = rng.uniform(0, 2 * np.pi, size=2)
        h = (s + 0.5) * gap + amp * np.sin(fy * y + phase[0]) * np.cos(fx * x + phase[1])
        heights.append(np.clip(h.astype(np.int64), 0, size - 4))
    return heights


def draw_sheet(volume: np.ndarray, height: np.ndarray, thickness: int, value: int = 1) -> None:
    """Set ``thickness`` voxels from z = height(y, x) upward to ``value`` in ``volume`` (z, y, x), in place."""
    y, x = np.mgrid[: height.shape[0], : height.shape[1]]
    for t in range(thickness):
        volume[np.clip(height + t, 0, volume.shape[0] - 1), y, x] = value


def synthetic_pair(size: int, seed: int = 0, n_sheets: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(pred, label) uint8 volumes (size, size, size); label in {0, 1, 2}, pred in {0, 1}."""
    rng = np.random.default_rng(seed)
    heights = sheet_heights(size, n_sheets, rng)
    label = np.zeros((size,) * 3, dtype=np.uint8)
    pred = np.zeros_like(label)
    q = size // 4
    for i, h in enumerate(heights):
        draw_sheet(label, h, 3)
        draw_sheet(pred, h + 1 if i == 0 else h, 3)  # sheet 0: shifted by one voxel
    draw_sheet(pred[:, q : 2 * q, q : 2 * q], heights[1][q : 2 * q, q : 2 * q], 3, value=0)  # sheet 1: hole
    draw_sheet(pred[:, :, 3 * q : 3 * q + 2], heights[2][:, 3 * q : 3 * q + 2], 3, value=0)  # sheet 2: split
    c = size // 2  # a bridge merging sheets 3 and 4
    pred[heights[3][c, c] : heights[4][c, c] + 1, c - 2 : c + 2, c - 2 : c + 2] = 1
    for _ in range(5):  # spurious blobs between sheets
        z, y, x = rng.integers(4, size - 4, size=3)
        pred[z - 2 : z + 2, y - 2 : y + 2, x - 2 : x + 2] = 1
    pred[(label == 1) & (rng.random(label.shape) < 0.002)] = 0  # scattered dropped voxels
    label[size // 8 : size // 4, size // 2 :, size // 2 :] = 2  # an unlabeled box
    return pred, label


def compare_with_monai(pred: np.ndarray, label: np.ndarray, tolerance: float = 2.0) -> None:
    """Print MONAI's surface Dice (boundary voxels and subvoxel surfels) next to ours."""
    import torch
    from monai.metrics import compute_surface_dice

    from vesuvius_monai.metrics import surface_dice

    keep = label != 2
    p = torch.as_tensor(((pred == 1) & keep)[None, None].astype(np.float32))
    g = torch.as_tensor((label == 1)[None, None].astype(np.float32))
    ours = surface_dice(pred, label, tolerance=tolerance)
    voxels = compute_surface_dice(p, g, [tolerance], include_background=True).item()
    surfels = compute_surface_dice(p, g, [tolerance], include_background=True, use_subvoxels=True).item()
    print(f"surface dice ours={ours:.6f} monai_subvoxels={surfels:.6f} monai_voxels={voxels:.6f} "
          f"(ours - monai_voxels = {ours - voxels:+.6f})")


def main() -> None:
    """Parse arguments, build the synthetic pair and print the time of each metric and the total."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="edge of the cubic volume in voxels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", nargs="*", default=list(METRICS), help="metric names (default: all)")
    parser.add_argument("--matching", default="betti", choices=["betti", "persistence"])
    parser.add_argument("--compare-monai", action="store_true", help="also print MONAI's surface Dice")
    args = parser.parse_args()
    names = check_metric_names(args.metrics)

    t0 = time.perf_counter()
    pred, label = synthetic_pair(args.size, args.seed)
    print(f"synthetic pair {pred.shape}: label fg {np.mean(label == 1):.4f}, pred fg {np.mean(pred == 1):.4f}, "
          f"built in {time.perf_counter() - t0:.1f} s")

    start = time.perf_counter()
    context = MetricContext(pred, label, weights=LeaderboardWeights(topo_matching=args.matching))
    print(f"{'prepare':>14s} {time.perf_counter() - start:7.2f} s")
    for name in names:
        t = time.perf_counter()
        value = context.value(name)
        print(f"{name:>14s} {time.perf_counter() - t:7.2f} s   value {value:.6f}")
    print(f"{'total':>14s} {time.perf_counter() - start:7.2f} s")
    if args.compare_monai:
        compare_with_monai(pred, label)


if __name__ == "__main__":
    main()
