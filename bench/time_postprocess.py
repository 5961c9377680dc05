"""Time each post-processing operator on an N^3 volume of 4 wavy sheets with smoothed noise (default N = 128), the
median of 3 runs; prints a Markdown table (milliseconds).

    python bench/time_postprocess.py [--size 128]
"""
import argparse
import statistics
import time

import numpy as np
from scipy import ndimage
from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.postprocess import operators as ops
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.postprocess.patching import patch_holes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--size", type=int, default=128)
n = parser.parse_args().size
rng = np.random.default_rng(0)
z, y, x = np.mgrid[:n, :n, :n]
dist = np.full((n, n, n), 99.0)
for k in range(4):
    h = 16 + 28 * k + 6 * np.sin(y / 13.0 + k) * np.cos(x / 17.0)
    dist = np.minimum(dist, np.abs(z - h))
prob = np.clip(np.exp(-dist**2 / 4) + 0.35 * ndimage.gaussian_filter(rng.random((n, n, n)), 1.5) * 3 - 0.5, 0, 1)
prob = prob.astype(np.float32)
mask = prob > 0.5
print(f"{n}^3, foreground {mask.mean():.3f}, components {ndimage.label(mask, np.ones((3, 3, 3)))[1]}")



def t(name, fn):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    print(f"| {name} | {statistics.median(times)*1000:.0f} |")


print("| operator | ms |\n|---|---|")
t("threshold 0.5", lambda: ops.threshold(prob, 0.5))
t("hysteresis 0.5 / 0.85 (26)", lambda: ops.hysteresis(prob, 0.5, 0.85, 26))
t("opening (1, 1, 1)", lambda: ops.opening(mask, (1, 1, 1)))
t("closing (2, 1, 1)", lambda: ops.closing(mask, (2, 1, 1)))
t("closing (3, 3, 3)", lambda: ops.closing(mask, (3, 3, 3)))
t("closing per sheet (2, 1, 1)", lambda: ops.closing_per_sheet(mask, (2, 1, 1), 26))
t("closing per sheet (3, 3, 3)", lambda: ops.closing_per_sheet(mask, (3, 3, 3), 26))
t("dust 100 (26)", lambda: ops.remove_small_components(mask, 100, 26))
clean = ops.remove_small_components(mask, 100, 26)
t("patch holes (26), after dust 100", lambda: patch_holes(clean, 26))
t("plug holes", lambda: ops.plug_holes(mask))
t("fill_holes_max 100", lambda: ops.fill_small_holes(mask, 100))
t("fill_voids", lambda: ops.fill_cavities(mask))
t("chain: all keys off (threshold)", lambda: postprocess(prob, PostprocessConfig()))
t("chain: 12th place (hyst 0.5/0.85, open 1, close (2,1,1), dust 100)", lambda: postprocess(prob, PostprocessConfig(
    hysteresis_high=0.85, open_radius=(1, 1, 1), close_radius=(2, 1, 1), min_size=100)))
t("chain: all on (per-sheet close (2,1,1), patch, plug, fill_voids)", lambda: postprocess(prob, PostprocessConfig(
    hysteresis_high=0.85, open_radius=(1, 1, 1), close_radius=(2, 1, 1), close_per_sheet=True, min_size=100,
    patch_holes=True, plug_holes=True, fill_voids=True)))
