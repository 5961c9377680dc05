"""One writer per Zarr output: a second ``predict`` into a store that a live run is writing is refused before it
computes anything, naming the running one; the lock of a killed run is taken over by the rerun, which finishes the
store. (The torchrun ranks of one job share their job's lock: tests/engine/test_distributed_predict.py.)"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vesuvius_monai.cli import main
from vesuvius_monai.data.synthetic import SynthParams, make_fragment
from vesuvius_monai.io.zarr_store import PredictionStore

OVERRIDES = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32", "infer.tta_flip_axes=[0,1,2]"]


@pytest.mark.slow
def test_a_second_predict_into_a_store_in_use_is_refused(trained_run, tmp_path, monkeypatch, capsys, caplog):
    volume = tmp_path / "scan.npy"
    np.save(volume, make_fragment(7, SynthParams(shape=(48, 48, 72)))[0])  # 2 x 2 x 3 blocks, 8 views each
    out = tmp_path / "p.zarr"
    argv = ["predict", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), "--input", str(volume),
            "--output", str(out), *OVERRIDES]
    first = subprocess.Popen([sys.executable, "-m", "vesuvius_monai.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock = tmp_path / "p.zarr.lock"
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline and not (lock.is_file() and lock.stat().st_size):
        time.sleep(0.01)
    written = []
    monkeypatch.setattr(PredictionStore, "write_block", lambda *a: written.append(a))
    assert main(argv) == 2
    assert first.poll() is None, "the first prediction finished before the second could start"
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and re.search(rf"Zarr output {out} is in use by 'predict' \(pid {first.pid} on host .*"
                                        rf"lock file {lock}", line[0]), line
    assert not written  # refused before computing anything
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.is_file() and not out.exists()  # what a killed run leaves: its lock and its unfinished store
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="vesuvius_monai"):
        assert main(argv) == 0
    assert f"taking over the lock {lock} of 'predict' (pid {first.pid}" in caplog.text
    assert not lock.exists() and PredictionStore.open(out, mode="r").meta["complete"]
    assert main([*argv[:-len(OVERRIDES) - 2], "--output", str(tmp_path / "straight.zarr"), *OVERRIDES]) == 0
    straight = PredictionStore.open(tmp_path / "straight.zarr", mode="r").read_probabilities()
    np.testing.assert_array_equal(PredictionStore.open(out, mode="r").read_probabilities(), straight)
    assert sorted(os.listdir(tmp_path)) == ["p.zarr", "scan.npy", "straight.zarr"]  # no lock, no store left over


def test_a_refused_predict_leaves_no_folder_behind(trained_run, tmp_path, capsys):
    many = tmp_path / "new" / "many"  # a folder output: one <id>.zarr (and its lock) per volume
    assert main(["predict", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), "--input",
                 str(tmp_path / "missing.npy"), "--output", str(many)]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []
