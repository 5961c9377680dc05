"""Prediction of whole volumes: in memory (NIfTI) and block by block (Zarr), interrupted and resumed."""

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.data.synthetic import SynthParams, make_fragment
from vesuvius_monai.engine.predict import parse_roi, predict
from vesuvius_monai.engine.train import train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import config_from_checkpoint, load_checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory, tiny_args):
    from vesuvius_monai.config import load_config

    run = train(load_config(None, tiny_args(synthetic_root, tmp_path_factory.mktemp("predict") / "run")))
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """An unlabeled 40 x 72 x 72 uint8 volume as .npy (odd block counts for 16^3 blocks)."""
    path = tmp_path_factory.mktemp("volume") / "scan.npy"
    np.save(path, make_fragment(7, SynthParams(shape=(40, 72, 72)))[0])
    return path


def _cfg(checkpoint, *overrides):
    from vesuvius_monai.config import set_override, from_dict, Config

    raw = load_checkpoint(checkpoint)["config"]
    for o in ("infer.block_size=[16,16,16]", "infer.halo=[8,8,8]", "infer.out_dtype=float32", *overrides):
        set_override(raw, o)
    return from_dict(Config, raw)


def test_parse_roi():
    assert parse_roi("1:5,:,7:") == (slice(1, 5), slice(None), slice(7, None))
    with pytest.raises(VesuviusError, match="--roi"):
        parse_roi("1:5,3")


def test_blockwise_matches_in_memory_prediction(checkpoint, volume, tmp_path):
    cfg = _cfg(checkpoint)
    whole = predict(cfg, checkpoint, volume, tmp_path / "whole.nii.gz")
    blocks = predict(cfg, checkpoint, volume, tmp_path / "blocks.zarr", nifti_output=tmp_path / "blocks.nii.gz")
    a = nib.load(whole).get_fdata()
    b = nib.load(tmp_path / "blocks.nii.gz").get_fdata()
    assert a.shape == b.shape == (72, 72, 40)  # NIfTI axes (x, y, z)
    # blocks and halo aligned to the window stride: every voxel sees the windows of whole-volume inference
    assert np.abs(a - b).max() < 1e-4
    assert open_volume(blocks).shape == (40, 72, 72)


def test_roi_prediction_keeps_world_position(checkpoint, volume, tmp_path):
    cfg = _cfg(checkpoint)
    out = predict(cfg, checkpoint, volume, tmp_path / "roi.nii.gz", roi=parse_roi("8:24,16:48,:"))
    img = nib.load(out)
    assert img.shape == (72, 32, 16)
    np.testing.assert_allclose(img.affine[:3, 3], [0, 16, 8])


def _predict_cmd(checkpoint, volume, out):
    return [sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint", str(checkpoint), "--input",
            str(volume), "--output", str(out), "infer.block_size=[16,16,16]", "infer.halo=[8,8,8]",
            "infer.out_dtype=float16"]


def test_killed_prediction_resumes_to_the_same_result(checkpoint, volume, tmp_path):
    reference = tmp_path / "reference.zarr"
    subprocess.run(_predict_cmd(checkpoint, volume, reference), check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_predict_cmd(checkpoint, volume, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out.with_name(out.name + ".partial") / ".blocks_done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(os.listdir(markers)) >= 3:  # of 18 blocks
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prediction finished before it could be killed"
    assert not out.exists()  # only the .partial store exists after the kill
    done_before = len(os.listdir(markers))
    result = subprocess.run(_predict_cmd(checkpoint, volume, out), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{done_before} of" in result.stderr or "skipping" in result.stderr.lower() or done_before > 0
    a = PredictionStore.open(reference, mode="r").read_probabilities()
    b = PredictionStore.open(out, mode="r").read_probabilities()
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_another_model(checkpoint, volume, tmp_path, synthetic_root):
    cfg = _cfg(checkpoint)
    out = tmp_path / "p.zarr"
    predict(cfg, checkpoint, volume, out)
    other = _cfg(checkpoint, "infer.overlap=0.5")
    with pytest.raises(VesuviusError, match="different settings"):
        predict(other, checkpoint, volume, out)
