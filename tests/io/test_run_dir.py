"""RunDir: the run folder's layout, its marker and when a new run may start there."""

import pytest

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.run_dir import MARKER, RunDir


def test_layout():
    run = RunDir("runs/x")
    assert run.last.as_posix() == "runs/x/checkpoints/last.pt" and run.checkpoint("best") == run.best
    assert RunDir.of_checkpoint(run.best) == run
    assert {p.name for p in (run.config, run.plan, run.splits, run.train_log, run.postprocess, run.eval)} == {
        "config.yaml", "plan.yaml", "splits.json", "train_log.csv", "postprocess.json", "eval"}


def test_a_new_run_starts_only_where_nothing_else_is(tmp_path):
    run = RunDir(tmp_path / "run").start()  # a new folder: made and marked
    assert run.is_run() and (run.path / MARKER).is_file()
    run.start()  # its own run without a checkpoint: may start again
    run.last.parent.mkdir()
    run.last.write_bytes(b"x")
    with pytest.raises(VesuviusError, match="already holds a run"):
        run.start()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(VesuviusError, match="not empty and is not a vesuvius_monai run"):
        RunDir(foreign).start()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(VesuviusError, match="cannot resume"):
        RunDir(foreign).check_resumable()
