"""Prediction of whole volumes (NIfTI in memory, Zarr block by block), one inference path for every command,
and a killed prediction process resumed to the same result."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from vesuvius_monai.config import config_from_raw
from vesuvius_monai.data.dataset import load_splits
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.data.synthetic import SynthParams, make_fragment
from vesuvius_monai.engine.evaluate import evaluate_fragment
from vesuvius_monai.engine.infer import infer_volume, load_normalized, make_predictor
from vesuvius_monai.engine.predict import parse_roi, predict
from vesuvius_monai.engine.train import train, validate
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import load_checkpoint, model_from_checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.metrics import dice

BLOCKS = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32"]  # window 16, stride 12: blocks of 24


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory, tiny_args):
    from vesuvius_monai.config import load_config

    run = train(load_config(None, tiny_args(synthetic_root, tmp_path_factory.mktemp("predict") / "run")))
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """An unlabeled 24 x 48 x 72 uint8 volume as .npy: 1 x 2 x 3 blocks of 24."""
    path = tmp_path_factory.mktemp("volume") / "scan.npy"
    np.save(path, make_fragment(7, SynthParams(shape=(24, 48, 72)))[0])
    return path


def _cfg(checkpoint, *overrides):
    """The config the CLI builds from the checkpoint and ``overrides``."""
    return config_from_raw(load_checkpoint(checkpoint)["config"], [*BLOCKS, *overrides])


def test_parse_roi():
    assert parse_roi("1:5,:,7:") == (slice(1, 5), slice(None), slice(7, None))
    with pytest.raises(VesuviusError, match="--roi"):
        parse_roi("1:5,3")


def test_every_command_gets_the_same_probabilities(checkpoint, synthetic_root, tmp_path):
    """Validation, evaluate, predict to NIfTI and predict to Zarr give identical probabilities, equal to MONAI's
    sliding_window_inference of the whole normalised fragment."""
    cfg = _cfg(checkpoint, "evaluate.metrics=[dice]")
    fragment = load_splits(cfg.data)["test"][0]
    model, _ = model_from_checkpoint(checkpoint, torch.device("cpu"))
    direct = infer_volume(model, fragment.image, cfg)
    icfg = cfg.infer
    image = torch.from_numpy(load_normalized(fragment.image, cfg.transforms.percentiles))[None, None]
    with torch.inference_mode():
        monai = sliding_window_inference(image, icfg.roi_size, icfg.sw_batch_size,
                                         make_predictor(model, icfg, torch.device("cpu"), False), overlap=icfg.overlap,
                                         mode=icfg.blend, sigma_scale=icfg.sigma_scale)[0, 0].numpy()
    np.testing.assert_allclose(direct, monai, rtol=0, atol=2e-6)

    evaluate_fragment(model, fragment, cfg, torch.device("cpu"), tmp_path / "eval")
    evaluated = nib.load(tmp_path / "eval" / "predictions" / f"{fragment.id}_prob.nii.gz").get_fdata(dtype=np.float32)
    predict(cfg, checkpoint, fragment.image.path, tmp_path / "p.nii.gz")
    predict(cfg, checkpoint, fragment.image.path, tmp_path / "p.zarr")
    for other in (evaluated, nib.load(tmp_path / "p.nii.gz").get_fdata(dtype=np.float32)):
        np.testing.assert_array_equal(other.transpose(2, 1, 0), direct)  # NIfTI axes are (x, y, z)
    np.testing.assert_array_equal(open_volume(tmp_path / "p.zarr").read(), direct)
    label = fragment.label.read()
    expected_dice = dice(direct > cfg.postprocess.threshold, label, ignore_index=cfg.data.ignore_index)
    assert validate(model, [fragment], cfg, torch.device("cpu")) == pytest.approx(expected_dice, abs=1e-12)


def test_roi_prediction_keeps_world_position(checkpoint, volume, tmp_path):
    out = predict(_cfg(checkpoint), checkpoint, volume, tmp_path / "roi.nii.gz", roi=parse_roi("8:24,16:40,50:"))
    img = nib.load(out)
    assert img.shape == (22, 24, 16)
    np.testing.assert_allclose(img.affine[:3, 3], [50, 16, 8])


def _predict_cmd(checkpoint, volume, out, overrides):
    return [sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint", str(checkpoint), "--input",
            str(volume), "--output", str(out), *overrides]


def test_killed_prediction_resumes_to_the_same_result(checkpoint, volume, tmp_path, caplog):
    """A real process killed mid-run; the rerun computes only the unfinished blocks and ends bit-identical."""
    overrides = [*BLOCKS, "infer.tta_flip_axes=[0]"]  # 2 views: slow enough to be killed mid-run
    cfg = _cfg(checkpoint, "infer.tta_flip_axes=[0]")
    reference = predict(cfg, checkpoint, volume, tmp_path / "reference.zarr")
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_predict_cmd(checkpoint, volume, out, overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    markers = out.with_name(out.name + ".partial") / ".blocks_done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(os.listdir(markers)) >= 1:  # of 6 blocks
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prediction finished before it could be killed"
    assert not out.exists()  # only the .partial store exists after the kill
    done_before = len(os.listdir(markers))
    assert 1 <= done_before < 6
    with caplog.at_level(logging.INFO, logger="vesuvius_monai"):
        predict(cfg, checkpoint, volume, out)  # the same settings as the killed command
    counts = re.search(r"(\d+) blocks of .*, (\d+) to predict", caplog.text)
    assert counts and (int(counts[1]), int(counts[2])) == (6, 6 - done_before), caplog.text
    a = PredictionStore.open(reference, mode="r").read_probabilities()
    b = PredictionStore.open(out, mode="r").read_probabilities()
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_other_settings(checkpoint, volume, tmp_path):
    out, roi = tmp_path / "p.zarr", parse_roi(":,:24,:24")
    predict(_cfg(checkpoint), checkpoint, volume, out, roi=roi)
    with pytest.raises(VesuviusError, match=r"other settings \(.*infer\.overlap 0\.25 -> 0\.5.*another --output"):
        predict(_cfg(checkpoint, "infer.overlap=0.5"), checkpoint, volume, out, roi=roi)
