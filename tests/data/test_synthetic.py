"""Tests for vesuvius_monai.data.synthetic: determinism, label semantics, geometry, image contrast, file output."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage
from skimage.filters import threshold_otsu

from vesuvius_monai.data.synthetic import SynthParams, make_fragment, write_synthetic_dataset
from vesuvius_monai.errors import VesuviusError

SMALL = SynthParams(shape=(32, 48, 40))
# Nearly flat, unwarped sheets: the label fraction must be thickness / (thickness + gap).
FLAT = dict(shape=(24, 64, 64), scroll_radius=(50.0, 50.0), warp_amplitude=0.0, compression_density=0.0,
            ignore_fraction=0.0)
# Noise-free image whose only intensity variation is the sheet profile.
CLEAN = dict(fibre_strength=0.0, sheet_density_jitter=0.0, air_noise_std=0.0, speck_density=0.0,
             noise_std=0.0, drift_strength=0.0, ignore_fraction=0.0)


@pytest.fixture(scope="module")
def default_fragment() -> tuple[np.ndarray, np.ndarray]:
    """One 96^3 fragment with default params."""
    return make_fragment(0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays."""
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    image_a, label_a = make_fragment(5, SMALL)
    image_b, label_b = make_fragment(5, SMALL)
    assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
    image_c, label_c = make_fragment(6, SMALL)
    assert not np.array_equal(label_a, label_c)
    assert np.mean(image_a != image_c) > 0.5
    tuple_0, _ = make_fragment((5, 0), SMALL)
    tuple_1, _ = make_fragment((5, 1), SMALL)
    assert np.mean(tuple_0 != tuple_1) > 0.5


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_shapes_and_dtypes(dtype: str) -> None:
    image, label = make_fragment(1, dataclasses.replace(SMALL, dtype=dtype))
    assert image.shape == label.shape == (32, 48, 40)
    assert image.dtype == np.dtype(dtype) and label.dtype == np.uint8
    # the image uses a good part of the dtype's range (intensities are fractions of full scale)
    assert image.max() > 0.5 * np.iinfo(dtype).max


def test_label_values_and_custom_ignore_index() -> None:
    _, label = make_fragment(2, SMALL)
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    _, label7 = make_fragment(2, dataclasses.replace(SMALL, ignore_index=7))
    assert set(np.unique(label7).tolist()) == {0, 1, 7}
    assert np.array_equal(label7 == 7, label == 2)


def test_ignore_boxes_cover_a_few_percent_and_leave_the_image_alone() -> None:
    for seed in range(4):
        image, label = make_fragment(seed, SMALL)
        fraction = np.mean(label == 2)
        assert 0.04 <= fraction <= 0.10, (seed, fraction)
        # the boxes are drawn last: without them the image is identical and the label differs only inside
        image_free, label_free = make_fragment(seed, dataclasses.replace(SMALL, ignore_fraction=0.0))
        assert np.array_equal(image, image_free)
        assert set(np.unique(label_free).tolist()) == {0, 1}
        outside = label != 2
        assert np.array_equal(label[outside], label_free[outside])
        assert 0 < label_free[~outside].mean() < 1  # the boxes hide ordinary sheets and gaps


@pytest.mark.parametrize(("thickness", "gap"), [(5.0, 4.0), (3.0, 6.0)])
def test_flat_sheets_label_fraction_is_thickness_over_pitch(thickness: float, gap: float) -> None:
    params = SynthParams(sheet_thickness=thickness, sheet_gap=gap, **FLAT)
    fractions = [np.mean(make_fragment(seed, params)[1] == 1) for seed in range(3)]
    assert np.allclose(fractions, thickness / (thickness + gap), atol=0.02), fractions


def test_flat_sheets_are_as_thick_as_asked() -> None:
    """The largest inscribed half-thickness of flat sheets is thickness / 2 (up to voxelisation)."""
    for thickness in (4.0, 7.0):
        _, label = make_fragment(3, SynthParams(sheet_thickness=thickness, sheet_gap=5.0, **FLAT))
        inner = ndimage.distance_transform_edt(label == 1)[:, 8:-8, 8:-8]  # away from the borders
        assert thickness / 2 - 0.5 <= inner.max() <= thickness / 2 + 1.0, (thickness, inner.max())


def test_compressed_regions_make_adjacent_sheets_touch() -> None:
    """Flat sheets are separate slabs; strong compressions merge neighbours and pinch gaps into pockets."""
    flat = SynthParams(**FLAT)  # no compressions
    squeezed = dataclasses.replace(flat, compression_density=40.0, compression_strength=1.0)
    for seed in range(2):
        plain = make_fragment(seed, flat)[1]
        merged = make_fragment(seed, squeezed)[1]
        assert ndimage.label(merged == 1)[1] < ndimage.label(plain == 1)[1]
        assert ndimage.label(merged == 0)[1] > ndimage.label(plain == 0)[1]


def test_default_foreground_fraction_and_thin_sheets(default_fragment: tuple[np.ndarray, np.ndarray]) -> None:
    _, label = default_fragment
    sheet = label == 1
    assert 0.35 <= sheet[label != 2].mean() <= 0.65
    # sheets are ~5 voxels thick: a radius-3 ball (7 voxels across) fits almost nowhere, radius 1 mostly does
    ball3 = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), 3)
    assert ndimage.binary_erosion(sheet, ball3).sum() < 0.1 * sheet.sum()
    assert ndimage.binary_erosion(sheet).sum() > 0.25 * sheet.sum()


def test_sheets_are_brighter_than_gaps(default_fragment: tuple[np.ndarray, np.ndarray]) -> None:
    image, label = default_fragment
    inside = image[label == 1].astype(float).mean()
    outside = image[label == 0].astype(float).mean()
    assert inside - outside > 0.2 * 255, (inside, outside)


def test_label_edge_is_the_half_maximum_of_the_clean_image() -> None:
    """Without texture, noise or drift, thresholding midway between air and papyrus recovers the label."""
    params = SynthParams(shape=(32, 64, 64), **CLEAN)
    for seed in range(2):
        image, label = make_fragment(seed, params)
        middle = (params.air_intensity + params.sheet_intensity) / 2 * 255
        assert dice(image > middle, label == 1) > 0.97


def test_smoothed_threshold_gives_a_moderate_dice(default_fragment: tuple[np.ndarray, np.ndarray]) -> None:
    """Learnable but not trivial: an Otsu threshold of the smoothed image scores Dice 0.6-0.9."""
    image, label = default_fragment
    valid = label != 2
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    prediction = smooth > threshold_otsu(smooth[valid])
    score = dice(prediction & valid, (label == 1) & valid)
    assert 0.6 <= score <= 0.9, score


@pytest.mark.parametrize("fmt", ["nii.gz", "nii"])
def test_write_nifti_round_trip(tmp_path, fmt: str) -> None:
    params = dataclasses.replace(SMALL, spacing=(2.0, 0.5, 0.75), dtype="uint16")
    pairs = write_synthetic_dataset(tmp_path / "synth", 2, seed=11, params=params, fmt=fmt)
    assert [p.name for p, _ in pairs] == [f"frag_000.{fmt}", f"frag_001.{fmt}"]
    for i, (image_path, label_path) in enumerate(pairs):
        assert image_path.parent.name == "images" and label_path.parent.name == "labels"
        expected_image, expected_label = make_fragment((11, i), params)
        for path, expected in ((image_path, expected_image), (label_path, expected_label)):
            img = nib.load(str(path))
            assert img.shape == (40, 48, 32)  # file axes (x, y, z)
            assert np.allclose(img.header.get_zooms()[:3], (0.75, 0.5, 2.0))
            assert np.allclose(img.affine, np.diag([0.75, 0.5, 2.0, 1.0]))
            data = np.asarray(img.dataobj)
            assert data.dtype == expected.dtype
            assert np.array_equal(np.transpose(data), expected)
    assert not np.array_equal(make_fragment((11, 0), params)[1], make_fragment((11, 1), params)[1])
    leftovers = [p for p in (tmp_path / "synth").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_synth_yaml_records_n_seed_and_params(tmp_path) -> None:
    params = dataclasses.replace(SMALL, noise_std=0.05, spacing=(1.5, 1.0, 1.0))
    write_synthetic_dataset(tmp_path, 1, seed=4, params=params)
    record = yaml.safe_load((tmp_path / "synth.yaml").read_text())
    assert record["n"] == 1 and record["seed"] == 4 and record["fmt"] == "nii.gz"
    assert SynthParams(**record["params"]) == params


def test_write_tif_round_trip(tmp_path) -> None:
    params = dataclasses.replace(SMALL, spacing=(2.0, 0.5, 0.5))
    (image_path, label_path), = write_synthetic_dataset(tmp_path, 1, seed=3, params=params, fmt="tif")
    expected_image, expected_label = make_fragment((3, 0), params)
    assert np.array_equal(tifffile.imread(image_path), expected_image)
    assert np.array_equal(tifffile.imread(label_path), expected_label)
    with tifffile.TiffFile(image_path) as tif:
        assert len(tif.pages) == 32
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [
    dict(sheet_thickness=0.0), dict(sheet_gap=float("nan")), dict(dtype="float32"), dict(shape=(4, 16, 16)),
    dict(shape=(16, 16)), dict(ignore_index=1), dict(spacing=(1.0, -1.0, 1.0)), dict(scroll_radius=(2.0, 1.0)),
    dict(noise_std=-0.1), dict(ignore_fraction=0.8),
])
def test_bad_params_raise_vesuvius_error(bad: dict) -> None:
    with pytest.raises(VesuviusError, match=rf"'synth\.params\.{next(iter(bad))}'"):
        SynthParams(**bad)


def test_params_accept_lists() -> None:
    params = SynthParams(shape=[16, 20, 24], spacing=[1, 2, 3])
    assert params.shape == (16, 20, 24) and params.spacing == (1, 2, 3)
    assert make_fragment(0, params)[0].shape == (16, 20, 24)


def test_bad_write_arguments_raise_vesuvius_error(tmp_path) -> None:
    with pytest.raises(VesuviusError, match="fmt"):
        write_synthetic_dataset(tmp_path, 1, fmt="png")
    with pytest.raises(VesuviusError, match="n "):
        write_synthetic_dataset(tmp_path, 0)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(VesuviusError, match="existing file"):
        write_synthetic_dataset(not_a_dir, 1)


@pytest.mark.parametrize("seed", [-1, 1.5, (), (1, -2), "0"])
def test_bad_seed_raises_vesuvius_error(seed: object) -> None:
    with pytest.raises(VesuviusError, match="seed"):
        make_fragment(seed, SMALL)  # type: ignore[arg-type]


def test_a_fragment_too_large_for_memory_is_refused_naming_the_key(tmp_path) -> None:
    from vesuvius_monai.cli import main

    root = tmp_path / "data"
    assert main(["synth", f"data.root={root}", "synth.params.shape=[100000,100000,100000]"]) == 2
    assert not root.exists()
    with pytest.raises(VesuviusError, match=r"synth\.params\.shape \[100000, 100000, 100000\] needs at least"):
        make_fragment(0, SynthParams(shape=(100000, 100000, 100000)))
