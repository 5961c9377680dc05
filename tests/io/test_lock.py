"""Lock files: one holder at a time, released on exit, stale locks of gone processes named and taken over (by one
newcomer only), locks of other hosts and unreadable lock files refused untouched."""

import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import vesuvius_monai.io.lock as lock_module
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.lock import Holder, Lock


def _holder(path):
    return Holder.parse(path.read_text())


def test_one_holder_at_a_time_and_released_on_exit(tmp_path):
    path = tmp_path / "new" / "x.lock"
    with Lock(path, "run folder x", "train"):
        held = _holder(path)
        assert (held.pid, held.host, held.command) == (os.getpid(), socket.gethostname(), "train") and held.since
        with pytest.raises(VesuviusError, match=rf"run folder x is in use by 'train' \(pid {os.getpid()} on host "
                                                rf"{socket.gethostname()}, since .*\); lock file {path}"):
            Lock(path, "run folder x", "plan").acquire()
        assert _holder(path) == held  # the refused one changed nothing
    assert not path.exists() and not path.parent.exists()  # the folder made for it, empty again, goes too
    path.parent.mkdir()
    with Lock(path, "run folder x", "train"):
        (path.parent / "output.txt").write_text("kept")
    assert sorted(p.name for p in path.parent.iterdir()) == ["output.txt"]
    for interruption in (KeyboardInterrupt, ValueError):
        with pytest.raises(interruption), Lock(path, "run folder x", "train"):
            raise interruption()
        assert not path.exists()


def _killed_holder(path):
    """A real process that took the lock and was killed (SIGKILL: nothing ran on its way out); its pid."""
    code = (f"import os, signal; from vesuvius_monai.io.lock import Lock; "
            f"Lock({str(path)!r}, 'x', 'predict').acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code])
    assert done.returncode == -signal.SIGKILL and path.is_file()
    return _holder(path).pid


def test_a_stale_lock_is_named_and_taken_over(tmp_path, caplog):
    path = tmp_path / "out.zarr.lock"
    dead = _killed_holder(path)
    with caplog.at_level("WARNING", logger="vesuvius_monai"), Lock(path, "Zarr output out.zarr", "predict"):
        assert _holder(path).pid == os.getpid()
    assert f"taking over the lock {path} of 'predict' (pid {dead} on host" in caplog.text
    assert "no longer running" in caplog.text
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing of the stale lock left either


def test_a_reused_pid_or_a_restart_makes_a_lock_stale(tmp_path):
    me = Holder.me("train")
    assert me.alive()
    assert dataclasses.replace(me, started="1").alive() is False  # the same pid, started at another time
    if me.boot:
        assert dataclasses.replace(me, boot="another-boot").alive() is False  # the host restarted since
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({**me.__dict__, "started": "1", "token": "old"}))
    with Lock(path, "x", "train"):
        assert _holder(path).token != "old"


def test_a_lock_of_another_host_is_refused_untouched(tmp_path):
    path = tmp_path / "vesuvius_run.lock"
    path.write_text(json.dumps({**Holder.me("train").__dict__, "host": "node-7"}))
    before = path.read_bytes()
    with pytest.raises(VesuviusError, match=rf"locked by 'train' \(pid \d+ on host node-7, .*cannot be checked from "
                                            rf"host .*if that command is no longer running, delete {path}"):
        Lock(path, "run folder r", "train").acquire()
    assert path.read_bytes() == before


def test_an_unreadable_lock_file_is_refused_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "READ_TRIES", 2)
    path = tmp_path / "p.zarr.lock"
    for text in ("", "my notes"):
        path.write_text(text)
        with pytest.raises(VesuviusError, match=rf"not a lock this program can read.*delete {path}"):
            Lock(path, "Zarr output p.zarr", "predict").acquire()
        assert path.read_text() == text


def test_a_newcomer_late_to_take_over_a_stale_lock_leaves_the_new_one(tmp_path):
    """A newcomer judged a lock stale, but another one took it over before it acted: the live lock stays."""
    path = tmp_path / "x.lock"
    stale = Holder(pid=_killed_holder(path), host=socket.gethostname(), command="predict", argv="", since="then",
                   token=_holder(path).token)
    with Lock(path, "x", "train"):
        live = path.read_bytes()
        Lock(path, "x", "train")._take_over(stale)  # what the late one does with what it read before
        assert path.read_bytes() == live
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]


def test_an_interrupted_take_over_is_refused_naming_the_files(tmp_path):
    path = tmp_path / "x.lock"
    _killed_holder(path)
    claim = tmp_path / f"x.lock.{_holder(path).token}.takeover"
    _killed_holder(claim)  # a newcomer killed while it took the stale lock over
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(VesuviusError, match=rf"take-over of the stale lock {path} .* was interrupted.*delete {path} "
                                            rf"and {claim}"):
        Lock(path, "x", "train").acquire()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _race(path, start, results):
    start.wait()
    try:
        with Lock(path, "x", "predict"):
            results.put("took")
            time.sleep(1.0)  # hold it while the others try
    except VesuviusError:
        results.put("refused")


@pytest.mark.slow
def test_newcomers_racing_for_a_stale_lock_take_it_once(tmp_path):
    context = multiprocessing.get_context("fork")
    for _ in range(3):
        path = tmp_path / "x.lock"
        _killed_holder(path)
        start, results = context.Event(), context.Queue()
        racers = [context.Process(target=_race, args=(path, start, results)) for _ in range(4)]
        for racer in racers:
            racer.start()
        start.set()
        outcome = sorted(results.get(timeout=60) for _ in racers)
        for racer in racers:
            racer.join()
        assert outcome == ["refused", "refused", "refused", "took"]
        assert not path.exists()
