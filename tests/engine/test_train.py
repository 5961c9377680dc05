import csv
import math

import pytest
import torch

from vesuvius_monai.config import TrainConfig
from vesuvius_monai.engine.train import lr_factor, train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import load_checkpoint, model_from_checkpoint


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor(TrainConfig(steps=100, warmup_steps=10, schedule="cosine"))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(99) < 0.02
    poly = lr_factor(TrainConfig(steps=100, warmup_steps=0, schedule="poly"))
    assert poly(50) == pytest.approx(0.5**0.9)


def test_train_writes_a_complete_run(tiny_config):
    run = train(tiny_config)
    for name in ("config.yaml", "train_log.csv", "learning_curve.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_dice"] and rows[3]["val_dice"]
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["step"] == 4
    assert payload["model_name"] == "resunet3d" and payload["model_kwargs"]["init_features"] == 4
    assert payload["config"]["train"]["steps"] == 4
    model, cfg = model_from_checkpoint(run / "checkpoints" / "best.pt")  # the checkpoint rebuilds its own model
    assert cfg.model.kwargs == tiny_config.model.kwargs
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_refuses_to_overwrite_a_run(tiny_config):
    train(tiny_config)
    with pytest.raises(VesuviusError, match="already holds a run"):
        train(tiny_config)


def test_resume_is_exact(make_tiny_config, tmp_path):
    straight, broken = make_tiny_config("straight"), make_tiny_config("broken")
    train(straight)
    train(broken, stop_at_step=2)
    assert load_checkpoint(tmp_path / "broken" / "checkpoints" / "last.pt")["step"] == 2
    train(broken, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert b["step"] == a["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = list(csv.DictReader((tmp_path / "broken" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_patch_size_must_fit_the_model(make_tiny_config):
    cfg = make_tiny_config("r", "transforms.patch_size=[18,16,16]")
    with pytest.raises(VesuviusError, match=r"transforms.patch_size.*multiples of 4"):
        train(cfg)


def test_resume_with_another_config_is_refused(make_tiny_config):
    train(make_tiny_config("r"), stop_at_step=2)
    with pytest.raises(VesuviusError, match=r"cannot resume.*train.lr"):
        train(make_tiny_config("r", "train.lr=0.5"), resume=True)


def test_splits_are_recorded(tiny_config):
    import json

    run = train(tiny_config)
    splits = json.loads((run / "splits.json").read_text())
    assert splits == {"train": ["frag_000", "frag_001", "frag_002"], "val": ["frag_003"], "test": ["frag_004"]}
    assert load_checkpoint(run / "checkpoints" / "best.pt")["splits"] == splits
