"""NIfTI writer/reader: axis order, affine pass-through, zooms, atomic writes, clear errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

import vesuvius_monai.io.nifti as nifti
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import read_nifti, read_nifti_header_spacing, write_nifti

# x -> world -z (2 mm), y -> world y (1.5 mm), z -> world x (0.5 mm): a permuted, flipped, anisotropic affine
ODD_AFFINE = np.array([[0, 0, 0.5, 10], [0, 1.5, 0, 5], [-2.0, 0, 0, -3], [0, 0, 0, 1]])


def _zyx(shape=(3, 4, 5)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def test_write_reverses_axes_and_keeps_affine(tmp_path):
    array = _zyx()
    path = write_nifti(tmp_path / "a.nii.gz", array, affine=ODD_AFFINE)
    img = nib.load(str(path))  # independent reader
    assert img.shape == (5, 4, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), array.transpose(2, 1, 0))
    assert np.asarray(img.dataobj)[4, 1, 2] == array[2, 1, 4]
    np.testing.assert_allclose(img.affine, ODD_AFFINE)
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 1.5, 0.5))  # column norms, i.e. (x, y, z)
    assert img.get_data_dtype() == np.int16


def test_spacing_gives_diagonal_affine_and_zooms(tmp_path):
    path = write_nifti(tmp_path / "s.nii", _zyx(), spacing=(3.0, 2.0, 0.5))
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, np.diag([0.5, 2.0, 3.0, 1.0]))
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 2.0, 3.0))
    assert read_nifti_header_spacing(path) == (3.0, 2.0, 0.5)


def test_read_nifti_of_file_written_by_nibabel(tmp_path):
    data_xyz = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data_xyz, ODD_AFFINE), str(tmp_path / "n.nii.gz"))
    array, affine = read_nifti(tmp_path / "n.nii.gz")
    assert array.shape == (4, 3, 2)
    assert array[3, 2, 1] == data_xyz[1, 2, 3]
    np.testing.assert_allclose(affine, ODD_AFFINE)


def test_dtype_cast_and_bool(tmp_path):
    probs = np.full((2, 2, 2), 0.25, dtype=np.float64)
    assert nib.load(str(write_nifti(tmp_path / "f.nii", probs, dtype="float32"))).get_data_dtype() == np.float32
    mask = np.zeros((2, 3, 4), dtype=bool)
    mask[1, 2, 3] = True
    img = nib.load(str(write_nifti(tmp_path / "m.nii.gz", mask)))
    assert img.get_data_dtype() == np.uint8
    assert np.asarray(img.dataobj)[3, 2, 1] == 1 and np.asarray(img.dataobj).sum() == 1


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.nii.gz"
    write_nifti(target, _zyx())
    before = target.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", broken_save)
    with pytest.raises(OSError):
        write_nifti(target, _zyx() * 2)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(array_zyx=np.zeros((2, 2))), "3D"),
        (dict(array_zyx=np.zeros((2, 2, 2)), affine=np.eye(3)), "4x4"),
        (dict(array_zyx=np.zeros((2, 2, 2)), affine=np.zeros((4, 4))), "singular"),
        (dict(array_zyx=np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0)), "spacing"),
        (dict(array_zyx=np.full((2, 2, 2), np.nan), dtype="uint8"), "NaN"),
        (dict(array_zyx=np.zeros((2, 2, 2)), affine=np.eye(4), spacing=(2.0, 1.0, 1.0)), "disagrees"),
    ],
)
def test_write_errors_name_the_file(tmp_path, kwargs, fragment):
    with pytest.raises(VesuviusError, match=fragment) as info:
        write_nifti(tmp_path / "bad.nii.gz", **kwargs)
    assert "bad.nii.gz" in str(info.value)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_wrong_suffix(tmp_path):
    with pytest.raises(VesuviusError, match=r"out\.nrrd.*\.nii"):
        write_nifti(tmp_path / "out.nrrd", np.zeros((2, 2, 2)))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(VesuviusError, match="nope.nii.gz.*not found"):
        read_nifti(tmp_path / "nope.nii.gz")
    good = write_nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    raw = gzip.decompress(good.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(VesuviusError, match="cut.nii.gz"):
        read_nifti(cut)
    short = tmp_path / "short.nii"
    short.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(VesuviusError, match="short.nii.*truncated"):
        read_nifti(short)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(VesuviusError, match="garbage.nii"):
        read_nifti(garbage)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    import numpy as np

    from vesuvius_monai.io.nifti import write_nifti

    path = write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.uint8))
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
