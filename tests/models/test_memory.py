"""The memory estimate of every registered network (issue 20, case 11): realistic configs pass, sizes that cannot
fit are refused naming their config key before anything is created, and the estimate is cheap and faithful."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import error_line
from vesuvius_monai.cli import main
from vesuvius_monai.config import InferConfig, load_config
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io import memory as host
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.models import build_model, list_models, memory, size_divisor

GIB = 2**30
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu_of_16_gib(monkeypatch):
    """A host with 16 GiB available, whatever this machine has."""
    monkeypatch.setattr(host, "available_memory", lambda: 16 * GIB)


@pytest.mark.parametrize("name", list_models())
def test_per_voxel_figures_hold_at_another_size(name):
    """Measured on (2d, d, d), the bytes per voxel give those of a (4d, 2d, 3d) input within 5 %."""
    d = size_divisor(name)
    foot = memory.footprint(name, {})
    model = build_model(name)
    x = torch.zeros(1, 1, 4 * d, 2 * d, 3 * d)
    saved, peak = memory._saved_bytes(model, x) / x.numel(), memory._peak_bytes(model, x) / x.numel()
    assert saved == pytest.approx(foot.saved, rel=0.05)
    assert peak == pytest.approx(foot.peak, rel=0.05)
    assert foot.params == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_realistic_configs_fit_and_absurd_sizes_are_refused(name, cpu_of_16_gib):
    kwargs = "{}" if name != "resunet3d" else "{init_features: 8, depth: 3, stem_stride: 2}"
    memory.check_training_memory(load_config(None, [f"model.name={name}", f"model.kwargs={kwargs}"]))
    huge_patch = load_config(None, [f"model.name={name}", "transforms.patch_size=[4096,4096,4096]"])
    with pytest.raises(VesuviusError, match=rf"config key 'transforms\.patch_size': a training step on 2 "
                                            rf"\(train\.batch_size\) patches of \[4096, 4096, 4096\] through model "
                                            rf"'{name}' needs at least [\d.]+ TiB of memory, more than the 16\.0 GiB "
                                            rf"available on cpu"):
        memory.check_training_memory(huge_patch, torch.device("cpu"))
    huge_window = load_config(None, [f"model.name={name}", "infer.roi_size=[10000,10000,10000]"])
    with pytest.raises(VesuviusError, match=r"config key 'infer\.roi_size': a batch of 2 \(infer\.sw_batch_size\) "
                                            r"windows of \[10000, 10000, 10000\]"):
        memory.check_training_memory(huge_window, torch.device("cpu"))


@pytest.mark.parametrize("config", [None, "configs/gpu.yaml", "configs/demo.yaml"])
def test_shipped_configs_fit_a_cpu_with_enough_memory(config, cpu_of_16_gib):
    cfg = load_config(ROOT / config if config else None, [])
    memory.check_training_memory(cfg, torch.device("cpu"))
    need = memory.training_bytes(cfg.model.name, cfg.model.kwargs, cfg.transforms.patch_size, cfg.train.batch_size,
                                 half=False)
    assert 10 * 2**20 < need < 4 * GIB


def test_batch_and_mixed_precision_scale_the_activations():
    one = memory.training_bytes("unet", {}, (64, 64, 64), 1, half=False)
    params = memory.OPTIMIZER_COPIES * memory.footprint("unet", {}).params
    assert memory.training_bytes("unet", {}, (64, 64, 64), 4, half=False) - params == pytest.approx(4 * (one - params))
    assert memory.training_bytes("unet", {}, (64, 64, 64), 1, half=True) - params == pytest.approx((one - params) / 2)
    assert memory.inference_bytes("unet", {}, (64, 64, 64), 2, half=False) > 2 * 64**3 * 4  # at least the input


def test_estimate_is_cached_and_leaves_the_random_stream_alone(monkeypatch):
    kwargs = {"channels": [4, 8], "strides": [2]}  # not measured yet in this session
    state = torch.get_rng_state()
    first = memory.footprint("unet", kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(memory, "build_model", lambda *a, **k: pytest.fail("measured twice"))
    assert memory.footprint("unet", dict(kwargs)) == first


def test_a_window_is_checked_with_the_checkpoints_network(cpu_of_16_gib):
    cfg = load_config(None, ["model.kwargs={init_features: 4, depth: 2}"])
    ckpt = Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 1)
    ckpt.check_window(InferConfig(device="cpu"))
    with pytest.raises(VesuviusError, match=r"config key 'infer\.roi_size': a batch of 8 \(infer\.sw_batch_size\) "
                                            r"windows of \[1024, 1024, 1024\] through model 'resunet3d'"):
        ckpt.check_window(InferConfig(roi_size=(1024, 1024, 1024), sw_batch_size=8, device="cpu"))
    with pytest.raises(VesuviusError, match=r"'infer\.roi_size': \[1002, 1002, 1002\] must be multiples of 4"):
        ckpt.check_window(InferConfig(roi_size=(1002, 1002, 1002), device="cpu"))  # the divisor first, as before


@pytest.mark.parametrize("override, key", [("transforms.patch_size=[4096,4096,4096]", "transforms.patch_size"),
                                           ("infer.roi_size=[10000,10000,10000]", "infer.roi_size")])
def test_train_refuses_sizes_that_cannot_fit_before_creating_anything(override, key, synthetic_root, tmp_path,
                                                                      tiny_args, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_args(synthetic_root, out), override]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: config key '{key}': ") and re.search(r"needs at least [\d.]+ TiB of memory", line)
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "tune-postprocess"])
def test_inference_commands_refuse_a_window_that_cannot_fit(command, trained_run, synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    extra = {"evaluate": [], "tune-postprocess": [],
             "predict": ["--input", str(synthetic_root / "images" / "frag_004.nii.gz"),
                         "--output", str(tmp_path / "p.zarr")]}[command]
    args = [command, "--checkpoint", str(run / "checkpoints" / "best.pt"), *extra, "infer.roi_size=[10000,10000,10000]"]
    assert main(args) == 2
    assert re.match(r"error: config key 'infer\.roi_size': a batch of 4 \(infer\.sw_batch_size\) windows of "
                    r"\[10000, 10000, 10000\] through model 'resunet3d' needs at least [\d.]+ TiB", error_line(capsys))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list_models())
def test_estimates_are_at_most_what_cuda_allocates(name):
    """The estimates are lower bounds: a float32 training step and an inference batch allocate at least as much."""
    cuda = torch.device("cuda")
    model = build_model(name).to(cuda)
    optimizer = torch.optim.AdamW(model.parameters())
    size, batch = (64, 64, 64), 2
    x = torch.randn(batch, 1, *size, device=cuda)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - sum(p.numel() * 4 for p in model.parameters()) - x.numel() * 4
    model(x).mean().backward()
    optimizer.step()
    trained = torch.cuda.max_memory_allocated() - base
    assert trained >= memory.training_bytes(name, {}, size, batch, half=False)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    model.eval()
    with torch.no_grad():
        model(x)
    inferred = torch.cuda.max_memory_allocated() - base
    assert inferred >= memory.inference_bytes(name, {}, size, batch, half=False)
    assert math.isfinite(trained)
