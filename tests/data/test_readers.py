"""Volume readers: every format written here with its own library, read back region by region."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from vesuvius_monai.data.readers import (
    NiftiReader,
    NpyReader,
    TiffFolderReader,
    TiffReader,
    VolumeReader,
    ZarrReader,
    block_grid,
    normalize_region,
    open_volume,
    read_tiff_pages,
    sample_percentiles,
    sample_regions,
)
from vesuvius_monai.errors import VesuviusError

SHAPE = (7, 9, 11)
REGION = (slice(2, 5), slice(3, 9), slice(0, 4))


@pytest.fixture
def vol() -> np.ndarray:
    """(z, y, x) uint16 volume whose value tells the voxel position."""
    return np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)


def _check(reader: VolumeReader, vol: np.ndarray) -> None:
    """Reader matches ``vol``: metadata, whole read, a region, clipped and open-ended regions."""
    assert reader.shape == vol.shape
    assert reader.dtype == vol.dtype
    np.testing.assert_array_equal(reader.read(), vol)
    np.testing.assert_array_equal(reader.read(REGION), vol[REGION])
    beyond = (slice(5, 100), slice(None), slice(-3, None))
    np.testing.assert_array_equal(reader.read(beyond), vol[5:, :, -3:])


# ------------------------------------------------------------------------------------------ formats


def test_nifti_reverses_axes_and_keeps_affine(tmp_path, vol):
    affine = np.array([[0.5, 0, 0, 1], [0, 2.0, 0, 2], [0, 0, 3.0, 3], [0, 0, 0, 1]])
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), affine), str(tmp_path / name))
        reader = open_volume(tmp_path / name)
        assert isinstance(reader, NiftiReader)
        _check(reader, vol)
        np.testing.assert_allclose(reader.affine, affine)
        assert reader.spacing == (3.0, 2.0, 0.5)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_multipage_tiff(tmp_path, vol, compression):
    tifffile.imwrite(tmp_path / "v.tif", vol, compression=compression)
    reader = open_volume(tmp_path / "v.tif", spacing=(4.0, 2.0, 1.0))
    assert isinstance(reader, TiffReader)
    _check(reader, vol)
    assert reader.spacing == (4.0, 2.0, 1.0)  # no metadata in the file: the argument
    np.testing.assert_allclose(reader.affine, np.diag([1.0, 2.0, 4.0, 1.0]))


def test_tiff_page_wise_fallback(tmp_path, vol):
    tifffile.imwrite(tmp_path / "v.tif", vol, compression="zlib")
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:
        region = normalize_region(REGION, SHAPE)
        np.testing.assert_array_equal(read_tiff_pages(tif, region), vol[REGION])


def test_tiff_spacing_from_imagej_and_ome_metadata(tmp_path, vol, caplog):
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    with caplog.at_level(logging.WARNING):
        reader = open_volume(tmp_path / "ij.tif", spacing=(9.0, 9.0, 9.0))
    assert reader.spacing == pytest.approx((2.0, 0.25, 0.5))
    assert "ij.tif" in caplog.text  # the ignored argument is reported
    np.testing.assert_array_equal(reader.read(REGION), vol[REGION])
    tifffile.imwrite(tmp_path / "v.ome.tif", vol,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeY": 0.7, "PhysicalSizeX": 0.4})
    assert open_volume(tmp_path / "v.ome.tif").spacing == pytest.approx((3.0, 0.7, 0.4))


def test_competition_layout(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 28), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 2], dtype=np.uint8), size=image.shape, p=[0.7, 0.2, 0.1])
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_labels").mkdir()
    tifffile.imwrite(tmp_path / "train_images" / "1407735.tif", image)
    tifffile.imwrite(tmp_path / "train_labels" / "1407735.tif", label)
    img_reader = open_volume(tmp_path / "train_images" / "1407735.tif")
    lab_reader = open_volume(tmp_path / "train_labels" / "1407735.tif")
    assert img_reader.shape == lab_reader.shape == (20, 24, 28)
    assert img_reader.dtype == lab_reader.dtype == np.uint8
    np.testing.assert_array_equal(img_reader.read(), image)
    region = (slice(3, 11), slice(0, 24), slice(20, 28))
    np.testing.assert_array_equal(lab_reader.read(region), label[region])
    assert set(np.unique(lab_reader.read())) == {0, 1, 2}


def test_folder_of_slices_in_natural_order(tmp_path, vol):
    folder = tmp_path / "layers"
    folder.mkdir()
    for z in range(SHAPE[0]):  # unpadded names: 10 must not sort before 2
        tifffile.imwrite(folder / f"{z * 5}.tif", vol[z])
    reader = open_volume(folder, spacing=(2.0, 1.0, 1.0))
    assert isinstance(reader, TiffFolderReader)
    assert [p.name for p in reader.files][:4] == ["0.tif", "5.tif", "10.tif", "15.tif"]
    _check(reader, vol)
    assert reader.spacing == (2.0, 1.0, 1.0)


def test_folder_reads_only_the_slices_it_needs(tmp_path, vol):
    folder = tmp_path / "layers"
    folder.mkdir()
    for z in range(SHAPE[0]):
        tifffile.imwrite(folder / f"{z:05d}.tif", vol[z], compression="zlib")
    reader = open_volume(folder)
    (folder / "00006.tif").write_bytes(b"not a tiff at all")
    np.testing.assert_array_equal(reader.read((slice(0, 6), slice(None), slice(None))), vol[:6])
    with pytest.raises(VesuviusError, match="00006.tif"):
        reader.read((slice(5, 7), slice(None), slice(None)))
    tifffile.imwrite(folder / "00006.tif", vol[6, :5])
    with pytest.raises(VesuviusError, match="00006.tif.*shape"):
        reader.read()


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_array(tmp_path, vol, fmt):
    array = zarr.create_array(str(tmp_path / "v.zarr"), shape=SHAPE, chunks=(3, 4, 5), dtype=vol.dtype,
                              zarr_format=fmt)
    array[:] = vol
    reader = open_volume(tmp_path / "v.zarr", spacing=(1.0, 2.0, 3.0))
    assert isinstance(reader, ZarrReader)
    _check(reader, vol)
    assert reader.spacing == (1.0, 2.0, 3.0)


def test_zarr_plain_group_needs_key(tmp_path, vol):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("image", shape=SHAPE, chunks=(4, 4, 4), dtype=vol.dtype)[:] = vol
    group.create_array("label", shape=SHAPE, chunks=(4, 4, 4), dtype="uint8")[:] = 1
    np.testing.assert_array_equal(open_volume(tmp_path / "g.zarr", key="image").read(REGION), vol[REGION])
    assert open_volume(tmp_path / "g.zarr", key="label").dtype == np.uint8
    with pytest.raises(VesuviusError, match=r"g\.zarr.*\['image', 'label'\].*key"):
        open_volume(tmp_path / "g.zarr")
    with pytest.raises(VesuviusError, match=r"g\.zarr.*'mask'"):
        open_volume(tmp_path / "g.zarr", key="mask")


def _write_ome(path, levels, fmt=2, leading=()):
    """OME-Zarr with one array per level, scale doubling per level (0.4 attrs for v2, 0.5 for v3)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    datasets = []
    for i, data in enumerate(levels):
        group.create_array(str(i), shape=leading + data.shape, chunks=leading + (4, 4, 4), dtype=data.dtype)[:] = (
            data.reshape(leading + data.shape))
        scale = [1.0] * len(leading) + [2.0 * 2**i, 0.5 * 2**i, 0.5 * 2**i]
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": scale},
            {"type": "translation", "translation": [0.0] * len(leading) + [10.0, 20.0, 30.0]}]})
    axes = [{"name": n} for n in "tczyx"[5 - len(leading) - 3:]]
    multiscales = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    group.attrs.update({"multiscales": multiscales} if fmt == 2 else {"ome": {"version": "0.5",
                                                                               "multiscales": multiscales}})


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_zarr_two_levels(tmp_path, vol, fmt, caplog):
    small = vol[::2, ::2, ::2].copy()
    _write_ome(tmp_path / "scroll.zarr", [vol, small], fmt=fmt)
    level0 = open_volume(tmp_path / "scroll.zarr")
    _check(level0, vol)
    assert level0.spacing == (2.0, 0.5, 0.5)
    np.testing.assert_allclose(level0.affine, [[0.5, 0, 0, 30], [0, 0.5, 0, 20], [0, 0, 2.0, 10], [0, 0, 0, 1]])
    with caplog.at_level(logging.WARNING):
        level1 = open_volume(tmp_path / "scroll.zarr", level=1, spacing=(7.0, 7.0, 7.0))
    assert level1.shape == (4, 5, 6)
    assert level1.spacing == (4.0, 1.0, 1.0)  # the file's, not the argument
    np.testing.assert_array_equal(level1.read(), small)
    with pytest.raises(VesuviusError, match=r"scroll\.zarr.*level=2.*2 levels"):
        open_volume(tmp_path / "scroll.zarr", level=2)


def test_ome_zarr_leading_singleton_axes(tmp_path, vol):
    _write_ome(tmp_path / "tc.zarr", [vol], leading=(1, 1))
    reader = open_volume(tmp_path / "tc.zarr")
    _check(reader, vol)
    assert reader.spacing == (2.0, 0.5, 0.5)


def test_npy_memmap(tmp_path, vol):
    np.save(tmp_path / "v.npy", vol)
    reader = open_volume(tmp_path / "v.npy", spacing=(2.0, 1.0, 0.5))
    assert isinstance(reader, NpyReader)
    _check(reader, vol)
    np.testing.assert_allclose(reader.affine, np.diag([0.5, 1.0, 2.0, 1.0]))
    out = reader.read(REGION)
    assert type(out) is np.ndarray and out.flags.writeable  # a real copy, not a view of the file


# ------------------------------------------------------------------------------------------ errors


def test_missing_and_unknown(tmp_path):
    with pytest.raises(VesuviusError, match=r"nothere\.tif.*not found"):
        open_volume(tmp_path / "nothere.tif")
    (tmp_path / "v.txt").write_text("hello")
    with pytest.raises(VesuviusError, match=r"v\.txt.*unknown volume format"):
        open_volume(tmp_path / "v.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VesuviusError, match="empty.*unknown volume format"):
        open_volume(tmp_path / "empty")


def test_corrupt_files_name_the_file(tmp_path, vol):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 30, 30)).astype(np.float32), np.eye(4)),
             str(tmp_path / "v.nii.gz"))
    packed = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(VesuviusError, match=r"cut\.nii\.gz"):
        open_volume(tmp_path / "cut.nii.gz").read()
    raw = gzip.decompress(packed)
    (tmp_path / "cut.nii").write_bytes(raw[:-1000])
    with pytest.raises(VesuviusError, match=r"cut\.nii.*truncated"):
        open_volume(tmp_path / "cut.nii")
    (tmp_path / "header_only.nii.gz").write_bytes(gzip.compress(raw[:352]))  # header, no data
    with pytest.raises(VesuviusError, match=r"header_only\.nii\.gz"):
        open_volume(tmp_path / "header_only.nii.gz").read()
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(VesuviusError, match=r"bad\.npy"):
        open_volume(tmp_path / "bad.npy")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(VesuviusError, match=r"bad\.tif"):
        open_volume(tmp_path / "bad.tif")


def test_corrupt_zarr_chunk_names_store_and_region(tmp_path, vol):
    array = zarr.create_array(str(tmp_path / "c.zarr"), shape=SHAPE, chunks=(4, 4, 4), dtype=vol.dtype,
                              zarr_format=2)
    array[:] = vol
    (tmp_path / "c.zarr" / "1.0.2").write_bytes(b"garbage bytes" * 4)  # z 4:8, y 0:4, x 8:12
    reader = open_volume(tmp_path / "c.zarr")
    np.testing.assert_array_equal(reader.read((slice(0, 4), slice(None), slice(None))), vol[:4])  # chunk untouched
    with pytest.raises(VesuviusError, match=r"c\.zarr.*z=3:6, y=0:2, x=9:11"):
        reader.read((slice(3, 6), slice(0, 2), slice(9, 11)))


def test_not_3d(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    with pytest.raises(VesuviusError, match=r"flat\.npy.*3D"):
        open_volume(tmp_path / "flat.npy")
    tifffile.imwrite(tmp_path / "page.tif", np.zeros((4, 5), np.uint8))
    with pytest.raises(VesuviusError, match=r"page\.tif.*3D"):
        open_volume(tmp_path / "page.tif")
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 2), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(VesuviusError, match=r"t\.nii\.gz.*3D"):
        open_volume(tmp_path / "t.nii.gz")
    zarr.create_array(str(tmp_path / "c.zarr"), shape=(2, 3, 4, 5), chunks=(1, 3, 4, 5), dtype="uint8")
    with pytest.raises(VesuviusError, match=r"c\.zarr.*3D"):
        open_volume(tmp_path / "c.zarr")


def test_bad_region_and_spacing(tmp_path, vol):
    np.save(tmp_path / "v.npy", vol)
    reader = open_volume(tmp_path / "v.npy")
    with pytest.raises(VesuviusError, match="step"):
        reader.read((slice(0, 4, 2), slice(None), slice(None)))
    with pytest.raises(VesuviusError, match="three slices"):
        reader.read((slice(0, 4), slice(None)))
    with pytest.raises(VesuviusError, match=r"v\.npy.*spacing"):
        open_volume(tmp_path / "v.npy", spacing=(1.0, -1.0, 1.0))


# ------------------------------------------------------------------------------------------ helpers


def test_block_grid_covers_every_voxel_once():
    shape = (37, 50, 61)
    hits = np.zeros(shape, dtype=np.int32)
    grid = block_grid(shape, (16, 16, 16))
    assert len(grid) == 3 * 4 * 4
    for _, region in grid:
        hits[region] += 1
    assert (hits == 1).all()
    assert grid[-1] == ((2, 3, 3), (slice(32, 37), slice(48, 50), slice(48, 61)))


class CountingReader(NpyReader):
    """Counts the voxels it reads."""

    voxels = 0

    def _read(self, region):
        data = super()._read(region)
        CountingReader.voxels += data.size
        return data


def test_sample_percentiles_small_volume_is_exact(tmp_path):
    data = np.random.default_rng(1).normal(100, 20, (10, 12, 14)).astype(np.float32)
    np.save(tmp_path / "v.npy", data)
    lo, hi = sample_percentiles(open_volume(tmp_path / "v.npy"), q=(5.0, 95.0))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(data.astype(np.float64), [5, 95])))


def test_sample_percentiles_large_volume_reads_bounded_voxels(tmp_path):
    # values 0..999 uniform, so the true 1st / 99th percentiles are ~10 and ~989
    data = np.random.default_rng(2).integers(0, 1000, (96, 100, 104), dtype=np.uint16)
    np.save(tmp_path / "v.npy", data)
    reader = CountingReader(tmp_path / "v.npy", None)
    CountingReader.voxels = 0
    lo, hi = sample_percentiles(reader, q=(1.0, 99.0), max_voxels=100_000)
    assert 0 < CountingReader.voxels <= 100_000
    assert lo == pytest.approx(10, abs=3) and hi == pytest.approx(989, abs=3)
    for region in sample_regions(data.shape, 100_000):
        assert all(0 <= s.start < s.stop <= d for s, d in zip(region, data.shape))


def test_sample_percentiles_rejects_nan_and_bad_q(tmp_path):
    data = np.ones((8, 8, 8), dtype=np.float32)
    data[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(VesuviusError, match=r"nan\.npy.*NaN"):
        sample_percentiles(open_volume(tmp_path / "nan.npy"))
    with pytest.raises(VesuviusError, match="q must"):
        sample_percentiles(open_volume(tmp_path / "nan.npy"), q=(99.0, 1.0))


def test_readers_survive_pickling(tmp_path, vol):
    """DataLoader workers receive readers by pickle; each must still read the same data."""
    import pickle

    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), str(tmp_path / "v.nii.gz"))
    tifffile.imwrite(tmp_path / "v.tif", vol, compression="zlib")
    np.save(tmp_path / "v.npy", vol)
    zarr.create_array(str(tmp_path / "v.zarr"), shape=SHAPE, chunks=(4, 4, 4), dtype=vol.dtype)[:] = vol
    for name in ("v.nii.gz", "v.tif", "v.npy", "v.zarr"):
        clone = pickle.loads(pickle.dumps(open_volume(tmp_path / name)))
        np.testing.assert_array_equal(clone.read(REGION), vol[REGION])
