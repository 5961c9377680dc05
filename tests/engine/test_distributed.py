"""Data-parallel training under torchrun: 2 CPU processes (gloo) train like 1 process of twice the batch.

The loss is BCE alone (``train.loss={dice: 0, bce: 1}``) on fragments without an ignore region: BCE is a mean over
the voxels of a batch, so the mean of two ranks' means is the mean over their union. The batch Dice
(``batch=True``: one ratio of sums over the whole batch) does not split over ranks that way, nor does BCE when the
ranks' batches hold different numbers of labelled voxels.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vesuvius_monai.config import load_config
from vesuvius_monai.data.synthetic import SynthParams, write_synthetic_dataset
from vesuvius_monai.engine.distributed import DistContext, on_main, torchrun_env
from vesuvius_monai.engine.train import train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint

SCRIPT = """
import sys
from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.engine.train import train
out, args = sys.argv[1], sys.argv[2:]
assert main(["train", *args, f"output_dir={out}/two"]) == 0  # the command, as torchrun -m vesuvius_monai runs it
train(load_config(None, [*args, f"output_dir={out}/two_broken"]), stop_at_step=2)  # and a run stopped at step 2
budget = ["train.max_minutes=0.05", "train.steps=100000", "train.val_every=100000"]  # rank 0's clock stops all
train(load_config(None, [*args, *budget, f"output_dir={out}/two_budget"]))
"""


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    """Five small synthetic fragments without unlabelled boxes (and patches fit inside: no padding)."""
    root = tmp_path_factory.mktemp("clean")
    write_synthetic_dataset(root, 5, seed=3, params=SynthParams(shape=(24, 32, 32), ignore_fraction=0.0))
    return root


def overrides(root: Path, out: Path, batch: int) -> list[str]:
    """A 3-step run; norm_groups 2, since a GroupNorm with one channel per group gives the bias of the conv in front
    of it a zero gradient, of which Adam would amplify the rounding noise (ranks sum in another order)."""
    return [
        f"data.root={root}", f"output_dir={out}", "data.val_fragments=[frag_003]", "data.test_fragments=[frag_004]",
        "model.kwargs={init_features: 4, depth: 2, norm_groups: 2}", "transforms.patch_size=[16,16,16]",
        "infer.roi_size=[16,16,16]", "infer.sw_batch_size=4", "train.steps=3", f"train.batch_size={batch}",
        "train.val_every=100", "train.warmup_steps=1", "train.log_every=1", "train.loss={dice: 0, bce: 1}",
        "train.device=cpu",
    ]


def torchrun(*args: str) -> None:
    """Run ``torchrun --standalone --nproc_per_node=2 ARGS`` and fail the test with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return Checkpoint.load(run / "checkpoints" / "last.pt").model_state


def assert_same_weights(a: dict, b: dict, lr: float = 2e-3) -> None:
    """Equal to float tolerance, but for the odd weight whose gradient was about 0 at some step: Adam divides the
    gradient by its own size, so rounding noise there moves the weight by up to a step (lr); allow that in 1e-3."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    scale = torch.cat([b[k].abs().flatten() for k in a])
    assert (diff <= 1e-6 + 1e-4 * scale).float().mean() >= 0.999
    assert diff.max() <= lr


def files(run: Path) -> list[str]:
    names = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    return [n if not n.startswith("tensorboard/") else "tensorboard/events" for n in names]


@pytest.fixture(scope="module")
def runs(clean_root, tmp_path_factory) -> Path:
    """One torchrun launch of 2 ranks of batch 1: a whole run (through the CLI), one stopped after step 2, one
    stopped by a 3-second time budget."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "script.py").write_text(SCRIPT)
    torchrun(str(out / "script.py"), str(out), *overrides(clean_root, out / "unused", 1))
    return out


@pytest.fixture(scope="module")
def one(clean_root, tmp_path_factory) -> Path:
    """The reference: 1 process of batch 2, same 3 steps."""
    return train(load_config(None, overrides(clean_root, tmp_path_factory.mktemp("single") / "one", 2)))


@pytest.mark.slow
def test_two_ranks_equal_one_process_of_twice_the_batch(runs, one):
    assert_same_weights(weights(runs / "two"), weights(one))
    two_rows = list(csv.DictReader((runs / "two" / "train_log.csv").open()))
    one_rows = list(csv.DictReader((one / "train_log.csv").open()))
    assert [r["step"] for r in two_rows] == ["1", "2", "3"]  # one set of logs, each step once
    for a, b in zip(two_rows, one_rows):  # the logged loss is the mean over both ranks
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        # the gradients are averaged over the ranks, not summed: the norm is that of the whole batch's gradient
        # (Adam alone would not tell: it divides the gradient by its own size)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))
    assert float(two_rows[-1]["val_dice"]) == pytest.approx(float(one_rows[-1]["val_dice"]), abs=1e-4)
    assert files(runs / "two") == files(one)  # one run folder, written once: the same files as a single process
    assert Checkpoint.load(runs / "two" / "checkpoints" / "last.pt").items == 6


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_process(runs, one, clean_root):
    broken = runs / "two_broken"
    assert Checkpoint.load(broken / "checkpoints" / "last.pt").step == 2
    assert Checkpoint.load(broken / "checkpoints" / "last.pt").world_size == 2
    train(load_config(None, overrides(clean_root, broken, 2)), resume=True)  # 1 process x 2 = 2 ranks x 1
    assert_same_weights(weights(broken), weights(one))
    rows = list(csv.DictReader((broken / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]


@pytest.mark.slow
def test_time_budget_stops_every_rank_at_the_same_step(runs):
    """Had the ranks stopped at different steps, the launch would have hung in a gradient all-reduce."""
    run = runs / "two_budget"
    step = Checkpoint.load(run / "checkpoints" / "last.pt").step
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert 1 <= step < 100000 and rows[-1]["step"] == str(step) and rows[-1]["val_dice"]
    if step >= 3:  # (a machine busy enough to leave time for fewer steps shows nothing about the schedule)
        assert float(rows[-1]["lr"]) < float(rows[1]["lr"])  # it ran on the time


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == (1, 2, 1)
    ctx = DistContext()
    assert ctx.is_main and not ctx.active and ctx.world_size == 1
    assert on_main(ctx, lambda x: x + 1, 1) == 2
    with pytest.raises(VesuviusError, match="boom"):
        on_main(ctx, lambda: (_ for _ in ()).throw(VesuviusError("boom")))


@pytest.mark.slow
def test_python_dash_m_is_the_command():
    done = subprocess.run([sys.executable, "-m", "vesuvius_monai", "train", "--config", "no/such.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: config file not found: no/such.yaml"
