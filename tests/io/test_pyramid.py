"""OME-Zarr pyramids of prediction outputs: read back with ``ome-zarr``'s own reader (an independent check of the
levels, shapes and scales), level k + 1 equal to a 2x2x2 mean of level k computed here, the project's readers and
NIfTI export unchanged, and a build interrupted between levels resumed."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.zarr_output import export_nifti
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.io import pyramid
from vesuvius_monai.io.pyramid import level_shape, n_levels
from vesuvius_monai.io.zarr_store import PredictionStore

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from test_blockwise import TinyNet, make_cfg, predict_store, save_volume  # noqa: E402


def mean_2x(a: np.ndarray) -> np.ndarray:
    """2x2x2 mean with partial cells at odd edges, by summing the 8 strided sub-grids (independent of reshape)."""
    shape = tuple(-(-d // 2) for d in a.shape)
    total, count = np.zeros(shape, np.float64), np.zeros(shape, np.float64)
    for o in itertools.product((0, 1), repeat=3):
        part = a[o[0]::2, o[1]::2, o[2]::2]
        total[tuple(slice(0, d) for d in part.shape)] += part
        count[tuple(slice(0, d) for d in part.shape)] += 1
    return total / count


def test_automatic_level_count():
    assert n_levels((96, 96, 96), 0) == 1
    assert n_levels((129, 10, 10), 0) == 2
    assert n_levels((1000, 300, 5), 0) == 4 and max(level_shape((1000, 300, 5), 3)) <= 128
    assert n_levels((1000, 300, 5), 2) == 2


@pytest.mark.slow
def test_pyramid_opens_in_ome_zarr(tmp_path):
    reader = save_volume(tmp_path, (21, 30, 35), 0)
    cfg = make_cfg((8, 8, 8), (16, 16, 16), dtype="float32")
    cfg.infer.pyramid_levels = 3
    out = predict_store(TinyNet(), reader, cfg, tmp_path / "p.zarr")
    nodes = list(Reader(parse_url(str(out)))())
    assert len(nodes[0].data) == 3
    assert [tuple(d.shape) for d in nodes[0].data] == [(21, 30, 35), (11, 15, 18), (6, 8, 9)]
    transforms = nodes[0].metadata["coordinateTransformations"]
    assert [t[0]["scale"] for t in transforms] == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    assert [t[1]["translation"] for t in transforms[1:]] == [[0.5] * 3, [1.5] * 3]
    levels = [np.asarray(d) for d in nodes[0].data]
    np.testing.assert_allclose(levels[1], mean_2x(levels[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(levels[2], mean_2x(levels[1]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(open_volume(out).read(), levels[0])  # the project's reader, level 0 by default
    coarse = open_volume(out, level=1)
    assert coarse.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(coarse.read(), levels[1])
    export_nifti(out, tmp_path / "p.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "p.nii.gz").dataobj).transpose(2, 1, 0), levels[0])
    assert not (out / pyramid.DONE_DIR).exists()
    n_windows = WindowGrid((21, 30, 35), (8, 8, 8), 0.25, (16, 16, 16)).n_windows
    assert PredictionStore.open(out, "r").meta["windows"] == {"run": n_windows, "skipped": 0}


@pytest.mark.slow
def test_uint8_pyramid_and_interrupted_build_resumes(tmp_path, monkeypatch):
    reader = save_volume(tmp_path, (20, 26, 40), 1)
    cfg = make_cfg((8, 8, 8), (16, 16, 16), dtype="uint8")
    cfg.infer.pyramid_levels = 3
    calls = {"n": 0}
    real = pyramid.downsample

    def failing(data, method):
        calls["n"] += 1
        if data.shape[0] <= 12:  # the sources of level 2 (level 1 is 10 deep): stop there
            raise OSError("simulated crash")
        return real(data, method)

    monkeypatch.setattr(pyramid, "downsample", failing)
    with pytest.raises(OSError, match="simulated"):
        predict_store(TinyNet(), reader, cfg, tmp_path / "p.zarr")
    work = tmp_path / "p.zarr.partial"
    assert (work / pyramid.DONE_DIR / "1").exists() and not (work / pyramid.DONE_DIR / "2").exists()
    monkeypatch.setattr(pyramid, "downsample", real)
    stamp = (work / "1" / ".zarray").stat().st_mtime_ns
    net = TinyNet()
    out = predict_store(net, reader, cfg, tmp_path / "p.zarr")
    assert net.windows == 0 and (out / "1" / ".zarray").stat().st_mtime_ns == stamp  # level 1 kept, not rebuilt
    nodes = list(Reader(parse_url(str(out)))())
    levels = [np.asarray(d) for d in nodes[0].data]
    assert [a.dtype for a in levels] == [np.uint8] * 3
    exact = mean_2x(levels[0].astype(np.float64))  # the mean of decoded values, in units of 1 / 255
    ties = np.abs(exact - np.floor(exact) - 0.5) < 1e-3  # means of 8 integers often end in .5: either way is right
    np.testing.assert_array_equal(levels[1][~ties], np.rint(exact[~ties]))
    assert np.abs(levels[1] - exact)[ties].max(initial=0) <= 0.5 + 1e-3
