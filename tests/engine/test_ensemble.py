"""Ensembles of checkpoints: the fusion against scipy, an ensemble of one is the single model bit for bit (in memory
and Zarr), two members (different networks, windows and TTA) equal each member's own prediction fused by hand, the
Zarr ensemble resumes to the uninterrupted result and refuses other members, the command-line errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit

from vesuvius_monai.cli import main
from vesuvius_monai.config import config_from_raw, load_config
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.engine import ensemble_zarr
from vesuvius_monai.engine.ensemble import (LOGIT_EPS, Ensemble, Member, build_ensemble, fuse, member_config,
                                            normalized_weights)
from vesuvius_monai.engine.ensemble_zarr import member_path, predict_ensemble_zarr
from vesuvius_monai.engine.infer import infer_volume
from vesuvius_monai.engine.networks import ModuleNetwork
from vesuvius_monai.engine.predict import predict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.models import build_model

CPU = torch.device("cpu")
RUN = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32", "infer.device=cpu"]  # run-level keys


def save_checkpoint(path, overrides, seed):
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A resunet3d (window 16, TTA flips on z) and a MONAI UNet (window 12, no TTA), random weights, and a third
    resunet3d of another seed; plus an unlabeled volume."""
    root = tmp_path_factory.mktemp("ens")
    res = ["model.kwargs={init_features: 4, depth: 2, norm_groups: 2}", "infer.roi_size=[16,16,16]",
           "infer.tta_flip_axes=[0]"]
    unet = ["model.name=unet", "model.kwargs={channels: [4, 8], strides: [2], num_res_units: 1}",
            "infer.roi_size=[12,12,12]", "infer.tta_flip_axes=[]", "infer.overlap=0.5", "infer.blend=constant"]
    paths = {"a": save_checkpoint(root / "a.pt", res, 0), "b": save_checkpoint(root / "b.pt", unet, 1),
             "c": save_checkpoint(root / "c.pt", res, 2)}
    np.save(root / "vol.npy", np.random.default_rng(3).normal(1000, 200, (16, 22, 20)).astype(np.float32))
    return root, paths


def run_cfg(path):
    """The run config the command builds without --config: the first member's stored config + run-level keys."""
    return config_from_raw(Checkpoint.load(path).config, RUN)


def by_hand(paths, weights, fusion, volume):
    """Each member's own infer_volume (its checkpoint's window and TTA), fused with scipy in float64."""
    probs = []
    for path in paths:
        ckpt = Checkpoint.load(path)
        probs.append(infer_volume(ckpt.model(CPU), open_volume(volume), config_from_raw(ckpt.config, RUN)))
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    if fusion == "prob":
        return sum(wi * p.astype(np.float64) for wi, p in zip(w, probs)), probs
    clipped = [np.clip(p.astype(np.float64), LOGIT_EPS, 1 - LOGIT_EPS) for p in probs]
    return expit(sum(wi * logit(p) for wi, p in zip(w, clipped))), probs


@settings(deadline=None, derandomize=True, database=None, max_examples=30)
@given(st.integers(1, 4), st.integers(0, 2**16), st.sampled_from(["prob", "logit"]))
def test_fuse_against_scipy(n, seed, fusion):
    rng = np.random.default_rng(seed)
    probs = [rng.random((3, 4, 5), dtype=np.float32) for _ in range(n)]
    probs[0][0, 0, :2] = [0.0, 1.0]  # the clip keeps logits finite
    weights = normalized_weights(list(rng.uniform(0.1, 5, n)), n)
    got = fuse(probs, weights, fusion)
    if n == 1:
        assert got is probs[0]  # an ensemble of one: its member's array, unchanged
        return
    if fusion == "prob":
        expected = sum(w * p.astype(np.float64) for w, p in zip(weights, probs))
    else:
        expected = expit(sum(w * logit(np.clip(p.astype(np.float64), LOGIT_EPS, 1 - LOGIT_EPS))
                             for w, p in zip(weights, probs)))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_weights_are_checked_and_normalised():
    assert normalized_weights([1, 3], 2) == [0.25, 0.75]
    assert normalized_weights(None, 4) == [0.25] * 4
    for weights, pattern in (([1], "1 weights for 2 --checkpoint"), ([1, 0], "> 0, got 0"),
                             ([1, -2], "> 0, got -2"), ([1, float("nan")], "> 0, got nan")):
        with pytest.raises(VesuviusError, match=r"--weights.*" + pattern):
            normalized_weights(weights, 2)


def test_member_config_keeps_its_own_window_unless_the_user_sets_it(ckpts):
    _, paths = ckpts
    run, own = run_cfg(paths["a"]), Checkpoint.load(paths["b"]).run_config()
    mine = member_config(run, own, set())
    assert (mine.infer.roi_size, mine.infer.overlap, mine.infer.blend, mine.infer.tta_flip_axes) == \
        ((12, 12, 12), 0.5, "constant", [])
    assert mine.infer.block_size == run.infer.block_size and mine.model == run.model  # run-level keys stay
    theirs = member_config(run, own, {"infer.roi_size", "infer.tta_flip_axes"})  # the user's: for every member
    assert (theirs.infer.roi_size, theirs.infer.tta_flip_axes, theirs.infer.overlap) == ((16, 16, 16), [0], 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nii.gz", ".zarr"])
def test_an_ensemble_of_one_is_the_single_model_bit_for_bit(ckpts, suffix):
    root, paths = ckpts
    cfg = run_cfg(paths["a"])
    single = predict(cfg, paths["a"], root / "vol.npy", root / f"single{suffix}")
    logit_cfg = config_from_raw(Checkpoint.load(paths["a"]).config, [*RUN, "infer.fusion=logit"])
    one = build_ensemble(logit_cfg, [paths["a"]], [3.0], explicit=set())
    ensemble = predict(logit_cfg, one, root / "vol.npy", root / f"one{suffix}")
    a, b = open_volume(single).read(), open_volume(ensemble).read()
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["prob", "logit"])
def test_two_members_equal_their_own_predictions_fused_by_hand(ckpts, fusion, tmp_path):
    """A resunet3d (window 16, flips) and a MONAI UNet (window 12, overlap 0.5, constant blending, no TTA), weights
    1 and 3, through the command: NIfTI in memory and Zarr block by block give each member's own infer_volume fused
    by hand; the Zarr store records the members."""
    root, paths = ckpts
    expected, probs = by_hand([paths["a"], paths["b"]], [1, 3], fusion, root / "vol.npy")
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # the members differ
    common = ["--checkpoint", str(paths["a"]), "--checkpoint", str(paths["b"]), "--input", str(root / "vol.npy"), *RUN,
              f"infer.fusion={fusion}", "--weights", "1", "3"]
    assert main(["predict", "--output", str(tmp_path / "p.nii.gz"), *common]) == 0
    assert main(["predict", "--output", str(tmp_path / "p.zarr"), *common]) == 0
    nifti, zarr = open_volume(tmp_path / "p.nii.gz").read(), open_volume(tmp_path / "p.zarr").read()
    np.testing.assert_allclose(nifti, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(zarr, nifti)  # block-wise fusion of the member stores = the in-memory fusion
    meta = PredictionStore.open(tmp_path / "p.zarr", mode="r").meta["ensemble"]
    assert meta["fusion"] == fusion and meta["n_members"] == 2
    assert [m["weight"] for m in meta["members"].values()] == [0.25, 0.75]
    assert meta["members"]["1"]["sha256"] == Checkpoint.load(paths["b"]).digest()
    assert meta["members"]["1"]["infer.roi_size"] == [12, 12, 12]
    assert not (tmp_path / "p.zarr" / ".members").exists() and not (tmp_path / "p.zarr.partial").exists()


class TinyNet(torch.nn.Module):
    """Two convolutions; counts its windows and raises after ``fail_after`` of them."""

    def __init__(self, seed, fail_after=None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv3d(2, 1, 3, padding=1))
        self.windows, self.fail_after = 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.windows >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.windows += x.shape[0]
        return self.net(x) * 3.0


def tiny_ensemble(nets, fusion="logit"):
    """Two members of their own windows (8 and 6) over blocks of 8."""
    base = ["infer.block_size=[8,8,8]", "infer.out_dtype=float32", "infer.device=cpu", f"infer.fusion={fusion}",
            "infer.tta_flip_axes=[]"]
    cfgs = [load_config(None, [*base, "infer.roi_size=[8,8,8]"]),
            load_config(None, [*base, "infer.roi_size=[6,6,6]", "infer.overlap=0.5"])]
    return cfgs[0], Ensemble(tuple(Member(ModuleNetwork(n), c, w) for n, c, w in zip(nets, cfgs, [0.4, 0.6])), fusion)


@pytest.mark.slow
def test_a_killed_zarr_ensemble_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A crash in the second member, then one in the fusion: each rerun computes only what is missing (the first
    member's store is kept, fused blocks are not fused again) and ends bit-identical to an uninterrupted run."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(0, 1, (20, 18, 16)).astype(np.float32))
    target = [(tmp_path / "v.npy", tmp_path / "ref.zarr")]
    cfg, ensemble = tiny_ensemble([TinyNet(0), TinyNet(1)])
    predict_ensemble_zarr(cfg, ensemble, target, None)
    reference = open_volume(tmp_path / "ref.zarr").read()

    out = tmp_path / "p.zarr"
    first = TinyNet(0)
    _, crashing = tiny_ensemble([first, TinyNet(1, fail_after=100)])
    with pytest.raises(RuntimeError, match="simulated"):
        predict_ensemble_zarr(cfg, crashing, [(tmp_path / "v.npy", out)], None)
    assert PredictionStore.open(member_path(out, 0), mode="r").meta["complete"]
    assert 0 < len(PredictionStore.open(member_path(out, 1).with_name("1.zarr.partial"), mode="r").done_blocks())

    calls = {"n": 0}
    result = ensemble_zarr.Fuser.result

    def failing(self):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash in the fusion")
        return result(self)

    monkeypatch.setattr(ensemble_zarr.Fuser, "result", failing)
    again = [TinyNet(0), TinyNet(1)]
    with pytest.raises(RuntimeError, match="fusion"):
        predict_ensemble_zarr(cfg, tiny_ensemble(again)[1], [(tmp_path / "v.npy", out)], None)
    assert again[0].windows == 0 and 0 < again[1].windows  # member 0 kept, member 1 resumed
    assert len(PredictionStore.open(out.with_name("p.zarr.partial"), mode="r").done_blocks()) == 3
    monkeypatch.setattr(ensemble_zarr.Fuser, "result", result)

    last = [TinyNet(0), TinyNet(1)]
    predict_ensemble_zarr(cfg, tiny_ensemble(last)[1], [(tmp_path / "v.npy", out)], None)
    assert last[0].windows == last[1].windows == 0
    np.testing.assert_array_equal(open_volume(out).read(), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr", "ref.zarr", "v.npy"]


@pytest.mark.slow
def test_other_members_weights_or_fusion_are_refused_naming_the_difference(ckpts, tmp_path):
    root, paths = ckpts
    out = tmp_path / "e.zarr"

    def run(names, weights=None, fusion="prob"):
        fcfg = config_from_raw(Checkpoint.load(paths["a"]).config, [*RUN, f"infer.fusion={fusion}"])
        ens = build_ensemble(fcfg, [paths[n] for n in names], weights, explicit=set())
        return predict(fcfg, ens, root / "vol.npy", out, roi=(slice(0, 12), slice(None), slice(None)))

    run("ab")
    before = open_volume(out).read()
    for names, weights, fusion, pattern in (
            ("ab", [1, 3], "prob", r"ensemble\.members\.0\.weight 0\.5 -> 0\.25"),
            ("ac", None, "prob", r"ensemble\.members\.1\.checkpoint .*b\.pt -> .*c\.pt"),
            ("ab", None, "logit", r"ensemble\.fusion prob -> logit"),
            ("abc", None, "prob", r"ensemble\.n_members 2 -> 3")):
        with pytest.raises(VesuviusError, match=r"e\.zarr: exists from a prediction with other settings .*" + pattern):
            run(names, weights, fusion)
    np.testing.assert_array_equal(open_volume(out).read(), before)


def test_command_line_errors(ckpts, tmp_path, capsys):
    root, paths = ckpts
    two = ["--checkpoint", str(paths["a"]), "--checkpoint", str(paths["b"])]
    cases = [
        (["predict", *two, "--input", str(root / "vol.npy"), "--output", str(tmp_path / "x.zarr"), "--weights", "1"],
         "--weights: 1 weights for 2 --checkpoint"),
        (["predict", *two, "--input", str(root / "vol.npy"), "--output", str(tmp_path / "x.zarr"),
          "--weights", "1", "0"], "--weights must be finite and > 0, got 0"),
        (["tune-postprocess", *two], "tune-postprocess with 2 --checkpoint needs --out FOLDER"),
        (["predict", *two, "--input", str(root / "vol.npy"), "--output", str(tmp_path / "x.zarr"), "infer.fusion=mean"],
         "infer.fusion"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_and_tune_an_ensemble(trained_run, tmp_path, caplog):
    """tune-postprocess of two checkpoints records the members in --out; evaluate takes it with --postprocess (a
    warning when the members differ) and records the ensemble; its fused probabilities are the members' fused."""
    run = trained_run / "checkpoints"
    two = ["--checkpoint", str(run / "last.pt"), "--checkpoint", str(run / "best.pt")]
    assert main(["tune-postprocess", *two, "--out", str(tmp_path / "tuned"), "tune.thresholds=[0.3,0.5]",
                 "tune.min_sizes=[10]"]) == 0
    choice = json.loads((tmp_path / "tuned" / "postprocess.json").read_text())
    assert choice["ensemble"]["n_members"] == 2 and "checkpoint_sha256" not in choice
    assert not (trained_run / "postprocess.json").exists()
    with caplog.at_level(logging.WARNING, logger="vesuvius_monai"):
        assert main(["evaluate", *two, "--out", str(tmp_path / "eval"), "--postprocess",
                     str(tmp_path / "tuned" / "postprocess.json"), "evaluate.metrics=[dice]"]) == 0
        assert "tuned on" not in caplog.text
        assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "eval1"),
                     "--postprocess", str(tmp_path / "tuned" / "postprocess.json"), "evaluate.metrics=[dice]"]) == 0
        assert "was tuned on last.pt (weight 0.5" in caplog.text
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["ensemble"]["n_members"] == 2
    assert metrics["config"]["postprocess"]["threshold"] == choice["postprocess"]["threshold"]


def test_the_fusion_pass_holds_a_few_blocks_whatever_the_volume_size(tmp_path):
    """fuse_blocks reads, fuses and writes block by block: its peak memory is a few blocks (2 members, float64 sums)
    for a volume of 8 or 64 blocks."""
    import tracemalloc

    from vesuvius_monai.engine.ensemble_zarr import FusedOutput, fuse_blocks, store_blocks

    peaks = []
    for size in (32, 64):
        out = tmp_path / f"o{size}.zarr"
        shape, block = (size, size, size), (16, 16, 16)
        target = PredictionStore.create(out.with_name(out.name + ".partial"), shape, block_size=block, dtype="uint8")
        for i in range(2):
            store = PredictionStore.create(member_path(out, i), shape, block_size=block, dtype="float32")
            for index, region in store_blocks(store):
                store.write_block(index, region, np.random.default_rng(i).random((16, 16, 16), dtype=np.float32))
        blocks = [index for index, _ in store_blocks(target)]
        cfg, ensemble = tiny_ensemble([TinyNet(0), TinyNet(1)])
        tracemalloc.start()
        try:
            fuse_blocks(ensemble, [FusedOutput(tmp_path, out, blocks, len(blocks), False)], [(0, b) for b in blocks])
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert len(target.done_blocks()) == len(blocks)
    block_bytes = 16**3 * 8
    assert max(peaks) < 12 * block_bytes, [p / block_bytes for p in peaks]
