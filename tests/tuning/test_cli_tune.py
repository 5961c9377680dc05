"""tune-postprocess on a tiny trained run writes the chain search's steps, gains and cost; evaluate names the chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vesuvius_monai.cli import main


@pytest.mark.slow
def test_tune_postprocess_writes_per_operator_gains(synthetic_root, tiny_args, tmp_path, caplog):
    run = tmp_path / "run"
    split = ["data.val_fragments=[frag_002,frag_003]", "data.test_fragments=[frag_004]"]
    assert main(["train", *tiny_args(synthetic_root, run), *split]) == 0  # two validation fragments
    args = tiny_args(synthetic_root, run) + split + ["postprocess.threshold=0.95",
        "tune.rule=majority", "tune.operators=[threshold,closing,dust]", "tune.thresholds=[0.3,0.5,0.7]",
        "tune.close_radii=[[1,1,1]]", "tune.min_sizes=[8]", "tune.max_dice_drop=1.0"]
    ckpt = str(run / "checkpoints/best.pt")
    caplog.set_level("INFO")
    assert main(["tune-postprocess", "--checkpoint", ckpt, *args]) == 0
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["fragments"] == ["frag_002", "frag_003"]
    assert tuned["steps"] and tuned["steps"][0]["operator"] == "threshold"  # threshold 0.95 is far too high
    keys = {"operator", "before", "after", "sweep", "score_gain", "dice_gain", "held_out_gain"}
    assert keys <= set(tuned["steps"][0])
    assert all(s["held_out_gain"] > 0 for s in tuned["steps"])  # tune.halves is on by default: each change held
    chosen, base = tuned["scores"][tuned["chain"]], tuned["scores"][next(iter(tuned["scores"]))]
    assert sum(s["score_gain"] for s in tuned["steps"]) == pytest.approx(tuned["gain"]["score"])
    assert tuned["gain"]["score"] == pytest.approx(np.mean(chosen) - np.mean(base))
    assert tuned["cost"]["candidates"] == len(tuned["scores"]) and tuned["cost"]["seconds"] > 0
    assert "post-processing search:" in caplog.text and "masks scored" in caplog.text
    eval_args = [a for a in args if not a.startswith("postprocess.")]  # the tuned choice fills postprocess
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(run / "eval"), *eval_args]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["postprocess_chain"] == tuned["chain"]  # evaluate used the tuned chain and says so
    assert tuned["chain"] in (run / "eval" / "report.html").read_text()
