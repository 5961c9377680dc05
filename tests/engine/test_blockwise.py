"""Block-wise inference against MONAI's whole-volume sliding_window_inference: equality, windows computed once,
resume after a crash, bounded memory. Zarr outputs go through the command's own driver (``predict_zarr``)."""

from __future__ import annotations

import dataclasses
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from vesuvius_monai.config import load_config
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.blockwise import BlockJob, run_blocks
from vesuvius_monai.engine.infer import infer_volume, load_normalized, make_predictor, volume_job
from vesuvius_monai.engine.networks import ModuleNetwork
from vesuvius_monai.engine.zarr_predict import predict_zarr
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.zarr_store import PredictionStore, SpillFolder

CPU = torch.device("cpu")
# hypothesis: the same examples on every run (reproducible in CI), no time limit per example, nothing saved
EXAMPLES = dict(deadline=None, derandomize=True, database=None)


class TinyNet(torch.nn.Module):
    """Two 3x3x3 convolutions with zero padding (outputs depend on where a window sits); counts the windows."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv3d(2, 1, 3, padding=1))
        self.windows = 0
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and self.windows >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.windows += x.shape[0]
        return self.net(x) * 3.0


def make_cfg(roi, block, overlap=0.25, blend="gaussian", sigma=0.125, batch=2, dtype="float32", tta=()):
    return load_config(None, [f"infer.roi_size={list(roi)}", f"infer.block_size={list(block)}",
                              f"infer.overlap={overlap}", f"infer.blend={blend}", f"infer.sigma_scale={sigma}",
                              f"infer.sw_batch_size={batch}", f"infer.out_dtype={dtype}",
                              f"infer.tta_flip_axes={list(tta)}", "infer.device=cpu"])


def monai_reference(net, reader, cfg) -> np.ndarray:
    """MONAI's sliding_window_inference over the whole normalised volume: the independent reference."""
    image = torch.from_numpy(load_normalized(reader, cfg.transforms.percentiles))[None, None]
    icfg = cfg.infer
    with torch.inference_mode():
        out = sliding_window_inference(image, icfg.roi_size, icfg.sw_batch_size, make_predictor(net, icfg, CPU, False),
                                       overlap=icfg.overlap, mode=icfg.blend, sigma_scale=icfg.sigma_scale)
    return out[0, 0].numpy()


def monai_window_count(shape, roi, overlap) -> int:
    padded = tuple(max(d, r) for d, r in zip(shape, roi))
    return len(dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, (overlap,) * 3)))


def save_volume(tmp_path, shape, seed, name="scan.npy"):
    data = np.random.default_rng(seed).normal(1000, 200, shape).astype(np.float32)
    np.save(tmp_path / name, data)
    return open_volume(tmp_path / name)


def predict_store(net, reader, cfg, out, *, roi=None, resume=True) -> Path:
    """``reader`` (its ``roi``) predicted by ``net`` into the Zarr store ``out`` by the command's own driver."""
    predict_zarr(cfg, ModuleNetwork(net), [(reader.path, out)], roi, resume=resume)
    return out


def rounded(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high).map(lambda v: round(v, 3))


@st.composite
def cases(draw, min_blocks: int = 1):
    """(shape, window, block, make_cfg keywords): shapes 1..34 (often smaller than the window on some axis), windows
    2..15, any block size and overlap, cut into at least ``min_blocks`` blocks.

    Overlaps up to 0.75 (float sums of at most 64 windows per voxel) and at most 250 windows keep it fast;
    test_high_overlap covers stride 1.
    """
    triple = lambda low, high: st.tuples(*[st.integers(low, high)] * 3)  # noqa: E731
    shape, roi, block = draw(triple(1, 34)), draw(triple(2, 15)), draw(triple(1, 29))
    overlap = draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75]), rounded(0.0, 0.75)))
    assume(monai_window_count(shape, roi, overlap) <= 250)
    assume(len(WindowGrid(shape, roi, overlap, block).blocks()) >= min_blocks)
    kw = dict(overlap=overlap, blend=draw(st.sampled_from(["gaussian", "constant"])), sigma=draw(rounded(0.05, 1.0)),
              batch=draw(st.integers(1, 4)))
    return shape, roi, block, kw


def test_equals_monai_whole_volume_inference():
    """Property: for random shapes, windows, blocks, overlaps and blending, the in-memory and the Zarr output
    equal MONAI's sliding_window_inference, and the network sees each window of MONAI's grid exactly once."""
    multi_block = []

    @settings(max_examples=50, **EXAMPLES)
    @given(case=cases(), seed=st.integers(0, 2**16))
    def check(case, seed):
        shape, roi, block, kw = case
        with tempfile.TemporaryDirectory() as folder:
            reader = save_volume(Path(folder), shape, seed)
            cfg = make_cfg(roi, block, **kw)
            expected = monai_reference(TinyNet(), reader, cfg)
            net = TinyNet()
            got = infer_volume(net, reader, cfg, device=CPU)
            assert net.windows == monai_window_count(shape, roi, kw["overlap"]), (shape, roi, block, kw)
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6, err_msg=str((shape, roi, block, kw)))
            stored = predict_store(TinyNet(), reader, cfg, Path(folder) / "p.zarr")
            np.testing.assert_array_equal(open_volume(stored).read(), got)
        multi_block.append(len(WindowGrid(shape, roi, kw["overlap"], block).blocks()) > 1)

    check()
    assert sum(multi_block) >= 25  # the cases do cut volumes into blocks (half of them at least)


def test_high_overlap(tmp_path):
    """Stride 1 on two axes (hundreds of windows summed per voxel: float tolerance grows with the count)."""
    reader = save_volume(tmp_path, (9, 11, 30), 2)
    cfg = make_cfg((4, 5, 8), (5, 5, 8), overlap=0.9, blend="constant", batch=8)
    expected = monai_reference(TinyNet(), reader, cfg)
    np.testing.assert_allclose(infer_volume(TinyNet(), reader, cfg, device=CPU), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_thin_last_block_gets_full_context(tmp_path, overlap):
    """The reported case: 37 x 61 x 50, blocks 48, window 32 (the last blocks are thinner than a window)."""
    reader = save_volume(tmp_path, (37, 61, 50), 3)
    cfg = make_cfg((32, 32, 32), (48, 48, 48), overlap=overlap)
    expected = monai_reference(TinyNet(), reader, cfg)
    out = predict_store(TinyNet(), reader, cfg, tmp_path / "p.zarr")
    np.testing.assert_allclose(open_volume(out).read(), expected, rtol=0, atol=2e-6)


def test_tta_and_uint8(tmp_path):
    reader = save_volume(tmp_path, (20, 24, 24), 4)
    cfg = make_cfg((8, 12, 12), (12, 12, 12), overlap=0.5, dtype="uint8", tta=(0, 2))
    expected = monai_reference(TinyNet(), reader, cfg)
    out = open_volume(predict_store(TinyNet(), reader, cfg, tmp_path / "p.zarr"))
    assert out.dtype == np.uint8
    assert np.abs(out.read() / 255.0 - expected).max() <= 0.5 / 255 + 1e-6


def test_roi_lies_on_the_whole_volume_grid(tmp_path):
    """The ROI is the whole volume's prediction restricted to it (MONAI over the whole volume, then cropped); its
    store records its offset (affine / OME translation and the run metadata)."""
    reader = save_volume(tmp_path, (30, 40, 40), 5)
    roi = (slice(5, 30), slice(10, None), slice(-19, None))
    cfg = make_cfg((8, 8, 8), (8, 8, 8))
    out = open_volume(predict_store(TinyNet(), reader, cfg, tmp_path / "roi.zarr", roi=roi))
    assert out.shape == (25, 30, 19)
    np.testing.assert_allclose(out.affine[:3, 3], [21.0, 10.0, 5.0])  # origin at the ROI's first voxel (x, y, z)
    assert PredictionStore.open(tmp_path / "roi.zarr").meta["roi"] == [[5, 30], [10, 40], [21, 40]]
    expected = monai_reference(TinyNet(), reader, cfg)[roi]
    np.testing.assert_allclose(out.read(), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(infer_volume(TinyNet(), reader, cfg, roi=roi), expected, rtol=0, atol=2e-6)


def test_crash_then_resume_is_identical_and_skips_finished_blocks(tmp_path):
    reader = save_volume(tmp_path, (30, 26, 22), 6)
    cfg = make_cfg((8, 8, 8), (8, 8, 8), overlap=0.5)
    grid = WindowGrid((30, 26, 22), (8, 8, 8), 0.5, (8, 8, 8))
    reference = open_volume(predict_store(TinyNet(), reader, cfg, tmp_path / "ref.zarr")).read()

    out, work = tmp_path / "p.zarr", tmp_path / "p.zarr.partial"
    with pytest.raises(RuntimeError, match="simulated"):
        predict_store(TinyNet(fail_after=grid.n_windows // 2), reader, cfg, out)
    assert not out.exists()  # the output only appears complete
    done = PredictionStore.open(work).done_blocks()
    assert 0 < len(done) < len(grid.blocks())
    assert SpillFolder(work / ".spills").keys()  # partial sums of finished blocks wait for their successors

    resumed = TinyNet()
    predict_store(resumed, reader, cfg, out)
    assert resumed.windows == sum(grid.n_own_windows(i) for i in grid.blocks() if i not in done)
    np.testing.assert_array_equal(open_volume(out).read(), reference)  # bit-identical
    assert not work.exists() and not (out / ".spills").exists() and not (out / ".blocks_done").exists()

    again = TinyNet()
    predict_store(again, reader, cfg, out)
    assert again.windows == 0
    fresh = TinyNet()
    predict_store(fresh, reader, cfg, out, resume=False)
    assert fresh.windows == grid.n_windows


def test_other_settings_are_named(tmp_path):
    reader = save_volume(tmp_path, (20, 20, 20), 7)
    out = tmp_path / "p.zarr"
    with pytest.raises(RuntimeError):
        predict_store(TinyNet(fail_after=8), reader, make_cfg((8, 8, 8), (8, 8, 8)), out)
    with pytest.raises(VesuviusError, match=r"p\.zarr\.partial: unfinished prediction with other settings "
                                            r"\(.*infer\.overlap 0\.25 -> 0\.5\).*another --output.*delete"):
        predict_store(TinyNet(), reader, make_cfg((8, 8, 8), (8, 8, 8), overlap=0.5), out)
    predict_store(TinyNet(), reader, make_cfg((8, 8, 8), (8, 8, 8)), out)
    with pytest.raises(VesuviusError, match=r"p\.zarr: exists .*dtype float32 -> float16.*another --output"):
        predict_store(TinyNet(), reader, make_cfg((8, 8, 8), (8, 8, 8), dtype="float16"), out)
    precious = tmp_path / "precious.zarr"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for resume in (True, False):
        with pytest.raises(VesuviusError, match=r"precious\.zarr"):
            predict_store(TinyNet(), reader, make_cfg((8, 8, 8), (8, 8, 8)), precious, resume=resume)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_nan_and_empty_roi_are_errors(tmp_path):
    data = np.ones((12, 12, 12), np.float32)
    data[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", data)
    reader = save_volume(tmp_path, (12, 12, 12), 8)
    with pytest.raises(VesuviusError, match="empty"):
        infer_volume(TinyNet(), reader, make_cfg((8, 8, 8), (8, 8, 8)), roi=(slice(5, 5), slice(None), slice(None)))
    with pytest.raises(VesuviusError, match="NaN"):
        infer_volume(TinyNet(), open_volume(tmp_path / "nan.npy"), make_cfg((8, 8, 8), (8, 8, 8)))


class NullSink:
    def done_blocks(self):
        return set()

    def write_block(self, index, region, probs):
        pass


def engine_peak_bytes(tmp_path, shape) -> tuple[int, int]:
    """Peak traced bytes of the engine on ``shape`` (spills on disk, output discarded), and one extent's bytes.

    Window 16, overlap 0.25: blocks of 36 with extents of 40; a pointwise predictor keeps it fast.
    """
    grid = WindowGrid(shape, (16, 16, 16), 0.25, (32, 32, 32))
    rng = np.random.default_rng(0)
    read = lambda region: rng.random(tuple(s.stop - s.start for s in region), dtype=np.float32)  # noqa: E731
    spills = SpillFolder(tmp_path / f"spills{shape[0]}")
    tracemalloc.start()
    try:
        run_blocks(BlockJob(grid, read, torch.sigmoid, 32, "gaussian", 0.125, CPU), NullSink(), spills)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not spills.keys()
    extent = max(np.prod([s.stop - s.start for s in grid.extent(i)]) for i in grid.blocks())
    return peak, int(extent) * 4


def test_memory_is_bounded_by_a_few_blocks(tmp_path):
    """Peak memory has a bound independent of the volume size: two inputs (current, prefetched), two sums
    (network, writer), the writer's block and two cached weight maps, about 7.5 extents at most (6.4-7.7
    measured, depending on how the threads overlap), whether the volume has 8 or 64 blocks."""
    for size in (72, 144):  # 8 and 64 blocks
        peak, extent = engine_peak_bytes(tmp_path, (size, size, size))
        assert extent == 40**3 * 4
        assert peak < 8.5 * extent, (size, peak / extent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_equals_monai_and_resumes_identically(tmp_path, amp):
    """On a GPU (fp32, and bf16/fp16 autocast): MONAI's result with the same predictor; a crash resumes bit-exactly."""
    cuda = torch.device("cuda")
    reader = save_volume(tmp_path, (40, 50, 45), 9)
    cfg = make_cfg((16, 16, 16), (16, 16, 16), overlap=0.5, batch=4)
    cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, amp=amp, device="cuda"))
    image = torch.from_numpy(load_normalized(reader, cfg.transforms.percentiles))[None, None].to(cuda)
    with torch.inference_mode():
        expected = sliding_window_inference(image, (16, 16, 16), 4, make_predictor(TinyNet().to(cuda), cfg.infer, cuda,
                                                                                    amp), overlap=0.5,
                                            mode="gaussian", sigma_scale=0.125)[0, 0].cpu().numpy()
    reference = open_volume(predict_store(TinyNet().to(cuda), reader, cfg, tmp_path / "ref.zarr")).read()
    np.testing.assert_allclose(reference, expected, rtol=0, atol=1e-5)
    grid = WindowGrid((40, 50, 45), (16, 16, 16), 0.5, (16, 16, 16))
    with pytest.raises(RuntimeError, match="simulated"):
        predict_store(TinyNet(fail_after=grid.n_windows // 2).to(cuda), reader, cfg, tmp_path / "p.zarr")
    resumed = predict_store(TinyNet().to(cuda), reader, cfg, tmp_path / "p.zarr")
    np.testing.assert_array_equal(open_volume(resumed).read(), reference)


class RecordingSpills:
    """A spill folder that keeps a copy of every array put under each key (to compare the copies)."""

    def __init__(self, folder):
        self.folder, self.puts = folder, {}

    def put(self, key, array):
        self.puts.setdefault(key, []).append(np.array(array, dtype=np.float32))
        self.folder.put(key, array)

    def __getattr__(self, name):
        return getattr(self.folder, name)


def run_parts(tmp_path, name, reader, cfg, parts):
    """Run the ``parts`` (lists of blocks) last to first into one float32 store, as processes that each own a part
    and find none of the earlier parts' spills written yet. Returns (output, stats per part, recording spills)."""
    job = volume_job(reader, cfg, make_predictor(TinyNet(), cfg.infer, CPU, False), CPU)
    store = PredictionStore.create(tmp_path / name, job.grid.shape, block_size=job.grid.block_size, dtype="float32")
    spills = RecordingSpills(store.spills())
    stats = [run_blocks(job, store, spills, blocks=part) for part in reversed(parts)]
    assert store.done_blocks() == set(job.grid.blocks())
    return store.read_probabilities(), stats[::-1], spills


@st.composite
def shared_cases(draw):
    """A case of at least two blocks and up to 3 cuts of its blocks (C order) into contiguous runs."""
    shape, roi, block, kw = draw(cases(min_blocks=2))
    n = len(WindowGrid(shape, roi, kw["overlap"], block).blocks())
    cuts = draw(st.lists(st.integers(1, n - 1), min_size=min(3, n - 1), max_size=min(3, n - 1), unique=True))
    return shape, roi, block, kw, sorted(cuts)


def test_blocks_shared_between_processes_equal_one_run():
    """Property: the blocks cut into contiguous runs (C order, cut anywhere: between z-planes or inside one), the
    runs done last to first into one store (each recomputes the spills of blocks of the runs before it, none of
    which are written yet), give the single run's output bit for bit, and each recomputed spill is bit for bit the
    copy its owner writes later."""

    @settings(max_examples=9, **EXAMPLES)
    @given(case=shared_cases(), seed=st.integers(0, 2**16))
    def check(case, seed):
        shape, roi, block, kw, cuts = case
        grid = WindowGrid(shape, roi, kw["overlap"], block)
        blocks = grid.blocks()
        with tempfile.TemporaryDirectory() as folder:
            reader = save_volume(Path(folder), shape, seed)
            cfg = make_cfg(roi, block, **kw)
            reference = infer_volume(TinyNet(), reader, cfg, device=CPU)
            parts = [blocks[a:b] for a, b in zip([0, *cuts], [*cuts, len(blocks)])]
            got, stats, spills = run_parts(Path(folder), "s.zarr", reader, cfg, parts)
        np.testing.assert_array_equal(got, reference, err_msg=str((shape, roi, block, kw, cuts)))
        assert sum(s.blocks for s in stats) == len(blocks)
        assert sum(s.windows for s in stats) == grid.n_windows
        copies = [c for c in spills.puts.values() if len(c) > 1]
        for first, *others in copies:
            for other in others:
                np.testing.assert_array_equal(other, first)
        assert bool(copies) == any(s.recomputed for s in stats)

    check()


def test_slabs_of_z_planes_recompute_only_the_windows_reaching_across(tmp_path):
    """Runs of whole z-planes of blocks: a run recomputes, per seam, the z-planes of windows of the plane below that
    reach across it (counted here from the window starts), each window of them once."""
    shape, roi, overlap, block = (45, 17, 14), (8, 8, 8), 0.5, (8, 8, 8)  # stride 4: planes of blocks 8 deep
    grid = WindowGrid(shape, roi, overlap, block)
    reader = save_volume(tmp_path, shape, 11)
    cfg = make_cfg(roi, block, overlap=overlap, batch=3)
    planes = [[b for b in grid.blocks() if b[0] == z] for z in range(grid.counts[0])]
    slabs = [sum(planes[a:b], []) for a, b in ((0, 2), (2, 3), (3, len(planes)))]
    got, stats, _ = run_parts(tmp_path, "slabs.zarr", reader, cfg, slabs)
    np.testing.assert_array_equal(got, infer_volume(TinyNet(), reader, cfg, device=CPU))
    z, y, x = (a.starts for a in grid.axes)
    for seam, run in zip((2, 3), stats[1:]):
        edge = seam * grid.block_size[0]
        reaching = [t for t in z if t < edge < t + roi[0]]
        assert reaching and run.recomputed == len(reaching) * len(y) * len(x)
        assert run.recomputed_blocks == sum(1 for b in planes[seam - 1] if grid.n_own_windows(b))
    assert stats[0].recomputed == 0


@pytest.mark.parametrize("shape, block", [((30, 26, 22), (8, 8, 8)), ((11, 40, 19), (16, 16, 16))])
def test_logit_blending_equals_sigmoid_of_monai_over_logits(tmp_path, shape, block):
    """infer.blend_space=logit (any source): the sigmoid of MONAI's sliding window over the TTA-averaged logits,
    whole and block-wise Zarr."""
    net, reader = TinyNet(), save_volume(tmp_path, shape, 7)
    cfg = make_cfg((8, 8, 8), block, overlap=0.5, tta=(0, 2))
    cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, blend_space="logit"))
    image = torch.from_numpy(load_normalized(reader, cfg.transforms.percentiles))[None, None]
    flips = [(), (2,), (4,), (2, 4)]

    def logits(x):
        return sum(torch.flip(net(torch.flip(x, f) if f else x), f) if f else net(x) for f in flips) / len(flips)

    with torch.inference_mode():
        expected = torch.sigmoid(sliding_window_inference(image, (8, 8, 8), 2, logits, overlap=0.5, mode="gaussian",
                                                          sigma_scale=0.125))[0, 0].numpy()
    np.testing.assert_allclose(infer_volume(net, reader, cfg, device=CPU), expected, rtol=0, atol=2e-6)
    out = predict_store(net, reader, cfg, tmp_path / "out.zarr")
    np.testing.assert_allclose(open_volume(out).read(), expected, rtol=0, atol=2e-6)
