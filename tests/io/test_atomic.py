"""Published folders get the usual permissions; unfinished folders of killed processes are cleaned up by the next
build of the same output, and nothing else is."""

import json
import os
import signal
import subprocess
import sys

from vesuvius_monai.cli import main
from vesuvius_monai.io.atomic import OWNER_FILE, WORK_RECORD, build_dir, work_dir_beside


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_published_folders_get_the_usual_permissions(tmp_path):
    out = tmp_path / "out"
    build_dir(out, "test output", lambda work: (work / "a.txt").write_text("a"))
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert (out / "a.txt").read_text() == "a"
    assert json.loads((out / OWNER_FILE).read_text())["files"] == ["a.txt", OWNER_FILE]  # the work record is gone
    root = tmp_path / "data"  # synth's data.root, through the command
    assert main(["synth", f"data.root={root}", "synth.n_fragments=1", "synth.params.shape=[16,16,16]"]) == 0
    assert root.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _killed_builder(target) -> None:
    """What a command killed while it built ``target`` leaves: its unfinished folder."""
    code = ("import os, signal, sys; from vesuvius_monai.io.atomic import work_dir_beside; "
            "w = work_dir_beside(sys.argv[1]); (w / 'metrics.csv').write_text('half'); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code, str(target)]).returncode == -signal.SIGKILL


def test_unfinished_folders_of_killed_processes_are_removed_by_the_next_build(tmp_path):
    target = tmp_path / "eval"
    _killed_builder(target)
    _killed_builder(tmp_path / "other")  # another output's: not this one's to clean
    live = work_dir_beside(target)  # a process still building (this one)
    theirs = tmp_path / ".eval.mine.partial"  # not made by a command: no record
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".eval.") and p not in (live, theirs)]
    assert len(left) == 1 and (left[0] / WORK_RECORD).is_file()
    build_dir(target, "evaluation", lambda work: (work / "metrics.csv").write_text("done"))
    assert not left[0].exists()
    assert live.is_dir() and (theirs / "notes.txt").read_text() == "keep"
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".other.")]) == 1
    assert (target / "metrics.csv").read_text() == "done"
