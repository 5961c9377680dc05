"""Block-wise prediction: seam-free equality with whole-volume prediction, resume, ROI, bounded reads."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vesuvius_monai.data.readers import NpyReader, open_volume
from vesuvius_monai.engine.blockwise import export_nifti, predict_volume_blockwise
from vesuvius_monai.errors import VesuviusError

SHAPE = (37, 50, 61)
BLOCK = (16, 16, 16)
HALO = (8, 8, 8)
N_BLOCKS = 3 * 4 * 4


def context_fn(block: np.ndarray) -> np.ndarray:
    """Gaussian blur (sigma 1.5, support radius 6 < halo) then a sigmoid: depends on neighbours."""
    blurred = ndimage.gaussian_filter(block.astype(np.float64), sigma=1.5, mode="reflect", truncate=4.0)
    return (1.0 / (1.0 + np.exp(-3.0 * blurred))).astype(np.float32)


@pytest.fixture
def volume(tmp_path):
    """Random uint16-like intensities on an odd grid, saved as .npy with anisotropic spacing."""
    data = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    np.save(tmp_path / "scan.npy", data)
    return data, open_volume(tmp_path / "scan.npy", spacing=(2.0, 1.0, 0.5))


class CountingFn:
    """``context_fn`` that counts its calls and raises on call number ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, block):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return context_fn(block)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("float16", 2.5e-4), ("uint8", 0.5 / 255 + 1e-6)])
def test_equals_whole_volume_prediction(tmp_path, volume, dtype, atol):
    data, reader = volume
    out = predict_volume_blockwise(reader, context_fn, tmp_path / "p.zarr", block_size=BLOCK, halo=HALO,
                                   dtype=dtype, progress=False)
    result = open_volume(out)
    assert result.shape == SHAPE and result.dtype == np.dtype(dtype)
    assert result.spacing == (2.0, 1.0, 0.5)
    probs = result.read().astype(np.float32) / (255.0 if dtype == "uint8" else 1.0)
    assert np.abs(probs - context_fn(data)).max() <= atol


def test_without_halo_seams_show(tmp_path, volume):
    data, reader = volume
    out = predict_volume_blockwise(reader, context_fn, tmp_path / "p.zarr", block_size=BLOCK, halo=(0, 0, 0),
                                   dtype="float32", progress=False)
    assert np.abs(open_volume(out).read() - context_fn(data)).max() > 1e-2  # so the test above can fail


class SpyReader(NpyReader):
    """Records the size of every region read."""

    def __init__(self, path):
        super().__init__(path, None)
        self.sizes: list[int] = []

    def _read(self, region):
        data = super()._read(region)
        self.sizes.append(data.size)
        return data


def test_reads_are_bounded_by_block_plus_halo(tmp_path, volume):
    reader = SpyReader(tmp_path / "scan.npy")
    predict_volume_blockwise(reader, context_fn, tmp_path / "p.zarr", block_size=BLOCK, halo=HALO, progress=False)
    assert len(reader.sizes) == N_BLOCKS
    # largest read: z 8:37 (block 16:32 + halo, clipped at 37) x y 8:40 x x 8:40; never the whole volume
    assert max(reader.sizes) == 29 * 32 * 32


def test_resume_after_crash(tmp_path, volume):
    data, reader = volume
    reference = predict_volume_blockwise(reader, context_fn, tmp_path / "ref.zarr", block_size=BLOCK, halo=HALO,
                                         dtype="float32", progress=False)
    out = tmp_path / "p.zarr"
    crashing = CountingFn(fail_at=6)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_volume_blockwise(reader, crashing, out, block_size=BLOCK, halo=HALO, dtype="float32", progress=False)
    assert not out.exists()  # the output only appears complete
    assert len(list((tmp_path / "p.zarr.partial" / ".blocks_done").iterdir())) == 5

    resumed = CountingFn()
    predict_volume_blockwise(reader, resumed, out, block_size=BLOCK, halo=HALO, dtype="float32", progress=False)
    assert resumed.calls == N_BLOCKS - 5  # the 5 finished blocks were not recomputed
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(reference).read())
    assert not (tmp_path / "p.zarr.partial").exists()
    assert not (out / ".blocks_done").exists()

    again = CountingFn()
    predict_volume_blockwise(reader, again, out, block_size=BLOCK, halo=HALO, dtype="float32", progress=False)
    assert again.calls == 0
    fresh = CountingFn()
    predict_volume_blockwise(reader, fresh, out, block_size=BLOCK, halo=HALO, dtype="float32", progress=False,
                             resume=False)
    assert fresh.calls == N_BLOCKS
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(reference).read())


def test_resume_refuses_different_settings(tmp_path, volume):
    _, reader = volume
    out = tmp_path / "p.zarr"
    with pytest.raises(RuntimeError):
        predict_volume_blockwise(reader, CountingFn(fail_at=3), out, block_size=BLOCK, halo=HALO, progress=False)
    with pytest.raises(VesuviusError, match=r"p\.zarr\.partial.*different settings"):
        predict_volume_blockwise(reader, context_fn, out, block_size=(8, 8, 8), halo=HALO, progress=False)
    predict_volume_blockwise(reader, context_fn, out, block_size=BLOCK, halo=HALO, progress=False)
    with pytest.raises(VesuviusError, match=r"p\.zarr.*different settings"):
        predict_volume_blockwise(reader, context_fn, out, block_size=BLOCK, halo=HALO, dtype="float16",
                                 progress=False)


def test_roi(tmp_path, volume):
    data, reader = volume
    roi = (slice(5, 30), slice(10, None), slice(-20, None))
    counting = CountingFn()
    out = predict_volume_blockwise(reader, counting, tmp_path / "roi.zarr", block_size=BLOCK, halo=HALO,
                                   dtype="float32", roi=roi, progress=False)
    result = open_volume(out)
    assert result.shape == (25, 40, 20)
    assert counting.calls == 2 * 3 * 2
    # context from outside the ROI is used, so the ROI equals the crop of the whole-volume prediction
    np.testing.assert_allclose(result.read(), context_fn(data)[5:30, 10:, 41:], atol=1e-5)
    # origin moves to the ROI's first voxel: x 41 * 0.5, y 10 * 1, z 5 * 2
    np.testing.assert_allclose(result.affine[:3, 3], [20.5, 10.0, 10.0])

    nifti = export_nifti(out, tmp_path / "roi.nii.gz")
    img = nib.load(str(nifti))
    assert img.shape == (20, 40, 25)
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 1, 0), result.read(), atol=1e-7)
    np.testing.assert_allclose(img.affine, result.affine)


def test_normalize_is_applied_before_predict(tmp_path, volume):
    data, reader = volume
    out = predict_volume_blockwise(reader, lambda b: 1 / (1 + np.exp(-b)), tmp_path / "n.zarr", block_size=BLOCK,
                                   halo=(0, 0, 0), dtype="float32", normalize=lambda b: (b - 0.5) * 4.0,
                                   progress=False)
    np.testing.assert_allclose(open_volume(out).read(), 1 / (1 + np.exp(-(data - 0.5) * 4.0)), atol=1e-6)


def test_errors(tmp_path, volume):
    _, reader = volume
    with pytest.raises(VesuviusError, match="shape"):
        predict_volume_blockwise(reader, lambda b: b[:-1], tmp_path / "a.zarr", block_size=BLOCK, progress=False)
    with pytest.raises(VesuviusError, match="NaN"):
        predict_volume_blockwise(reader, lambda b: b * np.nan, tmp_path / "b.zarr", block_size=BLOCK,
                                 progress=False)
    with pytest.raises(VesuviusError, match="block_size"):
        predict_volume_blockwise(reader, context_fn, tmp_path / "c.zarr", block_size=(16, 0, 16), progress=False)
    with pytest.raises(VesuviusError, match="dtype"):
        predict_volume_blockwise(reader, context_fn, tmp_path / "c.zarr", dtype="int16", progress=False)
    with pytest.raises(VesuviusError, match="empty"):
        predict_volume_blockwise(reader, context_fn, tmp_path / "c.zarr", roi=(slice(5, 5), slice(None), slice(None)),
                                 progress=False)
    precious = tmp_path / "precious.zarr"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for resume in (True, False):
        with pytest.raises(VesuviusError, match=r"precious\.zarr"):
            predict_volume_blockwise(reader, context_fn, precious, block_size=BLOCK, progress=False, resume=resume)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(VesuviusError, match=r"a\.zarr.*not complete"):
        export_nifti(tmp_path / "a.zarr.partial", tmp_path / "a.nii.gz")
