"""Time every metric of vesuvius_monai.metrics on a synthetic fragment (warped thin sheets).

Usage:
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 320
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 320 --noise 0.01 --metrics topo_score
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 320 --compare-libraries
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 320 --noise 0.01 --compare-parallel
    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py --size 32        # seconds

The label holds a few warped sheets (3 voxels thick) and an unlabeled box (value 2); the prediction is the
label with one sheet shifted by a voxel, a hole cut in another, one sheet split by a gap, a bridge merging two
sheets, a few spurious blobs and some surface voxels dropped; ``--noise`` flips that fraction of all voxels
of the prediction on top. Metrics run through one MetricContext, so each line is the extra time that metric
needs on top of those before it (shared work is counted once).

``--compare-libraries`` times each library function the metrics use next to the hand-written code it replaced
or that was kept (same inputs, values printed side by side). ``--compare-parallel`` times the exact Betti
matching of the 2 x 2 x 2 tiles: one after another in this process, the extension's list overload (its
std::async threads; run ``--workers`` pairs at a time, since all eight 160^3 tiles at once need about 40 GB),
and a pool of ``--workers`` processes (what the metrics use for large tiles).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from _common import format_table, run_main, write_json
from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics.fallback import cells_touched
from vesuvius_monai.metrics import METRIC_NAMES, MetricContext, check_metric_names, topo_matching_used
from vesuvius_monai.metrics import betti_matching as bm
from vesuvius_monai.metrics._common import prepare_pair, tile_slices
from vesuvius_monai.metrics.components import label_components


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


def synthetic_pair(size: int, seed: int = 0, n_sheets: int = 6, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
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
    if noise > 0:
        pred ^= (rng.random(pred.shape) < noise).astype(np.uint8)
    label[size // 8 : size // 4, size // 2 :, size // 2 :] = 2  # an unlabeled box
    return pred, label


# --------------------------------------------------------------------------- hand-written references


def euler_hand(mask: np.ndarray) -> int:
    """V - E + F - C of the union of closed voxel cubes, counted cell by cell (the code skimage replaced)."""
    padded = np.pad(mask, 1)

    def touched(sizes: tuple[int, int, int]) -> int:
        return int(np.count_nonzero(cells_touched(padded, sizes)))

    edges = sum(touched(s) for s in ((1, 2, 2), (2, 1, 2), (2, 2, 1)))
    faces = sum(touched(s) for s in ((2, 1, 1), (1, 2, 1), (1, 1, 2)))
    return touched((2, 2, 2)) - edges + faces - int(np.count_nonzero(mask))


def voi_hand(gt: np.ndarray, pr: np.ndarray) -> float:
    """H(PR|GT) + H(GT|PR) in bits from label counts (the code skimage replaced)."""
    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / gt.size
        return float(-(p * np.log2(p)).sum())

    gt, pr = gt.astype(np.int64), pr.astype(np.int64)
    joint = entropy(np.unique(gt * (int(pr.max()) + 1) + pr, return_counts=True)[1])
    return 2 * joint - entropy(np.bincount(gt)) - entropy(np.bincount(pr))


def hd95_hand(pred: np.ndarray, label: np.ndarray) -> float:
    """95% Hausdorff distance of boundary voxels by KD-tree (the code MONAI replaced)."""
    p = np.argwhere(pred & ~ndi.binary_erosion(pred)).astype(np.float64)
    g = np.argwhere(label & ~ndi.binary_erosion(label)).astype(np.float64)
    return float(max(np.percentile(cKDTree(g).query(p)[0], 95), np.percentile(cKDTree(p).query(g)[0], 95)))


def remove_small_hand(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Components (26-connected) of at least ``min_size`` voxels, by ndimage (the code skimage replaced)."""
    labels, _ = label_components(mask, 26)
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def timed(function, *args):
    """(seconds, value) of one call."""
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


LIBRARY_COLUMNS = [("lib", "library", "s"), ("lib_s", "s", ".2f"), ("hand", "hand-written", "s"),
                   ("hand_s", "s", ".2f"), ("used", "used", "s"), ("lib_value", "library value", ".6g"),
                   ("hand_value", "hand value", ".6g")]
PARALLEL_COLUMNS = [("wall_s", "wall s", ".1f"), ("cores", "cores busy (mean)", ".2f")]


def compare_libraries(pred: np.ndarray, label: np.ndarray) -> None:
    """Print library and hand-written timings side by side on the prepared pair (z, y, x)."""
    import torch
    from monai.metrics import compute_surface_dice
    from skimage.measure import euler_number
    from skimage.metrics import variation_of_information
    from skimage.morphology import remove_small_holes, remove_small_objects

    from vesuvius_monai.metrics.surface import hausdorff_masks, surface_dice_masks
    from vesuvius_monai.postprocess import fill_small_holes

    def tensor(mask: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(mask[None, None])

    def monai_nsd(p: np.ndarray, g: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compute_surface_dice(tensor(p), tensor(g), [2.0], include_background=True,
                                        use_subvoxels=True).item()

    tiles = [s for s in tile_slices(pred.shape, (2, 2, 2))]
    pred_cc, label_cc = label_components(pred, 26)[0], label_components(label, 26)[0]
    union = pred | label
    rows = [
        ("Euler char. (16 tiles)", "skimage euler_number",
         lambda: sum(euler_number(m[s], connectivity=3) for m in (pred, label) for s in tiles),
         "hand-written cells", lambda: sum(euler_hand(m[s]) for m in (pred, label) for s in tiles), "library"),
        ("VOI", "skimage variation_of_information",
         lambda: float(sum(variation_of_information(label_cc[union], pred_cc[union]))),
         "hand-written entropies", lambda: voi_hand(label_cc[union], pred_cc[union]), "library"),
        ("HD95", "MONAI compute_hausdorff_distance", lambda: hausdorff_masks(pred, label),
         "hand-written KD-tree", lambda: hd95_hand(pred, label), "library"),
        ("surface Dice", "MONAI compute_surface_dice(subvoxels)", lambda: monai_nsd(pred, label),
         "hand-written surfels + KD-tree", lambda: surface_dice_masks(pred, label), "hand-written"),
        ("remove small (min 64)", "skimage remove_small_objects",
         lambda: int(remove_small_objects(pred, max_size=63, connectivity=3).sum()),
         "hand-written ndimage", lambda: int(remove_small_hand(pred, 64).sum()), "library"),
        ("fill holes (max 64)", "skimage remove_small_holes",
         lambda: int(remove_small_holes(pred, max_size=64, connectivity=1).sum()),
         "hand-written (enclosed only)", lambda: int(fill_small_holes(pred, 64).sum()), "hand-written"),
    ]
    table = {}
    for what, lib_name, lib, hand_name, hand, used in rows:
        t_lib, v_lib = timed(lib)
        t_hand, v_hand = timed(hand)
        table[what] = {"lib": lib_name, "lib_s": t_lib, "hand": hand_name, "hand_s": t_hand, "used": used,
                       "lib_value": v_lib, "hand_value": v_hand}
    print()
    print(format_table(table, LIBRARY_COLUMNS, row_header="what"))
    print("(fill holes: the values differ where remove_small_holes also fills pockets open to the border)")


def compare_parallel(pred: np.ndarray, label: np.ndarray, workers: int) -> None:
    """Time the exact Betti matching of the 2 x 2 x 2 tiles three ways and check they agree."""
    if bm.extension() is None:
        print(f"exact Betti matching unavailable: {bm.extension_status()}")
        return
    slices = tile_slices(pred.shape, (2, 2, 2))
    pred_tiles, label_tiles = [pred[s] for s in slices], [label[s] for s in slices]
    print(f"\nexact Betti matching of 8 tiles {pred_tiles[0].shape}, {os.cpu_count()} cores, {workers} at a time")

    def cpu_seconds() -> float:  # this process and its finished worker processes, user + system
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    table = {}

    def run(name: str, function) -> np.ndarray:
        cpu, start = cpu_seconds(), time.perf_counter()
        counts = function()
        wall = time.perf_counter() - start
        table[name] = {"wall_s": wall, "cores": (cpu_seconds() - cpu) / wall}
        return counts

    def list_overload() -> np.ndarray:
        rows = []
        for i in range(0, len(pred_tiles), workers):
            results = bm.extension().compute_matching(
                [bm.inverted(t) for t in pred_tiles[i : i + workers]],
                [bm.inverted(t) for t in label_tiles[i : i + workers]])
            for r in results:
                m = np.asarray(r.num_matched)
                rows.append(np.stack([m, m + r.num_unmatched_input1, m + r.num_unmatched_input2]))
        return np.stack(rows)

    sequential = run("one after another, in this process", lambda: bm.match_tiles(pred_tiles, label_tiles, 1))
    listed = run(f"list overload (std::async), {workers} pairs a call", list_overload)
    pooled = run(f"process pool, {workers} workers", lambda: bm.match_tiles(pred_tiles, label_tiles, workers))
    print(format_table(table, PARALLEL_COLUMNS, row_header="how"))
    print("all three agree:", np.array_equal(sequential, listed) and np.array_equal(sequential, pooled))


TIME_COLUMNS = [("seconds", "seconds", ".2f"), ("value", "value", ".6f")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="edge of the cubic volume in voxels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of prediction voxels flipped")
    parser.add_argument("--metrics", nargs="*", default=list(METRIC_NAMES), help="metric names (default: all)")
    parser.add_argument("--matching", default="exact", choices=["exact", "persistence", "betti"])
    parser.add_argument("--compare-libraries", action="store_true",
                        help="time library functions next to hand-written code")
    parser.add_argument("--compare-parallel", action="store_true",
                        help="time exact Betti matching sequential / list overload / process pool")
    parser.add_argument("--workers", type=int, default=2, help="parallel matchings for --compare-parallel")
    parser.add_argument("--out", help="also write the metric timings to this JSON file")
    return parser.parse_args(argv)


def time_metrics(pred: np.ndarray, label: np.ndarray, names: list[str], weights: LeaderboardWeights) -> dict:
    """``{row: {seconds, value}}``: the shared preparation, then each metric's extra seconds, then the total."""
    start = time.perf_counter()
    context = MetricContext(pred, label, weights=weights)
    rows = {"prepare": {"seconds": time.perf_counter() - start}}
    for name in names:
        t = time.perf_counter()
        value = context.value(name)
        rows[name] = {"seconds": time.perf_counter() - t, "value": value}
    rows["total"] = {"seconds": time.perf_counter() - start}
    return rows


def run(args: argparse.Namespace) -> None:
    """Build the synthetic pair and print the time of each metric and the total."""
    names = check_metric_names(args.metrics)
    t0 = time.perf_counter()
    pred, label = synthetic_pair(args.size, args.seed, noise=args.noise)
    print(f"synthetic pair {pred.shape}: label fg {np.mean(label == 1):.4f}, pred fg {np.mean(pred == 1):.4f}, "
          f"noise {args.noise}, built in {time.perf_counter() - t0:.1f} s")
    weights = LeaderboardWeights(topo_matching=args.matching)
    print(f"TopoScore matching: {topo_matching_used(weights)} (extension: {bm.extension_status()})")

    if args.compare_libraries or args.compare_parallel:
        pred_mask, label_mask = prepare_pair(pred, label)
        if args.compare_libraries:
            compare_libraries(pred_mask, label_mask)
        if args.compare_parallel:
            compare_parallel(pred_mask, label_mask, args.workers)
        return

    rows = time_metrics(pred, label, names, weights)
    print(format_table(rows, TIME_COLUMNS, row_header="metric"))
    if args.out:
        write_json(args.out, {"arguments": vars(args), "topo_matching": topo_matching_used(weights), "metrics": rows})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
