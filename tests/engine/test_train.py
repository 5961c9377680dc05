import csv
import math
import os
import re
import shutil
import time

import pytest
import torch

import vesuvius_monai.engine.trainer as trainer
from helpers import snapshot
from vesuvius_monai.config import TrainConfig
from vesuvius_monai.engine.schedule import LR_FLOOR, RunClock, lr_factor
from vesuvius_monai.engine.train import prepare_run_dir, train
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import LOCK_FILE, MARKER


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor(TrainConfig(steps=100, warmup_steps=10, schedule="cosine"))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(99) < 0.02
    poly = lr_factor(TrainConfig(steps=100, warmup_steps=0, schedule="poly"))
    assert poly(50) == pytest.approx(0.5**0.9)


def test_train_writes_a_complete_run(trained_run, tiny_config):
    run = trained_run  # the session's tiny run, trained through the command line with tiny_config's overrides
    for name in ("config.yaml", "train_log.csv", "learning_curve.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_dice"] and rows[3]["val_dice"]
    factor = lr_factor(tiny_config.train)  # no time budget: the schedule runs on steps, as it always did
    assert [float(r["lr"]) for r in rows] == pytest.approx([tiny_config.train.lr * factor(s) for s in range(4)])
    assert (run / MARKER).is_file()
    last = Checkpoint.load(run / "checkpoints" / "last.pt")
    assert last.step == 4
    assert last.model_name == "resunet3d" and last.model_kwargs["init_features"] == 4
    assert last.config["train"]["steps"] == 4
    best = Checkpoint.load(run / "checkpoints" / "best.pt")  # the checkpoint rebuilds its own model
    model, cfg = best.model(), best.run_config()
    assert cfg.model.kwargs == tiny_config.model.kwargs
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(tiny_config):
    train(tiny_config)
    with pytest.raises(VesuviusError, match="already holds a run"):
        train(tiny_config)


@pytest.mark.slow
def test_resume_is_exact(make_tiny_config, tmp_path):
    straight, broken = make_tiny_config("straight"), make_tiny_config("broken")
    train(straight)
    train(broken, stop_at_step=2)
    assert Checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt").step == 2
    train(broken, resume=True)
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = Checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert b.step == a.step == 4
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    rows = list(csv.DictReader((tmp_path / "broken" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_patch_size_must_fit_the_model(make_tiny_config):
    cfg = make_tiny_config("r", "transforms.patch_size=[18,16,16]")
    with pytest.raises(VesuviusError, match=r"transforms.patch_size.*multiples of 4"):
        train(cfg)


@pytest.mark.slow
def test_resume_with_another_config_is_refused(make_tiny_config):
    train(make_tiny_config("r"), stop_at_step=2)
    with pytest.raises(VesuviusError, match=r"cannot resume.*train.lr"):
        train(make_tiny_config("r", "train.lr=0.5"), resume=True)


def test_splits_are_recorded(trained_run):
    import json

    run = trained_run
    splits = json.loads((run / "splits.json").read_text())
    assert splits == {"train": ["frag_000", "frag_001", "frag_002"], "val": ["frag_003"], "test": ["frag_004"]}
    assert Checkpoint.load(run / "checkpoints" / "best.pt").splits == splits


@pytest.mark.slow
def test_log_holds_each_loss_term(make_tiny_config):
    run = train(make_tiny_config("r", "train.loss={dice: 1, bce: 0.5}", "train.log_every=2", "train.val_every=4"))
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert list(rows[0]) == ["step", "loss", "loss_dice", "loss_bce", "grad_norm", "lr", "seconds", "steps_per_s",
                             "val_dice"]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:  # means over the logging interval of a weighted sum: the weighted sum of the means
        assert float(r["loss"]) == pytest.approx(float(r["loss_dice"]) + 0.5 * float(r["loss_bce"]), rel=1e-5)


# ---------------------------------------------------------------- time budget


class FakeTime:
    """A clock that moves only when told: each training step, validation and save takes a fixed time."""

    def __init__(self, step_s: float = 0.05, val_s: float = 0.5, save_s: float = 0.2) -> None:
        self.t, self.step_s, self.val_s, self.save_s = 1000.0, step_s, val_s, save_s

    def __call__(self) -> float:
        return self.t

    def install(self, monkeypatch) -> None:
        import vesuvius_monai.engine.train as train_module

        def timed(func, seconds):
            def wrapper(*args, **kwargs):
                result = func(*args, **kwargs)
                self.t += seconds
                return result
            return wrapper

        monkeypatch.setattr(train_module, "RunClock", lambda **kw: RunClock(timer=self, **kw))
        monkeypatch.setattr(train_module, "validate", timed(train_module.validate, self.val_s))
        monkeypatch.setattr(trainer, "save_state", timed(trainer.save_state, self.save_s))
        monkeypatch.setattr(trainer.Trainer, "_step", timed(trainer.Trainer._step, self.step_s))


@pytest.mark.slow
def test_time_budgeted_run_ends_annealed_inside_the_budget(make_tiny_config, monkeypatch):
    """6 s budget, steps of 0.05 s, validation 0.5 s, saves 0.2 s (a fake clock: the machine is too noisy for a
    test on real time): the run stops on time, its last step at the schedule's floor, its final validation and
    saves done before the budget ends."""
    fake = FakeTime()
    fake.install(monkeypatch)
    cfg = make_tiny_config("r", "train.max_minutes=0.1", "train.steps=100000", "train.val_every=25",
                           "train.log_every=5", "train.warmup_steps=1000")
    began = fake.t
    run = train(cfg)
    assert fake.t - began <= 6.0  # everything, the final validation and saves included, inside the budget
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert rows[0]["step"] == "0" and rows[0]["val_dice"]  # validation and save measured before training
    steps = Checkpoint.load(run / "checkpoints" / "last.pt").step
    assert 30 < steps < 100 and int(rows[-1]["step"]) == steps and rows[-1]["val_dice"]
    lrs = [float(r["lr"]) for r in rows[1:]]
    assert lrs[-1] < 1.5 * LR_FLOOR * cfg.train.lr  # at the floor, but for the one step it takes
    assert lr_factor(cfg.train)(steps) < 0.1  # the step-based warm-up would barely have begun
    assert max(lrs) > 0.9 * cfg.train.lr and lrs.index(max(lrs)) < len(lrs) // 2  # warm-up, then decay


@pytest.mark.slow
def test_real_time_budget_is_kept(make_tiny_config):
    """The same on the real clock, with generous tolerance: stopped by the budget, on time, annealing."""
    cfg = make_tiny_config("r", "train.max_minutes=0.1", "train.steps=100000", "train.val_every=100000",
                           "train.log_every=1", "train.warmup_steps=0")
    began = time.perf_counter()
    run = train(cfg)
    assert time.perf_counter() - began < 6.0 * 1.5
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    lrs = [float(r["lr"]) for r in rows[1:]]
    assert int(rows[-1]["step"]) < 100000 and rows[-1]["val_dice"]
    if len(lrs) >= 5:  # a busy machine may leave time for a step or two only (the fake-clock test covers that case)
        assert lrs[-1] < 0.8 * cfg.train.lr  # decayed on time (on steps it would still be 1.0 x lr)


def test_clock_maps_training_time_onto_the_steps():
    fake = FakeTime()
    clock = RunClock(budget_s=101.0, timer=fake)
    fake.t += 10  # set-up
    clock.train_start_s, clock.val_s, clock.save_s = clock.now(), 0.0, 0.0  # reserve: the 1 s margin
    assert clock.reserve() == pytest.approx(1.0)
    fake.t += 45  # half of the 90 s training window
    assert clock.position(3, 1000) == pytest.approx(500.0)
    assert clock.position(700, 1000) == 700.0  # the steps ran ahead of the time: they drive
    clock.recent_steps.append(2.0)
    assert not clock.out_of_time(checkpoint_due=False)
    fake.t += 44  # 99 s: the next step (2 s) + reserve (1 s) would end past 101 s
    assert clock.out_of_time(checkpoint_due=False)
    assert clock.position(3, 1000) == pytest.approx(1000 * 89 / 90)
    saved = clock.state_dict()
    fake.t += 500  # the run was stopped; the resumed session's clock continues from the saved run time
    resumed = RunClock(budget_s=101.0, timer=fake)
    resumed.load_state_dict(saved)
    assert resumed.now() == pytest.approx(99.0)
    assert resumed.position(3, 1000) == pytest.approx(1000 * 89 / 90)
    assert RunClock(timer=fake).position(7, 1000) == 7.0  # no budget: the step


def test_no_budget_never_stops_on_time():
    fake = FakeTime()
    clock = RunClock(timer=fake)
    fake.t += 1e9
    assert not clock.out_of_time(checkpoint_due=True)


# ---------------------------------------------------------------- run folders


def test_refuses_a_folder_that_is_not_a_run_and_leaves_it_intact(make_tiny_config, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "train_log.csv").write_text("my,own\n1,2\n")
    (mine / "notes").mkdir()
    (mine / "notes" / "a.txt").write_bytes(b"\x00\x01keep")
    before = snapshot(mine)
    with pytest.raises(VesuviusError, match=rf"output_dir {mine} is not empty and is not a vesuvius_monai run"):
        train(make_tiny_config("mine"))
    with pytest.raises(VesuviusError, match="cannot resume"):
        train(make_tiny_config("mine"), resume=True)
    assert snapshot(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes", "train_log.csv"]


@pytest.mark.slow
def test_run_stopped_before_its_first_checkpoint_starts_again(make_tiny_config, tmp_path):
    cfg = make_tiny_config("r")
    prepare_run_dir(cfg, resume=False)  # what a run killed during set-up leaves: marker, config.yaml
    (tmp_path / "r" / "train_log.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(VesuviusError, match="stopped before its first checkpoint"):
        train(cfg, resume=True)
    run = train(cfg)
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_empty_folder_is_fine(make_tiny_config, tmp_path):
    (tmp_path / "r").mkdir()
    assert Checkpoint.load(train(make_tiny_config("r")) / "checkpoints" / "last.pt").step == 4


@pytest.mark.slow
def test_resume_refuses_a_changed_split(make_tiny_config, synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    cfg = make_tiny_config("r", f"data.root={root}")
    train(cfg, stop_at_step=2)
    for folder in ("images", "labels"):  # one more fragment: it joins the training split
        src = next((root / folder).glob("frag_002.*"))
        shutil.copy(src, src.with_name(src.name.replace("frag_002", "frag_005")))
    splits_before = (tmp_path / "r" / "splits.json").read_text()
    with pytest.raises(VesuviusError, match=r"data split changed.*frag_005: absent -> train"):
        train(cfg, resume=True)
    assert (tmp_path / "r" / "splits.json").read_text() == splits_before


@pytest.mark.slow
def test_non_finite_loss_stops_before_any_save(make_tiny_config, monkeypatch):
    real_forward = trainer.Trainer._step

    def poisoned(self, batch):
        if self.state.step == 2:  # the third step's patches turn to NaN
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        real_forward(self, batch)

    monkeypatch.setattr(trainer.Trainer, "_step", poisoned)
    cfg = make_tiny_config("r", "train.val_every=2", "train.log_every=2")
    with pytest.raises(VesuviusError, match=r"non-finite \(loss nan.*steps 3..4.*holds step 2"):
        train(cfg)
    last = Checkpoint.load(cfg.output_dir + "/checkpoints/last.pt")
    assert last.step == 2 and all(torch.isfinite(v).all() for v in last.model_state.values())


# ---------------------------------------------------------------- one run per folder, nothing left by a failure


@pytest.mark.slow
def test_a_second_train_into_a_run_in_use_is_refused(make_tiny_config, tiny_args, synthetic_root, tmp_path,
                                                     monkeypatch, capsys):
    """While a run trains (here: at its first checkpoint), a second train into its folder is refused with one line
    naming the running one, and changes nothing there; the lock goes with the run."""
    from vesuvius_monai.cli import main

    cfg = make_tiny_config("r")
    run = tmp_path / "r"
    seen = []
    real = trainer.Trainer._checkpoint

    def second_train(self, row, *, final=False):
        if not seen:
            seen.append("running")
            before = snapshot(run)
            code = main(["train", *tiny_args(synthetic_root, run)])
            seen[0] = (code, capsys.readouterr().err, snapshot(run) == before)
        real(self, row, final=final)

    monkeypatch.setattr(trainer.Trainer, "_checkpoint", second_train)
    train(cfg)
    code, err, unchanged = seen[0]
    errors = re.findall(r"error: [^\r\n]*", err)  # (after the running one's progress bar, on its line)
    assert code == 2 and len(errors) == 1 and unchanged, err
    assert re.search(rf"run folder {run} is in use by 'train' \(pid {os.getpid()} on host .*lock file "
                     rf"{run / LOCK_FILE}", errors[0]), errors[0]
    assert not (run / LOCK_FILE).exists()
    assert [int(r["step"]) for r in csv.DictReader((run / "train_log.csv").open())] == [1, 2, 3, 4]


def test_a_config_or_model_error_creates_nothing(make_tiny_config, tmp_path):
    cfg = make_tiny_config("new/run", "model.kwargs={init_features: 4, depth: 2, norm_groups: 4, widht: 8}")
    with pytest.raises(VesuviusError, match="widht"):
        train(cfg)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_run_failing_after_set_up_removes_only_the_folder_it_made(make_tiny_config, tmp_path, monkeypatch):
    import vesuvius_monai.engine.train as train_module

    def broken(*args):
        raise VesuviusError("the data broke")

    monkeypatch.setattr(train_module, "_training_batches", broken)
    with pytest.raises(VesuviusError, match="the data broke"):
        train(make_tiny_config("new/run"))
    assert not (tmp_path / "new").exists()  # made by the run: removed, its new parent too
    (tmp_path / "empty").mkdir()
    with pytest.raises(VesuviusError, match="the data broke"):
        train(make_tiny_config("empty"))
    assert (tmp_path / "empty" / MARKER).is_file()  # it was there before: nothing in it is removed
    assert not (tmp_path / "empty" / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_save_that_never_finished_is_cleaned_up_by_the_next_run(make_tiny_config, tmp_path):
    cfg = make_tiny_config("r")
    train(cfg, stop_at_step=2)
    leftover = tmp_path / "r" / "checkpoints" / ".last.pt.k1ll3d.tmp.pt"  # a process killed while it saved last.pt
    leftover.write_bytes(b"half a checkpoint")
    train(cfg, resume=True)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
