"""Empty space skipped and ROIs on the whole volume's grid, against MONAI's whole-volume sliding_window_inference.

Skipping: a window whose raw input is all ``infer.skip_background`` (or outside the support) is not run and
counts as predicting 0 with its blending weight. The reference is MONAI's inference with a network that returns 0
for exactly those windows (MONAI runs its windows in the order of ``dense_patch_slices``, ``sw_batch_size`` at a
time, so the reference knows which window each call sees); where no skipped window reaches, that is MONAI's plain
output.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from vesuvius_monai.config import load_config
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.infer import infer_volume, load_normalized, make_predictor

sys.path.insert(0, str(Path(__file__).parent))
from test_blockwise import (CPU, EXAMPLES, TinyNet, cases, make_cfg, monai_reference,  # noqa: E402
                            predict_store, save_volume)


def monai_windows(shape, roi, overlap) -> list[tuple[slice, ...]]:
    """MONAI's windows over the padded volume, in its order, and the padding before each axis."""
    padded = tuple(max(d, r) for d, r in zip(shape, roi))
    return dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, (overlap,) * 3))


def skipped_windows(raw: np.ndarray, support: np.ndarray, roi, overlap) -> list[bool]:
    """For each MONAI window: True when its raw input (MONAI's padding is empty) holds no scroll."""
    pad = [(max(d, r) - d) // 2 for d, r in zip(raw.shape, roi)]
    holds = np.zeros(tuple(max(d, r) for d, r in zip(raw.shape, roi)), bool)
    holds[tuple(slice(p, p + d) for p, d in zip(pad, raw.shape))] = support
    return [not holds[w].any() for w in monai_windows(raw.shape, roi, overlap)]


def monai_skipping(net, reader, cfg, skipped: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's output with the ``skipped`` windows predicting 0, and where no skipped window reaches (bool)."""
    image = torch.from_numpy(load_normalized(reader, cfg.transforms.percentiles))[None, None]
    icfg, plain, seen = cfg.infer, make_predictor(net, cfg.infer, CPU, False), [0]

    def predict(x):
        out = plain(x)
        flags = skipped[seen[0]:seen[0] + x.shape[0]]
        seen[0] += x.shape[0]
        return out * torch.tensor([0.0 if f else 1.0 for f in flags]).view(-1, 1, 1, 1, 1)

    with torch.inference_mode():
        out = sliding_window_inference(image, icfg.roi_size, icfg.sw_batch_size, predict, overlap=icfg.overlap,
                                       mode=icfg.blend, sigma_scale=icfg.sigma_scale)[0, 0].numpy()
    assert seen[0] == len(skipped)
    shape, roi = reader.shape, icfg.roi_size
    pad = [(max(d, r) - d) // 2 for d, r in zip(shape, roi)]
    reached = np.zeros(tuple(max(d, r) for d, r in zip(shape, roi)), bool)
    for w, s in zip(monai_windows(shape, roi, icfg.overlap), skipped):
        reached[w] |= s
    return out, ~reached[tuple(slice(p, p + d) for p, d in zip(pad, shape))]


@st.composite
def empty_boxes(draw, shape):
    """A mask (True = scroll) of ``shape``: empty on one side of a cut along a random axis, and in a random box."""
    mask = np.ones(shape, bool)
    axis = draw(st.integers(0, 2))
    cut = draw(st.integers(0, shape[axis]))
    side = slice(0, cut) if draw(st.booleans()) else slice(cut, None)
    mask[tuple(side if i == axis else slice(None) for i in range(3))] = False
    lo = [draw(st.integers(0, d - 1)) for d in shape]
    mask[tuple(slice(a, draw(st.integers(a + 1, d))) for a, d in zip(lo, shape))] = False
    return mask


@pytest.mark.slow
def test_skipped_windows_predict_zero_and_the_rest_is_unchanged():
    """Property: random volumes with empty boxes, windows, blocks, overlaps: the output equals MONAI's with the
    skipped windows predicting 0 (in memory and in Zarr), equals MONAI's plain output wherever no skipped window
    reaches, is 0 where only skipped windows reach, and the network sees exactly the windows run."""
    skipping = []

    @settings(max_examples=20, **EXAMPLES)
    @given(case=cases(min_blocks=2), seed=st.integers(0, 2**16), data=st.data())
    def check(case, seed, data):
        shape, roi, block, kw = case
        mask = data.draw(empty_boxes(shape))
        with tempfile.TemporaryDirectory() as folder:
            raw = np.random.default_rng(seed).normal(1000, 200, shape).astype(np.float32) * mask
            np.save(Path(folder) / "scan.npy", raw)
            reader = open_volume(Path(folder) / "scan.npy")
            cfg = make_cfg(roi, block, **kw)
            skip_cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, skip_background=0.0))
            skipped = skipped_windows(raw, raw != 0, roi, kw["overlap"])
            expected, clean = monai_skipping(TinyNet(), reader, cfg, skipped)
            net = TinyNet()
            got = infer_volume(net, reader, skip_cfg, device=CPU)
            assert net.windows == skipped.count(False)
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
            np.testing.assert_allclose(got[clean], monai_reference(TinyNet(), reader, cfg)[clean], rtol=0, atol=2e-6)
            only_skipped = np.ones(reader.shape, bool)  # voxels no run window reaches
            pad = [(max(d, r) - d) // 2 for d, r in zip(shape, roi)]
            cover = np.zeros(tuple(max(d, r) for d, r in zip(shape, roi)), bool)
            for w, s in zip(monai_windows(shape, roi, kw["overlap"]), skipped):
                cover[w] |= not s
            only_skipped = ~cover[tuple(slice(p, p + d) for p, d in zip(pad, shape))]
            assert (got[only_skipped] == 0).all()
            if data.draw(st.integers(0, 4)) == 0:  # the Zarr path too, now and then
                stored = predict_store(TinyNet(), reader, skip_cfg, Path(folder) / "p.zarr")
                np.testing.assert_array_equal(open_volume(stored).read(), got)
        skipping.append(any(skipped) and not all(skipped))

    check()
    assert sum(skipping) >= 5


@pytest.mark.slow
def test_roi_equals_the_whole_volume_prediction_restricted_to_it():
    """Property: random volumes, windows, blocks, overlaps and ROIs: the ROI's prediction (in memory; in Zarr now
    and then) equals the whole volume's restricted to the ROI."""

    @settings(max_examples=20, **EXAMPLES)
    @given(case=cases(), seed=st.integers(0, 2**16), data=st.data())
    def check(case, seed, data):
        shape, roi, block, kw = case
        lo = [data.draw(st.integers(0, d - 1)) for d in shape]
        region = tuple(slice(a, data.draw(st.integers(a + 1, d))) for a, d in zip(lo, shape))
        assume(region != tuple(slice(0, d) for d in shape))
        with tempfile.TemporaryDirectory() as folder:
            reader = save_volume(Path(folder), shape, seed)
            cfg = make_cfg(roi, block, **kw)
            whole = infer_volume(TinyNet(), reader, cfg, device=CPU)
            got = infer_volume(TinyNet(), reader, cfg, device=CPU, roi=region)
            np.testing.assert_allclose(got, whole[region], rtol=0, atol=2e-6)
            if data.draw(st.integers(0, 4)) == 0:
                stored = predict_store(TinyNet(), reader, cfg, Path(folder) / "roi.zarr", roi=region)
                np.testing.assert_array_equal(open_volume(stored).read(), got)

    check()


@pytest.mark.slow
def test_support_mask_and_coarse_level(tmp_path):
    """A support mask at half resolution (a volume, or level 1 of the input's OME-Zarr pyramid, thresholded):
    windows over its empty part are skipped, exactly as MONAI with those windows predicting 0."""
    shape, roi = (20, 24, 28), (8, 8, 8)
    raw = np.random.default_rng(3).normal(1000, 200, shape).astype(np.float32)
    coarse = np.zeros((10, 12, 14), np.float32)
    coarse[:, :6, :] = 5.0  # scroll in y < 12
    group = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=raw)
    group.create_array("1", data=coarse)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": [{"path": str(i), "coordinateTransformations": [
                                       {"type": "scale", "scale": [2.0**i] * 3}]} for i in (0, 1)]}]
    np.save(tmp_path / "support.npy", coarse)
    reader = open_volume(tmp_path / "scan.zarr")
    cfg = make_cfg(roi, (8, 8, 8), overlap=0.5)
    support = np.repeat(np.repeat(np.repeat(coarse > 1.0, 2, 0), 2, 1), 2, 2)
    skipped = skipped_windows(raw, support, roi, 0.5)
    assert 0 < sum(skipped) < len(skipped)
    expected, _ = monai_skipping(TinyNet(), reader, cfg, skipped)
    base = ["infer.roi_size=[8,8,8]", "infer.block_size=[8,8,8]", "infer.overlap=0.5", "infer.tta_flip_axes=[]",
            "infer.device=cpu", "infer.support_threshold=1.0"]
    for extra in ([f"infer.support={tmp_path / 'support.npy'}"], ["infer.support_level=1"]):
        net = TinyNet()
        got = infer_volume(net, reader, load_config(None, base + extra), device=CPU)
        assert net.windows == skipped.count(False)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
