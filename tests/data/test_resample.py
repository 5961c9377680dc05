"""vesuvius-monai resample: nnU-Net's shape rule, interpolation checked by hand, the grid kept, and the explicit
path around the nnU-Net spacing refusal (to the plan's spacing, predict, probabilities back onto the scan)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import error_line
from vesuvius_monai.cli import main
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.data.resample import resample_array, resample_file, resampled_affine, target_shape
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import spacing_to_affine, write_nifti

shapes = st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(2, 12))


def test_target_shape_is_nnunets_rule():
    assert target_shape((100, 51, 7), (0.5, 2.0, 1.0), (1.0, 1.0, 1.0)) == (50, 102, 7)
    assert target_shape((3, 3, 3), (1, 1, 1), (10, 10, 10)) == (1, 1, 1)  # never empty


@settings(max_examples=30, deadline=None)
@given(shapes, shapes, st.integers(0, 2**16))
def test_linear_interpolation_equals_the_ramp_at_the_mapped_coordinates(old, new, seed):
    """Order 1 on a volume linear in z, y and x gives, at new voxel i, the ramp at old coordinate
    (i + 0.5) * old / new - 0.5, clamped to the volume (edge mode): checked by hand on random shapes."""
    slopes = np.random.default_rng(seed).normal(size=3)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in old), indexing="ij")
    ramp = sum(s * g for s, g in zip(slopes, grids)).astype(np.float32)
    coords = [np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1) for n, m in zip(old, new)]
    mapped = np.meshgrid(*coords, indexing="ij")
    expected = sum(s * g for s, g in zip(slopes, mapped))
    np.testing.assert_allclose(resample_array(ramp, new, 1), expected, rtol=0, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(shapes, shapes, st.sampled_from([0, 1, 3]), st.integers(0, 2**16))
def test_values_labels_and_dtypes_survive(old, new, order, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, old).astype(np.uint8)
    out = resample_array(labels, new, 0)
    assert out.shape == new and out.dtype == np.uint8 and set(np.unique(out)) <= set(np.unique(labels))
    constant = np.full(old, 0.25, np.float32)
    np.testing.assert_allclose(resample_array(constant, new, order), 0.25, atol=1e-6)
    assert resample_array(rng.integers(0, 255, old).astype(np.uint8), new, order).dtype == np.uint8


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_])
@pytest.mark.parametrize("order", [1, 3])
def test_integer_extremes_never_wrap(dtype, order):
    info = np.iinfo(dtype) if dtype is not np.bool_ else None
    values = [False, True] if info is None else [info.min, info.max, info.max - 1, 0 if info.min == 0 else -1]
    array = np.resize(np.array(values, dtype=dtype), (4, 4, 4))
    out = resample_array(array, (7, 5, 9), order)
    assert out.dtype == dtype
    if info is not None:  # cubic overshoot is clipped into the range, never wrapped to the other end
        assert out.max() <= info.max and out.min() >= info.min and out.max() > info.max // 2
    constant = np.full((4, 4, 4), info.max if info else True, dtype=dtype)
    got = resample_array(constant, (5, 3, 6), order)
    if info is None or info.bits <= 32:
        assert (got == constant.flat[0]).all()  # exact up to 32 bits (float64 holds them)
    else:  # 64 bits: within float64's precision, below the maximum (no wrap)
        assert (got <= info.max).all() and (info.max - got.astype(np.float64) <= 2.0**-50 * float(info.max)).all()


def _oblique(spacing_xyz, origin) -> np.ndarray:
    """A NIfTI affine: axes rotated 30 degrees about z, x flipped, voxel sizes ``spacing_xyz``."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rotation = np.array([[-c, -s, 0], [-s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(spacing_xyz)
    affine[:3, 3] = origin
    return affine


def test_oblique_affine_keeps_every_corner_when_the_shapes_divide():
    old = _oblique((2.0, 1.0, 0.5), (10.0, -3.0, 7.0))  # spacing (z, y, x) = (0.5, 1, 2)
    new = resampled_affine(old, (8, 6, 4), (4, 3, 8), (1.0, 2.0, 1.0))
    for ijk in itertools.product(*((-0.5, n - 0.5) for n in (4, 6, 8))):  # old corners, x first
        new_ijk = [(v + 0.5) * m / n - 0.5 for v, n, m in zip(ijk, (4, 6, 8), (8, 3, 4))]
        np.testing.assert_allclose(new @ [*new_ijk, 1], old @ [*ijk, 1], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), [1.0, 2.0, 1.0])  # x, y, z voxel sizes


def test_like_a_volume_elsewhere_is_refused(tmp_path):
    scan = _volume(tmp_path / "scan.nii.gz", np.ones((6, 6, 6), np.float32), (1.0, 1.0, 1.0))
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[:3, 3] = (20.0, 0.0, 0.0)
    write_nifti(tmp_path / "elsewhere.nii.gz", np.ones((6, 6, 6), np.float32), affine=shifted)
    with pytest.raises(VesuviusError, match="covers another region"):
        resample_file(scan, tmp_path / "out.nii.gz", like=tmp_path / "elsewhere.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_affine_keeps_the_extent_and_orientation():
    flip = np.diag([-2.0, 1.0, 0.5, 1.0])  # x reversed; spacing (z, y, x) = (0.5, 1, 2)
    flip[:3, 3] = (10.0, -3.0, 7.0)
    new = resampled_affine(flip, (8, 6, 4), (4, 6, 8), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(np.abs(np.diag(new)[:3]), [1.0, 1.0, 1.0])
    assert new[0, 0] < 0  # still reversed in x
    for axis, (old_n, new_n) in enumerate(zip((4, 6, 8), (8, 6, 4))):  # x, y, z: the first corner stays put
        corner_old = flip[:3, :3] @ np.eye(3)[axis] * -0.5
        corner_new = new[:3, :3] @ np.eye(3)[axis] * -0.5
        shift = new[:3, 3] - flip[:3, 3]
        np.testing.assert_allclose((corner_new + shift)[axis], corner_old[axis], atol=1e-9)


def _volume(path, array, spacing):
    write_nifti(path, array, affine=spacing_to_affine(spacing))
    return path


def test_round_trip_returns_to_the_scans_grid(tmp_path):
    scan = _volume(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((10, 13, 9)).astype(np.float32),
                   (1.0, 0.5, 0.5))
    coarse = resample_file(scan, tmp_path / "coarse.nii.gz", spacing=(2.0, 1.0, 1.0))
    reader = open_volume(coarse)
    assert reader.shape == (5, 6, 4) and reader.spacing == (2.0, 1.0, 1.0)
    back = open_volume(resample_file(coarse, tmp_path / "back.nii.gz", like=scan, order=1))
    original = open_volume(scan)
    assert back.shape == original.shape and back.spacing == original.spacing
    np.testing.assert_allclose(back.affine, original.affine)


def test_bad_requests_are_refused_and_nothing_is_overwritten(tmp_path, capsys):
    scan = _volume(tmp_path / "scan.nii.gz", np.ones((4, 4, 4), np.float32), (1.0, 1.0, 1.0))
    theirs = tmp_path / "theirs.nii.gz"
    _volume(theirs, np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0))
    before = theirs.read_bytes()
    cases = [(["--spacing", "1", "0", "1"], "--spacing must be three positive"),
             (["--spacing", "1", "1", "1", "--output", str(tmp_path / "out.zarr")], "written as NIfTI"),
             ([], "one of --spacing"),
             (["--spacing", "1", "1", "1", "--output", str(scan)], "is the --input"),
             (["--spacing", "1", "1", "1", "--output", str(theirs)], "was not written by predict")]
    for extra, message in cases:
        argv = ["resample", "--input", str(scan), *extra]
        if "--output" not in extra:
            argv += ["--output", str(tmp_path / "out.nii.gz")]
        assert main(argv) == 2
        assert message in error_line(capsys)
    assert theirs.read_bytes() == before and not (tmp_path / "out.nii.gz").exists()
    nan = _volume(tmp_path / "nan.nii.gz", np.full((3, 3, 3), np.nan, np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(VesuviusError, match="NaN"):
        resample_file(nan, tmp_path / "o.nii.gz", spacing=(2.0, 2.0, 2.0))


def test_nnunet_spacing_refusal_names_the_way_round_it(tmp_path, capsys):
    from tests.nnunet_folder import write_folder

    folder, _ = write_folder(tmp_path / "m")  # plan spacing (2, 1, 1)
    scan = _volume(tmp_path / "scan.nii.gz", np.random.default_rng(1).uniform(0, 255, (20, 17, 18)).astype(
        np.float32), (1.0, 1.0, 1.0))
    args = ["infer.device=cpu", "infer.out_dtype=float32"]
    assert main(["predict", "--checkpoint", str(folder), "--input", str(scan), "--output",
                 str(tmp_path / "p.nii.gz"), *args]) == 2
    assert "vesuvius-monai resample" in error_line(capsys)
    planned = tmp_path / "planned.nii.gz"
    assert main(["resample", "--input", str(scan), "--like", str(folder), "--output", str(planned)]) == 0
    assert open_volume(planned).spacing == (2.0, 1.0, 1.0) and open_volume(planned).shape == (10, 17, 18)
    assert main(["predict", "--checkpoint", str(folder), "--input", str(planned), "--output",
                 str(tmp_path / "p.nii.gz"), *args]) == 0
    assert main(["resample", "--input", str(tmp_path / "p.nii.gz"), "--like", str(scan), "--order", "1",
                 "--output", str(tmp_path / "probs.nii.gz")]) == 0
    probs = open_volume(tmp_path / "probs.nii.gz")
    assert probs.shape == (20, 17, 18) and probs.spacing == (1.0, 1.0, 1.0)
    values = probs.read()
    assert values.min() >= 0 and values.max() <= 1  # linear interpolation of probabilities stays in [0, 1]
