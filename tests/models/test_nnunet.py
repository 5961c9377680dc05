"""nnU-Net v2 model folders: read safely, built from the plan, predicted as nnUNetPredictor predicts (the plan's
normalisation, mirroring, nnU-Net's window starts and Gaussian, logits blended, softmax at the end: see
tests/nnunet_reference.py) through the project's engine, whole (NIfTI) and block-wise (Zarr); and in the MONAI-style
mode (probabilities blended on MONAI's grid) when the user asks for it."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.inferers import sliding_window_inference

from tests.helpers import error_line
from tests.nnunet_folder import CT_PROPS, PATCH, dataset, plans, write_folder
from tests.nnunet_reference import nnunet_predict
from vesuvius_monai.cli import main
from vesuvius_monai.config import config_from_raw
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine.nnunet_network import nnunet_network, nnunet_sources
from vesuvius_monai.engine.predict import predict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import spacing_to_affine, write_nifti
from vesuvius_monai.models.nnunet import NnunetFolder, is_nnunet_folder

SPACING = (2.0, 1.0, 1.0)


MONAI_STYLE = ("infer.blend=gaussian", "infer.grid=monai", "infer.blend_space=prob")


def nnunet_expected(nets, image: np.ndarray, norm, mirror_axes=(0, 1, 2)) -> np.ndarray:
    """Independent computation of nnUNetPredictor's result (tests/nnunet_reference.py), float32."""
    return nnunet_predict(nets, image, norm, PATCH, mirror_axes).astype(np.float32)


def expected(nets, image: np.ndarray, norm, mirror_axes=(0, 1, 2), overlap=0.5) -> np.ndarray:
    """Independent computation of the MONAI-style mode: ``norm`` by hand, MONAI's sliding window (Gaussian, sigma
    1/8) over a predictor that averages every fold's logits over all mirrorings, then softmax; channel 1."""
    axes = [a + 2 for a in mirror_axes]
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def window(x):
        total = 0
        for net in nets:
            for dims in flips:
                out = net(torch.flip(x, dims) if dims else x)
                out = out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: full resolution first
                total = total + (torch.flip(out, dims) if dims else out)
        return torch.softmax(total / (len(flips) * len(nets)), 1)[:, 1:2]

    x = torch.from_numpy(norm(image.astype(np.float64)).astype(np.float32))[None, None]
    with torch.inference_mode():
        return sliding_window_inference(x, PATCH, 2, window, overlap=overlap, mode="gaussian",
                                        sigma_scale=0.125)[0, 0].numpy()


def ct(image):
    return (np.clip(image, CT_PROPS["percentile_00_5"], CT_PROPS["percentile_99_5"]) - CT_PROPS["mean"]) / \
        CT_PROPS["std"]


def zscore(image):
    return (image - image.mean()) / image.std()


def _cfg(network, *overrides):
    """The config the CLI builds for an nnU-Net folder: the plan's infer keys, then ``overrides``."""
    return config_from_raw(network.config_layer(), ["infer.device=cpu", "infer.out_dtype=float32", *overrides])


def _nifti(path, image, spacing=SPACING):
    write_nifti(path, image.astype(np.float32), affine=spacing_to_affine(spacing))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is many times faster than two on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.integers(9, 40), st.integers(9, 40), st.integers(9, 40)), seed=st.integers(0, 99))
def test_whole_nifti_equals_the_independent_computation(model, tmp_path_factory, shape, seed):
    folder, nets = model
    image = np.random.default_rng(seed).uniform(0, 255, shape)
    tmp = tmp_path_factory.mktemp("p")
    network = nnunet_network(folder, ["0"])
    predict(_cfg(network), network, _nifti(tmp / "in.nii.gz", image), tmp / "out.nii.gz")
    got = open_volume(tmp / "out.nii.gz").read()
    np.testing.assert_allclose(got, nnunet_expected([nets[0]], image, ct), rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(27, 13, 35), (30, 9, 20)])
def test_monai_style_mode_stays_selectable(model, tmp_path, shape):
    """infer.blend=gaussian, grid=monai, blend_space=prob: MONAI's sliding window over the windows' probabilities,
    which differs from nnU-Net's where windows overlap."""
    folder, nets = model
    image = np.random.default_rng(5).uniform(0, 255, shape)
    network = nnunet_network(folder, ["0"])
    predict(_cfg(network, *MONAI_STYLE), network, _nifti(tmp_path / "in.nii.gz", image), tmp_path / "out.nii.gz")
    got = open_volume(tmp_path / "out.nii.gz").read()
    np.testing.assert_allclose(got, expected([nets[0]], image, ct), rtol=0, atol=2e-5)
    assert np.abs(got - nnunet_expected([nets[0]], image, ct)).max() > 1e-4


def test_three_classes_blend_probabilities_and_refuse_logits(tmp_path):
    """A plan of three classes: the foreground's softmax probability is blended (nnU-Net's grid and Gaussian), as
    the reference does with probabilities; logit blending, which needs two classes, is refused naming the key."""
    folder, nets = write_folder(tmp_path / "m", data=dataset({"background": 0, "surface": 1, "other": 2}))
    network = nnunet_network(folder)
    cfg = _cfg(network)
    assert cfg.infer.blend_space == "prob" and cfg.infer.grid == "nnunet" and cfg.infer.blend == "nnunet"
    image = np.random.default_rng(4).uniform(0, 255, (20, 27, 18))
    predict(cfg, network, _nifti(tmp_path / "in.nii.gz", image), tmp_path / "out.nii.gz")
    got = open_volume(tmp_path / "out.nii.gz").read()
    expected_probs = nnunet_predict([nets[0]], image, ct, PATCH, probs=True)
    np.testing.assert_allclose(got, expected_probs, rtol=0, atol=2e-5)
    with pytest.raises(VesuviusError, match="infer.blend_space=logit needs a plan of two classes"):
        predict(_cfg(network, "infer.blend_space=logit"), network, tmp_path / "in.nii.gz", tmp_path / "o.nii.gz")


def test_skipped_windows_count_as_background_with_logit_blending(model, tmp_path):
    """infer.skip_background with blended logits: where only skipped windows reach, the probability is ~0 (not
    the sigmoid of 0), and far from the empty slab the prediction is nnU-Net's."""
    folder, nets = model
    image = np.random.default_rng(6).uniform(1, 255, (48, 20, 20))
    image[:24] = 0
    network = nnunet_network(folder, ["0"])
    predict(_cfg(network, "infer.skip_background=0"), network, _nifti(tmp_path / "in.nii.gz", image),
            tmp_path / "out.nii.gz")
    got = open_volume(tmp_path / "out.nii.gz").read()
    assert got[:7].max() < 1e-9  # only the windows at z 0 and 7 (all empty) reach here
    np.testing.assert_allclose(got[38:], nnunet_expected([nets[0]], image, ct)[38:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(23, 37, 29), (13, 8, 41)])
def test_blockwise_zarr_two_folds_zscore(tmp_path, shape):
    """Two folds averaged, per-image z-score, block-wise Zarr of several blocks, no mirroring along z."""
    folder, nets = write_folder(tmp_path / "m", folds=(0, 1), plan=plans(normalization="ZScoreNormalization"),
                                mirror_axes=(1, 2))
    image = np.random.default_rng(1).normal(100, 30, shape)
    network = nnunet_network(folder)  # every fold present
    assert [f.path.parent.name for f in network.folds] == ["fold_0", "fold_1"]
    cfg = _cfg(network, "infer.block_size=[16,16,16]")
    predict(cfg, network, _nifti(tmp_path / "in.nii.gz", image), tmp_path / "out.zarr")
    got = open_volume(tmp_path / "out.zarr").read()
    np.testing.assert_allclose(got, nnunet_expected([nets[0], nets[1]], image, zscore, (1, 2)), rtol=0, atol=2e-5)


def test_cli_predict_takes_the_folder(model, tmp_path, capsys):
    folder, nets = model
    image = np.random.default_rng(2).uniform(0, 255, (20, 18, 17))
    source = _nifti(tmp_path / "in.nii.gz", image)
    assert main(["predict", "--checkpoint", str(folder), "--folds", "1", "--input", str(source), "--output",
                 str(tmp_path / "out.zarr"), "infer.out_dtype=float32", "infer.device=cpu"]) == 0
    np.testing.assert_allclose(open_volume(tmp_path / "out.zarr").read(), nnunet_expected([nets[1]], image, ct),
                               rtol=0, atol=2e-5)
    assert main(["predict", "--checkpoint", str(tmp_path / "in.nii.gz"), "--folds", "1", "--input", str(source),
                 "--output", str(tmp_path / "o.zarr")]) == 2
    assert "--folds goes with an nnU-Net model folder" in error_line(capsys)


def test_spacing_mismatch_is_refused_naming_both(model, tmp_path):
    folder, _ = model
    network = nnunet_network(folder, ["0"])
    source = _nifti(tmp_path / "in.nii.gz", np.zeros((20, 20, 20)), spacing=(1.0, 1.0, 1.0))
    for out in ("out.nii.gz", "out.zarr"):
        with pytest.raises(VesuviusError, match=r"spacing \(1\.0, 1\.0, 1\.0\).*plan's \(2\.0, 1\.0, 1\.0\)"):
            predict(_cfg(network), network, source, tmp_path / out)
        assert not (tmp_path / out).exists()


class Hostile:
    def __reduce__(self):
        return (print, ("ran code",))


def test_unsafe_checkpoint_is_refused(tmp_path):
    folder, _ = write_folder(tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    payload = torch.load(path, weights_only=False)
    payload["logging"]["hostile"] = Hostile()
    torch.save(payload, path)
    with pytest.raises(VesuviusError, match="not allowed to load.*print"):
        nnunet_network(folder)


def test_missing_fold_and_file_are_refused_naming_the_folder(model, tmp_path):
    folder, _ = model
    with pytest.raises(VesuviusError, match=f"{folder}: fold 3 is not there .*0, 1"):
        nnunet_network(folder, ["3"])
    other, _ = write_folder(tmp_path, name="checkpoint_best.pth")
    with pytest.raises(VesuviusError, match="fold_0 has no checkpoint_final.pth; it holds checkpoint_best.pth"):
        nnunet_network(other)
    assert len(nnunet_network(other, checkpoint_name="checkpoint_best.pth").folds) == 1
    assert [s.folds[0].path.parent.name for s in nnunet_sources(folder)] == ["fold_0", "fold_1"]


def test_plan_is_read_as_nnunet_writes_it(model, tmp_path):
    folder, nets = model
    assert is_nnunet_folder(folder) and not is_nnunet_folder(tmp_path)
    read = NnunetFolder.read(folder)
    assert (read.patch_size, read.spacing, read.foreground_channel) == (PATCH, SPACING, 1)
    net = read.model(read.checkpoint("0"))
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(net(x), nets[0](x)[0])
    layer = _cfg(nnunet_network(folder)).infer
    assert (tuple(layer.roi_size), layer.overlap, layer.tta_flip_axes) == (PATCH, 0.5, [0, 1, 2])


@pytest.mark.parametrize("change, message", [
    (lambda p, d: p["configurations"]["3d_fullres"]["architecture"].update(network_class_name="os.system"),
     "not one of"),
    (lambda p, d: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(nonlin="os.system"),
     "not an allowed torch.nn layer"),
    (lambda p, d: d.update(labels={"background": 0, "a": [1, 2]}), "region-based"),
    (lambda p, d: d.update(channel_names={"0": "a", "1": "b"}), "2 input channels"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(normalization_schemes=["Mine"]), "not supported"),
])
def test_foreign_plans_are_refused(tmp_path, change, message):
    plan, data = plans(), dataset()
    folder, _ = write_folder(tmp_path)
    change(plan, data)
    (folder / "plans.json").write_text(json.dumps(plan))
    (folder / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(VesuviusError, match=message):
        network = nnunet_network(folder)
        network.normalizer(open_volume(_nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4)))), None)


def test_window_must_fit_the_network(model, tmp_path):
    network = nnunet_network(model[0], ["0"])
    with pytest.raises(VesuviusError, match=r"infer.roi_size \(18, 16, 16\) must be a multiple of \(4, 4, 4\)"):
        predict(_cfg(network, "infer.roi_size=[18,16,16]"), network, tmp_path / "x.nii.gz", tmp_path / "o.nii.gz")


@pytest.mark.slow
def test_torchrun_two_ranks_share_the_blocks(model, tmp_path):
    """2 gloo processes share the blocks of one Zarr output of an nnU-Net fold: the result is the independent
    computation's."""
    folder, nets = model
    image = np.random.default_rng(3).uniform(0, 255, (40, 23, 30))
    source = _nifti(tmp_path / "in.nii.gz", image)
    args = ["predict", "--checkpoint", str(folder), "--folds", "0", "--input", str(source), "--output",
            str(tmp_path / "out.zarr"), "infer.block_size=[16,16,16]", "infer.out_dtype=float32", "infer.device=cpu"]
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nfrom vesuvius_monai.cli import main\nsys.exit(main({args!r}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes:" in done.stderr
    np.testing.assert_allclose(open_volume(tmp_path / "out.zarr").read(), nnunet_expected([nets[0]], image, ct),
                               rtol=0, atol=2e-5)


def test_the_bench_model_folder_is_read(tmp_path, monkeypatch):
    """bench/bench_nnunet_predict.py's model folder (nnU-Net's layout, for nnUNetPredictor) is read here too."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_nnunet_predict

    network = nnunet_network(bench_nnunet_predict.write_model(tmp_path, "tiny"))
    assert network.folder.patch_size == (32, 32, 32) and network.folds[0].mirror_axes == (0, 1, 2)


@pytest.mark.slow
def test_mixed_ensemble_in_predict_evaluate_and_tune(trained_run, synthetic_root, tmp_path):
    """An nnU-Net folder beside a project checkpoint: predict fuses the two single predictions (prob, equal
    weights), each with its own window and normalisation; evaluate and tune-postprocess take the same ensemble."""
    folder, _ = write_folder(tmp_path / "m", plan=plans(spacing=(1.0, 1.0, 1.0)))
    ckpt = str(trained_run / "checkpoints" / "last.pt")
    volume = sorted((synthetic_root / "images").iterdir())[0]
    common = ["infer.out_dtype=float32", "infer.device=cpu", f"data.root={synthetic_root}"]
    outs = {}
    for name, checkpoints in (("nn", [str(folder)]), ("own", [ckpt]), ("both", [ckpt, str(folder)])):
        flags = [f for c in checkpoints for f in ("--checkpoint", c)]
        assert main(["predict", *flags, "--input", str(volume), "--output", str(tmp_path / f"{name}.nii.gz"),
                     *common]) == 0
        outs[name] = open_volume(tmp_path / f"{name}.nii.gz").read()
    np.testing.assert_allclose(outs["both"], (outs["nn"] + outs["own"]) / 2, rtol=0, atol=1e-6)
    assert not np.allclose(outs["nn"], outs["own"], atol=1e-3)
    both = ["--checkpoint", ckpt, "--checkpoint", str(folder), *common, "evaluate.metrics=[dice]"]
    assert main(["evaluate", *both[:4], "--out", str(tmp_path / "eval"), *both[4:]]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_fragments"] >= 1
    assert main(["tune-postprocess", *both[:4], "--out", str(tmp_path / "tuned"), *both[4:]]) == 0
    assert (tmp_path / "tuned" / "postprocess.json").is_file()
