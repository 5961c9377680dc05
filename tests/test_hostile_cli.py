"""Hostile and broken input through the command line (issue 20, cases 2, 4, 12, 14): one line ``error: ...`` naming
the file and entry, exit status 2, nothing written outside its place, the user's files byte for byte intact."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers import error_line, snapshot
from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.nifti import write_nifti
from vesuvius_monai.models import build_model


NO_FIXED_SPLIT = ["data.val_fragments=[]", "data.test_fragments=[]"]  # the dataset YAML's splits decide


@pytest.fixture
def checkpoint(synthetic_root, tmp_path, tiny_args):
    """An untrained checkpoint of the tiny network (quick: no training), in ``tmp_path/run/checkpoints``."""
    cfg = load_config(None, tiny_args(synthetic_root, tmp_path / "run"))
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    torch.manual_seed(0)
    Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 1,
                  splits={"train": ["frag_000", "frag_001", "frag_002"]}).save(path)
    return path


def _dataset(folder, synthetic_root, entries):
    """A dataset YAML in ``folder`` listing ``entries`` ({id, frag, ...}: frag names a synthetic fragment)."""
    folder.mkdir(parents=True, exist_ok=True)
    fragments = [{**{k: v for k, v in e.items() if k != "frag"},
                  "image": str(synthetic_root / "images" / f"{e['frag']}.nii.gz"),
                  "label": str(synthetic_root / "labels" / f"{e['frag']}.nii.gz"), "split": "test"} for e in entries]
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"fragments": fragments}))
    return path


# --------------------------------------------------------------------------- case 2 and 4: fragment ids


def test_evaluate_refuses_an_id_that_leaves_the_output_folder(checkpoint, synthetic_root, tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "c"
    dataset = _dataset(deep, synthetic_root, [{"id": "../../../ESCAPED", "frag": "frag_004"}])
    before = snapshot(synthetic_root)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(deep / "eval"),
                 f"data.dataset={dataset}", *NO_FIXED_SPLIT]) == 2
    line = error_line(capsys)
    assert "data.yaml: fragments[0].id '../../../ESCAPED' holds a path separator" in line
    assert not [p for p in tmp_path.rglob("*ESCAPED*")]
    assert not (deep / "eval").exists()
    assert snapshot(synthetic_root) == before


def test_evaluate_refuses_duplicate_ids_naming_both_entries(checkpoint, synthetic_root, tmp_path, capsys):
    dataset = _dataset(tmp_path / "d", synthetic_root, [{"id": "same", "frag": "frag_003"},
                                                        {"id": "same", "frag": "frag_004"}])
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"),
                 f"data.dataset={dataset}", *NO_FIXED_SPLIT]) == 2
    assert "fragments[0] and fragments[1] have the same id 'same'" in error_line(capsys)
    assert not (tmp_path / "eval").exists()


def test_predict_refuses_an_input_whose_name_cannot_be_an_output_name(checkpoint, synthetic_root, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(synthetic_root / "images" / "frag_000.nii.gz", inputs / "a\tb.nii.gz")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs),
                 "--output", str(tmp_path / "out")]) == 2
    assert "holds a control character" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- case 12: checkpoints that do not fit


def _changed(payload: dict, change: str) -> dict:
    payload = dict(payload)
    if change == "unknown name":
        payload["model_name"] = "nosuchnet"
    elif change == "another network":
        payload["model_name"] = "unet"
    elif change == "no model":
        del payload["model"]
    elif change == "wrong shapes":
        payload["model"] = {k: torch.zeros(3) for k in payload["model"]}
    elif change == "not tensors":
        payload["model"] = {5: "x"}
    elif change == "bad keyword value":
        payload["model_kwargs"] = {**payload["model_kwargs"], "depth": "x"}
    elif change == "bad splits":
        payload["splits"] = {"train": 5}
    return payload


@pytest.mark.parametrize("change, expect", [
    ("unknown name", "its network cannot be built here: unknown model 'nosuchnet'"),
    ("another network", "its network cannot be built here: model 'unet' got an unknown keyword"),
    ("no model", "lacks the entry 'model'"),
    ("wrong shapes", "its weights do not fit its network resunet3d"),
    ("not tensors", "its 'model' entry must map parameter names to tensors"),
    ("bad keyword value", "model.kwargs.depth"),
    ("bad splits", "its 'splits' entry must map split names to lists of fragment ids"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_checkpoint_that_does_not_fit_its_model_is_one_line(checkpoint, synthetic_root, tmp_path, capsys, change,
                                                              expect, command):
    bad = tmp_path / "bad.pt"
    torch.save(_changed(torch.load(checkpoint, weights_only=True), change), bad)
    before = bad.read_bytes()
    out = tmp_path / ("p.nii.gz" if command == "predict" else "eval")
    where = (["--input", str(synthetic_root / "images" / "frag_000.nii.gz"), "--output", str(out)]
             if command == "predict" else ["--out", str(out)])
    assert main([command, "--checkpoint", str(bad), *where]) == 2
    line = error_line(capsys)
    assert "bad.pt" in line and expect in line, line
    assert not out.exists() and bad.read_bytes() == before


# --------------------------------------------------------------------------- case 14: paths of the wrong kind


@pytest.mark.parametrize("entry, expect", [
    ({"image": 5}, "fragments[0].image must be a path (a non-empty string), got 5"),
    ({"image": "images/frag_000.nii.gz", "label": ["labels/frag_000.nii.gz"]},
     "fragments[0].label must be a path (a string), got ['labels/frag_000.nii.gz']"),
])
def test_a_dataset_path_that_is_not_a_string_is_one_line(checkpoint, synthetic_root, tmp_path, capsys, entry, expect):
    (tmp_path / "d").mkdir()
    dataset = tmp_path / "d" / "data.yaml"
    dataset.write_text(yaml.safe_dump({"fragments": [entry]}))
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"),
                 f"data.dataset={dataset}", *NO_FIXED_SPLIT]) == 2
    line = error_line(capsys)
    assert "data.yaml" in line and expect in line, line


@pytest.mark.parametrize("flag, name", [("--output", "afile/x.nii.gz"), ("--output", "afile/x.zarr"),
                                        ("--output", "afile/folder"), ("--mask", "afile/m.nii.gz")])
def test_an_output_through_an_existing_file_is_one_line_and_writes_nothing(checkpoint, synthetic_root, tmp_path,
                                                                           capsys, flag, name):
    (tmp_path / "work").mkdir()
    afile = tmp_path / "work" / "afile"
    afile.write_bytes(b"the user's file")
    outputs = {"--output": str(tmp_path / "work" / "ok.nii.gz"), flag: str(tmp_path / "work" / name)}
    args = [a for flag_, path in outputs.items() for a in (flag_, path)]
    assert main(["predict", "--checkpoint", str(checkpoint), "--input",
                 str(synthetic_root / "images" / "frag_000.nii.gz"), *args]) == 2
    line = error_line(capsys)
    assert f"{flag} {tmp_path / 'work' / name}" in line and "afile is a file, not a folder" in line, line
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["afile"]
    assert afile.read_bytes() == b"the user's file"


def test_an_evaluation_folder_through_an_existing_file_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"mine")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "afile" / "eval")]) == 2
    assert "afile is a file, not a folder" in error_line(capsys)
    assert (tmp_path / "afile").read_bytes() == b"mine"


def test_an_untrained_checkpoint_still_predicts(checkpoint, synthetic_root, tmp_path):
    out = tmp_path / "p.nii.gz"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input",
                 str(synthetic_root / "images" / "frag_000.nii.gz"), "--output", str(out)]) == 0
    assert out.is_file() and np.isfinite(np.asarray(nib.load(out).dataobj)).all()


def test_a_tuning_folder_through_an_existing_file_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"mine")
    assert main(["tune-postprocess", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "afile" / "t")]) == 2
    assert "--out" in (line := error_line(capsys)) and "afile is a file, not a folder" in line
    assert (tmp_path / "afile").read_bytes() == b"mine"


# --------------------------------------------------------------------------- case 7: labels without a labelled voxel


@pytest.mark.parametrize("ignored, split, named", [  # the tiny run: val frag_003, test frag_004, train the others
    (["frag_000", "frag_001", "frag_002", "frag_003", "frag_004"], "val", "frag_003"),
    pytest.param(["frag_000", "frag_001", "frag_002"], "train", "frag_000", marks=pytest.mark.slow)])
def test_train_refuses_a_split_without_a_labelled_voxel(synthetic_root, tmp_path, capsys, tiny_args, ignored, split,
                                                       named):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for frag_id in ignored:
        write_nifti(root / "labels" / f"{frag_id}.nii.gz", np.full((32, 40, 40), 2, np.uint8))
    before = snapshot(root)
    assert main(["train", *tiny_args(root, tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert f"the {split} fragments have no labelled voxel" in line and f"labels/{named}.nii.gz" in line, line
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert snapshot(root) == before


@pytest.mark.parametrize("command", ["train", "synth", "plan"])
def test_a_run_or_data_folder_through_an_existing_file_is_one_line(synthetic_root, tmp_path, capsys, tiny_args,
                                                                    command):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = tiny_args(synthetic_root, afile / "run")
    if command == "synth":
        args = [*args, f"data.root={afile / 'data'}"]
    if command == "plan":
        args = [*args, "train.max_minutes=1"]
    assert main([command, *args]) == 2
    line = error_line(capsys)
    assert "afile is a file, not a folder" in line
    assert afile.read_text() == "keep me"
