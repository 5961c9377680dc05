"""Tests for bench/families.py: determinism, label values, each family's defining property, writing."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from families import (FAMILIES, FAMILY_NAMES, GENERATORS, SplitCounts, check_families, make_family_fragment,
                      measure_fragment, merged_fraction, read_family_info, ridge_widths, write_families)
from vesuvius_monai.config import DataConfig, SynthParams
from vesuvius_monai.data.dataset import load_splits
from vesuvius_monai.data.folded import FoldedParams, make_folded_fragment
from vesuvius_monai.data.synthetic import make_fragment
from vesuvius_monai.errors import VesuviusError

SHAPE = (64, 64, 64)


def test_fragments_are_deterministic_and_differ_by_index_and_seed() -> None:
    for family in ("packed", "ignore"):
        for index in (0, 1):  # both generators
            a = make_family_fragment(family, index, shape=(24, 32, 28))
            b = make_family_fragment(family, index, shape=(24, 32, 28))
            assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
            other = make_family_fragment(family, index, seed=1, shape=(24, 32, 28))
            assert np.mean(a[0] != other[0]) > 0.5
    generators = [make_family_fragment("thin", i, shape=(16, 16, 16))[2] for i in (0, 1)]
    assert generators[0] != generators[1]  # the generators alternate


def test_family_fragments_are_not_demo_fragments() -> None:
    demo, _ = make_fragment((0, 0), SynthParams(shape=(24, 24, 24)))
    image, _, _ = make_family_fragment("ignore", 1, shape=(24, 24, 24))  # a spiral fragment with demo-like params
    assert not np.array_equal(demo, image)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_label_values_dtype_and_shape(family: str) -> None:
    for index in (0, 1):
        image, label, generator = make_family_fragment(family, index, shape=(20, 28, 36))
        assert image.shape == label.shape == (20, 28, 36) and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any() and (label == 0).any()
        assert image.dtype == (np.uint8 if generator == "spiral" else np.uint16)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7])
def test_ridge_widths_of_slabs(width: int) -> None:
    """A slab of odd width T measures T; an even one T - 1 (documented)."""
    mask = np.zeros((30, 30, 30), bool)
    mask[:, :, 10:10 + width] = True
    widths = ridge_widths(mask, np.zeros_like(mask))
    expected = width if width % 2 else width - 1
    assert np.allclose(np.median(widths), expected)


def test_merged_fraction_sees_touching_slabs() -> None:
    apart = np.zeros((30, 30, 40), bool)
    apart[:, :, 5:10] = apart[:, :, 13:18] = True
    touching = apart.copy()
    touching[:, :, 10:13] = True  # the gap closed: one slab of 13
    none = np.zeros_like(apart)
    assert merged_fraction(apart, none, 5.0) == 0.0
    assert merged_fraction(touching, none, 5.0) > 0.2


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str], dict[str, float]]:
    """Measured properties of each family's fragments 0 and 1 (one per generator) and of the generators' defaults."""
    out = {("default", "spiral"): measure_fragment(*make_fragment((0, 99), SynthParams(shape=SHAPE))),
           ("default", "folded"): measure_fragment(*make_folded_fragment((0, 99), FoldedParams(shape=SHAPE)))}
    for family in FAMILY_NAMES:
        for index in (0, 1):
            image, label, generator = make_family_fragment(family, index, shape=SHAPE)
            out[(family, generator)] = measure_fragment(image, label)
    return out


# the family's property relative to the same generator's default fragment, and an absolute bound
CHECKS = {
    "packed": lambda v, d: v["gap"] <= 1.8 and v["gap"] < 0.7 * d["gap"],
    "touching": lambda v, d: v["merged_fraction"] >= 0.015 and v["merged_fraction"] > d["merged_fraction"] + 0.01,
    "thin": lambda v, d: v["thickness"] <= 2.5 and v["thickness"] < 0.8 * d["thickness"],
    "low_contrast": lambda v, d: v["cnr"] < 0.3 * d["cnr"],
    "fibre": lambda v, d: v["core_cov"] > 1.3 * d["core_cov"],
    "ignore": lambda v, d: v["ignore_fraction"] >= 0.1 and v["ignore_fraction"] > 2 * d["ignore_fraction"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("generator", GENERATORS)
def test_each_family_has_its_defining_property(measured, family: str, generator: str) -> None:
    value, default = measured[(family, generator)], measured[("default", generator)]
    prop = FAMILIES[family].property
    assert CHECKS[family](value, default), f"{family}/{generator}: {prop} {value[prop]:.3f} vs {default[prop]:.3f}"


def test_check_families_names_the_closest() -> None:
    with pytest.raises(VesuviusError, match="packed"):
        check_families(["packd"])
    with pytest.raises(VesuviusError, match="distinct"):
        check_families(["thin", "thin"])


def test_write_families_splits_reuse_and_refusal(tmp_path) -> None:
    counts = SplitCounts(train=2, val=1, test=2)
    dataset = write_families(tmp_path / "bench", ["packed", "thin"], shape=(16, 24, 24), counts=counts)
    raw = yaml.safe_load(dataset.read_text())
    info = read_family_info(dataset)
    assert len(raw["fragments"]) == len(info) == 10
    for family in ("packed", "thin"):
        mine = {i: v for i, v in info.items() if v["family"] == family}
        test = [v for v in mine.values() if v["split"] == "test"]
        assert len(test) == 2 and {v["generator"] for v in test} == set(GENERATORS)  # held out from both generators
        assert sum(v["split"] == "train" for v in mine.values()) == 2
    splits = load_splits(DataConfig(dataset=str(dataset)))
    assert {f.id.split("_")[0] for f in splits["train"]} == {"packed", "thin"}  # the train split mixes families
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 4]
    for fragment in splits["test"]:
        label = fragment.label.read()
        assert set(np.unique(label)) <= {0, 1, 2}
    stamp = dataset.stat().st_mtime_ns
    assert write_families(tmp_path / "bench", ["packed", "thin"], shape=(16, 24, 24), counts=counts) == dataset
    assert dataset.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(VesuviusError, match="other settings"):
        write_families(tmp_path / "bench", ["packed", "thin"], seed=1, shape=(16, 24, 24), counts=counts)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(VesuviusError, match="did not write"):
        write_families(tmp_path / "foreign", ["thin"], shape=(16, 24, 24), counts=counts)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
