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


def test_importing_config_loads_no_heavy_library():
    import subprocess
    import sys

    code = "import sys, vesuvius_monai.config; print(sorted(m for m in ('torch', 'monai', 'skimage', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_loss_weights_one_rule_in_yaml_and_python():
    from vesuvius_monai.config import LossWeights
    from vesuvius_monai.losses import build_loss

    from_yaml = load_config(None, ["train.loss={bce: 1}"]).train.loss
    assert from_yaml == LossWeights(dice=1.0, bce=1.0)
    assert build_loss({"bce": 1}).weights == from_yaml
    assert build_loss({"dice": 0, "bce": 1}).weights.active() == {"bce": 1.0}


@pytest.mark.parametrize("override, key", [
    ("train.schedule=cosin", "train.schedule"),
    ("infer.blend=gauss", "infer.blend"),
    ("postprocess.connectivity=8", "postprocess.connectivity"),
    ("evaluate.leaderboard.topo_matching=exakt", "evaluate.leaderboard.topo_matching"),
    ("evaluate.metrics=[dice, dcie]", "evaluate.metrics"),
])
def test_choices_suggest_the_closest_option(override, key):
    with pytest.raises(VesuviusError, match=rf"'{key}'.*did you mean"):
        load_config(None, [override])


def test_sections_check_types_when_built_in_python():
    from vesuvius_monai.config import PostprocessConfig, SynthParams

    with pytest.raises(VesuviusError, match=r"'postprocess\.min_size': must be an integer"):
        PostprocessConfig(min_size=2.5)
    assert SynthParams(shape=[16, 20, 24]).shape == (16, 20, 24)  # lists become tuples


def test_old_keys_in_stored_configs_are_upgraded():
    from vesuvius_monai.config import config_from_raw

    cfg = config_from_raw({"synth": {"shape": [24, 32, 40], "n_fragments": 2}}, ["train.steps=3"])
    assert cfg.synth.params.shape == (24, 32, 40)
    assert cfg.synth.n_fragments == 2 and cfg.train.steps == 3
