"""End to end through the command line: synth -> train -> evaluate -> predict, and bad input."""

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import error_line, snapshot
from vesuvius_monai.cli import main
from vesuvius_monai.io.nifti import write_nifti


@pytest.fixture
def trained(trained_run, synthetic_root, tmp_path_factory, tiny_args):
    """A copy of the run the CLI trained on the tiny synthetic set (the tests write into it): (overrides, run
    folder)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(trained_run, out)
    return tiny_args(synthetic_root, out), out


def test_synth_writes_fragments(tmp_path):
    assert main(["synth", f"data.root={tmp_path}", "synth.n_fragments=2", "synth.params.shape=[24,24,24]"]) == 0
    images = sorted((tmp_path / "images").iterdir())
    assert [p.name for p in images] == ["frag_000.nii.gz", "frag_001.nii.gz"]
    assert nib.load(images[0]).shape == (24, 24, 24)


def test_train_evaluate_predict(trained, synthetic_root, tmp_path, capsys):
    args, run = trained
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), *args]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["fragments"]) == {"frag_004"}
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    assert metrics["mean_dice"] == pytest.approx(metrics["fragments"]["frag_004"]["dice"])
    header = (run / "eval" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["fragment", "dice"]
    source = nib.load(synthetic_root / "images" / "frag_004.nii.gz")
    for kind in ("prob", "mask"):
        out = nib.load(run / "eval" / "predictions" / f"frag_004_{kind}.nii.gz")
        assert out.shape == source.shape
        np.testing.assert_allclose(out.affine, source.affine)
    assert (run / "eval" / "predictions" / "frag_004_slices.png").stat().st_size > 1000

    pred = tmp_path / "pred.nii.gz"
    assert main(["predict", "--checkpoint", str(run / "checkpoints/best.pt"),
                 "--input", str(synthetic_root / "images" / "frag_000.nii.gz"), "--output", str(pred)]) == 0
    probs = nib.load(pred)
    assert probs.shape == source.shape
    np.testing.assert_allclose(probs.affine, source.affine)
    data = probs.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_config_key(capsys, tmp_path):
    assert main(["train", f"output_dir={tmp_path}", "train.stepz=3"]) == 2
    assert "train.stepz" in error_line(capsys)


def test_unknown_model_name(synthetic_root, tmp_path, capsys, tiny_args):
    assert main(["train", *tiny_args(synthetic_root, tmp_path / "r"), "model.name=resunt3d"]) == 2
    line = error_line(capsys)
    assert "resunt3d" in line and "resunet3d" in line


def _dataset_copy(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.mark.parametrize("problem, expect", [
    ("missing", r"frag_000\.nii\.gz"),
    ("corrupt", r"images/frag_000\.nii\.gz"),
    ("shape", r"labels/frag_000\.nii\.gz has shape"),
    ("values", r"labels/frag_000\.nii\.gz has values \[5\]"),
    ("nan", r"images/frag_000\.nii\.gz.*NaN"),
])
def test_bad_data_gets_one_clear_error(problem, expect, synthetic_root, tmp_path, capsys, tiny_args):
    root = _dataset_copy(synthetic_root, tmp_path)
    image, label = root / "images" / "frag_000.nii.gz", root / "labels" / "frag_000.nii.gz"
    if problem == "missing":
        label.unlink()
    elif problem == "corrupt":
        image.write_bytes(image.read_bytes()[: 200])
    elif problem == "shape":
        write_nifti(label, np.zeros((32, 40, 41), np.uint8))
    elif problem == "values":
        write_nifti(label, np.full((32, 40, 40), 5, np.uint8))
    elif problem == "nan":
        write_nifti(image, np.full((32, 40, 40), np.nan, np.float32))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    args = tiny_args(root, tmp_path / "run") + ["data.val_fragments=[frag_000]", "data.test_fragments=[frag_004]"]
    assert main(["train", *args]) == 2
    assert re.search(expect, error_line(capsys))
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}  # inputs untouched
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_predict_errors_leave_existing_output(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "keep.nii.gz"
    out.write_bytes(b"previous result")
    assert main(["predict", "--checkpoint", str(run / "checkpoints/best.pt"), "--input", str(tmp_path / "none.nii.gz"),
                 "--output", str(out)]) == 2
    assert "none.nii.gz" in error_line(capsys)
    assert out.read_bytes() == b"previous result"
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(bad_ckpt), "--input", str(tmp_path / "x.nii.gz"),
                 "--output", str(out)]) == 2
    assert "bad.pt" in error_line(capsys)


@pytest.mark.slow
def test_tune_postprocess_then_evaluate_uses_the_choice(trained, capsys):
    args, run = trained
    ckpt = str(run / "checkpoints/best.pt")
    assert main(["tune-postprocess", "--checkpoint", ckpt, *args]) == 0
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["fragments"] == ["frag_003"]
    assert tuned["postprocess"] == tuned["base"] and "one validation fragment" in tuned["reason"]  # the guard
    assert len(tuned["scores"]) > 10 and all(len(v) == 1 for v in tuned["scores"].values())
    chosen = {"threshold": 0.35, "min_size": 7, "fill_holes_max": 0, "connectivity": 6}
    (run / "postprocess.json").write_text(json.dumps(dict(tuned, postprocess=chosen)))  # as if two fragments chose
    out = run / "eval_tta"
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(out), *args, "infer.tta_flip_axes=[0,1,2]",
                 "postprocess.min_size=10"]) == 0
    report = (out / "report.html").read_text()
    assert "frag_004" in report and "data:image/png;base64," in report and "leaderboard" in report
    metrics = json.loads((out / "metrics.json").read_text())
    saved = metrics["config"]
    assert saved["infer"]["tta_flip_axes"] == [0, 1, 2]
    assert {k: saved["postprocess"][k] for k in chosen} == dict(chosen, min_size=10)  # the run's choice, except the
    # key the user set
    from vesuvius_monai.metrics import topo_matching_used

    assert metrics["topo_matching"] == topo_matching_used("exact")  # which matching produced the TopoScore
    assert "TopoScore matching" in report


def test_evaluate_refuses_training_fragments(trained, capsys):
    args, run = trained
    ckpt = str(run / "checkpoints/best.pt")
    assert main(["evaluate", "--checkpoint", ckpt, *args, "data.test_fragments=[frag_000]",
                 "data.val_fragments=[frag_003]"]) == 2
    assert "frag_000" in error_line(capsys)


def test_mask_may_not_replace_the_input(trained, synthetic_root, tmp_path, capsys):
    _, run = trained
    image = synthetic_root / "images" / "frag_000.nii.gz"
    before = image.read_bytes()
    assert main(["predict", "--checkpoint", str(run / "checkpoints/best.pt"), "--input", str(image),
                 "--output", str(tmp_path / "p.nii.gz"), "--mask", str(image)]) == 2
    assert "--mask" in error_line(capsys)
    assert image.read_bytes() == before


# ----------------------------------------------------------------------------------------- nothing lost


def test_evaluate_never_replaces_a_foreign_folder(trained, tmp_path, capsys):
    args, run = trained
    ckpt = str(run / "checkpoints/best.pt")
    before = snapshot(run)  # the run folder: checkpoints, config.yaml, logs, tensorboard
    (run / "notes.txt").write_text("my notes")
    before["notes.txt"] = b"my notes"
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(run), *args]) == 2
    assert str(run) in error_line(capsys)
    assert snapshot(run) == before  # byte for byte
    assert main(["evaluate", "--checkpoint", ckpt, "--out", ".", *args]) == 2
    assert "did not write" in error_line(capsys)  # one line, no traceback for '.'


@pytest.mark.slow
def test_evaluate_rerun_replaces_only_its_own_folder(trained, capsys):
    args, run = trained
    ckpt = str(run / "checkpoints/best.pt")
    out = run / "eval_rerun"
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(out), *args]) == 0
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(out), *args]) == 0  # an earlier evaluation: replaced
    (out / "predictions" / "my_annotation.txt").write_text("keep me")
    before = snapshot(out)
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(out), *args]) == 2
    assert "my_annotation.txt" in error_line(capsys)
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".eval_rerun")]  # no work folder left behind


def test_synth_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert main(["synth", f"data.root={tmp_path}", "synth.n_fragments=1", "synth.params.shape=[16,16,16]"]) == 2
    assert "data.root" in error_line(capsys)
    assert snapshot(tmp_path) == {"mine.txt": b"x"}


def test_tune_postprocess_refuses_training_fragments(trained, capsys):
    args, run = trained
    assert main(["tune-threshold", "--checkpoint", str(run / "checkpoints/best.pt"), *args,  # the old name still works
                 "data.val_fragments=[frag_000]", "data.test_fragments=[frag_004]"]) == 2
    assert "frag_000" in error_line(capsys)
    assert not (run / "postprocess.json").exists()


def test_tune_postprocess_never_replaces_a_file_it_did_not_write(trained, tmp_path, capsys):
    args, run = trained
    foreign = tmp_path / "postprocess.json"
    foreign.write_text('{"my": "notes"}')
    assert main(["tune-postprocess", "--checkpoint", str(run / "checkpoints/best.pt"), "--out", str(tmp_path),
                 *args]) == 2
    assert "postprocess.json" in error_line(capsys)
    assert foreign.read_text() == '{"my": "notes"}'


def test_evaluate_needs_no_training_fragments(trained, synthetic_root, tmp_path):
    args, run = trained
    data = tmp_path / "new_data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for kind in ("images", "labels"):  # a new data set: two fragments the model never saw, both for testing
        for i in ("frag_003", "frag_004"):
            shutil.copy(synthetic_root / kind / f"{i}.nii.gz", data / kind / f"new_{i}.nii.gz")
    out = tmp_path / "eval_new"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), "--out", str(out),
                 f"data.root={data}", "data.val_fragments=[]", "data.test_fragments=[new_frag_003, new_frag_004]"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["fragments"]) == {"new_frag_003", "new_frag_004"}


def test_checkpoint_with_code_objects_is_refused_as_unsafe(tmp_path, capsys):
    import torch

    bad = tmp_path / "evil.pt"
    torch.save({"format": "vesuvius_monai.checkpoint/1", "payload": np.random.default_rng(0)}, bad)
    assert main(["evaluate", "--checkpoint", str(bad), f"output_dir={tmp_path}"]) == 2
    line = error_line(capsys)
    assert "evil.pt" in line and "not allowed to load" in line


@pytest.mark.slow
def test_plan_then_train_uses_the_plan_for_keys_the_config_leaves_out(synthetic_root, tmp_path, capsys, tiny_args):
    import yaml

    run = tmp_path / "planned"
    args = [a for a in tiny_args(synthetic_root, run) if not a.startswith(("train.steps=", "train.val_every="))]
    args += ["train.max_minutes=0.4"]
    assert main(["plan", *args]) == 0
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    printed = capsys.readouterr().out
    assert all(key in printed for key in plan["values"])  # every planned key is printed with its reason
    assert main(["train", *args, "train.steps=3"]) == 0
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert used["train"]["steps"] == 3  # set by the user: kept
    assert used["train"]["val_every"] == plan["values"]["train.val_every"]  # left out: planned
    assert used["model"]["kwargs"]["init_features"] == 4  # the tiny model is the user's: kept whole


@pytest.mark.parametrize("command", ["evaluate", "tune-postprocess"])
def test_bad_window_is_named_at_every_entry(trained, command, capsys):
    args, run = trained
    assert main([command, "--checkpoint", str(run / "checkpoints/best.pt"), *args, "infer.roi_size=[18,18,18]"]) == 2
    line = error_line(capsys)
    assert "infer.roi_size" in line and "[18, 18, 18]" in line


# ----------------------------------------------------------------------------------------- issue 20


@pytest.mark.slow
def test_a_choice_tuned_on_another_checkpoint_is_named(trained, synthetic_root, tmp_path, caplog):
    import dataclasses
    import hashlib

    from vesuvius_monai.io.checkpoint import Checkpoint

    args, run = trained
    best = run / "checkpoints" / "best.pt"
    assert main(["tune-postprocess", "--checkpoint", str(best), *args]) == 0
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["checkpoint_step"] == Checkpoint.load(best).step
    assert tuned["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    newer = run / "checkpoints" / "newer.pt"  # trained on, say: another checkpoint of the same run
    dataclasses.replace(Checkpoint.load(best), step=99).save(newer)
    image = str(synthetic_root / "images" / "frag_000.nii.gz")
    with caplog.at_level("WARNING", logger="vesuvius_monai"):
        assert main(["evaluate", "--checkpoint", str(best), "--out", str(tmp_path / "e1"), *args]) == 0
        assert "tuned on another checkpoint" not in caplog.text  # its own checkpoint: not a word
        for command in (["evaluate", "--out", str(tmp_path / "e2")],
                        ["predict", "--input", image, "--output", str(tmp_path / "p.nii.gz")]):
            caplog.clear()
            assert main([command[0], "--checkpoint", str(newer), *command[1:], *args]) == 0
            assert (f"postprocess.json was tuned on another checkpoint ({best}, step {tuned['checkpoint_step']}) than "
                    f"{newer} (step 99)") in caplog.text


def test_evaluate_removes_what_a_killed_evaluate_left(trained, capsys):
    import signal
    import subprocess
    import sys

    args, run = trained
    code = ("import os, signal, sys; from vesuvius_monai.io.atomic import work_dir_beside; "
            "w = work_dir_beside(sys.argv[1]); (w / 'metrics.csv').write_text('half'); "
            "os.kill(os.getpid(), signal.SIGKILL)")  # what an evaluate killed mid-way leaves
    assert subprocess.run([sys.executable, "-c", code, str(run / "eval")]).returncode == -signal.SIGKILL
    assert [p.name for p in run.iterdir() if p.name.startswith(".eval.")]
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), *args]) == 0
    assert not [p.name for p in run.iterdir() if p.name.startswith(".eval.")]
    assert (run / "eval" / "metrics.json").is_file()


@pytest.mark.slow
def test_plan_refuses_a_budget_that_cannot_hold_the_set_up(synthetic_root, tmp_path, capsys, tiny_args):
    out = tmp_path / "planned"
    assert main(["plan", *tiny_args(synthetic_root, out), "train.max_minutes=0.001"]) == 2
    line = error_line(capsys)
    assert re.search(r"train.max_minutes': 0.001 min cannot hold the set-up .*give at least train.max_minutes="
                     r"0\.\d+", line), line
    assert not out.exists()


@pytest.mark.slow
def test_plan_and_tune_postprocess_refuse_a_run_folder_in_use(trained, capsys, tiny_args, synthetic_root):

    from vesuvius_monai.io.run_dir import LOCK_FILE, RunDir

    args, run = trained
    before = snapshot(run)
    with RunDir(run).lock("train"):  # a train running there (this process)
        assert main(["tune-postprocess", "--checkpoint", str(run / "checkpoints/best.pt"), *args]) == 2
        assert f"run folder {run} is in use by 'train'" in error_line(capsys)
        assert main(["plan", *args, "train.max_minutes=1"]) == 2
        assert f"run folder {run} is in use by 'train'" in error_line(capsys)
        assert set(snapshot(run)) == set(before) | {LOCK_FILE}
    assert snapshot(run) == before  # no postprocess.json, no plan.yaml
