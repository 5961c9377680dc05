"""Bytes a remote prediction fetches, against the bytes of the chunks its windows need.

A synthetic OME-Zarr (default 256^3 uint8, chunks 32^3) is served over the loopback HTTP server (bench/loopback.py,
which counts every request and byte) and predicted by a small random network (``predict_zarr``, the command's own
Zarr path) from its ``http://`` address: the whole volume and an ROI, each with a cold then a warm disk cache
(``data.remote_cache_dir``), and the whole volume with no disk cache and a memory cache
(``data.remote_cache_mb``) of the planned peak (see vesuvius_monai/engine/remote_reads.py) and of a quarter of it.
Each output is compared with the prediction of the local store.

``needed``: stored bytes of the chunks the windows read (the blocks' inputs); ``+ sample``: with the chunks of the
percentile sample (over the whole volume, also for an ROI). ``fetched``: chunk bytes the server sent.

    python bench/bench_remote.py            # about a minute or two on 2 cores
    python bench/bench_remote.py --size 96  # a quick smoke run
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback import LoopbackServer  # noqa: E402

from vesuvius_monai.config import load_config  # noqa: E402
from vesuvius_monai.data.readers import open_volume  # noqa: E402
from vesuvius_monai.data.readers import SAMPLE_VOXELS, sample_regions  # noqa: E402
from vesuvius_monai.data.regions import intersect, shift_region  # noqa: E402
from vesuvius_monai.engine.infer import window_grid  # noqa: E402
from vesuvius_monai.engine.zarr_output import checked_roi  # noqa: E402
from vesuvius_monai.engine.networks import ModuleNetwork  # noqa: E402
from vesuvius_monai.engine.predict import parse_roi  # noqa: E402
from vesuvius_monai.engine.zarr_predict import predict_zarr  # noqa: E402
from vesuvius_monai.engine.remote_reads import peak_live_chunks, planned_reads  # noqa: E402


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 1, 3, padding=1))


def write_volume(folder: Path, size: int, chunk: int) -> Path:
    """A one-level OME-Zarr (v2) of smooth noise, uint8 (size^3, chunks chunk^3); no chunk is all fill value."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(1, 255, (size // 8 + 1,) * 3).astype(np.float32)
    vol = np.kron(coarse, np.ones((8, 8, 8), np.float32))[:size, :size, :size]
    vol = (vol + rng.normal(0, 8, vol.shape)).clip(1, 255).astype(np.uint8)
    group = zarr.open_group(folder / "scroll.zarr", mode="w", zarr_format=2)
    group.create_array("0", shape=vol.shape, chunks=(chunk,) * 3, dtype=vol.dtype)[:] = vol
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    return folder / "scroll.zarr"


def window_chunks(reader, grid, written) -> set:
    """The chunks the windows that run read: every window of the whole volume's grid that touches ``written``
    (padded coordinates shifted back to the volume, clipped to it)."""
    pad = grid.pad_lo
    target = shift_region(written, pad)
    chunks = set()
    for start in itertools.product(*(a.starts for a in grid.axes)):
        window = tuple(slice(t, t + w) for t, w in zip(start, grid.window))
        part = intersect(window, target) and intersect(window, grid.inside)
        if part:
            chunks.update(reader.chunks_of(shift_region(part, tuple(-p for p in pad))))
    return chunks


def needed_bytes(store: Path, cfg, roi) -> tuple[int, int, int]:
    """(stored bytes of the chunks the run windows read, the same with the percentile sample's chunks, planned peak
    in bytes). The windows are those of the whole volume's grid that touch the ROI (they read context outside it)."""
    reader = open_volume(store)
    whole = tuple(slice(0, d) for d in reader.shape)
    written = whole if roi is None else checked_roi(reader, roi)
    grid = window_grid(whole, cfg.infer)
    windows = window_chunks(reader, grid, written)
    reads = list(planned_reads(reader, grid, whole, grid.blocks_touching(written), written=written))
    sample = {c for region in sample_regions(reader.shape, SAMPLE_VOXELS) for c in reader.chunks_of(region)}
    size = lambda chunks: sum((store / reader.chunk_key(c)).stat().st_size for c in chunks)  # noqa: E731
    return size(windows), size(windows | sample), peak_live_chunks(reads) * reader.chunk_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="volume edge (voxels)")
    parser.add_argument("--chunk", type=int, default=32, help="chunk edge (voxels)")
    parser.add_argument("--window", type=int, default=32, help="infer.roi_size edge")
    parser.add_argument("--block", type=int, default=64, help="infer.block_size edge")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    s = args.size
    roi_text = f"{s // 4}:{3 * s // 4},{s // 8}:{5 * s // 8},{s // 2}:{s}"
    infer = [f"infer.roi_size={[args.window] * 3}", f"infer.block_size={[args.block] * 3}", "infer.overlap=0.25",
             "infer.sw_batch_size=8", "infer.out_dtype=float32", "infer.tta_flip_axes=[]", "infer.device=cpu"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = write_volume(tmp / "served", s, args.chunk)
        net = ModuleNetwork(tiny_net())
        rows = []
        with LoopbackServer(tmp / "served") as server:
            url = f"{server.url}/scroll.zarr"
            for label, roi in (("whole", None), (f"roi {roi_text}", parse_roi(roi_text))):
                base = load_config(None, infer)
                windows, with_sample, peak = needed_bytes(store, base, roi)
                n = len(rows)
                predict_zarr(base, net, [(store, tmp / f"local{n}.zarr")], roi)
                expected = open_volume(tmp / f"local{n}.zarr").read()
                runs = [("disk cold", [f"data.remote_cache_dir={tmp / f'cache{n}'}"]),
                        ("disk warm", [f"data.remote_cache_dir={tmp / f'cache{n}'}"])]
                if roi is None:
                    runs += [(f"memory {peak / 2**20:.1f} MiB (peak)",
                              [f"data.remote_cache_mb={(peak + 2**16) / 2**20}"]),
                             (f"memory {peak / 2**22:.1f} MiB (peak/4)", [f"data.remote_cache_mb={peak / 2**22}"])]
                for k, (cache, extra) in enumerate(runs):
                    server.reset()
                    out = tmp / f"remote{n}-{k}.zarr"
                    tic = time.perf_counter()
                    predict_zarr(load_config(None, [*infer, *extra]), net, [(url, out)], roi)
                    wall = time.perf_counter() - tic
                    fetched, hits = server.chunk_bytes(), len(server.chunk_hits())
                    equal = bool(np.array_equal(open_volume(out).read(), expected))
                    rows.append((label, cache, fetched, hits, windows, with_sample, wall, equal))
    print(f"volume {s}^3 uint8, chunks {args.chunk}^3, window {args.window}, blocks {args.block}, overlap 0.25; "
          f"bytes are stored (compressed) chunk bytes")
    head = ("run", "cache", "fetched MiB", "requests", "needed MiB", "fetched/needed", "+ sample MiB",
            "fetched/(+ sample)", "s", "equal")
    print(" | ".join(head))
    for label, cache, fetched, hits, windows, with_sample, wall, equal in rows:
        print(f"{label} | {cache} | {fetched / 2**20:.2f} | {hits} | {windows / 2**20:.2f} | {fetched / windows:.3f} | "
              f"{with_sample / 2**20:.2f} | {fetched / with_sample:.3f} | {wall:.1f} | {equal}")


if __name__ == "__main__":
    main()
