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
from vesuvius_monai.engine.train import validate
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.metrics import dice

BLOCKS = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32"]  # window 16, stride 12: blocks of 24


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """An unlabeled 24 x 48 x 72 uint8 volume as .npy: 1 x 2 x 3 blocks of 24."""
    path = tmp_path_factory.mktemp("volume") / "scan.npy"
    np.save(path, make_fragment(7, SynthParams(shape=(24, 48, 72)))[0])
    return path


def _cfg(checkpoint, *overrides):
    """The config the CLI builds from the checkpoint and ``overrides``."""
    return config_from_raw(Checkpoint.load(checkpoint).config, [*BLOCKS, *overrides])


def test_parse_roi():
    assert parse_roi("1:5,:,7:") == (slice(1, 5), slice(None), slice(7, None))
    with pytest.raises(VesuviusError, match="--roi"):
        parse_roi("1:5,3")


def test_every_command_gets_the_same_probabilities(checkpoint, synthetic_root, tmp_path):
    """Validation, evaluate, predict to NIfTI and predict to Zarr give identical probabilities, equal to MONAI's
    sliding_window_inference of the whole normalised fragment."""
    cfg = _cfg(checkpoint, "evaluate.metrics=[dice]")
    fragment = load_splits(cfg.data)["test"][0]
    model = Checkpoint.load(checkpoint).model(torch.device("cpu"))
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


def test_nifti_outputs_replace_only_what_predict_wrote(checkpoint, volume, tmp_path):
    cfg, roi = _cfg(checkpoint), parse_roi("0:16,0:16,0:16")
    out, mask = tmp_path / "probs.nii.gz", tmp_path / "mask.nii.gz"
    predict(cfg, checkpoint, volume, out, mask_output=mask, roi=roi)
    first = out.read_bytes()
    predict(cfg, checkpoint, volume, out, mask_output=mask, roi=roi)  # its own earlier output: replaced
    assert out.read_bytes() == first
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "theirs.nii.gz")
    (tmp_path / "notes.nii").write_text("a user's file")
    theirs = {p.name: p.read_bytes() for p in (tmp_path / "theirs.nii.gz", tmp_path / "notes.nii")}
    for kwargs in ({"output": tmp_path / "theirs.nii.gz"}, {"output": out, "mask_output": tmp_path / "notes.nii"}):
        with pytest.raises(VesuviusError, match="not written by predict"):
            predict(cfg, checkpoint, volume, roi=roi, **{"output": out, **kwargs})
    assert {p.name: p.read_bytes() for p in (tmp_path / "theirs.nii.gz", tmp_path / "notes.nii")} == theirs


def _predict_cmd(checkpoint, volume, out, overrides):
    return [sys.executable, "-m", "vesuvius_monai.cli", "predict", "--checkpoint", str(checkpoint), "--input",
            str(volume), "--output", str(out), *overrides]


@pytest.mark.slow
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


def test_predict_takes_the_checkpoint_read_once_and_checks_the_window(checkpoint, volume, tmp_path):
    ckpt = Checkpoint.load(checkpoint)
    out = predict(_cfg(checkpoint), ckpt, volume, tmp_path / "p.zarr", roi=parse_roi(":,:24,:24"))
    assert PredictionStore.open(out, mode="r").meta["checkpoint"] == str(checkpoint.resolve())
    with pytest.raises(VesuviusError, match=r"infer\.roi_size"):  # resunet3d of depth 2: multiples of 4
        predict(_cfg(checkpoint, "infer.roi_size=[18,16,16]"), ckpt, volume, tmp_path / "q.zarr")
    assert not (tmp_path / "q.zarr.partial").exists()


@pytest.fixture
def folder(tmp_path):
    """Two small volumes a.npy, b.npy in ``vols/``."""
    (tmp_path / "vols").mkdir()
    for i, name in enumerate("ab"):
        np.save(tmp_path / "vols" / f"{name}.npy", make_fragment(i, SynthParams(shape=(16, 20, 24)))[0])
    return tmp_path / "vols"


def test_a_folder_output_gets_one_store_per_volume(checkpoint, folder, tmp_path):
    """Folders of volumes and single volumes mix; each volume's store is what predicting it alone writes; files in
    the output folder that predict did not write stay, and a folder that is not a prediction store is refused."""
    cfg = _cfg(checkpoint)
    out = tmp_path / "preds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    np.save(tmp_path / "c.npy", np.load(folder / "a.npy")[::-1].copy())
    predict(cfg, checkpoint, [folder, tmp_path / "c.npy"], out)
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "b.zarr", "c.zarr", "notes.txt"]
    alone = predict(cfg, checkpoint, folder / "b.npy", tmp_path / "b_alone.zarr")
    np.testing.assert_array_equal(open_volume(out / "b.zarr").read(), open_volume(alone).read())
    assert (out / "notes.txt").read_text() == "keep me"

    (out / "a.zarr").rename(tmp_path / "moved.zarr")
    (out / "a.zarr").mkdir()
    (out / "a.zarr" / "precious.txt").write_text("mine")
    with pytest.raises(VesuviusError, match=r"a\.zarr.*not"):
        predict(cfg, checkpoint, folder, out)
    assert (out / "a.zarr" / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize("case, pattern", [
    ("same id", r"vols/a\.npy and .*a\.nii\.gz would both be written to .*preds/a\.zarr"),
    ("output inside input", r"--output .*vols/preds is inside the input folder"),
    ("several inputs, one file", r"2 --input volumes need a folder --output"),
    ("mask with a folder", r"--mask and --nifti go with one volume"),
    ("output is a file", r"--output .*taken is an existing file"),
    ("empty folder", r"--input .*empty: no volumes"),
])
def test_folder_outputs_refuse_bad_combinations(checkpoint, folder, tmp_path, case, pattern):
    cfg, kw = _cfg(checkpoint), {}
    inputs, out = [folder], tmp_path / "preds"
    if case == "same id":
        inputs.append(tmp_path / "a.nii.gz")
    elif case == "output inside input":
        out = folder / "preds"
    elif case == "several inputs, one file":
        inputs, out = [folder / "a.npy", folder / "b.npy"], tmp_path / "p.zarr"
    elif case == "mask with a folder":
        kw["mask_output"] = tmp_path / "m.nii.gz"
    elif case == "output is a file":
        out = tmp_path / "taken"
        out.write_text("x")
    elif case == "empty folder":
        inputs = [tmp_path / "empty"]
        inputs[0].mkdir()
    with pytest.raises(VesuviusError, match=pattern):
        predict(cfg, checkpoint, inputs, out, **kw)
    assert not (tmp_path / "preds").exists() or not any((tmp_path / "preds").iterdir())


def test_validation_leaves_out_test_time_augmentation(checkpoint, monkeypatch):
    """Validation infers without TTA even when the config asks for it (evaluate applies it), and otherwise with the
    config's inference settings."""
    from vesuvius_monai.engine import train as train_module

    tta = _cfg(checkpoint, "evaluate.metrics=[dice]", "infer.tta_flip_axes=[0,1,2]", "infer.tta_rot90=true")
    fragment = load_splits(tta.data)["test"][0]
    model = Checkpoint.load(checkpoint).model(torch.device("cpu"))
    seen = []

    def recording(model, image, cfg, device=None):
        seen.append(cfg)
        return infer_volume(model, image, cfg, device=device)

    monkeypatch.setattr(train_module, "infer_volume", recording)
    score = validate(model, [fragment], tta, torch.device("cpu"))
    (used,) = seen
    assert used.infer.tta_flip_axes == [] and used.infer.tta_rot90 is False
    assert used.infer.roi_size == tta.infer.roi_size and used.postprocess == tta.postprocess
    plain = infer_volume(model, fragment.image, used)
    expected = dice(plain > tta.postprocess.threshold, fragment.label.read(), ignore_index=tta.data.ignore_index)
    assert score == expected
