"""Foreground index: exact coordinates, bounded block reads, uniform subsampling, on-disk cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

import vesuvius_monai.data.fg_index as fg_index
from vesuvius_monai.data.fg_index import build_foreground_index, load_or_build_foreground_index
from vesuvius_monai.data.readers import NpyReader, open_volume
from vesuvius_monai.errors import VesuviusError

SHAPE = (23, 30, 41)


@pytest.fixture
def label() -> np.ndarray:
    """Labels 0 / 1 / 2 (2 = unlabelled) on an odd-sized (z, y, x) grid."""
    rng = np.random.default_rng(3)
    return rng.choice(np.array([0, 1, 2], dtype=np.uint8), size=SHAPE, p=[0.8, 0.15, 0.05])


class SpyReader(NpyReader):
    """Records the shape of every region read."""

    def __init__(self, path):
        super().__init__(path, None)
        self.reads: list[tuple[int, int, int]] = []

    def _read(self, region):
        data = super()._read(region)
        self.reads.append(data.shape)
        return data


def test_exact_coordinates_read_block_by_block(tmp_path, label):
    np.save(tmp_path / "lab.npy", label)
    reader = SpyReader(tmp_path / "lab.npy")
    for value in (1, 2):
        points = build_foreground_index(reader, value=value, block=8, max_points=10**6)
        expected = np.argwhere(label == value)  # C order, like the index
        assert points.dtype == np.int32 and points.shape == expected.shape
        np.testing.assert_array_equal(points, expected)
    assert max(np.prod(s) for s in reader.reads) <= 8**3
    assert len(reader.reads) == 2 * 3 * 4 * 6


def test_competition_tif_label(tmp_path, label):
    tifffile.imwrite(tmp_path / "42.tif", label)
    points = build_foreground_index(open_volume(tmp_path / "42.tif"), block=16)
    np.testing.assert_array_equal(points, np.argwhere(label == 1))


def test_subsample_is_uniform_subset(tmp_path, label):
    np.save(tmp_path / "lab.npy", label)
    reader = open_volume(tmp_path / "lab.npy")
    everything = np.argwhere(label == 1)
    sample = build_foreground_index(reader, block=8, max_points=800, seed=5)
    assert sample.shape == (800, 3)
    assert len(np.unique(sample, axis=0)) == 800
    as_set = {tuple(p) for p in everything}
    assert all(tuple(p) in as_set for p in sample)
    # an unbiased sample has the population's mean position (std of the mean ~ 0.25 voxel here)
    np.testing.assert_allclose(sample.mean(axis=0), everything.mean(axis=0), atol=1.5)
    assert sample[:, 0].max() >= 20  # reaches the last blocks, not just the first ones
    np.testing.assert_array_equal(sample, build_foreground_index(reader, block=8, max_points=800, seed=5))
    assert not np.array_equal(sample, build_foreground_index(reader, block=8, max_points=800, seed=6))


def test_inclusion_frequency_is_uniform(tmp_path):
    label = np.zeros((4, 4, 8), dtype=np.uint8)
    label[0, 0, :] = 1  # 8 points in block 0
    label[3, 3, :4] = 1  # 4 points in the last block (block=2)
    np.save(tmp_path / "lab.npy", label)
    reader = open_volume(tmp_path / "lab.npy")
    counts = np.zeros(label.shape, dtype=np.int32)
    for seed in range(300):
        for z, y, x in build_foreground_index(reader, block=2, max_points=6, seed=seed):
            counts[z, y, x] += 1
    frequency = counts[label == 1] / 300  # each of the 12 points: expected 6 / 12 = 0.5, std ~0.03
    np.testing.assert_allclose(frequency, 0.5, atol=0.12)


def test_empty_label_and_bad_parameters(tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros((5, 6, 7), dtype=np.uint8))
    reader = open_volume(tmp_path / "zero.npy")
    assert build_foreground_index(reader).shape == (0, 3)
    with pytest.raises(VesuviusError, match="block"):
        build_foreground_index(reader, block=0)


def test_cache_hit_invalidation_and_repair(tmp_path, label, monkeypatch):
    path = tmp_path / "lab.npy"
    np.save(path, label)
    cache = tmp_path / "cache"
    first = load_or_build_foreground_index(open_volume(path), cache, block=16)
    np.testing.assert_array_equal(first, np.argwhere(label == 1))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"

    real_build = fg_index.build_foreground_index

    def no_build(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(fg_index, "build_foreground_index", no_build)
    np.testing.assert_array_equal(load_or_build_foreground_index(open_volume(path), cache, block=16), first)

    monkeypatch.setattr(fg_index, "build_foreground_index", real_build)
    changed = label.copy()
    changed[changed == 1] = 0
    changed[0, 0, 0] = 1
    np.save(path, changed)
    os.utime(path, ns=(1, 1_000_000_000))  # a different mtime even on coarse clocks
    np.testing.assert_array_equal(load_or_build_foreground_index(open_volume(path), cache, block=16), [[0, 0, 0]])
    assert len(list(cache.iterdir())) == 2

    newest = max(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"corrupt")
    np.testing.assert_array_equal(load_or_build_foreground_index(open_volume(path), cache, block=16), [[0, 0, 0]])
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_cache_key_tells_arrays_of_one_zarr_group_apart(tmp_path):
    """Two arrays of one Zarr group (data.zarr_key) and two OME-Zarr levels (data.zarr_level) get their own index."""
    import zarr

    first = np.zeros((8, 8, 8), dtype=np.uint8)
    first[1, 2, 3] = 1
    second = np.zeros((8, 8, 8), dtype=np.uint8)
    second[4, 5, 6] = 1
    group = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    group.create_array("a", shape=first.shape, dtype=first.dtype)[:] = first
    group.create_array("b", shape=second.shape, dtype=second.dtype)[:] = second
    cache = tmp_path / "cache"
    a = load_or_build_foreground_index(open_volume(tmp_path / "labels.zarr", key="a"), cache)
    b = load_or_build_foreground_index(open_volume(tmp_path / "labels.zarr", key="b"), cache)
    np.testing.assert_array_equal(a, [[1, 2, 3]])
    np.testing.assert_array_equal(b, [[4, 5, 6]])
    assert len(list(cache.iterdir())) == 2

    pyramid = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    for level in ("0", "1"):
        pyramid.create_array(level, shape=first.shape, dtype=first.dtype)[:] = first if level == "0" else second
    pyramid.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "zyx"],
                                     "datasets": [{"path": "0"}, {"path": "1"}]}]
    level0 = load_or_build_foreground_index(open_volume(tmp_path / "ome.zarr", level=0), cache)
    level1 = load_or_build_foreground_index(open_volume(tmp_path / "ome.zarr", level=1), cache)
    np.testing.assert_array_equal(level0, [[1, 2, 3]])
    np.testing.assert_array_equal(level1, [[4, 5, 6]])
