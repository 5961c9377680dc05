"""Prediction Zarr store: encoding, OME metadata, chunking, completion markers, reopening."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.zarr_store import PredictionStore, decode_probabilities, encode_probabilities


def test_uint8_encoding_by_hand():
    probs = np.array([0.0, 0.5, 1.0, 1.2, -0.1, 0.002, 0.998], dtype=np.float32)
    np.testing.assert_array_equal(encode_probabilities(probs, "uint8"), [0, 128, 255, 255, 0, 1, 254])
    np.testing.assert_allclose(decode_probabilities(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0], atol=1e-7)
    assert encode_probabilities(probs, "float16").dtype == np.float16
    with pytest.raises(VesuviusError, match="dtype"):
        encode_probabilities(probs, "int32")


def test_create_metadata_and_chunks(tmp_path):
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [3.0, 4.0, 5.0]  # (x, y, z) origin
    store = PredictionStore.create(tmp_path / "p.zarr", (10, 20, 7), block_size=(4, 8, 16), dtype="float16",
                                   affine=affine, meta={"source": "scan.zarr"})
    assert store.array.shape == (10, 20, 7)
    assert store.array.chunks == (4, 8, 7)  # the x block is larger than the volume
    assert store.array.dtype == np.float16
    assert store.meta == {"source": "scan.zarr", "dtype": "float16", "complete": False}
    reader = open_volume(tmp_path / "p.zarr")  # OME metadata understood by the generic reader
    assert reader.spacing == (2.0, 1.0, 0.5)
    np.testing.assert_allclose(reader.affine, affine)
    np.testing.assert_allclose(PredictionStore.open(tmp_path / "p.zarr").affine, affine)
    np.testing.assert_array_equal(reader.read(), 0)


def test_blocks_marked_only_after_write(tmp_path):
    store = PredictionStore.create(tmp_path / "p.zarr", (8, 8, 8), block_size=(4, 4, 4))
    region = (slice(4, 8), slice(0, 4), slice(4, 8))
    store.write_block((1, 0, 1), region, np.full((4, 4, 4), 0.4, np.float32))
    assert store.is_done((1, 0, 1)) and not store.is_done((0, 0, 0))
    assert store.done_blocks() == {(1, 0, 1)}

    class FailingArray:
        dtype = np.dtype("uint8")

        def __setitem__(self, key, value):
            raise OSError("disk full")

    store.array = FailingArray()
    with pytest.raises(OSError):
        store.write_block((0, 0, 0), (slice(0, 4),) * 3, np.ones((4, 4, 4), np.float32))
    assert not store.is_done((0, 0, 0))

    reopened = PredictionStore.open(tmp_path / "p.zarr")
    assert reopened.done_blocks() == {(1, 0, 1)}
    stored = zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r")[:]
    assert stored.dtype == np.uint8
    assert (stored[region] == 102).all() and stored.sum() == 102 * 64  # round(0.4 * 255) = 102
    np.testing.assert_allclose(reopened.read_probabilities(region), 0.4, atol=0.5 / 255)


def test_mark_complete(tmp_path):
    store = PredictionStore.create(tmp_path / "p.zarr", (4, 4, 4), block_size=(4, 4, 4))
    store.write_block((0, 0, 0), (slice(0, 4),) * 3, np.zeros((4, 4, 4), np.float32))
    store.mark_complete()
    assert store.meta["complete"] is True
    assert not (tmp_path / "p.zarr" / ".blocks_done").exists()
    assert PredictionStore.open(tmp_path / "p.zarr", mode="r").meta["complete"] is True


def test_errors(tmp_path):
    PredictionStore.create(tmp_path / "p.zarr", (4, 4, 4), block_size=(2, 2, 2))
    with pytest.raises(VesuviusError, match=r"p\.zarr.*exists"):
        PredictionStore.create(tmp_path / "p.zarr", (4, 4, 4), block_size=(2, 2, 2))
    with pytest.raises(VesuviusError, match="dtype"):
        PredictionStore.create(tmp_path / "q.zarr", (4, 4, 4), block_size=(2, 2, 2), dtype="int8")
    zarr.create_array(str(tmp_path / "other.zarr"), shape=(2, 2, 2), dtype="uint8")
    with pytest.raises(VesuviusError, match=r"other\.zarr"):
        PredictionStore.open(tmp_path / "other.zarr")
    with pytest.raises(VesuviusError, match=r"missing\.zarr"):
        PredictionStore.open(tmp_path / "missing.zarr")
