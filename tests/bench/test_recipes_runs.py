"""The rows of a bench_recipes run and the folders they are evaluated into (bench/recipes_runs.py), without training:
post-processing choices are written by hand where the bench would tune them."""

import argparse
import json
from pathlib import Path

from recipes_runs import (METRICS, evaluation_folders, recipe, system_config, system_variants, tta_variants,
                          tuned_variants, untuned_variants)
from vesuvius_monai.config import build, dotted_layer, load_config, to_dict
from vesuvius_monai.io.run_dir import POSTPROCESS_FILE, RunDir


def bench_args(tmp_path: Path, **changes) -> argparse.Namespace:
    """bench_recipes' arguments (the defaults of its command line, run folder in ``tmp_path``)."""
    args = dict(config=None, overrides=[], run_dir=tmp_path / "runs", minutes=0.5, step_cap=1000,
                tune=["default"], default_inference=[], checkpoint="best")
    return argparse.Namespace(**{**args, **changes})


def write_choice(path: Path, threshold: float) -> None:
    """A post-processing choice as tune-postprocess writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    choice = {"threshold": threshold, "min_size": 0, "fill_holes_max": 0, "connectivity": 26}
    path.write_text(json.dumps({"postprocess": choice}))


def rows_and_folders(variants, run: RunDir, first: dict | None) -> list[tuple[str, str]]:
    return [(v.row, folder.relative_to(run.path).as_posix())
            for v, folder in zip(variants, evaluation_folders(variants, run, first))]


def test_fresh_tuned_run_with_tta(tmp_path) -> None:
    run = RunDir(tmp_path / "default")
    cfg = load_config()  # the built-in recipe mirrors at inference
    assert cfg.infer.tta_flip_axes
    tuned = build([dotted_layer("choice", {"postprocess.threshold": 0.3})])
    variants = tuned_variants("default", cfg, tuned)
    assert rows_and_folders(variants, run, None) == [
        ("default", "eval"), ("default_untuned", "eval_untuned"), ("default_plain", "eval_plain")]
    assert [v.cfg.postprocess.threshold for v in variants] == [0.3, 0.5, 0.5]
    assert variants[2].cfg.infer.tta_flip_axes == [] and not variants[2].cfg.infer.tta_rot90
    assert all(v.tune_seconds is None for v in variants)  # each reports the run's tuning
    plain = load_config(None, ["infer.tta_flip_axes=[]", "infer.tta_rot90=false"])
    assert [v.row for v in tuned_variants("default", plain, tuned)] == ["default", "default_untuned"]


def test_reused_run(tmp_path) -> None:
    run = RunDir(tmp_path / "default")
    cfg = load_config()
    tuned = build([dotted_layer("choice", {"postprocess.threshold": 0.3})])
    variants = tuned_variants("default", cfg, tuned)
    # eval/ holds the tuned evaluation of the fresh run: the tuned row is scored from it, the others from their own
    assert rows_and_folders(variants, run, {"config": to_dict(tuned)}) == [
        ("default", "eval"), ("default_untuned", "eval_untuned"), ("default_plain", "eval_plain")]
    # the choice was the config's own post-processing: the untuned row has eval/'s scoring too
    same = tuned_variants("default", cfg, cfg)
    assert rows_and_folders(same, run, {"config": to_dict(cfg)}) == [
        ("default", "eval"), ("default_untuned", "eval"), ("default_plain", "eval_plain")]
    # a system no longer tuned: eval/ holds another scoring
    assert rows_and_folders(untuned_variants("default", cfg), run, {"config": to_dict(tuned)}) == [
        ("default", "eval_untuned")]


def test_default_inference_system(tmp_path) -> None:
    args = bench_args(tmp_path, tune=["default"], default_inference=["basicunet"])
    dataset = tmp_path / "dataset.yaml"
    cfg = system_config(args, "basicunet", [], dataset, seed=0)
    run = RunDir(cfg.output_dir)
    assert run.path == tmp_path / "runs" / "seed0" / "basicunet"
    write_choice(run.path / "tune_tta" / POSTPROCESS_FILE, 0.4)  # an earlier tuning: reused, no checkpoint read
    variants, tune_seconds = system_variants(args, "basicunet", cfg, run, run.checkpoint("best"))
    assert tune_seconds != tune_seconds  # NaN: not in --tune
    fresh = [("basicunet", "eval"), ("basicunet_tta", "eval_tta"), ("basicunet_tta_tuned", "eval_tta_tuned")]
    assert rows_and_folders(variants, run, None) == fresh
    assert rows_and_folders(variants, run, {"config": to_dict(cfg)}) == fresh
    untuned, tta, tta_tuned = variants
    assert untuned.cfg.infer.tta_flip_axes == [] and tta.cfg.infer.tta_flip_axes == load_config().infer.tta_flip_axes
    assert tta_tuned.cfg.infer == tta.cfg.infer and tta_tuned.cfg.postprocess.threshold == 0.4
    assert tta.cfg.postprocess == cfg.postprocess
    assert [v.tune_seconds for v in variants[:2]] == [None, None]
    assert tta_tuned.tune_seconds != tta_tuned.tune_seconds  # NaN: the earlier tuning was reused
    assert [v.tune_seconds for v in tta_variants("x", tta.cfg, tta_tuned.cfg, 2.5)] == [None, 2.5]


def test_tuned_system_variants_use_the_runs_choice(tmp_path) -> None:
    args = bench_args(tmp_path)
    cfg = system_config(args, "default", [], tmp_path / "dataset.yaml", seed=1)
    run = RunDir(cfg.output_dir)
    write_choice(run.postprocess, 0.35)
    variants, tune_seconds = system_variants(args, "default", cfg, run, run.checkpoint("best"))
    assert [v.row for v in variants] == ["default", "default_untuned", "default_plain"]
    assert variants[0].cfg.postprocess.threshold == 0.35 and tune_seconds != tune_seconds


def test_system_config_is_the_key_value_config(tmp_path) -> None:
    """The config a run folder written before the bench built its fixed keys as a layer holds: it is reused."""
    args = bench_args(tmp_path, overrides=["transforms.patch_size=[32,32,32]"], minutes=0.005, step_cap=100_000)
    dataset = tmp_path / "runs" / "dataset.yaml"
    for name, extra in (("default", ["model.kwargs={init_features: 4, depth: 2}"]), ("basicunet", [])):
        cfg = system_config(args, name, extra, dataset, seed=3)
        own = load_config(None, [*recipe(name), *args.overrides, *extra])
        warmup = round(args.step_cap * own.train.warmup_steps / own.train.steps)
        fixed = ["seed=3", f"output_dir={args.run_dir / 'seed3' / name}", f"data.dataset={dataset}",
                 f"train.max_minutes={args.minutes}", f"train.steps={args.step_cap}", f"train.warmup_steps={warmup}",
                 "evaluate.split=test", f"evaluate.metrics={json.dumps(METRICS)}",
                 "evaluate.save_probabilities=false", "evaluate.save_masks=true"]
        assert to_dict(cfg) == to_dict(load_config(None, [*recipe(name), *args.overrides, *extra, *fixed]))
