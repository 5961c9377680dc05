"""Hostile or damaged inputs (issue 20): colour TIFFs, NIfTI headers claiming more than their file holds, Zarr
stores with missing chunks, block grids of absurd volumes, reads larger than memory. Each gets one clear error
(or a warning, for missing chunks) naming the file, and the input stays byte for byte as it was."""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr

from helpers import error_line
from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.data.readers import block_grid, open_volume, sample_regions
from vesuvius_monai.data.regions import BlockIndices, region_shape
from vesuvius_monai.engine.infer import infer_volume
from vesuvius_monai.engine.windows import MAX_BLOCKS, WindowGrid
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io import memory
from vesuvius_monai.io.nifti import MAX_DEFLATE_RATIO
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.models import build_model


def _predict(trained_run: Path, volume: Path, out: Path, *overrides: str) -> int:
    return main(["predict", "--checkpoint", str(trained_run / "checkpoints/best.pt"), "--input", str(volume),
                 "--output", str(out), *overrides])


# ------------------------------------------------------------------------------------------ colour TIFFs


def _colour_tiffs(tmp_path: Path) -> dict[str, Path]:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    files = {"single": tmp_path / "rgb.tif", "multi": tmp_path / "rgb_pages.tif", "planar": tmp_path / "planar.tif",
             "alpha": tmp_path / "gray_alpha.tif", "channels": tmp_path / "channels.tif"}
    tifffile.imwrite(files["single"], rgb, photometric="rgb")
    tifffile.imwrite(files["multi"], np.zeros((4, 32, 32, 3), dtype=np.uint8), photometric="rgb")
    tifffile.imwrite(files["planar"], np.zeros((3, 32, 32), dtype=np.uint8), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(files["alpha"], np.zeros((32, 32, 2), dtype=np.uint8), photometric="minisblack",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(files["channels"], np.zeros((3, 32, 32), dtype=np.uint8), imagej=True,
                     metadata={"axes": "CYX"})
    return files


@pytest.mark.parametrize("kind, expect", [
    ("single", r"3 samples per pixel \(photometric RGB\)"),  # was read as a volume with x = 3
    ("multi", r"3 samples per pixel \(photometric RGB\)"),
    ("planar", r"3 samples per pixel \(photometric RGB\)"),  # was read as a volume with z = 3
    ("alpha", r"2 samples per pixel \(photometric MINISBLACK\)"),
    ("channels", r"3 channels \(axes CYX\)"),
])
def test_colour_tiff_is_refused_naming_its_samples(tmp_path, kind, expect):
    path = _colour_tiffs(tmp_path)[kind]
    with pytest.raises(VesuviusError, match=rf"{path.name}: TIFF has {expect}"):
        open_volume(path)


def test_folder_of_colour_slices_is_refused(tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"{i}.tif", np.zeros((32, 32, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(VesuviusError, match=r"0\.tif: TIFF has 3 samples per pixel \(photometric RGB\)"):
        open_volume(tmp_path)


def test_grayscale_tiff_still_reads(tmp_path):
    vol = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
    tifffile.imwrite(tmp_path / "gray.tif", vol, photometric="minisblack")
    np.testing.assert_array_equal(open_volume(tmp_path / "gray.tif").read(), vol)


def test_predict_refuses_a_single_page_rgb_tiff(trained_run, tmp_path, capsys):
    path = _colour_tiffs(tmp_path)["single"]
    before = path.read_bytes()
    assert _predict(trained_run, path, tmp_path / "p.nii.gz") == 2
    assert re.search(r"rgb\.tif: TIFF has 3 samples per pixel \(photometric RGB\)", error_line(capsys))
    assert path.read_bytes() == before
    assert not (tmp_path / "p.nii.gz").exists()


# ------------------------------------------------------------------------------------------ NIfTI size claims


def _nifti_bomb(path: Path, shape=(30000, 30000, 30000)) -> Path:
    """A tiny .nii.gz whose header claims ``shape`` voxels of uint8."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4)).header.copy()
    header.set_data_shape(shape)
    header.set_data_offset(352)
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(1000)))
    return path


def test_gzip_nifti_claiming_more_than_it_can_hold_is_refused(tmp_path):
    path = _nifti_bomb(tmp_path / "bomb.nii.gz")
    size = path.stat().st_size
    with pytest.raises(VesuviusError) as err:
        open_volume(path)
    message = str(err.value)
    assert message.startswith(f"{path}: NIfTI header claims 30000x30000x30000 voxels of uint8 (24.6 TiB)")
    assert f"gzip file of {size} B" in message and "\n" not in message


def test_gzip_nifti_at_the_deflate_limit_still_opens(tmp_path):
    """All zeros at gzip level 9 compress about as well as deflate can (about 1030:1): such a file is fine."""
    path = tmp_path / "zeros.nii.gz"
    header = nib.Nifti1Image(np.zeros((128, 128, 128), dtype=np.uint8), np.eye(4)).header
    header.set_data_offset(352)  # the header, 4 bytes of extension flags, then the data
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(128**3), compresslevel=9))
    assert 900 * path.stat().st_size < 128**3 < MAX_DEFLATE_RATIO * path.stat().st_size
    reader = open_volume(path)
    assert reader.shape == (128, 128, 128) and reader.read().max() == 0


def test_predict_refuses_a_nifti_bomb_in_one_line(trained_run, tmp_path, capsys):
    path = _nifti_bomb(tmp_path / "bomb.nii.gz")
    before = path.read_bytes()
    start = time.perf_counter()
    assert _predict(trained_run, path, tmp_path / "p.zarr") == 2
    assert time.perf_counter() - start < 30  # was a MemoryError (or hours) listing the blocks
    assert "bomb.nii.gz: NIfTI header claims 30000x30000x30000" in error_line(capsys)
    assert path.read_bytes() == before
    assert not any(p.name.startswith("p.zarr") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ bounded grids


def test_block_grid_of_an_absurd_volume_takes_no_memory():
    tracemalloc.start()
    try:
        grid = block_grid((30000, 30000, 30000), (1, 1, 1))
        n, last, first = len(grid), grid[-1], next(iter(grid))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 30000**3
    assert last == ((29999, 29999, 29999), (slice(29999, 30000), slice(29999, 30000), slice(29999, 30000)))
    assert first == ((0, 0, 0), (slice(0, 1), slice(0, 1), slice(0, 1)))
    assert peak < 100_000


def test_block_indices_behave_as_the_list():
    counts = (3, 1, 4)
    indices, listed = BlockIndices(counts), [(z, y, x) for z in range(3) for y in range(1) for x in range(4)]
    assert len(indices) == len(listed) and list(indices) == listed
    assert [indices[i] for i in range(-len(listed), len(listed))] == listed + listed
    assert indices[2:9:3] == listed[2:9:3]
    assert all(i in indices for i in listed) and (3, 0, 0) not in indices and (0, 0) not in indices
    assert (np.int64(2), 0, 3) in indices
    with pytest.raises(IndexError):
        indices[len(listed)]


def test_window_grid_of_too_many_blocks_is_refused_before_listing():
    start = time.perf_counter()
    with pytest.raises(VesuviusError, match=r"config key 'infer\.block_size': .*shape \(30000, 30000, 30000\).* "
                                            r"more than 10,000,000"):
        WindowGrid((30000, 30000, 30000), (16, 16, 16), 0.25, (16, 16, 16))
    assert time.perf_counter() - start < 1
    grid = WindowGrid((3000, 3000, 3000), (64, 64, 64), 0.25, (192, 192, 192))  # a scroll-sized volume: fine
    assert len(grid.blocks()) == 16**3 <= MAX_BLOCKS and grid.blocks()[-1] == (15, 15, 15)


def test_window_grid_with_blocks_larger_than_memory_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 2**30)
    with pytest.raises(VesuviusError, match=r"config key 'infer\.block_size': inference in blocks of \[1024, 1024, "
                                            r"1024\] needs at least 16\.0 GiB of memory, more than the 1\.0 GiB"):
        WindowGrid((1024, 1024, 1024), (64, 64, 64), 0.25, (1024, 1024, 1024))
    WindowGrid((1024, 1024, 1024), (64, 64, 64), 0.25, (192, 192, 192))


def test_reading_more_than_memory_is_refused(tmp_path, monkeypatch):
    """A Zarr store's shape is its own claim (missing chunks read as the fill value): a read of the whole of a
    1 GiB array on a host with less is one clear error, not a MemoryError."""
    zarr.create_array(tmp_path / "big.zarr", shape=(1024, 1024, 1024), chunks=(256, 256, 256), dtype="uint8",
                      fill_value=0)
    reader = open_volume(tmp_path / "big.zarr", missing_chunks="allow")
    monkeypatch.setattr(memory, "available_memory", lambda: 512 * 2**20)
    with pytest.raises(VesuviusError, match=r"big\.zarr: reading region z=0:1024, y=0:1024, x=0:1024 \(uint8\) "
                                            r"needs at least 1\.0 GiB of memory, more than the 512\.0 MiB"):
        reader.read()
    assert reader.read((slice(0, 16), slice(0, 16), slice(0, 16))).shape == (16, 16, 16)  # small reads: unchecked


def test_prediction_into_memory_larger_than_memory_is_refused(tmp_path, monkeypatch):
    """evaluate, tune-postprocess, validation and predict to NIfTI hold a float32 prediction of the whole volume."""
    zarr.create_array(tmp_path / "big.zarr", shape=(512, 512, 512), chunks=(128, 128, 128), dtype="uint8",
                      fill_value=0)
    reader = open_volume(tmp_path / "big.zarr", missing_chunks="allow")
    monkeypatch.setattr(memory, "available_memory", lambda: 256 * 2**20)
    cfg = load_config(None, ["model.name=unet", "model.kwargs={}", "infer.tta_flip_axes=[]"])
    with pytest.raises(VesuviusError, match=r"big\.zarr: a float32 prediction of shape \(512, 512, 512\) needs at "
                                            r"least 512\.0 MiB of memory, more than the 256\.0 MiB available"):
        infer_volume(build_model("unet"), reader, cfg, device=torch.device("cpu"))


def test_sampled_regions_of_an_absurd_volume_stay_few():
    """The voxel count of a (10^9)^3 volume overflows int64 (it was taken for a small volume, read whole)."""
    regions = sample_regions((10**9, 10**9, 10**9), 2_000_000)
    assert 1 < len(regions) and sum(math.prod(region_shape(r)) for r in regions) <= 2_000_000


# ------------------------------------------------------------------------------------------ missing Zarr chunks


def _store_with_a_hole(path: Path, zarr_format: int, **kwargs) -> tuple[np.ndarray, str]:
    """A (32, 32, 32) uint16 array (values >= 1) in chunks of 16 with chunk (1, 0, 1) deleted: (data, its key)."""
    vol = (np.arange(32**3, dtype=np.uint16).reshape(32, 32, 32) % 1000) + 1
    array = zarr.create_array(path, shape=vol.shape, chunks=(16, 16, 16), dtype="uint16", fill_value=0,
                              zarr_format=zarr_format, **kwargs)
    array[:] = vol
    key = array.metadata.encode_chunk_key((1, 0, 1))
    os.remove(path / key)
    return vol, key


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_missing_chunk_warns_once_with_the_count_and_the_first_key(tmp_path, zarr_format, caplog):
    path = tmp_path / "scroll.zarr"
    vol, key = _store_with_a_hole(path, zarr_format)
    reader = open_volume(path)
    with caplog.at_level(logging.WARNING):
        data = reader.read()
        reader.read()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{path}: 1 of the chunks of region z=0:32, y=0:32, x=0:32 are missing from the "
                                  f"store (first: {key})")
    assert "data.missing_chunks" in warnings[0]
    np.testing.assert_array_equal(data[16:, :16, 16:], 0)  # read as the fill value, as zarr does
    np.testing.assert_array_equal(data[:16], vol[:16])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_missing_chunk_is_an_error_when_asked(tmp_path, zarr_format):
    path = tmp_path / "scroll.zarr"
    _, key = _store_with_a_hole(path, zarr_format)
    listing = sorted(p.relative_to(path) for p in path.rglob("*"))
    reader = open_volume(path, missing_chunks="error")
    reader.read((slice(0, 16), slice(0, 32), slice(0, 32)))  # chunks all there
    with pytest.raises(VesuviusError, match=rf"{path}: chunk {key} is missing from the store"):
        reader.read((slice(8, 24), slice(0, 32), slice(0, 32)))
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == listing


def test_missing_chunks_allowed_are_silent(tmp_path, caplog):
    path = tmp_path / "scroll.zarr"
    _store_with_a_hole(path, 3)
    with caplog.at_level(logging.WARNING):
        open_volume(path, missing_chunks="allow").read()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_chunks_of_fill_value_that_exist_are_not_reported(tmp_path, caplog):
    """A chunk stored with only fill values in it is there: nothing to say."""
    path = tmp_path / "zeros.zarr"
    array = zarr.create_array(path, shape=(32, 32, 32), chunks=(16, 16, 16), dtype="uint8", fill_value=0,
                              config={"write_empty_chunks": True})
    array[:] = 0
    with caplog.at_level(logging.WARNING):
        open_volume(path, missing_chunks="error").read()
    assert not caplog.records


def test_missing_shard_of_an_ome_zarr_level_is_named(tmp_path):
    """Sharded v3 array at level 0 of an OME-Zarr group with (t, c) singleton axes: the shard's key is named."""
    path = tmp_path / "ome.zarr"
    group = zarr.open_group(path, mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    array = group.create_array("0", shape=(1, 1, 32, 32, 32), chunks=(1, 1, 8, 8, 8), shards=(1, 1, 16, 16, 16),
                               dtype="float32", fill_value=float("nan"))
    array[:] = 1.0
    os.remove(path / "0" / "c" / "0" / "0" / "1" / "1" / "0")
    with pytest.raises(VesuviusError, match=r"chunk 0/c/0/0/1/1/0 is missing"):
        open_volume(path, missing_chunks="error").read()


def test_prediction_stores_leave_empty_blocks_out_silently(tmp_path, caplog):
    store = PredictionStore.create(tmp_path / "p.zarr", (32, 32, 32), block_size=(16, 16, 16))
    store.array[:16] = 7  # blocks of zeros are not written (zarr leaves chunks of the fill value out)
    with caplog.at_level(logging.WARNING):
        data = open_volume(tmp_path / "p.zarr", missing_chunks="error").read()
    assert data[:16].min() == 7 and data[16:].max() == 0
    assert not caplog.records


def test_missing_chunks_key_is_checked():
    assert load_config(None, ["data.missing_chunks=error"]).data.missing_chunks == "error"
    with pytest.raises(VesuviusError, match=r"config key 'data\.missing_chunks'"):
        load_config(None, ["data.missing_chunks=ignore"])


def test_predict_stops_on_a_missing_chunk_when_asked(trained_run, tmp_path, capsys, caplog):
    path = tmp_path / "scroll.zarr"
    _, key = _store_with_a_hole(path, 3)
    listing = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert _predict(trained_run, path, tmp_path / "p.zarr", "data.missing_chunks=error") == 2
    assert f"chunk {key} is missing from the store" in error_line(capsys)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == listing
    with caplog.at_level(logging.WARNING):
        assert _predict(trained_run, path, tmp_path / "q.zarr") == 0
    assert any(f"(first: {key})" in r.getMessage() for r in caplog.records)

