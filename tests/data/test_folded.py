"""Tests for vesuvius_monai.data.folded: the folded-sheet generator's geometry and unlabeled sheets."""

from __future__ import annotations

import pytest

from vesuvius_monai.data.folded import FoldedParams, make_folded_fragment
from vesuvius_monai.errors import VesuviusError


def test_folded_geometry_flat_stack_has_the_set_thickness_and_gap() -> None:
    """Without folds, squeeze, jitter, holes or ends, the labelled share is thickness / (thickness + gap)."""
    flat = FoldedParams(shape=(40, 40, 40), fold_amplitude=0, fold_height=0, squeeze=0, gap_jitter=0,
                        thickness_jitter=0, hole_fraction=0, end_probability=0, ignore_blob_fraction=0)
    for thickness, gap in ((5.0, 3.0), (3.0, 5.0)):
        params = FoldedParams(**{**flat.__dict__, "sheet_thickness": thickness, "sheet_gap": gap})
        _, label = make_folded_fragment(3, params)
        assert abs((label == 1).mean() - thickness / (thickness + gap)) < 0.03


def test_folded_ignore_sheets_cover_whole_sheets() -> None:
    params = FoldedParams(shape=(40, 40, 40), ignore_sheet_fraction=1.0, ignore_blob_fraction=0.0)
    _, label = make_folded_fragment(0, params)
    assert (label == 2).all()
    with pytest.raises(VesuviusError, match="folded.squeeze"):
        FoldedParams(squeeze=1.5)
