"""``predict --mask mask.zarr`` with a .zarr probability output: the post-processed mask as a Zarr store."""

import numpy as np
import pytest
import zarr

from vesuvius_monai.config import config_from_raw
from vesuvius_monai.data.synthetic import SynthParams, make_fragment
from vesuvius_monai.engine.predict import predict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.postprocess import postprocess

OVERRIDES = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32", "postprocess.close_radius=[1,1,1]",
             "postprocess.plug_holes=true"]


@pytest.mark.slow
def test_predict_writes_a_zarr_mask(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.pt"
    cfg = config_from_raw(Checkpoint.load(checkpoint).config, OVERRIDES)
    volume = tmp_path / "scan.npy"
    np.save(volume, make_fragment(7, SynthParams(shape=(24, 30, 40)))[0])
    out, mask = tmp_path / "p.zarr", tmp_path / "m.zarr"
    predict(cfg, checkpoint, volume, out, mask_output=mask)
    probs = PredictionStore.open(out, mode="r").read_probabilities()
    stored = zarr.open_group(str(mask), mode="r")["0"]
    assert stored.dtype == np.uint8 and stored.chunks == PredictionStore.open(out, mode="r").array.chunks
    assert np.array_equal(stored[...], postprocess(probs, cfg.postprocess).astype(np.uint8))
    with pytest.raises(VesuviusError, match="a .zarr --output takes a .zarr --mask"):
        predict(cfg, checkpoint, volume, out, mask_output=tmp_path / "m.nii.gz")
    big = config_from_raw(Checkpoint.load(checkpoint).config, [*OVERRIDES, "postprocess.min_size=5",
                                                                "postprocess.max_whole_voxels=1000"])
    with pytest.raises(VesuviusError, match="postprocess.min_size"):  # refused before predicting
        predict(big, checkpoint, volume, tmp_path / "q.zarr", mask_output=tmp_path / "n.zarr")
    assert not (tmp_path / "q.zarr").exists() and not (tmp_path / "n.zarr").exists()
