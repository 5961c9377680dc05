"""Prediction under torchrun: 2 CPU processes (gloo, 1 thread each) share the blocks of one volume and of a folder of
volumes, and write exactly what one process writes (bit for bit, float32 stores; the single-process references run
with 1 thread too, since a convolution's float sums depend on the thread count). A rank that fails or is killed
leaves a run that the same command finishes, with 2 processes or 1.

Two torchrun launches run a script that calls the command (``vesuvius_monai.cli.main``) in each rank and records
every block written, every store published and what each rank saw when the command returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vesuvius_monai
from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.models import build_model

# window 16, overlap 0.25: stride 12, blocks of 24
OVERRIDES = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32", "infer.sw_batch_size=3",
             "infer.pyramid_levels=2"]
SHAPES = {"a": (72, 40, 40), "b": (50, 30, 45), "c": (30, 20, 26)}  # 3 x 2 x 2, 3 x 2 x 2 and 2 x 1 x 2 blocks

SCRIPT = r"""
import json, os, signal, sys, time
from pathlib import Path
from vesuvius_monai.cli import main
from vesuvius_monai.engine import zarr_predict as predict_module
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.zarr_store import PredictionStore

rank = int(os.environ["RANK"])
plan = json.loads(Path(sys.argv[1]).read_text())
events = open(f"{plan['events']}.{rank}", "a")
failure = {"mode": None}

def note(kind, **what):
    events.write(json.dumps({"kind": kind, "rank": rank, "t": time.time(), **what}) + "\n")
    events.flush()

write_block = PredictionStore.write_block
def spy_write(self, index, region, probs):
    write_block(self, index, region, probs)
    note("write", store=self.path.name, block=list(index))
    if rank == 1 and failure["mode"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and failure["mode"] == "raise":
        raise VesuviusError("injected failure")
PredictionStore.write_block = spy_write

publish = predict_module.publish_store
def spy_publish(store, out, blocks=None):
    note("publish", store=Path(out).name)
    return publish(store, out, blocks)
predict_module.publish_store = spy_publish

for i, command in enumerate(plan["commands"]):
    failure["mode"] = command.get("fail")
    code = main(command["argv"])
    seen = [Path(p).is_dir() and not Path(p + ".partial").exists() and PredictionStore.open(p, "r").meta["complete"]
            for p in command["outputs"]]
    note("returned", command=i, code=code, complete=seen)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A freshly initialised tiny resunet3d checkpoint (window 16) and three random volumes in ``vols/``."""
    root = tmp_path_factory.mktemp("dpredict")
    cfg = load_config(None, ["model.kwargs={init_features: 4, depth: 2, norm_groups: 2}",
                             "infer.roi_size=[16,16,16]"])
    torch.manual_seed(0)
    Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(root / "model.pt")
    (root / "vols").mkdir()
    for i, (name, shape) in enumerate(SHAPES.items()):
        np.save(root / "vols" / f"{name}.npy", np.random.default_rng(i).normal(1000, 200, shape).astype(np.float32))
    (root / "script.py").write_text(SCRIPT)
    return root


def argv(root: Path, inputs: list[Path], output: Path) -> list[str]:
    return ["predict", "--checkpoint", str(root / "model.pt"), *sum((["--input", str(p)] for p in inputs), []),
            "--output", str(output), *OVERRIDES]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(setup) -> dict[str, np.ndarray]:
    """Each volume predicted by the command in this process (no torchrun), 1 thread."""
    with one_thread():
        assert main(argv(setup, [setup / "vols"], setup / "single")) == 0
    return {name: probabilities(setup / "single" / f"{name}.zarr") for name in SHAPES}


def probabilities(store: Path) -> np.ndarray:
    return PredictionStore.open(store, mode="r").read_probabilities()


def torchrun(root: Path, name: str, commands: list[dict]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the script's ``commands`` in ``torchrun --standalone --nproc_per_node=2``; its output and events."""
    plan = {"events": str(root / f"{name}.events"), "commands": commands}
    (root / f"{name}.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # and this checkout's package, not whichever one is installed:
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vesuvius_monai.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "script.py"), str(root / f"{name}.json")], capture_output=True, text=True,
                          env=env, timeout=300)
    events = [json.loads(line) for rank in (0, 1) if Path(f"{plan['events']}.{rank}").exists()
              for line in Path(f"{plan['events']}.{rank}").read_text().splitlines()]
    return done, sorted(events, key=lambda e: e["t"])


def n_blocks(name: str) -> int:
    return len(WindowGrid(SHAPES[name], (16, 16, 16), 0.25, (16, 16, 16)).blocks())


@pytest.fixture(scope="module")
def launch(setup) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One launch of 2 ranks: volume a into one.zarr; the folder into many/; volume a into failed.zarr with rank 1
    raising an error after its first block; the same command again (finishing failed.zarr with 2 ranks)."""
    vol, many = setup / "vols" / "a.npy", setup / "many"
    commands = [
        {"argv": argv(setup, [vol], setup / "one.zarr"), "outputs": [str(setup / "one.zarr")]},
        {"argv": argv(setup, [setup / "vols"], many), "outputs": [str(many / f"{n}.zarr") for n in SHAPES]},
        {"argv": argv(setup, [vol], setup / "failed.zarr"), "outputs": [], "fail": "raise"},
        {"argv": argv(setup, [vol], setup / "failed.zarr"), "outputs": [str(setup / "failed.zarr")]},
        {"argv": argv(setup, [vol], setup / "roi.zarr") + ["--roi", ROI], "outputs": [str(setup / "roi.zarr")]},
    ]
    done, events = torchrun(setup, "launch", commands)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done, events


ROI = "5:70,3:37,:"  # its z offset is not a multiple of the blocks' 24: chunks of 1 in z keep one writer each


@pytest.mark.slow
def test_ranks_share_the_pyramid_and_an_roi(setup, references, launch):
    """The pyramid that rank 0 builds after every rank is done equals the single process's, read by ome-zarr's
    reader; an ROI shared by the ranks equals the whole volume's prediction restricted to it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    levels = [[np.asarray(d) for d in list(Reader(parse_url(str(path)))())[0].data]
              for path in (setup / "one.zarr", setup / "single" / "a.zarr")]
    assert len(levels[0]) == len(levels[1]) == 2
    for mine, single in zip(*levels):
        np.testing.assert_array_equal(mine, single)
    roi = tuple(slice(*(int(v) if v else None for v in part.split(":"))) for part in ROI.split(","))
    np.testing.assert_allclose(probabilities(setup / "roi.zarr"), references["a"][roi], rtol=0, atol=1e-6)
    store = PredictionStore.open(setup / "roi.zarr", "r")
    assert store.array.chunks == (1, 24, 24)  # z: gcd(block 24, offset 5) (no chunk straddles a plane of blocks)


def returned(events: list[dict], command: int) -> list[dict]:
    return [e for e in events if e["kind"] == "returned" and e["command"] == command]


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(setup, references, launch):
    done, events = launch
    np.testing.assert_array_equal(probabilities(setup / "one.zarr"), references["a"])
    writes = [(e["rank"], tuple(e["block"])) for e in events
              if e["kind"] == "write" and e["store"] == "one.zarr.partial"]
    blocks = [b for _, b in writes]
    assert len(blocks) == len(set(blocks)) == n_blocks("a")  # every block once
    assert {r for r, _ in writes} == {0, 1}  # shared between the ranks
    planes = [sorted({b[0] for r, b in writes if r == rank}) for rank in (0, 1)]
    assert planes[0] + planes[1] == list(range(3))  # each rank's share: a contiguous run of whole z-planes of blocks
    # at most one z-plane of windows (3 y-starts x 3 x-starts) recomputed at the one seam (fewer when the rank below
    # had written some of its spills by then)
    counts = re.findall(r"(\d+) windows, (\d+) more \(([\d.]+)%\) recomputed at the seams", done.stderr)
    assert counts and int(counts[0][0]) == 6 * 3 * 3 and int(counts[0][1]) <= 3 * 3, done.stderr[-3000:]


@pytest.mark.slow
def test_a_folder_of_volumes_is_shared_too(setup, references, launch):
    _, events = launch
    for name in SHAPES:
        np.testing.assert_array_equal(probabilities(setup / "many" / f"{name}.zarr"), references[name])
    ranks = {e["rank"] for e in events if e["kind"] == "write" and e["store"] in {f"{n}.zarr.partial" for n in SHAPES}}
    assert ranks == {0, 1}
    assert sorted(p.name for p in (setup / "many").iterdir()) == [f"{n}.zarr" for n in SHAPES]


@pytest.mark.slow
def test_stores_are_published_once_after_every_rank_is_done(launch):
    """Rank 0 alone publishes each store, once, after the last block of either rank; every rank returns after that
    and sees the finished store (never a half-renamed one)."""
    _, events = launch
    published = [e for e in events if e["kind"] == "publish"]
    assert sorted(e["store"] for e in published) == sorted(["one.zarr", *(f"{n}.zarr" for n in SHAPES),
                                                             "failed.zarr", "roi.zarr"])
    assert {e["rank"] for e in published} == {0}
    for event in published:
        writes = [e["t"] for e in events if e["kind"] == "write" and e["store"] == event["store"] + ".partial"]
        assert max(writes) < event["t"]
    for command, stores in ((0, ["one.zarr"]), (1, [f"{n}.zarr" for n in SHAPES]), (3, ["failed.zarr"])):
        ends = returned(events, command)
        assert len(ends) == 2 and all(e["code"] == 0 and all(e["complete"]) for e in ends)
        assert max(e["t"] for e in published if e["store"] in stores) < min(e["t"] for e in ends)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_and_the_rerun_finishes(setup, references, launch):
    done, events = launch
    assert [e["code"] for e in returned(events, 2)] == [2, 2]  # both ranks, without waiting for a timeout
    assert done.stderr.count("error: rank 1: injected failure; the blocks written so far are kept") == 2
    blocks = [tuple(e["block"]) for e in events if e["kind"] == "write" and e["store"] == "failed.zarr.partial"]
    assert len(blocks) == len(set(blocks)) == n_blocks("a")  # the rerun wrote only the blocks not written
    np.testing.assert_array_equal(probabilities(setup / "failed.zarr"), references["a"])


@pytest.mark.slow
def test_a_killed_rank_is_finished_by_one_process(setup, references, caplog):
    """Rank 1 is SIGKILLed after its first block; the launch fails, nothing is published, and the same command in
    one process (no torchrun) predicts only the blocks not written, ending bit for bit like an uninterrupted run."""
    out = setup / "killed.zarr"
    done, events = torchrun(setup, "killed", [{"argv": argv(setup, [setup / "vols" / "a.npy"], out), "outputs": [],
                                               "fail": "kill"}])
    assert done.returncode != 0
    assert not out.exists()
    written = {tuple(e["block"]) for e in events if e["kind"] == "write"}
    assert 1 <= len(written) < n_blocks("a")
    assert len(PredictionStore.open(setup / "killed.zarr.partial", mode="r").done_blocks()) == len(written)
    with one_thread(), caplog.at_level("INFO", logger="vesuvius_monai"):
        assert main(argv(setup, [setup / "vols" / "a.npy"], out)) == 0
    assert f"{n_blocks('a') - len(written)} to predict" in caplog.text
    np.testing.assert_array_equal(probabilities(out), references["a"])
