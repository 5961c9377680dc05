from pathlib import Path

import pytest
import yaml

from vesuvius_monai.config import Config, load_config, save_config, to_dict
from vesuvius_monai.errors import VesuviusError

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=12", "model.kwargs.init_features=8", "transforms.patch_size=[32,32,32]"])
    assert cfg.train.steps == 12
    assert cfg.model.kwargs == {"init_features": 8}
    assert cfg.transforms.patch_size == (32, 32, 32)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(VesuviusError, match=r"unknown config key 'train.stepz'.*did you mean 'steps'"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(VesuviusError, match="unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("train.schedule=linear", "train.schedule"),
    ("train.steps=abc", "train.steps"),
    ("transforms.patch_size=[32,32]", "transforms.patch_size"),
    ("transforms.flip_prob=1.5", "transforms.flip_prob"),
    ("transforms.rot90_prob=0.5", "transforms.rot90_prob"),  # with a non-square patch below
    ("infer.overlap=1.0", "infer.overlap"),
    ("data.ignore_index=1", "data.ignore_index"),
])
def test_bad_values_name_the_key(override, key):
    extra = ["transforms.patch_size=[32,32,64]"] if key == "transforms.rot90_prob" else []
    with pytest.raises(VesuviusError, match=key.replace(".", r"\.")):
        load_config(None, extra + [override])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "model.kwargs={init_features: 8}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 7


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(VesuviusError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(VesuviusError, match="bad.yaml"):
        load_config(bad)
