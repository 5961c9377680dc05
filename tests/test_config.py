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
    assert cfg.model.kwargs == {"init_features": 8, "depth": 3, "stem_stride": 2}  # a dotted key sets one keyword
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

    code = ("import sys, vesuvius_monai.config; "
            "print(sorted(m for m in ('torch', 'monai', 'skimage', 'scipy') if m in sys.modules))")
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


# --------------------------------------------------------------------------- one resolution, in one order


def test_layers_resolve_in_one_order(tmp_path):
    """built-in defaults < stored config < plan < postprocess.json < config file < overrides, key by key."""
    from vesuvius_monai.config import dotted_layer, mapping_layer, resolve_config

    stored = mapping_layer("ckpt", {"seed": 1, "train": {"steps": 11, "lr": 0.01, "batch_size": 3},
                                    "postprocess": {"threshold": 0.1}})
    plan = dotted_layer("plan", {"train.steps": 22, "train.val_every": 7, "train.lr": 0.02})
    tuned = dotted_layer("tuned", {"postprocess.threshold": 0.4, "postprocess.min_size": 9})
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.03, warmup_steps: 5}\n")
    cfg = resolve_config(path, ["train.warmup_steps=6"], base=stored, fills=[plan, tuned])
    assert cfg.seed == 1 and cfg.train.batch_size == 3  # stored, nothing above
    assert cfg.train.steps == 22 and cfg.train.val_every == 7  # plan over stored
    assert (cfg.postprocess.threshold, cfg.postprocess.min_size) == (0.4, 9)  # postprocess.json over stored
    assert cfg.train.lr == 0.03  # the config file sets it: the plan's does not fill it
    assert cfg.train.warmup_steps == 6  # overrides last
    assert cfg.train.schedule == "cosine" and cfg.infer.roi_size == (64, 64, 64)  # built-in defaults


def test_fills_only_keys_the_user_leaves_out():
    from vesuvius_monai.config import dotted_layer, resolve_config

    plan = dotted_layer("plan", {"model.kwargs.init_features": 12, "model.kwargs.depth": 2, "train.steps": 5})
    tuned = dotted_layer("tuned", {"postprocess.threshold": 0.4, "postprocess.min_size": 9})
    cfg = resolve_config(None, ["model.kwargs.depth=3", "postprocess.threshold=0.6"], fills=[plan, tuned])
    assert cfg.model.kwargs == {"init_features": 8, "depth": 3, "stem_stride": 2}  # one model keyword: none planned
    assert cfg.train.steps == 5
    assert (cfg.postprocess.threshold, cfg.postprocess.min_size) == (0.6, 9)
    whole = resolve_config(None, ["postprocess={}"], fills=[tuned])  # the section given as a whole: nothing filled
    assert (whole.postprocess.threshold, whole.postprocess.min_size) == (0.5, 0)


def test_mappings_replace_whole_values_and_dotted_keys_set_one():
    cfg = load_config(None, ["model.kwargs={init_features: 4, depth: 2}"])
    assert cfg.model.kwargs == {"init_features": 4, "depth": 2}
    cfg = load_config(None, ["model.kwargs={init_features: 4, depth: 2}", "model.kwargs.norm_groups=4"])
    assert cfg.model.kwargs == {"init_features": 4, "depth": 2, "norm_groups": 4}
    assert load_config(None, ["train.loss.cldice=0.5"]).train.loss.active() == {"dice": 1.0, "bce": 1.0, "cldice": 0.5}
    assert load_config(None, ["train.loss={cldice: 0.5}"]).train.loss.active() == {"dice": 1.0, "cldice": 0.5}
    assert load_config(None, ["transforms={patch_size: [32, 32, 32]}"]).transforms.pos_fraction == 0.5  # merged


def test_another_network_starts_from_its_own_keywords(tmp_path):
    from vesuvius_monai.config import ModelConfig, dotted_layer, resolve_config

    assert load_config(None, ["model.name=unet"]).model.kwargs == {}
    assert ModelConfig(name="unet").kwargs == {} and ModelConfig().kwargs == {"init_features": 8, "depth": 3,
                                                                               "stem_stride": 2}
    path = tmp_path / "unet.yaml"
    path.write_text("model: {name: unet}\n")
    plan = dotted_layer("plan", {"model.kwargs.channels": [4, 8], "model.kwargs.strides": [2]})
    cfg = resolve_config(path, [], fills=[plan])  # a plan made for that network fills its keywords
    assert cfg.model.kwargs == {"channels": [4, 8], "strides": [2]}


def test_an_error_names_the_layer_that_set_the_key(tmp_path):
    from vesuvius_monai.config import dotted_layer, resolve_config

    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 0}\n")
    with pytest.raises(VesuviusError, match=rf"^{path}: config key 'train.steps'"):
        load_config(path)
    with pytest.raises(VesuviusError, match=r"^config key 'train\.lr'"):  # the command line: no file named
        load_config(path, ["train.steps=3", "train.lr=-1"])
    with pytest.raises(VesuviusError, match=r"^runs/x/plan\.yaml: config key 'train\.val_every'"):
        resolve_config(None, [], fills=[dotted_layer("runs/x/plan.yaml", {"train.val_every": 0})])
    with pytest.raises(VesuviusError, match=r"config key 'train\.steps\.x': 'steps' is not a section"):
        load_config(None, ["train.steps.x=3"])


def test_the_built_in_defaults_are_the_recipe_and_demo_differs_only_in_data_and_budget():
    defaults, demo = to_dict(Config()), to_dict(load_config(Path(__file__).parents[1] / "configs" / "demo.yaml"))
    assert defaults["model"] == {"name": "resunet3d", "kwargs": {"init_features": 8, "depth": 3, "stem_stride": 2}}
    assert defaults["infer"]["tta_flip_axes"] == [0, 1, 2] and defaults["train"]["loss"]["bce"] == 1.0
    differ = {section for section in defaults if defaults[section] != demo[section]}
    assert differ == {"output_dir", "synth", "data", "train"}
    assert {k for k in defaults["train"] if defaults["train"][k] != demo["train"][k]} == {"max_minutes"}
