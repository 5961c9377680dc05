"""``train --folds k`` / ``--seeds``: k runs for an ensemble, one command away from its evaluation."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.engine.multi_run import fold_overrides, parse_seeds
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint


def test_folds_deal_the_train_and_val_fragments_and_keep_the_test_ones_out(tiny_config):
    """frag_000 .. frag_003 are train + val (frag_004 is test): every one validates in exactly one fold."""
    for k in (2, 3, 4):
        runs = fold_overrides(tiny_config, k)
        assert [name for name, _ in runs] == [f"fold{i}" for i in range(k)]
        vals = [load_config(None, overrides).data.val_fragments for _, overrides in runs]
        tests = {tuple(load_config(None, overrides).data.test_fragments) for _, overrides in runs}
        assert sorted(sum(vals, [])) == [f"frag_00{i}" for i in range(4)] and tests == {("frag_004",)}
    for k in (1, 5):
        with pytest.raises(VesuviusError, match=rf"--folds {k}: need 2 <= k <= 4"):
            fold_overrides(tiny_config, k)


def test_seeds_are_parsed():
    assert parse_seeds("0,1, 7") == [0, 1, 7]
    for text in ("a,b", "1,1", "-1", ""):
        with pytest.raises(VesuviusError, match="--seeds"):
            parse_seeds(text)


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, names", [("--folds", "2", ["fold0", "fold1"]),
                                                ("--seeds", "0,3", ["seed0", "seed3"])])
def test_train_writes_k_runs_and_logs_the_ensemble_command(synthetic_root, tiny_args, tmp_path, caplog, flag, value,
                                                           names):
    out = tmp_path / "runs"
    with caplog.at_level(logging.INFO, logger="vesuvius_monai"):
        assert main(["train", *tiny_args(synthetic_root, out), "train.steps=2", flag, value]) == 0
    assert sorted(p.name for p in out.iterdir()) == names
    splits = [json.loads((out / n / "splits.json").read_text()) for n in names]
    assert all(s["test"] == ["frag_004"] for s in splits)
    if flag == "--folds":
        assert sorted(splits[0]["val"] + splits[1]["val"]) == [f"frag_00{i}" for i in range(4)]
        assert set(splits[0]["train"]) == set(splits[1]["val"])
    else:
        seeds = [Checkpoint.load(out / n / "checkpoints" / "last.pt").config["seed"] for n in names]
        assert seeds == [0, 3]
        weights = [Checkpoint.load(out / n / "checkpoints" / "last.pt").model_state for n in names]
        assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    command = re.search(r"the ensemble of these 2 runs: vesuvius-monai (evaluate .*)", caplog.text)
    assert command, caplog.text
    argv = command[1].split() + ["--out", str(tmp_path / "eval"), "evaluate.metrics=[dice]"]
    assert argv.count("--checkpoint") == 2
    assert main(argv) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["ensemble"]["n_members"] == 2
