"""Checkpoint: typed fields, written and read back, and one clear error for each kind of bad file."""

import pytest
import torch

from vesuvius_monai.config import load_config
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.models import build_model

TINY = ["model.kwargs={init_features: 4, depth: 2}"]


def tiny_checkpoint(**state) -> Checkpoint:
    cfg = load_config(None, TINY)
    return Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 3, **state)


def test_fields_round_trip_and_rebuild_the_model(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    model = build_model("resunet3d", init_features=4, depth=2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpoint.of(load_config(None, TINY), model, 3, optimizer=optimizer, splits={"train": ["a"]}, items=6,
                         world_size=2, best_metric=0.5)
    ckpt.save(path)
    again = Checkpoint.load(path)
    assert (again.step, again.items, again.world_size, again.best_metric) == (3, 6, 2, 0.5)
    assert again.trained_on == ["a"] and again.optimizer["param_groups"] and again.scaler is None
    assert again.run == RunDir(tmp_path / "run") and again.path == path
    assert again.run_config().model.kwargs == {"init_features": 4, "depth": 2}
    rebuilt = again.model()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert not rebuilt.training


def test_a_checkpoint_missing_an_entry_is_named(tmp_path):
    path = tmp_path / "c.pt"
    tiny_checkpoint().save(path)
    payload = torch.load(path, weights_only=True)
    del payload["model_kwargs"]
    torch.save(payload, path)
    with pytest.raises(VesuviusError, match=r"c\.pt lacks the entry 'model_kwargs'"):
        Checkpoint.load(path)


def test_weights_that_do_not_fit_their_network_are_named(tmp_path):
    path = tmp_path / "c.pt"
    ckpt = tiny_checkpoint()
    Checkpoint(step=1, config=ckpt.config, model_name="resunet3d", model_kwargs={"init_features": 8, "depth": 2},
               model_state=ckpt.model_state).save(path)
    with pytest.raises(VesuviusError, match=r"c\.pt: its weights do not fit its network resunet3d"):
        Checkpoint.load(path).model()


@pytest.mark.parametrize("content, message", [(b"not a checkpoint", "corrupt or not a torch file"),
                                              (None, "not found")])
def test_missing_and_corrupt_files(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VesuviusError, match=message):
        Checkpoint.load(path)
